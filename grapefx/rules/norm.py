"""The weight / bias gradients of the fused `native_layer_norm_backward` / `native_group_norm_backward`.

The backward keeps these ops whole (decomposed, the eager codegen ran a chain of full-size
temporaries: a CNN's GroupNorm backwards cost 4x the fused kernel). Their outputs 1 and 2 sum
`g ⊙ x̂` and `g` over the batch and the positions; per sample they are [B, C] (group norm) or
[B, *normalized_shape] (layer norm): small, so they are instantiated, and the weighted sum is a
[B]·[B, numel] product. The input gradient comes from the same op with only output 0 asked for.
x̂ = (x − mean)·rstd is rebuilt from the saved statistics:
* group norm: Σ_s g·x̂ = rstd·(Σ_s g·x − mean·Σ_s g) per channel, the formula ATen's kernel uses;
  Σ_s g·x is a batched dot product, so no full-size temporary is made;
* layer norm: the statistics vary along the reduced positions, so x̂ is formed (one temporary).
"""

from __future__ import annotations

import torch

from grapefx.rules.registry import NormChoice, SiteContext, SiteRule, expose_batch, register_rule

aten = torch.ops.aten


def _group_norm_per_sample(site: SiteContext, nb) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    grad, x, mean, rstd, _weight, _n, channels, _hw, groups = nb.args[:9]
    g, xv = site.value(grad), site.value(x)
    b, c = g.shape[0], int(channels)
    gs, xs = g.reshape(b * c, 1, -1), xv.reshape(b * c, -1, 1)
    g_sum = gs.sum(-1).reshape(b, groups, c // groups)  # Σ_s g: the per-sample bias gradient
    gx_sum = torch.bmm(gs, xs).reshape(b, groups, c // groups)  # Σ_s g·x
    m, r = site.value(mean).reshape(b, groups, 1), site.value(rstd).reshape(b, groups, 1)
    weight = (gx_sum - m.to(gx_sum.dtype) * g_sum) * r.to(gx_sum.dtype)
    return weight.reshape(b, c), g_sum.reshape(b, c)


def _layer_norm_per_sample(site: SiteContext, nb) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    grad, x, normalized_shape, mean, rstd = nb.args[:5]
    lay, b = site.layout(x), site.batch_size
    g, xv, m, r = (expose_batch(site.value(a), lay, b) for a in (grad, x, mean, rstd))
    positions = list(range(1, g.dim() - len(normalized_shape)))  # every dim but B and the normalized
    x_hat = (xv - m) * r
    weight = (g * x_hat.to(g.dtype)).sum(positions) if positions else g * x_hat.to(g.dtype)
    bias = g.sum(positions) if positions else g
    return weight, bias


@register_rule("norm_backward")
class NormBackwardRule(SiteRule):
    def per_sample(self, site: SiteContext) -> torch.Tensor:
        nb, index = site.node.args  # getitem(norm backward, 1 | 2)
        key = ("norm_per_sample", nb)
        if key not in site.env:  # weight and bias come from one pass over g
            if nb.target.overloadpacket is aten.native_group_norm_backward:
                site.env[key] = _group_norm_per_sample(site, nb)
            else:
                site.env[key] = _layer_norm_per_sample(site, nb)
        return site.env[key][index - 1]

    def choose(self, site: SiteContext) -> NormChoice:
        return NormChoice("instantiate", float("inf"), 0.0, "norm affine gradients are [B, C]: instantiated")

    def weighted(self, site: SiteContext, weights: torch.Tensor) -> torch.Tensor:
        per_sample = self.per_sample(site)
        flat = per_sample.reshape(per_sample.shape[0], -1)
        out = torch.mm(weights.to(flat.dtype)[None, :], flat)
        return out.reshape(site.node.meta["val"].shape).to(site.node.meta["val"].dtype)
