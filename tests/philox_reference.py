"""The CPU noise kernel's definition (grapefx/privacy/native/philox_normal.c), in plain torch ops:
Philox4x32-10 bits, then Box–Muller, elements in groups of 64 from 16 blocks. Slow; for tests only."""

from __future__ import annotations

import math

import torch

M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
MASK = 0xFFFFFFFF


def _mulhilo(m: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of m * c, in int64 without overflow: c split into 16-bit halves."""
    a, b = (c & 0xFFFF) * m, (c >> 16) * m  # each < 2^48
    return (b + (a >> 16)) >> 16, (a + ((b & 0xFFFF) << 16)) & MASK


def philox4x32_10(ctr: list[torch.Tensor], key: tuple[int, int]) -> list[torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding 32-bit words (counter words broadcast together)."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in ctr)
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo(M0, c0)
        hi1, lo1 = _mulhilo(M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
    return [c0, c1, c2, c3]


def reference_normal(n: int, seed: int, stream: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The kernel's n standard normals for (seed, stream), computed in `dtype`."""
    groups = -(-n // 64)
    block = torch.arange(16 * groups, dtype=torch.int64)
    x = philox4x32_10(
        [block & MASK, block >> 32, torch.tensor(stream & MASK), torch.tensor((stream >> 32) & MASK)],
        (seed & MASK, (seed >> 32) & MASK),
    )
    u0, v1, u2, v3 = (w.to(dtype) for w in x)  # uint32 -> float rounds to nearest, as C's cast
    scale = 2.0**-32
    r, s = torch.sqrt(-2 * torch.log((u0 + 0.5) * scale)), torch.sqrt(-2 * torch.log((u2 + 0.5) * scale))
    t1, t3 = 2 * math.pi * (v1 * scale), 2 * math.pi * (v3 * scale)
    terms = torch.stack([r * torch.cos(t1), r * torch.sin(t1), s * torch.cos(t3), s * torch.sin(t3)])
    return terms.view(4, groups, 16).transpose(0, 1).reshape(-1)[:n]
