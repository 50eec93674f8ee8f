"""`grapefx.compile`: the one-line way to make a model's training private."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.fx.experimental.symbolic_shapes import ConstraintViolationError

from grapefx.buffer_markers import drop_buffer_markers
from grapefx.config import PrivacyConfig
from grapefx.distributed import wrap as dist_wrap
from grapefx.dynamo_backend import GrapefxBackend
from grapefx.errors import ConfigError, GrapefxError, GraphBreakError
from grapefx.grape.policy import DEFAULT_EXCLUDE, grape_parameters
from grapefx.privacy.clip_groups import resolve_clip_groups
from grapefx.transformers_compat import (
    expert_configs,
    feature_encoders,
    input_grad_flags_off,
    install_output_hooks,
    loop_expert_forwards,
    masked_row_experts,
)


class PrivateModule(nn.Module):
    """Wraps a model compiled with the grapefx backend.

    Calls mark dim 0 of every tensor argument dynamic, so varying (Poisson) batch sizes reuse one
    graph; Dynamo specializes sizes 0 and 1, so at most three graphs are compiled (B=0, B=1, B>=2).
    After `loss.backward()`, `per_sample_norms()` returns the per-sample gradient norms ([B]) of that
    backward and `per_layer_norms()` the per-parameter ones ([B, n_params], order of
    `parameter_names()`): the norms of the gradients of the loss written as a sum over samples.
    """

    def __init__(self, module: nn.Module, config: PrivacyConfig, dynamic: bool = True) -> None:
        super().__init__()
        self.module = module
        self.privacy_config = config
        self.grapefx_backend = GrapefxBackend(config, model=module)
        self.grapefx_backend.managed = True
        self._compiled = torch.compile(module, backend=self.grapefx_backend, fullgraph=True, dynamic=False)
        install_output_hooks(module)  # transformers would install them inside the traced forward
        drop_buffer_markers(module)  # a buffer reassigned in forward would break the graph
        self._feature_encoders = feature_encoders(module)
        self._expert_configs = expert_configs(module)
        self._loop_experts = loop_expert_forwards(module)
        self._dynamic = dynamic
        self._param_ids = [id(p) for p in module.parameters()]
        if config.distributed:  # noise on rank 0 only; GRAPE: Ĝ all-reduced by grapefx, not DDP
            seed = dist_wrap.prepare(self, config.grape_params if config.strategy == "grape" else None)
            if seed is not None:
                self.privacy_state.projection_seed = seed

    @property
    def privacy_state(self) -> Any:
        return self.grapefx_backend.state

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._dynamic:
            for a in list(args) + list(kwargs.values()):
                if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] > 1:
                    torch._dynamo.mark_dynamic(a, 0)
        if dist_wrap.check_unchanged(self, self._param_ids):  # fully_shard(this module): FSDP2
            # The parameters are FSDP's gathered tensors, not those named at construction (whose ids
            # may since be reused by other tensors): name the current ones for the compiler.
            self.grapefx_backend.param_names = {id(p): n for n, p in self.module.named_parameters()}
        if self.privacy_config.distributed:
            dist_wrap.before_forward(self, args, kwargs)
        else:
            dist_wrap.refuse_non_distributed_in_ddp(self)
        try:
            # Inside DDP's forward, Dynamo's DDPOptimizer would split the graph per gradient bucket
            # (clipping each part on its own): one graph; DDP's reducer all-reduces after the backward.
            self.grapefx_backend.refusal = None
            # allow_rnn: Dynamo traces nn.RNN / GRU / LSTM (unrolled over time) instead of breaking the graph
            with (
                torch._dynamo.config.patch(optimize_ddp=False, allow_rnn=True),
                input_grad_flags_off(self._feature_encoders),
                masked_row_experts(self._expert_configs, self._loop_experts),
            ):
                return self._compiled(*args, **kwargs)
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as e:
            # a graph break under fullgraph=True, or Python control flow on a value read from a
            # tensor (`if mask.any():`), which Dynamo cannot guard on
            raise GraphBreakError(
                "grapefx needs the model in one graph (per-sample clipping split over graphs would be "
                f"wrong), but Dynamo could not trace it: {_graph_break_reason(e)}"
            ) from None
        except torch._dynamo.exc.BackendCompilerFailed as e:
            inner = e.inner_exception if hasattr(e, "inner_exception") else e.__cause__
            if inner is not None and isinstance(inner, Exception) and type(inner).__module__.startswith("grapefx"):
                raise inner from None
            raise
        except ConstraintViolationError as e:
            refusal, self.grapefx_backend.refusal = self.grapefx_backend.refusal, None
            if refusal is not None:  # the cause: a backward grapefx refused (torch 2.14 defers it)
                raise refusal from None
            raise GrapefxError(
                "grapefx compiles the model once for every batch size >= 2, but tracing fixed the batch "
                "size: either the model's code uses it as a constant (e.g. a reshape with a hard-coded "
                "batch size; use x.shape[0] or -1), or grapefx hit an op it cannot apply per sample "
                f"(please report the model).{_specialized_at(e)}"
            ) from e

    def per_sample_norms(self) -> torch.Tensor | None:
        return self.privacy_state.last_norms

    def per_layer_norms(self) -> torch.Tensor | None:
        return self.privacy_state.last_layer_norms

    def clip_bound(self) -> float:
        """The clip bound C the next logical step uses: `max_grad_norm`, or with adaptive clipping
        the bound it has moved to (`clip_bound_history()`: the bound of every completed step)."""
        clip = self.privacy_state.clip
        return clip.for_next_step() if clip is not None else float(self.privacy_config.max_grad_norm)

    def clip_bound_history(self) -> list[float]:
        """Adaptive clipping: the bound each completed logical step clipped to (empty otherwise)."""
        clip = self.privacy_state.clip
        return list(clip.history or []) if clip is not None else []

    def parameter_names(self) -> list[str]:
        return list(self.privacy_state.param_names)

    def noise_multiplier(self) -> float:
        """σ of the coming steps: `noise_multiplier`, or the last `set_noise_multiplier`."""
        current = self.privacy_state.noise_multiplier
        return float(self.privacy_config.noise_multiplier) if current is None else current

    def set_noise_multiplier(self, sigma: float) -> None:
        """Use noise multiplier σ from the next backward on, without recompiling (a noise schedule:
        `grapefx.privacy.schedulers`). The model must have been compiled with noise (σ > 0). Account
        for each step with the σ it used (`make_private`'s engine does)."""
        compiled = float(self.privacy_config.noise_multiplier)
        if compiled == 0:
            raise ConfigError(
                "this model was compiled without noise (noise_multiplier=0), so its graphs draw none; "
                "compile it with the schedule's first noise_multiplier to change it later"
            )
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ConfigError(f"noise_multiplier must be a finite number > 0, got {sigma!r}")
        cfg = self.privacy_config
        scale = cfg.gradient_noise_multiplier_at(float(sigma)) / cfg.gradient_noise_multiplier
        self.privacy_state.noise_multiplier = float(sigma)
        self.privacy_state.noise_scale = scale

    def set_noise_enabled(self, enabled: bool) -> None:
        """Turn noise off for all but the last micro-batch of a virtual (accumulated) batch."""
        self.privacy_state.noise_enabled = enabled


def _specialized_at(e: Exception) -> str:
    """' It happened at file:line (`code`).' from torch's user stack, when it has one."""
    lines = [ln.strip() for ln in str(e).splitlines()]
    files = [i for i, ln in enumerate(lines) if ln.startswith("File ")]
    if not files:
        return ""
    where = lines[files[-1]][len("File ") :]
    code = lines[files[-1] + 1] if files[-1] + 1 < len(lines) else ""
    return f" It happened at {where}" + (f" (`{code}`)." if code else ".")


def _graph_break_reason(e: Exception) -> str:
    cause = e.__cause__
    if type(cause).__name__.startswith("Observed") and cause.args:
        # Dynamo saw the model raise; it names only the frame the exception left (often a `finally`)
        name = type(cause).__name__.removeprefix("Observed")
        raised = str(cause.args[0]).removeprefix("raised exception ")
        if raised.startswith("ConstantVariable(str: ") and raised.endswith(")"):
            raised = f"{name}({raised[22:-1]})"
        elif not raised.startswith(name):  # torch 2.11: "ExceptionVariable(<class 'TypeError'>)"
            raised = name
        return (
            f"the model raised {raised} while being traced (Dynamo reports it{_user_location(e)}: the "
            "line that raised, or the end of a try / with block around it). Run the model once "
            "without compiling to see where it raises (a required input left out, e.g. "
            "attention_mask); if it runs, the call that raised is one Dynamo cannot trace."
        )
    return (
        f"{str(e).splitlines()[0]}{_user_location(e)}. "
        "Remove the data-dependent Python control flow / unsupported call named above."
    )


def _user_location(e: Exception) -> str:
    """' at file:line in function (`code`)' for the innermost user frame Dynamo stopped in."""
    stack = getattr(e, "real_stack", None)
    if not stack:
        return ""
    frame = stack[-1]
    code = f" (`{frame.line.strip()}`)" if frame.line else ""
    return f" at {frame.filename}:{frame.lineno} in {frame.name}{code}"


def compile(  # noqa: A001 - mirrors torch.compile
    model: nn.Module,
    *,
    max_grad_norm: float = 1.0,
    noise_multiplier: float = 1.0,
    loss_reduction: str = "mean",
    clipping: str = "flat",
    strategy: str = "auto",
    expected_batch_size: int | None = None,
    seed: int | None = None,
    codegen: str = "eager",
    rank: int = 16,
    resample_every: int = 200,
    grape_include: Sequence[str] | None = None,
    grape_exclude: Sequence[str] = DEFAULT_EXCLUDE,
    grape_module_types: tuple[type[nn.Module], ...] = (nn.Linear,),
    distributed: bool | None = None,
    **options: Any,
) -> PrivateModule:
    """Compile `model` so that `loss.backward()` leaves DP-SGD gradients in every `p.grad`.

    strategy="grape" privatizes the weights chosen by `grapefx.grape.policy.grape_parameters`
    (Linear weights whose smaller side exceeds `rank`, minus the head / embeddings / `grape_exclude`
    patterns; `grape_include` patterns or `grape_module_types` override) in a random rank-`rank`
    subspace resampled every `resample_every` steps.

    Data-parallel training (README "Distributed training"): call `init_process_group` first, then
    wrap the result as `DistributedDataParallel(grapefx.compile(model, ...))`; `distributed=None`
    turns distributed mode on when a process group is initialized, and `expected_batch_size` is then
    the expected global batch size. FSDP2: `fully_shard(grapefx.compile(model, ...))` (the compiled
    model as one unit; Book-Keeping only). `grapefx.compile(DDP(model))` and models sharded before
    compiling are refused.
    """
    dist_wrap.check_compile_target(model)
    if strategy == "grape" and "grape_params" not in options:
        options["grape_params"] = grape_parameters(model, rank, grape_include, grape_exclude, grape_module_types)
    config = PrivacyConfig(
        max_grad_norm=max_grad_norm,
        noise_multiplier=noise_multiplier,
        loss_reduction=loss_reduction,
        clipping=clipping,
        strategy=strategy,
        expected_batch_size=expected_batch_size,
        seed=seed,
        codegen=codegen,
        rank=rank,
        resample_every=resample_every,
        distributed=dist_wrap.resolve(distributed),
        **options,
    )
    if config.clipping == "group":  # patterns that miss a parameter, or match none, fail here
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        resolve_clip_groups(trainable, config.clip_groups, strict=True)
    return PrivateModule(model, config)
