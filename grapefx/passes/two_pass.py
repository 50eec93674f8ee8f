"""The second pass of two-pass clipping (PrivacyConfig.two_pass): the backward replayed with the
loss gradient weighted per sample.

Every grad site is linear in the gradient flowing into the backward (the tangents). Where that
gradient first has a batch dim, sample i's share is its rows there: a tangent with a batch dim (the
loss computed outside the compiled module), or the first batched node a batch-free gradient feeds
(a loss summed inside it). Scaling those rows by w_i (the clip factor, loss scale and denominator of
`clip_factors.flat_weights`) and running the original backward again gives Σ_i w_i g_i at every
parameter output: the clipped sum, with no operand of the first pass kept past the norms. That is
what activation checkpointing needs: its recomputed activations live for one layer's backward in
each pass, never across the barrier.
"""

from __future__ import annotations

import operator
from typing import Any

import sympy
import torch
import torch.fx as fx

from grapefx.analysis.indexing_layout import masks_by_row_count
from grapefx.analysis.layout import BatchLayout, LayoutResult
from grapefx.config import PrivacyConfig
from grapefx.errors import GrapefxError, describe_node
from grapefx.passes.interp import call_node

aten = torch.ops.aten


def weighted_replay(
    gm: fx.GraphModule, env: dict[fx.Node, Any], layouts: LayoutResult, w: torch.Tensor
) -> dict[fx.Node, Any]:
    """The whole backward again from its inputs in `env`, each sample's gradient weighted by w_i
    where it first has a batch dim; returns every node's value (dead ones are dropped when the
    rewrite is traced). That frontier is a tangent with a batch dim (the loss outside the compiled
    module), or the first batched node fed by a batch-free value computed from the tangents (the
    loss summed inside: the scalar gradient meets the saved per-sample activations there). Every
    value computed from the tangents is linear in them, so weighting there weights each sample's
    whole contribution once; batch sums past it are grad sites, which feed parameters only."""
    from_tangents: set[fx.Node] = set()
    second: dict[fx.Node, Any] = {}
    row_masks = masks_by_row_count(gm)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            second[node] = env[node]
            if node.name.startswith("tangents"):
                from_tangents.add(node)
                if second[node] is not None and layouts.layouts.get(node) is not None:
                    second[node] = _weighted(node, second[node], layouts, w, row_masks, second)
            continue
        if node.op == "get_attr":
            second[node] = getattr(gm, node.target)
            continue
        if node.op != "call_function":
            continue
        second[node] = call_node(node, second.__getitem__)
        inputs = [a for a in node.all_input_nodes if a in from_tangents]
        if not inputs:
            continue
        from_tangents.add(node)
        entering = any(layouts.layouts.get(a) is None for a in inputs)
        if not entering or layouts.layouts.get(node) is None or node.target is operator.getitem:
            continue
        if any(layouts.layouts.get(a) is not None for a in inputs):
            # a gradient already weighted meets one still shared by all samples (a loss term such as
            # `h.sum()` next to per-sample ones): weighting the sum would weight the first twice, so
            # the shared one is weighted alone, as the rows it adds to
            second[node] = _weighted_shared_operands(node, set(inputs), second, layouts, w, row_masks)
            continue
        second[node] = _weighted(node, second[node], layouts, w, row_masks, second)
    return second


def _weighted_shared_operands(
    node: fx.Node,
    from_tangents: set[fx.Node],
    values: dict[fx.Node, Any],
    layouts: LayoutResult,
    w: torch.Tensor,
    row_masks: dict[Any, fx.Node],
) -> torch.Tensor:
    """add / sub of a weighted per-sample gradient and a batch-free one (`from_tangents`: node's
    inputs computed from the tangents): the latter broadcast to the output and weighted row by row
    along the output's layout (each row is its sample's share)."""
    if getattr(node.target, "overloadpacket", None) not in (aten.add, aten.sub):
        raise GrapefxError(
            f"two_pass=True: {describe_node(node)} combines a per-sample gradient with one shared by "
            "the whole batch (e.g. a loss term over the batch inside the compiled module next to "
            "per-sample terms) in a way grapefx cannot weight per sample. Use two_pass=False, or "
            "compute the loss outside the compiled module."
        )
    shape = values[node].shape

    def lookup(a: fx.Node) -> Any:
        if a in from_tangents and layouts.layouts.get(a) is None and isinstance(values[a], torch.Tensor):
            return _weighted(node, torch.broadcast_to(values[a], shape), layouts, w, row_masks, values)
        return values[a]

    return call_node(node, lookup)


