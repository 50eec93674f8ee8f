"""The private training loop: `make_private` turns (model, optimizer, loader) into DP-SGD training.

    model, optimizer, loader, engine = grapefx.make_private(
        model, optimizer, loader, target_epsilon=3.0, target_delta=1e-5, epochs=10, max_grad_norm=1.0)
    for epoch in range(10):
        for x, y in loader:                        # Poisson-sampled batches of varying size
            loss = F.cross_entropy(model(x), y)    # mean over the batch
            loss.backward(); optimizer.step(); optimizer.zero_grad()
        print(engine.epsilon())                    # spent so far, at target_delta
    engine.save("ckpt.pt")

What each returned object does:

* ``model`` — the `PrivateModule` (`grapefx.compile`, ``loss_reduction="mean"``, ``expected_batch_size``
  = the expected *logical* batch size q·N): after ``loss.backward()`` every ``p.grad`` holds the
  clipped per-sample gradients summed, divided by q·N, plus noise (on the last micro-batch only).
* ``loader`` — a `DPDataLoader`: each epoch is ``round(1/q)`` logical batches, each example joining each
  one with probability ``q = loader.batch_size * accumulation_steps / len(dataset)``.
* ``optimizer`` — a `DPOptimizer` around yours: ``step()`` applies the update and counts one logical
  step in the accountant; in the middle of a logical batch ``step()`` and ``zero_grad()`` do nothing.
* ``engine`` — a `PrivacyEngine`: ``epsilon()``, ``accountant``, ``noise_multiplier``, ``sample_rate``,
  ``steps``, ``save()`` / ``load()``.

**Virtual (accumulated) batches.** ``accumulation_steps=k`` makes the logical batch k times
``loader.batch_size`` (in expectation) and hands it to the loop as k micro-batches;
``max_physical_batch_size=m`` (alone or with k) caps micro-batches at m samples. The loop does not
change: the loader tells the engine which micro-batch is the last of its logical batch, and

- every micro-batch is clipped per sample (clipping is per sample, so splitting changes nothing);
- noise is added only in the backward of the last micro-batch, once per logical batch;
- ``p.grad`` accumulates across the micro-batches' backwards as usual in torch; ``optimizer.step()``
  and ``optimizer.zero_grad()`` are no-ops until the last micro-batch, so the user's per-iteration
  ``step(); zero_grad()`` does the right thing;
- the denominator is the expected logical batch size, so the accumulated gradient equals that of
  one big batch; the accountant counts logical steps only (``engine.is_last_micro_batch`` tells a
  per-step LR scheduler when a real step happened).

**Guards** (errors rather than silent privacy bugs): ``optimizer.step()`` refuses to apply a gradient
on which no noise was drawn since the last step (``backward()`` not called, or called on another
model), or on which noise was drawn for more than one backward (an extra ``backward()`` per batch,
which the accountant would not count); closures (several backwards per step) are refused; a noised
gradient that reached ``p.grad`` but was zeroed or left behind without a step is still counted (with
a warning: whoever reads ``p.grad`` sees it); breaking out of the loader in the middle of a logical
batch zeroes its partial, un-noised gradient.

**Secure mode** (``secure_mode=True``): noise and Poisson sampling draw from the OS CSPRNG
(``os.urandom``; see `secure_rng`); seeds are ignored for both and runs are not reproducible.

**Checkpoints**: ``engine.save(path)`` stores the model and optimizer state dicts, the accountant
history, the sampler's RNG state and position, the noise generators' states, torch's global RNG
state (dropout), and the configuration. Build the same objects again with ``make_private`` (same
arguments) and call ``engine.load(path)``: training continues with the same ε and — with every RNG
restored — the same parameters as an uninterrupted run. Save only between logical steps.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data import default_collate as _default_collate

from grapefx.distributed import wrap as dist_wrap
from grapefx.distributed.sampling import ShardedPoissonBatchSampler, shard_size
from grapefx.privacy.accounting import Accountant, noise_multiplier_for
from grapefx.privacy.dp_loader import DPDataLoader, SecurePoissonBatchSampler
from grapefx.privacy.sampling import PoissonBatchSampler, collate_with_empty

CHECKPOINT_FORMAT = 1
_PRIVACY_KEYS = (  # config entries that must match between a checkpoint and the engine loading it
    "sample_rate",
    "noise_multiplier",
    "max_grad_norm",
    "clipping",
    "expected_batch_size",
    "dataset_size",
    "secure_mode",
    "accumulation_steps",
    "adaptive_clipping",
    "clip_groups",
    "clip_group_shares",
)
_LOADER_KWARGS = (  # DataLoader settings carried over from the user's loader
    "num_workers",
    "pin_memory",
    "timeout",
    "worker_init_fn",
    "multiprocessing_context",
    "persistent_workers",
    "pin_memory_device",
)


class DPOptimizer(torch.optim.Optimizer):
    """Wraps an optimizer: ``step()`` also counts a logical step in the accountant.

    In the middle of a logical batch (micro-batches before the last) ``step()`` and ``zero_grad()``
    return without doing anything, so gradients accumulate. ``param_groups``, ``state``, ``defaults``,
    ``state_dict()``, ``load_state_dict()`` and ``add_param_group()`` are the wrapped optimizer's
    (LR schedulers work on the wrapper). A subclass of `torch.optim.Optimizer` for ``isinstance``
    checks; the wrapped one is ``.original``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, engine: PrivacyEngine) -> None:
        # No super().__init__: this object shares the wrapped optimizer's groups and state.
        self.original = optimizer
        self._engine = engine

    # Attributes torch.optim.Optimizer methods and LR schedulers read, shared with the original.
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.original.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.original.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.original.defaults

    def __getattr__(self, name: str) -> Any:
        if name in ("original", "_engine"):  # not set yet (unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.original, name)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"DPOptimizer({self.original!r})"

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        if closure is not None:
            raise ValueError(
                "DPOptimizer.step() takes no closure: a closure runs several backward passes per step, "
                "each drawing noise on the same batch, which the accountant cannot count. Compute the loss, "
                "call backward() once, then step()."
            )
        if not self._engine._may_step():
            return None
        out = self.original.step()
        self._engine._record_step()
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._engine._accumulating:
            return
        self._engine._settle_unstepped("zero_grad() was called")
        self.original.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.original.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.original.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.original.add_param_group(param_group)


