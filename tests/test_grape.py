"""DP-GRAPE: privatized projected gradients vs a dense reference projected with the same P."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import grapefx
from grapefx.grape import current_projection
from grapefx.optim import GrapeAdamW, GrapeSGD


class TinyLM(nn.Module):
    """Linear layers on [B, T, d] (b-major flattening), a norm and an embedding (not projected)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 24)
        self.up = nn.Linear(24, 40)
        self.down = nn.Linear(40, 24)
        self.ln = nn.LayerNorm(24)
        self.head = nn.Linear(24, 30)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        h = h + self.down(F.gelu(self.up(h)))
        return self.head(self.ln(h))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 5))


def _loss(out: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction=reduction)


def _reference(model, cm, x, y, C, reduction):
    """Dense per-sample grads (torch.func, float64), projected with the model's P, clipped, summed."""
    md = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in md.named_parameters()}
    xs = x.double() if x.is_floating_point() else x

    def loss_one(p, xi, yi):  # the loss of one sample: the batch loss is their sum or their mean
        return _loss(functional_call(md, p, (xi[None],)), yi[None], reduction)

    ps = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, xs, y)
    B = x.shape[0]
    projections = {}
    for name in cm.privacy_config.grape_params:
        P = current_projection(cm, name).double().to(ps[name].device)
        rows = ps[name].shape[1] <= ps[name].shape[2]
        projections[name] = (P, rows)
        ps[name] = P @ ps[name] if rows else ps[name] @ P.T
    norms = torch.cat([ps[k].reshape(B, -1) for k in ps], 1).norm(dim=1)
    c = (C / (norms + 1e-6)).clamp(max=1.0)
    denom = B if reduction == "mean" else 1
    ref = {k: (v * c.reshape(-1, *[1] * (v.dim() - 1))).sum(0) / denom for k, v in ps.items()}
    return ref, projections, norms


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b).norm().item() / max(b.norm().item(), 1e-9)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("factory", ["mlp", "lm"])
def test_projected_gradients_match_dense_reference(factory: str, reduction: str) -> None:
    check_projected_gradients(factory, reduction)


def check_projected_gradients(factory: str, reduction: str, device: str = "cpu", codegen: str = "eager") -> None:
    """Ĝ and p.grad against the dense reference, batch sizes 6, 3, 1 through one compiled model."""
    torch.manual_seed(0)
    model = (_mlp() if factory == "mlp" else TinyLM()).to(device)
    cm = grapefx.compile(
        model,
        max_grad_norm=0.5,
        noise_multiplier=0.0,
        strategy="grape",
        rank=4,
        loss_reduction=reduction,
        seed=3,
        codegen=codegen,
    )
    expected = {"mlp": ("0.weight", "2.weight"), "lm": ("up.weight", "down.weight")}[factory]
    assert cm.privacy_config.grape_params == expected  # default policy: Linear weights, not head/embedding
    for B in (6, 3, 1):
        if factory == "mlp":
            x, y = torch.randn(B, 40), torch.randint(0, 5, (B,))
        else:
            x, y = torch.randint(0, 30, (B, 7)), torch.randint(0, 30, (B, 7))
        x, y = x.to(device), y.to(device)
        model.zero_grad(set_to_none=True)
        _loss(cm(x), y, reduction).backward()
        ref, projections, norms = _reference(model, cm, x, y, 0.5, reduction)
        assert (norms > 0.5).any(), "the test must clip some samples"
        torch.testing.assert_close(cm.per_sample_norms().double(), norms, rtol=1e-5, atol=1e-6)
        for name, p in model.named_parameters():
            if name in projections:
                ghat = cm.privacy_state.projected_grads[name]
                assert ghat.shape == ref[name].shape and 4 in ghat.shape
                assert ghat.device == p.device
                assert _rel(ghat, ref[name]) < 1e-5, name
                P, rows = projections[name]
                dense = P.T @ ref[name] if rows else ref[name] @ P
                assert _rel(p.grad, dense) < 1e-5, f"{name}: p.grad is the back-projection"
            else:
                assert _rel(p.grad, ref[name]) < 1e-5, name


@pytest.mark.parametrize("clipping", ["flat", "per_layer", "group"])
def test_sensitivity_in_projected_space(clipping: str) -> None:
    torch.manual_seed(1)
    model = _mlp()
    C = 0.3
    groups = {"clip_groups": "module"} if clipping == "group" else {}
    cm = grapefx.compile(
        model, max_grad_norm=C, noise_multiplier=0.0, strategy="grape", rank=4, loss_reduction="sum",
        clipping=clipping, **groups,
    )  # fmt: skip
    x, y = torch.randn(5, 40) * 3, torch.randint(0, 5, (5,))

    def private_grad(idx: list[int]) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        _loss(cm(x[idx]), y[idx], "sum").backward()
        parts = []
        for name, p in model.named_parameters():
            g = cm.privacy_state.projected_grads.get(name) if name in cm.privacy_config.grape_params else p.grad
            parts.append(g.reshape(-1).double())
        return torch.cat(parts)

    full = private_grad(list(range(5)))
    moves = []
    for drop in range(5):
        rest = [i for i in range(5) if i != drop]
        moves.append((full - private_grad(rest)).norm().item())
        assert moves[-1] <= C * (1 + 1e-5) + 1e-6
    assert max(moves) > 0.9 * C, f"some sample must be clipped for the check to bite: {moves}"


