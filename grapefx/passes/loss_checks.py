"""Run-time guard on mean losses that divide by a count of targets (cross-entropy / NLL inside the
compiled forward).

A mean cross-entropy decomposes to `sum(per-target losses) / count`, where count is the number of
targets not equal to `ignore_index`: `sum(target != ignore_index)` over the whole batch.
- When every target counts, count is the number of targets and the loss is a mean of per-sample
  terms.
- When some are ignored (padding labels, -100 in Hugging Face models), the loss divides by a number
  that depends on the whole batch. One sample's padding then rescales every other sample's gradient,
  and the per-sample bound C no longer holds.

The graph cannot show which case a step is in; only the data can. This pass therefore routes such a
loss through a check op that raises on the step where targets are ignored.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from grapefx.analysis.layout import BatchLayout
from grapefx.errors import BatchMixingError

aten = torch.ops.aten


@torch.library.custom_op("grapefx::require_full_count", mutates_args=())
def require_full_count(loss: torch.Tensor, count: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`loss` (a copy) if the count it was divided by is every element of `mask`; raises otherwise.
    Reading the count is one host synchronization per step on a GPU."""
    counted, targets = float(count), mask.numel()
    if targets and counted != targets:
        raise BatchMixingError(
            f"The loss is a mean over {counted:g} of {targets} targets: some targets equal ignore_index "
            "(padding labels), so it divides by a count that depends on the whole batch and is not a "
            "mean of per-sample terms. Compute the loss with grapefx.losses.sequence_cross_entropy "
            "(each sequence's mean over its own targets), or use reduction='sum' with "
            "loss_reduction='sum' (divide by a constant, such as the expected number of tokens)."
        )
    return loss.clone()


@require_full_count.register_fake
def _(loss: torch.Tensor, count: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(loss)


def _counted_mask(divisor: object) -> tuple[fx.Node, fx.Node] | None:
    """(count, mask) when `divisor` is `sum(mask)` over all dims of a bool tensor, possibly cast."""
    node = divisor
    if isinstance(node, fx.Node) and node.target is aten._to_copy.default:
        node = node.args[0]
    if not isinstance(node, fx.Node) or node.target not in (aten.sum.dim_IntList, aten.sum.default):
        return None
    mask = node.args[0]
    dims = node.args[1] if len(node.args) > 1 else None
    val = mask.meta.get("val") if isinstance(mask, fx.Node) else None
    if val is None or val.dtype != torch.bool or (dims not in (None, []) and len(dims) != val.dim()):
        return None
    return node, mask


def route_through_check(gm: fx.GraphModule, node: fx.Node, check: Any, extra_args: tuple[Any, ...]) -> None:
    """Make every user of `node` read `check(node, *extra_args)` (a copy of node's value, or a
    raise) instead: the check runs on every step and cannot be dropped as dead code."""
    with gm.graph.inserting_after(node):
        checked = gm.graph.call_function(check, (node, *extra_args))
    checked.meta["val"] = node.meta["val"]
    node.replace_all_uses_with(checked, delete_user_cb=lambda user: user is not checked)


def guard_mean_losses(gm: fx.GraphModule, layouts: dict[fx.Node, Any]) -> int:
    """Route every `x / sum(bool mask)` whose mask holds the batch (`layouts`: the forward's batch
    layouts) through `require_full_count`; returns how many. A count over a batch-free mask is a
    constant of the model, not of the data, and is left alone."""
    guarded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.div.Tensor:
            continue
        found = _counted_mask(node.args[1])
        if found is None or not isinstance(layouts.get(found[1]), BatchLayout):
            continue
        count, mask = found
        route_through_check(gm, node, torch.ops.grapefx.require_full_count.default, (count, mask))
        guarded += 1
    if guarded:
        gm.recompile()
    return guarded
