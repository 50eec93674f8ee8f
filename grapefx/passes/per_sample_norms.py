"""Per-sample squared gradient norms, one [B] tensor per parameter.

A parameter with one site reached through reshapes only uses its rule's cheapest norm (ghost or
instantiate, by the rule's cost model, per layer). Otherwise (a tied / shared weight used at several
sites, or post nodes that are not isometries such as slice_scatter) every site is instantiated per
sample and the post nodes are vmapped over the samples, so cross terms between uses are exact.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from grapefx.analysis.grad_sites import ParamGrad
from grapefx.passes.batched_post import apply_post_batched
from grapefx.rules.registry import NormChoice, SiteContext, rule_for


def plan_norms(grads: list[ParamGrad], contexts: dict[str, list[SiteContext]]) -> dict[str, list[NormChoice]]:
    plan: dict[str, list[NormChoice]] = {}
    for g in grads:
        if g.isometric:
            plan[g.name] = [rule_for(c.kind).choose(c) for c in contexts[g.name]]
        else:
            plan[g.name] = [
                NormChoice("instantiate", float("nan"), float("nan"), "shared/tied parameter: exact cross terms")
                for _ in contexts[g.name]
            ]
    return plan


def per_sample_norm_sq(
    grad: ParamGrad, sites: list[SiteContext], choices: list[NormChoice], gm: fx.GraphModule, env: dict
) -> torch.Tensor:
    if grad.isometric:
        return rule_for(sites[0].kind).norm_sq(sites[0], choices[0]).float()
    per_sample = {c.node: rule_for(c.kind).per_sample(c) for c in sites}
    full = apply_post_batched(grad.post_nodes, grad.out_node, per_sample, gm, env, sites[0].batch_size).float()
    return full.reshape(full.shape[0], -1).pow(2).sum(1)
