"""Random ops run through torch's RNG-state higher-order ops (activation checkpointing).

With `torch.utils.checkpoint` (Hugging Face's `gradient_checkpointing_enable()` included), the
backward recomputes the checkpointed forward. A random op in it (dropout, or an attention kernel
that takes a dropout probability) must draw what the forward drew, so AOTAutograd wraps it:
`run_and_save_rng_state(op, *args)` in the forward returns (RNG state, op's output), and
`run_with_rng_state(state, op, *args)` in the backward replays it. Both are `op(*args)` for the
batch layout; the RNG state is batch-free. `wrapped_op` exposes the call inside.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.utils._pytree import tree_leaves

_HOPS = torch.ops.higher_order
_SAVES_STATE = {getattr(_HOPS, "run_and_save_rng_state", None)} - {None}
_REPLAYS = {getattr(_HOPS, name, None) for name in ("run_with_rng_state", "graphsafe_run_with_rng_state")} - {None}


class WrappedCall:
    """The op a RNG-state node runs, as the call node a layout rule expects (the rules read its
    target, args, kwargs and output value; their results are recorded for the real node)."""

    op = "call_function"

    def __init__(self, node: fx.Node, target: Any, args: tuple[Any, ...], val: Any) -> None:
        self.node, self.target, self.args, self.kwargs = node, target, args, dict(node.kwargs)
        self.name, self.users = node.name, node.users
        self.meta = {**node.meta, "val": val}

    @property
    def all_input_nodes(self) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((self.args, self.kwargs), lambda a: found.append(a) or a)
        return list(dict.fromkeys(found))


def wrapped_op(node: fx.Node) -> tuple[WrappedCall, bool] | None:
    """(the call inside, whether the node also returns the RNG state first) for an RNG-state node."""
    if node.target in _SAVES_STATE:
        target, args, returns_state = node.args[0], tuple(node.args[1:]), True
    elif node.target in _REPLAYS:
        target, args, returns_state = node.args[1], tuple(node.args[2:]), False
    else:
        return None
    return WrappedCall(node, target, args, _output_value(target, args, node.kwargs)), returns_state


def _output_value(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The op's fake output (AOTAutograd leaves these higher-order nodes without meta["val"])."""
    vals = fx.node.map_arg((args, kwargs), lambda a: a.meta.get("val"))
    fake_mode = detect_fake_mode(tree_leaves(vals))
    if fake_mode is None:
        return None
    with fake_mode:
        return target(*vals[0], **vals[1])
