"""The weight / bias gradients of the fused `native_layer_norm_backward` / `native_group_norm_backward`.

The backward keeps these ops whole (decomposed, the eager codegen ran a chain of full-size
temporaries: a CNN's GroupNorm backwards cost 4x the fused kernel). Their outputs 1 and 2 sum
`g ⊙ x̂` and `g` over the batch and the positions; per sample they are [B, C] (group norm) or
[B, *normalized_shape] (layer norm): small, so they are instantiated, and the weighted sum is a
[B]·[B, numel] product. The input gradient comes from the same op with only output 0 asked for.
* group norm: one `native_group_norm_backward` with the batch folded into the channels
  ([1, B*C, S], B*G groups: each sample's groups keep their own statistics) returns every sample's
  weight and bias gradients (custom op `grapefx::group_norm_per_sample_affine_grads`, opaque so
  the batch-dependent group count never becomes a shape guard); 5x faster than a batched dot;
* layer norm: the statistics vary along the reduced positions, so g ⊙ x̂, x̂ = (x − mean)·rstd, is
  formed from the saved statistics in one temporary and summed over the positions.
"""

from __future__ import annotations

import torch

from grapefx.rules.registry import (
    NormChoice,
    SiteContext,
    SiteRule,
    combine_per_sample,
    expose_batch,
    register_rule,
)

aten = torch.ops.aten


@torch.library.custom_op("grapefx::group_norm_per_sample_affine_grads", mutates_args=())
def group_norm_per_sample_affine_grads(
    g: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, C], [B, C]): each sample's GroupNorm weight and bias gradient (g: the output gradient,
    x: the input, mean / rstd: the forward's [B, groups] statistics), in float32 at least. The
    statistics' dtype may differ from the input's (bfloat16 input under autocast: float32 mean /
    rstd); the unread gamma takes theirs, as the kernel wants."""
    b, c = g.shape[0], g.shape[1]
    acc = _accumulation_dtype(g)
    if b == 0:
        return g.new_zeros([0, c], dtype=acc), g.new_zeros([0, c], dtype=acc)
    s = g[0, 0].numel()
    _, weight, bias = aten.native_group_norm_backward(
        g.reshape(1, b * c, s),
        x.reshape(1, b * c, s),
        mean.reshape(1, b * groups),
        rstd.reshape(1, b * groups),
        mean.new_ones([b * c]),  # not read: only the affine gradients are asked for
        1,
        b * c,
        s,
        b * groups,
        [False, True, True],
    )
    return weight.reshape(b, c).to(acc), bias.reshape(b, c).to(acc)


@group_norm_per_sample_affine_grads.register_fake
def _(g: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, groups: int):  # noqa: ANN202
    acc = _accumulation_dtype(g)
    return g.new_empty([g.shape[0], g.shape[1]], dtype=acc), g.new_empty([g.shape[0], g.shape[1]], dtype=acc)


def _accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for half-precision gradients, else their own dtype (float32 / float64)."""
    return torch.promote_types(t.dtype, torch.float32)


def _group_norm_per_sample(site: SiteContext, nb) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    grad, x, mean, rstd, _weight, _n, _channels, _hw, groups = nb.args[:9]
    values = (site.value(a) for a in (grad, x, mean, rstd))
    weight, bias = torch.ops.grapefx.group_norm_per_sample_affine_grads(*values, int(groups))
    if site.layout(x).inner != 1:  # rows are the batch merged with positions (sample-major): sum each
        # sample's rows
        weight, bias = (t.reshape(site.batch_size, -1, t.shape[-1]).sum(1) for t in (weight, bias))
    return weight, bias


def _layer_norm_per_sample(site: SiteContext, nb) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    grad, x, normalized_shape, mean, rstd = nb.args[:5]
    # the gradient's layout: x and its statistics share it, or are batch-free rows expanded to the
    # same shape (then every sample sees the same x̂)
    lay, b = site.layout(grad), site.batch_size
    g, xv, m, r = (expose_batch(site.value(a), lay, b) for a in (grad, x, mean, rstd))
    positions = list(range(1, g.dim() - len(normalized_shape)))  # every dim but B and the normalized
    # Accumulate in float32 at least, as the fused backward does. The statistics are cast by an
    # explicit copy: with a bfloat16 input and float32 weight (autocast) the CPU kernel returns
    # float32 mean / rstd where the traced (meta) ones are bfloat16, and a `.to` that is a no-op in
    # the trace would leave the runtime dtypes different from the traced graph's.
    acc = _accumulation_dtype(xv)
    m, r = (aten._to_copy.default(t, dtype=acc) for t in (m, r))
    # g ⊙ x̂ with x̂ = (x − mean)·rstd, in one temporary: the in-place steps act on the fresh
    # difference only (its sole reader is the next step), saving two [B, T, d] buffers per norm.
    prod = (xv - m).mul_(r).mul_(g)
    weight = prod.sum(positions) if positions else prod
    bias = g.sum(positions, dtype=acc) if positions else g.to(acc)
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
        return combine_per_sample(site, self.per_sample(site), weights)
