"""Losses that are sums of per-sample terms, as DP-SGD needs, for the cases torch's own are not.

`F.cross_entropy(logits, targets, ignore_index=..., reduction="mean")` divides by the number of
valid targets in the *whole batch*: one sample's padding rescales every other sample's gradient, so
the per-sample bound C no longer bounds what one sample can change. The functions here average each
sample's tokens over that sample's own valid count, then reduce over the batch as `loss_reduction`
says: "sum" adds the per-sample terms, "mean" divides their sum by this batch's size (grapefx then
divides by `expected_batch_size` instead, when given).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_token_mean(
    token_losses: torch.Tensor,
    valid: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """Σ_i (mean of sample i's valid token losses), reduced over the batch by `reduction`.

    token_losses: [B, ...] per-token losses (e.g. `F.cross_entropy(..., reduction="none")`).
    valid: a bool mask (or 0/1 weights) of the same shape; a sample with no valid token adds 0.
    reduction: "sum" or "mean" (÷ B): the `loss_reduction` the model was compiled with.
    """
    if token_losses.shape != valid.shape:
        raise ValueError(f"token_losses {tuple(token_losses.shape)} and valid {tuple(valid.shape)} differ in shape")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean' (grapefx's loss_reduction), got {reduction!r}")
    weights = valid.to(token_losses.dtype)
    token_dims = tuple(range(1, token_losses.dim()))
    count = weights.sum(dim=token_dims).clamp(min=1)  # per sample: no batch-wide count
    per_sample = (token_losses * weights).sum(dim=token_dims) / count
    total = per_sample.sum()
    if reduction == "sum":
        return total
    return total / max(token_losses.shape[0], 1)


def sequence_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Token cross-entropy with padding, DP-safe: each sequence's mean over its own non-ignored
    targets, then `reduction` over the batch. logits [B, T, V] (classes last), targets [B, T] with
    `ignore_index` marking padding."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be targets {tuple(targets.shape)} plus a last class dim")
    valid = targets != ignore_index
    token_losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index, reduction="none"
    ).view(targets.shape)
    return per_sample_token_mean(token_losses, valid, reduction)
