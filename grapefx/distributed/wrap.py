"""Data-parallel training: the one wrapping order that is exact, and refusal of the others.

The order that works is ``DDP(grapefx.compile(model, ...))`` (after ``init_process_group``):

* each rank's backward clips its own samples (a sample's norm is local to its rank) and divides by
  ``global denominator / world size`` (read at run time), and only rank 0 adds the noise; DDP's
  default gradient *averaging* then leaves ``(Σ_all c_i g_i + σCξ) / global denom`` on every rank;
* Dynamo's DDPOptimizer (``torch._dynamo.config.optimize_ddp``) would split the graph into buckets
  and clip each sub-graph on its own: `PrivateModule` compiles with it off (DDP's C++ reducer still
  all-reduces the gradients after the single private backward);
* DP-GRAPE's projected weights are left out of DDP's reducer; their r-dimensional Ĝ is all-reduced
  inside the backward (`grapefx.distributed.ops`) and back-projected on every rank.

FSDP2: ``fully_shard(grapefx.compile(model, ...))`` — the compiled model sharded as the root — works
for Book-Keeping: FSDP's hooks gather the parameters outside the compiled graph, and its gradient
reduce-scatter averages like DDP.

Refused: ``grapefx.compile(DDP(model))``, ``torch.compile(DDP(model), backend=grapefx...)`` (graph
split per bucket, noise on every rank), models sharded before compiling, fully_shard on modules
inside the compiled model, DP-GRAPE or legacy FSDP with sharding, and a distributed model trained
outside DDP / FSDP2.
"""

from __future__ import annotations

import secrets
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from grapefx.errors import GrapefxError

RIGHT_ORDER = (
    "Compile first, then wrap: `ddp = DistributedDataParallel(grapefx.compile(model, ...))` after "
    "`torch.distributed.init_process_group(...)`, and train through `ddp`."
)


class DistributedSetupError(GrapefxError):
    """A data-parallel set-up that would give wrong private gradients."""


def process_group_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if process_group_ready() else 1


def rank() -> int:
    return dist.get_rank() if process_group_ready() else 0


def resolve(distributed: bool | None) -> bool:
    """`distributed=None` (default): on exactly when a default process group is initialized."""
    if distributed is None:
        return process_group_ready()
    if distributed and not process_group_ready():
        raise DistributedSetupError(
            "grapefx.compile(distributed=True) needs torch.distributed.init_process_group(...) to be called "
            "first (launch with torchrun and initialize the process group before compiling)."
        )
    return bool(distributed)


def _ddp_class() -> type | None:
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DistributedDataParallel


def active_ddp_module() -> nn.Module | None:
    ddp = _ddp_class()
    return ddp._get_active_ddp_module() if ddp is not None else None


def check_compile_target(model: nn.Module) -> None:
    """Refuse models already wrapped for data parallelism (see the module docstring)."""
    ddp = _ddp_class()
    if ddp is not None and isinstance(model, ddp):
        raise DistributedSetupError(
            "grapefx.compile got a DistributedDataParallel module: compiling through DDP would let Dynamo's "
            "DDPOptimizer split the graph per gradient bucket and clip each part separately, and DDP would "
            f"average per-rank results that each carry their own noise. {RIGHT_ORDER}"
        )
    fsdp = _fsdp_classes()
    for name, sub in model.named_modules():
        if fsdp and isinstance(sub, fsdp):
            raise DistributedSetupError(
                f"`{name or type(model).__name__}` is already sharded with {type(sub).__name__} (fully_shard / "
                "FullyShardedDataParallel): grapefx compiles the unsharded model. Compile first, then shard the "
                "compiled model as a whole: `fully_shard(grapefx.compile(model, ...))` (Book-Keeping), or use "
                f"DDP: {RIGHT_ORDER}"
            )
    check_parameters(model)


