"""Refuse forwards that write the batch's data into the model's state.

DP-SGD privatizes the gradient, and the model it releases is built from noised gradients only. A
parameter or buffer changed in place from the batch inside the forward (a running statistic, a
cache of activations, `w.data.copy_(x[0])`) is released as it is, without noise: the model would
leak the samples however well their gradients are clipped. In-place updates that do not read the
batch stay allowed (Gemma-3n's AltUp clamps its weight through `.data` on every step; a step
counter). The batch size counts as the batch's data (under Poisson sampling it is private); other
shapes (a sequence length) do not.

AOTAutograd shows an input mutation either as a `copy_` into the input's placeholder at the end of
the forward (kept in the graph, e.g. under no_grad) or as one of the forward's first outputs (the
input's new value, copied back at run time).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx

from grapefx.analysis.capture import Capture
from grapefx.errors import BatchMixingError, describe_node

aten = torch.ops.aten

# ops that read a tensor's shape, never its values
_SHAPE_ONLY = {aten.sym_size, aten.sym_stride, aten.sym_numel, aten.sym_storage_offset}


def check_state_updates(gm: fx.GraphModule, capture: Capture, mutated_outputs: Sequence[int]) -> None:
    """`mutated_outputs`: the input index of each forward output that is a mutated input's new value."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    reads_batch = nodes_reading_the_batch(gm, capture)
    state = {ph: info for ph, info in zip(placeholders, capture.inputs) if info.kind in _STATE_KINDS}
    updates: list[tuple[fx.Node, fx.Node]] = []  # (state placeholder, its new value)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.copy_.default and node.args[0] in state:
            updates.append((node.args[0], node.args[1]))
    outputs = gm.graph.output_node().args[0]
    for k, index in enumerate(mutated_outputs):
        if index < len(placeholders) and placeholders[index] in state and isinstance(outputs[k], fx.Node):
            updates.append((placeholders[index], outputs[k]))
    for target, value in updates:
        if value in reads_batch:
            raise _leak_error(state[target].name, state[target].kind, value)


_STATE_KINDS = ("param", "frozen_param", "buffer")


def nodes_reading_the_batch(gm: fx.GraphModule, capture: Capture) -> set[fx.Node]:
    """The nodes whose values depend on the batch inputs' values or on the batch size (under Poisson
    sampling it is private: a counter of samples seen)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    batch = {ph for ph, info in zip(placeholders, capture.inputs) if info.kind == "batch"}
    batch |= {ph for ph in placeholders if _is_batch_size(ph.meta.get("val"), capture.batch_size)}
    return _nodes_reading(gm, batch)


def _is_batch_size(val: object, batch_size: object) -> bool:
    return isinstance(val, torch.SymInt) and not isinstance(batch_size, int) and val.node.expr == batch_size


def _nodes_reading(gm: fx.GraphModule, sources: set[fx.Node]) -> set[fx.Node]:
    """The nodes whose values depend on `sources`: their values, or the batch size (dim 0 of a
    batch input); other shape reads (a sequence length) do not count."""
    reading = set(sources)
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if getattr(node.target, "overloadpacket", None) in _SHAPE_ONLY:
            if node.target is aten.sym_size.int and node.args[0] in sources and node.args[1] == 0:
                reading.add(node)
            continue
        if any(a in reading for a in node.all_input_nodes):
            reading.add(node)
    return reading


def _leak_error(name: str, kind: str, value: fx.Node) -> BatchMixingError:
    what = "buffer" if kind == "buffer" else "parameter"
    return BatchMixingError(
        f"The forward writes values computed from the batch into {what} `{name}` in place (by "
        f"{describe_node(value)}): the trained model would carry them without noise, which breaks "
        "the differential-privacy guarantee. Compute the update outside the compiled model from "
        "public data, or stop it in training (BatchNorm running statistics: "
        "grapefx.replace_batch_norm(model); a cache: disable it in training)."
    )
