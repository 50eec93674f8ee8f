"""The memory plan of the private backward: the last pass before codegen.

With flat clipping every layer's operands (a, g) — or its instantiated / projected per-sample
gradient — must survive until the clip factors exist, so the private backward's peak sits above the
non-private one's. This pass lowers it in two ways:

1. what to keep across the barrier: a parameter whose instantiated per-sample gradient is live at
   the peak can keep its operands instead (ghost norm, contraction after the barrier). That costs
   flops, so the policy decides: "min-time" never swaps, "balanced" swaps while the peak exceeds
   BALANCED_PEAK_RATIO x the non-private backward's and the backward's flops grow by at most
   BALANCED_EXTRA_FLOPS, "min-memory" whenever the peak drops, and
   `memory_budget` swaps (largest buffer first) until the estimate fits. The other direction:
   where "balanced" needed no swap, a parameter whose rule chose ghost norms only to save memory
   (instantiating costs fewer flops) is instantiated if the peak stays under the same ceiling;
2. store vs recompute: a saved activation live at the peak that the forward computed by a short
   elementwise chain from other saved tensors is replayed after the barrier instead of kept
   (`recompute_operands.py`), when that lowers the peak ("min-memory", `memory_budget`, and
   "balanced" while the peak exceeds its ceiling);
3. the order: `grapefx.schedule.reorder.best_order` (never worse than the traced order).

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
from grapefx.passes.per_sample_norms import cheaper_to_instantiate
from grapefx.passes.recompute_operands import Recipe, candidates, recompute_after_barrier
from grapefx.schedule.liveness import MemoryModel, live_curve
from grapefx.schedule.reorder import OrderResult, apply_order, best_order, copy_graph_module

aten = torch.ops.aten

BALANCED_EXTRA_FLOPS = 0.10  # "balanced" accepts up to 10% more backward flops for a lower peak ...
BALANCED_PEAK_RATIO = 1.05  # ... and only while the peak exceeds 1.05x the non-private backward's
MAX_ROUNDS = 3  # retraces spent looking for swaps
MAX_SINGLE_RECOMPUTE_TRIALS = 6  # activations tried one by one when recomputing all does not help
KEEP_TRACED_GRAPH = False  # keep a copy of the unscheduled private backward in MemoryPlan.traced_graph


@dataclass
class MemoryPlan:
    policy: str
    budget: int | None
    original_peak: int  # the non-private backward as AOTAutograd gave it (estimate)
    traced_peak: int  # the private backward as traced, before this pass
    peak: int  # after this pass
    order_method: str
    ghost_swaps: list[str] = field(default_factory=list)  # parameters switched to ghost norms
    instantiated: list[str] = field(default_factory=list)  # switched to instantiation (fewer flops)
    extra_flops: float = 0.0  # of the swaps, over the traced private backward
    recomputed: list[str] = field(default_factory=list)  # saved activations replayed after the barrier
    live_at_peak: list[tuple[str, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # the private backward as first traced: only with KEEP_TRACED_GRAPH (tools/bench_memory.py), since
    # a deep model's copy is tens of MB resident for the model's lifetime
    traced_graph: fx.GraphModule | None = None

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
            "instantiated_to_save_flops": self.instantiated,
            "recomputed_after_barrier": self.recomputed,
            "extra_flops": self.extra_flops,
            "live_at_peak": [{"node": n, "bytes": b} for n, b in self.live_at_peak[:10]],
            "notes": self.notes,
        }


Build = Callable[[frozenset[str], frozenset[str]], tuple[fx.GraphModule, Any]]


@dataclass
class _Trial:
    gm: fx.GraphModule
    result: Any
    order: OrderResult
    model: MemoryModel
    recomputed: list[str] = field(default_factory=list)


def schedule_memory(
    build: Build, original: fx.GraphModule, config: PrivacyConfig, recipes: dict[str, Recipe] | None = None
) -> tuple[fx.GraphModule, Any, MemoryPlan]:
    """`build(ghost_params)` traces the private backward; returns the chosen graph (reordered),
    its build result and the plan. `recipes`: how the forward computed saved activations (for
    recomputing them after the barrier)."""
    planning = config.memory_policy != "min-time" or config.memory_budget is not None
    balanced = config.memory_policy == "balanced" and config.memory_budget is None
    rename: dict[str, str] = {}

    def evaluate(
        swaps: frozenset[str], built: tuple[fx.GraphModule, Any] | None = None, inst: frozenset[str] = frozenset()
    ) -> _Trial:
        gm, result = built or build(swaps, inst)
        order, model = _order(gm)
        trial = _Trial(gm, result, order, model)
        # "balanced" replays activations only to get under its ceiling: under it, time comes first.
        under_ceiling = balanced and order.peak_bytes <= BALANCED_PEAK_RATIO * original_peak
        if planning and recipes and not under_ceiling:
            _recompute(trial, recipes, rename or _placeholder_names(original, gm, rename), config)
        return trial

    gm0, result0 = build(frozenset(), frozenset())
    traced = copy_graph_module(gm0) if KEEP_TRACED_GRAPH else None
    original_peak = MemoryModel.of(original).simulate().peak_bytes
    traced_peak = MemoryModel.of(gm0).simulate().peak_bytes
    best = evaluate(frozenset(), (gm0, result0))  # gm0 itself may be reordered below; `traced` is a copy
    plan = MemoryPlan(
        config.memory_policy, config.memory_budget, original_peak, traced_peak, 0, "", traced_graph=traced
    )
    swaps: frozenset[str] = frozenset()
    base_flops = graph_flops(best.gm)
    for _ in range(MAX_ROUNDS if planning else 0):
        if config.memory_budget is not None and best.order.peak_bytes <= config.memory_budget:
            break
        if balanced and best.order.peak_bytes <= BALANCED_PEAK_RATIO * original_peak:
            break  # close enough to non-private: spend no flops
        candidates = _instantiated_at_peak(best) - swaps
        if not candidates:
            break
        trial = evaluate(swaps | candidates)
        extra = graph_flops(trial.gm) - base_flops
        if trial.order.peak_bytes >= best.order.peak_bytes:
            plan.notes.append(f"ghost norms for {sorted(candidates)} would not lower the peak: kept instantiation")
            break
        if balanced:
            if extra > BALANCED_EXTRA_FLOPS * graph_flops(original):
                plan.notes.append(
                    f"ghost norms for {sorted(candidates)} would lower the estimated peak to "
                    f"{trial.order.peak_bytes} bytes but add {extra:.3g} flops (> {BALANCED_EXTRA_FLOPS:.0%} of the "
                    "backward): kept instantiation (memory_policy='min-memory' takes it)"
                )
                break
        best, swaps = trial, swaps | candidates
        plan.extra_flops = extra
    instantiated: frozenset[str] = frozenset()
    if balanced and not swaps and config.strategy != "ghost":  # a forced "ghost" stays ghost
        best, instantiated = _instantiate_under_the_peak(best, evaluate, BALANCED_PEAK_RATIO * original_peak, plan)
    if config.memory_budget is not None and best.order.peak_bytes > config.memory_budget:
        msg = (
            f"grapefx: the private backward's estimated peak ({best.order.peak_bytes} bytes) exceeds memory_budget="
            f"{config.memory_budget} after reordering, ghost norms and recomputation; lower the batch size or use "
            "strategy='grape' / clipping='per_layer'"
        )
        plan.notes.append(msg)
        warnings.warn(msg, stacklevel=2)
    apply_order(best.gm, best.order.order)
    live = best.model.simulate(best.order.order)
    plan.peak, plan.order_method = best.order.peak_bytes, best.order.method
    plan.ghost_swaps = sorted(swaps)
    plan.instantiated = sorted(instantiated)
    plan.recomputed = best.recomputed
    plan.live_at_peak = list(live.live_at_peak)
    return best.gm, best.result, plan


def _instantiate_under_the_peak(
    best: _Trial, evaluate: Callable[..., _Trial], ceiling: float, plan: MemoryPlan
) -> tuple[_Trial, frozenset[str]]:
    """The other direction ("balanced" only, when no ghost swap was needed): parameters whose rule
    chose ghost norms only to save memory, though instantiating costs fewer flops, are instantiated
    if the peak stays at or below max(current peak, `ceiling`) — a layer processed after the peak
    can keep its per-sample gradient in memory the peak has already given back. The largest flop
    savings are tried first: as many as the room at the barrier holds, then halves of that (each try
    is one retrace)."""
    savings: dict[str, float] = {}
    for name, sites in getattr(best.result, "choices", {}).items():
        gain = sum(ch.ghost_flops - ch.instantiate_flops for _, ch in sites if cheaper_to_instantiate(ch))
        if gain > 0:
            savings[name] = gain
    limit = max(best.order.peak_bytes, ceiling)
    # Whatever is instantiated is alive at the clip barrier: skip gradients larger than the room there.
    room = limit - _live_at_barrier(best)
    sizes = _per_sample_grad_bytes(best)
    ranked = sorted((n for n in savings if sizes.get(n, 0) <= room), key=lambda n: -savings[n])
    base_flops = graph_flops(best.gm)
    # First try the longest prefix whose gradients together fit the room at the barrier.
    count, total = 0, 0
    for name in ranked:
        total += sizes.get(name, 0)
        if total > room:
            break
        count += 1
    count = max(count, min(1, len(ranked)))
    for _ in range(MAX_ROUNDS):
        if count == 0:
            break
        chosen = frozenset(ranked[:count])
        trial = evaluate(frozenset(), inst=chosen)
        saved = base_flops - graph_flops(trial.gm)
        if trial.order.peak_bytes <= limit and saved > 0:
            plan.notes.append(
                f"instantiated {sorted(chosen)} (ghost norms were chosen to save memory): {saved:.3g} fewer "
                f"flops, estimated peak {trial.order.peak_bytes} bytes <= {int(limit)}"
            )
            return trial, chosen
        count //= 2
    if ranked:
        plan.notes.append(f"instantiating {ranked[:4]} would raise the peak above {int(limit)} bytes: kept ghost")
    return best, frozenset()


def _live_at_barrier(trial: _Trial) -> int:
    order = trial.order.order
    curve = live_curve(trial.model, order, trial.model.sizes())
    at = [i for i, n in enumerate(order) if getattr(n.target, "_opname", None) == "record_norms"]
    return curve[at[0]] if at else max(curve, default=0)


def _per_sample_grad_bytes(trial: _Trial) -> dict[str, int]:
    """Bytes of each parameter's [B, *shape] per-sample gradient at the compiled batch size."""
    batch = max((trial.model.hint[s] for s in trial.model.symbols if s in trial.model.hint), default=0)
    out: dict[str, int] = {}
    for g in getattr(trial.result, "grads", []):
        val = g.out_node.meta.get("val")
        if isinstance(val, torch.Tensor) and batch:
            out[g.name] = batch * math.prod(concrete(s) for s in val.shape) * val.element_size()
    return out


