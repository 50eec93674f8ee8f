"""Clip factors c_i from per-sample norms, folded with the loss scale into per-sample weights.

Per-sample gradients of the user's loss are `scale * (what the backward graph sees)`, where scale is
the batch size for a mean-reduced loss (the loss is the mean over the actual batch). The weighted sum
is Σ c_i g_i / denom, so each site is weighted by w_i = c_i * scale / denom.

With adaptive clipping the bound C is read at run time (`grapefx::clip_bound`, a 0-d tensor of
the privacy state, read after the norms are recorded) and the gradient's noise uses σ_g, the part of
σ the unclipped count leaves (`PrivacyConfig.gradient_noise_multiplier`); otherwise C is a constant.

Per-layer clipping splits the budget evenly: parameter p is clipped to C_p = C / sqrt(P), so the
whole gradient still has sensitivity C and noise of std σC keeps the stated guarantee. It needs no
global norm, so each parameter is finished as soon as its own norm is known (FlashDP). Group clipping
(`grapefx/privacy/clip_groups.py`) does the same for groups of parameters, each to its C_g.
"""

from __future__ import annotations

from typing import Any

import torch

import grapefx.privacy.adaptive_clipping  # noqa: F401 - registers grapefx::clip_bound
from grapefx.config import PrivacyConfig
from grapefx.privacy.clip_groups import group_bounds

# clipping modes that clip groups of parameters on their own (no global norm, no barrier)
GROUPED_MODES = ("per_layer", "group")

STABILITY = 1e-6


def loss_scale_and_denom(
    batch_size: Any, config: PrivacyConfig, state_id: int | None = None, like: torch.Tensor | None = None
) -> tuple[Any, Any]:
    if config.distributed:
        # The global denominator is only known at run time (global batch size, world size): a 0-d
        # tensor from the privacy state, read by every graph (no recompiles). `like` gives the device.
        import grapefx.distributed.ops  # noqa: F401 - registers grapefx::distributed_denom

        if state_id is None or like is None:
            raise ValueError("distributed mode needs the privacy state id and a tensor for the denominator")
        scale = 1 if config.loss_reduction == "sum" else batch_size
        return scale, torch.ops.grapefx.distributed_denom(like, state_id)
    if config.loss_reduction == "sum":
        return 1, 1
    if config.expected_batch_size is not None:
        return batch_size, config.expected_batch_size
    denom = torch.sym_max(batch_size, 1) if isinstance(batch_size, torch.SymInt) else max(int(batch_size), 1)
    return batch_size, denom


def group_weights(norms: torch.Tensor, bound: float, scale: Any, denom: Any) -> torch.Tensor:
    """Weights of one clip group (per-layer clipping: one parameter), clipped on its own to `bound`;
    `norms` is [B, k], the per-sample norms of the group's k parameters."""
    norm = norms[:, 0] if norms.shape[1] == 1 else norms.pow(2).sum(dim=1).sqrt()
    return (bound / (norm + STABILITY)).clamp(max=1.0) * scale / denom


def clip_bound(config: PrivacyConfig, recorded: torch.Tensor, state_id: int) -> float | torch.Tensor:
    """C: the constant `max_grad_norm`, or with adaptive clipping this step's bound, read after
    `recorded` (the output of `recorded_norms`) exists."""
    if config.adaptive_clipping is None:
        return float(config.max_grad_norm)
    return torch.ops.grapefx.clip_bound(recorded, state_id)


def flat_weights(
    norms: torch.Tensor, scale: Any, denom: Any, config: PrivacyConfig, C: float | torch.Tensor
) -> torch.Tensor:
    """Weights from the norm of the whole per-sample gradient; `norms` is [B, P] per parameter."""
    total = norms.pow(2).sum(dim=1).sqrt()
    if config.clipping == "automatic":
        c = C / (total + config.automatic_gamma)
    else:
        c = (C / (total + STABILITY)).clamp(max=1.0)
    return c * scale / denom


def recorded_norms(norm_sq: list[torch.Tensor], scale: Any, first: int, n_columns: int, state_id: int) -> torch.Tensor:
    """[B, k] per-sample norms of the user's loss (scaled), published for monitoring."""
    norms = torch.stack(norm_sq, dim=1).clamp_min(0).sqrt() * scale
    return torch.ops.grapefx.record_norms(norms, first, n_columns, state_id)


def clip_weights(
    norm_sq: list[torch.Tensor], names: list[str], batch_size: Any, config: PrivacyConfig, state_id: int
) -> tuple[list[torch.Tensor], Any, float | torch.Tensor]:
    """All parameters (`names`, in the order of `norm_sq`) at once, used where the graph has no
    per-layer structure (B=1); also the denominator and C."""
    scale, denom = loss_scale_and_denom(batch_size, config, state_id, norm_sq[0] if norm_sq else None)
    n = len(norm_sq)
    norms = recorded_norms(norm_sq, scale, 0, n, state_id)
    C = clip_bound(config, norms, state_id)
    if config.clipping in GROUPED_MODES:
        column = {name: j for j, name in enumerate(names)}
        weights: dict[str, torch.Tensor] = {}
        for members, bound in group_bounds(names, config):
            w = group_weights(norms[:, [column[m] for m in members]], bound, scale, denom)
            weights.update(dict.fromkeys(members, w))
        return [weights[name] for name in names], denom, C
    w = flat_weights(norms, scale, denom, config, C)
    return [w for _ in norm_sq], denom, C


def add_noise(
    grad: torch.Tensor, config: PrivacyConfig, state_id: int, denom: Any, C: float | torch.Tensor
) -> torch.Tensor:
    """grad + N(0, (σ_g·C / denom)²) per coordinate, once per parameter per backward."""
    sigma = config.gradient_noise_multiplier
    if sigma <= 0:
        return grad
    # not grad.new_full: a second reader of grad would keep the noise out of grad's buffer (noise_in_place)
    if isinstance(C, torch.Tensor):
        std = C.to(device=grad.device) * sigma
    else:
        std = torch.full((), float(sigma * C), dtype=torch.float32, device=grad.device)
    std = std / denom
    # contiguous: the op's input strides must match between tracing and run time under Inductor
    # (a convolution_backward weight gradient can come out with kernel-dependent strides).
    return torch.ops.grapefx.add_gaussian_noise(grad.contiguous(), std, state_id)
