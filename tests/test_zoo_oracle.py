"""Every zoo model against the torch.func oracle (float64), noise off.

Each check compiles a model once and runs several batch sizes through the SAME compiled module
(3, then 1, then 6: the dynamic-B graph, the specialised B=1 graph, the dynamic graph again), so the
suite also checks that a new batch size does not recompile (beyond B=1) and that switching between
graphs keeps each graph's privacy state straight. C is set between the per-sample norms of the
largest batch, so some samples are clipped and some are not (asserted). The per-sample norms that
grapefx reports are compared with the oracle's too.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from oracle import assert_grads_match, oracle_grads, per_sample_grads, reference_copy
from torch.func import functional_call
from zoo import HF_MORE, ZOO, LossInside, ZooCase, case, dynamo_graph_count, version_marks

import grapefx

RTOL = 1e-5  # float32 target: |err| <= RTOL * |ref| per parameter
NORM_RTOL = 1e-4
SIZES = (3, 1, 6)


def _cases(names=None, marks=None):
    """pytest params for zoo cases (the HF model needs `transformers`, a test extra: it fails, not
    skips, when missing)."""
    out = []
    for c in ZOO if names is None else [case(n) for n in names]:
        m = list((marks or {}).get(c.name, ()))
        out.append(pytest.param(c, id=c.name, marks=m))
    return out


def choose_C(norms: torch.Tensor) -> float:
    """A clip bound strictly between the per-sample norms: about half the samples are clipped."""
    s = torch.sort(norms.double()).values
    k = len(s) // 2
    return float(math.sqrt(s[k - 1] * s[k]))


def per_param_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, zc: ZooCase, reduction: str) -> torch.Tensor:
    """[B, P] per-sample, per-parameter gradient norms (float64, torch.func)."""
    m = reference_copy(model)
    params = {k: v.detach() for k, v in m.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in m.named_buffers()}
    xd = x.double() if x.is_floating_point() else x

    def loss_one(p, xi, yi):
        return zc.loss(functional_call(m, (p, buffers), (xi[None],)), yi[None], reduction)

    g = per_sample_grads(m, loss_one, params, (xd, y))
    return torch.stack([g[k].reshape(x.shape[0], -1).norm(dim=1) for k in params], dim=1)


def run_against_oracle(
    zc: ZooCase,
    *,
    reduction: str = "sum",
    clipping: str = "flat",
    strategy: str = "auto",
    codegen: str = "eager",
    loss_inside: bool = False,
    sizes: tuple[int, ...] = SIZES,
    expected_batch_size: int | None = None,
    device: str = "cpu",
    rtol: float = RTOL,
    plain_backend: bool = False,
    two_pass: bool = False,
    memory_policy: str = "balanced",
    clip_groups: str | list[list[str]] | None = None,
    clip_group_shares: list[float] | None = None,
) -> None:
    """`plain_backend`: compile with `torch.compile(backend=grapefx.backend(...))` after
    `grapefx.prepare(model)` instead of `grapefx.compile` (no dynamic batch marking there: Dynamo
    compiles the first size statically, then one dynamic graph)."""
    model = zc.make().to(device)
    batches = {B: tuple(t.to(device) for t in zc.batch(B)) for B in sizes}
    big = max(sizes)

    def psl(out, y):
        return zc.loss(out, y, reduction)

    oracle_groups = clip_groups if isinstance(clip_groups, list) else None
    _, big_norms = oracle_grads(model, batches[big], psl, 1.0, reduction)
    C = choose_C(big_norms)
    if clipping == "per_layer":
        pn = per_param_norms(model, *batches[big], zc, reduction)
        P = pn.shape[1]
        C = math.sqrt(P) * float(pn[pn > 0].median())  # zeros: layers a sample does not reach (routing)
        cp = C / math.sqrt(P)
        assert (pn > cp * 1.001).any() and (pn < cp * 0.999).any(), "per-layer clipping must be exercised"
    elif clipping == "group":  # clip_groups: "module", or exact parameter names (the oracle matches no patterns)
        if clip_groups == "module":
            oracle_groups = module_groups(model)
        pn = per_param_norms(model, *batches[big], zc, reduction)
        names = [k for k, v in model.named_parameters() if v.requires_grad]
        shares = clip_group_shares or [1.0] * len(oracle_groups)
        fractions = [s / math.sqrt(sum(x * x for x in shares)) for s in shares]
        gn = [pn[:, [names.index(n) for n in g]].norm(dim=1) / f for g, f in zip(oracle_groups, fractions)]
        gn = torch.stack(gn, 1)
        C = float(gn[gn > 0].median())  # group g is clipped where its norm exceeds C·f_g
        assert (gn > C * 1.001).any() and (gn < C * 0.999).any(), "group clipping must be exercised"
    else:
        assert (big_norms > C * 1.001).any() and (big_norms < C * 0.999).any(), big_norms

    target = LossInside(model, zc.loss, reduction) if loss_inside else model
    options = dict(
        max_grad_norm=C,
        noise_multiplier=0.0,
        loss_reduction=reduction,
        clipping=clipping,
        strategy=strategy,
        codegen=codegen,
        expected_batch_size=expected_batch_size,
        seed=0,
        two_pass=two_pass,
        memory_policy=memory_policy,
    )
    if clipping == "group":
        options.update(clip_groups=clip_groups, clip_group_shares=clip_group_shares)
    if plain_backend:
        backend = grapefx.backend(**options)
        cm = torch.compile(grapefx.prepare(target), backend=backend, fullgraph=True)
        last_norms = lambda: backend.state.last_norms  # noqa: E731
    else:
        cm = grapefx.compile(target, **options)
        last_norms = cm.per_sample_norms
    graphs0 = dynamo_graph_count()
    for B in sizes:
        x, y = batches[B]
        model.zero_grad(set_to_none=True)
        loss = cm(x, y) if loss_inside else zc.loss(cm(x), y, reduction)
        assert loss.dim() == 0
        loss.backward()
        ref, norms = oracle_grads(
            model,
            (x, y),
            psl,
            C,
            reduction,
            clipping=clipping,
            expected_batch_size=expected_batch_size,
            groups=oracle_groups,
            shares=clip_group_shares,
        )
        try:
            assert_grads_match(model, ref, rtol=rtol)
        except AssertionError as e:
            where = f"{zc.name} B={B} {reduction} {clipping} {strategy} {codegen} {device}"
            raise AssertionError(f"[{where}] {e}") from None
        got = last_norms()
        assert got is not None and got.shape == (B,), f"B={B}: per_sample_norms() = {got!r}"
        torch.testing.assert_close(got.double(), norms, rtol=NORM_RTOL, atol=1e-6, msg=lambda m: f"B={B}: {m}")
    n_graphs = dynamo_graph_count() - graphs0
    assert n_graphs <= 2, f"{n_graphs} graphs compiled for batch sizes {sizes}: expected B=1 + one dynamic-B graph"


# ----------------------------------------------------------------------------------------------
# every zoo model: flat clipping, loss outside the compiled module, sum and mean
# ----------------------------------------------------------------------------------------------
# the mean-reduction variants of the heaviest models run with -m slow only (the sum variants and the
# lighter models already cover their graphs in the default suite)
HEAVY = ("gpt_tied", "resnet_gn", "vit", "hf_gpt2", "mha_tmajor", "vit_qkv_unbind", "convnext", "swin", "recurrent")
# session 10's zoo models: their sum variants run by default (and their sensitivity checks), the
# mean variants with -m slow, to keep the default suite near 10 minutes on 2 cores
HEAVY += ("weight_norm", "along_dims", "constants_over_batch", "instance_norm", "last_token_pool", "embedding_bags")
HEAVY += ("conv_transpose", "bilinear")
HEAVY += ("gpt", "gpt_checkpointed")  # its mean reduction is also checked with the loss inside (test_loss_inside)
HEAVY += ("routed_row_experts", "gathered_experts", "task_routed")  # sessions 16-18: 7-9 s per reduction
# transformers models beyond GPT-2 run with -m slow in both reductions (~10 s each); the patterns
# they exercise (shared ids, cumsum positions, tensor constants) are in `encoder_ids` by default
SLOW_ALWAYS = ("hf_bert", "hf_roberta", "hf_llama", "hf_opt")


def _flat_params():
    out = []
    for reduction in ("sum", "mean"):
        for p in _cases():
            zc = p.values[0]
            marks = list(p.marks)
            if (reduction == "mean" and zc.name in HEAVY) or zc.name in SLOW_ALWAYS:
                marks.append(pytest.mark.slow)
            out.append(pytest.param(zc, reduction, id=f"{zc.name}-{reduction}", marks=marks))
    return out


@pytest.mark.parametrize("zc,reduction", _flat_params())
def test_zoo_flat(zc: ZooCase, reduction: str) -> None:
    run_against_oracle(zc, reduction=reduction)


@pytest.mark.slow
@pytest.mark.parametrize("zc", [pytest.param(c, id=c.name, marks=version_marks(c.name)) for c in HF_MORE])
def test_more_transformers_families(zc: ZooCase) -> None:
    """More transformers families (tests/zoo.py HF_MORE): encoders, decoders incl. Mixtral, T5, ViT, BART's
    classification head, the speech encoders, and a peft LoRA model."""
    run_against_oracle(zc, reduction="sum")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hf_mixtral", "hf_switch", "hf_wav2vec2", "hf_ctrl"])
def test_transformers_models_on_the_plain_backend_after_prepare(name: str) -> None:
    """`torch.compile(grapefx.prepare(model), backend=grapefx.backend(...))`: the transformers
    workarounds grapefx.compile applies itself, applied once by `prepare` (README, "Use")."""
    zc = next(c for c in HF_MORE if c.name == name)
    run_against_oracle(zc, reduction="sum", plain_backend=True, sizes=(3, 6))


# ----------------------------------------------------------------------------------------------
# loss computed inside the compiled module
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,reduction",
    [
        ("mlp", "mean"),
        ("mlp", "sum"),
        ("linear3d", "mean"),
        ("embedding_bag", "sum"),
        ("conv2d", "mean"),
        ("gpt", "mean"),
        pytest.param("gpt_tied", "sum", marks=pytest.mark.slow),
    ],
)
def test_loss_inside(name: str, reduction: str) -> None:
    run_against_oracle(case(name), reduction=reduction, loss_inside=True)


# ----------------------------------------------------------------------------------------------
# other clipping modes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize(
    "zc",
    _cases(
        ["mlp", "conv2d", "embedding_bag", "norm_layouts", "masked_rows_head", "gpt"], marks={"gpt": [pytest.mark.slow]}
    ),
)
def test_per_layer_clipping(zc: ZooCase, reduction: str) -> None:
    run_against_oracle(zc, reduction=reduction, clipping="per_layer")


def module_groups(model: nn.Module) -> list[list[str]]:
    """Trainable parameters grouped by the module that holds them (what clip_groups='module' means)."""
    groups: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(name.rpartition(".")[0], []).append(name)
    return list(groups.values())


def blocks_of(model: nn.Module, k: int) -> list[list[str]]:
    """The trainable parameters in k consecutive blocks (a "group-wise" split by depth)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    cuts = [len(names) * j // k for j in range(k + 1)]
    return [names[a:b] for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


@pytest.mark.parametrize(
    "name,grouping,reduction,strategy",
    [
        ("mlp", "module", "sum", "auto"),
        ("conv2d", "module", "mean", "auto"),  # weight and bias of a convolution: one weighted backward
        ("gpt_tied", "blocks3", "sum", "auto"),  # a tied weight's cross terms inside one group
        ("long_tokens", "blocks2", "mean", "ghost"),  # blocked Grams
        ("norm_layouts", "module", "sum", "instantiate"),
        ("masked_rows_head", "blocks2", "sum", "auto"),
    ],
)
def test_group_clipping(name: str, grouping: str, reduction: str, strategy: str) -> None:
    """clipping='group': each group of parameters clipped on its own to C·s_g/‖s‖ (unequal shares for
    the block splits), against the oracle clipping the same groups."""
    zc = case(name)
    groups = "module" if grouping == "module" else blocks_of(zc.make(), int(grouping[len("blocks") :]))
    shares = None if grouping == "module" else [1.0 + j for j in range(len(groups))]
    run_against_oracle(
        zc, reduction=reduction, clipping="group", strategy=strategy, clip_groups=groups, clip_group_shares=shares
    )


@pytest.mark.parametrize("name", ["gathered_experts", "routed_row_experts"])
@pytest.mark.parametrize("strategy", ["ghost", pytest.param("instantiate", marks=pytest.mark.slow)])
def test_per_layer_clipping_of_expert_weights(name: str, strategy: str) -> None:
    """Each expert weight clipped by its own norm, so an error in that norm shows at full size (under
    flat clipping the other layers dilute it). gathered_experts: the ghost norm masked to rows of the
    same expert, on rank-1 and rank-2 row products, and the instantiated tables; routed_row_experts:
    per expert piece of the fused weight, the sum of the pieces' norms."""
    run_against_oracle(case(name), reduction="sum", clipping="per_layer", strategy=strategy)


def test_per_layer_clipping_of_ghost_norms() -> None:
    """Per-layer clip factors from ghost norms: blocked Grams, tied cross terms, positions' lookup."""
    run_against_oracle(case("long_tokens"), reduction="sum", clipping="per_layer", strategy="ghost")


@pytest.mark.parametrize(
    "zc,reduction",
    [
        pytest.param(case(n), r, id=f"{n}-{r}", marks=[pytest.mark.slow] if (r == "mean" and n != "mlp") else [])
        for n in ("mlp", "linear3d", "conv2d", "gpt_tied")
        for r in ("sum", "mean")
    ],
)
def test_automatic_clipping(zc: ZooCase, reduction: str) -> None:
    run_against_oracle(zc, reduction=reduction, clipping="automatic")


@pytest.mark.parametrize(
    "name,options",
    [
        ("gpt_checkpointed", {}),
        ("gpt_checkpointed", {"reduction": "mean", "clipping": "automatic"}),
        ("gpt_checkpointed", {"reduction": "mean", "loss_inside": True}),
        ("mlp", {"loss_inside": True}),
        ("conv2d", {"reduction": "mean"}),
        ("masked_rows_head", {}),  # the loss inside, over x[mask] rows: weighted row by row
        pytest.param("masked_tokens_flat", {"reduction": "mean"}, marks=pytest.mark.slow),
        pytest.param("gpt_tied", {}, marks=pytest.mark.slow),
        pytest.param("embedding_bags", {"reduction": "mean"}, marks=pytest.mark.slow),
        pytest.param("gpt_checkpointed", {"reduction": "mean", "codegen": "inductor"}, marks=pytest.mark.slow),
        pytest.param("hf_modernbert_sparse", {}, marks=pytest.mark.slow),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()) or "sum",
)
def test_two_pass(name: str, options: dict) -> None:
    """Flat / automatic clipping in two backward passes (norms, then the backward again with each
    sample's gradient weighted where it first has a batch dim): the same clipped sums."""
    run_against_oracle(case(name), two_pass=True, **options)


class _TanhBody(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.fc1(x))
        return self.fc2(h), h


class _WithBatchTerm(nn.Module):
    """A loss term summed over the whole batch, `h.sum()`, next to the per-sample cross-entropy:
    its gradient is shared by all samples until it meets the (weighted) per-sample one."""

    def __init__(self, body: nn.Module, reduction: str) -> None:
        super().__init__()
        self.body, self.reduction = body, reduction

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits, h = self.body(x)
        total = F.cross_entropy(logits, y, reduction="sum") + h.sum()
        return total / x.shape[0] if self.reduction == "mean" else total


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_two_pass_weights_a_batch_wide_loss_term_per_sample(reduction: str) -> None:
    torch.manual_seed(0)
    body = _TanhBody()

    def per_sample_loss(out: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out[0], y, reduction="sum") + out[1].sum()

    batches = {B: (torch.randn(B, 4), torch.randint(0, 3, (B,))) for B in (5, 1, 6)}
    C = choose_C(oracle_grads(body, batches[6], per_sample_loss, 1.0, reduction)[1])
    options = dict(max_grad_norm=C, noise_multiplier=0.0, loss_reduction=reduction, two_pass=True)
    cm = grapefx.compile(_WithBatchTerm(body, reduction), **options)
    for x, y in batches.values():
        body.zero_grad(set_to_none=True)
        cm(x, y).backward()
        ref, _ = oracle_grads(body, (x, y), per_sample_loss, C, reduction)
        assert_grads_match(body, ref)


def test_min_memory_under_activation_checkpointing() -> None:
    """memory_policy="min-memory" plans two passes for a checkpointed model when they peak lower
    (tests/test_schedule.py); the gradients stay exact."""
    run_against_oracle(case("gpt_checkpointed"), reduction="mean", memory_policy="min-memory")


# ----------------------------------------------------------------------------------------------
# norm strategies: ghost norms vs instantiated per-sample gradients
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["ghost", "instantiate"])
@pytest.mark.parametrize(
    "zc",
    _cases(
        [
            "mlp",
            "linear3d",
            "matmul_bmm",
            "embedding_bag",
            "embedding_bags",
            "long_tokens",
            "masked_rows_head",
            "gpt",
            "gpt_tied",
        ],
        marks={"gpt_tied": [pytest.mark.slow]},
    ),
)
def test_strategy(zc: ZooCase, strategy: str) -> None:
    run_against_oracle(zc, reduction="sum", strategy=strategy)


@pytest.mark.parametrize(
    "zc", _cases(["linear3d", "embedding_bag", "long_tokens", "gpt"], marks={"gpt": [pytest.mark.slow]})
)
def test_ghost_equals_instantiate(zc: ZooCase) -> None:
    """The two strategies compute the same clipped sum (to float32 rounding) on the same batch."""
    model = zc.make()
    x, y = zc.batch(5)
    _, norms = oracle_grads(model, (x, y), lambda o, t: zc.loss(o, t, "sum"), 1.0, "sum")
    C = choose_C(norms)
    grads, reported = {}, {}
    for strategy in ("ghost", "instantiate"):
        m = copy.deepcopy(model)
        cm = grapefx.compile(m, max_grad_norm=C, noise_multiplier=0.0, loss_reduction="sum", strategy=strategy)
        zc.loss(cm(x), y, "sum").backward()
        grads[strategy] = {k: p.grad.clone() for k, p in m.named_parameters() if p.requires_grad}
        reported[strategy] = cm.per_sample_norms().clone()
    torch.testing.assert_close(reported["ghost"], reported["instantiate"], rtol=NORM_RTOL, atol=1e-6)
    for k, g in grads["ghost"].items():
        torch.testing.assert_close(g, grads["instantiate"][k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


# ----------------------------------------------------------------------------------------------
# Inductor codegen (slow compiles: few models)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "zc",
    _cases(
        ["mlp", "embedding_bag", "gpt", "convnext", "last_token_pool", "embedding_bags", "lookup_tables"]
        + ["conv_transpose", "bilinear", "gpt_checkpointed"]
        + ["chunk_scan", "in_place_shared_query", "shared_position_tables", "flat_rows_group_norm"]
        + ["routed_row_experts", "masked_rows_head", "gathered_experts"],
        marks={
            n: [pytest.mark.slow]
            for n in ("gpt", "embedding_bag", "convnext", "last_token_pool", "embedding_bags", "lookup_tables")
            + ("conv_transpose", "bilinear", "gpt_checkpointed")
            + ("chunk_scan", "in_place_shared_query", "shared_position_tables", "flat_rows_group_norm")
            + ("routed_row_experts", "masked_rows_head", "gathered_experts")
        },
    ),
)
def test_inductor_codegen(zc: ZooCase) -> None:
    run_against_oracle(zc, reduction="mean", codegen="inductor", sizes=(3, 6))


@pytest.mark.slow
def test_inductor_codegen_loss_inside_b1() -> None:
    run_against_oracle(case("linear3d"), reduction="sum", codegen="inductor", loss_inside=True, sizes=(4, 1))


# ----------------------------------------------------------------------------------------------
# denominators, accumulation, graph switching
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zc", _cases(["mlp", "gpt"], marks={"gpt": [pytest.mark.slow]}))
def test_mean_with_expected_batch_size(zc: ZooCase) -> None:
    """denom = expected_batch_size (Poisson sampling), not the realised batch size."""
    run_against_oracle(zc, reduction="mean", expected_batch_size=8, sizes=(3, 6))


@pytest.mark.parametrize("zc", _cases(["mlp", "embedding_bag", "conv2d"]))
def test_gradient_accumulation_over_calls(zc: ZooCase) -> None:
    """Two backward passes without zero_grad add up, like ordinary autograd (virtual batches)."""
    model = zc.make()
    b1, b2 = zc.batch(4, seed=1), zc.batch(5, seed=2)

    def psl(o, t):
        return zc.loss(o, t, "sum")

    _, n1 = oracle_grads(model, b1, psl, 1.0, "sum")
    C = choose_C(n1)
    cm = grapefx.compile(model, max_grad_norm=C, noise_multiplier=0.0, loss_reduction="sum")
    for x, y in (b1, b2):
        zc.loss(cm(x), y, "sum").backward()
    r1, _ = oracle_grads(model, b1, psl, C, "sum")
    r2, _ = oracle_grads(model, b2, psl, C, "sum")
    assert_grads_match(model, {k: r1[k] + r2[k] for k in r1}, rtol=RTOL)


def test_two_models_of_one_class_keep_their_own_config() -> None:
    """Two compiled instances of the same class (shared forward code) with different C / reduction."""
    zc = case("mlp")
    x, y = zc.batch(6)
    m1, m2 = zc.make(seed=0), zc.make(seed=1)
    _, n1 = oracle_grads(m1, (x, y), lambda o, t: zc.loss(o, t, "sum"), 1.0, "sum")
    _, n2 = oracle_grads(m2, (x, y), lambda o, t: zc.loss(o, t, "mean"), 1.0, "mean")
    C1, C2 = choose_C(n1), choose_C(n2) * 0.5
    cm1 = grapefx.compile(m1, max_grad_norm=C1, noise_multiplier=0.0, loss_reduction="sum")
    cm2 = grapefx.compile(m2, max_grad_norm=C2, noise_multiplier=0.0, loss_reduction="mean")
    for _ in range(2):
        for m in (m1, m2):
            m.zero_grad(set_to_none=True)
        zc.loss(cm1(x), y, "sum").backward()
        zc.loss(cm2(x), y, "mean").backward()
        assert_grads_match(m1, oracle_grads(m1, (x, y), lambda o, t: zc.loss(o, t, "sum"), C1, "sum")[0], RTOL)
        assert_grads_match(m2, oracle_grads(m2, (x, y), lambda o, t: zc.loss(o, t, "mean"), C2, "mean")[0], RTOL)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("zc", _cases(["mlp", "conv2d"]))
def test_per_layer_norms_reported(zc: ZooCase, clipping: str) -> None:
    """per_layer_norms() ([B, P], in parameter_names() order) are the per-parameter gradient norms."""
    model = zc.make()
    x, y = zc.batch(5)
    cm = grapefx.compile(model, max_grad_norm=0.3, noise_multiplier=0.0, loss_reduction="mean", clipping=clipping)
    zc.loss(cm(x), y, "mean").backward()
    ref = per_param_norms(model, x, y, zc, "mean")
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    got = cm.per_layer_norms()
    assert got is not None, f"per_layer_norms() is None after a backward with clipping={clipping!r}"
    assert sorted(cm.parameter_names()) == sorted(names)
    assert got.shape == (5, len(names))
    order = [names.index(n) for n in cm.parameter_names()]
    torch.testing.assert_close(got.double(), ref[:, order], rtol=NORM_RTOL, atol=1e-6)
    torch.testing.assert_close(cm.per_sample_norms().double(), ref.norm(dim=1), rtol=NORM_RTOL, atol=1e-6)


@pytest.mark.parametrize("name", ["gpt", "convnext"])
def test_float64_model_is_clipped_to_float64_precision(name: str) -> None:
    """A float64 model's per-sample norms accumulate in float64 (they were float32: ~1e-7), so its
    clipped gradient matches the float64 oracle far below float32 rounding."""
    zc = case(name)
    model = zc.make().double()
    x, y = zc.batch(4)
    x = x.double() if x.is_floating_point() else x

    def psl(out, yy):
        return zc.loss(out, yy, "mean")

    _, norms = oracle_grads(model, (x, y), psl, 1.0, "mean")
    C = choose_C(norms)
    ref, _ = oracle_grads(model, (x, y), psl, C, "mean")
    cm = grapefx.compile(model, max_grad_norm=C, noise_multiplier=0.0, loss_reduction="mean")
    zc.loss(cm(x), y, "mean").backward()
    for n, p in model.named_parameters():  # relative, without assert_grads_match's 1e-7 absolute slack
        assert (p.grad - ref[n]).norm() <= 1e-9 * ref[n].norm(), n