def _placeholder_names(original: fx.GraphModule, gm: fx.GraphModule, rename: dict[str, str]) -> dict[str, str]:
    """Recipes speak the forward's names, which are the received backward's placeholder names; the
    traced graph has the same placeholders in the same order."""
    pairs = zip(
        (n for n in original.graph.nodes if n.op == "placeholder"), (n for n in gm.graph.nodes if n.op == "placeholder")
    )
    rename.update((a.name, b.name) for a, b in pairs)
    return rename


def _recompute(trial: _Trial, recipes: dict[str, Recipe], rename: dict[str, str], config: PrivacyConfig) -> None:
    """Recompute after the barrier the saved activations live at the peak that have a recipe: all
    together if that lowers the peak, else one by one (largest first) while each lowers it."""
    sizes = dict(trial.model.simulate(trial.order.order).live_at_peak)
    names = [n for n in candidates(trial.gm, recipes, rename) if rename[n] in sizes]
    names.sort(key=lambda n: -sizes[rename[n]])
    if not names:
        return
    attempts = [names] + ([[n] for n in names[:MAX_SINGLE_RECOMPUTE_TRIALS]] if len(names) > 1 else [])
    for attempt in attempts:
        if config.memory_budget is not None and trial.order.peak_bytes <= config.memory_budget:
            break
        gm = recompute_after_barrier(trial.gm, recipes, attempt, rename)
        order, model = _order(gm)
        if order.peak_bytes < trial.order.peak_bytes:
            trial.gm, trial.order, trial.model = gm, order, model
            trial.recomputed += attempt
            if attempt is names:
                break


def _order(gm: fx.GraphModule) -> tuple[OrderResult, MemoryModel]:
    model = MemoryModel.of(gm)
    return best_order(model), model


def _instantiated_at_peak(trial: _Trial) -> frozenset[str]:
    """Parameters with an instantiated norm (that has a ghost form) whose norm buffers are live at
    the peak."""
    live = trial.model.simulate(trial.order.order)
    result = trial.result
    by_name = {n.name: n for n in trial.gm.graph.nodes}
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
