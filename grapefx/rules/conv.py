"""`convolution_backward` weight / bias gradients (Conv1d/2d/3d, any groups/stride/padding/dilation).

Per-sample weight gradients come from `convolution_backward` calls whose input and output gradient
have the batch folded into the channels ([1, b*C, *S]) and groups × b groups: sample i's channels
only meet each other, so the weight gradient returned is every sample's, stacked (custom op
`grapefx::conv_per_sample_weight_grad`, in chunks of samples). On CPU this is 3-6x faster than
contracting explicit unfold patches (whose copy was a third of a CNN's step) and keeps no patch
tensor; the batch stays symbolic (vmap over convolution_backward would specialize it). The weighted sum
scales the output gradient (the bias gradient depends on it alone) and runs one
`convolution_backward` for weight and bias together. Transposed convolutions fold the same way (their
weight is [Cin, Cout/groups, *K], so the stacked gradient is [b*Cin, ...]). A batch merged with
frames, [B·T, C, *S] (a video's frames through one Conv2d), puts each sample's T images in the
call's batch dim, over which the weight gradient sums.
"""

from __future__ import annotations

import torch

from grapefx.rules.registry import SiteContext, SiteRule, register_rule, weights_like

aten = torch.ops.aten


def _conv_node(site: SiteContext):  # noqa: ANN202
    return site.node.args[0], site.node.args[1]  # (convolution_backward node, output index)


# Per-sample output bytes per convolution call: larger batches run in chunks of about this size.
# Measured on CPU (oneDNN): chunks of ~2 MB keep the op's scratch to about the chunk's size and were
# never slower than one call (one call was up to 4x slower on 64x64x8x8, page-faulting its scratch).
CHUNK_BYTES = 2 * 2**20


@torch.library.custom_op("grapefx::conv_per_sample_weight_grad", mutates_args=())
def conv_per_sample_weight_grad(
    g: torch.Tensor,
    x: torch.Tensor,
    w_shape: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    transposed: bool = False,
    output_padding: list[int] | None = None,
    items: int = 1,
) -> torch.Tensor:
    """[B, Cout, Cin/groups, *K]: sample i's weight gradient. Each chunk of samples is one grouped
    convolution_backward with the batch folded into the channels ([1, b*C, *S], b*groups groups:
    sample i's channels only meet each other). An opaque op, so the number of groups (which depends
    on the batch) never becomes a shape guard, and chunks are chosen for the batch at run time.
    `items`: images per sample when the batch is merged with frames ([B·T, C, *S], a video's frames
    through a Conv2d): each sample's T images become the call's batch ([T, b*C, *S]), whose weight
    gradient sums over it."""
    b = x.shape[0] // items
    out = g.new_empty([b, *w_shape])
    if b == 0:
        return out
    per_sample = out[0].numel() * out.element_size()
    chunk = max(1, min(b, CHUNK_BYTES // max(per_sample, 1)))
    out_pad = output_padding or [0] * len(stride)
    xs, gs = (t.reshape(b, items, *t.shape[1:]) for t in (x, g))
    for lo in range(0, b, chunk):
        hi = min(b, lo + chunk)
        xc = xs[lo:hi].transpose(0, 1).reshape(items, -1, *x.shape[2:])
        gc = gs[lo:hi].transpose(0, 1).reshape(items, -1, *g.shape[2:])
        # Only the weight's gradient is asked for: the weight's values are never read.
        w1 = g.new_empty([(hi - lo) * w_shape[0], *w_shape[1:]])
        wg = aten.convolution_backward(
            gc, xc, w1, None, stride, padding, dilation, transposed, out_pad, (hi - lo) * groups, [False, True, False]
        )[1]
        out[lo:hi].copy_(wg.reshape(hi - lo, *w_shape))
    return out


@conv_per_sample_weight_grad.register_fake
def _(
    g: torch.Tensor,
    x: torch.Tensor,
    w_shape: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    transposed: bool = False,
    output_padding: list[int] | None = None,
    items: int = 1,
) -> torch.Tensor:
    return g.new_empty([x.shape[0] // items, *w_shape])


@register_rule("convolution_backward")
class ConvolutionRule(SiteRule):
    def per_sample(self, site: SiteContext) -> torch.Tensor:
        conv, index = _conv_node(site)
        grad, x, w, _bias_sizes, stride, padding, dilation, transposed, out_pad, groups, _mask = conv.args
        g = site.value(grad)
        items = int(site.layout(grad).inner)  # images per sample: [B·T, C, *S] when > 1
        if index == 2:
            return g.reshape(site.batch_size, items, g.shape[1], -1).sum((1, 3))
        w_shape = list(w.meta["val"].shape)
        conv_args = (list(stride), list(padding), list(dilation), groups, transposed, list(out_pad))
        return torch.ops.grapefx.conv_per_sample_weight_grad(g, site.value(x), w_shape, *conv_args, items=items)

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
