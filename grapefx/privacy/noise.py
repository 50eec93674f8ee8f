"""Noise and per-sample-norm side channels, as custom ops the rewritten backward graph calls.

The graph cannot hold Python state, so each compiled model owns a `PrivacyState` registered under an
integer id; the ops look it up at run time. Noise comes from the state's own source, never from
torch's global RNG, so the user's dropout / data order are unaffected:

* default, CPU: the Philox kernel (`grapefx.privacy.native_noise`), keyed by the seed, one fresh
  counter stream per draw, added into the gradient in the same pass; without a C compiler, torch's
  seeded generator as on other devices;
* default, other devices: one seeded `torch.Generator` per device.
  Either way draws follow the graph's fixed order, so the same seed gives the same noise,
  consecutive steps get fresh, independent noise, and `rng_state_dict()` / `load_rng_state_dict()`
  let a checkpointed run continue with the exact noise an uninterrupted run would have drawn;
* secure (`secure=True`, `PrivacyConfig(secure_noise=True)`): every sample from the OS CSPRNG
  (`os.urandom`) through float64 Box–Muller (`grapefx.privacy.secure_rng`); not reproducible, no
  state to save.
"""

from __future__ import annotations

import itertools
import secrets
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from grapefx.privacy import native_noise
from grapefx.privacy.adaptive_clipping import ClipBoundState
from grapefx.privacy.secure_rng import secure_standard_normal

_STATES: weakref.WeakValueDictionary[int, PrivacyState] = weakref.WeakValueDictionary()
_ids = itertools.count(1)


