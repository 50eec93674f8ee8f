"""Fallback for other batch contractions (bmm with a parameter): un-reduce the batch by running the
site op on single-sample slices under vmap (instantiation), and weight it by scaling its first
batch-carrying floating operand (the op is linear in each operand)."""

from __future__ import annotations

import torch
import torch.fx as fx

from grapefx.rules.registry import SiteContext, SiteRule, expose_batch, register_rule, weights_like


def _batch_operands(site: SiteContext) -> list[int]:
    return [i for i, a in enumerate(site.node.args) if isinstance(a, fx.Node) and site.layout(a) is not None]


@register_rule("bmm")
class UnreduceRule(SiteRule):
    def per_sample(self, site: SiteContext) -> torch.Tensor:
        idx = _batch_operands(site)
        args = list(site.node.args)
        exposed = [expose_batch(site.value(args[i]), site.layout(args[i]), site.batch_size) for i in idx]

        def one(*slices: torch.Tensor) -> torch.Tensor:
            call = [site.value(a) for a in args]
            for i, s in zip(idx, slices):
                call[i] = s
            return site.node.target(*call, **site.node.kwargs)

        return torch.vmap(one)(*exposed)

    def weighted(self, site: SiteContext, weights: torch.Tensor) -> torch.Tensor:
        args = [site.value(a) for a in site.node.args]
        for i in _batch_operands(site):
            if args[i].is_floating_point():
                args[i] = args[i] * weights_like(weights, args[i], site.layout(site.node.args[i]))
                break
        return site.node.target(*args, **site.node.kwargs)