def check_unchanged(private: nn.Module, param_ids: list[int]) -> bool:
    """Refuse a model whose parameters were replaced after compiling, except by FSDP2 on the compiled
    model itself (supported: returns True, the parameters are FSDP's gathered ones)."""
    fsdp = _fsdp_classes()
    if fsdp and isinstance(private, fsdp):
        _check_fsdp_root(private, fsdp)
        return True  # FSDP2 swaps in the gathered parameters before each forward, by design
    if [id(p) for p in private.module.parameters()] != param_ids:
        raise DistributedSetupError(
            "the model's parameters were replaced after grapefx.compile (e.g. by fully_shard / FSDP on an "
            "enclosing module, or by re-assigning a Parameter), so the compiled private backward no longer "
            f"matches them. Compile the final model; for data parallelism: {RIGHT_ORDER}"
        )
    check_parameters(private.module)
    return False


def _check_fsdp_root(private: nn.Module, fsdp: tuple[type, ...]) -> None:
    """FSDP2 on the compiled model as the root: its hooks all-gather the parameters before the
    forward (outside the compiled graph) and reduce-scatter the gradients after the private backward,
    *averaging* like DDP, so the same per-rank scaling and rank-0 noise give the global result."""
    fsdp2 = _fsdp2_class()
    config = private.privacy_config
    where = None
    if fsdp2 is None or not isinstance(private, fsdp2):
        where = "the legacy FullyShardedDataParallel wrapper is not supported"
    elif not config.distributed:
        where = "the model was compiled without distributed mode (call init_process_group before grapefx.compile)"
    elif config.strategy == "grape":
        where = "DP-GRAPE keeps its optimizer state for the full weights; with sharded weights use DDP"
    else:
        nested = [n for n, m in private.module.named_modules() if isinstance(m, fsdp)]
        if nested:
            where = (
                f"`{nested[0] or type(private.module).__name__}` inside the compiled model is sharded on its own "
                "(its hooks would run inside the compiled graph); apply fully_shard to the compiled model only"
            )
    if where is not None:
        raise DistributedSetupError(
            f"unsupported FSDP set-up: {where}. Supported: `fully_shard(grapefx.compile(model, ...))` with "
            f"Book-Keeping (strategy auto/ghost/instantiate), or DDP: {RIGHT_ORDER}"
        )


def _fsdp2_class() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return None
    return FSDPModule


def check_parameters(model: nn.Module) -> None:
    dtensor = _dtensor_class()
    for name, p in model.named_parameters():
        if dtensor is not None and isinstance(p, dtensor):
            raise DistributedSetupError(
                f"parameter `{name}` is a DTensor (FSDP2 fully_shard or tensor parallelism): grapefx does not "
                f"support sharded parameters yet; use DistributedDataParallel. {RIGHT_ORDER}"
            )


def _fsdp_classes() -> tuple[type, ...]:
    classes: list[type] = []
    try:
        from torch.distributed.fsdp import FSDPModule

        classes.append(FSDPModule)
    except ImportError:  # pragma: no cover
        pass
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        classes.append(FullyShardedDataParallel)
    except ImportError:  # pragma: no cover
        pass
    return tuple(classes)


def _dtensor_class() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return None
    return DTensor


def check_backend_call(distributed: bool, managed: bool) -> None:
    """Called by the backend for every graph Dynamo hands it."""
    ddp = active_ddp_module()
    if ddp is not None and not managed:
        raise DistributedSetupError(
            "the grapefx backend is compiling a graph inside DistributedDataParallel's forward "
            "(torch.compile(DDP(model), backend=grapefx...)): Dynamo's DDPOptimizer splits such graphs per "
            "gradient bucket (each part would be clipped on its own) and every rank would add its own noise. "
            + RIGHT_ORDER
        )
    if ddp is not None and _optimize_ddp_mode() == "ddp_optimizer":
        raise DistributedSetupError(  # PrivateModule turns the DDPOptimizer off; reaching here is a bug
            "Dynamo's DDPOptimizer is on while grapefx compiles inside DDP: the graph would be split per bucket. "
            + RIGHT_ORDER
        )
    if distributed and not managed:
        raise DistributedSetupError(
            "distributed=True is only supported through grapefx.compile (it sets up the noise rank and the "
            f"run-time denominator). {RIGHT_ORDER}"
        )


