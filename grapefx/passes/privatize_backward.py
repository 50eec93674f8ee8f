"""The DP rewrite of a backward graph (Book-Keeping), traced into a new aten graph.

The traced function replays the original backward node by node, except the grad sites and the
batch-free nodes after them (input gradients and every site's operands, a and g, are computed as
usual). As soon as all operands of a parameter's sites exist, its per-sample squared norm is computed
(`per_sample_norms.py`: ghost or instantiated per site by the rule's cost model; projected for
DP-GRAPE). Then:
  - flat / automatic clipping: after the last norm (the barrier), clip factors (`clip_factors.py`),
    each site as a weighted contraction — or, where the norm instantiated per-sample values, their
    weighted sum — the original post nodes, and noise once per parameter;
  - per-layer / group clipping: the same for each parameter (group of parameters) right after its
    own norm (its group's last norm), with no barrier.
The weights fold in the loss scale and denominator. The rewrite is traced with make_fx on the
backward's own fake inputs, so symbolic batch sizes carry through and the result is a plain aten
graph that either codegen path accepts; every node records its provenance in meta["grapefx"].
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback

from grapefx.analysis.grad_sites import MULTI_OUTPUT_SITES, ParamGrad, find_grad_sites, site_kind
from grapefx.analysis.layout import BatchLayout, LayoutResult, analyze_layouts
from grapefx.config import PrivacyConfig
from grapefx.distributed.ops import reduce_projected
from grapefx.passes.clip_factors import (
    GROUPED_MODES,
    add_noise,
    clip_bound,
    flat_weights,
    group_weights,
    loss_scale_and_denom,
    recorded_norms,
)
from grapefx.passes.common_subexpressions import merge_common_subexpressions
from grapefx.passes.grape_project import (
    Projection,
    back_project,
    finish_projected,
    plan_projection,
    projected_norm_sq,
    projection_for,
)
from grapefx.passes.interp import call_node, make_lookup
from grapefx.passes.per_sample_norms import per_sample_norm_sq, plan_norms
from grapefx.passes.tracing import retrace
from grapefx.passes.two_pass import weighted_replay
from grapefx.privacy.clip_groups import group_bounds
from grapefx.rules.registry import NormChoice, SiteContext, rule_for

aten = torch.ops.aten


@dataclass
class BackwardPlan:
    """What the rewrite decided; kept for inspection (CLI, tests)."""

    grads: list[ParamGrad]
    choices: dict[str, list[tuple[str, NormChoice]]] = field(default_factory=dict)
    layouts: LayoutResult | None = None
    projections: dict[str, Projection] = field(default_factory=dict)  # DP-GRAPE parameters
    memory: Any = None  # the MemoryPlan of passes/schedule_memory.py


def _batch_size_value(gm: fx.GraphModule, layouts: LayoutResult, env: dict, batch: Any) -> Any:
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        lay = layouts.layouts.get(node)
        if isinstance(lay, BatchLayout) and sympy.sympify(lay.outer * lay.inner).is_number:
            return env[node].shape[lay.dim] // int(lay.outer * lay.inner)
    return int(batch)


def privatize_backward(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    seeds: dict[str, Any],
    batch: Any,
    params: list[tuple[int, str]],
    config: PrivacyConfig,
    state_id: int,
    ghost: frozenset[str] = frozenset(),
    instantiate: frozenset[str] = frozenset(),
    forward_culprits: tuple[str, ...] = (),
    checked_rows: Mapping[Any, Any] | None = None,
) -> tuple[fx.GraphModule, BackwardPlan]:
    """`ghost` / `instantiate`: parameters whose norm method the memory scheduler overrides;
    `forward_culprits`: forward ops without a batch-layout rule, for error messages;
    `checked_rows`: the forward's accepted boolean-mask selections (analyze_layouts)."""
    layouts = analyze_layouts(gm, batch, seeds, checked_rows or {})
    grads = find_grad_sites(gm, layouts, params, forward_culprits)
    plan = BackwardPlan(grads, layouts=layouts)
    if config.strategy == "grape":
        wanted = set(config.grape_params or ())
        plan.projections = {g.name: plan_projection(g, config) for g in grads if g.name in wanted}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    deferred: set[fx.Node] = set()
    for g in grads:
        deferred |= set(g.sites) | g.post_nodes
    output_args = gm.graph.output_node().args[0]

    ready_at = _ready_positions(gm, grads)
    grouped = config.clipping in GROUPED_MODES
    index = {g.name: j for j, g in enumerate(grads)}
    by_name = {g.name: g for g in grads}
    # per-layer / group clipping: each group is finished when its last parameter's norm is known
    bounds = group_bounds([g.name for g in grads], config) if grouped else []
    group_of = {name: k for k, (members, _) in enumerate(bounds) for name in members}

    def private_backward(*args: Any) -> Any:
        env: dict[Any, Any] = dict(zip(placeholders, args))
        lookup = env.__getitem__
        norm_sq: dict[str, torch.Tensor] = {}
        finished: dict[str, torch.Tensor] = {}
        state: dict[str, Any] = {}  # batch size, loss scale, denominator (traced values)
        site_ctx: dict[str, list[SiteContext]] = {}  # per parameter (keys are user names: keep apart)
        proj_p: dict[str, torch.Tensor] = {}  # DP-GRAPE projection per parameter
        recorded: dict[str, torch.Tensor] = {}  # per-layer / group clipping: each parameter's [B] norms

        def on_ready(g: ParamGrad) -> None:
            # Norms as soon as a parameter's operands exist (their temporaries die early); in
            # per-layer mode the parameter is finished right away: no buffer waits for a barrier.
            if "b" not in state:
                state["b"] = _batch_size_value(gm, layouts, env, batch)
                like = next(v for v in env.values() if isinstance(v, torch.Tensor))
                state["scale"], state["denom"] = loss_scale_and_denom(state["b"], config, state_id, like)
            sites = [
                SiteContext(s, site_kind(s, layouts), layouts, env, state["b"], config.strategy, gm) for s in g.sites
            ]
            site_ctx[g.name] = sites
            proj = plan.projections.get(g.name)
            with provenance("per_sample_norms", "norm", g.name):
                if proj is not None:  # DP-GRAPE: norms in the projected space
                    proj_p[g.name] = projection_for(sites[0], proj, state_id)
                    norm_sq[g.name], choice = projected_norm_sq(sites[0], proj, proj_p[g.name])
                    plan.choices[g.name] = [(str(sites[0].node), choice)]
                else:
                    choices = plan_norms([g], {g.name: sites}, ghost, instantiate)[g.name]
                    plan.choices[g.name] = [(str(c.node), ch) for c, ch in zip(sites, choices)]
                    norm_sq[g.name] = per_sample_norm_sq(g, sites, choices, gm, env)
            if grouped:
                with provenance("clip_factors", "clip", g.name):
                    col = index[g.name]
                    recorded[g.name] = recorded_norms([norm_sq[g.name]], state["scale"], col, len(grads), state_id)
                members, bound = bounds[group_of[g.name]]
                if any(m not in recorded for m in members):
                    return  # the group's other parameters are still to come
                with provenance("clip_factors", "clip", g.name):
                    norms = torch.cat([recorded[m] for m in members], dim=1)
                    w = group_weights(norms, bound, state["scale"], state["denom"])
                for m in members:
                    finished[m] = _finish(by_name[m], site_ctx[m], w, state["denom"], float(config.max_grad_norm))

        def _finish(
            g: ParamGrad, sites: list[SiteContext], w: torch.Tensor, denom: Any, C: float | torch.Tensor
        ) -> torch.Tensor:
            proj = plan.projections.get(g.name)
            if proj is not None:
                with provenance("grape_project", "projected_weighted_sum_noise", g.name):
                    return finish_projected(sites[0], proj, proj_p[g.name], w, denom, config, state_id, C)
            with provenance("book_keeping", "weighted_sum", g.name):
                site_values = {c.node: rule_for(c.kind).weighted_sum(c, w) for c in sites}
                grad = evaluate_post(g, site_values, gm, env)
            with provenance("noise", "noise", g.name):
                return add_noise(grad, config, state_id, denom, C)

        for g in ready_at.get(-1, []):
            on_ready(g)
        for pos, node in enumerate(gm.graph.nodes):
            if node.op == "get_attr":
                env[node] = getattr(gm, node.target)
            elif node.op == "call_function" and node not in deferred and node not in env:
                if layouts.batch_reductions.get(node) in MULTI_OUTPUT_SITES:
                    env[node] = _input_grad_only(node, lookup)
                else:
                    env[node] = call_node(node, lookup)
            for g in ready_at.get(pos, []):
                on_ready(g)
        if not grouped:  # flat clipping: the barrier, every norm is needed
            with provenance("clip_factors", "clip", "*"):
                norms = recorded_norms([norm_sq[g.name] for g in grads], state["scale"], 0, len(grads), state_id)
                C = clip_bound(config, norms, state_id)
                w = flat_weights(norms, state["scale"], state["denom"], config, C)
            if config.two_pass:  # the clipped sums from a second backward with weighted tangents
                with provenance("two_pass", "weighted_replay", "*"):
                    second = weighted_replay(gm, env, layouts, w)
                for g in grads:
                    with provenance("noise", "noise", g.name):
                        finished[g.name] = add_noise(second[g.out_node], config, state_id, state["denom"], C)
            else:
                for g in grads:
                    finished[g.name] = _finish(g, site_ctx[g.name], w, state["denom"], C)
        if config.distributed and plan.projections:  # DP-GRAPE: all-reduce the r-dimensional Ĝ only
            with provenance("grape_project", "all_reduce_projected", "*"):
                projs = {p.index: p for p in plan.projections.values()}
                reduced = reduce_projected({p.index: finished[p.name] for p in projs.values()}, state_id)
                for i, ghat in reduced.items():
                    finished[projs[i].name] = back_project(ghat, projs[i], proj_p[projs[i].name], state_id)
        outputs = list(fx.node.map_arg(output_args, lambda n: env.get(n) if n not in deferred else None))
        for g in grads:
            outputs[g.out_index] = finished[g.name]
        return tuple(outputs)

    new_gm = retrace(private_backward, example_inputs, keep_annotations=True)
    for node in new_gm.graph.nodes:
        # Provenance of every node: which pass inserted it, in what role, for which parameter;
        # nodes outside any annotation replay the original backward (input grads, site operands).
        node.meta["grapefx"] = dict(node.meta.get("custom") or {"pass": "replay", "role": "original"})
    merge_common_subexpressions(new_gm)  # e.g. one Gram of the input that q, k and v share
    return new_gm, plan


