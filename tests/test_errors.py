"""Every refusal names the culprit and says what to do; none yields a silently wrong gradient."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import grapefx


def _run(model: nn.Module, x: torch.Tensor, **kw) -> None:
    cm = grapefx.compile(model, max_grad_norm=1.0, noise_multiplier=0.0, **kw)
    out = cm(x)
    out.float().pow(2).mean().backward()


def test_batchnorm_in_training_is_refused_with_module_name() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    with pytest.raises(grapefx.BatchMixingError, match=r"BatchNorm.*GroupNorm") as info:
        _run(model, torch.randn(4, 3, 6, 6))
    assert "1" in str(info.value)  # the module path `1` (Sequential index) is named


def test_every_batchnorm_layer_is_named_in_one_error() -> None:
    """One run lists every training-mode BatchNorm, not just the first (as Opacus' validator does)."""
    layers = [nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.GroupNorm(2, 4)]
    layers += [nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 2 * 2, 8), nn.BatchNorm1d(8)]
    model = nn.Sequential(*layers)
    with pytest.raises(grapefx.BatchMixingError, match=r"module `1 \(BatchNorm2d\)`.*2 more") as info:
        _run(model, torch.randn(4, 3, 6, 6))
    assert "`6 (BatchNorm2d)`" in str(info.value) and "`9 (BatchNorm1d)`" in str(info.value)
    assert "(GroupNorm)" not in str(info.value)  # the GroupNorm layer is not a culprit


def test_a_single_sample_batch_is_not_checked_for_mixing_the_next_batch_is() -> None:
    """B=1 graphs skip the batch-mixing check (one sample mixes with none; their size-1 dims made
    false refusals): the B=1 step clips that sample's own gradient, the first B>=2 step refuses.
    (Without running statistics: those would carry the sample itself, refused at every B, see
    tests/test_state_updates.py.)"""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4, track_running_stats=False)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn, nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    cm = grapefx.compile(model, max_grad_norm=0.1, noise_multiplier=0.0, loss_reduction="sum")
    cm(torch.randn(1, 3, 6, 6)).pow(2).sum().backward()
    total = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert cm.per_sample_norms()[0] > 0.1 and total == pytest.approx(0.1, rel=1e-4)  # clipped to C
    with pytest.raises(grapefx.BatchMixingError, match=r"module `1 \(BatchNorm2d\)`"):
        cm(torch.randn(4, 3, 6, 6)).pow(2).sum().backward()


def test_batchnorm_in_eval_mode_and_frozen_is_accepted() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    model[1].eval().requires_grad_(False)
    _run(model, torch.randn(4, 3, 6, 6))
    assert model[0].weight.grad is not None and model[1].weight.grad is None


class _CenterOverBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return h - h.mean(0, keepdim=True)  # mixes samples


def test_reduction_over_batch_inside_model_is_refused() -> None:
    with pytest.raises(grapefx.BatchMixingError, match="mixes samples"):
        _run(_CenterOverBatch(), torch.randn(4, 5))


def test_every_reduction_that_mixes_samples_is_named_in_one_error() -> None:
    model = nn.Sequential(_CenterOverBatch(), nn.Tanh(), nn.Linear(3, 5), _CenterOverBatch())
    with pytest.raises(grapefx.BatchMixingError, match=r"module `0 .*mixes samples.*1 more: .*module `3 "):
        _run(model, torch.randn(4, 5))


class _NonlinearLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).mean(0).norm()  # not a sum of per-sample terms


def test_nonlinear_function_of_batch_reduction_is_refused() -> None:
    cm = grapefx.compile(_NonlinearLoss(), noise_multiplier=0.0)
    with pytest.raises(grapefx.BatchMixingError, match="not a sum or mean of per-sample terms"):
        cm(torch.randn(4, 5)).backward()


class _LossWithRegularizer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.fc(x), y) + 0.1 * self.fc.weight.pow(2).sum()


def test_data_independent_gradient_term_is_refused_with_parameter_name() -> None:
    cm = grapefx.compile(_LossWithRegularizer(), noise_multiplier=0.0)
    with pytest.raises(grapefx.UnsupportedOpError, match=r"fc\.weight.*does not depend on any sample"):
        cm(torch.randn(4, 5), torch.randint(0, 3, (4,))).backward()


