"""Benchmark models (random weights, no downloads): the four BENCHMARKS.md uses (M1-M4) and more.

M1  MLP 784-512-512-10, B=256
M2  CNN: 3 conv (+GroupNorm) + linear on 32x32x3, B=64 (2x2 max pooling; stride-2 variant)
M3  GPT-style decoder (vocab 8192, d 256, 4 layers, 4 heads, untied head, learned positional
    embedding (nn.Embedding(arange(T)); nn.Parameter-slice variant), pre-LN, causal SDPA attention,
    GELU MLP 4x), T=128, B=16
M4  the same decoder, T=512, B=4
H   parameter-heavy decoder (vocab 8192, d 512, 6 layers, 8 heads), T=64, B=4, trained with Adam
ViT ViT-tiny-like encoder (4x4 patches of 32x32x3, d 192, 3 heads, 6 layers), B=32
GPT-S  a small decoder (vocab 512, d 64, 2 layers, T=32, B=8) for `--quick` smoke runs
L   Llama-style decoder at M3's size (vocab 8192, d 256, 4 layers, 4 heads, T=128, B=16): RMSNorm,
    rotary positions, separate q / k / v / o projections, SwiGLU MLP (gate, up, down; 688 wide)
MoE transformers' Mixtral from a config (vocab 8192, d 128, 4 layers, 4 heads, 8 experts of width 256,
    top-2), T=64, B=8, with transformers' default experts implementation (grapefx switches it to
    "grapefx_masked_rows" while it runs); MoE-bmm / MoE-masked the same with transformers' "batched_mm"
    / grapefx's "grapefx_masked_rows" experts in the non-private runs too

Every case is `make_case(name, batch=None, seq=None) -> Case(model, x, y, loss_fn)`; the loss is cross entropy with mean
reduction (token-level for the decoders: mean over all B*T tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor


class MLP(nn.Module):
    def __init__(self, d_in: int = 784, hidden: int = 512, n_out: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class CNN(nn.Module):
    """3 conv layers with GroupNorm (batch-independent, DP-compatible) and a linear head.

    pool="max" (default): stride-1 convs each followed by 2x2 max pooling, head on the 4x4 map;
    pool="stride": downsample with stride-2 convs (c2, c3), head on the 8x8 map.
    The convolutions have the same output sizes and FLOPs in both variants.
    """

    def __init__(self, c_in: int = 3, n_out: int = 10, pool: str = "max") -> None:
        super().__init__()
        if pool not in ("stride", "max"):
            raise ValueError(f"pool must be 'stride' or 'max', got {pool!r}")
        self.pool = pool
        s = 2 if pool == "stride" else 1
        self.c1 = nn.Conv2d(c_in, 32, kernel_size=3, padding=1)
        self.g1 = nn.GroupNorm(8, 32)
        self.c2 = nn.Conv2d(32, 64, kernel_size=3, padding=1, stride=s)
        self.g2 = nn.GroupNorm(8, 64)
        self.c3 = nn.Conv2d(64, 64, kernel_size=3, padding=1, stride=s)
        self.g3 = nn.GroupNorm(8, 64)
        self.fc = nn.Linear(64 * 8 * 8 if pool == "stride" else 64 * 4 * 4, n_out)

    def forward(self, x: Tensor) -> Tensor:  # [B, 3, 32, 32]
        if self.pool == "stride":
            h = F.relu(self.g1(self.c1(x)))  # 32x32
            h = F.relu(self.g2(self.c2(h)))  # 16x16
            h = F.relu(self.g3(self.c3(h)))  # 8x8
        else:
            h = F.max_pool2d(F.relu(self.g1(self.c1(x))), 2)  # 16x16
            h = F.max_pool2d(F.relu(self.g2(self.c2(h))), 2)  # 8x8
            h = F.max_pool2d(F.relu(self.g3(self.c3(h))), 2)  # 4x4
        return self.fc(h.flatten(1))


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention through SDPA; causal unless `causal=False` (the ViT's encoder)."""

    def __init__(self, d: int, heads: int, causal: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        hd = D // self.heads
        q = q.view(B, T, self.heads, hd).transpose(1, 2)
        k = k.view(B, T, self.heads, hd).transpose(1, 2)
        v = v.view(B, T, self.heads, hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, causal: bool = True) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads, causal)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc_out = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """nanoGPT-style decoder: token embedding + learned positional embedding, pre-LN blocks, final LN,
    untied head.

    pos="embedding" (default): nn.Embedding(max_t, d) looked up with arange(T) (nanoGPT style);
    pos="param": the positional table is an nn.Parameter [1, max_t, d] sliced to T (as tests/zoo.py's
    TinyGPT).
    Same parameter count and math either way. `batched_pos_ids=True` looks the positions up with
    [B, T] ids (arange(T) expanded, made contiguous) instead of [T]: Opacus' per-sample hooks and ghost
    norms assume every layer input has the batch dim first.
    """

    def __init__(
        self,
        vocab: int = 8192,
        d: int = 256,
        n_layer: int = 4,
        heads: int = 4,
        max_t: int = 512,
        pos: str = "embedding",
        checkpointed: bool = False,
    ) -> None:
        super().__init__()
        self.checkpointed = checkpointed  # every block under activation checkpointing (case M3C)
        if pos not in ("param", "embedding"):
            raise ValueError(f"pos must be 'param' or 'embedding', got {pos!r}")
        self.pos_style = pos
        self.batched_pos_ids = False
        self.tok = nn.Embedding(vocab, d)
        if pos == "embedding":
            self.pos = nn.Embedding(max_t, d)
        else:
            self.pos = nn.Parameter(torch.zeros(1, max_t, d))
            nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        for name, p in self.named_parameters():  # GPT-2 style init
            if name.endswith("weight") and p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            if name.endswith("fc_out.weight") or name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, ids: Tensor) -> Tensor:  # [B, T] -> [B, T, V]
        B, T = ids.shape
        if self.pos_style == "embedding":
            pos_ids = torch.arange(T, device=ids.device)
            if self.batched_pos_ids:
                pos_ids = pos_ids.expand(B, T).contiguous()
            h = self.tok(ids) + self.pos(pos_ids)
        else:
            h = self.tok(ids) + self.pos[:, :T]
        for blk in self.blocks:
            h = torch.utils.checkpoint.checkpoint(blk, h, use_reentrant=False) if self.checkpointed else blk(h)
        return self.head(self.ln_f(h))


