"""`embedding_dense_backward` (nn.Embedding, incl. padding_idx).

Sample i's gradient is Σ_t onehot(id_t) ⊗ g_t, so its ghost norm is Σ_{t,s} [id_t = id_s](g_t·g_s)
(~BT²d flops, no V-sized buffer), against ~BVd memory to instantiate; tokens equal to padding_idx
contribute nothing. scale_grad_by_freq counts tokens over the whole batch and is refused earlier.
"""

from __future__ import annotations

import math

import torch

from grapefx.analysis.layout import BatchLayout, shape_of
from grapefx.rules.gram import dense_blocks, gram_fraction, same_id_blocks, symmetric_gram_dot
from grapefx.rules.registry import (
    MEMORY_WEIGHT,
    NormChoice,
    SiteContext,
    SiteRule,
    accumulated,
    expose_batch,
    pick,
    register_rule,
    weights_like,
)

aten = torch.ops.aten


def token_layout(site: SiteContext) -> BatchLayout:
    """The batch layout of a site's ids, which have its grad's leading shape. Ids shared by every
    sample (a buffer expanded over the batch) have none of their own: the grad's layout is theirs."""
    grad, ids = site.node.args[:2]
    lay = site.layout(ids) or site.layout(grad)
    assert lay is not None, "embedding site without a batched operand"
    return lay


def tokens(site: SiteContext) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] and grads [B, T, d] of one site."""
    grad, ids = site.node.args[:2]
    lay = token_layout(site)
    ids_b = expose_batch(site.value(ids), lay, site.batch_size)
    b = site.batch_size
    ids_b = ids_b.reshape(b, -1) if ids_b.dim() != 2 else ids_b
    g = site.value(grad)
    g_b = expose_batch(g, lay, b)
    g_b = g_b.reshape(b, ids_b.shape[1], g.shape[-1])
    return ids_b, g_b


@register_rule("embedding_dense_backward")
class EmbeddingRule(SiteRule):
    def per_sample(self, site: SiteContext) -> torch.Tensor:
        ids, g = tokens(site)
        num_weights, padding_idx = site.node.args[2], site.node.args[3]
        if padding_idx is not None and padding_idx >= 0:
            g = g * (ids != padding_idx).unsqueeze(-1).to(g.dtype)
        out = g.new_zeros(g.shape[0], num_weights, g.shape[-1])
        return out.scatter_add(1, ids.unsqueeze(-1).expand(g.shape), g)

    def choose(self, site: SiteContext) -> NormChoice:
        grad, ids = site.node.args[:2]
        lay = token_layout(site)
        other_dims = [s for i, s in enumerate(shape_of(ids)) if i != lay.dim]
        T = int(math.prod(int(s) for s in other_dims) * lay.outer * lay.inner)  # tokens per sample
        d, V = int(shape_of(grad)[-1]), int(site.node.args[2])
        ghost = (2.0 * T * T * d + MEMORY_WEIGHT * 3 * T * T) * gram_fraction(T, d + 1)
        # zero-fill, scatter, square-and-sum of a fresh [V, d]
        inst = MEMORY_WEIGHT * (3 * V * d + T * d) + site.fresh_weight * V * d
        reason = f"T={T} d={d} V={V}: ghost ~2T²d vs instantiate ~3Vd memory-bound per sample"
        return NormChoice(pick(site.strategy, ghost, inst), ghost, inst, reason, T)

    def norm_sq(self, site: SiteContext, choice: NormChoice) -> torch.Tensor:
        if choice.method != "ghost":
            return super().norm_sq(site, choice)
        ids, g = tokens(site)
        padding_idx = site.node.args[3]
        keep = (ids != padding_idx) if padding_idx is not None and padding_idx >= 0 else None
        g = accumulated(g)
        return symmetric_gram_dot(same_id_blocks(ids, keep), dense_blocks(g), ids.shape[1], g.shape[-1] + 1)

    def weighted(self, site: SiteContext, weights: torch.Tensor) -> torch.Tensor:
        grad, ids, num_weights, padding_idx, scale = site.node.args
        g = site.value(grad)
        g = g * weights_like(weights, g, token_layout(site))
        return aten.embedding_dense_backward(g, site.value(ids), num_weights, padding_idx, scale)
