"""Parameters and buffers changed in place inside the forward.

A change that does not read the batch (a weight clamp through `.data`, a max-norm constraint under
no_grad, a step counter) is allowed and leaves the gradient exact: the zoo model
`constrained_weights` checks the first two against the oracle, and slow `hf_gemma3n` the real
Gemma-3n. A change computed from the batch would be released with the model without noise: it is
refused, naming the parameter or buffer, at every batch size (B = 1 included, where the mixing
checks do not run).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from oracle import assert_grads_match, oracle_grads
from test_zoo_oracle import run_against_oracle
from zoo import case

import grapefx


class _Base(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.register_buffer("stat", torch.zeros(8))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin(x)))


class BufferCopiesASample(_Base):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.stat.copy_(x[0])
        return super().forward(x)


class BufferRunningMean(_Base):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.stat.mul_(0.9).add_(0.1 * x.mean(0))
        return super().forward(x)


class BufferOfActivations(_Base):
    """A cache of the hidden states, the way a memory or a prototype table is kept."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        with torch.no_grad():
            self.stat.copy_(h.detach().amax(0))
        return self.head(torch.tanh(h))


class WeightDataFromASample(_Base):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.lin.weight.data[0].copy_(x[-1])
        return super().forward(x)


class WeightScaledByTheBatch(_Base):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.lin.weight.mul_(1.0 / (1.0 + x.abs().max()))
        return super().forward(x)


class SampleCounter(_Base):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.steps.add_(x.shape[0])
        return super().forward(x)


class StepCounter(_Base):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.steps.add_(1)
        return super().forward(x)


LEAKS = [
    (BufferCopiesASample, "buffer `stat`"),
    (BufferRunningMean, "buffer `stat`"),
    (BufferOfActivations, "buffer `stat`"),
    (WeightDataFromASample, "parameter `lin.weight`"),
    (WeightScaledByTheBatch, "parameter `lin.weight`"),
]
# every leak at B = 4 and 1; a counter of samples (the batch size is private under Poisson
# sampling) at B = 4 only: the B=1 graph adds the constant 1, and every B >= 2 graph refuses it
CASES = [pytest.param(cls, what, B, id=f"{cls.__name__}-B{B}") for cls, what in LEAKS for B in (4, 1)]
CASES.append(pytest.param(SampleCounter, "buffer `steps`", 4, id="SampleCounter-B4"))


@pytest.mark.parametrize("cls,what,B", CASES)
def test_state_written_from_the_batch_is_refused(cls: type[nn.Module], what: str, B: int) -> None:
    torch.manual_seed(0)
    model = cls()
    cm = grapefx.compile(model, max_grad_norm=1.0, noise_multiplier=0.0)
    x, y = torch.randn(B, 8), torch.randint(0, 3, (B,))
    with pytest.raises(
        grapefx.BatchMixingError, match=rf"(?s)writes values computed from the batch into {what}.*without noise"
    ):
        F.cross_entropy(cm(x), y).backward()


def test_batch_norm_running_statistics_are_refused_at_batch_size_1() -> None:
    """At B=1 the mixing checks do not run (one sample mixes with none), but the running mean would
    hold that sample's own mean."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    cm = grapefx.compile(model, max_grad_norm=1.0, noise_multiplier=0.0)
    with pytest.raises(grapefx.BatchMixingError, match=r"buffer `1\.running_mean`.*replace_batch_norm"):
        cm(torch.randn(1, 3, 6, 6)).pow(2).sum().backward()


def test_a_step_counter_is_kept_and_the_gradient_is_exact() -> None:
    torch.manual_seed(0)
    model = StepCounter()
    cm = grapefx.compile(model, max_grad_norm=0.5, noise_multiplier=0.0, loss_reduction="sum")
    twin = _Base()  # the same model without the counter, for the oracle
    for step, B in enumerate((4, 1, 5), start=1):
        x, y = torch.randn(B, 8), torch.randint(0, 3, (B,))
        model.zero_grad(set_to_none=True)
        F.cross_entropy(cm(x), y, reduction="sum").backward()
        assert int(model.steps) == step
        twin.load_state_dict(model.state_dict())
        ref, _ = oracle_grads(twin, (x, y), lambda o, t: F.cross_entropy(o, t, reduction="sum"), 0.5, "sum")
        assert_grads_match(model, ref)


def test_constrained_weights_are_clamped_and_exact_under_inductor() -> None:
    zc = case("constrained_weights")
    run_against_oracle(zc, reduction="mean", codegen="inductor", sizes=(3, 6))


def test_constraints_bind_and_persist() -> None:
    """The compiled forward applies the in-place constraints to the user's parameters."""
    model = case("constrained_weights").make()
    assert model.coefs.weight.abs().max() > 0.3 and model.rows.weight.norm(dim=1).max() > 0.8
    cm = grapefx.compile(model, max_grad_norm=1.0, noise_multiplier=0.0)
    F.cross_entropy(cm(torch.randn(4, 6)), torch.randint(0, 3, (4,))).backward()
    assert model.coefs.weight.abs().max() <= 0.3 + 1e-7
    assert model.rows.weight.norm(dim=1).max() <= 0.8 + 1e-5
    assert all(p.grad is not None for p in model.parameters())


