"""DP-GRAPE inside the private backward: project before the per-sample gradient exists.

A projected weight W (m × n) reaches the backward as one mm site G_i = L_iᵀ R_i (site orientation,
possibly W's transpose). Its smaller side is projected with P (r × d): the side's factor is multiplied
by Pᵀ *before* any per-sample product (L_i Pᵀ is T × r), so the m × n per-sample gradient is never
formed. Norms (ghost or instantiated, whichever is cheaper at rank r), clipping and noise all happen
in the projected space, where the sensitivity is C; the global norm covers projected and
non-projected parameters alike. The privatized Ĝ is stashed for GRAPE optimizers and p.grad receives
its back-projection (Pᵀ Ĝ or Ĝ P) so that plain optimizers still work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

import grapefx.grape.projection  # noqa: F401 - registers grapefx::projection
from grapefx.analysis.grad_sites import ParamGrad
from grapefx.config import PrivacyConfig
from grapefx.errors import GrapefxError
from grapefx.passes.clip_factors import add_noise
from grapefx.passes.factored_norms import _orientation
from grapefx.rules import mm
from grapefx.rules.gram import ghost_norm_sq, gram_fraction
from grapefx.rules.registry import NormChoice, SiteContext, accumulated, weights_like


@dataclass(frozen=True)
class Projection:
    name: str
    index: int  # stable parameter index: seeds P together with (seed, block)
    rank: int
    rows: bool  # True: Ĝ = P G (P: r × m); False: Ĝ = G Pᵀ (P: r × n)
    dim: int  # the projected side's size
    site_left: bool  # the projected side is the site's left factor (mm's first operand)
    swapped: bool  # the site computes Wᵀ's gradient


def projection_index(name: str, config: PrivacyConfig) -> int:
    """The parameter's position in `config.grape_params`: seeds its P. Not the graph's output index,
    which can differ between the graphs of one model (e.g. B=5 vs B=3) and between ranks."""
    return list(config.grape_params or ()).index(name)


def plan_projection(grad: ParamGrad, config: PrivacyConfig) -> Projection:
    shape = [int(s) for s in grad.out_node.meta["val"].shape]
    site = grad.sites[0] if len(grad.sites) == 1 else None
    swapped = _orientation(site, grad) if site is not None and grad.isometric else None
    kind_ok = site is not None and getattr(site.target, "overloadpacket", None) is torch.ops.aten.mm
    if len(shape) != 2 or swapped is None or not kind_ok:
        raise GrapefxError(
            f"DP-GRAPE cannot project parameter `{grad.name}` (shape {shape}): projection needs a 2-D weight "
            "used once as a matrix product (a Linear weight). Exclude it with grape_exclude=[...] or "
            "choose the projected parameters with grape_include=[...]."
        )
    m, n = shape
    rows = m <= n
    if min(m, n) <= config.rank:
        raise GrapefxError(f"parameter `{grad.name}` {shape}: its smaller side is not larger than rank {config.rank}")
    return Projection(
        grad.name, projection_index(grad.name, config), config.rank, rows, m if rows else n, rows != swapped, swapped
    )


def projection_for(site: SiteContext, proj: Projection, state_id: int) -> torch.Tensor:
    like = site.value(site.node.args[0])
    return torch.ops.grapefx.projection(like, proj.rank, proj.dim, proj.index, state_id)


def projected_factors(site: SiteContext, proj: Projection, P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    L, R = mm.factors(site)  # [B, T, M], [B, T, N]
    if proj.site_left:
        return torch.matmul(L, P.t().to(L.dtype)), R
    return L, torch.matmul(R, P.t().to(R.dtype))


def projected_norm_sq(site: SiteContext, proj: Projection, P: torch.Tensor) -> tuple[torch.Tensor, NormChoice]:
    L, R = projected_factors(site, proj, P)
    T, M, N = L.shape[1], L.shape[2], R.shape[2]
    ghost, inst = 2.0 * T * T * (M + N) * gram_fraction(int(T), int(M + N)), 2.0 * T * M * N
    method = (
        site.strategy if site.strategy in ("ghost", "instantiate") else ("ghost" if ghost < inst else "instantiate")
    )
    side = "P·G" if proj.rows else "G·Pᵀ"
    reason = f"DP-GRAPE rank {proj.rank} ({side}), norm by {method} in the projected space: T={T} M={M} N={N}"
    choice = NormChoice(f"projected/{method}", ghost, inst, reason, int(T))
    L, R = accumulated(L), accumulated(R)
    if method == "ghost":
        return ghost_norm_sq(L, R), choice
    return torch.bmm(L.transpose(1, 2), R).pow(2).sum(dim=(1, 2)), choice


def finish_projected(
    site: SiteContext,
    proj: Projection,
    P: torch.Tensor,
    weights: torch.Tensor,
    denom: Any,
    config: PrivacyConfig,
    state_id: int,
    C: float | torch.Tensor,
) -> torch.Tensor:
    """Weighted projected contraction + noise in the projected space; returns p.grad (back-projected),
    or the noised Ĝ in distributed mode (the caller all-reduces every Ĝ, then back-projects)."""
    a, b = site.node.args[:2]
    A, Bm = site.value(a), site.value(b)
    lk = mm._k_layout(site)
    if proj.site_left:
        A = torch.mm(P.to(A.dtype), A)  # [r, K]
    else:
        Bm = torch.mm(Bm, P.t().to(Bm.dtype))  # [K, r]
    if A.shape[0] <= Bm.shape[1]:
        A = A * weights_like(weights, A, lk)
    else:
        Bm = Bm * weights_like(weights, Bm, lk.moved(0))
    ghat = torch.mm(A, Bm)  # site orientation
    ghat = ghat.t() if proj.swapped else ghat  # parameter orientation: [r, n] or [m, r]
    ghat = add_noise(ghat.contiguous(), config, state_id, denom, C)
    if config.distributed:  # Ĝ is all-reduced (once, all parameters) before back_project
        return ghat
    return back_project(ghat, proj, P, state_id)


def back_project(ghat: torch.Tensor, proj: Projection, P: torch.Tensor, state_id: int) -> torch.Tensor:
    """Stash the privatized Ĝ for GRAPE optimizers; p.grad is its back-projection Pᵀ Ĝ or Ĝ P."""
    ghat = torch.ops.grapefx.stash_projected(ghat, proj.name, state_id)
    P = P.to(ghat.dtype)
    return torch.mm(P.t(), ghat) if proj.rows else torch.mm(ghat, P)
