"""grapefx.replace_batch_norm: a BatchNorm model is refused, fixed, then matches the oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import grapefx
from tests.oracle import assert_grads_match, oracle_grads


class _BasicBlockBN(nn.Module):
    """A torchvision-style residual block with BatchNorm (as `torchvision.models.resnet18` has)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.down(x))


def _resnet_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        _BasicBlockBN(8, 12, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 6),
        nn.BatchNorm1d(6, eps=1e-3),
        nn.Linear(6, 4),
    )


def test_replaced_model_compiles_and_matches_the_oracle() -> None:
    torch.manual_seed(0)
    model = _resnet_bn()
    x, y = torch.randn(5, 3, 8, 8), torch.randint(0, 4, (5,))
    with pytest.raises(grapefx.BatchMixingError, match=r"replace_batch_norm"):
        F.cross_entropy(grapefx.compile(model, noise_multiplier=0.0)(x), y).backward()

    names = grapefx.replace_batch_norm(model)
    assert names == ["1", "3.bn1", "3.bn2", "3.down.1", "7"]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    gn = model[3].bn2
    assert isinstance(gn, nn.GroupNorm) and (gn.num_groups, gn.num_channels) == (4, 12)  # gcd(32, 12)
    assert model[7].eps == 1e-3 and model[7].num_groups == 2

    ref_model = _resnet_bn()
    grapefx.replace_batch_norm(ref_model)
    ref_model.load_state_dict(model.state_dict())
    model.zero_grad()
    pm = grapefx.compile(model, max_grad_norm=0.5, noise_multiplier=0.0, loss_reduction="mean")
    F.cross_entropy(pm(x), y).backward()
    ref, _ = oracle_grads(ref_model, (x, y), lambda out, yy: F.cross_entropy(out, yy), 0.5, "mean")
    assert_grads_match(model, ref)


def test_keeps_frozen_parameters_dtype_and_mode() -> None:
    bn = nn.BatchNorm2d(16).double()
    bn.weight.requires_grad_(False)
    model = nn.Sequential(nn.Conv2d(3, 16, 1).double(), bn).eval()
    assert grapefx.replace_batch_norm(model, max_groups=8) == ["1"]
    gn = model[1]
    assert gn.num_groups == 8 and gn.weight.dtype == torch.float64 and not gn.training
    assert not gn.weight.requires_grad and gn.bias.requires_grad
    assert grapefx.replace_batch_norm(nn.Linear(2, 2)) == []
    with pytest.raises(ValueError, match="max_groups"):
        grapefx.replace_batch_norm(model, max_groups=0)


