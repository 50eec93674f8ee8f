"""`sum(X, dims)` over dims that include the batch: biases, norm weights, broadcast parameters
(positional embeddings, cls tokens, scales). Per-sample values are [B, *param] and cheap, so they are
instantiated."""

from __future__ import annotations

import torch

from grapefx.rules.registry import SiteContext, SiteRule, expose_batch, register_rule, weights_like


def _sum_args(site: SiteContext):  # noqa: ANN202
    n = site.node
    x = n.args[0]
    dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    keepdim = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
    ndim = x.meta["val"].dim()
    if dims is None or len(dims) == 0:
        dims = list(range(ndim))
    return x, [d % ndim for d in dims], bool(keepdim), n.kwargs.get("dtype")


@register_rule("reduce")
class SumRule(SiteRule):
    def per_sample(self, site: SiteContext) -> torch.Tensor:
        x, dims, _, dtype = _sum_args(site)
        lay = site.layout(x)
        xs = expose_batch(site.value(x), lay, site.batch_size)  # dims shift by one
        out_shape = list(site.node.meta["val"].shape)
        if dtype is None and all(isinstance(xs.shape[d + 1], int) and xs.shape[d + 1] == 1 for d in dims):
            # Nothing to add up (a Linear's bias on [B, d] inputs): a view, not a copy.
            return xs.reshape([site.batch_size] + out_shape)
        summed = xs.sum(dim=[d + 1 for d in dims], keepdim=True, dtype=dtype)
        return summed.reshape([site.batch_size] + out_shape)

    def weighted(self, site: SiteContext, weights: torch.Tensor) -> torch.Tensor:
        x, dims, keepdim, dtype = _sum_args(site)
        xv = site.value(x)
        xv = xv * weights_like(weights, xv, site.layout(x))
        return xv.sum(dim=dims, keepdim=keepdim, dtype=dtype)
