"""Codegen lowering: add the noise into the clipped sum's own buffer.

The passes build the functional `grapefx::add_gaussian_noise(grad, std, id)`, which returns a new
buffer: the clipped sum and its noised copy are both alive at the end of the backward, when most
gradients already are (M1's peak). Where nothing else reads `grad` and `grad` owns its storage,
this pass replaces the op by `grapefx::add_gaussian_noise_(grad, std, id)` and hands `grad` to the
op's users.

It runs on the final node order only (`lower_for_execution`, called by codegen and by the memory
measurement), never before scheduling: a mutation is invisible to data-dependency reordering, and a
reader of `grad` moved past the in-place add would see the noised value (or, the other way round,
an output read before it would leak the un-noised sum). With `grad` read by the noise op alone, no
such reader exists. The liveness model counts the functional op as in place under the same test
(`grapefx.analysis.aliasing.reuses_input_storage`), so the scheduler plans the buffers codegen will run.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from grapefx.analysis.aliasing import reuses_input_storage
from grapefx.schedule.reorder import copy_graph_module


def lower_for_execution(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` with every noise op that can be made in place made so (`gm` is unchanged)."""
    nodes = [n for n in gm.graph.nodes if reuses_input_storage(n)]
    if not nodes:
        return gm
    out = copy_graph_module(gm)
    by_name = {n.name: n for n in out.graph.nodes}
    for old in nodes:
        node = by_name[old.name]
        grad = node.args[0]
        with out.graph.inserting_before(node):
            in_place = out.graph.call_function(torch.ops.grapefx.add_gaussian_noise_.default, node.args, node.kwargs)
        in_place.meta = {k: v for k, v in node.meta.items() if k != "val"}
        in_place.meta["val"] = None
        node.replace_all_uses_with(grad)
        out.graph.erase_node(node)
    out.recompile()
    return out
