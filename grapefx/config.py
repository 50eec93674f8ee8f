"""Privacy and compile options: frozen, validated dataclasses (no global mutable config)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from grapefx.errors import ConfigError
from grapefx.privacy.clip_groups import normalize_clip_groups

CLIPPING_MODES = ("flat", "per_layer", "group", "automatic")
REDUCTIONS = ("mean", "sum")
STRATEGIES = ("auto", "ghost", "instantiate", "grape")
CODEGENS = ("eager", "inductor")
MEMORY_POLICIES = ("min-memory", "balanced", "min-time")


@dataclass(frozen=True)
class AdaptiveClipping:
    """Adaptive clipping (Andrew et al., 2021, "Differentially Private Learning with Adaptive
    Clipping"): after every logical step the clip bound moves geometrically towards the
    `target_quantile` of the per-sample norms,

        C ← clamp(C · exp(−learning_rate · (b̃ − target_quantile)), min_clip, max_clip),
        b̃ = (Σ_i (1[‖g_i‖ ≤ C] − ½) + N(0, count_noise_std²)) / expected_batch_size + ½,

    the fraction of unclipped samples released with Gaussian noise (sensitivity ½). The noise of
    that count is paid for out of `noise_multiplier` σ: the gradient gets σ_g = (σ⁻² − (2·σ_b)⁻²)^-½,
    so the two releases together cost what one Gaussian mechanism with σ costs, and the accountant
    keeps using σ. `count_noise_std` σ_b defaults to expected_batch_size / 20 (the paper's choice).
    """

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_std: float | None = None
    min_clip: float = 0.0
    max_clip: float = math.inf

    def __post_init__(self) -> None:
        if not 0 < self.target_quantile < 1:
            raise ConfigError(f"adaptive clipping: target_quantile must be in (0, 1), got {self.target_quantile}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ConfigError(f"adaptive clipping: learning_rate must be > 0, got {self.learning_rate}")
        if self.count_noise_std is not None and not (math.isfinite(self.count_noise_std) and self.count_noise_std >= 0):
            raise ConfigError(f"adaptive clipping: count_noise_std must be >= 0, got {self.count_noise_std}")
        if not 0 <= self.min_clip <= self.max_clip:
            raise ConfigError(
                f"adaptive clipping: need 0 <= min_clip <= max_clip, got {self.min_clip}, {self.max_clip}"
            )


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
    # Flat / automatic clipping in two backward passes (passes/two_pass.py): the first computes only
    # the per-sample norms, the second replays the backward with the loss gradient weighted per
    # sample. For activation checkpointing: one pass must hold every layer's recomputed operands
    # until all norms are known, two passes hold what non-private training holds, for a second
    # backward (recomputation included).
    two_pass: bool = False
    # Data-parallel training (torch.distributed, model wrapped as DDP(grapefx.compile(model))): each
    # rank divides by a run-time denominator (global / world size, so DDP's averaging gives the global
    # result), only rank 0 adds noise, GRAPE's projected gradients are all-reduced in the backward.
    # Set by grapefx.compile (default: on when a process group is initialized); expected_batch_size
    # is then the expected *global* batch size.
    distributed: bool = False
    # Adaptive clipping (AdaptiveClipping, or a dict of its fields): `max_grad_norm` is the initial
    # bound, which then follows a quantile of the per-sample norms (flat clipping only; data-parallel:
    # the ranks' counts are summed).
    adaptive_clipping: AdaptiveClipping | None = None
    # clipping="group" (grapefx/privacy/clip_groups.py): "module" or name patterns per group; each
    # group is clipped on its own to C_g, sum of C_g^2 = C^2, in proportion to `clip_group_shares`
    # (one positive number per declared group; equal if None).
    clip_groups: Any = None
    clip_group_shares: tuple[float, ...] | None = None

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
        if self.two_pass and (self.clipping in ("per_layer", "group") or self.strategy == "grape"):
            raise ConfigError(
                "two_pass=True is for flat / automatic clipping with strategy 'auto', 'ghost' or "
                f"'instantiate' (got clipping={self.clipping!r}, strategy={self.strategy!r}); per-layer "
                "and group clipping need no second pass: they finish each group right after its own norms"
            )
        self._check_clip_groups()
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ConfigError(f"memory_budget must be a positive number of bytes, got {self.memory_budget}")
        if self.automatic_gamma <= 0:
            raise ConfigError(f"automatic_gamma must be > 0, got {self.automatic_gamma}")
        if isinstance(self.adaptive_clipping, dict):
            object.__setattr__(self, "adaptive_clipping", AdaptiveClipping(**self.adaptive_clipping))
        if self.adaptive_clipping is not None:
            self._check_adaptive_clipping()

    def _check_clip_groups(self) -> None:
        if self.clipping != "group":
            if self.clip_groups is not None or self.clip_group_shares is not None:
                raise ConfigError(f"clip_groups / clip_group_shares need clipping='group' (got {self.clipping!r})")
            return
        if not self.clip_groups:
            raise ConfigError(
                "clipping='group' needs clip_groups: grapefx.compile(model, clipping='group', "
                "clip_groups='module') or a list of groups of parameter name patterns"
            )
        groups = normalize_clip_groups(self.clip_groups)
        object.__setattr__(self, "clip_groups", groups)
        if self.clip_group_shares is not None:
            if groups == "module":
                raise ConfigError("clip_group_shares needs explicit clip_groups (not 'module'): one share per group")
            shares = tuple(self.clip_group_shares)
            numbers = all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in shares)
            if not numbers or len(shares) != len(groups) or not all(math.isfinite(s) and s > 0 for s in shares):
                raise ConfigError(
                    f"clip_group_shares needs one positive number per group ({len(groups)} groups), got {shares}"
                )
            object.__setattr__(self, "clip_group_shares", tuple(float(s) for s in shares))

    def _check_adaptive_clipping(self) -> None:
        if self.clipping != "flat":
            raise ConfigError(
                f"adaptive clipping adapts the bound of flat clipping; clipping={self.clipping!r} has no "
                "single bound to adapt (automatic clipping needs none): use clipping='flat'"
            )
        if self.expected_batch_size is None:
            raise ConfigError(
                "adaptive clipping needs expected_batch_size (the Poisson sampler's expected batch size; "
                "the global one in data-parallel training): "
                "the unclipped fraction is released relative to it, never to the actual (private) size. "
                "grapefx.make_private sets it."
            )
        if self.noise_multiplier > 0:
            count_std = self.count_noise_std
            if count_std <= 0 or self.noise_multiplier >= 2 * count_std:
                raise ConfigError(
                    f"adaptive clipping with noise_multiplier={self.noise_multiplier} needs "
                    f"count_noise_std > noise_multiplier / 2 (got {count_std}): the count's noise is paid out "
                    "of the gradient's, σ_g = (σ⁻² − (2·count_noise_std)⁻²)^-½. Raise count_noise_std "
                    "(default expected_batch_size / 20) or use a larger expected batch."
                )

    @property
    def count_noise_std(self) -> float:
        """σ_b of adaptive clipping's unclipped count (its default: expected_batch_size / 20)."""
        ada = self.adaptive_clipping
        if ada is None:
            return 0.0
        if ada.count_noise_std is not None:
            return float(ada.count_noise_std)
        return float(self.expected_batch_size or 0) / 20

    @property
    def gradient_noise_multiplier(self) -> float:
        """The σ the gradient's noise uses: `noise_multiplier`, less what adaptive clipping's count
        takes (σ_g = (σ⁻² − (2·σ_b)⁻²)^-½ ≥ σ)."""
        return self.gradient_noise_multiplier_at(float(self.noise_multiplier))

    def gradient_noise_multiplier_at(self, sigma: float) -> float:
        """σ_g for a noise multiplier σ (a noise schedule's current one): σ itself without adaptive
        clipping, else (σ⁻² − (2·σ_b)⁻²)^-½, which needs σ < 2·σ_b."""
        if self.adaptive_clipping is None or sigma == 0:
            return sigma
        if sigma >= 2 * self.count_noise_std:
            raise ConfigError(
                f"adaptive clipping with noise_multiplier={sigma} needs count_noise_std > noise_multiplier / 2 "
                f"(got {self.count_noise_std})"
            )
        return (sigma**-2 - (2 * self.count_noise_std) ** -2) ** -0.5

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