def test_one_channel_groups_on_a_feature_vector_are_refused_with_the_fix() -> None:
    """BatchNorm1d over [N, C] features cannot become a GroupNorm with one channel per group (every
    output would be the bias); on [N, C, L] it can, and max_groups=1 fixes the 2-D case."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    assert grapefx.replace_batch_norm(model) == ["1"]
    with pytest.raises(ValueError, match=r"`1` was a BatchNorm1d.*\[N, 8\].*max_groups=1"):
        model(torch.randn(4, 6))
    seq = nn.Sequential(nn.Conv1d(3, 8, 3), nn.BatchNorm1d(8))
    grapefx.replace_batch_norm(seq)
    assert seq(torch.randn(4, 3, 10)).shape == (4, 8, 8)  # [N, C, L]: one channel per group is fine
    fixed = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    grapefx.replace_batch_norm(fixed, max_groups=1)
    assert fixed[1].num_groups == 1 and fixed(torch.randn(4, 6)).shape == (4, 2)


def test_batch_norm_subclass_is_refused_by_name() -> None:
    class BatchNormAct(nn.BatchNorm2d):  # timm's BatchNormAct2d: normalization, then an activation
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.silu(super().forward(x))

    model = nn.Sequential(nn.Conv2d(3, 8, 1), BatchNormAct(8))
    with pytest.raises(ValueError, match=r"`1` is a BatchNormAct.*GroupNorm"):
        grapefx.replace_batch_norm(model)


# ----------------------------------------------------------------------------------------------
# transformers' speech encoders (grapefx/transformers_compat.py); the oracle checks of Wav2Vec2,
# HuBERT and WavLM are zoo cases run with -m slow (test_more_transformers_families)
# ----------------------------------------------------------------------------------------------
def test_transformers_speech_model_is_prepared_without_being_changed() -> None:
    from grapefx.transformers_compat import feature_encoders, input_grad_flags_off
    from tests.zoo import HFSpeech

    model = HFSpeech("wav2vec2", 3)
    encoder = model.m.wav2vec2.feature_extractor
    assert feature_encoders(model) == [encoder] and encoder._requires_grad is True
    assert not getattr(model.m.wav2vec2, "_output_capturing_hooks_installed", False)
    cm = grapefx.compile(model, max_grad_norm=1.0, noise_multiplier=0.0, loss_reduction="sum")
    # the hooks transformers would install inside the first (traced) forward are there up front
    assert model.m.wav2vec2._output_capturing_hooks_installed
    assert encoder._requires_grad is True  # cleared only while the compiled model runs
    with input_grad_flags_off([encoder]):
        assert encoder._requires_grad is False
    assert encoder._requires_grad is True
    # a model without transformers modules is left alone
    assert feature_encoders(nn.Linear(2, 2)) == []
    assert cm.module is model


def test_transformers_moe_experts_switch_to_masked_rows_only_while_compiled() -> None:
    import transformers as tf

    from grapefx.moe_experts import NAME
    from grapefx.transformers_compat import expert_configs, masked_row_experts

    cfg = tf.MixtralConfig(
        vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1,
    )  # fmt: skip
    model = tf.MixtralForCausalLM(cfg)
    configs = expert_configs(model)
    assert len(configs) == 1 and configs[0]._experts_implementation != NAME
    before = configs[0]._experts_implementation
    with masked_row_experts(configs):
        assert model.config._experts_implementation == NAME
    assert configs[0]._experts_implementation == before
    assert expert_configs(nn.Linear(2, 2)) == []


def test_prepare_applies_the_model_workarounds_for_good() -> None:
    """`grapefx.prepare` (for the plain torch.compile backend): hooks installed, encoder flag cleared,
    experts on grapefx's masked rows, permanently; other models untouched. The oracle checks of prepared
    models on the plain backend run with -m slow (test_zoo_oracle.py)."""
    import transformers as tf

    from grapefx.transformers_compat import unprepared_hint
    from tests.zoo import HFSpeech

    speech = HFSpeech("wav2vec2", 3)
    assert grapefx.prepare(speech) is speech
    assert speech.m.wav2vec2._output_capturing_hooks_installed
    assert speech.m.wav2vec2.feature_extractor._requires_grad is False
    cfg = tf.MixtralConfig(
        vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1,
    )  # fmt: skip
    moe = grapefx.prepare(tf.MixtralForCausalLM(cfg))
    assert moe.config._experts_implementation == "grapefx_masked_rows"
    plain = nn.Linear(2, 2)
    assert grapefx.prepare(plain) is plain
    with torch._dynamo.config.patch(allow_rnn=False):  # RNNs: Dynamo unrolls them instead of breaking
        grapefx.prepare(plain)
        assert torch._dynamo.config.allow_rnn is False
        grapefx.prepare(nn.Sequential(nn.Linear(2, 2), nn.GRU(2, 2)))
        assert torch._dynamo.config.allow_rnn is True
    # the refusal's hint names grapefx.prepare only for transformers experts modules
    experts = type(moe.model.layers[0].mlp.experts)
    assert "grapefx.prepare(model)" in unprepared_hint([nn.Linear, experts])
    assert "grapefx.prepare(model)" in unprepared_hint([f"{experts.__module__}.{experts.__qualname__}"])
    assert unprepared_hint([nn.Linear, type(speech.m)]) == ""


_MOE_CONFIGS = {  # tiny transformers MoE models whose experts take an ExpertsInterface implementation
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    # biases, weights stored transposed [E, in, out], a clamped gate on interleaved gate / up columns
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 8, "layer_types": ["full_attention"]},
    ),
}


@pytest.mark.parametrize("family", sorted(_MOE_CONFIGS))
def test_masked_rows_experts_compute_what_transformers_experts_compute(family: str) -> None:
    """grapefx's experts implementation against transformers' own loop over experts ("eager"), in
    float64, without grapefx: the same logits and the same gradient of every parameter."""
    import transformers as tf

    from grapefx.moe_experts import register
    from grapefx.transformers_compat import expert_configs

    cfg_name, model_name, fields = _MOE_CONFIGS[family]
    cfg = getattr(tf, cfg_name)(
        vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16, use_cache=False, **fields,
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(tf, model_name)(cfg).double().train()
    assert expert_configs(model), "the model's experts must take an ExpertsInterface implementation"
    ids = torch.randint(0, 32, (3, 7))
    results = []
    for impl in ("eager", register()):
        for c in expert_configs(model):
            c._experts_implementation = impl
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits
        logits.pow(2).mean().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref, ref_grads), (got, got_grads) = results
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert ref_grads.keys() == got_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("family", ["dbrx", "switch"])
def test_masked_rows_forward_of_loop_experts_matches_their_own(family: str) -> None:
    """DBRX's and Switch Transformers' experts modules only loop over the experts hit (a graph break):
    grapefx swaps in a masked-row forward while the compiled model runs. It computes what theirs does
    (float64, without grapefx: logits and every gradient), and their own forward is back afterwards."""
    from grapefx.transformers_compat import loop_expert_forwards, masked_row_experts
    from tests.zoo import HFText

    torch.manual_seed(0)
    model = HFText(family).double()
    ids = torch.randint(1, 64, (3, 8))
    forwards = loop_expert_forwards(model)
    assert len(forwards) == (2 if family == "dbrx" else 4)  # one per MoE layer
    results = []
    for swap in (False, True):
        model.zero_grad(set_to_none=True)
        with masked_row_experts([], forwards if swap else []):
            logits = model(ids)
        logits.pow(2).mean().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert all("forward" not in m.__dict__ for m, _ in forwards)
    (ref, ref_grads), (got, got_grads) = results
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-9, atol=1e-12, msg=name)