def test_embedding_max_norm_is_refused() -> None:
    """nn.Embedding(max_norm=...) renormalizes, in place, the rows the batch looks up: which rows
    changed tells which tokens the batch held."""
    model = nn.Sequential(nn.Embedding(16, 8, max_norm=1.0), nn.Flatten(), nn.Linear(5 * 8, 3))
    cm = grapefx.compile(model, max_grad_norm=1.0, noise_multiplier=0.0)
    with pytest.raises(grapefx.BatchMixingError, match=r"parameter `0\.weight`.*embedding_renorm"):
        cm(torch.randint(0, 16, (4, 5))).pow(2).sum().backward()


# ----------------------------------------------------------------------------------------------
# weight_norm / spectral_norm: parametrizations, and the deprecated hooks that store the weight
# ----------------------------------------------------------------------------------------------
class _Normed(nn.Module):
    def __init__(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        super().__init__()
        self.a = wrap(nn.Linear(8, 8))
        self.b = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _sum_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="sum")


def _loop_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, C: float) -> dict[str, torch.Tensor]:
    """Σ_i c_i g_i by plain autograd, one sample at a time, each from the buffers the step began with
    (spectral norm's power iteration advances them on every training forward)."""
    start = {k: v.clone() for k, v in model.named_buffers()}
    ref = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for i in range(x.shape[0]):
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(start[k])
        model.zero_grad(set_to_none=True)
        _sum_ce(model(x[i : i + 1]), y[i : i + 1]).backward()
        g = {n: p.grad.double() for n, p in model.named_parameters()}
        c = min(1.0, C / (float(torch.sqrt(sum((v**2).sum() for v in g.values()))) + 1e-6))
        for n in ref:
            ref[n] += c * g[n]
    return ref


@pytest.mark.parametrize(
    "wrap",
    [nn.utils.weight_norm, nn.utils.spectral_norm, nn.utils.parametrizations.spectral_norm],
    ids=["weight_norm_hook", "spectral_norm_hook", "spectral_norm"],
)
def test_weight_and_spectral_norm_are_exact(wrap: Callable[[nn.Module], nn.Module]) -> None:
    """The deprecated hooks store the weight they compute on the module: a forward output whose
    tangent is zero unless someone differentiates it (checked at run time). Spectral norm updates
    its power-iteration buffers from the weight alone, which is allowed. (parametrizations'
    weight_norm is in the zoo, `weight_norm`.)"""
    torch.manual_seed(0)
    model, C = _Normed(wrap), 0.5
    cm = grapefx.compile(model, max_grad_norm=C, noise_multiplier=0.0, loss_reduction="sum")
    clipped = 0
    for B in (4, 1, 6):
        x, y = torch.randn(B, 8), torch.randint(0, 3, (B,))
        start = {k: v.clone() for k, v in model.named_buffers()}
        model.zero_grad(set_to_none=True)
        _sum_ce(cm(x), y).backward()
        got = {n: p.grad.clone() for n, p in model.named_parameters()}
        after = {k: v.clone() for k, v in model.named_buffers()}
        clipped += int((cm.per_sample_norms() > C).sum())
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(start[k])
        ref = _loop_reference(model, x, y, C)
        for k, v in model.named_buffers():
            torch.testing.assert_close(v, after[k])  # the loop advanced them as the step did
        for n, g in got.items():
            torch.testing.assert_close(g.double(), ref[n], rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"{n} B={B}: {m}")
    assert clipped > 0


def test_differentiating_a_stored_weight_outside_the_model_is_refused() -> None:
    """A regularizer on the weight the weight_norm hook stored: a gradient no sample owns."""
    model = _Normed(nn.utils.weight_norm)
    cm = grapefx.compile(model, max_grad_norm=1.0, noise_multiplier=0.0, loss_reduction="sum")
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    loss = _sum_ce(cm(x), y) + model.a.weight.pow(2).sum()
    with pytest.raises(
        grapefx.UnsupportedOpError,
        match=r"(?s)parameters alone \(aten op .*in module `a \(Linear\)`\).*received a gradient.*any sample",
    ):
        loss.backward()
