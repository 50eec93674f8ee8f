"""`mm(A[M, K], B[K, N])` contracting a flattened batch dim K = outer*B*inner (Linear, matmul).

Per sample i the contribution is G_i = L_iᵀ R_i with L_i = A[:, K_i]ᵀ ([T, M]) and R_i = B[K_i, :]
([T, N]), T = outer*inner. Its squared norm is either the ghost norm Σ_{t,s} (L_t·L_s)(R_t·R_s)
(~2BT²(M+N)·f flops, f ≈ 5/8 as rules/gram.py computes half of each symmetric Gram; BT² memory) or
‖L_iᵀR_i‖² after instantiation (~2BTMN flops, BMN memory).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from grapefx.passes import masked_rows_op  # noqa: F401 - registers grapefx::pad_masked_rows
from grapefx.rules.gram import ghost_norm_sq
from grapefx.rules.registry import (
    NormChoice,
    SiteContext,
    SiteRule,
    accumulated,
    expose_batch,
    keep_and_norm,
    mm_extra_costs,
    register_rule,
    weights_like,
)


def _k_layout(site: SiteContext):  # noqa: ANN202
    a, b = site.node.args[:2]
    la, lb = site.layout(a), site.layout(b)
    return la if la is not None else lb.moved(1)


def factors(site: SiteContext) -> tuple[torch.Tensor, torch.Tensor]:
    """L [B, T, M] and R [B, T, N] of an mm site."""
    a, b = site.node.args[:2]
    lk = _k_layout(site)
    A, Bm = site.value(a), site.value(b)
    L = expose_batch(A, lk, site.batch_size).transpose(1, 2)  # [B, T, M]
    R = expose_batch(Bm, lk.moved(0), site.batch_size)  # [B, T, N]
    return L, R


@register_rule("mm")
class MatmulRule(SiteRule):
    def per_sample(self, site: SiteContext) -> torch.Tensor:
        L, R = factors(site)
        return torch.bmm(L.transpose(1, 2), R)

    def choose(self, site: SiteContext) -> NormChoice:
        a, b = site.node.args[:2]
        lk = _k_layout(site)
        T = int(lk.outer * lk.inner)
        M = int(a.meta["val"].shape[0])
        N = int(b.meta["val"].shape[1])
        ghost, inst, fits = mm_extra_costs(T, M, N, site.fresh_weight)
        if site.strategy in ("ghost", "instantiate"):
            method, why = site.strategy, f"strategy={site.strategy}"
        elif fits and inst <= ghost:
            method, why = "instantiate", "per-sample gradient replaces the weight-gradient matmul"
        else:
            method = "ghost"
            why = "ghost is cheaper" if fits else f"[B,{M},{N}] per-sample gradient too large to keep"
        reason = (
            f"T={T} M={M} N={N}: extra cost ghost ~2T²(M+N)·f={ghost:.3g} vs instantiate ~3MN traffic + "
            f"fresh pages={inst:.3g}; {why}"
        )
        return NormChoice(method, ghost, inst, reason, T)

    def norm_sq(self, site: SiteContext, choice: NormChoice) -> torch.Tensor:
        L, R = factors(site)
        L, R = accumulated(L), accumulated(R)
        if choice.method == "ghost":
            return ghost_norm_sq(L, R)
        return keep_and_norm(site, torch.bmm(L.transpose(1, 2), R))

    def weighted(self, site: SiteContext, weights: torch.Tensor) -> torch.Tensor:
        a, b = site.node.args[:2]
        lk = _k_layout(site)
        A, Bm = site.value(a), site.value(b)
        masked = _masked_rows_operands(a, b)
        if masked is not None:  # contract the selected rows only, each weighted by its sample
            rows_a, rows_b, mask, group = (site.value(t) if isinstance(t, fx.Node) else t for t in masked)
            w = weights_like(weights, A, lk).reshape(mask.numel(), group)[mask.reshape(-1)].reshape(1, -1)
            return torch.mm(rows_a * w, rows_b)
        if A.shape[0] <= Bm.shape[1]:  # scale the smaller operand
            A = A * weights_like(weights, A, lk)
        else:
            Bm = Bm * weights_like(weights, Bm, lk.moved(0))
        return torch.mm(A, Bm)


_PAD = torch.ops.grapefx.pad_masked_rows.default


def _masked_rows_operands(a: object, b: object) -> tuple[fx.Node, fx.Node, fx.Node, int] | None:
    """(rows of a, rows of b, mask, group) when both operands are x[mask] rows padded back to their
    [B·T] places along the contraction (passes/pad_masked_rows.py) through one mask: the padded rows
    are zeros, so the weighted contraction needs only the selected ones."""
    pads = [t for t in (a, b) if isinstance(t, fx.Node) and t.target is _PAD]
    if len(pads) != 2:
        return None
    (rows_a, mask_a, dim_a, group_a), (rows_b, mask_b, dim_b, group_b) = (p.args for p in pads)
    if mask_a is not mask_b or group_a != group_b or (dim_a, dim_b) != (1, 0):
        return None
    return rows_a, rows_b, mask_a, group_a