class _GraphBreak(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > 0:  # data-dependent Python control flow: a graph break
            h = h * 2
        return self.b(h)


def test_graph_break_is_an_error_not_a_silent_split() -> None:
    """The message names the user's source line that broke the graph."""
    with pytest.raises(
        grapefx.GraphBreakError, match=r"one graph.*test_errors\.py:\d+ in forward \(`if h\.sum\(\) > 0:"
    ):
        _run(_GraphBreak(), torch.randn(4, 5))


class _RaisesWhileTraced(nn.Module):
    """An input left out (transformers' Switch Transformers and LongT5 need attention_mask): the
    model raises, here inside a try / finally, where Dynamo names only the `finally`."""

    def __init__(self, wrapped: bool) -> None:
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.wrapped = wrapped

    def masked(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.a(x) * mask[:, None]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.wrapped:
            return self.masked(x, mask)
        try:
            h = self.masked(x, mask)
        finally:
            x = None
        return h


@pytest.mark.parametrize("wrapped", [False, True])
def test_an_exception_raised_while_tracing_is_named(wrapped: bool) -> None:
    raising_line = r"masked \(`return self\.a\(x\) \* mask"
    # torch 2.13 names the `finally` the exception left; 2.11 and 2.14 the line that raised (2.11
    # gives the exception's type only)
    where = rf"in (forward \(`x = None`\)|{raising_line})" if wrapped else f"in {raising_line}"
    with pytest.raises(
        grapefx.GraphBreakError,
        match=rf"(?s)model raised TypeError(\(\"'NoneType' object is not subscriptable\"\))? while .*{where}.*without",
    ):
        _run(_RaisesWhileTraced(wrapped), torch.randn(4, 5))


def test_graph_break_through_plain_torch_compile_is_an_error() -> None:
    model = _GraphBreak()
    compiled = torch.compile(model, backend=grapefx.backend(noise_multiplier=0.0))
    with pytest.raises(Exception, match="one graph"):
        compiled(torch.randn(4, 5)).sum().backward()


def test_embedding_scale_grad_by_freq_is_refused() -> None:
    model = nn.Sequential(nn.Embedding(10, 4, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(grapefx.UnsupportedOpError, match="cannot split per sample"):
        _run(model, torch.randint(0, 10, (4, 3)))


def test_bad_config_values_are_rejected() -> None:
    with pytest.raises(grapefx.ConfigError, match="max_grad_norm"):
        grapefx.PrivacyConfig(max_grad_norm=0)
    with pytest.raises(grapefx.ConfigError, match="loss_reduction"):
        grapefx.PrivacyConfig(loss_reduction="avg")
    with pytest.raises(grapefx.ConfigError, match="unknown grapefx option"):
        grapefx.PrivacyConfig.from_options({"max_grad_nrom": 1.0})
    with pytest.raises(grapefx.ConfigError, match="two_pass=True is for flat / automatic"):
        grapefx.PrivacyConfig(two_pass=True, clipping="per_layer")


def test_bad_clip_groups_are_rejected_naming_the_parameters() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    model[2].bias.requires_grad_(False)  # frozen: needs no group

    def compile_with(**kw):  # noqa: ANN003, ANN202
        return grapefx.compile(model, clipping="group", **kw)

    with pytest.raises(grapefx.ConfigError, match=r"\['2.weight'\] match no group.*'\*'"):
        compile_with(clip_groups=[["0.*"]])
    with pytest.raises(grapefx.ConfigError, match=r"groups \[\['dec.\*'\]\] match no trainable parameter"):
        compile_with(clip_groups=[["0.*"], ["dec.*"], "*"])
    with pytest.raises(grapefx.ConfigError, match="one positive number per group"):
        compile_with(clip_groups=["0.*", "*"], clip_group_shares=[1.0])
    with pytest.raises(grapefx.ConfigError, match="one positive number per group"):
        compile_with(clip_groups=["0.*", "*"], clip_group_shares=["1", 2.0])
    with pytest.raises(grapefx.ConfigError, match="not 'module'"):
        compile_with(clip_groups="module", clip_group_shares=[1.0, 2.0])
    with pytest.raises(grapefx.ConfigError, match="'module' .* or a list"):
        compile_with(clip_groups="modules")
    with pytest.raises(grapefx.ConfigError, match="needs clip_groups"):
        compile_with()
    with pytest.raises(grapefx.ConfigError, match="need clipping='group'"):
        grapefx.compile(model, clip_groups="module")
    with pytest.raises(grapefx.ConfigError, match="two_pass=True is for flat / automatic"):
        compile_with(clip_groups="module", two_pass=True)
    assert compile_with(clip_groups=[["0.*"], "2.*"]).privacy_config.clip_groups == (("0.*",), ("2.*",))


def test_non_finite_per_sample_norm_is_reported_with_parameter_names() -> None:
    model = nn.Linear(4, 2)
    cm = grapefx.compile(model, noise_multiplier=0.0)
    x = torch.randn(3, 4)
    x[1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"sample.*1.*weight"):
        cm(x).sum().backward()


class _MaxOverBatchLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).pow(2).sum(1).amax(0)  # the worst sample's loss: not a sum over samples


def test_nonlinear_reduction_over_the_batch_is_refused() -> None:
    cm = grapefx.compile(_MaxOverBatchLoss(), noise_multiplier=0.0)
    with pytest.raises(grapefx.BatchMixingError, match="nonlinear reduction"):
        cm(torch.randn(4, 5)).backward()


class _ScanOverBatch(nn.Module):
    """A cumsum / flip along the batch dim mixes samples; along tokens it is per-sample (RoBERTa)."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return h.cumsum(0) if self.op == "cumsum" else h.flip(0)


@pytest.mark.parametrize("op", ["cumsum", "flip"])
def test_scan_over_the_batch_is_refused_naming_the_op(op: str) -> None:
    with pytest.raises(grapefx.UnsupportedOpError, match=rf"`fc.weight`.*{op}"):
        _run(_ScanOverBatch(op), torch.randn(4, 5))


class _WeightedCE(nn.Module):
    """Cross-entropy with class weights inside the compiled module."""

    def __init__(self, reduction: str) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.reduction = reduction

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.fc(x), y, weight=torch.tensor([1.0, 2.0, 0.5]), reduction=self.reduction)


def test_class_weighted_mean_loss_is_refused_and_sum_accepted() -> None:
    """A weighted mean divides by the batch's summed target weights: not a mean of per-sample terms."""
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 1])
    cm = grapefx.compile(_WeightedCE("mean"), noise_multiplier=0.0)
    with pytest.raises(grapefx.BatchMixingError, match=r"not a sum or mean of per-sample terms.*class weights"):
        cm(x, y).backward()
    model = _WeightedCE("sum")
    grapefx.compile(model, noise_multiplier=0.0, loss_reduction="sum")(x, y).backward()
    assert model.fc.weight.grad is not None


class _TokenLM(nn.Module):
    """Loss inside, as Hugging Face LMs compute it from labels: mean cross-entropy, ignore_index=-100."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.head = nn.Linear(6, 11)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.emb(ids))
        return F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("codegen", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_mean_over_padded_targets_raises_on_the_padded_step(codegen: str) -> None:
    """Without padding the mean is per-sample (accepted); a step with ignored targets divides by a
    batch-wide count and raises instead of clipping a rescaled gradient."""
    model = _TokenLM()
    cm = grapefx.compile(model, max_grad_norm=1.0, noise_multiplier=0.0, codegen=codegen)
    ids, labels = torch.randint(0, 11, (4, 5)), torch.randint(0, 11, (4, 5))
    cm(ids, labels).backward()
    assert model.head.weight.grad is not None
    padded = labels.clone()
    padded[0, 3:] = -100
    with pytest.raises(grapefx.BatchMixingError, match=r"mean over 18 of 20 targets.*reduction='sum'"):
        cm(ids, padded)


class _ConstantMaskMean(nn.Module):
    """Divides by the count of a fixed (batch-free) mask: a constant, not a batch-wide count."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.register_buffer("keep", torch.tensor([True, True, False, True]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fc(x) * self.keep).sum(1) / self.keep.sum()


def test_count_of_a_batch_free_mask_is_not_guarded() -> None:
    model = _ConstantMaskMean()
    cm = grapefx.compile(model, max_grad_norm=1.0, noise_multiplier=0.0, loss_reduction="sum")
    cm(torch.randn(4, 5)).sum().backward()
    assert model.fc.weight.grad is not None


class _StridedAcrossSamples(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return h.as_strided(h.shape, (1, 1))  # row i starts at element i: rows overlap across samples


def test_as_strided_that_reads_across_samples_is_refused_naming_the_op() -> None:
    """as_strided is followed only where it is a view in disguise (tests/zoo.py: swin)."""
    with pytest.raises(grapefx.UnsupportedOpError, match="as_strided"):
        _run(_StridedAcrossSamples(), torch.randn(4, 4))


@torch.library.custom_op("grapefx_test::row_scale", mutates_args=())
def _row_scale(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """w * s[:, None], as an opaque op with no vmap batching rule (its own backward)."""
    return w * s[:, None]


@_row_scale.register_fake
def _(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(w)


def _row_scale_backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN202
    return _row_scale(grad, ctx.s), None


def _row_scale_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.s = inputs[1]


_row_scale.register_autograd(_row_scale_backward, setup_context=_row_scale_setup)


class _ScaledWeight(nn.Module):
    """A Linear whose weight is row-scaled by a custom op: the weight's gradient leaves the batch
    contraction through that op."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 5))
        self.register_buffer("s", torch.rand(3) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _row_scale(self.w, self.s))


def test_post_op_without_batching_rule_is_refused_naming_op_and_parameter() -> None:
    """Without the check, vmap would loop over the samples, fix the symbolic batch size and torch
    would fail the compile with a shape-constraint error naming neither op nor parameter."""
    with pytest.raises(grapefx.UnsupportedOpError, match=r"(?s)parameter `w`.*row_scale"):
        _run(_ScaledWeight(), torch.randn(4, 5))


class _IndexAcrossSamples(nn.Module):
    """Advanced indexing that reads other samples' rows: refused (the per-sample forms, Falcon's
    constant head index and h[arange(B), last], are in tests/zoo.py: last_token_pool)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, 4]
        h = self.fc(x)
        B, T = h.shape[:2]
        pick = (x[:, 0, 0] > 0).long()  # a per-sample index in [0, T)
        if self.how == "batch_by_data":  # row j of the output is sample pick[j]
            return h[pick]
        if self.how == "other_dim_by_data":  # [B, B, 4]: sample b at every sample's index
            return h[:, pick]
        return h[torch.arange(B).flip(0), pick]  # rows reversed: not the identity


@pytest.mark.parametrize("how", ["batch_by_data", "other_dim_by_data", "reversed_arange"])
def test_indexing_that_reads_across_samples_is_refused_naming_the_op(how: str) -> None:
    with pytest.raises(grapefx.UnsupportedOpError, match=r"(?s)fc\.weight.*index"):
        _run(_IndexAcrossSamples(how), torch.randn(5, 3, 4))


_ACROSS_THE_BATCH = {
    "sort": (lambda h: h.sort(dim=0).values, grapefx.UnsupportedOpError, "sort"),
    "max": (lambda h: h.max(dim=0, keepdim=True).values * h, grapefx.UnsupportedOpError, "max"),
    "unfold": (lambda h: h.unfold(0, 1, 1).squeeze(-1), grapefx.UnsupportedOpError, "unfold"),
    # torch 2.14 decomposes the norm: then the message names its sum over the batch
    "normalize": (lambda h: F.normalize(h, dim=0), grapefx.BatchMixingError, "linalg_vector_norm|over the batch"),
    "median": (lambda h: h - h.median(), grapefx.BatchMixingError, "median"),
}


class _AlongTheBatch(nn.Module):
    def __init__(self, op) -> None:  # noqa: ANN001
        super().__init__()
        self.op = op
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(self.fc(x))


@pytest.mark.parametrize("name", list(_ACROSS_THE_BATCH))
def test_selecting_or_normalizing_along_the_batch_dim_is_refused(name: str) -> None:
    """The same ops along a feature dim are per-sample (tests/zoo.py: along_dims)."""
    op, error, culprit = _ACROSS_THE_BATCH[name]
    with pytest.raises(error, match=culprit):
        _run(_AlongTheBatch(op), torch.randn(5, 4))


class _BagsAcrossSamples(nn.Module):
    """nn.EmbeddingBag forms grapefx refuses: bags whose offsets are not one sample's row each (bag b
    also takes the first id of sample b+1), and mode max."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.bag = nn.EmbeddingBag(20, 4, mode="max" if how == "max" else "sum")
        self.fc = nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.how == "max":
            return self.fc(self.bag(ids))
        B, L = ids.shape
        starts = torch.arange(0, B * L, L, device=ids.device)
        offsets = torch.where(starts > 0, starts + 1, starts)
        return self.fc(self.bag(ids.flatten(), offsets))


@pytest.mark.parametrize("how", ["shifted_offsets", "max"])
def test_embedding_bags_that_mix_samples_or_use_max_are_refused(how: str) -> None:
    """Per-sample bags (ids [B, L], sum / mean) are in tests/zoo.py: embedding_bags."""
    with pytest.raises(grapefx.UnsupportedOpError, match=r"(?s)bag\.weight.*_embedding_bag"):
        _run(_BagsAcrossSamples(how), torch.randint(0, 20, (5, 3)))


class _HardCodedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).reshape(5, 4)  # the batch size written into the model


def test_hard_coded_batch_size_is_reported_with_its_source_line() -> None:
    """Not torch's ConstraintViolationError: a GrapefxError saying why and where."""
    with pytest.raises(grapefx.GrapefxError, match=r"(?s)fixed the batch size.*test_errors\.py.*reshape\(5, 4\)"):
        _run(_HardCodedBatch(), torch.randn(5, 4))


class _TableColumns(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(3, 20))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[:, ids].sum((0, 2))[:, None]  # per-sample ids into a trailing dim


def test_lookup_table_indexed_past_its_leading_dim_is_refused() -> None:
    """table[ids] works (tests/zoo.py: lookup_tables); the per-sample form of table[:, ids] is not
    implemented, and is refused rather than guessed."""
    with pytest.raises(grapefx.UnsupportedOpError, match=r"(?s)`table`.*index_put"):
        _run(_TableColumns(), torch.randint(0, 20, (5, 4)))


class BiasFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, keys: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # keys [K, 4], x [B, 4]
        return self.fc(x) + (x @ keys.T).mean(-1, keepdim=True)


def test_tensor_arguments_of_different_batch_sizes_are_refused() -> None:
    """Two tensor arguments with different sizes in dim 0 (both marked dynamic): which is the batch
    is ambiguous, so grapefx refuses and names both instead of clipping the wrong rows."""
    cm = grapefx.compile(BiasFirst(), noise_multiplier=0.0)
    with pytest.raises(grapefx.GrapefxError, match=r"differ there: `keys` \(s\d+\), `x` \(s\d+\)"):
        cm(torch.randn(5, 4), torch.randn(3, 4)).sum().backward()


@pytest.mark.parametrize("codegen", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_boolean_mask_selection_with_unequal_counts_raises_on_that_step(codegen: str) -> None:
    """x[mask].view(B, -1, d) is per sample only when every sample selects as many rows: a step
    where they differ (the view would cut rows of two samples into one) raises before any gradient."""
    from zoo import EosPool

    model = EosPool()
    cm = grapefx.compile(model, max_grad_norm=1.0, noise_multiplier=0.0, loss_reduction="sum", codegen=codegen)
    ids = torch.randint(2, 20, (4, 6))
    ids[:, [1, 4]] = EosPool.EOS  # two EOS per sample: accepted
    cm(ids).sum().backward()
    assert model.fc.weight.grad is not None
    model.zero_grad()
    ids[0, 1], ids[1, 2] = 5, EosPool.EOS  # one EOS in sample 0, three in sample 1: 8 rows, B | 8
    with pytest.raises(grapefx.BatchMixingError, match=r"(?s)index.*select 1, 3, 2, 2.*same number of rows") as info:
        cm(ids)
    assert "returned by the compiled model" not in str(info.value)  # its view mixes rows in the graph
    assert model.fc.weight.grad is None


class _SelectedRowsOut(nn.Module):
    """A layer on x[mask] rows (sliced along the features), the rows returned, or their loss if `loss`."""

    def __init__(self, loss: bool) -> None:
        super().__init__()
        self.a, self.b, self.loss = nn.Linear(8, 8), nn.Linear(6, 3), loss

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.b(self.a(x)[mask][:, 2:])
        return out.pow(2).sum() if self.loss else out


def test_rows_returned_with_unequal_counts_say_to_move_the_loss_inside() -> None:
    """Rows used row by row but returned to the caller keep the equal-count check (the loss made of
    them is out of sight); the message says so, and the same loss inside the module works."""
    torch.manual_seed(0)
    x, mask = torch.randn(4, 5, 8), torch.zeros(4, 5, dtype=torch.bool)
    mask[:, :2] = True
    mask[0, 3] = True  # 3, 2, 2, 2 rows
    model, C = _SelectedRowsOut(loss=True), 5.2  # per-sample norms 10.0, 5.1, 4.5, 5.3
    cm = grapefx.compile(_SelectedRowsOut(loss=False), max_grad_norm=C, noise_multiplier=0.0, loss_reduction="sum")
    with pytest.raises(grapefx.BatchMixingError, match=r"(?s)select 3, 2, 2, 2.*returned by the compiled model"):
        cm(x, mask).pow(2).sum().backward()
    grapefx.compile(model, max_grad_norm=C, noise_multiplier=0.0, loss_reduction="sum")(x, mask).backward()
    expected, scales = {n: torch.zeros_like(p) for n, p in model.named_parameters()}, []
    for i in range(4):  # per-sample autograd (torch.func cannot vmap a boolean-mask selection)
        grads = torch.autograd.grad(model(x[i : i + 1], mask[i : i + 1]), list(model.parameters()))
        scales.append(min(1.0, C / (torch.sqrt(sum(g.pow(2).sum() for g in grads)).item() + 1e-6)))
        for (n, _), g in zip(model.named_parameters(), grads):
            expected[n] += scales[-1] * g
    assert min(scales) < 1.0 == max(scales)  # some samples clipped, some not
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-5, atol=1e-6)


class _MaskAcrossTheBatch(nn.Module):
    """x[mask] whose rows are regrouped along the wrong dim (the mask's batch is not x's leading dim)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, 4]
        h = self.fc(x).transpose(0, 1)  # [T, B, 4]: the batch is dim 1
        mask = (x[..., 0] > 0).transpose(0, 1)
        return h[mask].sum(0, keepdim=True).expand(x.shape[0], 4)


def test_boolean_mask_not_led_by_the_batch_is_refused_naming_the_op() -> None:
    with pytest.raises(grapefx.GrapefxError, match=r"(?s)fc\.(weight|bias).*index"):
        _run(_MaskAcrossTheBatch(), torch.randn(5, 3, 4))


class _MaskedTokenVariant(nn.Module):
    """A masked-token loss over `logits[mask]` written two ways that grapefx cannot read per sample
    for every batch: the head applied to rows selected from the input (no mask in the backward
    graph to put them back by sample), or a mean over the selected rows (equal counts only)."""

    def __init__(self, head_after_selection: bool, flat: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 6)
        self.head_after_selection = head_after_selection
        self.flat = flat

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # x [B, T, 4], labels [B, T]
        mask = labels != -100
        if self.head_after_selection:  # x needs no gradient: the backward never sees the mask
            return F.cross_entropy(self.head(x[mask]), labels[mask], reduction="sum")
        h = torch.tanh(self.fc(x))
        logits = self.head(h)
        if self.flat:  # the mask over the flattened [B·T] tokens
            logits, labels, mask = logits.view(-1, 6), labels.reshape(-1), mask.reshape(-1)
        return F.cross_entropy(logits[mask], labels[mask])  # a mean over the batch's rows


def _masked_labels(B: int, T: int) -> torch.Tensor:
    labels = torch.randint(0, 6, (B, T))
    labels[0, : T - 1] = -100  # sample 0 selects one row, the others more
    return labels


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_layer_applied_to_masked_input_rows_is_refused_with_the_fix() -> None:
    """A layer on rows selected from a trainable layer's output works (zoo `masked_rows_head`); on
    rows of an input, the mask is not in the backward graph. Also: the refusal is raised once, at
    the backward, without torch first logging its traceback (AOTAutograd's eager backward compile
    under dynamic shapes)."""
    cm = grapefx.compile(_MaskedTokenVariant(True), max_grad_norm=1.0, noise_multiplier=0.0, loss_reduction="sum")
    log, seen = logging.getLogger("torch._functorch._aot_autograd.graph_compile"), _Records()
    log.addHandler(seen)
    try:
        with pytest.raises(grapefx.UnsupportedOpError, match=r"(?s)`head\.weight`.*boolean mask.*head\(h\)\[mask\]"):
            cm(torch.randn(4, 5, 4), _masked_labels(4, 5)).backward()
    finally:
        log.removeHandler(seen)
    assert not [r for r in seen.records if r.exc_info and isinstance(r.exc_info[1], grapefx.GrapefxError)]
    assert logging.getLogger("torch._functorch._aot_autograd.graph_compile").filters  # grapefx's filter


@pytest.mark.parametrize("flat", [False, True], ids=["mask_BT", "mask_flattened"])
def test_mean_over_masked_rows_with_unequal_counts_raises(flat: bool) -> None:
    """The mean divides by the whole batch's count of rows: refused on a step where samples select
    different numbers (counted per sample from a [B, T] or a flattened [B·T] mask); the message
    names the per-row sum that needs no equal counts."""
    cm = grapefx.compile(_MaskedTokenVariant(False, flat), max_grad_norm=1.0, noise_multiplier=0.0)
    with pytest.raises(grapefx.BatchMixingError, match=r"(?s)select 1, 5, 5, 5.*reduction='sum'"):
        cm(torch.randn(4, 5, 4), _masked_labels(4, 5)).backward()


class _ReturnsMaskedRows(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.head(x)[labels != -100]


class _NumbersMaskedRows(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows = self.head(x)[labels != -100]
        position = torch.arange(rows.shape[0], dtype=rows.dtype)  # a row's place among all samples' rows
        return (rows.tanh().sum(-1) * position).sum()


def test_masked_rows_numbered_across_the_batch_keep_the_count_check() -> None:
    """Weighting each row by its index in x[mask] makes a sample's loss depend on how many rows the
    samples before it selected: not row by row, so equal counts are required."""
    cm = grapefx.compile(_NumbersMaskedRows(), max_grad_norm=1.0, noise_multiplier=0.0, loss_reduction="sum")
    with pytest.raises(grapefx.BatchMixingError, match=r"select 1, 5, 5, 5"):
        cm(torch.randn(4, 5, 4), _masked_labels(4, 5)).backward()


def test_masked_rows_returned_to_the_caller_keep_the_count_check() -> None:
    """The loss computed outside from x[mask]'s rows is out of grapefx's sight (a mean over all rows
    would divide by the batch's count): the rows are read per sample only with equal counts."""
    cm = grapefx.compile(_ReturnsMaskedRows(), max_grad_norm=1.0, noise_multiplier=0.0, loss_reduction="sum")
    labels = _masked_labels(4, 5)
    with pytest.raises(grapefx.BatchMixingError, match=r"select 1, 5, 5, 5"):
        F.cross_entropy(cm(torch.randn(4, 5, 4), labels), labels[labels != -100], reduction="sum").backward()


class _RoutedSamples(nn.Module):
    """Samples routed to per-task heads by masks over the batch dim (zoo `task_routed` works); `how`
    breaks it: "flip" reverses the task's rows (sample i gets sample j's output), "swap" writes
    task 0's rows to task 1's samples, "bias_only" writes a per-task bias with no selection."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.heads = nn.ModuleList(nn.Linear(4, 3) for _ in range(2))
        self.task_bias = nn.Parameter(torch.randn(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, task = x[:, :-1], x[:, -1].long()  # features, then the task id
        out = x.new_zeros(x.shape[0], 3)
        for k, head in enumerate(self.heads):
            if self.how == "bias_only":
                out[task == k] = self.task_bias[k]
                continue
            rows = head(x[task == k])
            out[task == (1 - k if self.how == "swap" else k)] = rows.flip(0) if self.how == "flip" else rows
        return out


@pytest.mark.parametrize("how", ["flip", "swap"])
def test_routed_samples_mixed_across_the_batch_keep_the_count_check(how: str) -> None:
    """Reordering a task's rows, or writing them to other samples' places, moves outputs between
    samples: not row by row, so the selection keeps the equal-count check (0 or 1 row per sample
    here: refused on the step)."""
    cm = grapefx.compile(_RoutedSamples(how), max_grad_norm=1.0, noise_multiplier=0.0, loss_reduction="sum")
    with pytest.raises(grapefx.BatchMixingError, match=r"select 1, 0, 1, 0, 0, 1"):
        cm(_with_tasks(torch.randn(6, 4), [0, 1, 0, 1, 1, 0])).square().sum().backward()


def test_batch_free_value_written_by_an_unselected_mask_is_refused() -> None:
    """A per-task bias written through masks that select nothing else (`out[task == k] = b[k]`): the
    backward's selection of its gradient cannot be tied to a checked mask, so it is refused, never
    summed over the batch (the message names the op); `b[task]` is the supported spelling."""
    cm = grapefx.compile(_RoutedSamples("bias_only"), max_grad_norm=1.0, noise_multiplier=0.0, loss_reduction="sum")
    with pytest.raises(grapefx.UnsupportedOpError, match=r"task_bias.*index\.Tensor"):
        cm(_with_tasks(torch.randn(6, 4), [0, 1, 0, 1, 1, 0])).square().sum().backward()


def _with_tasks(x: torch.Tensor, tasks: list[int]) -> torch.Tensor:
    return torch.cat([x, torch.tensor(tasks, dtype=x.dtype)[:, None]], dim=1)


@pytest.mark.slow
def test_moe_load_balancing_loss_is_refused() -> None:
    """Mixtral's auxiliary load-balancing loss (`output_router_logits=True`) multiplies router
    statistics averaged over the whole batch: refused; the routing alone is fine
    (zoo `hf_mixtral`)."""
    import transformers as tf

    cfg = tf.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, use_cache=False,
        router_jitter_noise=0.0, output_router_logits=True, router_aux_loss_coef=0.01,
    )  # fmt: skip
    model = tf.MixtralForCausalLM(cfg)
    model.train()
    cm = grapefx.compile(model, max_grad_norm=1.0, noise_multiplier=0.0)
    ids = torch.randint(0, 64, (5, 8))
    with pytest.raises(grapefx.BatchMixingError, match=r"reduces over the batch dimension.*mixes samples"):
        cm(input_ids=ids, labels=ids).loss.backward()


@pytest.mark.slow
def test_unprepared_moe_on_the_plain_backend_names_grapefx_prepare() -> None:
    """Without `grapefx.prepare`, Mixtral's experts sort tokens across the batch: the refusal names
    the experts module and says to call `grapefx.prepare(model)`."""
    import transformers as tf

    cfg = tf.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, use_cache=False,
        router_jitter_noise=0.0,
    )  # fmt: skip
    model = tf.MixtralForCausalLM(cfg)
    model.train()
    backend = grapefx.backend(max_grad_norm=1.0, noise_multiplier=0.0, loss_reduction="sum")
    cm = torch.compile(model, backend=backend, fullgraph=True)
    ids = torch.randint(0, 64, (5, 8))
    with pytest.raises(grapefx.UnsupportedOpError, match=r"(?s)MixtralExperts.*grapefx\.prepare\(model\)"):
        logits = cm(input_ids=ids).logits
        F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="sum").backward()
