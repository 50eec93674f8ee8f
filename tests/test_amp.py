"""Mixed precision: the forward under `torch.autocast` (bfloat16 on CPU).

The float64 oracle does not apply (bfloat16 rounding alone moves these gradients by 1-10%), so the
checks are relative to plain autograd under the same autocast:
* with clipping off (C above every norm), grapefx's gradient is plain autograd's sum, to bfloat16
  rounding of a different summation order;
* with clipping on, dropping one sample moves the gradient by at most C, to bfloat16 precision of
  the norms (the clip factors come from bfloat16 products: ~1% relative).
The norm rules accumulate in float32 and must not trip over the statistics' dtypes: under autocast
the CPU layer-norm kernel returns float32 mean / rstd where the traced graph says bfloat16.
"""

from __future__ import annotations

import copy

import pytest
import torch
from oracle import oracle_grads
from zoo import case

import grapefx

MODELS = ["mlp", "layernorm", "norm_layouts", "groupnorm", "rmsnorm", "conv2d", "gpt"]


def _autocast_grads(model: torch.nn.Module, fwd, zc, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fwd(x)
    zc.loss(out.float(), y, "sum").backward()
    return {k: p.grad.double() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", MODELS)
def test_unclipped_gradient_equals_plain_autocast(name: str) -> None:
    zc = case(name)
    model = zc.make()
    x, y = zc.batch(6)
    plain_model = copy.deepcopy(model)
    plain = _autocast_grads(plain_model, plain_model, zc, x, y)
    cm = grapefx.compile(model, max_grad_norm=1e9, noise_multiplier=0.0, loss_reduction="sum")
    got = _autocast_grads(model, cm, zc, x, y)
    for k, g in got.items():
        assert g.dtype == plain[k].dtype and torch.isfinite(g).all(), k
        rel = (g - plain[k]).norm().item() / max(plain[k].norm().item(), 1e-12)
        assert rel < 2e-2, f"{name} {k}: |grapefx - plain| / |plain| = {rel:.3g} under bfloat16 autocast"
    norms = cm.per_sample_norms()
    _, ref_norms = oracle_grads(model, (x, y), lambda o, t: zc.loss(o, t, "sum"), 1.0, "sum")
    torch.testing.assert_close(norms.double(), ref_norms, rtol=5e-2, atol=1e-3)


@pytest.mark.parametrize("name", ["layernorm", "groupnorm"])
def test_sensitivity_under_autocast(name: str) -> None:
    zc = case(name)
    model = zc.make()
    x, y = zc.batch(5)
    _, norms = oracle_grads(model, (x, y), lambda o, t: zc.loss(o, t, "sum"), 1.0, "sum")
    C = float(norms.median())
    cm = grapefx.compile(model, max_grad_norm=C, noise_multiplier=0.0, loss_reduction="sum")

    def flat(idx: list[int]) -> torch.Tensor:
        return torch.cat([g.reshape(-1) for g in _autocast_grads(model, cm, zc, x[idx], y[idx]).values()])

    full = flat(list(range(5)))
    for j in range(5):
        d = (full - flat([i for i in range(5) if i != j])).norm().item()
        assert d <= C * 1.02, f"dropping sample {j} moved the gradient by {d:.5g} > C={C:.5g} (bfloat16 slack 2%)"
