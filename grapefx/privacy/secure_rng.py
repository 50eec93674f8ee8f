"""Randomness from the operating system's CSPRNG, for DP noise and Poisson sampling in secure mode.

The seeded default (Philox: grapefx's kernel on CPU, a ``torch.Generator`` on CUDA; Mersenne Twister
on a CPU without a C compiler) is reproducible but *not* cryptographically secure: its output is
predictable from the seed (and, for Mersenne Twister, from a few observed values), so an adversary
who guesses the seed or sees enough of the stream can subtract the noise. Re-seeding such a generator
from ``secrets`` for every draw does not fix that (it is still a PRNG stream per draw, and a 63-bit
seed).

Here every uniform comes from ``os.urandom`` (``getrandom(2)`` on Linux: the kernel ChaCha20 CSPRNG),
64 bits at a time, turned into a float64 in (0, 1] with 53 random mantissa bits; Gaussians come from
the Box–Muller transform in float64 and are cast to the requested dtype at the end. The samples are
produced on the CPU (in chunks, so peak extra memory stays ~50 MB) and copied to the target device.

What this does *not* protect against: floating-point artefacts of sampling a continuous Gaussian in
finite precision (Mironov 2012; Holohan & Braghin 2021; Jin et al. 2022 — the float64 -> float32
rounding here makes the lattice attack of the last much harder but it is not a proven discrete
sampler) and timing side channels. Reproducibility is gone by design: there is no state to save.

Cost (``from grapefx.privacy.secure_rng import benchmark; benchmark()``: CPU time of one thread per
1e6 float32 samples, median of 30; x86-64 cloud VM, torch 2.13, Python 3.11): ``torch.randn`` with
the seeded generator 2.8 ms (grapefx's CPU Philox kernel, added in place: ~1.2 ms); here 38-43 ms,
of which ``os.urandom`` (8 MB) is 15-17 ms, making the 53-bit uniforms 4 ms and Box–Muller's
log/sqrt/cos/sin the rest: ~15x the seeded generator. Per
optimizer step that is ~40 ms per million trainable parameters (5 ms for a 117k-parameter model,
~5 s for GPT-2's 124M), on the CPU whatever the model's device, plus the host-to-device copy.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

_CHUNK = 1 << 21  # samples per Box–Muller chunk: 2M float64 pairs ~ 48 MB of temporaries
_TWO_PI = 2.0 * math.pi


def secure_uniform(n: int) -> np.ndarray:
    """``n`` float64 uniforms in (0, 1] with 53 random bits each, from ``os.urandom``."""
    bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
    u = (bits >> np.uint64(11)).astype(np.float64)
    u += 1.0
    u *= 2.0**-53
    return u


def _box_muller(out: np.ndarray) -> None:
    """Fill the float64 vector ``out`` with independent N(0, 1) samples."""
    n = out.shape[0]
    m = (n + 1) // 2
    u1, u2 = secure_uniform(m), secure_uniform(m)
    np.log(u1, out=u1)
    u1 *= -2.0
    np.sqrt(u1, out=u1)  # radius
    u2 *= _TWO_PI  # angle
    k = n - m  # the second half gets the sines (m or m - 1 of them)
    np.multiply(u1, np.cos(u2), out=out[:m])
    if k:
        np.multiply(u1[:k], np.sin(u2[:k]), out=out[m:])


def secure_standard_normal(
    shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A tensor of i.i.d. N(0, 1) samples drawn from the OS CSPRNG (float64 Box–Muller, then cast)."""
    n = math.prod(shape)
    out = torch.empty(n, dtype=dtype)
    buf = np.empty(min(n, _CHUNK), dtype=np.float64)
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        chunk = buf[: stop - start]
        _box_muller(chunk)
        out[start:stop] = torch.from_numpy(chunk)  # the cast to dtype happens here
    out = out.reshape(shape)
    return out if torch.device(device).type == "cpu" else out.to(device)


def secure_bernoulli_mask(n: int, p: float) -> torch.Tensor:
    """A bool tensor of ``n`` independent Bernoulli(p) draws from the OS CSPRNG (Poisson sampling)."""
    return torch.from_numpy(secure_uniform(n) <= p)


def benchmark(n: int = 10**6, reps: int = 30) -> None:
    """Print the CPU time per ``n`` float32 samples: the seeded sources vs this module."""
    import itertools
    import statistics
    import time

    from grapefx.privacy.native_noise import kernel

    torch.set_num_threads(1)
    gen, grad, streams = torch.Generator().manual_seed(0), torch.zeros(n), itertools.count()
    cases = {
        "torch.randn, seeded generator": lambda: torch.randn(n, generator=gen),
        "torch.randn + add into a gradient": lambda: grad.add_(torch.randn(n, generator=gen), alpha=0.1),
        "os.urandom alone (8 bytes/sample)": lambda: os.urandom(8 * n),
        "secure 53-bit uniforms": lambda: secure_uniform(n),
        "secure normals (Box-Muller)": lambda: secure_standard_normal((n,)),
    }
    native = kernel()
    if native is not None:
        cases["Philox kernel, added in place"] = lambda: native.normal_(grad, 0, next(streams), 0.1, True)
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(reps):
        for k, f in cases.items():
            t = time.process_time()
            f()
            times[k].append(time.process_time() - t)
    for k, v in times.items():
        print(f"{k:36s} {statistics.median(v) * 1e3:8.2f} ms per {n:.0e} samples (median CPU time, 1 thread)")
