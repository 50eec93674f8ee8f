"""Noise schedules: σ changed between steps without recompiling, the noise drawn with the new σ,
the accountant composing each step with the σ it used (grapefx.privacy.schedulers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import grapefx
from grapefx.privacy.accounting import Accountant
from grapefx.privacy.engine import make_private
from grapefx.privacy.schedulers import ExponentialNoise, LambdaNoise, StepNoise


def _noise_std(cm: nn.Module, model: nn.Module) -> float:
    """The per-coordinate std of p.grad on an empty batch (pure noise; sum reduction) over C, the
    bound of that step (adaptive clipping moves it)."""
    model.zero_grad(set_to_none=True)
    C = cm.clip_bound()
    cm(torch.zeros(0, 100)).sum().backward()
    return float(torch.cat([p.grad.flatten() for p in model.parameters()]).std()) / C


@pytest.mark.parametrize("adaptive", [False, True])
def test_new_sigma_sets_the_noise_std_without_recompiling(adaptive: bool) -> None:
    from torch._dynamo.utils import counters

    model = nn.Linear(100, 200)  # 20,200 noised coordinates: the std is estimated to ~0.5%
    options = {"adaptive_clipping": {"count_noise_std": 10.0}, "expected_batch_size": 8} if adaptive else {}
    cm = grapefx.compile(model, max_grad_norm=1.0, noise_multiplier=1.0, loss_reduction="sum", seed=0, **options)
    sigma_g = cm.privacy_config.gradient_noise_multiplier_at  # σ_g: σ less adaptive clipping's count share
    cm(torch.randn(4, 100)).sum().backward()  # compiles the B>=2 graph too
    assert _noise_std(cm, model) == pytest.approx(sigma_g(1.0), rel=0.03)
    frames = counters["stats"]["unique_graphs"]
    cm.set_noise_multiplier(2.5)
    assert cm.noise_multiplier() == 2.5
    assert _noise_std(cm, model) == pytest.approx(sigma_g(2.5), rel=0.03)
    cm(torch.randn(4, 100)).sum().backward()
    assert counters["stats"]["unique_graphs"] == frames, "a new sigma must not recompile"


def test_schedulers_follow_their_formulas() -> None:
    model = nn.Linear(3, 2)
    cm = grapefx.compile(model, max_grad_norm=1.0, noise_multiplier=2.0)
    exp = ExponentialNoise(cm, gamma=0.5)
    assert [exp.step() for _ in range(3)] == [1.0, 0.5, 0.25] and cm.noise_multiplier() == 0.25
    cm.set_noise_multiplier(2.0)
    steps = StepNoise(cm, step_size=2, gamma=0.5)
    assert [steps.step() for _ in range(4)] == [2.0, 1.0, 1.0, 0.5]
    cm.set_noise_multiplier(2.0)
    lam = LambdaNoise(cm, lambda epoch: 1 + epoch)
    assert [lam.step() for _ in range(2)] == [4.0, 6.0]
    again = LambdaNoise(cm, lambda epoch: 1 + epoch)
    again.load_state_dict(lam.state_dict())
    assert again.noise_multiplier_at(3) == 8.0


def test_sigma_changes_are_refused_where_they_would_be_wrong() -> None:
    cm = grapefx.compile(nn.Linear(3, 2), max_grad_norm=1.0, noise_multiplier=0.0)
    with pytest.raises(grapefx.ConfigError, match="compiled without noise"):
        cm.set_noise_multiplier(1.0)
    cm = grapefx.compile(nn.Linear(3, 2), max_grad_norm=1.0, noise_multiplier=1.0)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(grapefx.ConfigError, match="finite number > 0"):
            cm.set_noise_multiplier(bad)
    ada = grapefx.compile(
        nn.Linear(3, 2), max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=8,
        adaptive_clipping={"count_noise_std": 1.0},
    )  # fmt: skip
    with pytest.raises(grapefx.ConfigError, match="count_noise_std > noise_multiplier / 2"):
        ada.set_noise_multiplier(2.0)


def _engine(sigma: float = 1.0):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    data = TensorDataset(x, (x[:, 0] > 0).long())
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return make_private(model, opt, DataLoader(data, batch_size=16), noise_multiplier=sigma, seed=0)


def _epoch(m, o, loader) -> None:
    for x, y in loader:
        F.cross_entropy(m(x), y).backward()
        o.step()
        o.zero_grad()


def test_engine_accounts_each_step_with_its_sigma_and_checkpoints_the_schedule(tmp_path) -> None:
    m, o, loader, engine = _engine()
    schedule = ExponentialNoise(engine, gamma=2.0)
    _epoch(m, o, loader)
    assert schedule.step() == 2.0 and engine.noise_multiplier == 2.0
    _epoch(m, o, loader)
    q, n = engine.sample_rate, engine.steps_per_epoch
    expected = Accountant()
    expected.step(1.0, q, n)
    expected.step(2.0, q, n)
    assert engine.accountant.history == expected.history
    assert engine.epsilon() == expected.epsilon(engine.target_delta)
    engine.save(tmp_path / "ckpt.pt")
    m2, o2, loader2, engine2 = _engine()
    engine2.load(tmp_path / "ckpt.pt")
    assert engine2.noise_multiplier == 2.0 and m2.privacy_state.noise_scale == 2.0


def test_engine_refuses_a_new_sigma_between_backward_and_step() -> None:
    m, o, loader, engine = _engine()
    x, y = next(iter(loader))
    F.cross_entropy(m(x), y).backward()
    with pytest.raises(RuntimeError, match="between logical steps"):
        engine.set_noise_multiplier(2.0)
    o.step()
    engine.set_noise_multiplier(2.0)
    assert engine.noise_multiplier == 2.0