def provenance(pass_name: str, role: str, param: str) -> Any:
    return fx_traceback.annotate({"pass": pass_name, "role": role, "param": param})


def _ready_positions(gm: fx.GraphModule, grads: list[ParamGrad]) -> dict[int, list[ParamGrad]]:
    """For each parameter, the graph position after which all its sites' operands are computed."""
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    ready: dict[int, list[ParamGrad]] = {}
    for g in grads:
        operands: list[fx.Node] = []
        for s in g.sites:
            src = s.args[0] if s.target is operator.getitem else s  # convolution / norm backward outputs
            operands.extend(src.all_input_nodes)
        last = max((position[o] for o in operands if o.op != "placeholder"), default=-1)
        ready.setdefault(last, []).append(g)
    return ready


def _input_grad_only(node: fx.Node, lookup: Any) -> Any:
    """A convolution / norm backward computing only grad_input (its last argument is the output
    mask): the weight and bias gradients are per-sample sites, recomputed weighted later."""
    args = list(fx.node.map_arg(node.args, lookup))
    mask = list(args[-1])
    if not mask[0] or not any(u.args[1] == 0 for u in node.users):
        return (None, None, None)
    args[-1] = [True, False, False]
    return node.target(*args)


def evaluate_post(grad: ParamGrad, site_values: dict[fx.Node, Any], gm: fx.GraphModule, env: dict) -> Any:
    """Run the batch-free nodes between a parameter's sites and its gradient output."""
    local: dict[fx.Node, Any] = dict(site_values)
    lookup = make_lookup(gm, env, local)

    for node in gm.graph.nodes:
        if node in grad.post_nodes and node not in local:
            if node.target is operator.getitem and node.args[0] in local:
                local[node] = local[node.args[0]][node.args[1]]
            else:
                local[node] = call_node(node, lookup)
    return local[grad.out_node]
