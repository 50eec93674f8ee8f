"""Adaptive clipping (Andrew et al. 2021): the bound's update, its noise, and the gradient it clips.

The oracle is the same as everywhere (torch.func per-sample gradients, float64) at the bound the
update rule predicts from the previous steps' norms; the count's noise is checked by its spread.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from oracle import assert_grads_match, oracle_grads
from test_engine import _fresh, _train

import grapefx
from grapefx.errors import ConfigError


def _mlp(seed: int = 0, d_in: int = 10, hidden: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, 5))


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="sum")


def _next_bound(C: float, unclipped: float, m: int, lr: float, quantile: float, lo: float, hi: float) -> float:
    """The update rule, written out: unclipped = Σ (1[‖g_i‖ ≤ C] − ½) of the logical step."""
    return min(max(C * math.exp(-lr * (unclipped / m + 0.5 - quantile)), lo), hi)


@pytest.mark.parametrize("codegen", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_bound_follows_the_update_rule_and_gradients_match_the_oracle(codegen: str) -> None:
    """Noise off (σ = 0, count noise 0): each step clips to the bound the rule predicts from the
    previous steps (also across the B=1 and B=0 graphs, which count as steps), and the gradient is
    the oracle's at that bound. max_clip caps the growth."""
    model = _mlp()
    m, lr, quantile, hi = 6, 0.3, 0.7, 2.0
    ada = {"target_quantile": quantile, "learning_rate": lr, "count_noise_std": 0.0, "max_clip": hi}
    cm = grapefx.compile(
        model,
        max_grad_norm=1.0,
        noise_multiplier=0.0,
        loss_reduction="sum",
        expected_batch_size=m,
        adaptive_clipping=ada,
        codegen=codegen,
    )
    C, expected_history = 1.0, []
    g = torch.Generator().manual_seed(0)
    for B in (6, 5, 1, 0, 7, 6):
        x, y = torch.randn(B, 10, generator=g) * 2, torch.randint(0, 5, (B,), generator=g)
        assert cm.clip_bound() == pytest.approx(C, rel=1e-9)
        model.zero_grad(set_to_none=True)
        _loss(cm(x), y).backward()
        unclipped = 0.0
        if B:
            ref, norms = oracle_grads(model, (x, y), _loss, C, "sum")
            assert_grads_match(model, ref)
            unclipped = float((norms <= C).sum()) - B / 2
        expected_history.append(C)
        C = _next_bound(C, unclipped, m, lr, quantile, 0.0, hi)
    assert cm.clip_bound_history() == pytest.approx(expected_history, rel=1e-9)
    assert cm.clip_bound() == pytest.approx(C, rel=1e-9)
    assert len(set(expected_history)) > 3 and max(expected_history) == pytest.approx(hi), expected_history


