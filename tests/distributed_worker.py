"""What each rank of the 2-process gloo tests runs (`test_distributed.py` spawns it once per session).

Every scenario returns plain tensors / numbers; rank 0 also computes the single-process reference
(grapefx.compile(..., distributed=False)) on the concatenated global batch. Results go to
`out_dir/rank{r}.pt`; the tests compare them.
"""

from __future__ import annotations

import copy
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import grapefx
from grapefx.distributed.comm import count_ddp_bytes

C = 0.5
SPLITS = [(5, 3), (2, 1), (3, 0), (0, 2)]  # (rank 0, rank 1) samples: B>=2, B=1 and B=0 graphs


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 5))


def global_batch(step: int, n: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(n, 40, generator=g) * 3).to(device), torch.randint(0, 5, (n,), generator=g).to(device)


def _local(x: torch.Tensor, split: tuple[int, int], rank: int) -> slice:
    start = 0 if rank == 0 else split[0]
    return slice(start, start + split[rank])


def _grads(model: nn.Module, cm: Any) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()}
    for n, g in cm.privacy_state.projected_grads.items():
        out[f"ghat:{n}"] = g.detach().cpu().clone()
    return out


def run_steps(
    rank: int, device: str, options: dict[str, Any], splits: list[tuple[int, int]], reference: bool = True
) -> dict[str, Any]:
    """DDP(grapefx.compile(model)) on each rank's shard; rank 0 also the single-process reference."""
    model = mlp().to(device)
    cm = grapefx.compile(model, max_grad_norm=C, **options)
    ddp = DDP(cm)
    counter = count_ddp_bytes(ddp)
    ref_model = mlp().to(device) if rank == 0 and reference else None
    ref = grapefx.compile(ref_model, max_grad_norm=C, distributed=False, **options) if ref_model is not None else None
    steps = []
    for k, split in enumerate(splits):
        x, y = global_batch(k, sum(split), device)
        sl = _local(x, split, rank)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(x[sl]), y[sl], reduction=options.get("loss_reduction", "mean")).backward()
        entry = {"dist": _grads(model, cm), "ddp_bytes": counter.bytes, "grapefx_bytes": cm.privacy_state.comm_bytes}
        counter.bytes, cm.privacy_state.comm_bytes = 0, 0
        entry["noise_draws"] = cm.privacy_state.noise_draws
        if ref is not None:
            ref_model.zero_grad(set_to_none=True)
            F.cross_entropy(ref(x), y, reduction=options.get("loss_reduction", "mean")).backward()
            entry["ref"] = _grads(ref_model, ref)
        steps.append(entry)
    ignored = sorted(ddp.parameters_to_ignore)
    out = {"steps": steps, "ignored": ignored, "grape_params": cm.privacy_config.grape_params}
    out["bounds"] = cm.clip_bound_history() + [cm.clip_bound()]
    if ref is not None:
        out["ref_bounds"] = ref.clip_bound_history() + [ref.clip_bound()]
    return out


def noise_runs(rank: int, device: str) -> dict[str, Any]:
    """Noise on: distributed vs single-process with the same seed; a clean run; a second seed."""
    common = {"loss_reduction": "mean", "expected_batch_size": 8}
    noisy = {**common, "noise_multiplier": 2.0, "seed": 11}
    return {
        "noisy": run_steps(rank, device, noisy, [(5, 3)] * 3),
        "again": run_steps(rank, device, noisy, [(5, 3)], reference=False),
        "other_seed": run_steps(rank, device, {**noisy, "seed": 12}, [(5, 3)], reference=False),
        "clean": run_steps(rank, device, {**common, "noise_multiplier": 0.0}, [(5, 3)]),
    }