@dataclass(eq=False)
class PrivacyState:
    """Run-time state shared by a compiled model's graphs."""

    seed: int | None = None
    secure: bool = False
    noise_enabled: bool = True  # off for all but the last micro-batch of a virtual batch
    # distributed mode: only one rank (rank 0) draws the noise of a logical step; the others count it
    noise_local: bool = True
    dist_denom: float = 1.0  # distributed mode: this step's global denominator / world size
    comm_bytes: int = 0  # bytes grapefx itself all-reduced (projected gradients, batch sizes)
    last_norms: torch.Tensor | None = None  # [B] per-sample norms of the whole gradient, last backward
    last_layer_norms: torch.Tensor | None = None  # [B, n_params] per-parameter norms, last backward
    param_names: list[str] = field(default_factory=list)
    pending_columns: dict[int, torch.Tensor] = field(default_factory=dict)
    # DP-GRAPE: logical steps completed (backwards with noise on), projection bookkeeping
    completed_steps: int = 0
    resample_every: int = 200
    projection_seed: int = 0
    projection_blocks: dict[int, int] = field(default_factory=dict)  # param index -> block of last use
    projected: dict[str, dict] = field(default_factory=dict)  # name -> {index, rank, dim, side}
    projected_grads: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> privatized Ĝ
    projected_partial: dict[str, bool] = field(default_factory=dict)  # Ĝ of an unfinished virtual batch
    backward_calls: int = 0
    noise_draws: int = 0  # noise tensors drawn so far (one per noised parameter per backward)
    philox_key: int | None = None  # CPU Philox kernel: the key (from the seed) and the streams drawn
    philox_streams: int = 0
    clip: ClipBoundState | None = None  # adaptive clipping: the bound and its update
    # a noise schedule: the current σ (None: the compiled one) and σ_g(current) / σ_g(compiled), by
    # which the noise ops scale the std the graphs pass them (so a new σ never recompiles)
    noise_multiplier: float | None = None
    noise_scale: float = 1.0
    id: int = field(default_factory=lambda: next(_ids))
    _generators: dict[torch.device, torch.Generator] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _STATES[self.id] = self

    def generator(self, device: torch.device) -> torch.Generator:
        """The seeded generator for `device` (created on first use from `seed`, or from `secrets` if
        no seed). In secure mode noise never comes from it; it is then a fresh `secrets`-seeded
        generator per call, for any non-secret randomness other code may want."""
        device = torch.device(device)
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

    def fill_standard_normal_(self, buf: torch.Tensor) -> torch.Tensor:
        """Fill `buf` with N(0, 1) samples: from the seeded generator, or the OS CSPRNG in secure mode."""
        if self.secure:
            return buf.copy_(secure_standard_normal(buf.shape, dtype=buf.dtype, device=buf.device))
        return buf.normal_(generator=self.generator(buf.device))

    def next_philox_draw(self) -> tuple[int, int]:
        """(key, stream) of the next CPU kernel draw: the key from the seed, a fresh stream each draw."""
        if self.philox_key is None:
            self.philox_key = self.seed if self.seed is not None else secrets.randbits(63)
        self.philox_streams += 1
        return self.philox_key, self.philox_streams - 1

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self._generators.clear()
        self.philox_key, self.philox_streams = None, 0

    def rng_state_dict(self) -> dict[str, Any]:
        """The noise RNG's state (seed and every device generator's `get_state()`), for checkpoints."""
        return {
            "seed": self.seed,
            "secure": self.secure,
            "generators": {str(dev): gen.get_state() for dev, gen in self._generators.items()},
            "philox": {"key": self.philox_key, "streams": self.philox_streams},
        }

    def load_rng_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the noise stream saved by `rng_state_dict()` (a generator not yet used when it was
        saved is re-created from the seed on first use, as it would have been)."""
        if bool(state["secure"]) != self.secure:
            raise ValueError(
                f"noise RNG state was saved with secure={state['secure']} but this model has secure={self.secure}"
            )
        self.seed = state["seed"]
        self._generators.clear()
        philox = state.get("philox", {"key": None, "streams": 0})  # absent: saved before the kernel
        self.philox_key, self.philox_streams = philox["key"], philox["streams"]
        if self.secure:
            return
        for dev, gen_state in state["generators"].items():
            gen = torch.Generator(device=torch.device(dev))
            gen.set_state(gen_state)
            self._generators[torch.device(dev)] = gen


def get_state(state_id: int) -> PrivacyState:
    state = _STATES.get(state_id)
    if state is None:
        raise RuntimeError(f"grapefx privacy state {state_id} no longer exists (model was freed)")
    return state


# On CPU the kernel adds the noise into the gradient in place: no temporary at all. Elsewhere (and in
# secure mode, or without the kernel) noise is drawn into one small scratch chunk at a time and added
# in place, so the only temporary is that chunk: a full-size draw would be a second gradient-sized
# buffer at the end of the backward, where the clipped sums are alive (it was M1's peak). Chunks are
# multiples of 16 elements and the last is at least 16, so on CPU the stream is the one a single
# full-size `normal_` gives (it draws 16 at a time, with a different path for fewer; tested).
_NOISE_CHUNK = {"cpu": 1 << 16, "cuda": 1 << 22}  # elements: L2-sized on CPU; few launches on GPU


def _native_kernel(device: torch.device, state: PrivacyState) -> native_noise.NativeNoise | None:
    if device.type != "cpu" or state.secure:
        return None
    return native_noise.kernel()


def noise_scratch_bytes(numel: int, dtype: torch.dtype, device: torch.device, state_id: int) -> int:
    """Bytes of temporary the noise of a (contiguous) gradient takes: 0 on the kernel's in-place
    float32/float64 path, else the scratch chunk (or, for another dtype, a float32 draw of it)."""
    state = _STATES.get(state_id) or PrivacyState()
    if _native_kernel(device, state) is not None:
        return 0 if dtype in native_noise.KERNEL_DTYPES else numel * 4
    return min(_NOISE_CHUNK.get(device.type, _NOISE_CHUNK["cuda"]) + 16, numel) * dtype.itemsize


def _add_noise_(grad: torch.Tensor, std: torch.Tensor, state: PrivacyState) -> None:
    """grad += std * N(0, I) in place (no-op for a micro-batch whose noise is off / drawn elsewhere)."""
    if not state.noise_enabled:
        return
    state.noise_draws += 1
    if not state.noise_local:  # distributed: rank 0 draws this step's noise, once for all ranks
        return
    if state.noise_scale != 1.0:
        std = std * state.noise_scale
    native = _native_kernel(grad.device, state)
    if native is not None:
        key, stream = state.next_philox_draw()
        if grad.dtype in native_noise.KERNEL_DTYPES and grad.is_contiguous():
            native.normal_(grad, key, stream, float(std), accumulate=True)
        else:  # bf16 / fp16, or a tensor the graph did not produce: draw in float32, then add
            grad.add_(native.normal_(torch.empty(grad.shape), key, stream, float(std), accumulate=False))
        return
    std = std.to(device=grad.device, dtype=grad.dtype)
    if not grad.is_contiguous():  # not produced by the graph (it hands the op contiguous tensors)
        grad.add_(state.fill_standard_normal_(torch.empty_like(grad)).mul_(std))
        return
    flat, n = grad.view(-1), grad.numel()
    step = _NOISE_CHUNK.get(grad.device.type, _NOISE_CHUNK["cuda"])
    scratch = torch.empty(min(step + 16, n), device=grad.device, dtype=grad.dtype)
    start = 0
    while start < n:
        end = start + step if n - start - step >= 16 else n  # no tail under 16: another code path
        chunk = flat[start:end]
        chunk.addcmul_(state.fill_standard_normal_(scratch[: end - start]), std)
        start = end


@torch.library.custom_op("grapefx::add_gaussian_noise", mutates_args=())
def add_gaussian_noise(grad: torch.Tensor, std: torch.Tensor, state_id: int) -> torch.Tensor:
    """grad + std * N(0, I), drawn from the privacy state's generator (std: a 0-d tensor, so a
    symbolic denominator can be folded in). The form the passes build and the inspection tools read;
    codegen turns it into `add_gaussian_noise_` where the input's buffer can be reused
    (`grapefx.passes.noise_in_place`)."""
    out = grad.clone(memory_format=torch.contiguous_format)
    _add_noise_(out, std, get_state(state_id))
    return out


@add_gaussian_noise.register_fake
def _(grad: torch.Tensor, std: torch.Tensor, state_id: int) -> torch.Tensor:
    return grad.new_empty(grad.shape)  # contiguous, as the real op returns (Inductor checks strides)


@torch.library.custom_op("grapefx::add_gaussian_noise_", mutates_args=("grad",))
def add_gaussian_noise_(grad: torch.Tensor, std: torch.Tensor, state_id: int) -> None:
    """In-place `add_gaussian_noise`: the same draws, into the clipped sum's own buffer."""
    _add_noise_(grad, std, get_state(state_id))


