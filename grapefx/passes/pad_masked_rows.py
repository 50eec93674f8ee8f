"""Grad sites over the rows of x[mask]: read them through the rows put back in their [B, T] places.

A layer applied to selected rows, `head(h[mask])`, sums its weight gradient over the N rows of the
selection, N = Σ_i n_i, each sample owning a run of n_i rows that only the data fixes. No rule can
split such a sum per sample (the layout analysis refuses it: MASKED_ROWS_SITE). But a row left out
by the mask contributes nothing, so the same sum over the rows scattered back into zeros shaped
like the mask, [B·T, ...], is equal, and that one is an ordinary per-sample site: T rows per
sample, ghost norms and weighted sums as for any layer applied to every token. This pass rewrites
each such site to read its row operands through `grapefx::pad_masked_rows`.

The price: the site's norm and weighted sum cost what they would for the layer applied to all B·T
positions (only the weight gradient; the layer's forward and input gradient keep the N rows).
The mask must be in the backward graph (it is whenever x[mask]'s input needs a gradient: the
selection's own backward scatters through it); otherwise the site stays refused.
"""

from __future__ import annotations

import operator
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from grapefx.analysis import indexing_layout  # noqa: F401 - registers grapefx::pad_masked_rows' layout rule
from grapefx.analysis.layout import MASKED_ROWS_SITE, BatchLayout, LayoutResult

_PAD = torch.ops.grapefx.pad_masked_rows.default
_MULTI_OUTPUT_TARGETS = {
    torch.ops.aten.convolution_backward.default,
    torch.ops.aten.native_layer_norm_backward.default,
    torch.ops.aten.native_group_norm_backward.default,
}


def pad_masked_row_sites(gm: fx.GraphModule, layouts: LayoutResult) -> fx.GraphModule | None:
    """A copy of backward graph `gm` whose grad sites over x[mask] rows read padded operands
    (`layouts`: gm's batch layouts); None when there is no such site this pass can rewrite."""
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    plans = {}
    for site, why in layouts.unknown_ops.items():
        padding = _padding(site, layouts) if why == MASKED_ROWS_SITE else None
        if padding and any(position[mask] > position[site] for mask, _, _ in padding.values()):
            padding = None  # a mask computed after the site (never seen): keep the refusal
        if padding:
            plans[site] = padding
    if not plans:
        return None
    graph, copies = fx.Graph(), {}
    graph.output(graph.graph_copy(gm.graph, copies))
    placeholders = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    fake_mode = detect_fake_mode(placeholders)
    for site, padding in plans.items():
        new_site = copies[site]
        padded = {}
        with graph.inserting_before(new_site):
            for arg, (mask, dim, group) in padding.items():
                node = graph.call_function(_PAD, (copies[arg], copies[mask], dim, group))
                with fake_mode:
                    node.meta["val"] = _PAD(arg.meta["val"], mask.meta["val"], dim, group)
                padded[copies[arg]] = node
        if new_site.target in _MULTI_OUTPUT_TARGETS:
            _split_multi_output(graph, new_site, padded, fake_mode)
        else:
            new_site.args = fx.node.map_arg(new_site.args, lambda a: padded.get(a, a))
    graph.eliminate_dead_code()
    return fx.GraphModule(gm, graph)


def _padding(site: fx.Node, layouts: LayoutResult) -> dict[fx.Node, tuple[fx.Node, int, int]]:
    """{operand of `site` holding x[mask] rows: (that mask, the rows' dim, entries per row there)};
    empty when an operand's rows cannot be traced to a mask in this graph or are merged with
    another dim other than by flattening each row ([N, T, d] -> [N·T, d]: `group` T)."""
    out: dict[fx.Node, tuple[fx.Node, int, int]] = {}
    for arg in site.all_input_nodes:
        lay = layouts.layouts.get(arg)
        if not isinstance(lay, BatchLayout) or sympy.sympify(lay.outer * lay.inner).is_number:
            continue
        found = _mask_and_group(lay.inner, layouts.mask_counts) if lay.outer == 1 else None
        if found is None:
            return {}
        out[arg] = (found[0], lay.dim, found[1])
    return out


def _mask_and_group(inner: Any, mask_counts: dict[fx.Node, Any]) -> tuple[fx.Node, int] | None:
    """(the mask, g) when a layout's `inner` is g times one mask's per-sample row count c: the dim
    holds each selected row as g consecutive entries. Masks whose counts torch proved equal have
    no count there (analysis/layout.py): ambiguous rows stay refused, never padded by a wrong mask."""
    for mask, count in mask_counts.items():
        group = inner / count  # products of symbols cancel as they are built; sums need simplify
        if not group.is_Integer and (inner.has(sympy.Add) or count.has(sympy.Add)):
            group = sympy.simplify(group)
        if group.is_Integer and group > 0:
            return mask, int(group)
    return None


def _split_multi_output(graph: fx.Graph, site: fx.Node, padded: dict[fx.Node, fx.Node], fake_mode: Any) -> None:
    """A convolution / norm backward: the original keeps the input gradient over the rows, a copy
    over the padded operands computes the weight and bias gradients (output_mask, the last arg)."""
    wanted = list(site.args[-1])
    args = fx.node.map_arg(site.args[:-1], lambda a: padded.get(a, a))
    with graph.inserting_after(site):
        sums = graph.call_function(site.target, (*args, [False, *wanted[1:]]), dict(site.kwargs))
    vals = fx.node.map_arg(sums.args, lambda n: n.meta["val"])
    with fake_mode:
        sums.meta["val"] = site.target(*vals, **site.kwargs)
    site.args = (*site.args[:-1], [wanted[0], False, False])
    for user in list(site.users):
        if user.target is operator.getitem and user.args[1] in (1, 2):
            user.replace_input_with(site, sums)