def fsdp_steps(rank: int, device: str, options: dict[str, Any], splits: list[tuple[int, int]]) -> list[dict]:
    """fully_shard(grapefx.compile(model)) with an SGD step after each backward, vs one process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device, (dist.get_world_size(),))
    model = mlp().to(device)
    cm = fully_shard(grapefx.compile(model, max_grad_norm=C, **options), mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # over the sharded parameters
    ref_model = mlp().to(device) if rank == 0 else None
    ref = grapefx.compile(ref_model, max_grad_norm=C, distributed=False, **options) if ref_model is not None else None
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.5) if ref_model is not None else None
    steps = []
    for k, split in enumerate(splits):
        x, y = global_batch(k, sum(split), device)
        sl = _local(x, split, rank)
        F.cross_entropy(cm(x[sl]), y[sl]).backward()
        entry = {"dist": {n: p.grad.full_tensor().cpu() for n, p in model.named_parameters()}}
        opt.step()
        opt.zero_grad()
        entry["params"] = {n: p.full_tensor().detach().cpu() for n, p in model.named_parameters()}
        if ref is not None:
            F.cross_entropy(ref(x), y).backward()
            entry["ref"] = {n: p.grad.detach().cpu().clone() for n, p in ref_model.named_parameters()}
            ref_opt.step()
            ref_opt.zero_grad()
            entry["ref_params"] = {n: p.detach().cpu().clone() for n, p in ref_model.named_parameters()}
        steps.append(entry)
    return steps


def refusals(rank: int, device: str) -> dict[str, str]:
    """Errors for a distributed model trained outside DDP, and one compiled before the process group."""
    messages = {}
    x, y = global_batch(0, 4, device)
    cm = grapefx.compile(mlp().to(device), max_grad_norm=C, noise_multiplier=0.0)
    try:
        F.cross_entropy(cm(x), y).backward()
    except grapefx.distributed.DistributedSetupError as e:
        messages["outside_ddp"] = str(e)
    cm = grapefx.compile(mlp().to(device), max_grad_norm=C, noise_multiplier=0.0, distributed=False)
    try:
        F.cross_entropy(DDP(cm)(x), y).backward()
    except grapefx.distributed.DistributedSetupError as e:
        messages["not_distributed_in_ddp"] = str(e)
    return messages


def engine_run(rank: int, device: str) -> dict[str, Any]:
    """make_private on 2 ranks: shards, global q, accountant, identical parameters after training."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(5)
    data = TensorDataset(torch.randn(64, 40, generator=g), torch.randint(0, 5, (64,), generator=g))
    out: dict[str, Any] = {}
    for acc in (1, 3):
        model = mlp().to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        dmodel, dopt, loader, engine = grapefx.make_private(
            model,
            opt,
            DataLoader(data, batch_size=4),
            noise_multiplier=1.0,
            max_grad_norm=C,
            seed=3,
            accumulation_steps=acc,
        )
        seen, micro = [], 0
        for xb, yb in loader:
            micro += 1
            seen.append(xb.shape[0])
            F.cross_entropy(dmodel(xb.to(device)), yb.to(device)).backward()
            dopt.step()
            dopt.zero_grad()
        out[acc] = {
            "is_ddp": isinstance(dmodel, DDP),
            "sample_rate": engine.sample_rate,
            "expected_batch_size": engine.expected_batch_size,
            "steps": engine.steps,
            "steps_per_epoch": engine.steps_per_epoch,
            "epsilon": engine.epsilon(),
            "micro_batches": micro,
            "params": torch.cat([p.detach().cpu().reshape(-1) for p in model.parameters()]),
        }
    # the shard: indices this rank's sampler draws (one epoch, fresh engine with the same seed)
    model = mlp().to(device)
    _, _, loader, _ = grapefx.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data, batch_size=4), noise_multiplier=1.0, seed=3
    )
    out["indices"] = [list(b) for b in loader.batch_sampler]
    return out


def inductor_runs(rank: int, device: str) -> dict[str, Any]:
    """codegen="inductor": noise off vs one process (BK, GRAPE); noise on vs a clean run (std)."""
    out: dict[str, Any] = {}
    for strategy in ("auto", "grape"):
        opts = {"loss_reduction": "mean", "noise_multiplier": 0.0, "seed": 3, "codegen": "inductor"}
        out[f"exact/{strategy}"] = run_steps(rank, device, {**opts, "strategy": strategy, "rank": 4}, SPLITS[:2])
    base = {"loss_reduction": "mean", "expected_batch_size": 8, "seed": 3, "codegen": "inductor"}
    out["noisy"] = run_steps(rank, device, {**base, "noise_multiplier": 2.0}, [(5, 3)] * 3, reference=False)
    out["clean"] = run_steps(rank, device, {**base, "noise_multiplier": 0.0}, [(5, 3)], reference=False)
    return out


