"""`index_put(zeros, [ids], rows, accumulate=True)`: the backward of a parameter used as a lookup
table with per-sample ids (`table[ids]`, analysis/indexing_layout.py).

Instantiation: sample b's gradient is its rows scattered into a zero table, built for all samples
at once by one index_put into [B, *table] with arange(B) as the leading index.

Ghost norm, for rows that are products `bmm(L [S, M, r], R [S, r, N])` written at table[ids]: the
backward of a matmul with a per-token gathered weight, `bmm(W[ids], x)`, as transformers' "batched_mm"
mixture-of-experts layers compute it (ids = each token's expert). Sample i's gradient is
Σ_s onehot(id_s) ⊗ L_s R_s over its rows s, so its squared norm is
Σ_{s,s'} [id_s = id_s'] ⟨L_s R_s, L_s' R_s'⟩, and with L_s R_s = Σ_j L_s[:, j] ⊗ R_s[j, :] that is an
mm ghost norm over the n·r rows of sample i (n gathered rows, r columns each) masked to pairs of the
same id: ~2(nr)²(M + N) flops, against a [E, M, N] table per sample to instantiate (an expert
layer's whole weight, per sample). For other rows, and for large tables of plain lookups, prefer
nn.Embedding, whose rule has a ghost norm that never builds the table.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from grapefx.analysis.layout import shape_of
from grapefx.rules.gram import BlockGram, dense_blocks, gram_fraction, same_id_blocks, symmetric_gram_dot
from grapefx.rules.registry import (
    MEMORY_WEIGHT,
    NormChoice,
    SiteContext,
    SiteRule,
    accumulated,
    expose_batch,
    keep_and_norm,
    pick,
    register_rule,
    weights_like,
)

aten = torch.ops.aten


@register_rule("index_put")
class GatherRule(SiteRule):
    def per_sample(self, site: SiteContext) -> torch.Tensor:
        base, indices, values = site.node.args[:3]
        b = site.batch_size
        if all(site.layout(t) is None for t in indices if isinstance(t, fx.Node)):
            # ids shared by all samples, expanded to the batch: they line up with the values' leading
            # batch dim as they are (the layout analysis admits this form only)
            rows = site.value(values)
        else:
            rows = expose_batch(site.value(values), site.layout(values), b)
        index = []
        for t in indices:
            lay = site.layout(t) if isinstance(t, fx.Node) else None
            index.append(expose_batch(site.value(t), lay, b) if lay is not None else site.value(t))
        # the batched index tensors now lead with B; a batch-free one broadcasts against them from
        # the right, so it is padded to their rank first
        rank = max(t.dim() for t in index if t is not None)
        index = [t.reshape([1] * (rank - t.dim()) + list(t.shape)) if t is not None else None for t in index]
        samples = torch.arange(b, device=rows.device).reshape([b] + [1] * (rank - 1))
        out = rows.new_zeros([b] + list(site.node.meta["val"].shape))
        return aten.index_put(out, [samples] + index, rows, True)

    def choose(self, site: SiteContext) -> NormChoice:
        table = [int(v) for v in site.node.meta["val"].shape]
        inst = MEMORY_WEIGHT * 3 * math.prod(table) + site.fresh_weight * math.prod(table)
        products = _row_products(site)
        if products is None:
            reason = f"table {table}: rows are not per-row matrix products, so only instantiation (~3·numel memory)"
            return NormChoice("instantiate", float("inf"), inst, reason)
        L, R, ids = products
        rows = int(_rows_per_sample(site, ids)) * int(L.meta["val"].shape[-1])
        M, N = int(L.meta["val"].shape[-2]), int(R.meta["val"].shape[-1])
        ghost = (2.0 * rows * rows * (M + N) + MEMORY_WEIGHT * 3 * rows * rows) * gram_fraction(rows, M + N)
        reason = (
            f"table {table}, {rows} rows of [{M}]⊗[{N}] per sample: ghost ~2n²(M+N) masked to equal ids "
            f"vs instantiate ~3·numel memory-bound per sample"
        )
        return NormChoice(pick(site.strategy, ghost, inst), ghost, inst, reason)

    def norm_sq(self, site: SiteContext, choice: NormChoice) -> torch.Tensor:
        if choice.method != "ghost":
            return keep_and_norm(site, self.per_sample(site))
        products = _row_products(site)
        assert products is not None, "ghost norm chosen for rows that are not matrix products"
        L, R, ids = (self._batched(site, t) for t in products)
        b, r = site.batch_size, L.shape[-1]
        left = accumulated(L).transpose(-1, -2).reshape(b, -1, L.shape[-2])  # [B, n·r, M]: row (s, j) = L_s[:, j]
        right = accumulated(R).reshape(b, -1, R.shape[-1])  # [B, n·r, N]: row (s, j) = R_s[j, :]
        ids = ids.repeat_interleave(r, dim=1)  # [B, n·r]
        blocks = _masked(dense_blocks(left), same_id_blocks(ids))
        return symmetric_gram_dot(blocks, dense_blocks(right), ids.shape[1], left.shape[-1] + right.shape[-1])

    @staticmethod
    def _batched(site: SiteContext, node: fx.Node) -> torch.Tensor:
        t = expose_batch(site.value(node), site.layout(node), site.batch_size)
        return t.reshape(t.shape[0], -1) if node is site.node.args[1][0] else t

    def weighted(self, site: SiteContext, weights: torch.Tensor) -> torch.Tensor:
        base, indices, values, *rest = site.node.args
        rows = site.value(values)
        rows = rows * weights_like(weights, rows, site.layout(values))
        return site.node.target(site.value(base), [site.value(t) for t in indices], rows, *rest)


_BMM = (aten.bmm.default,)


def _row_products(site: SiteContext) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(L, R, ids) when the site writes bmm(L [S, M, r], R [S, r, N]) at table[ids] along the table's
    leading dim, with L, R and ids all batched along their first dim, one sample's rows after another's
    (the layout the values have)."""
    base, indices, values = site.node.args[:3]
    if len(indices) != 1 or not isinstance(indices[0], fx.Node) or not isinstance(values, fx.Node):
        return None
    ids = indices[0]
    if values.target not in _BMM or len(shape_of(ids)) != 1:
        return None
    L, R = values.args[:2]
    lays = [site.layouts.layouts.get(t) for t in (L, R, values, ids)]
    if any(lay is None or lay.dim != 0 for lay in lays) or len(set(lays)) != 1:
        return None
    return L, R, ids


def _rows_per_sample(site: SiteContext, ids: fx.Node) -> Any:
    lay = site.layout(ids)
    return lay.outer * lay.inner


def _masked(gram: BlockGram, mask: BlockGram) -> BlockGram:
    return lambda rows, cols: gram(rows, cols) * mask(rows, cols)
