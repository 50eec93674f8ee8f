"""`_embedding_bag_backward` (nn.EmbeddingBag on ids [B, L], modes sum and mean; analysis/bag_layout.py
admits only bags of one sample each).

Sample b's gradient is Σ_l w_l onehot(id_l) ⊗ g_b with w_l = 1 (sum) or 1/(non-padding ids of the
bag) (mean), 0 for padding ids. Its squared norm is ‖g_b‖² · Σ_{l,l'} [id_l = id_l'] w_l w_l':
O(L²) per sample and no V-sized buffer, so the cost model picks it unless V·d is tiny.
"""

from __future__ import annotations

import torch

from grapefx.rules.registry import NormChoice, SiteContext, SiteRule, accumulated, pick, register_rule

aten = torch.ops.aten


def _bags(site: SiteContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [B, L], per-id weights [B, L] and bag gradients [B, d] of one site."""
    grad, indices = site.node.args[:2]
    g = site.value(grad)
    ids = site.value(indices).reshape(g.shape[0], -1)
    mode = site.node.args[8]
    padding_idx = site.node.args[11] if len(site.node.args) > 11 else -1
    padded = padding_idx is not None and padding_idx >= 0
    w = (ids != padding_idx).to(g.dtype) if padded else torch.ones_like(ids, dtype=g.dtype)
    if mode == 1:  # mean over the bag's non-padding ids
        w = w / w.sum(1, keepdim=True).clamp(min=1)
    return ids, w, g


@register_rule("embedding_bag")
class EmbeddingBagRule(SiteRule):
    def per_sample(self, site: SiteContext) -> torch.Tensor:
        ids, w, g = _bags(site)
        num_weights = site.node.args[6]
        rows = w[:, :, None] * g[:, None, :]  # [B, L, d]
        out = g.new_zeros(g.shape[0], num_weights, g.shape[-1])
        return out.scatter_add(1, ids[:, :, None].expand(rows.shape), rows)

    def choose(self, site: SiteContext) -> NormChoice:
        L = int(site.node.args[1].meta["val"].shape[0] // site.node.args[0].meta["val"].shape[0])
        d, V = int(site.node.args[0].meta["val"].shape[-1]), int(site.node.args[6])
        ghost, inst = 2.0 * L * L + d, float(V * d)
        return NormChoice(
            pick(site.strategy, ghost, inst), ghost, inst, f"bags of L={L}: ghost ~L²+d vs instantiate ~Vd"
        )

    def norm_sq(self, site: SiteContext, choice: NormChoice) -> torch.Tensor:
        if choice.method != "ghost":
            return super().norm_sq(site, choice)
        ids, w, g = _bags(site)
        w = accumulated(w)
        same = (ids[:, :, None] == ids[:, None, :]).to(w.dtype)
        return (same * w[:, :, None] * w[:, None, :]).sum((1, 2)) * accumulated(g).pow(2).sum(1)

    def weighted(self, site: SiteContext, weights: torch.Tensor) -> torch.Tensor:
        args = [site.value(a) for a in site.node.args]
        args[0] = args[0] * weights.to(args[0].dtype)[:, None]
        return site.node.target(*args)
