"""Clip factors c_i from per-sample norms, folded with the loss scale into per-sample weights.

Per-sample gradients of the user's loss are `scale * (what the backward graph sees)`, where scale is
the batch size for a mean-reduced loss. The weighted sum is Σ c_i g_i / denom, so each site is
weighted by w_i = c_i * scale / denom. The norms are recorded (grapefx::record_norms) for monitoring.

Per-layer clipping splits the budget evenly: parameter p is clipped to C_p = C / sqrt(P), so the
whole gradient still has sensitivity C and noise of std σC keeps the stated guarantee.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from grapefx.config import PrivacyConfig

STABILITY = 1e-6


def clip_weights(
    norm_sq: list[torch.Tensor], batch_size: Any, config: PrivacyConfig, state_id: int
) -> tuple[list[torch.Tensor], Any]:
    mean = config.loss_reduction == "mean"
    scale = batch_size if mean else 1
    if not mean:
        denom = 1
    elif config.expected_batch_size is not None:
        denom = config.expected_batch_size
    else:
        denom = torch.sym_max(batch_size, 1) if isinstance(batch_size, torch.SymInt) else max(int(batch_size), 1)
    layer = torch.stack(norm_sq, dim=1).clamp_min(0).sqrt() * scale  # [B, P]
    layer = torch.ops.grapefx.record_norms(layer, state_id)
    C = float(config.max_grad_norm)
    if config.clipping == "per_layer":
        c_p = C / math.sqrt(len(norm_sq))
        factors = (c_p / (layer + STABILITY)).clamp(max=1.0)
        return [factors[:, j] * scale / denom for j in range(len(norm_sq))], denom
    total = layer.pow(2).sum(dim=1).sqrt()
    if config.clipping == "automatic":
        c = C / (total + config.automatic_gamma)
    else:
        c = (C / (total + STABILITY)).clamp(max=1.0)
    w = c * scale / denom
    return [w for _ in norm_sq], denom
