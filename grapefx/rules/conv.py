"""`convolution_backward` weight / bias gradients (Conv1d/2d/3d, any groups/stride/padding/dilation).

Per-sample weight gradients contract the output gradient with the input's patches:
G_i[co, ci, k] = Σ_l g_i[co, l] · patch_i[ci, l, k], patches taken with Tensor.unfold (a view, so
symbolic batch sizes survive; vmap over convolution_backward would specialize B). The weighted sum
scales the output gradient (the bias gradient depends on it alone) and runs one
`convolution_backward` for weight and bias together. Transposed convolutions are refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from grapefx.errors import UnsupportedOpError, describe_node
from grapefx.rules.registry import SiteContext, SiteRule, register_rule, weights_like

aten = torch.ops.aten


def _conv_node(site: SiteContext):  # noqa: ANN202
    return site.node.args[0], site.node.args[1]  # (convolution_backward node, output index)


def patches(
    x: torch.Tensor, kernel: list[int], stride: list[int], padding: list[int], dilation: list[int]
) -> torch.Tensor:
    """[B, C, *S] -> [B, C, *L, *K]: every output position's receptive field."""
    pad: list[int] = []
    for p in reversed(padding):
        pad += [p, p]
    if any(pad):
        x = F.pad(x, pad)
    n = len(kernel)
    for i in range(n):
        span = (kernel[i] - 1) * dilation[i] + 1
        x = x.unfold(2 + i, span, stride[i])
        if dilation[i] > 1:
            x = x[..., :: dilation[i]]
    return x


def per_sample_weight_grad(
    g: torch.Tensor,
    x: torch.Tensor,
    w_shape: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    b = g.shape[0]
    n = len(w_shape) - 2
    cout, cin_g, kernel = w_shape[0], w_shape[1], list(w_shape[2:])
    p = patches(x, kernel, stride, padding, dilation)  # [B, Cin, *L, *K]
    n_l = 1
    for s in p.shape[2 : 2 + n]:
        n_l = n_l * s
    k_total = 1
    for k in kernel:
        k_total *= k
    p = p.reshape(b, groups, cin_g, n_l, k_total)
    gg = g.reshape(b, groups, cout // groups, n_l)
    out = torch.einsum("bgol,bgilk->bgoik", gg, p)
    return out.reshape([b, cout, cin_g] + kernel)


@register_rule("convolution_backward")
class ConvolutionRule(SiteRule):
    def per_sample(self, site: SiteContext) -> torch.Tensor:
        conv, index = _conv_node(site)
        grad, x, w, _bias_sizes, stride, padding, dilation, transposed, _out_pad, groups, _mask = conv.args
        if transposed:
            raise UnsupportedOpError(
                f"{describe_node(conv)}: transposed convolutions have no per-sample rule yet; "
                "use a regular convolution with upsampling, or freeze this layer."
            )
        g = site.value(grad)
        if index == 2:
            return g.reshape(g.shape[0], g.shape[1], -1).sum(-1)
        w_shape = list(w.meta["val"].shape)
        return per_sample_weight_grad(g, site.value(x), w_shape, list(stride), list(padding), list(dilation), groups)

    def weighted(self, site: SiteContext, weights: torch.Tensor) -> torch.Tensor:
        conv, index = _conv_node(site)
        # Weight and bias of one convolution share a single weighted convolution_backward when they
        # share the per-sample weights (flat clipping); per-layer clipping weights them separately.
        cache = site.env.setdefault(("weighted_conv", conv, id(weights)), {"weights": weights})
        if "out" not in cache:
            grad, x, w, *rest = conv.args
            rest = [site.value(r) for r in rest]
            g = site.value(grad)
            g = g * weights_like(weights, g, site.layout(grad))
            mask = [False, bool(rest[-1][1]), bool(rest[-1][2])]
            cache["out"] = aten.convolution_backward(g, site.value(x), site.value(w), *rest[:-1], mask)
        return cache["out"][index]
