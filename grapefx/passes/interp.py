"""Evaluating original backward nodes on traced values (shared by the rewrite's phases)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

_VIEWS = {torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default}


def call_node(node: fx.Node, lookup: Callable[[fx.Node], Any]) -> Any:
    args = fx.node.map_arg(node.args, lookup)
    kwargs = fx.node.map_arg(node.kwargs, lookup)
    if node.target in _VIEWS and not kwargs:
        # The backward graph was traced against the eager forward's strides; a forward compiled by
        # Inductor can hand a saved activation back in another layout (ConvNeXt's channels-last
        # permutes), which `view` cannot take. The graph is functional, so `reshape` (traced as the
        # same view where one exists, else a copy) computes the same values.
        return args[0].reshape(args[1])
    return node.target(*args, **kwargs)


class ViewTolerantInterpreter(fx.Interpreter):
    """Runs a graph, turning `view` into `reshape` where the input's strides need it (see `call_node`):
    the codegen retrace hands the graph the Inductor forward's saved activations."""

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target in _VIEWS and not kwargs:
            return args[0].reshape(args[1])
        return super().call_function(target, args, kwargs)


def make_lookup(gm: fx.GraphModule, env: dict, local: dict | None = None) -> Callable[[fx.Node], Any]:
    """Values from `local` first, then `env`; batch-free constants not computed yet (e.g. the zeros a
    slice_scatter writes into, when a parameter is finished early) are computed on demand."""
    local = {} if local is None else local

    def lookup(n: fx.Node) -> Any:
        if n in local:
            return local[n]
        if n not in env:
            env[n] = getattr(gm, n.target) if n.op == "get_attr" else call_node(n, lookup)
        return env[n]

    return lookup
