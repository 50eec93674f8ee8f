"""A private character-level language model: a tiny GPT trained with DP-SGD via `grapefx.make_private`.

Data: the source code of Python's own standard library (the top-level ``*.py`` files of
``os.path.dirname(os.__file__)``, in sorted order, the first ``--chars`` characters), so it ships with
every Python and is the same on every machine with the same Python version. Characters are mapped to
printable ASCII plus newline (tabs become four spaces, anything else ``?``). The text is cut into
non-overlapping chunks of ``--context + 1`` characters; every 10th chunk is held out for validation.
**One training example (the unit of privacy) is one chunk**: the guarantee is about any single
65-character piece of the corpus, not about a whole file or author.

Model: token embedding + learned positions + ``--layers`` pre-LN transformer blocks (causal
``F.scaled_dot_product_attention``) + LayerNorm + linear head. The same model is trained twice from
the same initialisation, for the same number of steps on the same expected batch size: once
non-privately (shuffled batches, no clipping, no noise) and once with DP-SGD (Poisson batches,
per-sample clipping to ``--max-grad-norm``, noise calibrated for ``--target-epsilon`` at ``--delta``
over the whole run). It reports validation loss and perplexity (per character) of both, the
unigram-model perplexity of the text as a floor any model should beat, and the epsilon spent.

    python examples/train_lm.py            # ~2 minutes on 2 CPU cores
    python examples/train_lm.py --quick    # a smoke run, about 30 s
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from grapefx.privacy.engine import make_private

VOCAB = ["\n"] + [chr(c) for c in range(32, 127)]  # 96 symbols; '?' doubles as "unknown"
_INDEX = {ch: i for i, ch in enumerate(VOCAB)}


# -- data --------------------------------------------------------------------------------------------
def stdlib_text(n_chars: int) -> tuple[str, int]:
    """The first ``n_chars`` characters of the stdlib's top-level sources (and how many files that took)."""
    stdlib = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))
    if not files:
        raise SystemExit(f"no Python sources under {stdlib}; this example needs the stdlib's .py files")
    parts, total, used = [], 0, 0
    for path in files:
        used += 1
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read().replace("\t", "    ")
        parts.append(text)
        total += len(text)
        if total >= n_chars:
            break
    return "".join(parts)[:n_chars], used


def encode(text: str) -> torch.Tensor:
    unknown = _INDEX["?"]
    return torch.tensor([_INDEX.get(ch, unknown) for ch in text], dtype=torch.long)


def chunks(ids: torch.Tensor, context: int) -> tuple[TensorDataset, TensorDataset, torch.Tensor]:
    """Non-overlapping ``context + 1`` chunks -> (train, validation) datasets of (input, target)."""
    n = ids.numel() // (context + 1)
    rows = ids[: n * (context + 1)].view(n, context + 1)
    val_mask = torch.arange(n) % 10 == 9
    train, val = rows[~val_mask], rows[val_mask]
    return (
        TensorDataset(train[:, :-1].contiguous(), train[:, 1:].contiguous()),
        TensorDataset(val[:, :-1].contiguous(), val[:, 1:].contiguous()),
        train,
    )


