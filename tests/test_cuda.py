"""The zoo on a CUDA device: oracle, sensitivity and noise checks, both codegens.

These run only where torch sees a GPU (CI's machines have none; the README says how to run them on
one). They are the CPU suite's checks with the model, the batch and the oracle on the GPU:
float64 oracle on the device, 1e-5 norm-relative error per parameter, as on CPU.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_dropout import check_dropout_against_oracle
from test_grape import check_projected_gradients
from test_sensitivity import flat_grad, median_norm
from test_zoo_oracle import run_against_oracle
from zoo import ZOO, case

import grapefx

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)")
DEV = "cuda"


@pytest.fixture(autouse=True)
def true_float32():
    """cuDNN convolutions default to TF32 (a 10-bit mantissa, ~1e-3 relative error): the oracle's
    float32 tolerance needs full float32 products, so TF32 is off here and restored after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("codegen", ["eager", "inductor"])
@pytest.mark.parametrize("zc", [pytest.param(c, id=c.name) for c in ZOO])
def test_zoo_on_cuda(zc, codegen: str) -> None:
    run_against_oracle(zc, reduction="mean", codegen=codegen, device=DEV)


@pytest.mark.parametrize("strategy", ["ghost", "instantiate"])
@pytest.mark.parametrize("name", ["linear3d", "long_tokens", "gpt_tied", "conv2d"])
def test_strategies_on_cuda(name: str, strategy: str) -> None:
    run_against_oracle(case(name), reduction="sum", strategy=strategy, device=DEV)


@pytest.mark.parametrize("clipping", ["per_layer", "automatic"])
@pytest.mark.parametrize("name", ["mlp", "conv2d", "gpt"])
def test_clipping_modes_on_cuda(name: str, clipping: str) -> None:
    run_against_oracle(case(name), reduction="sum", clipping=clipping, device=DEV)


def test_loss_inside_on_cuda() -> None:
    run_against_oracle(case("gpt"), reduction="mean", loss_inside=True, codegen="inductor", device=DEV)


@pytest.mark.parametrize("codegen", ["eager", "inductor"])
@pytest.mark.parametrize("factory", ["mlp", "lm"])
def test_grape_on_cuda(factory: str, codegen: str) -> None:
    """DP-GRAPE: projected gradients and their back-projection against the dense reference."""
    check_projected_gradients(factory, "mean", device=DEV, codegen=codegen)


@pytest.mark.parametrize("codegen", ["eager", "inductor"])
def test_dropout_on_cuda(codegen: str) -> None:
    """Dropout masks drawn on the device, the clipped sum against the oracle given those masks."""
    check_dropout_against_oracle(codegen, device=DEV)


@pytest.mark.parametrize("codegen", ["eager", "inductor"])
@pytest.mark.parametrize("name", ["mlp", "conv2d", "gpt"])
def test_remove_one_sensitivity_on_cuda(name: str, codegen: str) -> None:
    zc = case(name)
    model = zc.make().to(DEV)
    x, y = (t.to(DEV) for t in zc.batch(6))
    C, norms = median_norm(model, zc, x, y)
    assert (norms > C * 1.01).any()
    cm = grapefx.compile(model, max_grad_norm=C, noise_multiplier=0.0, loss_reduction="sum", codegen=codegen)

    def grad_of(keep: list[int]) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        zc.loss(cm(x[keep]), y[keep], "sum").backward()
        return flat_grad(model)

    full = grad_of(list(range(6)))
    diffs = torch.tensor([(full - grad_of([i for i in range(6) if i != j])).norm().item() for j in range(6)])
    assert (diffs <= C * (1 + 1e-4) + 1e-6).all(), (diffs, C)
    expected = torch.minimum(norms.cpu(), torch.full((6,), C, dtype=norms.dtype))
    torch.testing.assert_close(diffs.double(), expected, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("codegen", ["eager", "inductor"])
def test_noise_on_cuda(codegen: str) -> None:
    """std sigma*C/B per coordinate, Gaussian, drawn on the device; same seed -> same noise, next
    step -> fresh noise."""
    sigma, C, B, D = 1.3, 0.7, 8, 512
    torch.manual_seed(0)
    base = nn.Linear(D, D).to(DEV)
    g = torch.Generator().manual_seed(42)
    x, y = torch.randn(B, D, generator=g).to(DEV), torch.randn(B, D, generator=g).to(DEV)

    def grads(noise: float, seed: int, steps: int) -> list[torch.Tensor]:
        m = copy.deepcopy(base)
        cm = grapefx.compile(m, max_grad_norm=C, noise_multiplier=noise, seed=seed, codegen=codegen)
        out = []
        for _ in range(steps):
            m.zero_grad(set_to_none=True)
            F.mse_loss(cm(x), y).backward()
            assert all(p.grad.device.type == "cuda" for p in m.parameters())
            out.append(flat_grad(m))
        return out

    (clean,) = grads(0.0, 0, 1)
    n1, n2 = (g - clean for g in grads(sigma, 3, 2))
    (n1_again,) = (g - clean for g in grads(sigma, 3, 1))
    std = sigma * C / B
    assert n1.std().item() == pytest.approx(std, rel=0.02)
    assert abs(n1.mean().item()) < 5 * std / math.sqrt(n1.numel())
    assert ((n1 / std).abs() < 1).double().mean().item() == pytest.approx(0.6827, abs=0.01)
    torch.testing.assert_close(n1, n1_again)
    corr = float(torch.corrcoef(torch.stack([n1, n2]))[0, 1])
    assert abs(corr) < 0.02, corr
