"""Refuse forward graphs whose gradient is not a sum of per-sample gradients.

Two things break the per-sample decomposition: an op that mixes samples (BatchNorm in training mode,
`x - x.mean(0)`, attention over the batch), and a loss that is a nonlinear function of a batch
reduction (`out.mean(0).norm()`). A reduction over the batch is allowed only when everything
downstream of it is batch-free and linear in it, i.e. it builds a sum / mean of per-sample losses.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from grapefx.analysis.layout import LayoutResult
from grapefx.errors import BatchMixingError, describe_node, module_path

aten = torch.ops.aten

_LINEAR_PASSTHROUGH = {
    aten.view,
    aten._unsafe_view,
    aten.reshape,
    aten.squeeze,
    aten.unsqueeze,
    aten.alias,
    aten.clone,
    aten._to_copy,
    aten.expand,
    aten.permute,
    aten.neg,
    aten.sum,
    aten.mean,
    aten.detach,
    aten.add,
    aten.sub,
    aten.select,
    aten.slice,
    aten.t,
    aten.transpose,
}


def check_forward(gm: fx.GraphModule, layouts: LayoutResult) -> None:
    refuse_batch_norms(layouts)
    _refuse_mixing(gm, layouts)


def refuse_batch_norms(layouts: LayoutResult) -> None:
    """BatchNorm in training mode, named as such (it is also the commonest mixing op)."""
    batch_norms = [node for node, kind in layouts.batch_reductions.items() if kind == "batch_norm"]
    if batch_norms:
        raise BatchMixingError(
            f"{describe_node(batch_norms[0])} is BatchNorm in training mode: its statistics mix the samples "
            "of a batch, so per-sample gradients do not exist. Replace it with GroupNorm or "
            "LayerNorm (grapefx.replace_batch_norm(model) swaps every BatchNorm for a GroupNorm), "
            "or freeze it with module.eval() and requires_grad_(False)." + _also(batch_norms[1:])
        )


def _refuse_mixing(gm: fx.GraphModule, layouts: LayoutResult) -> None:
    tainted: set[fx.Node] = set()
    mixing: list[tuple[fx.Node, fx.Node]] = []  # (batch statistic, per-sample op using it)
    for node in gm.graph.nodes:  # topological order
        if node in layouts.batch_reductions:
            val = node.meta.get("val")
            vals = val if isinstance(val, (list, tuple)) else [val]
            if any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in vals):
                _check_linear_reduction(node, layouts.batch_reductions[node])
                tainted.add(node)
        if node.op != "call_function" or node in tainted:
            continue
        parents = [a for a in node.all_input_nodes if a in tainted]
        if parents and layouts.layouts.get(node) is not None:
            mixing.append((parents[0], node))  # a batch statistic used per sample: listed below
        elif parents:
            _check_linear_use(node, parents, layouts)
            tainted.add(node)
    mixing += [
        (node, user)
        for node in layouts.batch_reductions
        for user in node.users
        if layouts.layouts.get(user) is not None and user.op != "output"
    ]
    if mixing:
        error = _mixing_error(*mixing[0])
        others = list(dict.fromkeys(node for node, _ in mixing[1:] if node is not mixing[0][0]))
        raise BatchMixingError(str(error) + _also(others))


# how many further culprits an error lists (the first is described in full)
MAX_LISTED = 6


def _also(nodes: list[fx.Node]) -> str:
    """' Also: ...' naming the other ops that fail the same way, so that one run lists every culprit."""
    if not nodes:
        return ""
    listed = ", ".join(describe_node(n) for n in nodes[:MAX_LISTED])
    more = f" and {len(nodes) - MAX_LISTED} more" if len(nodes) > MAX_LISTED else ""
    return f" The same holds for {len(nodes)} more: {listed}{more}."


_LINEAR_REDUCTIONS = {aten.sum, aten.mean}


def _check_linear_reduction(node: fx.Node, kind: str) -> None:
    """Over the batch only sums of per-sample terms are allowed (sum, mean, a loss's reduction, and
    Σ_i over products of one sample's values, which is what mm/bmm over the batch compute)."""
    if kind in ("mm", "bmm", "loss"):
        return
    if kind == "reduce" and getattr(node.target, "overloadpacket", None) in _LINEAR_REDUCTIONS:
        return
    raise BatchMixingError(
        f"The loss is not a sum or mean of per-sample terms: {describe_node(node)} reduces over the "
        "batch with a nonlinear reduction (max, logsumexp, product, variance, ...). Reduce per-sample "
        "losses with .sum() or .mean() over the batch."
    )


def _check_linear_use(node: fx.Node, parents: list[fx.Node], layouts: LayoutResult) -> None:
    if node.target is operator.getitem:
        return
    packet = getattr(node.target, "overloadpacket", None)
    ok = packet in _LINEAR_PASSTHROUGH
    if packet in (aten.mul,) and len(parents) == 1:
        ok = True
    if (
        packet in (aten.div,)
        and node.args[0] in parents
        and not (isinstance(node.args[1], fx.Node) and node.args[1] in parents)
    ):
        ok = True
    if not ok:
        raise BatchMixingError(
            f"The loss is not a sum or mean of per-sample terms: {describe_node(node)} applies a "
            f"nonlinear function to a reduction over the batch ({describe_node(parents[0])}). "
            "Compute a per-sample loss and reduce it with .sum() or .mean() over the batch "
            "(e.g. F.cross_entropy(..., reduction='mean') without class weights). A mean weighted by "
            "class weights divides by the batch's summed target weights: use reduction='sum' with "
            "loss_reduction='sum' instead (divide by a constant for a mean's scale)."
        )


def _mixing_error(reduction: fx.Node, user: fx.Node) -> BatchMixingError:
    where = module_path(reduction) or module_path(user)
    hint = f" (module `{where}`)" if where and where not in describe_node(reduction) else ""
    return BatchMixingError(
        f"{describe_node(reduction)}{hint} reduces over the batch dimension and its result is used "
        f"again per sample by {describe_node(user)}: this mixes samples, so per-sample gradients "
        "(and DP-SGD's sensitivity bound) do not exist. Typical causes: BatchNorm in training mode "
        "(use GroupNorm/LayerNorm), normalizing by batch statistics such as x - x.mean(0), or "
        "attention across the batch dimension."
    )