class PrivacyEngine:
    """Bookkeeping of one private training run; made by `make_private` together with its model,
    optimizer and loader (see the module docstring)."""

    def __init__(self) -> None:  # filled in by make_private
        self.model: Any = None
        self.optimizer: DPOptimizer | None = None
        self.loader: DPDataLoader | None = None
        self.accountant = Accountant()
        self.config: dict[str, Any] = {}
        self._accumulating = False  # inside a logical batch, before its last micro-batch
        self._last_micro = True
        self._draws_at_step = 0  # privacy_state.noise_draws after the last optimizer step
        self._n_noised = 0  # trainable parameters: at most this many noise draws per backward

    # -- what users read -------------------------------------------------------------------------
    @property
    def sample_rate(self) -> float:
        return self.config["sample_rate"]

    @property
    def noise_multiplier(self) -> float:
        """σ of the coming steps (the accountant records each step with the σ it used)."""
        return self.model.noise_multiplier() if self.model is not None else self.config["noise_multiplier"]

    def set_noise_multiplier(self, sigma: float) -> None:
        """Change σ from the next step on (noise schedules: `grapefx.privacy.schedulers`); `epsilon()`
        composes the steps taken with each σ. Call it between logical steps."""
        if self._accumulating or self.privacy_state.noise_draws > self._draws_at_step:
            # the accountant records a step with the σ in force at optimizer.step(): it must be the
            # σ its noise was drawn with
            raise RuntimeError(
                "change the noise multiplier between logical steps: after optimizer.step(), before the next "
                "backward (a noised gradient is waiting for its step, or a virtual batch is under way)"
            )
        self.model.set_noise_multiplier(sigma)

    @property
    def max_grad_norm(self) -> float:
        return self.config["max_grad_norm"]

    @property
    def target_delta(self) -> float:
        return self.config["target_delta"]

    @property
    def expected_batch_size(self) -> int:
        """Expected logical batch size q·N (the denominator of the mean-reduced private gradient)."""
        return self.config["expected_batch_size"]

    @property
    def steps_per_epoch(self) -> int:
        return self.config["steps_per_epoch"]

    @property
    def steps(self) -> int:
        """Logical steps counted by the accountant so far (including those of a loaded checkpoint)."""
        return self.accountant.steps

    @property
    def privacy_state(self) -> Any:
        return self.model.privacy_state

    @property
    def is_last_micro_batch(self) -> bool:
        """True when the batch the loader handed out last ends its logical batch (so the coming
        ``optimizer.step()`` is a real step): step a per-iteration LR scheduler only then."""
        return self._last_micro

    def epsilon(self, delta: float | None = None) -> float:
        """ε spent so far at ``delta`` (default ``target_delta``), composed over the whole history."""
        return self.accountant.epsilon(self.target_delta if delta is None else delta)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"PrivacyEngine(noise_multiplier={c.get('noise_multiplier')}, sample_rate={c.get('sample_rate')}, "
            f"max_grad_norm={c.get('max_grad_norm')}, steps={self.steps}, secure_mode={c.get('secure_mode')})"
        )

    # -- hooks called by the loader and the optimizer --------------------------------------------
    def _settle_unstepped(self, what: str) -> None:
        """A noised gradient reached p.grad but no step used it: count it anyway (it could be read)."""
        if self.noise_multiplier > 0 and self.privacy_state.noise_draws > self._draws_at_step:
            warnings.warn(
                f"a noised gradient was computed but {what} before optimizer.step() used it; it is counted "
                "in the accountant anyway (it reached p.grad). Call optimizer.step() after every backward().",
                stacklevel=4,
            )
            self.accountant.step(self.noise_multiplier, self.sample_rate)
            self._draws_at_step = self.privacy_state.noise_draws

    def _begin_logical_batch(self) -> None:
        self._settle_unstepped("the next batch was drawn")

    def _begin_micro_batch(self, last: bool) -> None:
        self._last_micro = last
        self._accumulating = not last
        self.model.set_noise_enabled(last)

    def _abandon_logical_batch(self) -> None:
        """The loop left in the middle of a logical batch: drop its partial, un-noised gradient."""
        self._accumulating, self._last_micro = False, True
        self.model.set_noise_enabled(True)
        if self.optimizer is not None:
            self.optimizer.original.zero_grad(set_to_none=True)

    def _may_step(self) -> bool:
        if self._accumulating:
            return False
        if self.noise_multiplier > 0:
            drawn = self.privacy_state.noise_draws - self._draws_at_step
            if drawn == 0:
                raise RuntimeError(
                    "optimizer.step() without a noised gradient: no DP noise was drawn since the last step. "
                    "Call loss.backward() on the output of the model make_private returned (not the original "
                    "module) once per batch before step(), and do not turn noise off by hand."
                )
            if drawn > self._n_noised:
                raise RuntimeError(
                    f"optimizer.step() after noise was drawn {drawn} times for {self._n_noised} parameters: more "
                    "than one noised backward() since the last step. The accountant counts one step per "
                    "optimizer.step(); call backward() once per batch, and accumulate with "
                    "make_private(accumulation_steps=...) rather than by hand."
                )
        return True

    def _record_step(self) -> None:
        self.accountant.step(self.noise_multiplier, self.sample_rate)
        self._draws_at_step = self.privacy_state.noise_draws

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._accumulating:
            raise RuntimeError(
                "cannot checkpoint in the middle of a logical batch (its partial gradient is not saved); "
                "save after optimizer.step() of its last micro-batch"
            )
        global_rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            global_rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": CHECKPOINT_FORMAT,
            "config": dict(self.config),
            "model": self.model.module.state_dict(),
            "optimizer": self.optimizer.original.state_dict(),
            "accountant": self.accountant.state_dict(),
            "sampler": self.loader.state_dict(),
            "noise_rng": self.privacy_state.rng_state_dict(),
            "global_rng": global_rng,
            "clip_bound": self.privacy_state.clip.state_dict() if self.privacy_state.clip is not None else None,
            "noise_multiplier_now": self.noise_multiplier,  # a noise schedule's current σ
        }

    def load_state_dict(self, state: dict[str, Any], *, strict: bool = True, restore_global_rng: bool = True) -> None:
        """Continue the run saved in ``state``. ``strict`` refuses a checkpoint whose privacy settings
        (q, σ, C, clipping, batch size, dataset size, secure mode) differ from this engine's; with
        ``strict=False`` the saved history is kept and later steps are composed with the new settings."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a grapefx engine checkpoint (format {state.get('format')!r})")
        saved = state["config"]
        diff = {k: (saved.get(k), self.config.get(k)) for k in _PRIVACY_KEYS if saved.get(k) != self.config.get(k)}
        if diff and strict:
            raise ValueError(
                "checkpoint was made with other privacy settings (saved, now): "
                + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items())
                + ". Build the engine with the same make_private arguments, or pass strict=False to compose "
                "the saved history with the new settings."
            )
        self.model.module.load_state_dict(state["model"])
        self.optimizer.original.load_state_dict(state["optimizer"])
        self.accountant.load_state_dict(state["accountant"])
        if self.privacy_state.clip is not None and state.get("clip_bound") is not None:
            self.privacy_state.clip.load_state_dict(state["clip_bound"])
        # a noise schedule's current σ, when this engine continues the same run (with other settings
        # loaded non-strictly, this engine's σ stands)
        now, same_sigma = (
            state.get("noise_multiplier_now"),
            saved.get("noise_multiplier") == self.config["noise_multiplier"],
        )
        if now is not None and same_sigma and self.config["noise_multiplier"] > 0 and now != self.noise_multiplier:
            self.model.set_noise_multiplier(now)
        if saved.get("secure_mode") == self.config["secure_mode"]:
            self.loader.load_state_dict(state["sampler"])
            self.privacy_state.load_rng_state_dict(state["noise_rng"])
        if restore_global_rng:
            torch.set_rng_state(state["global_rng"]["cpu"])
            if "cuda" in state["global_rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["global_rng"]["cuda"])
        self._draws_at_step = self.privacy_state.noise_draws
        self._accumulating, self._last_micro = False, True

    def save(self, path: Any) -> None:
        """Write a checkpoint (see the module docstring) to ``path`` with ``torch.save``."""
        torch.save(self.state_dict(), path)

    def load(self, path: Any, *, strict: bool = True, restore_global_rng: bool = True) -> None:
        """Load a checkpoint written by ``save`` into this engine's model, optimizer, loader, accountant
        and noise RNG (``map_location`` is the model's device; only tensors and plain data are loaded)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.load_state_dict(state, strict=strict, restore_global_rng=restore_global_rng)


def _plain_groups(value: Any) -> Any:
    """clip_groups / clip_group_shares as plain lists (checkpoints hold plain data only)."""
    if value is None or isinstance(value, (str, int, float)):
        return value
    return [_plain_groups(v) for v in value]


def _as_dict(options: Any) -> dict[str, Any] | None:
    """Adaptive clipping options as plain data (checkpoints hold plain data only)."""
    if options is None or isinstance(options, dict):
        return options
    return dataclasses.asdict(options)


def _loader_settings(loader: DataLoader) -> dict[str, Any]:
    kwargs = {k: getattr(loader, k) for k in _LOADER_KWARGS if hasattr(loader, k)}
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    else:
        kwargs.pop("persistent_workers", None)
    if not kwargs.get("pin_memory_device"):
        kwargs.pop("pin_memory_device", None)
    return kwargs


def _check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    if isinstance(optimizer, DPOptimizer):
        raise TypeError("this optimizer is already wrapped by make_private; pass the original one")
    model_params = {id(p) for p in model.parameters()}
    foreign = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in model_params]
    if foreign:
        raise ValueError(
            f"the optimizer holds {len(foreign)} tensor(s) that are not parameters of the model; their "
            "gradients would not be privatized. Build the optimizer over model.parameters()."
        )
    return sum(1 for p in model.parameters() if p.requires_grad)


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    *,
    target_epsilon: float | None = None,
    target_delta: float = 1e-5,
    epochs: int | None = None,
    steps: int | None = None,
    noise_multiplier: float | None = None,
    max_grad_norm: float = 1.0,
    clipping: str = "flat",
    adaptive_clipping: Any = None,
    strategy: str = "auto",
    accumulation_steps: int = 1,
    max_physical_batch_size: int | None = None,
    secure_mode: bool = False,
    seed: int | None = None,
    accountant: str = "pld",
    codegen: str = "eager",
    distributed: bool | None = None,
    ddp_options: dict[str, Any] | None = None,
    **compile_options: Any,
) -> tuple[Any, DPOptimizer, DPDataLoader, PrivacyEngine]:
    """Make ``(model, optimizer, data_loader)`` train with DP-SGD; returns ``(model, optimizer, loader, engine)``.

    ``data_loader`` is an ordinary ``DataLoader`` over a map-style dataset with ``batch_size`` set; only
    its dataset, batch size, collate function and worker settings are used (its sampler/shuffle are
    replaced by Poisson sampling with ``q = batch_size * accumulation_steps / len(dataset)``).
    Give either ``target_epsilon`` (with ``epochs`` or ``steps``: σ is calibrated so that
    ``epochs * steps_per_epoch`` logical steps, or ``steps``, spend it at ``target_delta``) or
    ``noise_multiplier``. ``steps_per_epoch = round(1 / q)``. ``seed`` makes sampling and noise
    reproducible (ignored by ``secure_mode``). ``adaptive_clipping`` (`grapefx.AdaptiveClipping` or a
    dict of its fields) lets the bound, starting at ``max_grad_norm``, follow a quantile of the
    per-sample norms; σ still counts in the accountant (the count's noise is paid out of it).
    Other keywords go to `grapefx.compile`.
    Train with the returned objects only, as in the module docstring.

    **Data-parallel** (``distributed``: default on when a ``torch.distributed`` process group is
    initialized; call ``make_private`` on every rank with the same arguments): ``data_loader.batch_size``
    is the expected batch size *per rank*, so q = batch_size * accumulation_steps * world_size /
    len(dataset); rank r Poisson-samples its shard (examples r, r+N, ...) with rate q (the union is a
    Poisson sample of the dataset: `grapefx.distributed.sampling`); the returned model is
    ``DistributedDataParallel(private_module, **ddp_options)`` (``engine.model`` is the private
    module); noise is drawn once, by rank 0, and the accountant counts global steps at the global q.
    """
    from grapefx.api import PrivateModule
    from grapefx.api import compile as grapefx_compile  # lazy: grapefx.api imports this package

    if isinstance(model, PrivateModule):
        raise TypeError("make_private takes the plain nn.Module, not one already compiled by grapefx.compile")
    if (target_epsilon is None) == (noise_multiplier is None):
        raise ValueError("give exactly one of target_epsilon (with epochs) and noise_multiplier")
    if target_epsilon is not None and (epochs is None) == (steps is None):
        raise ValueError("target_epsilon needs exactly one of epochs and steps (how long the budget must last)")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be an integer >= 1, got {accumulation_steps!r}")
    if max_physical_batch_size is not None and max_physical_batch_size < 1:
        raise ValueError(f"max_physical_batch_size must be >= 1, got {max_physical_batch_size!r}")
    if not isinstance(data_loader, DataLoader):
        raise TypeError(f"data_loader must be a torch DataLoader, got {type(data_loader).__name__}")
    dataset = data_loader.dataset
    if isinstance(dataset, IterableDataset):
        raise TypeError("Poisson sampling needs a map-style dataset (len and indexing), not an IterableDataset")
    if data_loader.batch_size is None:
        raise ValueError("data_loader needs batch_size set: it is the expected batch size of Poisson sampling")
    n_data = len(dataset)
    distributed = dist_wrap.resolve(distributed)
    world, rank = (dist_wrap.world_size(), dist_wrap.rank()) if distributed else (1, 0)
    expected_batch = data_loader.batch_size * accumulation_steps * world  # global
    if expected_batch > n_data:
        raise ValueError(f"expected logical batch {expected_batch} exceeds the dataset size {n_data}")
    q = expected_batch / n_data
    steps_per_epoch = max(1, round(1.0 / q))
    n_trainable = _check_optimizer(model, optimizer)

    planned_steps = steps if steps is not None else (epochs * steps_per_epoch if epochs is not None else None)
    if noise_multiplier is None:
        sigma = noise_multiplier_for(
            target_epsilon=target_epsilon,
            delta=target_delta,
            sample_rate=q,
            steps=planned_steps,
            accountant=accountant,
        )
    else:
        sigma = float(noise_multiplier)
        if sigma < 0 or not math.isfinite(sigma):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    base_seed = seed if seed is not None else secrets.randbits(62)
    noise_seed, sampler_seed = base_seed, (base_seed * 1_000_003 + 0x5EED) % (1 << 62)

    engine = PrivacyEngine()
    engine.accountant = Accountant(accountant)
    engine.config = {
        "sample_rate": q,
        "noise_multiplier": sigma,
        "max_grad_norm": float(max_grad_norm),
        "clipping": clipping,
        "clip_groups": _plain_groups(compile_options.get("clip_groups")),
        "clip_group_shares": _plain_groups(compile_options.get("clip_group_shares")),
        "adaptive_clipping": _as_dict(adaptive_clipping),
        "strategy": strategy,
        "expected_batch_size": expected_batch,
        "dataset_size": n_data,
        "steps_per_epoch": steps_per_epoch,
        "accumulation_steps": accumulation_steps,
        "max_physical_batch_size": max_physical_batch_size,
        "secure_mode": bool(secure_mode),
        "seed": seed,
        "target_epsilon": target_epsilon,
        "target_delta": float(target_delta),
        "epochs": epochs,
        "planned_steps": planned_steps,
        "accountant": accountant,
        "world_size": world,
    }
    engine.model = grapefx_compile(
        model,
        max_grad_norm=max_grad_norm,
        noise_multiplier=sigma,
        loss_reduction="mean",
        clipping=clipping,
        adaptive_clipping=adaptive_clipping,
        strategy=strategy,
        expected_batch_size=expected_batch,
        seed=noise_seed,
        codegen=codegen,
        secure_noise=bool(secure_mode),
        distributed=distributed,
        **compile_options,
    )
    engine._n_noised = n_trainable
    engine.optimizer = DPOptimizer(optimizer, engine)
    if distributed:  # each rank its own seeded stream over its own shard
        sampler_seed = (sampler_seed + rank * 0x9E3779B97F4A7C15) % (1 << 62)
    n_local = shard_size(n_data, rank, world)
    sampler: Any = (
        SecurePoissonBatchSampler(n_local, q, steps=steps_per_epoch)
        if secure_mode
        else PoissonBatchSampler(n_local, q, steps=steps_per_epoch, seed=sampler_seed)
    )
    if distributed:
        sampler = ShardedPoissonBatchSampler(sampler, rank, world, n_data)
    collate = data_loader.collate_fn or _default_collate
    if not isinstance(collate, collate_with_empty):
        collate = collate_with_empty(dataset[0], collate)
    engine.loader = DPDataLoader(
        dataset,
        sampler,
        engine,
        accumulation_steps=accumulation_steps,
        max_physical_batch_size=max_physical_batch_size,
        distributed=distributed,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(secrets.randbits(62) if secure_mode else sampler_seed ^ 1),
        **_loader_settings(data_loader),
    )
    model_out: Any = engine.model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        model_out = DistributedDataParallel(engine.model, **(ddp_options or {}))
    return model_out, engine.optimizer, engine.loader, engine
