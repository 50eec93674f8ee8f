"""Data-parallel private training: the digits MLP with DP-SGD on N processes (torch.distributed DDP).

    torchrun --nproc-per-node 2 examples/train_digits_ddp.py --epochs 15 --target-epsilon 3
    torchrun --nproc-per-node 2 examples/train_digits_ddp.py --strategy grape --rank 16   # DP-GRAPE

`grapefx.make_private` sees the initialized process group and does the distributed set-up: each rank
Poisson-samples its own shard of the data at the global rate q (the union is a Poisson sample of the
whole set), the model is returned as DistributedDataParallel(grapefx.compile(model)) — the wrapping
order that is exact —, rank 0 alone adds the noise, and the accountant counts global steps at the
global q. After each backward every rank holds the same private gradient a single process would
compute on the global batch. With --strategy grape, ranks all-reduce the rank-r projected gradients
instead of the full weight gradients; the bytes all-reduced per step are printed at the end.
Uses NCCL and one GPU per rank when there are at least as many GPUs as local ranks, else gloo on CPU.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from train_digits import accuracy, load_data

import grapefx
from grapefx.distributed.comm import count_ddp_bytes
from grapefx.optim import GrapeAdamW


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=64, help="expected Poisson batch size per rank")
    ap.add_argument("--target-epsilon", type=float, default=3.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--strategy", default="auto", choices=["auto", "ghost", "instantiate", "grape"])
    ap.add_argument("--rank", type=int, default=16, help="DP-GRAPE projection rank (--strategy grape)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="2 epochs (CI smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.epochs = 2

    # one GPU per rank (NCCL cannot share a device between ranks): fewer GPUs than local ranks -> CPU
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= local_world
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    train, test = load_data(args.seed)
    h = args.hidden
    model = nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10)).to(device)
    opt_cls = GrapeAdamW if args.strategy == "grape" else torch.optim.AdamW
    opt = opt_cls(model.parameters(), lr=args.lr, weight_decay=0.0)
    ddp_model, opt, loader, engine = grapefx.make_private(
        model,
        opt,
        DataLoader(train, batch_size=args.batch_size),
        target_epsilon=args.target_epsilon,
        target_delta=args.delta,
        epochs=args.epochs,
        max_grad_norm=args.max_grad_norm,
        strategy=args.strategy,
        rank=args.rank,
        seed=args.seed,
        ddp_options={"device_ids": [device.index]} if cuda else None,
    )
    ddp_bytes = count_ddp_bytes(ddp_model)
    if rank == 0:
        print(
            f"world_size={world}  noise_multiplier={engine.noise_multiplier:.3f}  sample_rate={engine.sample_rate:.4f}"
            f"  expected global batch={engine.expected_batch_size}  steps/epoch={engine.steps_per_epoch}"
            f"  strategy={args.strategy}"
        )
    start = time.time()
    for epoch in range(1, args.epochs + 1):
        for x, y in loader:  # this rank's Poisson shard of the logical batch (may be empty)
            loss = F.cross_entropy(ddp_model(x.to(device)), y.to(device))
            loss.backward()  # every rank: p.grad = (Σ_global clipped + noise once) / expected global batch
            opt.step()
            opt.zero_grad()
        if rank == 0:
            acc = accuracy_on(model, test, device)
            print(f"epoch {epoch:2d}  test acc {acc:.3f}  epsilon {engine.epsilon():.2f}")
    steps = engine.steps
    own = engine.privacy_state.comm_bytes
    if rank == 0:
        print(
            f"bytes/step all-reduced per rank: DDP {ddp_bytes.bytes / steps:.0f} + grapefx {own / steps:.0f} "
            f"= {(ddp_bytes.bytes + own) / steps:.0f} (dense gradients: "
            f"{4 * sum(p.numel() for p in model.parameters())})"
        )
        acc = accuracy_on(model, test, device)
        print(
            f"final: test accuracy {acc:.3f}  (epsilon={engine.epsilon():.2f}, delta={args.delta})  "
            f"{time.time() - start:.1f}s"
        )
    # Every rank waits here (GIL released) before the process group goes: a gloo worker thread that
    # still owns a finished collective must release it under the GIL, and the group's destructor
    # joins those threads while holding the GIL (a teardown deadlock seen under torchrun).
    dist.barrier()
    dist.destroy_process_group()


def accuracy_on(model: nn.Module, data: TensorDataset, device: torch.device) -> float:
    x, y = data.tensors
    return accuracy(model, TensorDataset(x.to(device), y.to(device)))


if __name__ == "__main__":
    main()
