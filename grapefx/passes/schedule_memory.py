"""The memory plan of the private backward: the last pass before codegen.

With flat clipping every layer's operands (a, g) — or its instantiated / projected per-sample
gradient — must survive until the clip factors exist, so the private backward's peak sits above the
non-private one's. This pass lowers it in two ways:

1. what to keep across the barrier: a parameter whose instantiated per-sample gradient is live at
   the peak can keep its operands instead (ghost norm, contraction after the barrier). That costs
   flops, so the policy decides: "min-time" never swaps, "balanced" swaps when the backward's
   flops grow by at most BALANCED_EXTRA_FLOPS, "min-memory" whenever the peak drops, and
   `memory_budget` swaps (largest buffer first) until the estimate fits;
2. the order: `grapefx.schedule.reorder.best_order` (never worse than the traced order).

Every decision is recorded in a `MemoryPlan` (the CLI's `inspect` prints it).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from grapefx.config import PrivacyConfig
from grapefx.inspect.graphs import concrete
from grapefx.schedule.liveness import MemoryModel
from grapefx.schedule.reorder import OrderResult, apply_order, best_order, copy_graph_module

aten = torch.ops.aten

BALANCED_EXTRA_FLOPS = 0.10  # "balanced" accepts up to 10% more backward flops for a lower peak
MAX_ROUNDS = 3  # retraces spent looking for swaps


@dataclass
class MemoryPlan:
    policy: str
    budget: int | None
    original_peak: int  # the non-private backward as AOTAutograd gave it (estimate)
    traced_peak: int  # the private backward as traced, before this pass
    peak: int  # after this pass
    order_method: str
    ghost_swaps: list[str] = field(default_factory=list)  # parameters switched to ghost norms
    extra_flops: float = 0.0  # of the swaps, over the traced private backward
    live_at_peak: list[tuple[str, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    traced_graph: fx.GraphModule | None = None  # the private backward as first traced (for benchmarks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "memory_budget": self.budget,
            "estimated_peak_bytes": {
                "non_private_backward": self.original_peak,
                "private_unscheduled": self.traced_peak,
                "private_scheduled": self.peak,
            },
            "ratio_to_non_private": round(self.peak / self.original_peak, 4) if self.original_peak else None,
            "order": self.order_method,
            "ghost_swaps": self.ghost_swaps,
            "extra_flops": self.extra_flops,
            "live_at_peak": [{"node": n, "bytes": b} for n, b in self.live_at_peak[:10]],
            "notes": self.notes,
        }


Build = Callable[[frozenset[str]], tuple[fx.GraphModule, Any]]


def schedule_memory(
    build: Build, original: fx.GraphModule, config: PrivacyConfig
) -> tuple[fx.GraphModule, Any, MemoryPlan]:
    """`build(ghost_params)` traces the private backward; returns the chosen graph (reordered),
    its build result and the plan."""
    gm, result = build(frozenset())
    traced = copy_graph_module(gm)
    original_peak = MemoryModel.of(original).simulate().peak_bytes
    order, model = _order(gm)
    plan = MemoryPlan(
        config.memory_policy,
        config.memory_budget,
        original_peak,
        order.received_peak_bytes,
        order.peak_bytes,
        order.method,
        traced_graph=traced,
    )
    swaps: frozenset[str] = frozenset()
    base_flops = graph_flops(gm)
    swapping = config.memory_policy != "min-time" or config.memory_budget is not None
    for _ in range(MAX_ROUNDS if swapping else 0):
        if config.memory_budget is not None and order.peak_bytes <= config.memory_budget:
            break
        candidates = _instantiated_at_peak(gm, model, order, result) - swaps
        if not candidates:
            break
        trial_swaps = swaps | candidates
        trial_gm, trial_result = build(trial_swaps)
        trial_order, trial_model = _order(trial_gm)
        extra = graph_flops(trial_gm) - base_flops
        if trial_order.peak_bytes >= order.peak_bytes:
            plan.notes.append(f"ghost norms for {sorted(candidates)} would not lower the peak: kept instantiation")
            break
        if config.memory_policy == "balanced" and config.memory_budget is None:
            if extra > BALANCED_EXTRA_FLOPS * graph_flops(original):
                plan.notes.append(
                    f"ghost norms for {sorted(candidates)} would lower the estimated peak to "
                    f"{trial_order.peak_bytes} bytes but add {extra:.3g} flops (> {BALANCED_EXTRA_FLOPS:.0%} of the "
                    "backward): kept instantiation (memory_policy='min-memory' takes it)"
                )
                break
        gm, result, order, model, swaps = trial_gm, trial_result, trial_order, trial_model, trial_swaps
        plan.extra_flops = extra
    if config.memory_budget is not None and order.peak_bytes > config.memory_budget:
        msg = (
            f"grapefx: the private backward's estimated peak ({order.peak_bytes} bytes) exceeds memory_budget="
            f"{config.memory_budget} after reordering and ghost norms; lower the batch size or use "
            "strategy='grape' / clipping='per_layer'"
        )
        plan.notes.append(msg)
        warnings.warn(msg, stacklevel=2)
    apply_order(gm, order.order)
    live = model.simulate(order.order)
    plan.peak, plan.order_method = order.peak_bytes, order.method
    plan.ghost_swaps = sorted(swaps)
    plan.live_at_peak = list(live.live_at_peak)
    return gm, result, plan


def _order(gm: fx.GraphModule) -> tuple[OrderResult, MemoryModel]:
    model = MemoryModel.of(gm)
    return best_order(model), model


def _instantiated_at_peak(gm: fx.GraphModule, model: MemoryModel, order: OrderResult, result: Any) -> frozenset[str]:
    """Parameters with an instantiated norm (that has a ghost form) whose norm buffers are live at
    the peak."""
    live = model.simulate(order.order)
    by_name = {n.name: n for n in gm.graph.nodes}
    at_peak = {(by_name[name].meta.get("grapefx") or {}).get("param") for name, _ in live.live_at_peak}
    choices = getattr(result, "choices", {})
    swappable = {
        name
        for name, sites in choices.items()
        if any(ch.method == "instantiate" and math.isfinite(ch.ghost_flops) for _, ch in sites)
    }
    return frozenset(swappable & at_peak)


def graph_flops(gm: fx.GraphModule) -> float:
    """Multiply-add flops of the contractions (mm / bmm / addmm / baddbmm); a comparison measure."""
    total = 0.0
    for n in gm.graph.nodes:
        if n.op != "call_function" or not isinstance(n.meta.get("val"), torch.Tensor):
            continue
        packet = getattr(n.target, "overloadpacket", None)
        if packet in (aten.mm, aten.bmm, aten.addmm, aten.baddbmm):
            a = n.args[1] if packet in (aten.addmm, aten.baddbmm) else n.args[0]
            k = a.meta["val"].shape[-1] if isinstance(a, fx.Node) else 1
            total += 2.0 * math.prod(concrete(s) for s in n.meta["val"].shape) * concrete(k)
    return total