class LlamaBlock(nn.Module):
    """Pre-RMSNorm block: attention with separate q, k, v, o projections (no bias) and rotary
    positions, then a SwiGLU MLP. q, k and v read the same normalized hidden state, as gate and up
    do: ghost norms share those inputs' Gram products (grapefx/passes/common_subexpressions.py)."""

    def __init__(self, d: int, heads: int, d_ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(d, d_ff, bias=False), nn.Linear(d, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, D = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(B, T, D))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding (the rotate-half form) of [B, heads, T, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Llama(nn.Module):
    def __init__(
        self, vocab: int = 8192, d: int = 256, n_layer: int = 4, heads: int = 4, d_ff: int = 688, max_t: int = 512
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(LlamaBlock(d, heads, d_ff) for _ in range(n_layer))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        hd = d // heads
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(max_t).float(), inv)
        self.register_buffer("cos", torch.cat([ang, ang], dim=-1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat([ang, ang], dim=-1).sin(), persistent=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:  # [B, T] -> [B, T, V]
        T = ids.shape[1]
        cos, sin = self.cos[:T], self.sin[:T]
        h = self.tok(ids)
        for blk in self.blocks:
            h = blk(h, cos, sin)
        return self.head(self.norm(h))


class ViT(nn.Module):
    """ViT-tiny-like encoder: 4x4 patch conv on 32x32x3 (64 patches) + cls token + learned positions,
    pre-LN blocks (the decoder's Block, non-causal), final LN, linear head on the cls token."""

    def __init__(
        self, img: int = 32, patch: int = 4, d: int = 192, heads: int = 3, n_layer: int = 6, n_out: int = 10
    ) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, kernel_size=patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads, causal=False) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_out)

    def forward(self, x: Tensor) -> Tensor:  # [B, 3, H, W] -> [B, n_out]
        h = self.patch(x).flatten(2).transpose(1, 2)  # [B, N, d]
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1) + self.pos
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln_f(h)[:, 0])


def class_loss(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y, reduction="mean")


def token_loss(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="mean")


@dataclass
class Case:
    name: str
    desc: str
    model: nn.Module
    x: Tensor
    y: Tensor
    loss_fn: Callable[[Tensor, Tensor], Tensor]

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


# name -> (description, default batch B, default sequence length T or None, builder(g, B, T, **variants))
def _m1(g: torch.Generator, B: int, T: int | None):
    return MLP(), torch.randn(B, 784, generator=g), torch.randint(0, 10, (B,), generator=g), class_loss


def _m2(g: torch.Generator, B: int, T: int | None, pool: str = "max"):
    return CNN(pool=pool), torch.randn(B, 3, 32, 32, generator=g), torch.randint(0, 10, (B,), generator=g), class_loss


def _vit(g: torch.Generator, B: int, T: int | None):
    return ViT(), torch.randn(B, 3, 32, 32, generator=g), torch.randint(0, 10, (B,), generator=g), class_loss


def _gpt(vocab: int = 8192, d: int = 256, n_layer: int = 4, heads: int = 4, max_t: int = 512, checkpointed=False):
    def build(g: torch.Generator, B: int, T: int, pos: str = "embedding"):
        model = GPT(vocab=vocab, d=d, n_layer=n_layer, heads=heads, max_t=max(max_t, T), pos=pos)
        model.checkpointed = checkpointed
        ids = torch.randint(0, vocab, (B, T + 1), generator=g)
        return model, ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), token_loss

    return build


def _llama(g: torch.Generator, B: int, T: int):
    model = Llama(max_t=max(512, T))
    ids = torch.randint(0, 8192, (B, T + 1), generator=g)
    return model, ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), token_loss


