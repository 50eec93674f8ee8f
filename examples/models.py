"""Tiny model factories for the `grapefx` command line (random weights, no downloads).

A factory is named on the command line as `examples/models.py:NAME` and returns either

* a module: the CLI makes random inputs from `--input dtype[shape]` (one flag per forward
  argument, batch in dim 0) and picks a loss from the output's shape (see `grapefx --help`), or
* a triple `(module, example_inputs, loss_fn)`: `example_inputs` is a tuple of tensors passed to
  `module(*example_inputs)` and `loss_fn(output) -> scalar tensor` (targets live in the closure).
  `--input` is then ignored.

    grapefx inspect   examples/models.py:mlp --input "float32[8,784]"
    grapefx transform examples/models.py:mlp --input "float32[8,784]" --out dump/ --format code,table,svg,onnx
    grapefx inspect   examples/models.py:gpt_small --input "int64[8,128]" --json
    grapefx inspect   examples/models.py:regression          # a triple: no --input needed
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor


# -- an MLP ------------------------------------------------------------------------------------
def mlp(d_in: int = 784, hidden: int = 128, n_out: int = 10) -> nn.Module:
    """784-128-10 ReLU MLP (MNIST-sized): `--input "float32[B,784]"`, class logits [B, 10]."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


def tiny_mlp() -> nn.Module:
    """16-8-4 MLP for fast tests: `--input "float32[B,16]"`."""
    return mlp(16, 8, 4)


def regression() -> tuple[nn.Module, tuple[Tensor, ...], object]:
    """The triple form: an MLP regressor with its own batch (B=6) and MSE loss against fixed targets."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 1))
    x, y = torch.randn(6, 12), torch.randn(6, 1)

    def loss_fn(out: Tensor) -> Tensor:
        return F.mse_loss(out, y)

    return model, (x,), loss_fn


# -- a CNN -------------------------------------------------------------------------------------
class TinyCNN(nn.Module):
    """Two convs with GroupNorm (BatchNorm would mix samples) and a linear head on 3x16x16 images."""

    def __init__(self, c_in: int = 3, n_out: int = 10) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c_in, 8, kernel_size=3, padding=1)
        self.g1 = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 16, kernel_size=3, padding=1, stride=2)
        self.fc = nn.Linear(16, n_out)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.g1(self.c1(x)))
        h = F.relu(self.c2(h))
        return self.fc(h.mean(dim=(-2, -1)))


def cnn() -> nn.Module:
    """`--input "float32[B,3,16,16]"`, class logits [B, 10]."""
    torch.manual_seed(0)
    return TinyCNN()


# -- a GPT-style decoder -----------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        hd = D // self.heads
        q = q.view(B, T, self.heads, hd).transpose(1, 2)
        k = k.view(B, T, self.heads, hd).transpose(1, 2)
        v = v.view(B, T, self.heads, hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc_out = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """nanoGPT-style decoder: token + learned positional embedding, pre-LN blocks, untied head."""

    def __init__(self, vocab: int = 512, d: int = 64, n_layer: int = 2, heads: int = 2, max_t: int = 128) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, max_t, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        for name, p in self.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            if name.endswith("fc_out.weight") or name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, ids: Tensor) -> Tensor:  # [B, T] -> [B, T, V]
        h = self.tok(ids) + self.pos[:, : ids.shape[1]]
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln_f(h))


def gpt_small() -> nn.Module:
    """Vocab 512, d 64, 2 layers, 2 heads, T <= 128: `--input "int64[B,T]"`, logits [B, T, 512]."""
    torch.manual_seed(0)
    return GPT()


def gpt_tiny() -> nn.Module:
    """Vocab 32, d 16, 1 layer, 2 heads, T <= 16, for fast tests: `--input "int64[B,T]"`."""
    torch.manual_seed(0)
    return GPT(vocab=32, d=16, n_layer=1, heads=2, max_t=16)
