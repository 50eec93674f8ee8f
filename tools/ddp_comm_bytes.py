"""Bytes all-reduced per step in data-parallel private training: Book-Keeping vs DP-GRAPE.

    torchrun --standalone --nproc-per-node 2 tools/ddp_comm_bytes.py [--out results/ddp-comm-bytes]

Each configuration compiles the model with grapefx, wraps it as DistributedDataParallel (the
documented order) and runs 2 steps; DDP's buckets are counted by a counting all-reduce comm hook
(`grapefx.distributed.comm.count_ddp_bytes`), grapefx's own all-reduce of the projected gradients Ĝ
by `privacy_state.comm_bytes`. Figures are payload bytes per rank per step (float32); a ring
all-reduce sends about 2(N-1)/N times that over each rank's link. Batch size does not change them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grapefx  # noqa: E402
from grapefx.distributed.comm import count_ddp_bytes  # noqa: E402

CONFIGS = {
    "bk": {"strategy": "auto"},
    "grape16": {"strategy": "grape", "rank": 16},
    "grape64": {"strategy": "grape", "rank": 64},
}


def _case(name: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, object]:
    from models import GPT, MLP, class_loss, token_loss

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "M1":
        return MLP(), torch.randn(8, 784, generator=g), torch.randint(0, 10, (8,), generator=g), class_loss
    model = GPT(vocab=8192, d=256, n_layer=4, heads=4, max_t=512)
    ids = torch.randint(0, 8192, (2, 33), generator=g)
    return model, ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), token_loss


def measure(case: str, config: str) -> dict:
    model, x, y, loss_fn = _case(case)
    cm = grapefx.compile(
        model, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=16, seed=0, **CONFIGS[config]
    )
    ddp = DDP(cm)
    counter = count_ddp_bytes(ddp)
    steps = 2
    for _ in range(steps):
        loss_fn(ddp(x), y).backward()
        model.zero_grad(set_to_none=True)
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "case": case,
        "config": config,
        "params": n_params,
        "projected": len(cm.privacy_config.grape_params or ()),
        "ddp_bytes": counter.bytes / steps,
        "grapefx_bytes": cm.privacy_state.comm_bytes / steps,
        "dense_bytes": 4 * n_params,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="M1,M3")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md (rank 0)")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rows = [measure(case, config) for case in args.cases.split(",") for config in CONFIGS]
    if dist.get_rank() == 0:
        lines = [
            f"world size {dist.get_world_size()}, torch {torch.__version__}, payload bytes per rank per step",
            "",
            "| model | config | params | projected weights | DDP bytes | grapefx bytes (Ĝ) | total | × vs dense |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            total = r["ddp_bytes"] + r["grapefx_bytes"]
            lines.append(
                f"| {r['case']} | {r['config']} | {r['params']:,} | {r['projected']} | {r['ddp_bytes']:,.0f} | "
                f"{r['grapefx_bytes']:,.0f} | {total:,.0f} | {total / r['dense_bytes']:.3f} |"
            )
        print("\n".join(lines))
        if args.out:
            Path(f"{args.out}.json").write_text(json.dumps(rows, indent=1))
            Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    dist.barrier()  # before teardown: see the end of examples/train_digits_ddp.py
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
