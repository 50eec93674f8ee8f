"""The DP rewrite of a backward graph (Book-Keeping), traced into a new aten graph.

Phases of the traced function, in order:
  1. run the original backward except grad sites and what depends on them (input gradients and the
     operands every site needs: activations a and output gradients g);
  2. per-sample squared norms per parameter (`per_sample_norms.py`), ghost or instantiated per site;
  3. clip factors from those norms (`clip_factors.py`);
  4. each site recomputed as a weighted contraction (book-keeping), then the batch-free post nodes
     (reshapes, the add of a tied weight's uses) as in the original graph;
  5. Gaussian noise, once per parameter per backward, then division by the loss denominator.
The rewrite is traced with make_fx on the backward's own fake inputs, so symbolic batch sizes carry
through and the result is a plain aten graph that either codegen path accepts.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from grapefx.analysis.grad_sites import ParamGrad, find_grad_sites, site_kind
from grapefx.analysis.layout import BatchLayout, LayoutResult, analyze_layouts
from grapefx.config import PrivacyConfig
from grapefx.passes.clip_factors import clip_weights
from grapefx.passes.per_sample_norms import per_sample_norm_sq, plan_norms
from grapefx.passes.tracing import retrace
from grapefx.rules.registry import NormChoice, SiteContext, rule_for

aten = torch.ops.aten


@dataclass
class BackwardPlan:
    """What the rewrite decided; kept for inspection (CLI, tests)."""

    grads: list[ParamGrad]
    choices: dict[str, list[tuple[str, NormChoice]]] = field(default_factory=dict)
    layouts: LayoutResult | None = None


def _call(node: fx.Node, lookup: Any) -> Any:
    args = fx.node.map_arg(node.args, lookup)
    kwargs = fx.node.map_arg(node.kwargs, lookup)
    return node.target(*args, **kwargs)


def _batch_size_value(gm: fx.GraphModule, layouts: LayoutResult, env: dict, batch: Any) -> Any:
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        lay = layouts.layouts.get(node)
        if isinstance(lay, BatchLayout):
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
) -> tuple[fx.GraphModule, BackwardPlan]:
    layouts = analyze_layouts(gm, batch, seeds)
    grads = find_grad_sites(gm, layouts, params)
    plan = BackwardPlan(grads, layouts=layouts)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    deferred: set[fx.Node] = set()
    for g in grads:
        deferred |= set(g.sites) | g.post_nodes
    output_args = gm.graph.output_node().args[0]

    def private_backward(*args: Any) -> Any:
        env: dict[Any, Any] = dict(zip(placeholders, args))
        lookup = env.__getitem__
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                env[node] = getattr(gm, node.target)
                continue
            if node.op != "call_function" or node in deferred:
                continue
            if layouts.batch_reductions.get(node) == "convolution_backward":
                env[node] = _input_grad_only(node, lookup)
                continue
            env[node] = _call(node, lookup)
        b = _batch_size_value(gm, layouts, env, batch)
        contexts = {
            g.name: [SiteContext(s, site_kind(s, layouts), layouts, env, b, config.strategy) for s in g.sites]
            for g in grads
        }
        choices = plan_norms(grads, contexts)
        plan.choices = {
            name: [(str(c.node), ch) for c, ch in zip(contexts[name], chs)] for name, chs in choices.items()
        }
        norm_sq = [per_sample_norm_sq(g, contexts[g.name], choices[g.name], gm, env) for g in grads]
        weights, denom = clip_weights(norm_sq, b, config, state_id)
        outputs = list(fx.node.map_arg(output_args, lambda n: env.get(n) if n not in deferred else None))
        for g, w in zip(grads, weights):
            site_values = {c.node: rule_for(c.kind).weighted(c, w) for c in contexts[g.name]}
            grad = evaluate_post(g, site_values, gm, env)
            if config.noise_multiplier > 0:
                std = float(config.noise_multiplier * config.max_grad_norm)
                grad = grad + torch.ops.grapefx.gaussian_noise(grad, std, state_id) / denom
            outputs[g.out_index] = grad
        return tuple(outputs)

    new_gm = retrace(private_backward, example_inputs)
    for node in new_gm.graph.nodes:
        node.meta.setdefault("grapefx", {"pass": "privatize_backward"})
    return new_gm, plan


def _input_grad_only(node: fx.Node, lookup: Any) -> Any:
    """convolution_backward computing only grad_input: weight/bias are recomputed weighted later."""
    args = list(fx.node.map_arg(node.args, lookup))
    mask = list(args[-1])
    if not mask[0] or not any(u.args[1] == 0 for u in node.users):
        return (None, None, None)
    args[-1] = [True, False, False]
    return aten.convolution_backward(*args)


def evaluate_post(grad: ParamGrad, site_values: dict[fx.Node, Any], gm: fx.GraphModule, env: dict) -> Any:
    """Run the batch-free nodes between a parameter's sites and its gradient output."""
    local: dict[fx.Node, Any] = dict(site_values)

    def lookup(n: fx.Node) -> Any:
        return local[n] if n in local else env[n]

    for node in gm.graph.nodes:
        if node in grad.post_nodes and node not in local:
            if node.target is operator.getitem and node.args[0] in local:
                local[node] = local[node.args[0]][node.args[1]]
            else:
                local[node] = _call(node, lookup)
    return local[grad.out_node]
