"""The CPU noise kernel (grapefx/privacy/native_noise.py): Philox4x32-10 bits against Random123's
known answers, the normals against their torch-op definition, the distribution, and the fallback."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from scipy import stats

from grapefx.privacy import native_noise
from tests.philox_reference import philox4x32_10, reference_normal

# Random123's kat_vectors for philox4x32-10: (counter, key, output)
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]
SEED = 0x1234_5678_9ABC_DEF1  # both key words non-zero


@pytest.fixture(scope="module")
def native() -> native_noise.NativeNoise:
    k = native_noise.kernel()
    assert k is not None, "the kernel must build on the test machines (g++ is installed)"
    return k


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_philox_known_answers(native: native_noise.NativeNoise, counter, key, expected) -> None:
    assert native.philox(counter, key) == expected
    assert tuple(int(w) for w in philox4x32_10([torch.tensor(c) for c in counter], key)) == expected


@pytest.mark.parametrize("n", [1, 3, 64, 65, 1000, 4099])
@pytest.mark.parametrize("stream", [0, 7, 2**32 + 5])
def test_float64_kernel_is_its_definition(native: native_noise.NativeNoise, n: int, stream: int) -> None:
    """Every bit and the element order: the float64 kernel equals the torch-op definition to libm ulps."""
    got = native.normal_(torch.empty(n, dtype=torch.float64), SEED, stream, 1.0, accumulate=False)
    torch.testing.assert_close(got, reference_normal(n, SEED, stream), rtol=1e-12, atol=1e-12)


def test_float32_kernel_is_the_float64_draw_rounded(native: native_noise.NativeNoise) -> None:
    """float32 differs only by rounding: (x + 1/2) / 2^32 rounded to 24 bits moves a radius near 0 by
    up to ~3e-4 (as in any float32 Box–Muller, torch's included); everything else agrees to ~1e-6."""
    n = 1 << 16
    f32 = native.normal_(torch.empty(n), SEED, 3, 1.0, accumulate=False).double()
    f64 = native.normal_(torch.empty(n, dtype=torch.float64), SEED, 3, 1.0, accumulate=False)
    diff = (f32 - f64).abs()
    assert diff.max() < 1e-3
    assert (diff > 1e-5).float().mean() < 1e-3


def test_accumulate_scale_and_prefix(native: native_noise.NativeNoise) -> None:
    base = torch.linspace(-1, 1, 1000)
    z = native.normal_(torch.empty(1000), SEED, 1, 1.0, accumulate=False)
    torch.testing.assert_close(native.normal_(torch.empty(1000), SEED, 1, 0.25, accumulate=False), 0.25 * z)
    torch.testing.assert_close(native.normal_(base.clone(), SEED, 1, 0.25, accumulate=True), base + 0.25 * z)
    assert torch.equal(native.normal_(torch.empty(37), SEED, 1, 1.0, accumulate=False), z[:37])
    with pytest.raises(ValueError, match="contiguous CPU float32/float64"):
        native.normal_(torch.empty(10, 2).t(), SEED, 1, 1.0, accumulate=False)


def test_standard_normal_distribution(native: native_noise.NativeNoise) -> None:
    n = 1 << 20
    z = native.normal_(torch.empty(n, dtype=torch.float64), SEED, 11, 1.0, accumulate=False).numpy()
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.std() - 1) < 5 * math.sqrt(0.5 / n)
    assert abs(stats.kurtosis(z, fisher=False) - 3) < 0.05
    assert stats.kstest(z, "norm").pvalue > 1e-4
    tail = (abs(z) > 3).mean()  # 0.0027 for N(0, 1)
    assert abs(tail - 0.0027) < 5 * math.sqrt(0.0027 / n)
    assert abs(z).max() < math.sqrt(-2 * math.log(0.5 * 2**-32))  # the radius bound, 6.77
    for k in range(4):  # each of a block's four terms is N(0, 1) ...
        terms = z.reshape(-1, 4, 16)[:, k].ravel()
        assert stats.kstest(terms, "norm").pvalue > 1e-4
    for a, b in [(0, 1), (0, 2), (1, 3)]:  # ... and they are uncorrelated
        za, zb = z.reshape(-1, 4, 16)[:, a].ravel(), z.reshape(-1, 4, 16)[:, b].ravel()
        assert abs(float((za * zb).mean())) < 5 / math.sqrt(za.size)
    assert abs(float((z[1:] * z[:-1]).mean())) < 5 / math.sqrt(n)  # neighbours


def test_streams_and_keys_are_independent(native: native_noise.NativeNoise) -> None:
    n = 1 << 18
    draws = [
        native.normal_(torch.empty(n, dtype=torch.float64), key, stream, 1.0, False)
        for key, stream in [(SEED, 0), (SEED, 1), (SEED + 1, 0), (SEED, 2**32)]
    ]
    for i in range(len(draws)):
        for j in range(i + 1, len(draws)):
            assert abs(float((draws[i] * draws[j]).mean())) < 5 / math.sqrt(n), (i, j)


def test_builds_into_a_fresh_cache_and_loads_from_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPEFX_CACHE_DIR", str(tmp_path))
    native_noise.kernel.cache_clear()
    try:
        built = native_noise.kernel()
        assert built is not None and built.path.parent == tmp_path / "native"
        native_noise.kernel.cache_clear()
        assert native_noise.kernel().path == built.path  # the cached build, same key
        x = built.normal_(torch.empty(100), SEED, 0, 1.0, accumulate=False)
        torch.testing.assert_close(x.double(), reference_normal(100, SEED, 0), rtol=0, atol=1e-3)
    finally:
        native_noise.kernel.cache_clear()


def test_without_a_compiler_warns_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """No compiler: a warning naming the reason, and noise from torch's generator (still N(0, σ²))."""
    from grapefx.privacy.noise import PrivacyState, _add_noise_

    monkeypatch.setattr(native_noise, "_compiler", lambda: None)
    native_noise.kernel.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no C compiler found.*torch's seeded generator"):
            assert native_noise.kernel() is None
        x = torch.zeros(1000)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once, not per draw
            _add_noise_(x, torch.tensor(1.0), PrivacyState(seed=2))
        assert torch.equal(x, torch.randn(1000, generator=torch.Generator().manual_seed(2)))
    finally:
        native_noise.kernel.cache_clear()
    monkeypatch.setenv("GRAPEFX_NATIVE_NOISE", "0")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # opted out: no warning
            assert native_noise.kernel() is None
    finally:
        native_noise.kernel.cache_clear()