def _optimize_ddp_mode() -> Any:
    getter = getattr(torch._dynamo.utils, "get_optimize_ddp_mode", None)
    return getter() if getter is not None else torch._dynamo.config.optimize_ddp


def prepare(private: nn.Module, grape_params: tuple[str, ...] | None) -> int | None:
    """Per-rank set-up of a distributed PrivateModule (collective: every rank calls it in the same
    order). Returns the projection seed all ranks share (None when not GRAPE)."""
    state = private.privacy_state
    state.noise_local = rank() == 0
    if not grape_params:
        return None
    # DDP must not all-reduce the dense back-projections of projected weights: grapefx all-reduces
    # their r-dimensional Ĝ instead. DDP reads this attribute of the module it wraps (names relative
    # to it: this PrivateModule holds the model as `module`), and then does not broadcast these
    # parameters at construction either, so rank 0's values are broadcast here.
    ddp = _ddp_class()
    names = [f"module.{n}" for n in grape_params]
    if ddp is not None:
        ddp._set_params_and_buffers_to_ignore_for_model(private, names)
    params = dict(private.module.named_parameters())
    with torch.no_grad():
        for n in grape_params:
            dist.broadcast(params[n].data, src=0)
    seed = [private.privacy_config.seed if private.privacy_config.seed is not None else secrets.randbits(62)]
    dist.broadcast_object_list(seed, src=0)  # P must be the same on every rank
    return int(seed[0])


def before_forward(private: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Checks the wrapping and sets this step's run-time denominator (global denom / world size)."""
    if not torch.is_grad_enabled():
        return  # evaluation: no backward, nothing to privatize
    n = world_size()
    ddp = active_ddp_module()
    fsdp2 = _fsdp2_class()
    sharded = fsdp2 is not None and isinstance(private, fsdp2)  # checked by check_unchanged
    if n > 1 and not sharded and (ddp is None or not any(m is private for m in ddp.module.modules())):
        raise DistributedSetupError(
            f"this grapefx model was compiled for data-parallel training (world size {n}) but is called "
            "outside DistributedDataParallel (and is not sharded with fully_shard), so its gradients would not "
            "be reduced across ranks. " + RIGHT_ORDER
        )
    config, state = private.privacy_config, private.privacy_state
    if config.loss_reduction == "sum":
        denom = 1.0
    elif config.expected_batch_size is not None:
        denom = float(config.expected_batch_size)
    else:  # "mean" over the actual global batch: sum the local batch sizes over ranks
        local = _local_batch(args, kwargs)
        sizes = torch.tensor([local.shape[0]], dtype=torch.int64, device=local.device)
        if n > 1:
            dist.all_reduce(sizes)
            state.comm_bytes += sizes.numel() * sizes.element_size()
        denom = float(max(int(sizes.item()), 1))
    state.dist_denom = denom / n


def _local_batch(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor) and a.dim() > 0:
            return a
    raise DistributedSetupError(
        "loss_reduction='mean' in distributed mode needs the batch as a tensor argument (dim 0) to sum the "
        "batch sizes over ranks; or pass expected_batch_size= (the expected global batch size)."
    )


def refuse_non_distributed_in_ddp(private: nn.Module) -> None:
    """A model compiled without distributed mode but trained inside DDP over several ranks."""
    if torch.is_grad_enabled() and world_size() > 1 and active_ddp_module() is not None:
        raise DistributedSetupError(
            "this grapefx model was compiled without distributed mode but is trained inside "
            f"DistributedDataParallel over {world_size()} ranks: every rank would add its own noise and DDP "
            "would average per-rank means. Call torch.distributed.init_process_group(...) before "
            f"grapefx.compile (or pass distributed=True). {RIGHT_ORDER}"
        )