def _weighted(
    node: fx.Node,
    value: Any,
    layouts: LayoutResult,
    w: torch.Tensor,
    row_masks: dict[Any, fx.Node],
    values: dict[fx.Node, Any],
) -> torch.Tensor:
    """`value` (node's) with its rows of sample i scaled by w_i along its batch layout; rows of
    x[mask] (`row_masks`: row count -> mask) by the weight of the sample each row came from."""
    lay = layouts.layouts.get(node)
    if isinstance(value, torch.Tensor) and isinstance(lay, BatchLayout) and lay.outer == 1:
        size = node.meta["val"].shape[lay.dim]
        expr = sympy.sympify(size.node.expr) if isinstance(size, torch.SymInt) else None
        mask = row_masks.get(expr)
        mask_lay = layouts.layouts.get(mask)
        if mask is not None and isinstance(mask_lay, BatchLayout) and sympy.sympify(mask_lay.inner).is_Integer:
            m = values[mask]
            per_entry = w.repeat_interleave(int(mask_lay.inner)).reshape(-1, *[1] * (m.dim() - 1))
            return _scaled(value, per_entry.expand(m.shape)[m], lay.dim)
    if (
        not isinstance(value, torch.Tensor)
        or not isinstance(lay, BatchLayout)
        or not sympy.sympify(lay.outer * lay.inner).is_Integer
    ):
        raise GrapefxError(
            f"two_pass=True weights each sample's gradient where it first has a batch dim, but "
            f"{describe_node(node)} has no per-sample layout grapefx can weight (rows of x[mask], "
            "or several outputs). Use two_pass=False, or compute the loss outside the compiled module."
        )
    outer, inner = int(lay.outer), int(lay.inner)
    return _scaled(value, w.reshape(1, -1, 1).expand(outer, -1, inner).reshape(-1), lay.dim)


def _scaled(value: torch.Tensor, per_row: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * value.dim()
    shape[dim] = -1
    return value * per_row.reshape(shape).to(value.dtype)


# single-pass clipping holding more than this multiple of the non-private backward's estimated peak,
# in a graph that recomputes checkpointed activations, earns the two-pass hint
HINT_PEAK_RATIO = 1.5


def recomputes(original: fx.GraphModule) -> bool:
    """The backward recomputes checkpointed activations (AOTAutograd tags those nodes)."""
    return any("recompute" in n.meta for n in original.graph.nodes)


def wants_two_passes(original: fx.GraphModule, config: PrivacyConfig, one_pass_peak: int) -> bool:
    """Whether the memory planner should also try two passes: activation checkpointing under
    memory_policy="min-memory", or a memory_budget one pass does not meet."""
    if config.two_pass or config.clipping in ("per_layer", "group") or config.strategy == "grape":
        return False
    over_budget = config.memory_budget is not None and one_pass_peak > config.memory_budget
    return (config.memory_policy == "min-memory" or over_budget) and recomputes(original)


def checkpointing_hint(original: fx.GraphModule, peak: int, original_peak: int, two_pass: bool, clipping: str) -> str:
    """A warning for activation checkpointing under single-pass flat clipping, where the rewrite
    keeps every layer's recomputed operands until all norms are known; empty when it does not apply."""
    if two_pass or clipping in ("per_layer", "group") or not recomputes(original):
        return ""
    if peak <= HINT_PEAK_RATIO * original_peak:
        return ""
    return (
        "grapefx: this model uses activation checkpointing, and single-pass flat clipping holds every "
        "layer's recomputed operands until all per-sample norms are known: the private backward's "
        f"estimated peak is {peak / 2**20:.1f} MB against {original_peak / 2**20:.1f} MB non-private. "
        "two_pass=True (or memory_policy='min-memory', which plans it) keeps checkpointing's savings "
        "at the cost of a second backward; clipping='per_layer' keeps them in one pass."
    )