def inductor_worker(rank: int, world: int, rendezvous: str, out_dir: str, device: str) -> None:
    _run(rank, world, rendezvous, out_dir, device, lambda: {"inductor": inductor_runs(rank, device)})


def worker(rank: int, world: int, rendezvous: str, out_dir: str, device: str) -> None:
    _run(rank, world, rendezvous, out_dir, device, lambda: _scenarios(rank, device))


def slow_worker(rank: int, world: int, rendezvous: str, out_dir: str, device: str) -> None:
    _run(rank, world, rendezvous, out_dir, device, lambda: _slow_scenarios(rank, device))


def _run(rank: int, world: int, rendezvous: str, out_dir: str, device: str, body: Any) -> None:
    torch.set_num_threads(1)
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096
    # a timeout: a rank that fails mid-collective makes the other fail too, instead of hanging
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world, timeout=timedelta(seconds=180)
    )
    results: dict[str, Any] = {}
    try:
        results = body()
    except Exception:  # noqa: BLE001 - reported to the test, which fails with the traceback
        results["error"] = traceback.format_exc()
    torch.save(copy.copy(results), f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _exact(rank: int, device: str, strategy: str, reduction: str) -> dict[str, Any]:
    opts = {"noise_multiplier": 0.0, "loss_reduction": reduction, "strategy": strategy, "seed": 3}
    if strategy == "grape":
        opts["rank"] = 4
    return run_steps(rank, device, opts, SPLITS if reduction == "mean" else SPLITS[:2])


FSDP = {"loss_reduction": "mean", "noise_multiplier": 0.0, "seed": 3}


def _scenarios(rank: int, device: str) -> dict[str, Any]:
    """The default suite's scenarios (~60 s on 2 cores)."""
    results: dict[str, Any] = {}
    for strategy, reduction in (("auto", "sum"), ("auto", "mean"), ("grape", "mean")):
        results[f"exact/{strategy}/{reduction}"] = _exact(rank, device, strategy, reduction)
    two_pass = {"noise_multiplier": 0.0, "loss_reduction": "mean", "seed": 3, "two_pass": True}
    results["exact/two_pass/mean"] = run_steps(rank, device, two_pass, SPLITS)
    group = {"noise_multiplier": 0.0, "loss_reduction": "mean", "clipping": "group"}
    group["clip_groups"] = [["0.*", "2.*"], "*"]
    results["exact/group/mean"] = run_steps(rank, device, group, SPLITS)
    results["noise"] = noise_runs(rank, device)
    adaptive = {"loss_reduction": "mean", "expected_batch_size": 8, "seed": 3}
    clean = {"count_noise_std": 0.0, "learning_rate": 0.5}
    results["adaptive/clean"] = run_steps(
        rank, device, {**adaptive, "noise_multiplier": 0.0, "adaptive_clipping": clean}, SPLITS
    )
    noisy = {**adaptive, "noise_multiplier": 1.0, "adaptive_clipping": {"count_noise_std": 2.0, "learning_rate": 0.5}}
    results["adaptive/noisy"] = run_steps(rank, device, noisy, [(5, 3), (3, 0), (2, 2)])
    results["fsdp/clean"] = fsdp_steps(rank, device, FSDP, SPLITS[:3])
    results["refusals"] = refusals(rank, device)
    results["engine"] = engine_run(rank, device)
    return results


def _slow_scenarios(rank: int, device: str) -> dict[str, Any]:
    """The -m slow scenarios: GRAPE with sum reduction and with noise, FSDP2 with noise."""
    noisy = {"loss_reduction": "mean", "expected_batch_size": 8, "noise_multiplier": 2.0, "seed": 11}
    return {
        "exact/grape/sum": _exact(rank, device, "grape", "sum"),
        "noise/grape": run_steps(rank, device, {**noisy, "strategy": "grape", "rank": 4}, [(5, 3), (3, 0)]),
        "fsdp/noisy": fsdp_steps(rank, device, {**FSDP, "noise_multiplier": 2.0, "expected_batch_size": 8}, SPLITS[:1]),
    }
