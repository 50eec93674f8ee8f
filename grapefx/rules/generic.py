"""Fallback for other batch contractions (bmm with a parameter): un-reduce the batch by running the
site op on single-sample slices under vmap (instantiation), and weight it by scaling its first
batch-carrying floating operand (the op is linear in each operand)."""

from __future__ import annotations

import sympy
import torch
import torch.fx as fx

from grapefx.analysis.layout import BatchLayout, shape_of
from grapefx.rules.registry import SiteContext, SiteRule, expose_batch, register_rule, weights_like


def _batch_operands(site: SiteContext) -> list[int]:
    return [i for i, a in enumerate(site.node.args) if isinstance(a, fx.Node) and site.layout(a) is not None]


# bmm(a [b, n, k], c [b, k, m]): the dim of the other operand that meets (operand, dim)
_BMM_PARTNER = {(0, 0): 0, (0, 2): 1, (1, 0): 0, (1, 1): 2}


def _sliced_operands(site: SiteContext) -> dict[int, BatchLayout]:
    """Operands to slice per sample, with their layouts. A batch-free bmm operand whose contracted
    (or bmm-batch) dim meets the batch is sliced alongside: a constant expanded over the batch and
    merged into the contraction (XLNet's positional encodings) has one slice per sample too."""
    lays = {i: site.layout(site.node.args[i]) for i in _batch_operands(site)}
    if site.node.target is torch.ops.aten.bmm.default and len(lays) == 1:
        (i, lay), other = next(iter(lays.items())), 1 - next(iter(lays))
        d = _BMM_PARTNER.get((i, lay.dim))
        mine, theirs = shape_of(site.node.args[i]), shape_of(site.node.args[other])
        if d is not None and sympy.expand(mine[lay.dim] - theirs[d]) == 0:
            lays[other] = lay.moved(d)
    return lays


@register_rule("bmm")
class UnreduceRule(SiteRule):
    def per_sample(self, site: SiteContext) -> torch.Tensor:
        lays = _sliced_operands(site)
        idx = list(lays)
        args = list(site.node.args)
        exposed = [expose_batch(site.value(args[i]), lays[i], site.batch_size) for i in idx]

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
