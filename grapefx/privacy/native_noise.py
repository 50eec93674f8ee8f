"""The CPU noise kernel (`native/philox_normal.c`): built once per machine at first use, loaded by ctypes.

Why a kernel of our own: on CPU, DP noise is the one cost non-private training does not have and
no amount of graph rewriting removes: one Gaussian per parameter per step. torch's `normal_`
(mt19937, then Box–Muller) plus the add into the gradient measured ~4.7 ns per element on this
project's 2-core machine, 25–30 % of an MLP step; the kernel (Philox4x32-10 + vectorized Box–Muller,
added into the gradient in the same pass) measured ~1.2 ns (`grapefx.privacy.secure_rng.benchmark()`
prints both, with the secure mode's cost).

The shared library is cached under `$GRAPEFX_CACHE_DIR` (default `~/.cache/grapefx`), keyed by the
source, the compiler and this CPU, and written atomically, so concurrent processes (DDP ranks, test
workers) share one build. Without a working C compiler, or with `GRAPEFX_NATIVE_NOISE=0`, CPU noise
comes from torch's seeded generator instead (same distribution, a different stream; a warning says
so once).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native") / "philox_normal.c"
_FLAG_SETS = (  # tried in order: vector math (glibc libmvec) and this CPU's ISA, then portable
    ["-O3", "-march=native", "-ffast-math", "-fPIC", "-shared", "-lmvec", "-lm"],
    ["-O3", "-march=native", "-ffast-math", "-fPIC", "-shared", "-lm"],
    ["-O3", "-ffast-math", "-fPIC", "-shared", "-lm"],
)
_ARGTYPES = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint64]
KERNEL_DTYPES = (torch.float32, torch.float64)


class NativeNoise:
    """The loaded kernel: `add_(out, seed, stream, std)` for contiguous CPU float32/float64 tensors."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self._philox = lib.grapefx_philox4x32_10
        self._philox.argtypes = [ctypes.POINTER(ctypes.c_uint32 * 4), ctypes.POINTER(ctypes.c_uint32 * 2)]
        self._fill = {}
        for dtype, name, ctype in ((torch.float32, "f32", ctypes.c_float), (torch.float64, "f64", ctypes.c_double)):
            fn = getattr(lib, f"grapefx_normal_{name}")
            fn.argtypes = [*_ARGTYPES, ctype, ctypes.c_int]
            fn.restype = None
            self._fill[dtype] = fn

    def normal_(self, out: torch.Tensor, seed: int, stream: int, std: float, accumulate: bool) -> torch.Tensor:
        """out += std * z (accumulate) or out = std * z, z the N(0, 1) draw (seed, stream)."""
        if out.device.type != "cpu" or out.dtype not in KERNEL_DTYPES or not out.is_contiguous():
            raise ValueError(
                f"native noise needs a contiguous CPU float32/float64 tensor, got {out.dtype} {out.device}"
            )
        mask = (1 << 64) - 1
        self._fill[out.dtype](out.data_ptr(), out.numel(), seed & mask, stream & mask, std, int(accumulate))
        return out

    def philox(self, counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, ...]:
        """One Philox4x32-10 block (for the known-answer tests)."""
        c, k = (ctypes.c_uint32 * 4)(*counter), (ctypes.c_uint32 * 2)(*key)
        self._philox(ctypes.byref(c), ctypes.byref(k))
        return tuple(c)


def _cache_dir() -> Path:
    root = os.environ.get("GRAPEFX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "grapefx"
    )
    return Path(root) / "native"


def _cpu_signature() -> str:
    """What `-march=native` depends on: the CPU's model and feature flags (Linux), else the platform."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return platform.processor() + platform.machine()


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _build(cc: str, out: Path) -> str | None:
    """Compile the kernel into `out` (atomically); returns None, or the last compiler error."""
    error = "no flag set tried"
    out.parent.mkdir(parents=True, exist_ok=True)
    for flags in _FLAG_SETS:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        cmd = [cc, str(SOURCE), "-o", tmp, *flags]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            os.replace(tmp, out)
            return None
        os.unlink(tmp)
        error = f"`{' '.join(cmd)}` failed: {proc.stderr.strip()[-400:]}"
    return error


@functools.cache
def kernel() -> NativeNoise | None:
    """The kernel, built on first call (~1 s) or loaded from the cache; None if unavailable (warned)."""
    if os.environ.get("GRAPEFX_NATIVE_NOISE", "1") == "0":
        return None
    cc = _compiler()
    if cc is None:
        return _unavailable("no C compiler found (set CC)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), cc, version, repr(_FLAG_SETS), _cpu_signature()]).encode()
    ).hexdigest()[:20]
    path = _cache_dir() / f"philox_normal-{key}.so"
    if not path.exists():
        try:
            error = _build(cc, path)
        except OSError as e:
            error = f"{type(e).__name__}: {e}"
        if error is not None:
            return _unavailable(error)
    try:
        return NativeNoise(ctypes.CDLL(str(path)), path)
    except (OSError, AttributeError) as e:
        return _unavailable(f"could not load {path}: {e}")


def _unavailable(reason: str) -> None:
    warnings.warn(
        f"grapefx: the native CPU noise kernel is unavailable ({reason}); CPU noise comes from torch's "
        "seeded generator instead: the same N(0, σ²C²) distribution, a different stream, ~4x slower per "
        "element. Set GRAPEFX_NATIVE_NOISE=0 to choose that path without this warning.",
        RuntimeWarning,
        stacklevel=3,
    )
    return None
