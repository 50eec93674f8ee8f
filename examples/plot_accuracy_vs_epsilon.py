"""Accuracy of the private digits classifier against the privacy budget epsilon, as a plot.

Trains the MLP of `train_digits.py` (same data split and preprocessing, imported from it) without
privacy and with DP-SGD through `grapefx.make_private` at epsilon = 8, 3, 1 (delta = 1e-5; sigma
calibrated with the PLD accountant for the whole run), over several seeds, and writes

    results/accuracy_vs_epsilon.png    the plot (mean and min-max over seeds)
    results/accuracy_vs_epsilon.json   every run: epsilon target and spent, sigma, accuracy, time
    results/accuracy_vs_epsilon.md     the table

    python examples/plot_accuracy_vs_epsilon.py            # 15 epochs, 3 seeds: a few minutes on 2 cores
    python examples/plot_accuracy_vs_epsilon.py --quick    # 5 epochs, 1 seed: about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_digits import accuracy, load_data  # noqa: E402  (the example next to this one)

from grapefx.privacy.engine import make_private  # noqa: E402

EPSILONS = (8.0, 3.0, 1.0)  # the default --epsilons


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def train_once(target_epsilon: float | None, args: argparse.Namespace, seed: int) -> dict:
    """One training run; ``target_epsilon=None`` trains without privacy (same model, data, optimizer)."""
    train, test = load_data(seed)
    model = make_model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    engine = None
    if target_epsilon is not None:
        train_model, opt, loader, engine = make_private(
            model,
            opt,
            loader,
            target_epsilon=target_epsilon,
            target_delta=args.delta,
            epochs=args.epochs,
            max_grad_norm=args.max_grad_norm,
            seed=seed,
        )
    else:
        train_model = model
    start = time.time()
    for _ in range(args.epochs):
        for x, y in loader:
            F.cross_entropy(train_model(x), y).backward()
            opt.step()
            opt.zero_grad()
    return {
        "target_epsilon": target_epsilon,
        "epsilon": engine.epsilon() if engine else None,
        "noise_multiplier": engine.noise_multiplier if engine else 0.0,
        "steps": engine.steps if engine else args.epochs * len(loader),
        "seed": seed,
        "accuracy": accuracy(model, test),
        "seconds": round(time.time() - start, 2),
    }


def summarize(runs: list[dict], epsilons: list[float]) -> list[dict]:
    rows = []
    for target in [None, *epsilons]:
        rs = [r for r in runs if r["target_epsilon"] == target]
        if not rs:
            continue
        accs = [r["accuracy"] for r in rs]
        rows.append(
            {
                "target_epsilon": target,
                "epsilon": max(r["epsilon"] for r in rs) if target is not None else None,
                "noise_multiplier": rs[0]["noise_multiplier"],
                "accuracy_mean": statistics.fmean(accs),
                "accuracy_min": min(accs),
                "accuracy_max": max(accs),
                "seeds": len(rs),
            }
        )
    return rows


def write_results(rows: list[dict], runs: list[dict], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, args.name)
    setting = (
        f"{args.epochs} epochs, expected batch {args.batch_size}, C={args.max_grad_norm}, delta={args.delta}, "
        f"Adam lr={args.lr}, {len({r['seed'] for r in runs})} seed(s)"
    )
    with open(base + ".json", "w") as f:
        json.dump({"setting": setting, "summary": rows, "runs": runs, "torch": torch.__version__}, f, indent=2)

    lines = [
        "# Digits MLP: test accuracy vs epsilon (DP-SGD via grapefx.make_private)",
        "",
        f"{setting}; {platform.machine()} CPU, torch {torch.__version__}.",
        "",
        "| target epsilon | epsilon spent | noise multiplier | accuracy (mean) | min | max |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = "non-private" if r["target_epsilon"] is None else f"{r['target_epsilon']:g}"
        e = "inf" if r["epsilon"] is None else f"{r['epsilon']:.3f}"
        lines.append(
            f"| {t} | {e} | {r['noise_multiplier']:.3f} | {r['accuracy_mean']:.3f} | "
            f"{r['accuracy_min']:.3f} | {r['accuracy_max']:.3f} |"
        )
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")

    private = [r for r in rows if r["target_epsilon"] is not None]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs = [r["target_epsilon"] for r in private]
    ys = [r["accuracy_mean"] for r in private]
    err = [
        [r["accuracy_mean"] - r["accuracy_min"] for r in private],
        [r["accuracy_max"] - r["accuracy_mean"] for r in private],
    ]
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, label="DP-SGD (grapefx)")
    for r in rows:
        if r["target_epsilon"] is None:
            ax.axhline(r["accuracy_mean"], color="gray", linestyle="--", label="non-private")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.margins(y=0.15)
    ax.set_xlabel(f"epsilon (delta = {args.delta:g})")
    ax.set_ylabel("test accuracy")
    ax.set_title("Digits MLP: accuracy vs privacy budget")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(base + ".png", dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..n-1 (default 3, or 1 with --quick)")
    ap.add_argument("--epsilons", type=float, nargs="+", default=list(EPSILONS))
    ap.add_argument("--batch-size", type=int, default=128, help="expected (mean) Poisson batch size")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--quick", action="store_true", help="5 epochs, 1 seed unless --seeds (a smoke run)")
    ap.add_argument("--out-dir", default="results")
    ap.add_argument("--name", default=None, help="file name stem (default accuracy_vs_epsilon[_quick])")
    args = ap.parse_args()
    if args.quick:
        args.epochs = 5
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    args.name = args.name or ("accuracy_vs_epsilon_quick" if args.quick else "accuracy_vs_epsilon")
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    runs = []
    for seed in range(args.seeds):
        for target in [None, *args.epsilons]:
            r = train_once(target, args, seed)
            runs.append(r)
            eps = "inf (non-private)" if r["epsilon"] is None else f"{r['epsilon']:.3f}"
            print(
                f"seed {seed}  target epsilon {target!s:>5}  sigma {r['noise_multiplier']:.3f}  "
                f"epsilon {eps}  accuracy {r['accuracy']:.3f}  ({r['seconds']}s)",
                flush=True,
            )
    rows = summarize(runs, args.epsilons)
    write_results(rows, runs, args)
    for r in rows:
        t = "non-private" if r["target_epsilon"] is None else f"epsilon={r['target_epsilon']:g}"
        print(f"{t:>12}: accuracy {r['accuracy_mean']:.3f} (min {r['accuracy_min']:.3f}, max {r['accuracy_max']:.3f})")
    print(f"wrote {os.path.join(args.out_dir, args.name)}.png/.json/.md")


if __name__ == "__main__":
    main()