# -- model -------------------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        q = q.view(B, T, self.heads, D // self.heads).transpose(1, 2)
        k = k.view(B, T, self.heads, D // self.heads).transpose(1, 2)
        v = v.view(B, T, self.heads, D // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), CausalSelfAttention(d, heads)
        self.ln2, self.fc, self.fc_out = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, context: int, d: int, heads: int, layers: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(1, context, d))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos[:, : ids.shape[1]]
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln_f(h))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each sequence's mean per-character cross-entropy (a mean over samples,
    as ``loss_reduction="mean"`` requires; an empty Poisson batch gives NaN, which is fine)."""
    per_char = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return per_char.view(targets.shape).mean(dim=1).mean()


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset, batch: int = 512) -> float:
    """Mean per-character cross-entropy (nats) on ``data``."""
    model.eval()
    x, y = data.tensors
    total = 0.0
    for i in range(0, len(x), batch):
        logits = model(x[i : i + batch])
        total += F.cross_entropy(logits.flatten(0, 1), y[i : i + batch].flatten(), reduction="sum").item()
    model.train()
    return total / y.numel()


# -- training ----------------------------------------------------------------------------------------
def train(args: argparse.Namespace, train_set: TensorDataset, val_set: TensorDataset, private: bool) -> dict:
    torch.manual_seed(args.seed)
    model = TinyGPT(len(VOCAB), args.context, args.d_model, args.heads, args.layers)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr_private if private else args.lr)
    loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    train_model: nn.Module = model
    engine = None
    if private:
        train_model, opt, loader, engine = make_private(
            model, opt, loader,
            target_epsilon=args.target_epsilon, target_delta=args.delta, steps=args.steps,
            max_grad_norm=args.max_grad_norm, seed=args.seed,
        )  # fmt: skip
    name = "DP-SGD" if private else "non-private"
    if engine is not None:
        print(
            f"[{name}] sample rate {engine.sample_rate:.5f}  noise multiplier {engine.noise_multiplier:.3f}  "
            f"max grad norm {engine.max_grad_norm}  planned steps {args.steps}",
            flush=True,
        )
    step, start, running = 0, time.time(), []
    while step < args.steps:
        for x, y in loader:
            loss = lm_loss(train_model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            step += 1
            if len(y):
                running.append(loss.item())
            if step % args.log_every == 0 or step == args.steps:
                eps = f"  epsilon {engine.epsilon():.2f}" if engine is not None else ""
                mean = sum(running) / max(len(running), 1)
                print(f"[{name}] step {step:4d}  train loss {mean:.3f}{eps}  ({time.time() - start:.0f}s)", flush=True)
                running = []
            if step >= args.steps:
                break
    val = evaluate(model, val_set)
    return {
        "private": private,
        "val_loss": val,
        "val_perplexity": math.exp(val),
        "epsilon": engine.epsilon() if engine is not None else math.inf,
        "noise_multiplier": engine.noise_multiplier if engine is not None else 0.0,
        "steps": step,
        "seconds": round(time.time() - start, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chars", type=int, default=1_000_000, help="characters of stdlib source to use")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128, help="expected (mean) Poisson batch size")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate, non-private run")
    ap.add_argument("--lr-private", type=float, default=3e-3, help="Adam learning rate, private run")
    ap.add_argument("--target-epsilon", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument(
        "--quick", action="store_true", help="a smoke run: 200k characters, context 32, width 48, batch 64, 20 steps"
    )
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()
    if args.quick:
        args.chars, args.context, args.d_model, args.batch_size, args.steps, args.log_every = (
            200_000, 32, 48, 64, 20, 10)  # fmt: skip
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    text, n_files = stdlib_text(args.chars)
    ids = encode(text)
    train_set, val_set, train_rows = chunks(ids, args.context)
    counts = torch.bincount(train_rows.flatten(), minlength=len(VOCAB)).double()
    p = counts / counts.sum()
    unigram = -(p[p > 0] * p[p > 0].log()).sum().item()  # entropy of the training characters
    print(
        f"data: {len(text):,} characters of Python {sys.version.split()[0]} stdlib source ({n_files} files); "
        f"{len(train_set):,} training / {len(val_set):,} validation chunks of {args.context + 1} characters; "
        f"unigram perplexity {math.exp(unigram):.2f}",
        flush=True,
    )
    results = {"data_chars": len(text), "files": n_files, "unigram_perplexity": math.exp(unigram)}
    for private in (False, True):
        results["private" if private else "non_private"] = train(args, train_set, val_set, private)

    np_, dp = results["non_private"], results["private"]
    print(
        f"\nvalidation perplexity per character ({args.steps} steps, expected batch {args.batch_size}):\n"
        f"  unigram baseline        {results['unigram_perplexity']:.2f}\n"
        f"  non-private             {np_['val_perplexity']:.2f}  (loss {np_['val_loss']:.3f}, {np_['seconds']}s)\n"
        f"  DP-SGD epsilon={dp['epsilon']:.2f}    {dp['val_perplexity']:.2f}  (loss {dp['val_loss']:.3f}, "
        f"sigma {dp['noise_multiplier']:.3f}, delta {args.delta}, {dp['seconds']}s)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **results}, f, indent=2)


if __name__ == "__main__":
    main()