@add_gaussian_noise_.register_fake
def _(grad: torch.Tensor, std: torch.Tensor, state_id: int) -> None:
    return None


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


# A side effect for fx's dead-code elimination and Inductor's: an empty batch's record has no user,
# yet it is what counts the step (GRAPE's resampling, adaptive clipping) and empties the norms.
torch.fx.node.has_side_effect(torch.ops.grapefx.record_norms.default)


def _publish(state: PrivacyState, layer_norms: torch.Tensor) -> None:
    state.last_layer_norms = layer_norms
    state.last_norms = layer_norms.pow(2).sum(dim=1).sqrt()
    state.backward_calls += 1
    if state.clip is not None:
        state.clip.publish(state.last_norms, state)
    if state.noise_enabled:  # the last micro-batch of a logical batch: one logical step done
        state.completed_steps += 1


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


@torch.library.custom_op("grapefx::stash_projected", mutates_args=())
def stash_projected(grad: torch.Tensor, name: str, state_id: int) -> torch.Tensor:
    """Keep the privatized projected gradient Ĝ of `name` for GRAPE optimizers; returns a copy.

    Like p.grad, Ĝ accumulates over the micro-batches of a virtual batch (backwards with noise off,
    then the last one with noise on: the same P throughout); the first backward after a complete
    logical batch starts a new Ĝ, whether or not an optimizer consumed the previous one."""
    state = get_state(state_id)
    previous = state.projected_grads.get(name)
    if previous is not None and state.projected_partial.get(name, False):
        state.projected_grads[name] = previous + grad.detach()
    else:
        state.projected_grads[name] = grad.detach().clone()
    state.projected_partial[name] = not state.noise_enabled
    return grad.clone()


@stash_projected.register_fake
def _(grad: torch.Tensor, name: str, state_id: int) -> torch.Tensor:
    return torch.empty_like(grad)
