"""Duplicate pure nodes of the private backward are merged (grapefx/passes/common_subexpressions.py):
layers reading one tensor share its Gram products, gradients stay exact, and nothing with a side
effect, no random op and no graph output is merged."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from oracle import assert_grads_match, oracle_grads

import grapefx
from grapefx.passes.common_subexpressions import merge_common_subexpressions
from grapefx.rules.gram import block_count

aten = torch.ops.aten


class SharedInputs(nn.Module):
    """Llama-style: separate q / k / v projections of one hidden state, a SwiGLU MLP whose gate and
    up read one tensor, and two biases added to the same tensor (identical gradient expressions)."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.gate, self.up = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False)
        self.down = nn.Linear(2 * d, d)
        self.b1, self.b2 = nn.Parameter(torch.zeros(d)), nn.Parameter(torch.zeros(d))
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d]
        heads = [p(x).unflatten(-1, (2, -1)).transpose(1, 2) for p in (self.q, self.k, self.v)]
        x = x + F.scaled_dot_product_attention(*heads, is_causal=True).transpose(1, 2).flatten(2)
        x = x + self.down(F.silu(self.gate(x)) * self.up(x)) + self.b1 + self.b2
        return self.head(x.mean(1))


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="sum")


def _private_bmm_count(merge: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[int, nn.Module]:
    if not merge:
        monkeypatch.setattr("grapefx.passes.privatize_backward.merge_common_subexpressions", lambda gm: 0)
    torch.manual_seed(0)
    model = SharedInputs(d=256)  # wide enough for ghost norms with blocked Grams
    C = 2.85  # between the samples' norms: some clipped, some not
    cm = grapefx.compile(model, max_grad_norm=C, noise_multiplier=0.0, loss_reduction="sum")
    x, y = torch.randn(5, 64, 256), torch.randint(0, 3, (5,))
    _loss(cm(x), y).backward()
    ref, norms = oracle_grads(model, (x, y), _loss, C, "sum")
    assert (norms > C).any() and (norms < C).any()
    assert_grads_match(model, ref)
    gm = cm.grapefx_backend.graphs["backward"]
    return sum(n.target == aten.bmm.default for n in gm.graph.nodes), model


def test_shared_inputs_share_their_gram_products(monkeypatch: pytest.MonkeyPatch) -> None:
    """q, k, v: one Gram of x instead of three; gate, up: one of the MLP input instead of two. At
    T=64 and d=256 a Gram is 4 block products (rules/gram.block_count): 8 + 4 fewer bmm, and 1 for
    the per-sample norms of b1 and b2 (the same [B, d] values). The gradients equal the oracle
    either way."""
    assert block_count(64, 256 + 256) == block_count(64, 256 + 512) == 4
    merged, model = _private_bmm_count(True, monkeypatch)
    assert model.b1.grad is not model.b2.grad  # identical expressions, still two gradients
    with monkeypatch.context() as m:
        separate, _ = _private_bmm_count(False, m)
    assert separate - merged == 2 * 4 + 1 * 4 + 1, (separate, merged)


def test_identical_gradients_get_independent_noise() -> None:
    """b1 and b2 have the same gradient expression; each must still get its own noise draw."""
    torch.manual_seed(0)
    model = SharedInputs()
    cm = grapefx.compile(model, max_grad_norm=0.3, noise_multiplier=1.0, loss_reduction="sum", seed=0)
    _loss(cm(torch.randn(4, 8, 64)), torch.randint(0, 3, (4,))).backward()
    assert model.b1.grad is not None and model.b2.grad is not None
    assert not torch.allclose(model.b1.grad, model.b2.grad)


def _graph(fn, *args: torch.Tensor) -> fx.GraphModule:  # noqa: ANN001
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn)(*args)


def test_merges_pure_duplicates_only() -> None:
    def fn(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        p1 = torch.bmm(a[:, :4], a[:, :4].transpose(1, 2)).sum()
        p2 = torch.bmm(a[:, :4], a[:, :4].transpose(1, 2)).sum()
        r1, r2 = torch.randn_like(b), torch.randn_like(b)  # random: never merged
        return p1 * p2, b + r1, b + r2, b * 2, b * 2  # outputs: never merged into one tensor

    gm = _graph(fn, torch.randn(2, 6, 3), torch.randn(5))
    count = lambda op: sum(n.target == op for n in gm.graph.nodes)  # noqa: E731
    before = {op: count(op) for op in (aten.bmm.default, aten.randn_like.default, aten.mul.Tensor)}
    assert merge_common_subexpressions(gm) > 0
    assert count(aten.bmm.default) == 1 and before[aten.bmm.default] == 2
    assert count(aten.randn_like.default) == 2
    assert count(aten.mul.Tensor) == before[aten.mul.Tensor]  # the two `b * 2` outputs stay apart
    a, b = torch.randn(2, 6, 3), torch.randn(5)
    out = gm(a, b)
    full = torch.bmm(a[:, :4], a[:, :4].transpose(1, 2)).sum()
    torch.testing.assert_close(out[0], full * full)
    assert out[3] is not out[4] and torch.equal(out[3], out[4])
    assert not torch.equal(out[1], out[2])


@pytest.mark.slow
def test_shared_inputs_with_the_inductor_codegen() -> None:
    torch.manual_seed(0)
    model = SharedInputs()
    cm = grapefx.compile(model, max_grad_norm=1.7, noise_multiplier=0.0, loss_reduction="sum", codegen="inductor")
    for B in (5, 1, 3):
        model.zero_grad(set_to_none=True)
        x, y = torch.randn(B, 64, 64), torch.randint(0, 3, (B,))
        _loss(cm(x), y).backward()
        ref, _ = oracle_grads(model, (x, y), _loss, 1.7, "sum")
        assert_grads_match(model, ref)


def test_dropping_one_sample_moves_the_gradient_by_at_most_c() -> None:
    """Sensitivity of the shared-input model with merged nodes: remove-one changes the pre-noise
    sum (all parameters together) by at most C."""
    torch.manual_seed(0)
    model = SharedInputs()
    C = 1.7
    cm = grapefx.compile(model, max_grad_norm=C, noise_multiplier=0.0, loss_reduction="sum")
    x, y = torch.randn(5, 64, 64), torch.randint(0, 3, (5,))

    def grads(keep: list[int]) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        _loss(cm(x[keep]), y[keep]).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    full = grads(list(range(5)))
    for i in range(5):
        moved = (full - grads([j for j in range(5) if j != i])).norm().item()
        assert moved <= C * (1 + 1e-5), (i, moved)
