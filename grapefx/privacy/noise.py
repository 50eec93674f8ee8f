"""Noise and per-sample-norm side channels, as custom ops the rewritten backward graph calls.

The graph cannot hold Python state, so each compiled model owns a `PrivacyState` registered under an
integer id; the ops look it up at run time. Noise comes from the state's own generator (seeded and
reproducible, or `secrets`-seeded fresh per draw in secure mode), never from torch's global RNG, so
the user's dropout / data order are unaffected. Draws follow the graph's fixed order, so the same seed
gives the same noise and consecutive steps get fresh, independent noise.
"""

from __future__ import annotations

import itertools
import secrets
import weakref
from dataclasses import dataclass, field

import torch

_STATES: weakref.WeakValueDictionary[int, PrivacyState] = weakref.WeakValueDictionary()
_ids = itertools.count(1)


@dataclass(eq=False)
class PrivacyState:
    """Run-time state shared by a compiled model's graphs."""

    seed: int | None = None
    secure: bool = False
    noise_enabled: bool = True  # off for all but the last micro-batch of a virtual batch
    last_norms: torch.Tensor | None = None  # [B] per-sample norms of the whole gradient, last backward
    last_layer_norms: torch.Tensor | None = None  # [B, n_params] per-parameter norms, last backward
    param_names: list[str] = field(default_factory=list)
    pending_columns: dict[int, torch.Tensor] = field(default_factory=dict)
    backward_calls: int = 0
    id: int = field(default_factory=lambda: next(_ids))
    _generators: dict[torch.device, torch.Generator] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _STATES[self.id] = self

    def generator(self, device: torch.device) -> torch.Generator:
        if self.secure:
            g = torch.Generator(device=device)
            g.manual_seed(secrets.randbits(63))
            return g
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed if self.seed is not None else secrets.randbits(63))
            self._generators[device] = gen
        return gen

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self._generators.clear()


def get_state(state_id: int) -> PrivacyState:
    state = _STATES.get(state_id)
    if state is None:
        raise RuntimeError(f"grapefx privacy state {state_id} no longer exists (model was freed)")
    return state


@torch.library.custom_op("grapefx::add_gaussian_noise", mutates_args=())
def add_gaussian_noise(grad: torch.Tensor, std: torch.Tensor, state_id: int) -> torch.Tensor:
    """grad + std * N(0, I), drawn from the privacy state's generator (std: a 0-d tensor, so a
    symbolic denominator can be folded in). Fused: one allocation, no separate add pass."""
    state = get_state(state_id)
    if not state.noise_enabled:
        return grad.clone()
    out = torch.randn(grad.shape, generator=state.generator(grad.device), device=grad.device, dtype=grad.dtype)
    return out.mul_(std.to(grad.dtype)).add_(grad)


@add_gaussian_noise.register_fake
def _(grad: torch.Tensor, std: torch.Tensor, state_id: int) -> torch.Tensor:
    return torch.empty_like(grad)


@torch.library.custom_op("grapefx::record_norms", mutates_args=())
def record_norms(norms: torch.Tensor, first_column: int, n_columns: int, state_id: int) -> torch.Tensor:
    """Keep per-sample norms ([B, k]: columns first_column.. of [B, n_columns]) for monitoring.

    Returns a copy that the clip factors are computed from, so the op stays in the graph. Per-layer
    clipping records one column per parameter as each finishes; flat clipping all at once.
    """
    state = get_state(state_id)
    if not bool(torch.isfinite(norms).all()):
        _raise_non_finite(norms, first_column, state)
    if first_column == 0 and norms.shape[1] == n_columns:  # flat clipping: all at once
        _publish(state, norms.detach().clone())
    else:
        for j in range(norms.shape[1]):
            state.pending_columns[first_column + j] = norms[:, j].detach().clone()
        if len(state.pending_columns) == n_columns:
            _publish(state, torch.stack([state.pending_columns[j] for j in range(n_columns)], dim=1))
            state.pending_columns = {}
    return norms.clone()


@record_norms.register_fake
def _(norms: torch.Tensor, first_column: int, n_columns: int, state_id: int) -> torch.Tensor:
    return torch.empty_like(norms)


def _publish(state: PrivacyState, layer_norms: torch.Tensor) -> None:
    state.last_layer_norms = layer_norms
    state.last_norms = layer_norms.pow(2).sum(dim=1).sqrt()
    state.backward_calls += 1


def _raise_non_finite(norms: torch.Tensor, first_column: int, state: PrivacyState) -> None:
    state.pending_columns = {}
    bad = ~torch.isfinite(norms)
    samples = bad.any(dim=1).nonzero().flatten().tolist()
    cols = [first_column + c for c in bad.any(dim=0).nonzero().flatten().tolist()]
    names = [state.param_names[c] if c < len(state.param_names) else f"#{c}" for c in cols]
    raise FloatingPointError(
        f"grapefx: non-finite per-sample gradient norm for sample(s) {samples[:10]} in parameter(s) "
        f"{names[:10]}. Clipping cannot bound a NaN/inf gradient, so no update was produced: check "
        "these samples' inputs/labels for NaN or inf, lower the learning rate, or use a loss scaler."
    )
