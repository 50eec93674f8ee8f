"""Noise schedules: change the noise multiplier σ as training goes on (as Opacus' noise schedulers).

Each scheduler wraps the object that owns σ, a `PrivacyEngine` from `make_private` (whose
accountant then composes every step with the σ it used) or a model from `grapefx.compile` (account
for yourself), and sets σ = σ₀·f(epoch) on each `step()`, σ₀ being σ when the scheduler was made.
Call `step()` once per epoch, after that epoch's last `optimizer.step()`. The graphs are not
recompiled: the noise ops scale the std they were compiled with.

A schedule changes the privacy spent: with `make_private(target_epsilon=...)`, σ was calibrated for
a constant σ, so read `engine.epsilon()` rather than trusting the target.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class _HasNoise(Protocol):
    @property
    def noise_multiplier(self) -> Any: ...

    def set_noise_multiplier(self, sigma: float) -> None: ...


def _current(target: Any) -> float:
    sigma = target.noise_multiplier
    return float(sigma() if callable(sigma) else sigma)


class NoiseScheduler:
    """Base class: `step()` advances the epoch counter and sets σ = `noise_multiplier_at(epoch)`."""

    def __init__(self, target: _HasNoise) -> None:
        self.target = target
        self.initial = _current(target)
        self.epoch = 0

    def noise_multiplier_at(self, epoch: int) -> float:
        raise NotImplementedError

    def step(self) -> float:
        """Advance one epoch; returns the σ now in force."""
        self.epoch += 1
        sigma = float(self.noise_multiplier_at(self.epoch))
        self.target.set_noise_multiplier(sigma)
        return sigma

    def state_dict(self) -> dict[str, Any]:
        return {"initial": self.initial, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initial, self.epoch = float(state["initial"]), int(state["epoch"])


class ExponentialNoise(NoiseScheduler):
    """σ = σ₀·γ^epoch."""

    def __init__(self, target: _HasNoise, gamma: float) -> None:
        super().__init__(target)
        self.gamma = gamma

    def noise_multiplier_at(self, epoch: int) -> float:
        return self.initial * self.gamma**epoch


class StepNoise(NoiseScheduler):
    """σ = σ₀·γ^(epoch // step_size)."""

    def __init__(self, target: _HasNoise, step_size: int, gamma: float) -> None:
        super().__init__(target)
        if step_size < 1:
            raise ValueError(f"step_size must be at least 1, got {step_size}")
        self.step_size, self.gamma = step_size, gamma

    def noise_multiplier_at(self, epoch: int) -> float:
        return self.initial * self.gamma ** (epoch // self.step_size)


class LambdaNoise(NoiseScheduler):
    """σ = σ₀·factor(epoch)."""

    def __init__(self, target: _HasNoise, factor: Callable[[int], float]) -> None:
        super().__init__(target)
        self.factor = factor

    def noise_multiplier_at(self, epoch: int) -> float:
        return self.initial * float(self.factor(epoch))
