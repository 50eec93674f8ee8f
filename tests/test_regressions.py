"""Models that once broke grapefx (found by the benchmarks), checked against the torch.func oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from oracle import assert_grads_match, oracle_grads

import grapefx


class PooledConv(nn.Module):
    def __init__(self, pool: str) -> None:
        super().__init__()
        self.pool = pool
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c(x))
        h = F.max_pool2d(h, 2) if self.pool == "max" else F.avg_pool2d(h, 2)
        return self.fc(h.flatten(1))


class EmbeddingPositions(nn.Module):
    """nanoGPT-style positions: nn.Embedding looked up with arange(T) (no batch dim)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(16, 8)
        self.pos = nn.Embedding(4, 8)
        self.head = nn.Linear(8, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device)))


def _class_loss(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(o, t, reduction="sum")


def _token_loss(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(o.reshape(-1, o.shape[-1]), t.reshape(-1), reduction="sum")


@pytest.mark.parametrize(
    "pool,codegen",
    # max pooling under Inductor is the regression (its backward runs on the eager codegen)
    [("max", "eager"), ("avg", "eager"), ("max", "inductor"), pytest.param("avg", "inductor", marks=pytest.mark.slow)],
)
def test_conv_with_pooling(pool: str, codegen: str) -> None:
    torch.manual_seed(0)
    model = PooledConv(pool)
    cm = grapefx.compile(model, max_grad_norm=0.1, noise_multiplier=0.0, loss_reduction="sum", codegen=codegen)
    for B in (4, 1):
        x, y = torch.randn(B, 3, 8, 8), torch.randint(0, 4, (B,))
        model.zero_grad(set_to_none=True)
        _class_loss(cm(x), y).backward()
        ref, _ = oracle_grads(model, (x, y), _class_loss, 0.1, "sum")
        assert_grads_match(model, ref)


def test_positions_from_an_embedding_of_arange() -> None:
    torch.manual_seed(0)
    model = EmbeddingPositions()
    cm = grapefx.compile(model, max_grad_norm=0.5, noise_multiplier=0.0, loss_reduction="sum")
    for B in (3, 5, 1):
        x, y = torch.randint(0, 16, (B, 4)), torch.randint(0, 16, (B, 4))
        model.zero_grad(set_to_none=True)
        _token_loss(cm(x), y).backward()
        ref, _ = oracle_grads(model, (x, y), _token_loss, 0.5, "sum")
        assert_grads_match(model, ref)


def test_a_parameter_named_b_does_not_clash_with_internal_state() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.U = nn.Parameter(torch.randn(8, 4))
            self.b = nn.Parameter(torch.zeros(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.einsum("btd,do->bo", x, self.U) + self.b

    torch.manual_seed(0)
    model = M()
    cm = grapefx.compile(model, max_grad_norm=0.5, noise_multiplier=0.0, loss_reduction="sum")
    x, y = torch.randn(3, 5, 8), torch.randint(0, 4, (3,))
    _class_loss(cm(x), y).backward()
    ref, _ = oracle_grads(model, (x, y), _class_loss, 0.5, "sum")
    assert_grads_match(model, ref)


@pytest.mark.parametrize("codegen", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_empty_batch_is_a_step_under_both_codegens(codegen: str) -> None:
    """B=0's norm record has no user; it must survive dead-code elimination (fx's and Inductor's),
    or per_sample_norms() keeps the previous batch's norms and the step goes uncounted."""
    cm = grapefx.compile(nn.Linear(4, 3), max_grad_norm=1.0, noise_multiplier=0.0, codegen=codegen)
    for B in (3, 0):
        cm(torch.randn(B, 4)).sum().backward()
    assert cm.per_sample_norms().shape == (0,)
    assert cm.privacy_state.backward_calls == 2


def test_inductor_cache_key_carries_grapefx_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    """grapefx's Inductor compiles salt the FX-graph cache key with a hash of grapefx's sources (code
    compiled by another grapefx version is not reused) without turning the cache off."""
    from torch._dynamo.utils import counters

    from grapefx import inductor_cache

    seen = []
    original = inductor_cache.GrapefxCacheSalt.uuid
    monkeypatch.setattr(inductor_cache.GrapefxCacheSalt, "uuid", lambda self: seen.append(1) or original(self))
    bypass = counters["inductor"]["fxgraph_cache_bypass"]
    cm = grapefx.compile(nn.Linear(4, 3), max_grad_norm=1.0, noise_multiplier=0.0, codegen="inductor")
    cm(torch.randn(3, 4)).sum().backward()
    assert seen, "the salt was not consulted for the cache key"
    assert counters["inductor"]["fxgraph_cache_bypass"] == bypass
    assert inductor_cache.GrapefxCacheSalt().uuid() == inductor_cache.grapefx_source_hash()
    assert inductor_cache.GrapefxCacheSalt(user_pass=lambda g: None).uuid() is None  # no uuid: no cache


PROMPT = torch.tensor([[3, 1, 4, 1, 5]])  # a module-level constant, read by the graph as an input


class ConstantPrompt(nn.Module):
    """Constant token ids (a global and a plain tensor attribute, [1, T]) expanded over the batch, as
    a seq2seq wrapper passing fixed decoder_input_ids does (Speech2Text in session 11's sweep): the
    graph's first non-parameter input is then the constant, not the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(8, 6)
        self.proj = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)
        self.extra = torch.tensor([[2, 7]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = torch.cat([PROMPT, self.extra], 1).expand(x.shape[0], -1)
        h = self.emb(ids) + self.proj(x)[:, None, :]
        return self.head(torch.tanh(h).mean(1))


def test_constant_tensors_before_the_batch_are_not_the_batch() -> None:
    """The batch size comes from forward's arguments: taken from the [1, T] constant it was 1, and
    grapefx clipped the whole batch as one sample (no error; found by the session-11 sweep)."""
    torch.manual_seed(0)
    model = ConstantPrompt()
    cm = grapefx.compile(model, max_grad_norm=0.05, noise_multiplier=0.0, loss_reduction="sum")
    for B in (3, 1, 5):
        x, y = torch.randn(B, 4) * 3, torch.randint(0, 3, (B,))
        model.zero_grad(set_to_none=True)
        _class_loss(cm(x), y).backward()
        ref, norms = oracle_grads(model, (x, y), _class_loss, 0.05, "sum")
        assert (norms > 0.05).all() and cm.per_sample_norms().shape == (B,)
        assert_grads_match(model, ref)


def _hook_counts(model: nn.Module) -> dict[str, int]:
    return {name: len(m._forward_hooks) for name, m in model.named_modules()}


@pytest.mark.slow  # ~12 s (DPT)
def test_a_model_run_eagerly_before_compiling_keeps_its_hidden_states() -> None:
    """Found by the session-16 sweep (DPT). An eager forward installs transformers' output-capturing
    hooks lazily, on the inner DPTModel only; grapefx.compile then installed them on the outer model
    as well, which hooked every layer twice: hidden_states held each layer twice, DPT's neck read
    layer 0 where it wanted layer 1, and layer 1's parameters got no gradient at all. Now the
    earlier hooks are replaced, so the model computes the same function and every layer trains."""
    tf = pytest.importorskip("transformers")
    cfg = tf.DPTConfig(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, backbone_out_indices=[0, 1], neck_hidden_sizes=[8, 16], reassemble_factors=[2, 1],
        fusion_hidden_size=8, head_in_index=-1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = tf.DPTForDepthEstimation(cfg).train()
    x = torch.randn(3, 3, 16, 16)
    eager = model(pixel_values=x).predicted_depth.detach()  # installs the hooks lazily
    hooks = _hook_counts(model)
    cm = grapefx.compile(model, max_grad_norm=1.0, noise_multiplier=0.0)
    assert _hook_counts(model) == hooks
    assert len(model.dpt(pixel_values=x, output_hidden_states=True).hidden_states) == 3  # embeddings + 2 layers
    out = cm(pixel_values=x).predicted_depth
    torch.testing.assert_close(out, eager)
    out.square().mean().backward()
    layer1 = model.dpt.encoder.layer[1]
    assert all(p.grad is not None for p in layer1.parameters())


class ReassignedBuffer(nn.Module):
    """CTRL's habit: a non-persistent buffer reassigned in forward, `self.table = self.table.to(...)`
    (a no-op here, returning the registered tensor). Its nn.Buffer markers made Module.__setattr__
    branch on `value.persistent`, which Dynamo cannot trace: a graph break, until grapefx dropped them."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(16, 8)
        self.table = nn.Buffer(torch.randn(6, 8), persistent=False)
        self.scale = nn.Buffer(torch.full((8,), 0.5))
        self.head = nn.Linear(8, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.table = self.table.to(dtype=self.tok.weight.dtype)
        return self.head(torch.tanh(self.tok(ids) * self.scale + self.table[: ids.shape[1]]))


@pytest.mark.parametrize("path", ["compile", "prepare"])
def test_a_buffer_reassigned_in_forward(path: str) -> None:
    torch.manual_seed(0)
    model = ReassignedBuffer()
    keys = list(model.state_dict())
    if path == "compile":
        cm = grapefx.compile(model, max_grad_norm=0.5, noise_multiplier=0.0, loss_reduction="sum")
    else:
        backend = grapefx.backend(max_grad_norm=0.5, noise_multiplier=0.0, loss_reduction="sum")
        cm = torch.compile(grapefx.prepare(model), backend=backend, fullgraph=True)
    assert list(model.state_dict()) == keys == ["scale", "tok.weight", "head.weight", "head.bias"]
    for B in (3, 5):
        x, y = torch.randint(0, 16, (B, 4)), torch.randint(0, 16, (B, 4))
        model.zero_grad(set_to_none=True)
        _token_loss(cm(x), y).backward()
        ref, _ = oracle_grads(model, (x, y), _token_loss, 0.5, "sum")
        assert_grads_match(model, ref)
