"""Privacy and compile options: frozen, validated dataclasses (no global mutable config)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from grapefx.errors import ConfigError

CLIPPING_MODES = ("flat", "per_layer", "automatic")
REDUCTIONS = ("mean", "sum")
STRATEGIES = ("auto", "ghost", "instantiate", "grape")
CODEGENS = ("eager", "inductor")
MEMORY_POLICIES = ("min-memory", "balanced", "min-time")


@dataclass(frozen=True)
class PrivacyConfig:
    """How a backward pass is privatized.

    p.grad = (sum_i c_i * g_i + noise_multiplier * max_grad_norm * xi) / denom, with
    c_i = min(1, C / (||g_i|| + 1e-6)) (flat / per_layer) or C / (||g_i|| + gamma) (automatic);
    denom = 1 for "sum", the batch size (or `expected_batch_size`) for "mean".
    """

    max_grad_norm: float = 1.0
    noise_multiplier: float = 1.0
    loss_reduction: str = "mean"
    clipping: str = "flat"
    strategy: str = "auto"  # per-layer norm method: auto (cost model) / ghost / instantiate / grape
    expected_batch_size: int | None = None
    automatic_gamma: float = 0.01
    seed: int | None = None
    codegen: str = "eager"
    secure_noise: bool = False
    # DP-GRAPE (strategy="grape"): rank of the random projection, how often P is resampled, and which
    # parameters are projected (names; grapefx.compile fills it from the default policy).
    rank: int = 16
    resample_every: int = 200
    grape_params: tuple[str, ...] | None = None
    # Memory plan of the private backward (grapefx/passes/schedule_memory.py): every policy reorders
    # nodes for a lower peak; "balanced" / "min-memory" also swap instantiated per-sample gradients
    # live at the peak for ghost norms (more flops, fewer bytes) and replay saved activations after
    # the barrier; `memory_budget` (bytes of the backward's estimated peak) plans until it fits.
    memory_policy: str = "balanced"
    memory_budget: int | None = None
    # Data-parallel training (torch.distributed, model wrapped as DDP(grapefx.compile(model))): each
    # rank divides by a run-time denominator (global / world size, so DDP's averaging gives the global
    # result), only rank 0 adds noise, GRAPE's projected gradients are all-reduced in the backward.
    # Set by grapefx.compile (default: on when a process group is initialized); expected_batch_size
    # is then the expected *global* batch size.
    distributed: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm > 0):
            raise ConfigError(f"max_grad_norm must be a positive number, got {self.max_grad_norm!r}")
        if not (isinstance(self.noise_multiplier, (int, float)) and self.noise_multiplier >= 0):
            raise ConfigError(f"noise_multiplier must be >= 0, got {self.noise_multiplier!r}")
        if not math.isfinite(self.noise_multiplier) or not math.isfinite(self.max_grad_norm):
            raise ConfigError("max_grad_norm and noise_multiplier must be finite")
        for name, allowed in (
            ("loss_reduction", REDUCTIONS),
            ("clipping", CLIPPING_MODES),
            ("strategy", STRATEGIES),
            ("codegen", CODEGENS),
            ("memory_policy", MEMORY_POLICIES),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
        if self.expected_batch_size is not None and self.expected_batch_size <= 0:
            raise ConfigError(f"expected_batch_size must be positive, got {self.expected_batch_size}")
        if self.rank < 1 or self.resample_every < 1:
            raise ConfigError(f"rank and resample_every must be >= 1, got {self.rank}, {self.resample_every}")
        if self.strategy == "grape" and self.grape_params is None:
            raise ConfigError(
                "strategy='grape' needs the projected parameter names: use grapefx.compile(model, "
                "strategy='grape', ...) (default policy) or pass grape_params=(...)"
            )
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ConfigError(f"memory_budget must be a positive number of bytes, got {self.memory_budget}")
        if self.automatic_gamma <= 0:
            raise ConfigError(f"automatic_gamma must be > 0, got {self.automatic_gamma}")

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> PrivacyConfig:
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown grapefx option(s) {unknown}; known options: {sorted(known)}")
        return cls(**options)

    def with_(self, **changes: Any) -> PrivacyConfig:
        return replace(self, **changes)
