"""Dropout in training mode: the clipped sum against the oracle with the very masks the step drew.

grapefx draws dropout masks from torch's global RNG exactly as eager PyTorch does (so the same seed
gives the same masks). The oracle cannot draw them itself (vmap would draw other ones), so the
masks are recorded from an eager run under the same seed and fed to a mask-taking copy of the model
as a per-sample input: each sample's gradient is then a deterministic function, clipped and summed
in float64 by hand.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from oracle import assert_grads_match, oracle_grads

import grapefx

P = 0.3
SEED = 123


class DropNet(nn.Module):
    """Linear -> GELU -> dropout -> Linear on [B, T, d] tokens; `mask` replaces the dropout draw.
    `checkpointed`: the first three under activation checkpointing while compiled, so the backward
    recomputes the dropout and must replay the mask the forward drew (eagerly: run plainly)."""

    def __init__(self, d: int = 8, h: int = 16, n_out: int = 5, checkpointed: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.drop = nn.Dropout(P)
        self.fc2 = nn.Linear(h, n_out)
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None and self.checkpointed and torch.compiler.is_compiling():
            h = torch.utils.checkpoint.checkpoint(self._dropped, x, use_reentrant=False)
        elif mask is None:
            h = self._dropped(x)
        else:
            h = F.gelu(self.fc1(x)) * mask
        return self.fc2(h).mean(1)

    def _dropped(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(F.gelu(self.fc1(x)))


def _recorded_mask(model: DropNet, x: torch.Tensor) -> torch.Tensor:
    """The dropout scale-and-mask ([B, T, h], values 0 or 1/(1-p)) an eager step under SEED draws."""
    seen: list[torch.Tensor] = []
    hook = model.drop.register_forward_hook(lambda m, inp, out: seen.append(out / inp[0]))
    torch.manual_seed(SEED)
    with torch.no_grad():
        model(x)
    hook.remove()
    return torch.nan_to_num(seen[0], nan=0.0)  # 0/0 where the GELU output is exactly 0


class _WithMask(nn.Module):
    """The oracle's view: one input [B, T, d + h] holding x and the sample's mask."""

    def __init__(self, net: DropNet, d: int) -> None:
        super().__init__()
        self.net, self.d = net, d

    def forward(self, xm: torch.Tensor) -> torch.Tensor:
        return self.net(xm[..., : self.d], xm[..., self.d :])


@pytest.mark.parametrize("codegen", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_dropout_matches_oracle_with_the_drawn_masks(codegen: str) -> None:
    check_dropout_against_oracle(codegen)


@pytest.mark.parametrize("codegen", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_checkpointed_dropout_replays_the_drawn_masks(codegen: str) -> None:
    """Activation checkpointing recomputes the dropout in the backward, through torch's RNG-state
    replay (analysis/rng_replay.py): a fresh draw there would not match the oracle."""
    check_dropout_against_oracle(codegen, checkpointed=True)


def check_dropout_against_oracle(codegen: str, device: str = "cpu", checkpointed: bool = False) -> None:
    torch.manual_seed(0)
    model = DropNet(checkpointed=checkpointed).to(device)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 4, 8, generator=g) * 2, torch.randint(0, 5, (6,), generator=g)
    x, y = x.to(device), y.to(device)
    mask = _recorded_mask(copy.deepcopy(model), x)
    assert (mask == 0).any() and (mask > 1).any(), "the dropout must drop and scale"

    def loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, t, reduction="sum")

    oracle_model = _WithMask(model, 8)
    _, norms = oracle_grads(oracle_model, (torch.cat([x, mask], -1), y), loss, 1.0, "sum")
    C = float(norms.median())
    ref, _ = oracle_grads(oracle_model, (torch.cat([x, mask], -1), y), loss, C, "sum")
    ref = {k.removeprefix("net."): v for k, v in ref.items()}

    cm = grapefx.compile(model, max_grad_norm=C, noise_multiplier=0.0, loss_reduction="sum", codegen=codegen)
    torch.manual_seed(SEED)
    loss(cm(x), y).backward()
    assert (norms > C * 1.01).any() and (norms < C * 0.99).any()
    torch.testing.assert_close(cm.per_sample_norms().double(), norms, rtol=1e-4, atol=1e-6)
    assert_grads_match(model, ref)