def test_virtual_batch_counts_every_micro_batch_once() -> None:
    """Micro-batches with noise off, then the last with noise on: one update, from the count over
    the whole logical batch, equal to one backward on it."""
    x, y = torch.randn(7, 10) * 2, torch.randint(0, 5, (7,))
    opts = dict(max_grad_norm=2.5, noise_multiplier=0.0, loss_reduction="sum", expected_batch_size=7)
    ada = {"count_noise_std": 0.0, "learning_rate": 0.5}
    split, whole = _mlp(), _mlp()
    cs = grapefx.compile(split, adaptive_clipping=ada, **opts)
    cw = grapefx.compile(whole, adaptive_clipping=ada, **opts)
    for lo, hi, last in ((0, 3, False), (3, 7, True)):
        cs.set_noise_enabled(last)
        _loss(cs(x[lo:hi]), y[lo:hi]).backward()
    _loss(cw(x), y).backward()
    assert cs.clip_bound_history() == cw.clip_bound_history() == [2.5]
    assert cs.clip_bound() == pytest.approx(cw.clip_bound(), rel=1e-12) and cs.clip_bound() != 2.5
    for a, b in zip(split.parameters(), whole.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_gradient_noise_is_what_the_count_leaves_of_sigma() -> None:
    """σ = 1 with count noise σ_b = 2: the gradient's noise has std σ_g·C/m per coordinate,
    σ_g = (σ⁻² − (2σ_b)⁻²)^-½ ≈ 1.033 (the accountant keeps σ = 1)."""
    sigma, count_std, C, m = 1.0, 2.0, 0.5, 4
    x, y = torch.randn(4, 200), torch.randint(0, 5, (4,))
    grads, configs = [], []
    for noise in (sigma, 0.0):
        model = _wide_init()
        cm = grapefx.compile(
            model,
            max_grad_norm=C,
            noise_multiplier=noise,
            expected_batch_size=m,
            seed=4,
            adaptive_clipping={"count_noise_std": count_std},
        )
        F.cross_entropy(cm(x), y).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        configs.append(cm.privacy_config)
    sigma_g = (sigma**-2 - (2 * count_std) ** -2) ** -0.5
    assert configs[0].gradient_noise_multiplier == pytest.approx(sigma_g)
    std = (grads[0] - grads[1]).double().std().item()
    assert std == pytest.approx(sigma_g * C / m, rel=0.02), (std, sigma_g * C / m, sigma * C / m)


def _wide_init() -> nn.Module:
    torch.manual_seed(9)
    return nn.Sequential(nn.Linear(200, 100), nn.Tanh(), nn.Linear(100, 5))


def test_count_noise_has_std_count_noise_std_and_follows_the_seed() -> None:
    """Every sample clipped (norms ≫ C, a tiny learning rate keeps them so): the log-step of the
    bound is −lr·(σ_b·z/m − quantile) with z ~ N(0, 1), so its spread measures the count's noise.
    The same seed repeats the bounds; another seed does not."""
    m, count_std, lr, quantile, steps = 8, 4.0, 1e-3, 0.5, 200

    def run(seed: int) -> list[float]:
        model = _mlp(seed=1)
        cm = grapefx.compile(
            model,
            max_grad_norm=1e-4,
            noise_multiplier=0.0,
            loss_reduction="sum",
            expected_batch_size=m,
            seed=seed,
            adaptive_clipping={"count_noise_std": count_std, "learning_rate": lr, "target_quantile": quantile},
        )
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            x, y = torch.randn(m, 10, generator=g) * 3, torch.randint(0, 5, (m,), generator=g)
            _loss(cm(x), y).backward()
        assert (cm.per_sample_norms() > 100 * cm.clip_bound()).all()
        return cm.clip_bound_history() + [cm.clip_bound()]

    bounds = torch.tensor(run(seed=3), dtype=torch.float64)
    z = (-torch.log(bounds[1:] / bounds[:-1]) / lr + quantile) * m / count_std  # the standard normal draws
    assert z.std().item() == pytest.approx(1.0, abs=0.15)
    assert abs(z.mean().item()) < 4 / math.sqrt(steps)
    assert run(seed=3) == bounds.tolist()
    assert run(seed=5) != bounds.tolist()


def test_make_private_resumes_the_bound_from_a_checkpoint(tmp_path) -> None:
    """make_private(adaptive_clipping=...): 11 logical steps straight, or 5, save, load, 6 more, give
    the same bounds and parameters (the bound and the count's noise stream are in the checkpoint)."""
    torch.manual_seed(123)
    model_a, (m, o, loader, engine) = _fresh(adaptive_clipping={"learning_rate": 0.5})
    _train(m, o, loader, engine, 11)
    bounds_a, params_a = m.clip_bound_history(), [p.detach().clone() for p in model_a.parameters()]
    assert len(bounds_a) == 11 and len(set(bounds_a)) == 11
    torch.manual_seed(123)
    _, (m, o, loader, engine) = _fresh(adaptive_clipping={"learning_rate": 0.5})
    _train(m, o, loader, engine, 5)
    engine.save(tmp_path / "ckpt.pt")
    model_c, (m, o, loader, engine) = _fresh(model_seed=7, adaptive_clipping={"learning_rate": 0.5})
    engine.load(tmp_path / "ckpt.pt")
    _train(m, o, loader, engine, 11)
    assert m.clip_bound_history() == bounds_a
    for a, c in zip(params_a, model_c.parameters()):
        assert torch.equal(a, c)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"clipping": "per_layer"}, "clipping='per_layer' has no single bound"),
        ({"clipping": "automatic"}, "clipping='automatic' has no single bound"),
        ({"expected_batch_size": None}, "needs expected_batch_size"),
        (
            {"noise_multiplier": 1.0, "adaptive_clipping": {"count_noise_std": 0.4}},
            "count_noise_std > noise_multiplier / 2",
        ),
        ({"noise_multiplier": 1.0, "expected_batch_size": 8}, r"got 0.4\)"),  # default σ_b = 8 / 20
        ({"adaptive_clipping": {"target_quantile": 1.0}}, "target_quantile must be in"),
        ({"adaptive_clipping": {"min_clip": 2.0, "max_clip": 1.0}}, "min_clip <= max_clip"),
    ],
)
def test_settings_that_are_refused(options: dict, match: str) -> None:
    kwargs = {"noise_multiplier": 0.0, "expected_batch_size": 64, "adaptive_clipping": {}, **options}
    with pytest.raises(ConfigError, match=match):
        grapefx.compile(_mlp(), **kwargs)


def test_bound_is_constant_without_adaptive_clipping() -> None:
    cm = grapefx.compile(_mlp(), max_grad_norm=0.8, noise_multiplier=0.0)
    _loss(cm(torch.randn(3, 10)), torch.randint(0, 5, (3,))).backward()
    assert cm.clip_bound() == 0.8 and cm.clip_bound_history() == []
