"""How many row blocks the ghost norms' symmetric Gram products should use (`grapefx/rules/gram.py`).

    python -m tools.gram_blocks

For a few (T, B, M, N) shapes of the GPT / Llama benchmark layers: the median time of
`symmetric_gram_dot` (eager, one thread) with k = 1, 2, 4 row blocks, after checking that every k
gives the same norms. More blocks compute fewer products ((k+1)/2k of them) but smaller ones, and
every block is more ops to trace when compiling.
"""

from __future__ import annotations

import torch
import torch.utils.benchmark as tb

from grapefx.rules import gram

SHAPES = [(32, 16, 256, 256), (64, 16, 256, 1024), (64, 8, 128, 344), (64, 8, 128, 2048)]
SHAPES += [(128, 16, 256, 1024), (128, 16, 256, 8192), (256, 8, 256, 1024), (512, 4, 256, 1024)]
# MoE's experts and attention (d 128, width 256, T=64, B=8); small GPT layers
SHAPES += [(64, 8, 128, 128), (64, 8, 128, 256), (64, 8, 256, 128), (32, 16, 256, 1024), (128, 16, 64, 64)]


def _blocked(L: torch.Tensor, R: torch.Tensor, k: int) -> torch.Tensor:
    chosen = gram.block_count
    gram.block_count = lambda T, width: k
    try:
        return gram.symmetric_gram_dot(gram.dense_blocks(L), gram.dense_blocks(R), L.shape[1], L.shape[2] + R.shape[2])
    finally:
        gram.block_count = chosen


def main() -> None:
    torch.set_num_threads(1)
    print("| T | B | M | N | k=1 ms | k=2 ms | k=4 ms | grapefx's k |")
    print("|---|---|---|---|---|---|---|---|")
    for T, B, M, N in SHAPES:
        L, R = torch.randn(B, T, M), torch.randn(B, T, N)
        ref = _blocked(L, R, 1)
        times = []
        for k in (1, 2, 4):
            torch.testing.assert_close(_blocked(L, R, k), ref, rtol=1e-4, atol=0)
            timer = tb.Timer("f(L, R, k)", globals={"f": _blocked, "L": L, "R": R, "k": k})
            times.append(timer.blocked_autorange(min_run_time=1.0).median * 1e3)
        cells = " | ".join(f"{t:.2f}" for t in times)
        print(f"| {T} | {B} | {M} | {N} | {cells} | {gram.block_count(T, M + N)} |", flush=True)


if __name__ == "__main__":
    main()
