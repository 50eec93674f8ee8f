"""Black-box privacy checks: sensitivity, empty batches, and the noise itself.

* Sensitivity: with noise off and sum reduction, dropping one sample changes the gradient by at most
  C (the DP definition itself), whatever the model and clipping mode; and the bound is attained
  (the clipped samples move the gradient by exactly C), so C is really the bound in force.
* Empty batch (B=0): no crash, the gradient is pure noise of the right scale, finite.
* Noise: per-coordinate std = sigma * C / denom, Gaussian, zero-mean; same seed -> same noise;
  consecutive steps -> fresh, uncorrelated noise; torch's global RNG is left alone.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from oracle import oracle_grads
from zoo import ZooCase, case, version_marks

import grapefx

TOL = 1e-4  # relative slack on the sensitivity bound (float32 rounding)


def flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().reshape(-1)
            for p in model.parameters()
            if p.requires_grad
        ]
    )


def step(cm: nn.Module, model: nn.Module, zc: ZooCase, x: torch.Tensor, y: torch.Tensor, reduction: str = "sum"):
    model.zero_grad(set_to_none=True)
    zc.loss(cm(x), y, reduction).backward()
    return flat_grad(model)


def median_norm(model: nn.Module, zc: ZooCase, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    _, norms = oracle_grads(model, (x, y), lambda o, t: zc.loss(o, t, "sum"), 1.0, "sum")
    return float(norms.median()), norms


# ----------------------------------------------------------------------------------------------
# sensitivity
# ----------------------------------------------------------------------------------------------
def _slow(*args: str) -> object:
    return pytest.param(*args, marks=pytest.mark.slow)


SENS = [
    ("mlp", "flat", "auto"),
    ("linear3d", "flat", "auto"),
    ("conv2d", "flat", "auto"),
    ("embedding_bag", "flat", "auto"),
    ("layernorm", "flat", "auto"),
    ("gpt", "flat", "auto"),
    ("resnet_gn", "flat", "auto"),
    ("norm_layouts", "flat", "auto"),
    ("norm_layouts", "per_layer", "auto"),
    ("mlp", "per_layer", "auto"),
    pytest.param("gpt", "per_layer", "auto", marks=pytest.mark.slow),
    ("mlp", "group", "auto"),  # clip_groups="module": weight and bias of each layer together
    ("conv2d", "group", "auto"),
    _slow("gpt", "group", "auto"),
    ("mlp", "automatic", "auto"),
    ("embedding_bag", "automatic", "auto"),
    ("long_tokens", "flat", "ghost"),  # blocked Grams, tied cross terms, positions' lookup norm
    ("encoder_ids", "flat", "auto"),  # ids shared by all samples, cumsum position ids
    # q/k/v gradients concatenated along the batch dim
    pytest.param("vit_qkv_unbind", "flat", "auto", marks=pytest.mark.slow),
    ("two_views", "flat", "auto"),  # two rows per sample, side by side in one 2B batch
    # session 10-11's models: their oracle checks (sum) run by default, these with -m slow
    _slow("last_token_pool", "flat", "auto"),  # h[arange(B), last], a constant head index
    _slow("weight_norm", "flat", "auto"),  # weight_norm's backward, a masked bias after the batch sum
    _slow("along_dims", "flat", "auto"),  # sort, topk, max / median over a dim, normalize, unfold
    _slow("recurrent", "flat", "auto"),  # GRU, LSTM unrolled over time
    _slow("constants_over_batch", "flat", "auto"),  # BEiT's sliced table, XLNet's einsum, FFT, repeat
    _slow("instance_norm", "flat", "auto"),  # batch norm over [1, B·C, ...], weight repeated B times
    _slow("embedding_bags", "flat", "auto"),  # nn.EmbeddingBag, mean with padding and sum
    _slow("lookup_tables", "flat", "auto"),  # table[ids] with per-sample ids
    _slow("conv_transpose", "flat", "auto"),  # ConvTranspose2d (groups, output_padding), 1d
    _slow("bilinear", "flat", "auto"),  # nn.Bilinear's _trilinear as mm contractions
    _slow("mha_tmajor", "flat", "auto"),  # self-attention, then cross-attention with kdim / vdim
    ("eos_pool", "flat", "auto"),  # x[mask].view(B, -1, d): rows regrouped per sample, counts checked
    ("masked_tokens", "flat", "auto"),  # CE over logits[mask] inside the model: counts differ per sample
    ("masked_tokens_flat", "flat", "auto"),  # the same over a flattened [B·T] mask
    ("masked_rows_head", "flat", "auto"),  # head(norm(h[mask])): weight gradients over unequal rows
    ("gpt_checkpointed", "flat", "auto"),  # blocks recomputed in the backward, attention RNG replayed
    ("in_place_shared_query", "flat", "auto"),  # DeBERTa's `pos_query /= scale` after the batch sum
    ("chunk_scan", "flat", "auto"),  # Mamba2's chunked-scan einsums
    ("shared_position_tables", "flat", "auto"),  # Whisper's / Speech2Text's position tables
    ("flat_rows_group_norm", "flat", "auto"),  # GroupNorm over [B·T, C] rows
    ("task_routed", "flat", "auto"),  # adapters and heads per task: masks over the batch dim
    ("task_routed", "per_layer", "auto"),
    ("normed_shared_table", "flat", "auto"),  # a layer norm and projection after the batch contraction
    ("learned_query_pool", "flat", "auto"),  # SDPA with a batch-free query expanded over the batch
    ("frame_conv", "flat", "auto"),  # Conv2d over [B·T, C, H, W]: each sample's frames summed
    ("triangular_solves", "flat", "auto"),  # linalg.solve_triangular batched over samples
    ("constrained_weights", "flat", "auto"),  # weights clamped / renormalized in place in the forward
    ("gathered_experts", "flat", "ghost"),  # expert weights gathered per token: ghost norms masked to equal ids
    ("routed_row_experts", "flat", "auto"),  # experts on x[mask_e] rows, fused weights unbound per expert
    # "two_pass": strategy "auto" with two_pass=True (norms, then the backward with weighted gradients)
    ("gpt_checkpointed", "flat", "two_pass"),  # weighted tangents (the loss outside)
    ("masked_rows_head", "flat", "two_pass"),  # the loss inside: x[mask] rows weighted by their sample
    _slow("hf_bart_cls", "flat", "auto"),  # BART's EOS pooling in the real model
    # DeBERTa-v2 attention: its normalized position table per sample
    pytest.param("hf_sew_d", "flat", "auto", marks=[pytest.mark.slow, *version_marks("hf_sew_d")]),
    _slow("hf_xmod", "flat", "auto"),  # X-MOD's language adapters: samples routed by masks over the batch
    _slow("hf_llama_lora", "flat", "auto"),  # peft LoRA adapters, frozen base weights
    _slow("hf_mixtral", "flat", "auto"),  # top-2 routing, each expert on its x[mask] rows
    _slow("hf_dbrx", "flat", "auto"),  # experts loop replaced by masked rows, fused [E·F, d] weights
    _slow("hf_ctrl", "flat", "auto"),  # a buffer reassigned in forward (its nn.Buffer markers dropped)
    _slow("hf_wav2vec2", "flat", "auto"),  # conv feature encoder, grouped positional conv, mean pooling
    # pad, roll, windows folded into the batch dim, gathered bias table, as_strided pooling
    pytest.param("swin", "flat", "auto", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,clipping,strategy", SENS)
def test_remove_one_sensitivity(name: str, clipping: str, strategy: str) -> None:
    zc = case(name)
    model = zc.make()
    B = 6
    x, y = zc.batch(B)
    C, norms = median_norm(model, zc, x, y)
    assert (norms > C * 1.01).any(), "some samples must be clipped for the check to bite"
    two_pass = strategy == "two_pass"
    cm = grapefx.compile(
        model,
        max_grad_norm=C,
        noise_multiplier=0.0,
        loss_reduction="sum",
        clipping=clipping,
        strategy="auto" if two_pass else strategy,
        two_pass=two_pass,
        **({"clip_groups": "module"} if clipping == "group" else {}),
    )
    full = step(cm, model, zc, x, y)
    assert torch.isfinite(full).all()
    diffs = []
    for j in range(B):
        keep = [i for i in range(B) if i != j]
        g = step(cm, model, zc, x[keep], y[keep])
        d = (full - g).norm().item()
        diffs.append(d)
        assert d <= C * (1 + TOL) + 1e-6, f"dropping sample {j} moved the gradient by {d:.6g} > C={C:.6g}"
    diffs_t = torch.tensor(diffs)
    assert (diffs_t > 0).all(), f"some sample has no influence at all: {diffs}"
    if clipping == "flat":
        # a clipped sample contributes exactly C * g/|g|, an unclipped one exactly its gradient
        expected = torch.minimum(norms, torch.full_like(norms, C))
        torch.testing.assert_close(diffs_t.double(), expected, rtol=1e-3, atol=1e-5)
    elif clipping == "automatic":
        expected = C * norms / (norms + 0.01)
        torch.testing.assert_close(diffs_t.double(), expected, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name", ["mlp", "conv2d"])
def test_sensitivity_with_an_outlier_sample(name: str) -> None:
    """One sample scaled x1000 (huge gradient) still moves the sum by at most C."""
    zc = case(name)
    model = zc.make()
    x, y = zc.batch(5)
    x = x.clone()
    x[2] *= 1000.0
    C = 0.5
    cm = grapefx.compile(model, max_grad_norm=C, noise_multiplier=0.0, loss_reduction="sum")
    full = step(cm, model, zc, x, y)
    assert cm.per_sample_norms()[2] > 2 * C  # the outlier is clipped
    for j in range(5):
        keep = [i for i in range(5) if i != j]
        d = (full - step(cm, model, zc, x[keep], y[keep])).norm().item()
        assert d <= C * (1 + TOL) + 1e-6, (j, d, C)
    d2 = (full - step(cm, model, zc, x[[0, 1, 3, 4]], y[[0, 1, 3, 4]])).norm().item()
    assert d2 == pytest.approx(C, rel=1e-3)


@pytest.mark.parametrize("name", ["mlp", "gpt"])
def test_replace_one_sensitivity(name: str) -> None:
    """Substituting one sample moves the sum by at most 2C (replace-one neighbours)."""
    zc = case(name)
    model = zc.make()
    x, y = zc.batch(5)
    x2, y2 = zc.batch(5, seed=7)
    C, _ = median_norm(model, zc, x, y)
    cm = grapefx.compile(model, max_grad_norm=C, noise_multiplier=0.0, loss_reduction="sum")
    full = step(cm, model, zc, x, y)
    for j in range(5):
        xs, ys = x.clone(), y.clone()
        xs[j], ys[j] = x2[j], y2[j]
        d = (full - step(cm, model, zc, xs, ys)).norm().item()
        assert d <= 2 * C * (1 + TOL) + 1e-6, (j, d, C)


# ----------------------------------------------------------------------------------------------
# empty batches
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp", "conv2d", "embedding_bag", "gpt"])
def test_empty_batch_gives_pure_noise(name: str) -> None:
    zc = case(name)
    model = zc.make()
    sigma, C = 1.5, 0.8
    cm = grapefx.compile(model, max_grad_norm=C, noise_multiplier=sigma, loss_reduction="sum", seed=3)
    x0, y0 = zc.batch(0)
    g = step(cm, model, zc, x0, y0)
    assert torch.isfinite(g).all()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, n
    # pure noise: zero-mean, std sigma*C (loose: small models have few coordinates)
    assert g.std().item() == pytest.approx(sigma * C, rel=0.25)
    assert abs(g.mean().item()) < 5 * sigma * C / math.sqrt(g.numel())


class _SkipsAHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.skipped = nn.Linear(4, 3)  # trainable, never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_unreached_parameter_keeps_no_gradient_at_every_batch_size() -> None:
    """A trainable parameter the graph never reaches gets no gradient and no noise, the same at
    B = 4, 1, 0, 5 (the dynamic, single-sample and empty graphs); the reached ones are noised."""
    model = _SkipsAHead()
    cm = grapefx.compile(model, max_grad_norm=1.0, noise_multiplier=1.0, seed=0)
    for B in (4, 1, 0, 5):
        model.zero_grad(set_to_none=True)
        cm(torch.randn(B, 4)).sum().backward()
        assert model.skipped.weight.grad is None and model.skipped.bias.grad is None, B
        assert model.used.weight.grad is not None and model.used.weight.grad.abs().sum() > 0, B


def test_empty_batch_between_real_batches() -> None:
    """Poisson sampling: B=4, then B=0, then B=5 on one compiled model, noise on; all finite,
    and the real batches still get their clipped sum (checked with noise off on the same sequence)."""
    zc = case("mlp")
    model = zc.make()
    batches = [zc.batch(4), zc.batch(0), zc.batch(5), zc.batch(0)]
    noisy_model = copy.deepcopy(model)
    cm_clean = grapefx.compile(model, max_grad_norm=0.5, noise_multiplier=0.0, loss_reduction="sum")
    cm_noisy = grapefx.compile(noisy_model, max_grad_norm=0.5, noise_multiplier=0.7, loss_reduction="sum", seed=0)
    for x, y in batches:
        g_clean = step(cm_clean, model, zc, x, y)
        g_noisy = step(cm_noisy, noisy_model, zc, x, y)
        assert torch.isfinite(g_clean).all() and torch.isfinite(g_noisy).all()
        if x.shape[0] == 0:
            assert g_clean.abs().max().item() == 0.0
        else:
            ref, _ = oracle_grads(model, (x, y), lambda o, t: zc.loss(o, t, "sum"), 0.5, "sum")
            torch.testing.assert_close(g_clean, torch.cat([ref[k].reshape(-1) for k in ref]), rtol=1e-4, atol=1e-6)
        noise = g_noisy - g_clean
        assert noise.std().item() == pytest.approx(0.7 * 0.5, rel=0.25)


def test_empty_batch_mean_uses_expected_batch_size() -> None:
    zc = case("mlp")
    model = zc.make()
    sigma, C, L = 2.0, 1.0, 4
    cm = grapefx.compile(
        model, max_grad_norm=C, noise_multiplier=sigma, loss_reduction="mean", expected_batch_size=L, seed=1
    )
    x0, y0 = zc.batch(0)
    g = step(cm, model, zc, x0, y0, reduction="sum")  # an empty sum: the mean of nothing is NaN
    assert torch.isfinite(g).all()
    assert g.std().item() == pytest.approx(sigma * C / L, rel=0.25)


# ----------------------------------------------------------------------------------------------
# the noise
# ----------------------------------------------------------------------------------------------
D = 256


def _wide_linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(D, D)


def _wide_batch(B: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    return torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)


def _wide_step(cm: nn.Module, model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    F.mse_loss(cm(x), y, reduction=reduction).backward()
    return flat_grad(model)


def _noise_sample(sigma: float, C: float, reduction: str, B: int = 8, seed: int = 0, steps: int = 1):
    """(noise of each step, clean clipped gradient): noisy gradients minus the same batch's gradient
    from a noise-free compile of an identical model."""
    model = _wide_linear()
    clean_model = copy.deepcopy(model)
    x, y = _wide_batch(B)
    cm = grapefx.compile(model, max_grad_norm=C, noise_multiplier=sigma, loss_reduction=reduction, seed=seed)
    cm_clean = grapefx.compile(clean_model, max_grad_norm=C, noise_multiplier=0.0, loss_reduction=reduction)
    clean = _wide_step(cm_clean, clean_model, x, y, reduction)
    noises = [_wide_step(cm, model, x, y, reduction) - clean for _ in range(steps)]
    return noises, clean, cm


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_noise_std_per_coordinate(reduction: str) -> None:
    sigma, C, B = 1.3, 0.7, 8
    (noise,), clean, _ = _noise_sample(sigma, C, reduction, B=B)
    denom = 1.0 if reduction == "sum" else float(B)
    std = sigma * C / denom
    n = noise.numel()  # 65,792 coordinates: the std estimate is good to ~0.3%
    assert noise.std().item() == pytest.approx(std, rel=0.02)
    assert abs(noise.mean().item()) < 5 * std / math.sqrt(n)
    # per tensor: the weight (65,536 coords) and the bias (256 coords)
    assert noise[: D * D].std().item() == pytest.approx(std, rel=0.02)
    assert noise[D * D :].std().item() == pytest.approx(std, rel=0.2)
    # Gaussian shape: P(|z| < 1) = 0.6827, P(|z| < 2) = 0.9545
    z = (noise / std).abs()
    assert (z < 1).double().mean().item() == pytest.approx(0.6827, abs=0.01)
    assert (z < 2).double().mean().item() == pytest.approx(0.9545, abs=0.005)
    # the clean part is the clipped sum: its norm is at most B*C/denom (and the noise dominates it)
    assert clean.norm().item() <= B * C / denom * (1 + 1e-4)


def test_noise_with_known_clipped_sum() -> None:
    """Zero inputs with a zero-target loss on a bias-free Linear: every per-sample gradient is 0, so
    the clipped sum is exactly 0 and p.grad is the noise itself."""
    sigma, C, B = 0.9, 2.0, 5
    model = nn.Linear(D, D, bias=False)
    cm = grapefx.compile(model, max_grad_norm=C, noise_multiplier=sigma, loss_reduction="mean", seed=11)
    x = torch.zeros(B, D)
    model.zero_grad(set_to_none=True)
    F.mse_loss(cm(x), torch.zeros(B, D)).backward()
    g = model.weight.grad.double().reshape(-1)
    assert torch.isfinite(g).all()
    assert g.std().item() == pytest.approx(sigma * C / B, rel=0.02)
    assert abs(g.mean().item()) < 5 * sigma * C / B / math.sqrt(g.numel())


def test_same_seed_same_noise_different_seed_different_noise() -> None:
    (n0,), _, _ = _noise_sample(1.0, 1.0, "sum", seed=123)
    (n1,), _, _ = _noise_sample(1.0, 1.0, "sum", seed=123)
    (n2,), _, _ = _noise_sample(1.0, 1.0, "sum", seed=124)
    torch.testing.assert_close(n0, n1, rtol=0, atol=1e-5)
    corr = torch.corrcoef(torch.stack([n0, n2]))[0, 1].item()
    assert abs(corr) < 0.02, corr


def test_consecutive_steps_get_fresh_noise() -> None:
    sigma, C = 1.0, 1.0
    (n1, n2, n3), _, _ = _noise_sample(sigma, C, "sum", seed=5, steps=3)
    for a, b in ((n1, n2), (n2, n3), (n1, n3)):
        corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        assert abs(corr) < 0.02, corr  # independent: |corr| ~ N(0, 1/sqrt(65792)) = 0.004
    for n in (n1, n2, n3):
        assert n.std().item() == pytest.approx(sigma * C, rel=0.02)


def test_noise_uncorrelated_across_parameters_and_coordinates() -> None:
    (noise,), _, _ = _noise_sample(1.0, 1.0, "sum", seed=9)
    w = noise[: D * D].reshape(D, D)
    b = noise[D * D :]
    # neighbouring coordinates, and the bias vs one row of the weight
    assert abs(torch.corrcoef(torch.stack([w[:, :-1].reshape(-1), w[:, 1:].reshape(-1)]))[0, 1].item()) < 0.02
    assert abs(torch.corrcoef(torch.stack([w[0], b]))[0, 1].item()) < 0.25  # only 256 points
    assert not torch.allclose(w[0], b)


def test_noise_does_not_touch_global_rng() -> None:
    model = _wide_linear()
    x, y = _wide_batch(4)
    cm = grapefx.compile(model, max_grad_norm=1.0, noise_multiplier=1.0, loss_reduction="sum", seed=0)
    _wide_step(cm, model, x, y, "sum")  # compile outside the measured region
    state = torch.get_rng_state()
    _wide_step(cm, model, x, y, "sum")
    assert torch.equal(state, torch.get_rng_state()), "noise drew from torch's global RNG"


def test_noise_can_be_switched_off_for_accumulation() -> None:
    """set_noise_enabled(False): micro-batches before the last one of a virtual batch get no noise."""
    model = _wide_linear()
    clean_model = copy.deepcopy(model)
    x, y = _wide_batch(6)
    cm = grapefx.compile(model, max_grad_norm=0.5, noise_multiplier=2.0, loss_reduction="sum", seed=0)
    cm_clean = grapefx.compile(clean_model, max_grad_norm=0.5, noise_multiplier=0.0, loss_reduction="sum")
    clean = _wide_step(cm_clean, clean_model, x, y, "sum")
    cm.set_noise_enabled(False)
    torch.testing.assert_close(_wide_step(cm, model, x, y, "sum"), clean, rtol=1e-5, atol=1e-6)
    cm.set_noise_enabled(True)
    noise = _wide_step(cm, model, x, y, "sum") - clean
    assert noise.std().item() == pytest.approx(2.0 * 0.5, rel=0.02)


def _normed(wrap):  # noqa: ANN001, ANN202
    from test_state_updates import _Normed

    return _Normed(wrap)


def _batch_term():  # noqa: ANN202
    from test_zoo_oracle import _TanhBody

    return _TanhBody()


@pytest.mark.parametrize("name", ["weight_norm_hook", "spectral_norm_hook", "spectral_norm", "two_pass_batch_term"])
def test_remove_one_sensitivity_of_models_outside_the_zoo(name: str) -> None:
    """The deprecated weight_norm / spectral_norm hooks (torch.func cannot copy them, so they are not
    zoo models), parametrizations' spectral_norm, and two_pass with `ce + h.sum()` inside the
    module. Spectral norm's power-iteration buffers are put back before every step, so that each
    step sees the same weight."""
    torch.manual_seed(0)
    B, loss_inside = 6, name == "two_pass_batch_term"
    wraps = {
        "weight_norm_hook": nn.utils.weight_norm,
        "spectral_norm_hook": nn.utils.spectral_norm,
        "spectral_norm": nn.utils.parametrizations.spectral_norm,
    }
    model = _batch_term() if loss_inside else _normed(wraps[name])
    x, y = torch.randn(B, 8 if not loss_inside else 4), torch.randint(0, 3, (B,))
    start = {k: v.clone() for k, v in model.named_buffers()}

    def grad_of(keep: list[int], cm: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(start[k])
        model.zero_grad(set_to_none=True)
        if loss_inside:
            cm(x[keep], y[keep]).backward()
        else:
            F.cross_entropy(cm(x[keep]), y[keep], reduction="sum").backward()
        return flat_grad(model)

    # per-sample norms from an unclipped step (C huge), then C at their median
    from test_zoo_oracle import _WithBatchTerm

    target = (lambda: _WithBatchTerm(model, "sum")) if loss_inside else (lambda: model)
    probe = grapefx.compile(
        target(), max_grad_norm=1e9, noise_multiplier=0.0, loss_reduction="sum", two_pass=loss_inside
    )
    grad_of(list(range(B)), probe)
    norms = probe.per_sample_norms().double()
    C = float(norms.median())
    cm = grapefx.compile(target(), max_grad_norm=C, noise_multiplier=0.0, loss_reduction="sum", two_pass=loss_inside)
    full = grad_of(list(range(B)), cm)
    diffs = torch.tensor([(full - grad_of([i for i in range(B) if i != j], cm)).norm().item() for j in range(B)])
    assert (norms > C * 1.01).any() and (diffs > 0).all()
    assert (diffs <= C * (1 + TOL) + 1e-6).all(), f"moves {diffs.tolist()} > C={C:.6g}"
    torch.testing.assert_close(diffs.double(), torch.minimum(norms, torch.full_like(norms, C)), rtol=1e-3, atol=1e-5)
