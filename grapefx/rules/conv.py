"""`convolution_backward` weight / bias gradients (Conv1d/2d/3d, any groups/stride/padding/dilation).

Per-sample values come from the same op run on single-sample slices under `vmap` (functorch turns
it into one grouped convolution), so every convolution variant torch supports is covered exactly.
The weighted sum scales the output gradient (the bias gradient depends on it alone) and runs one
`convolution_backward` for weight and bias together.
"""

from __future__ import annotations

import torch

from grapefx.rules.registry import SiteContext, SiteRule, register_rule, weights_like

aten = torch.ops.aten


def _conv_node(site: SiteContext):  # noqa: ANN202
    return site.node.args[0], site.node.args[1]  # (convolution_backward node, output index)


@register_rule("convolution_backward")
class ConvolutionRule(SiteRule):
    def per_sample(self, site: SiteContext) -> torch.Tensor:
        conv, index = _conv_node(site)
        grad, x, w, *rest = conv.args
        rest = [site.value(r) for r in rest]
        mask = [False, index == 1, index == 2]

        def one(g_i: torch.Tensor, x_i: torch.Tensor) -> torch.Tensor:
            return aten.convolution_backward(g_i[None], x_i[None], site.value(w), *rest[:-1], mask)[index]

        return torch.vmap(one)(site.value(grad), site.value(x))

    def weighted(self, site: SiteContext, weights: torch.Tensor) -> torch.Tensor:
        conv, index = _conv_node(site)
        cache = site.env.setdefault(("weighted_conv", conv), {})
        if "out" not in cache:
            grad, x, w, *rest = conv.args
            rest = [site.value(r) for r in rest]
            g = site.value(grad)
            g = g * weights_like(weights, g, site.layout(grad))
            mask = [False, bool(rest[-1][1]), bool(rest[-1][2])]
            cache["out"] = aten.convolution_backward(g, site.value(x), site.value(w), *rest[:-1], mask)
        return cache["out"][index]