class HFLogits(nn.Module):
    """A transformers causal LM returning its logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, ids: Tensor) -> Tensor:
        return self.m(input_ids=ids).logits


def _mixtral(experts: str | None = None):
    def build(g: torch.Generator, B: int, T: int):
        import transformers as tf

        cfg = tf.MixtralConfig(
            vocab_size=8192,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_local_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=max(512, T),
            router_jitter_noise=0.0,
            attention_dropout=0.0,
            use_cache=False,
        )
        if experts == "grapefx_masked_rows":
            from grapefx.moe_experts import register

            register()
        if experts is not None:
            cfg._experts_implementation = experts
        model = HFLogits(tf.MixtralForCausalLM(cfg).train())
        ids = torch.randint(0, 8192, (B, T + 1), generator=g)
        return model, ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), token_loss

    return build


def _hf_llama(n_layer: int):
    def build(g: torch.Generator, B: int, T: int):
        import transformers as tf

        cfg = tf.LlamaConfig(
            vocab_size=2048,
            hidden_size=128,
            intermediate_size=344,
            num_hidden_layers=n_layer,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max(512, T),
            attention_dropout=0.0,
            use_cache=False,
        )
        model = HFLogits(tf.LlamaForCausalLM(cfg).train())
        ids = torch.randint(0, 2048, (B, T + 1), generator=g)
        return model, ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), token_loss

    return build


GPT_CASES = ("M3", "M3C", "DC", "M4", "H", "GPT-S")

CASES: dict[str, tuple[str, int, int | None, Callable]] = {
    "M1": ("MLP 784-512-512-10", 256, None, _m1),
    "M2": ("CNN 3 conv + GroupNorm + linear, 32x32x3", 64, None, _m2),
    "M3": ("GPT decoder V=8192 d=256 L=4 H=4", 16, 128, _gpt()),
    "M4": ("GPT decoder V=8192 d=256 L=4 H=4", 4, 512, _gpt()),
    # M3 with every block under activation checkpointing (torch.utils.checkpoint, non-reentrant); DC:
    # deeper, smaller vocabulary, where the blocks' activations (not the logits) fill the memory
    "M3C": ("GPT decoder V=8192 d=256 L=4 H=4, checkpointed blocks", 16, 128, _gpt(checkpointed=True)),
    "DC": (
        "GPT decoder V=2048 d=256 L=8 H=4, checkpointed blocks",
        16,
        128,
        _gpt(vocab=2048, n_layer=8, checkpointed=True),
    ),
    # parameter-heavy: 27M parameters, few tokens per step, so optimizer state dominates memory
    "H": ("GPT decoder V=8192 d=512 L=6 H=8 (parameter-heavy, Adam)", 4, 64, _gpt(d=512, n_layer=6, heads=8, max_t=64)),
    "ViT": ("ViT-tiny-like: 4x4 patches of 32x32x3, d=192, 3 heads, 6 layers", 32, None, _vit),
    "GPT-S": ("small GPT decoder V=512 d=64 L=2 H=2", 8, 32, _gpt(vocab=512, d=64, n_layer=2, heads=2, max_t=32)),
    "L": ("Llama-style decoder V=8192 d=256 L=4 H=4 (RMSNorm, rotary, q/k/v/o, SwiGLU 688)", 16, 128, _llama),
    # depth: what compiling costs grows with the number of layers (tools/compile_time.py)
    "HFL4": ("transformers Llama V=2048 d=128 L=4 H=4 KV=2", 4, 64, _hf_llama(4)),
    "HFL16": ("transformers Llama V=2048 d=128 L=16 H=4 KV=2", 4, 64, _hf_llama(16)),
    "HFL32": ("transformers Llama V=2048 d=128 L=32 H=4 KV=2", 4, 64, _hf_llama(32)),
    "MoE": ("transformers Mixtral V=8192 d=128 L=4 H=4, 8 experts F=256 top-2", 8, 64, _mixtral()),
    "MoE-bmm": ("MoE with batched_mm experts in every run", 8, 64, _mixtral("batched_mm")),
    "MoE-masked": ("MoE with grapefx's masked-row experts in every run", 8, 64, _mixtral("grapefx_masked_rows")),
}
ADAM_CASES = ("H",)  # trained with Adam (GRAPE configs: GrapeAdamW); the others with SGD


def make_case(
    name: str,
    seed: int = 0,
    gpt_pos: str = "embedding",
    cnn_pool: str = "max",
    batch: int | None = None,
    seq: int | None = None,
) -> Case:
    """Build a case; `gpt_pos` picks the decoders' positional-embedding style (see GPT), `cnn_pool`
    the CNN's downsampling (see CNN); `batch` / `seq` override B and T (the scaling sweeps)."""
    desc, B, T, build = CASES[name]
    B = batch or B
    T = seq or T
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    variants = {"pos": gpt_pos} if name in GPT_CASES else {"pool": cnn_pool} if name == "M2" else {}
    model, x, y, loss_fn = build(g, B, T, **variants)
    desc += f", B={B}" + (f", T={T}" if T else "")
    return Case(name, desc, model, x, y, loss_fn)