def test_projection_is_seeded_resampled_and_not_stored() -> None:
    torch.manual_seed(2)
    model = _mlp()
    kw = dict(max_grad_norm=1.0, noise_multiplier=1.0, strategy="grape", rank=4, resample_every=2, seed=7)
    cm, cm_same = grapefx.compile(model, **kw), grapefx.compile(copy.deepcopy(model), **kw)
    x, y = torch.randn(4, 40), torch.randint(0, 5, (4,))
    seen = []
    for _ in range(5):
        for m in (cm, cm_same):
            _loss(m(x), y, "mean").backward()
        p_now = current_projection(cm, "0.weight")
        assert torch.equal(p_now, current_projection(cm_same, "0.weight")), "same seed -> same P"
        seen.append(p_now)
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2]), "fresh P every 2 steps"
    assert torch.equal(seen[2], seen[3]) and not torch.equal(seen[3], seen[4])
    assert p_now.shape == (4, 24) and abs(p_now.var().item() - 1 / 4) < 0.1  # N(0, 1/r) entries
    stored = [v for v in vars(cm.privacy_state).values() if isinstance(v, torch.Tensor)]
    assert all(t.numel() < 24 * 40 for t in stored), "no m x n (or P) tensor is kept in the state"


def test_grape_adamw_keeps_low_rank_moments_and_matches_the_formula() -> None:
    torch.manual_seed(3)
    model = _mlp()
    cm = grapefx.compile(model, max_grad_norm=1.0, noise_multiplier=0.5, strategy="grape", rank=4, seed=0)
    opt = GrapeAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(6, 40), torch.randint(0, 5, (6,))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    _loss(cm(x), y, "mean").backward()
    ghat = cm.privacy_state.projected_grads["0.weight"].clone()
    P = current_projection(cm, "0.weight")
    bias_grad = model[0].bias.grad.clone()
    opt.step()
    # one AdamW step from zero moments: update = g / (|g| + eps) elementwise (bias-corrected)
    upd = ghat / (ghat.abs() + 1e-8)
    expected_w = before["0.weight"] * (1 - 1e-2 * 0.1) - 1e-2 * (P.T @ upd)  # 0.weight [24, 40]: Ĝ = P G
    torch.testing.assert_close(model[0].weight.detach(), expected_w, rtol=1e-5, atol=1e-6)
    expected_b = before["0.bias"] * (1 - 1e-2 * 0.1) - 1e-2 * bias_grad / (bias_grad.abs() + 1e-8)
    torch.testing.assert_close(model[0].bias.detach(), expected_b, rtol=1e-5, atol=1e-6)
    assert opt.state[model[0].weight]["exp_avg"].shape == (4, 40)  # moments in the projected space
    assert opt.state[model[2].weight]["exp_avg"].shape == (32, 4)  # 2.weight [32, 24]: Ĝ = G Pᵀ


def test_grape_sgd_trains_and_plain_optimizers_still_work() -> None:
    torch.manual_seed(4)
    model = _mlp()
    cm = grapefx.compile(model, max_grad_norm=1.0, noise_multiplier=0.0, strategy="grape", rank=8, seed=0)
    x, y = torch.randn(64, 40), torch.randint(0, 5, (64,))
    for opt_cls in (GrapeSGD, torch.optim.SGD):
        opt = opt_cls(model.parameters(), lr=0.5)
        first = None
        for _ in range(30):
            loss = _loss(cm(x), y, "mean")
            first = loss.item() if first is None else first
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert loss.item() < first * 0.8, opt_cls.__name__


def test_grape_refuses_non_linear_parameters_by_name() -> None:
    model = nn.Sequential(nn.Conv1d(3, 24, 3), nn.Flatten(), nn.Linear(24 * 6, 5))
    cm = grapefx.compile(model, noise_multiplier=0.0, strategy="grape", rank=4, grape_params=("0.weight",))
    with pytest.raises(grapefx.GrapefxError, match=r"cannot project parameter `0\.weight`"):
        _loss(cm(torch.randn(4, 3, 8)), torch.randint(0, 5, (4,)), "mean").backward()


def test_projected_gradient_accumulates_over_a_virtual_batch() -> None:
    """Micro-batches with noise off then the last with noise on: Ĝ (what GrapeAdamW reads) is the
    sum over the micro-batches, like p.grad, equal to one backward on the whole batch; the next
    logical batch starts a fresh Ĝ."""
    torch.manual_seed(6)
    model = _mlp()
    whole = copy.deepcopy(model)
    opts = dict(max_grad_norm=1.0, noise_multiplier=0.0, loss_reduction="sum", strategy="grape", rank=4, seed=0)
    cm, cw = grapefx.compile(model, **opts), grapefx.compile(whole, **opts)
    x, y = torch.randn(7, 40), torch.randint(0, 5, (7,))
    for lo, hi, last in ((0, 3, False), (3, 7, True)):
        cm.set_noise_enabled(last)
        _loss(cm(x[lo:hi]), y[lo:hi], "sum").backward()
    _loss(cw(x), y, "sum").backward()
    for name in cm.privacy_config.grape_params:
        torch.testing.assert_close(cm.privacy_state.projected_grads[name], cw.privacy_state.projected_grads[name])
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, dict(whole.named_parameters())[name].grad)
    part = grapefx.compile(copy.deepcopy(whole), **opts)  # same parameters (no step was taken)
    _loss(part(x[:3]), y[:3], "sum").backward()
    _loss(cm(x[:3]), y[:3], "sum").backward()  # a new logical batch (noise on): replaces, not adds
    for name in cm.privacy_config.grape_params:
        torch.testing.assert_close(cm.privacy_state.projected_grads[name], part.privacy_state.projected_grads[name])
