"""The model zoo: tiny, randomly initialised models, one per family the backend must handle.

Every entry is a `ZooCase`: a factory that builds the model from a small config, a function that
makes a batch `(x, target)` of any size (including 0 and 1), and the loss. Models take one batch
tensor `x` (batch in dim 0) and return a tensor; losses are written so that, for both reductions,
`loss(out, target, "sum")` is a sum of per-sample terms and `loss(out, target, "mean")` is that sum
divided by the batch size, and the per-sample term is `loss(out_i, target_i, reduction)` on a batch
of one (what `tests/oracle.py` differentiates). No dropout anywhere: the oracle must see the same
function as the compiled model.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tools.models import Block  # the benchmarks' pre-LN decoder block (causal SDPA, GELU MLP)

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------
def class_loss(out: Tensor, y: Tensor, reduction: str) -> Tensor:
    """Classification: out [B, K], y [B]."""
    return F.cross_entropy(out, y, reduction=reduction)


def token_loss(out: Tensor, y: Tensor, reduction: str) -> Tensor:
    """Token-level CE: out [B, T, V], y [B, T]; 'mean' averages over all B*T tokens (= mean of the
    per-sample token means, since every sample has T tokens)."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction=reduction)


def mse_loss(out: Tensor, y: Tensor, reduction: str) -> Tensor:
    return F.mse_loss(out, y, reduction=reduction)


class LossInside(nn.Module):
    """model + loss in one compiled module: forward(x, y) returns the scalar loss."""

    def __init__(self, model: nn.Module, loss: Callable[[Tensor, Tensor, str], Tensor], reduction: str) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.reduction = reduction

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.loss(self.model(x), y, self.reduction)


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Linear with and without bias."""

    def __init__(self, d_in: int = 10, hidden: int = 16, n_out: int = 5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden, bias=False)
        self.fc3 = nn.Linear(hidden, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(torch.tanh(self.fc2(F.relu(self.fc1(x)))))


class TokenMLP(nn.Module):
    """Linear on 3-D inputs [B, T, d] (b-major flatten inside F.linear)."""

    def __init__(self, d: int = 8, hidden: int = 12, n_out: int = 6) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, n_out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class MatmulParams(nn.Module):
    """Parameters used through torch.matmul (3-D @ 2-D), bmm against a batch-expanded parameter,
    a batch-batch bmm (attention-like), and torch.einsum."""

    def __init__(self, d: int = 8, h: int = 10, n_out: int = 4) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(d, h) / math.sqrt(d))
        self.V = nn.Parameter(torch.randn(h, h) / math.sqrt(h))
        self.U = nn.Parameter(torch.randn(h, n_out) / math.sqrt(h))
        self.b = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        B = x.shape[0]
        h = torch.matmul(x, self.W)  # [B, T, h]
        h = torch.bmm(h, self.V.unsqueeze(0).expand(B, -1, -1))  # parameter expanded over the batch
        att = torch.softmax(torch.bmm(h, h.transpose(1, 2)) / math.sqrt(h.shape[-1]), dim=-1)  # [B, T, T]
        h = torch.tanh(torch.bmm(att, h))
        out = torch.einsum("bth,ho->bo", h, self.U) / h.shape[1]
        return out + self.b


class Conv1dNet(nn.Module):
    def __init__(self, c_in: int = 4, n_out: int = 5) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(c_in, 8, kernel_size=3, stride=2, padding=1)
        self.c2 = nn.Conv1d(8, 8, kernel_size=3, padding=2, dilation=2, groups=2, bias=False)
        self.c3 = nn.Conv1d(8, 8, kernel_size=1, groups=8)  # depthwise
        self.fc = nn.Linear(8, n_out)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.c1(x))
        h = torch.tanh(self.c2(h))
        h = self.c3(h)
        return self.fc(h.mean(dim=-1))


class Conv2dNet(nn.Module):
    def __init__(self, c_in: int = 3, n_out: int = 5) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c_in, 8, kernel_size=3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 8, kernel_size=3, padding=2, dilation=2, groups=4, bias=False)
        self.c3 = nn.Conv2d(8, 6, kernel_size=(2, 3), stride=(1, 2), padding=(0, 1))
        self.fc = nn.Linear(6, n_out)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.c1(x))
        h = torch.tanh(self.c2(h))
        h = self.c3(h)
        return self.fc(h.mean(dim=(-2, -1)))


class Conv3dNet(nn.Module):
    def __init__(self, c_in: int = 2, n_out: int = 4) -> None:
        super().__init__()
        self.c1 = nn.Conv3d(c_in, 4, kernel_size=3, stride=(1, 2, 2), padding=1)
        self.c2 = nn.Conv3d(4, 4, kernel_size=(1, 3, 3), groups=2, padding=(0, 1, 1))
        # a transposed 3-D convolution: dilation, stride, output_padding and groups on different dims
        self.up = nn.ConvTranspose3d(
            4, 4, (2, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), output_padding=(0, 1, 0), groups=2, dilation=(2, 1, 1)
        )
        self.fc = nn.Linear(4, n_out)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.c2(h))
        h = self.up(h)
        return self.fc(h.mean(dim=(-3, -2, -1)))


class ConvTransposeNet(nn.Module):
    """Transposed convolutions (a decoder's upsampling): ConvTranspose2d with stride, padding,
    output_padding and groups, then ConvTranspose1d without bias over the flattened map."""

    def __init__(self, c_in: int = 3, n_out: int = 5) -> None:
        super().__init__()
        self.c = nn.Conv2d(c_in, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.up1d = nn.ConvTranspose1d(6, 3, 2, bias=False, dilation=2)
        self.fc = nn.Linear(3, n_out)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.c(x))
        h = torch.tanh(self.up(h))  # [B, 6, 2H, 2W]
        h = self.up1d(h.flatten(2))  # [B, 3, 4HW + 2]
        return self.fc(h.mean(-1))


class BilinearNet(nn.Module):
    """nn.Bilinear on two different inputs (with bias) and on one input twice (no bias): aten's
    _trilinear, decomposed into mm contractions by grapefx."""

    def __init__(self, d: int = 6, n_out: int = 3) -> None:
        super().__init__()
        self.a = nn.Linear(d, 4)
        self.pair = nn.Bilinear(4, d, 5)
        self.square = nn.Bilinear(5, 5, n_out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        z = torch.tanh(self.pair(torch.tanh(self.a(x)), x))
        return self.square(z, z)


class EmbeddingBag(nn.Module):
    """Embedding with padding_idx, mean pooling, Linear."""

    def __init__(self, vocab: int = 20, d: int = 8, n_out: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.fc = nn.Linear(d, n_out)

    def forward(self, ids: Tensor) -> Tensor:
        return self.fc(self.emb(ids).mean(dim=1))


class LongTokens(nn.Module):
    """70 tokens per sample, so ghost norms take the blocked symmetric Gram path (rules/gram.py) of
    every kind: a Linear on tokens, an embedding with padding_idx, a tied embedding / output head
    (the factored cross-term norm) and positions embedded once for the whole batch (the broadcast
    lookup norm; its padding_idx zeroes one position's gradient)."""

    def __init__(self, vocab: int = 20, d: int = 8, max_t: int = 80) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d, padding_idx=0)  # tied to the output
        self.tag = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(max_t, d, padding_idx=3)
        self.mix = nn.Linear(d, d)

    def forward(self, ids: Tensor) -> Tensor:
        positions = self.pos(torch.arange(ids.shape[1], device=ids.device))
        h = torch.tanh(self.mix(self.tok(ids) + self.tag(ids) + positions))
        return h @ self.tok.weight.T


class LayerNormNet(nn.Module):
    def __init__(self, d: int = 8, h: int = 12, n_out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.ln = nn.LayerNorm(h)
        self.fc2 = nn.Linear(h, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.ln(self.fc1(x))))  # x: [B, T, d] -> [B, T, n_out]


class GroupNormNet(nn.Module):
    def __init__(self, c_in: int = 3, n_out: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, 8, kernel_size=3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.relu(self.gn(self.conv(x))).mean(dim=(-2, -1)))


class NormLayoutsNet(nn.Module):
    """Fused norm backwards on every layout their rule must handle: LayerNorm on a t-major [T, B, d]
    tensor, on flattened tokens [B*T, d] (no bias), over two dims [T, d]; GroupNorm on [B, C, L];
    LayerNorm on a parameter expanded over the batch (PEGASUS-X's global tokens: the same x̂ for
    every sample, per-sample output gradients)."""

    def __init__(self, T: int = 4, d: int = 8, n_out: int = 4) -> None:
        super().__init__()
        self.global_tokens = nn.Parameter(torch.randn(2, d))
        self.ln_global = nn.LayerNorm(d)
        self.ln_tmajor = nn.LayerNorm(d)
        self.ln_flat = nn.LayerNorm(d, bias=False)
        self.ln_2d = nn.LayerNorm([T, d])
        self.conv = nn.Conv1d(d, 6, kernel_size=1)
        self.gn = nn.GroupNorm(3, 6)
        self.fc = nn.Linear(6, n_out)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, T, d] -> [B, T, n_out]
        glob = self.ln_global(self.global_tokens.expand(x.shape[0], -1, -1))
        x = x + glob.mean(1, keepdim=True)
        h = self.ln_tmajor(x.transpose(0, 1)).transpose(0, 1)
        h = self.ln_flat(h.reshape(-1, h.shape[-1])).view(x.shape)
        h = self.ln_2d(F.gelu(h) * 1.5)
        h = F.relu(self.gn(self.conv(h.transpose(1, 2))))
        return self.fc(h.transpose(1, 2))


class RMSNormNet(nn.Module):
    def __init__(self, d: int = 8, h: int = 12, n_out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, h, bias=False)
        self.norm = nn.RMSNorm(h, eps=1e-6)
        self.fc2 = nn.Linear(h, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.silu(self.norm(self.fc1(x))))  # x: [B, T, d] -> [B, T, n_out]


class WeightNormNet(nn.Module):
    """weight_norm (torch.nn.utils.parametrizations) on a Linear (dim 0) and on a Conv1d over the
    kernel dim (dim 2, as Wav2Vec2's positional conv has it), and a learned [T, T] bias masked by a
    batch-free causal `where` (T5's decoder masks its position bias so): the parameters' gradients
    leave the batch contraction through _weight_norm_interface_backward and `where`."""

    def __init__(self, c: int = 4, t: int = 6, n_out: int = 4) -> None:
        super().__init__()
        wn = nn.utils.parametrizations.weight_norm
        self.conv = wn(nn.Conv1d(c, c, kernel_size=3, padding=1), dim=2)
        self.fc = wn(nn.Linear(c * t, 8))
        self.rel = nn.Parameter(torch.randn(t, t) * 0.5)
        self.register_buffer("causal", torch.ones(t, t, dtype=torch.bool).tril(), persistent=False)
        self.head = nn.Linear(8, n_out)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, c, t]
        h = torch.tanh(self.conv(x))
        h = h + h @ torch.where(self.causal, self.rel, 0.0)
        return self.head(torch.tanh(self.fc(h.flatten(1))))


class LastTokenPool(nn.Module):
    """Advanced indexing that keeps samples apart: Falcon's constant head index
    (`qkv.view(B, T, 3, d)[..., [-2], :]`, the batch dim not indexed) and the pooling of transformers'
    decoder `*ForSequenceClassification` (`h[arange(B), last_non_pad]`, the batch dim indexed by
    arange(B) next to a per-sample index); and an in-place update of a strided slice."""

    def __init__(self, vocab: int = 20, d: int = 4, n_cls: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 2 * d, padding_idx=0)
        self.qkv = nn.Linear(2 * d, 3 * d)
        self.head = nn.Linear(d, n_cls)

    def forward(self, ids: Tensor) -> Tensor:  # ids: [B, T], right-padded with 0
        B, T = ids.shape
        qkv = self.qkv(self.emb(ids)).view(B, T, 3, -1)
        s = qkv[..., [-2], :].squeeze(2) + qkv[:, :, 0]
        s[..., ::2] *= 0.5  # in place on a strided slice (Funnel): the backward has new_empty_strided
        h = torch.tanh(s)
        last = ids.ne(0).int().sum(-1).clamp(min=1) - 1
        return self.head(h[torch.arange(B, device=ids.device), last])


class EosPool(nn.Module):
    """BART's classification pooling: the rows of every EOS token, selected with a boolean mask over
    the whole batch, regrouped per sample by `view(B, -1, d)` and the last one taken
    (`h[ids == eos].view(B, -1, d)[:, -1]`); also their mean. Per sample only because every sample
    has as many EOS tokens (grapefx checks that at run time); a masked write `h[ids == 0] = 0` too."""

    EOS = 1

    def __init__(self, vocab: int = 20, d: int = 6, n_cls: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(2 * d, n_cls)

    def forward(self, ids: Tensor) -> Tensor:  # ids: [B, T], the same number of EOS per sample
        h = self.fc(self.emb(ids))
        h[ids == 0] = 0.0  # padding rows zeroed through a masked write (index_put)
        h = torch.tanh(h).cumsum(dim=1)  # each EOS row summarizes its sequence up to there
        rows = h[ids == self.EOS].view(ids.shape[0], -1, h.shape[-1])
        return self.head(torch.cat([rows[:, -1], rows.mean(1)], dim=-1))


def _eos_ids(T: int, vocab: int, n_cls: int, n_eos: int = 2) -> InputFn:
    """Token ids [B, T] in 2..vocab-1, about a fifth padding (0), with `n_eos` EOS tokens (id 1) per
    sample at random places."""

    def f(B: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        ids = torch.randint(2, vocab, (B, T), generator=g)
        ids = ids.masked_fill(torch.rand(B, T, generator=g) < 0.2, 0)
        for i in range(B):
            ids[i, torch.randperm(T, generator=g)[:n_eos]] = EosPool.EOS
        return ids, torch.randint(0, n_cls, (B,), generator=g)

    return f


class MaskedTokenLM(nn.Module):
    """A masked-token (MLM-style) loss computed inside the model: cross-entropy over the tokens whose
    label is not -100, picked with a boolean mask over [B, T] (`logits[mask]`) and summed. Samples
    pick different numbers of tokens; the rows are used one by one, so no count check applies.
    Input [B, 2, T]: token ids, then labels; returns each batch's summed loss (`summed_loss`).
    `flat`: the mask over the flattened tokens instead, `logits.view(-1, V)[labels.view(-1) != -100]`
    (older Hugging Face token-classification heads). `mean`: the mean over all selected rows, per
    sample only when every sample selects as many (checked at run time; `rows_mean_loss`).
    `layers_after`: a dense layer, the norm and the head applied to the selected rows,
    `head(norm(gelu(dense(h[mask]))))` (a sparse prediction head, as ModernBERT's: their weight
    gradients sum over rows that samples own unequally)."""

    def __init__(
        self, vocab: int = 16, d: int = 8, flat: bool = False, mean: bool = False, layers_after: bool = False
    ) -> None:
        super().__init__()
        self.flat, self.reduction, self.layers_after = flat, "mean" if mean else "sum", layers_after
        self.emb = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        if layers_after:
            self.dense = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        ids, labels = x[:, 0], x[:, 1]
        h = torch.tanh(self.fc(self.emb(ids)))
        if self.flat:
            h, labels = h.view(-1, h.shape[-1]), labels.reshape(-1)
        mask = labels != -100
        if self.layers_after:
            rows = self.norm(F.gelu(self.dense(h[mask])))
            return F.cross_entropy(self.head(rows), labels[mask], reduction=self.reduction)
        logits = self.head(self.norm(h))
        rows = logits[mask].view(-1, logits.shape[-1])  # a view that keeps the rows whole
        return F.cross_entropy(rows, labels[mask], reduction=self.reduction)


def summed_loss(out: Tensor, y: Tensor, reduction: str) -> Tensor:
    """For models that return their batch's summed loss: 'mean' divides by the batch size."""
    return out if reduction == "sum" else out / y.shape[0]


def rows_mean_loss(out: Tensor, y: Tensor, reduction: str) -> Tensor:
    """For models that return the mean over B samples' equally many rows: 'sum' multiplies by B."""
    return out * y.shape[0] if reduction == "sum" else out


def _masked_labels(T: int, vocab: int, per_sample: int | None = None) -> InputFn:
    """[B, 2, T]: ids, and labels equal to the ids at about a third of the positions (at least one
    per sample; exactly `per_sample` when given), -100 elsewhere; dummy targets [B]."""

    def f(B: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        ids = torch.randint(0, vocab, (B, T), generator=g)
        picked = torch.rand(B, T, generator=g) < 0.35
        picked[torch.arange(B), torch.randint(0, T, (B,), generator=g)] = True
        if per_sample is not None:
            picked = torch.zeros(B, T, dtype=torch.bool)
            for i in range(B):
                picked[i, torch.randperm(T, generator=g)[:per_sample]] = True
        labels = torch.where(picked, ids, torch.full_like(ids, -100))
        return torch.stack([ids, labels], dim=1), torch.zeros(B, dtype=torch.long)

    return f


class AlongDims(nn.Module):
    """Ops that select, order or summarize along a non-batch dim: F.normalize (vector norm), topk,
    sort, max / median / kthvalue over a dim, amax, and unfold (sliding windows)."""

    def __init__(self, d: int = 6, n_out: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(d, 2 * d)
        self.mix = nn.Linear(4 * d + 7, n_out)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, d]
        h = torch.tanh(self.fc(x))
        unit = F.normalize(h, dim=-1)
        top = h.topk(3, dim=-1).values
        ordered = h.sort(dim=-1, descending=True).values
        peaks = torch.stack(
            [h.max(dim=-1).values, h.median(dim=-1).values, h.kthvalue(2, dim=-1).values, h.amax(-1)], -1
        )
        windows = h.unfold(1, 4, 4).mean(-1)  # [B, 3]
        return self.mix(torch.cat([unit, ordered, top, peaks[:, :3] * windows, peaks[:, 3:]], -1))


class Recurrent(nn.Module):
    """nn.GRU run t-major ([T, B, d]) into a bidirectional nn.LSTM (batch_first): unrolled over time
    by the trace, every weight is used at T sites."""

    def __init__(self, d: int = 6, h: int = 5, n_out: int = 4) -> None:
        super().__init__()
        self.gru = nn.GRU(d, h)
        self.lstm = nn.LSTM(h, h, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * h, n_out)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, T, d]
        g, _ = self.gru(x.transpose(0, 1))
        out, _ = self.lstm(g.transpose(0, 1))
        return self.head(out.mean(dim=1))


class ConstantsOverBatch(nn.Module):
    """Batch-free tensors meeting per-sample values: a bias table assembled from slices of one
    parameter, partly resized bilinearly, and gathered by constant ids (BEiT's relative position
    bias), a constant positional encoding expanded over the batch and contracted with a parameter by
    einsum (XLNet), an index
    repeated for a gather (ViT-MAE's random masking), a batch dim tiled by `repeat`, and an FFT over
    tokens and features (FNet)."""

    def __init__(self, d: int = 8, t: int = 6, n_out: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.table = nn.Parameter(torch.randn(10, 2) * 0.5)
        self.register_buffer("ids", torch.randint(0, 12, (t,)), persistent=False)
        self.register_buffer("pos", torch.randn(t, d), persistent=False)
        self.r = nn.Parameter(torch.randn(d, 2, d // 2) * 0.3)
        self.head = nn.Linear(4 * d + 2, n_out)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, t, d]
        B, t, d = x.shape
        h = torch.tanh(self.lin(x))
        # BEiT resizes the first rows of its table bilinearly before the gather
        grid = self.table[:4].T.reshape(1, 2, 2, 2)
        resized = F.interpolate(grid, size=(2, 3), mode="bilinear", align_corners=False).reshape(2, 6).T
        bias = torch.cat([resized, self.table[4:]])[self.ids]  # [t, 2]
        k = torch.einsum("bih,hnd->bind", self.pos[None].expand(B, -1, -1), self.r).flatten(2)  # [B, t, d]
        keep = torch.argsort(x[..., 0], dim=1)[:, :3]
        kept = torch.gather(h, 1, keep.unsqueeze(-1).repeat(1, 1, d))  # [B, 3, d]
        tiled = h.repeat(2, 1, 1).view(2, B, t, d)[1]
        spectrum = torch.fft.fftn(h, dim=(1, 2)).real
        parts = [
            (k * h).mean(1),
            kept.mean(1),
            tiled.pow(2).mean(1),
            spectrum.mean(1),
            (h[..., :2] + bias).pow(2).mean(1),
        ]
        return self.head(torch.cat(parts, -1))


class InstanceNormNet(nn.Module):
    """InstanceNorm2d (affine) and InstanceNorm1d (no affine): batch norm over [1, B·C, ...] with
    the per-channel weight repeated B times; then adaptive max pooling."""

    def __init__(self, c: int = 3, n_out: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, 4, 3, padding=1, bias=False)  # a bias before instance norm cancels
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.conv1d = nn.Conv1d(4, 4, 3, padding=1, bias=False)
        self.inorm1d = nn.InstanceNorm1d(4)
        self.pool = nn.AdaptiveMaxPool2d(2)
        self.head = nn.Linear(16 + 4, n_out)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, c, H, W]
        h = F.relu(self.inorm(self.conv(x)))
        seq = self.inorm1d(self.conv1d(h.flatten(2)))  # [B, 4, H·W]
        return self.head(torch.cat([self.pool(h).flatten(1), seq[..., 0]], -1))  # (its mean is 0)


class Bags(nn.Module):
    """nn.EmbeddingBag on ids [B, L]: mode mean with a padding_idx, and mode sum."""

    def __init__(self, vocab: int = 20, d: int = 6, n_cls: int = 4) -> None:
        super().__init__()
        self.mean_bag = nn.EmbeddingBag(vocab, d, mode="mean", padding_idx=0)
        self.sum_bag = nn.EmbeddingBag(vocab, d, mode="sum")
        self.head = nn.Linear(2 * d, n_cls)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(torch.cat([self.mean_bag(ids), self.sum_bag(ids) * 0.3], -1)))


class LookupTables(nn.Module):
    """Parameters used as lookup tables with per-sample ids (`table[ids]`, not nn.Embedding): a
    [V, d] table read at every token, and a [K, 3, 2] codebook read once per sample."""

    def __init__(self, vocab: int = 20, d: int = 6, n_cls: int = 4) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, d))
        self.codebook = nn.Parameter(torch.randn(5, 3, 2))
        self.head = nn.Linear(d + 6, n_cls)

    def forward(self, ids: Tensor) -> Tensor:  # ids: [B, T]
        tokens = torch.tanh(self.table[ids]).mean(1)
        code = self.codebook[ids[:, 0] % 5].flatten(1)
        return self.head(torch.cat([tokens, code], -1))


class MHANet(nn.Module):
    """nn.MultiheadAttention; batch_first=False runs it t-major ([T, B, E] inside). Then a
    cross-attention with kdim / vdim set: separate q / k / v weights, one in_proj_bias chunked in
    three (its gradient is a cat of three per-sample sums)."""

    def __init__(self, d: int = 8, heads: int = 2, n_out: int = 4, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(d, d)
        self.mha = nn.MultiheadAttention(d, heads, dropout=0.0, batch_first=batch_first)
        self.keys, self.values = nn.Linear(d, 6), nn.Linear(d, 5)
        self.cross = nn.MultiheadAttention(d, heads, kdim=6, vdim=5, batch_first=batch_first)
        self.fc = nn.Linear(d, n_out)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, T, d]
        h = torch.tanh(self.inp(x))
        k, v = self.keys(h), self.values(h)
        if self.batch_first:
            a, _ = self.mha(h, h, h, need_weights=False)
            c, _ = self.cross(a, k, v, need_weights=False)
        else:
            ht, kt, vt = h.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [T, B, ·]
            a, _ = self.mha(ht, ht, ht, need_weights=False)
            c, _ = self.cross(a, kt, vt, need_weights=False)
            a, c = a.transpose(0, 1), c.transpose(0, 1)
        return self.fc((h + a + c).mean(dim=1))


class TinyGPT(nn.Module):
    """Token embedding + learned positional parameter (broadcast over the batch) + pre-LN blocks +
    final LN + head; `tied=True` computes logits = h @ emb.weight.T. `checkpointed`: each block
    under activation checkpointing while compiled (the backward recomputes it, replaying the
    attention kernel's RNG state); eagerly, e.g. in the oracle (torch.func cannot run checkpoint's
    saved-tensor hooks), the same blocks run plainly."""

    def __init__(
        self,
        vocab: int = 32,
        d: int = 16,
        heads: int = 2,
        n_layer: int = 2,
        max_t: int = 16,
        tied: bool = False,
        checkpointed: bool = False,
    ) -> None:
        super().__init__()
        self.tied, self.checkpointed = tied, checkpointed
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, max_t, d) * 0.1)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        if not tied:
            self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        T = ids.shape[1]
        h = self.tok(ids) + self.pos[:, :T]
        for blk in self.blocks:
            if self.checkpointed and torch.compiler.is_compiling():
                h = torch.utils.checkpoint.checkpoint(blk, h, use_reentrant=False)
            else:
                h = blk(h)
        h = self.ln_f(h)
        if self.tied:
            return h @ self.tok.weight.T
        return self.head(h)


class ClsScaleNet(nn.Module):
    """A cls token [1, 1, d] and a scale / shift parameter broadcast over the batch."""

    def __init__(self, d: int = 8, n_out: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.5)
        self.scale = nn.Parameter(1.0 + 0.1 * torch.randn(d))
        self.shift = nn.Parameter(0.1 * torch.randn(1, 1, d))
        self.mix = nn.Linear(d, d)
        self.fc = nn.Linear(d, n_out)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, T, d]
        h = self.inp(x)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), h], dim=1)
        h = torch.tanh(h * self.scale + self.shift)
        h = self.mix(h)
        h = h[:, 0] + h[:, 1:].mean(dim=1)
        return self.fc(h)


class FrozenMLP(nn.Module):
    """Some parameters frozen: the first Linear's weight, a whole LayerNorm."""

    def __init__(self, d: int = 10, h: int = 12, n_out: int = 5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.ln = nn.LayerNorm(h)
        self.fc2 = nn.Linear(h, h)
        self.fc3 = nn.Linear(h, n_out)
        self.fc1.weight.requires_grad_(False)
        for p in self.ln.parameters():
            p.requires_grad_(False)
        self.fc2.requires_grad_(False)
        self.fc2.bias.requires_grad_(True)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(F.relu(self.fc2(self.ln(self.fc1(x)))))


class TinyViT(nn.Module):
    """Patch conv + cls token + positional parameter + nn.TransformerEncoderLayer(batch_first=True)."""

    def __init__(
        self, img: int = 8, patch: int = 4, c_in: int = 3, d: int = 16, heads: int = 2, n_layer: int = 2, n_out: int = 5
    ) -> None:
        super().__init__()
        n_patch = (img // patch) ** 2
        self.patch = nn.Conv2d(c_in, d, kernel_size=patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, n_patch + 1, d) * 0.1)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d,
                heads,
                dim_feedforward=2 * d,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=(i % 2 == 0),
            )
            for i in range(n_layer)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_out)

    def forward(self, x: Tensor) -> Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2)  # [B, N, d]
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1) + self.pos
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h[:, 0]))


class QkvUnbindViT(nn.Module):
    """timm's ViT attention: one qkv Linear, reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0),
    SDPA. Its backward stacks the q/k/v gradients as cat([gq, gk, gv], 0) along the *batch* dim, then
    views [3B, ...] as [3, B, ...] (found on timm 1.0's vit_tiny)."""

    def __init__(self, img: int = 8, patch: int = 4, d: int = 16, heads: int = 2, n_out: int = 5) -> None:
        super().__init__()
        self.heads = heads
        self.patch = nn.Conv2d(3, d, kernel_size=patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, n_out)

    def forward(self, x: Tensor) -> Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1)
        B, N, C = h.shape
        qkv = self.qkv(self.ln1(h)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        h = h + self.proj(a)
        h = h + self.mlp(self.ln2(h))
        return self.head(h[:, 0])


class TwoViews(nn.Module):
    """Both views of every sample in one batch of 2B rows (cat along the batch dim), one shared
    encoder, the rows of a sample summed back: rows b and B + b belong to sample b."""

    def __init__(self, d: int = 10, h: int = 12, n_out: int = 5) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h))
        self.head = nn.Linear(h, n_out)

    def forward(self, x: Tensor) -> Tensor:
        rows = self.enc(torch.cat([x, x.flip(-1)], dim=0))  # [2B, h]
        return self.head(rows.view(2, x.shape[0], -1).sum(0))


class ConvNeXtBlock(nn.Module):
    """torchvision's / timm's ConvNeXt block: depthwise 7x7 conv, channels-last LayerNorm and MLP
    (permute to [B, H, W, C]), layer scale, residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.scale = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x: Tensor) -> Tensor:
        h = self.dw(x).permute(0, 2, 3, 1)
        h = self.fc2(F.gelu(self.fc1(self.norm(h)))) * self.scale
        return x + h.permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    """Patchify stem + LayerNorm2d (permute, LayerNorm, permute back) + two stages joined by a 2x2
    stride-2 downsampling conv, as in ConvNeXt."""

    def __init__(self, c: int = 8, n_out: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, stride=2)
        self.stem_norm, self.down_norm = nn.LayerNorm(c, eps=1e-6), nn.LayerNorm(c, eps=1e-6)
        self.stage1, self.stage2 = ConvNeXtBlock(c), ConvNeXtBlock(2 * c)
        self.down = nn.Conv2d(c, 2 * c, 2, stride=2)
        self.head = nn.Linear(2 * c, n_out)

    @staticmethod
    def _norm2d(norm: nn.LayerNorm, x: Tensor) -> Tensor:
        return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stage1(self._norm2d(self.stem_norm, self.stem(x)))
        h = self.stage2(self.down(self._norm2d(self.down_norm, h)))
        return self.head(h.mean(dim=(2, 3)))


class GatheredExperts(nn.Module):
    """A mixture of experts in transformers' "batched_mm" form, written out: top-2 of 4 experts per
    token, each token's expert weights gathered (`W[ids]`) and applied by batched matmuls, in both
    orientations (`bmm(W[ids], x)` and `bmm(x, W[ids])`), and a third expert weight applied to two
    columns per token (rows of the weight gradient that are rank-2 products). The expert weights
    dominate the per-sample norms."""

    def __init__(self, d_in: int = 6, d: int = 12, f: int = 16, n_experts: int = 4, n_cls: int = 5) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.router = nn.Linear(d, n_experts)
        self.up = nn.Parameter(torch.randn(n_experts, f, d) / d**0.5)  # [E, out, in]
        self.down = nn.Parameter(torch.randn(n_experts, f, d) / f**0.5)  # [E, in, out]
        self.pair = nn.Parameter(torch.randn(n_experts, 3, d // 2) / d**0.5)  # on two columns per token
        self.head = nn.Linear(d + 6, n_cls)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        B, T, d = h.shape
        flat = h.reshape(B * T, d)
        weights, ids = self.router(flat).softmax(-1).topk(2, dim=-1)
        ids = ids.reshape(-1)
        xs = flat.repeat_interleave(2, dim=0)  # [S = 2·B·T, d]: one row per (token, expert)
        u = F.gelu(torch.bmm(self.up[ids], xs[:, :, None]).squeeze(-1))  # [S, f]
        o = torch.bmm(u[:, None, :], self.down[ids]).squeeze(1)  # [S, d]
        o = (o * weights.reshape(-1, 1)).reshape(B * T, 2, d).sum(1).reshape(B, T, d)
        cols = xs.reshape(-1, 2, d // 2).transpose(1, 2)  # [S, d/2, 2]
        q = torch.bmm(self.pair[ids], cols).reshape(B, T, 2, 6).sum(2)  # [B, T, 6]
        return self.head(torch.cat([h + o, torch.tanh(q)], dim=-1).mean(1))


class RoutedRowExperts(nn.Module):
    """A mixture of experts as grapefx runs transformers' (grapefx/moe_experts.py): top-2 of 4 experts,
    each expert applied to the rows routed to it, x[mask_e] (unequal counts per sample), its outputs
    added back through the mask; the fused expert weights unbound into one piece per expert (their
    gradients fill disjoint slices), a gated MLP split into gate and up halves."""

    def __init__(self, d_in: int = 6, d: int = 12, f: int = 16, n_experts: int = 4, n_cls: int = 5) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.router = nn.Linear(d, n_experts)
        self.gate_up = nn.Parameter(torch.randn(n_experts, 2 * f, d) / d**0.5)
        self.down = nn.Parameter(torch.randn(n_experts, d, f) / f**0.5)
        self.head = nn.Linear(d, n_cls)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        B, T, d = h.shape
        flat = h.reshape(B * T, d)
        weights, ids = self.router(flat).softmax(-1).topk(2, dim=-1)
        out = torch.zeros_like(flat)
        for e, (gate_up, down) in enumerate(zip(self.gate_up.unbind(0), self.down.unbind(0))):
            hit = ids == e
            mask = hit.any(-1)
            gate, up = F.linear(flat[mask], gate_up).chunk(2, dim=-1)
            rows = F.linear(F.silu(gate) * up, down) * (weights * hit).sum(-1)[mask][:, None]
            out = out.index_put((mask,), rows, accumulate=True)
        return self.head((flat + out).reshape(B, T, d).mean(1))


class TinySwin(nn.Module):
    """Swin's shifted-window attention: patch embedding, F.pad to whole windows, torch.roll, window
    partition into the batch dim ([B·nW, ws², C]), a relative-position bias gathered from a parameter
    table by a fixed index buffer, window merge, roll back, crop, channels-last adaptive pooling."""

    def __init__(self, c: int = 8, ws: int = 2, heads: int = 2, n_out: int = 5) -> None:
        super().__init__()
        self.c, self.ws, self.heads = c, ws, heads
        self.embed = nn.Conv2d(3, c, 2, stride=2)
        self.norm = nn.LayerNorm(c)
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.rel_bias = nn.Parameter(torch.randn((2 * ws - 1) ** 2, heads) * 0.1)
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
        self.register_buffer("rel_index", rel[..., 0] * (2 * ws - 1) + rel[..., 1], persistent=False)
        self.head = nn.Linear(c, n_out)

    def forward(self, x: Tensor) -> Tensor:  # x [B, 3, 6, 6] -> 3x3 tokens, padded to 2x2 windows of 2x2
        B, c, ws, heads = x.shape[0], self.c, self.ws, self.heads
        h = F.pad(self.norm(self.embed(x).permute(0, 2, 3, 1)), (0, 0, 0, 1, 0, 1))
        h = torch.roll(h, shifts=(-1, -1), dims=(1, 2))
        w = h.view(B, 2, ws, 2, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(B * 4, ws * ws, c)
        q, k, v = self.qkv(w).reshape(B * 4, ws * ws, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.rel_bias[self.rel_index.view(-1)].view(ws * ws, ws * ws, heads).permute(2, 0, 1)
        attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5 + bias).softmax(-1)
        o = self.proj((attn @ v).transpose(1, 2).reshape(B * 4, ws * ws, c))
        o = o.view(B, 2, 2, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(B, 4, 4, c)
        o = torch.roll(o, shifts=(1, 1), dims=(1, 2))[:, :3, :3]
        # torchvision's head: 1x1 adaptive pooling of the permuted (channels-last) map, which ATen
        # computes as a mean plus an as_strided back to channels-last strides
        return self.head(F.adaptive_avg_pool2d(o.permute(0, 3, 1, 2), 1).flatten(1))


class BasicBlockGN(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(2, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(2, c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.GroupNorm(2, c_out))

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.gn1(self.conv1(x)))
        h = self.gn2(self.conv2(h))
        sc = x if self.down is None else self.down(x)
        return F.relu(h + sc)


class ResNetGN(nn.Module):
    """timm-style ResNet: stem conv + GN, basic blocks with GN and a strided 1x1 shortcut, pool, fc."""

    def __init__(self, c_in: int = 3, width: int = 8, n_out: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.GroupNorm(2, width), nn.ReLU())
        self.layer1 = BasicBlockGN(width, width, 1)
        self.layer2 = BasicBlockGN(width, 2 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, n_out)

    def forward(self, x: Tensor) -> Tensor:
        h = self.layer2(self.layer1(self.stem(x)))
        return self.fc(self.pool(h).flatten(1))


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001
        return False
    return True


def has_transformers() -> bool:
    return _importable("transformers")


def has_peft() -> bool:
    return _importable("peft")


class HFGPT2(nn.Module):
    """transformers.GPT2LMHeadModel from a tiny config, random weights (no download); returns logits.
    GPT-2 ties lm_head.weight to transformer.wte.weight."""

    def __init__(self, vocab: int = 64, d: int = 32, n_layer: int = 2, heads: int = 2, max_t: int = 32) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            n_layer=n_layer,
            n_embd=d,
            n_head=heads,
            vocab_size=vocab,
            n_positions=max_t,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            use_cache=False,
            bos_token_id=0,
            eos_token_id=0,
        )
        self.m = GPT2LMHeadModel(cfg)
        self.m.train()

    def forward(self, ids: Tensor) -> Tensor:
        return self.m(input_ids=ids, use_cache=False).logits


class EncoderIds(nn.Module):
    """The id plumbing of BERT-family encoders, without transformers: RoBERTa's position ids (a
    cumsum over non-pad tokens), BERT's default token types (a [1, max_T] buffer sliced and expanded
    over the batch: every sample looks up the same ids), a padding_idx, and classification from the
    first token, through a tensor constant (graph constants are batch-free)."""

    def __init__(self, vocab: int = 20, d: int = 8, max_t: int = 16, n_cls: int = 4, pad: int = 0) -> None:
        super().__init__()
        self.pad = pad
        self.word = nn.Embedding(vocab, d, padding_idx=pad)
        self.pos = nn.Embedding(max_t + 1, d, padding_idx=pad)
        self.types = nn.Embedding(2, d)
        self.register_buffer("type_ids", torch.zeros(1, max_t, dtype=torch.long), persistent=False)
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, n_cls)

    def forward(self, ids: Tensor) -> Tensor:
        B, T = ids.shape
        mask = ids.ne(self.pad).int()
        pos = (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + self.pad
        types = self.type_ids[:, :T].expand(B, T)
        h = self.ln(self.word(ids) + self.pos(pos) + self.types(types))
        gate = torch.tensor([1.0, 0.5] * (h.shape[-1] // 2))  # a tensor constant in the graph (as OPT has)
        return self.head(torch.tanh(self.fc(h[:, 0] * gate)))


_NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_BERTISH = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
_DECODER = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
# name -> (config class, model class, config fields): tiny, no dropout, random weights, no download
HF_TEXT: dict[str, tuple[str, str, dict[str, Any]]] = {
    "bert": ("BertConfig", "BertForSequenceClassification", {**_BERTISH, **_NO_DROPOUT}),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", {**_BERTISH, **_NO_DROPOUT, "pad_token_id": 0}),
    "albert": (
        "AlbertConfig",
        "AlbertForSequenceClassification",
        {**_BERTISH, **_NO_DROPOUT, "embedding_size": 16, "classifier_dropout_prob": 0.0},
    ),
    "electra": ("ElectraConfig", "ElectraForSequenceClassification", {**_BERTISH, **_NO_DROPOUT, "embedding_size": 16}),
    "distilbert": (
        "DistilBertConfig",
        "DistilBertForSequenceClassification",
        dict(vocab_size=64, dim=32, n_layers=2, n_heads=2, hidden_dim=64, dropout=0.0, attention_dropout=0.0)
        | {"seq_classif_dropout": 0.0},
    ),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {**_DECODER, "num_key_value_heads": 2}),
    "llama_cls": (
        "LlamaConfig",
        "LlamaForSequenceClassification",
        {**_DECODER, "num_key_value_heads": 2, "pad_token_id": 0},
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**_DECODER, "num_key_value_heads": 2}),
    # top-2 of 4 experts per token; grapefx runs the experts as transformers' "batched_mm"
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {**_DECODER, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2}
        | {"router_jitter_noise": 0.0},
    ),
    # gated delta rule (chunked, a triangular solve per chunk) beside full attention, MoE experts
    # AltUp clamps its coefficients through .data in training; a small bound makes the clamp bind
    "gemma3n": (
        "Gemma3nTextConfig",
        "Gemma3nForCausalLM",
        {**_DECODER, "num_key_value_heads": 2, "head_dim": 8, "vocab_size_per_layer_input": 64}
        | {"hidden_size_per_layer_input": 8, "laurel_rank": 4, "altup_num_inputs": 2, "altup_coef_clip": 0.05}
        | {"num_kv_shared_layers": 0, "layer_types": ["sliding_attention", "full_attention"]}
        | {"sliding_window": 4, "activation_sparsity_pattern": [0.0, 0.0], "intermediate_size": [64, 64]},
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        {**_DECODER, "num_key_value_heads": 2, "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2}
        | {"moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "decoder_sparse_step": 1}
        | {"layer_types": ["linear_attention", "full_attention"], "linear_num_value_heads": 4}
        | {"linear_num_key_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8}
        | {"linear_conv_kernel_dim": 4},
    ),
    # experts modules with only a loop over the experts hit: grapefx replaces their forward
    "dbrx": (
        "DbrxConfig",
        "DbrxForCausalLM",
        dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=40)
        | {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0}}
        | {"ffn_config": {"ffn_hidden_size": 48, "moe_num_experts": 4, "moe_top_k": 2, "moe_jitter_eps": None}},
    ),
    # top-1 routing with an expert capacity (tokens over it skip the experts), one module per expert
    "switch": (
        "SwitchTransformersConfig",
        "SwitchTransformersForConditionalGeneration",
        dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4)
        | dict(num_experts=4, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, expert_capacity=3)
        | {"dropout_rate": 0.0, "relative_attention_num_buckets": 8, "decoder_start_token_id": 0, "pad_token_id": 0}
        | {"router_jitter_noise": 0.0},
    ),
    # reassigns its positional-encoding buffer in forward (`self.pos_encoding = ....to(...)`)
    "ctrl": (
        "CTRLConfig",
        "CTRLLMHeadModel",
        dict(vocab_size=64, n_positions=40, n_embd=32, dff=64, n_layer=2, n_head=4)
        | {"resid_pdrop": 0.0, "embd_pdrop": 0.0},
    ),
    "phi": ("PhiConfig", "PhiForCausalLM", {**_DECODER, "resid_pdrop": 0.0, "embd_pdrop": 0.0}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {**_DECODER, "hidden_dropout": 0.0}),
    "t5": (
        "T5Config",
        "T5ForConditionalGeneration",
        dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0)
        | {"relative_attention_num_buckets": 8, "decoder_start_token_id": 0, "pad_token_id": 0},
    ),
    # pools each sequence's last EOS row: h[ids == eos].view(B, -1, d)[:, -1] (tests: EosPool)
    "bart_cls": (
        "BartConfig",
        "BartForSequenceClassification",
        dict(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2)
        | dict(decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, dropout=0.0, activation_dropout=0.0)
        | {"eos_token_id": 1, "pad_token_id": 0, "bos_token_id": 2, "decoder_start_token_id": 1},
    ),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64)
        | {"dropout": 0.0, "word_embed_proj_dim": 32},
    ),
}


class HFText(nn.Module):
    """A transformers text model of `HF_TEXT` returning logits: sequence classification for the
    encoders (BERT's token-type buffer, RoBERTa's cumsum position ids, ALBERT's shared layers and
    factorized embedding, the pooler) or a causal LM for the decoders (Llama / Mistral: RMSNorm,
    rotary embeddings, grouped-query attention, SiLU-gated MLP, untied head; OPT: positions from a
    cumsum over the attention mask, tensor constants in the graph; Phi, GPT-NeoX: partial rotary,
    parallel blocks)."""

    def __init__(self, name: str, n_cls: int = 3) -> None:
        super().__init__()
        import transformers as tf

        cfg_name, model_name, fields = HF_TEXT[name]
        common = {"max_position_embeddings": 40, "use_cache": False, "attention_dropout": 0.0}
        cfg = getattr(tf, cfg_name)(**{**common, **fields})
        if model_name.endswith("SequenceClassification"):
            cfg.num_labels = n_cls
        self.m = getattr(tf, model_name)(cfg)
        self.m.train()

    def forward(self, ids: Tensor) -> Tensor:
        if self.m.config.is_encoder_decoder:  # T5: the ids are also the decoder's (teacher-forced) input
            # (Switch Transformers indexes the attention mask, which transformers does not fill in)
            return self.m(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=ids).logits
        return self.m(input_ids=ids).logits


class HFEncoderHead(nn.Module):
    """transformers' T5 encoder (relative position buckets, T5's RMS-style norm) or ViT (patch conv,
    cls token, position embeddings) with a linear head on the first position."""

    def __init__(self, name: str, n_cls: int) -> None:
        super().__init__()
        import transformers as tf

        if name == "t5":
            cfg = tf.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0)
            self.m, self.key = tf.T5EncoderModel(cfg), "input_ids"
        else:
            cfg = tf.ViTConfig(image_size=8, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
            cfg.intermediate_size, cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob = 64, 0.0, 0.0
            self.m, self.key = tf.ViTModel(cfg, add_pooling_layer=False), "pixel_values"
        self.m.train()
        self.head = nn.Linear(32, n_cls)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.m(**{self.key: x}).last_hidden_state[:, 0])


class HFLoRA(nn.Module):
    """The usual private fine-tuning set-up: a transformers Llama wrapped by peft's LoRA (rank-4
    adapters on q_proj / v_proj; the base weights frozen) with a fully trained lm_head
    (`modules_to_save`); returns logits."""

    def __init__(self) -> None:
        super().__init__()
        import peft
        import transformers as tf

        cfg_name, model_name, fields = HF_TEXT["llama"]
        cfg = getattr(tf, cfg_name)(max_position_embeddings=40, use_cache=False, attention_dropout=0.0, **fields)
        lora = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, modules_to_save=["lm_head"]
        )
        self.m = peft.get_peft_model(getattr(tf, model_name)(cfg), lora)
        self.m.train()

    def forward(self, ids: Tensor) -> Tensor:
        return self.m(input_ids=ids).logits


class HFCheckpointed(HFText):
    """transformers' Llama with `gradient_checkpointing_enable()`: the backward recomputes every
    decoder layer, attention kernel included (replayed with its saved RNG state)."""

    def __init__(self) -> None:
        super().__init__("llama")
        self.m.gradient_checkpointing_enable({"use_reentrant": False})


class HFXmod(nn.Module):
    """transformers' X-MOD sequence classifier with three languages: each layer's language adapters
    route whole samples, `new[lang_ids == i] = adapter_i(h[lang_ids == i])` (boolean masks over the
    batch dim). Input [B, 1 + T]: the sample's language id, then its token ids."""

    def __init__(self, n_cls: int = 3) -> None:
        super().__init__()
        import transformers as tf

        cfg = tf.XmodConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=40,
            languages=["en_XX", "de_DE", "fr_XX"],
            num_labels=n_cls,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.m = tf.XmodForSequenceClassification(cfg)
        self.m.train()

    def forward(self, x: Tensor) -> Tensor:
        return self.m(input_ids=x[:, 1:], lang_ids=x[:, 0]).logits


def _lang_ids(T: int, vocab: int, langs: int, n_cls: int) -> InputFn:
    """[B, 1 + T]: a language id per sample (0 and 1 at B <= 3, the last language left out), then
    token ids; targets [B]."""

    def f(B: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        lang = torch.arange(B) % (langs - 1) if B <= 3 else torch.randint(0, langs, (B,), generator=g)
        ids = torch.randint(3, vocab, (B, T), generator=g)
        return torch.cat([lang[:, None], ids], dim=1), torch.randint(0, n_cls, (B,), generator=g)

    return f


class HFSparseMLM(nn.Module):
    """transformers' ModernBERT masked LM with `sparse_prediction=True`: the prediction head (dense,
    GELU, LayerNorm, decoder) runs on the masked tokens only, `head(h[labels != -100])`, and the
    model returns its own loss. Input [B, 2, T]: ids, then labels (-100 where not predicted);
    `num_items_in_batch=1` makes that loss the sum over the predicted tokens (`summed_loss`)."""

    def __init__(self) -> None:
        super().__init__()
        import transformers as tf

        cfg = tf.ModernBertConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=40,
            global_attn_every_n_layers=1,
            sparse_prediction=True,
            pad_token_id=0,
            cls_token_id=1,
            sep_token_id=2,
            bos_token_id=1,
            eos_token_id=2,
        )
        self.m = tf.ModernBertForMaskedLM(cfg)
        self.m.train()

    def forward(self, x: Tensor) -> Tensor:
        ids, labels = x[:, 0].contiguous(), x[:, 1].contiguous()  # ModernBERT views labels flat
        return self.m(input_ids=ids, labels=labels, num_items_in_batch=1).loss


class HFSpeech(nn.Module):
    """A transformers speech encoder with a sequence-classification head (conv feature encoder, grouped
    positional conv, masked mean pooling; SEW-D: squeezed DeBERTa-v2 layers) on raw audio [B, 400].
    transformers 5.x installs its output hooks lazily under a lock and the feature encoder sets
    `requires_grad` on its input: grapefx undoes both (`grapefx/transformers_compat.py`); the model
    is used unchanged."""

    def __init__(self, name: str, n_cls: int) -> None:
        super().__init__()
        import transformers as tf

        config_cls, model_cls = {
            "wav2vec2": (tf.Wav2Vec2Config, tf.Wav2Vec2ForSequenceClassification),
            "hubert": (tf.HubertConfig, tf.HubertForSequenceClassification),
            "wavlm": (tf.WavLMConfig, tf.WavLMForSequenceClassification),
            "sew_d": (tf.SEWDConfig, tf.SEWDForSequenceClassification),
        }[name]
        # SEW-D: DeBERTa-v2 attention over a squeezed sequence; at the default init scale every
        # sample's gradient norm is the same to 0.1% (the check needs some clipped and some not)
        extra = {"squeeze_factor": 2, "position_buckets": 16, "initializer_range": 0.3} if name == "sew_d" else {}
        cfg = config_cls(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2, num_labels=n_cls, classifier_proj_size=8, mask_time_prob=0.0,
            hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
            layerdrop=0.0, final_dropout=0.0, **extra,
        )  # fmt: skip
        self.m = model_cls(cfg)
        self.m.train()

    def forward(self, x: Tensor) -> Tensor:
        return self.m(input_values=x).logits


# ----------------------------------------------------------------------------------------------
# the zoo
# ----------------------------------------------------------------------------------------------
InputFn = Callable[[int, torch.Generator], tuple[Tensor, Tensor]]


class TaskRouted(nn.Module):
    """Samples routed by a per-sample task id with boolean masks over the batch dim (multi-task
    models, X-MOD's language adapters): `a[task == k] = adapter_k(h[task == k])` writes each task's
    adapter output (Linear, LayerNorm) back in place, a shared layer follows, each task's own head
    reads the pooled rows of its samples and its bias row is written to them. A task may hold no
    sample of a batch. Input
    [B, T, d + 1]: features, then the task id in the last channel (read at t = 0)."""

    def __init__(self, d: int = 6, tasks: int = 3, n_cls: int = 4) -> None:
        super().__init__()
        self.tasks, self.n_cls = tasks, n_cls
        self.inp = nn.Linear(d, d)
        self.adapters = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d)) for _ in range(tasks))
        self.shared = nn.Linear(d, d)
        self.heads = nn.ModuleList(nn.Linear(d, n_cls) for _ in range(tasks))
        self.task_bias = nn.Parameter(torch.randn(tasks, n_cls))

    def forward(self, x: Tensor) -> Tensor:
        x, task = x[..., :-1], x[:, 0, -1].long()
        h = torch.tanh(self.inp(x))
        a = torch.zeros_like(h)
        for k, adapter in enumerate(self.adapters):
            a[task == k] = adapter(h[task == k])
        pooled = torch.tanh(self.shared(h + a)).mean(1)
        out = pooled.new_zeros(pooled.shape[0], self.n_cls)
        bias = torch.zeros_like(out)
        for k, head in enumerate(self.heads):
            out[task == k] = head(pooled[task == k])
            bias[task == k] = self.task_bias[k]  # a batch-free value written to the task's samples
        return out + bias


class NormedSharedTable(nn.Module):
    """A batch-free table normalized and projected once, then used by every sample (DeBERTa's and
    SEW-D's relative-position embeddings: `LayerNorm(rel_embeddings)`, then a key projection of
    them scored against each sample's queries). The gradient reaches the projection, the norm and
    the table after its batch contraction: per sample through an mm, a sum and a layer-norm
    backward (passes/batched_post.py's hand rules), also with the norm over a 1-D gain vector."""

    def __init__(self, d: int = 8, positions: int = 5, n_cls: int = 3) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(positions, d))
        self.gain = nn.Parameter(torch.randn(d))
        self.norm = nn.LayerNorm(d)
        self.gain_norm = nn.LayerNorm(d, bias=False)
        self.key = nn.Linear(d, d)
        self.query = nn.Linear(d, d)
        self.head = nn.Linear(positions, n_cls)

    def forward(self, x: Tensor) -> Tensor:
        keys = self.key(self.norm(self.table)) * self.gain_norm(self.gain)  # [positions, d], batch-free
        scores = self.query(x) @ keys.t()  # [B, T, positions]
        return self.head(torch.tanh(scores).mean(1))


class LearnedQueryPool(nn.Module):
    """Attention pooling with a learned query expanded over the batch (AIMv2's and V-JEPA 2's
    pooling heads, SigLIP's MAP head): `F.scaled_dot_product_attention(query.expand(B, ...), k, v)`
    with the query batch-free and the keys / values per sample."""

    def __init__(self, d: int = 8, heads: int = 2, n_cls: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.inp = nn.Linear(d, d)
        self.query = nn.Parameter(torch.randn(1, 1, d))
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.head = nn.Linear(d, n_cls)

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        h = torch.tanh(self.inp(x))
        q = self.query.expand(B, -1, -1).reshape(B, 1, self.heads, d // self.heads).transpose(1, 2)
        k = self.k(h).reshape(B, T, self.heads, d // self.heads).transpose(1, 2)
        v = self.v(h).reshape(B, T, self.heads, d // self.heads).transpose(1, 2)
        pooled = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, d)
        return self.head(pooled)


class FrameConv(nn.Module):
    """A video's frames through per-frame convolutions with the batch merged with time,
    [B, T, C, H, W] -> [B·T, C, H, W] (TimeSformer's and ViViT-style patch embeddings): each
    sample's weight gradient sums over its T images. A grouped, strided Conv2d with bias, a
    GroupNorm over the same rows, a bias-free Conv2d, then pooling over frames and pixels."""

    def __init__(self, n_cls: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2)
        self.norm = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 6, 2, bias=False)
        self.head = nn.Linear(6, n_cls)

    def forward(self, x: Tensor) -> Tensor:
        B, T = x.shape[:2]
        h = torch.tanh(self.norm(self.conv(x.reshape(B * T, *x.shape[2:]))))
        h = self.conv2(h)
        return self.head(h.reshape(B, T, *h.shape[1:]).mean((1, 3, 4)))


class TriangularSolves(nn.Module):
    """Triangular solves batched over samples (Qwen3-Next's gated delta rule solves a per-sample
    unit-lower-triangular system per chunk): one with a per-sample matrix built from the keys, one
    with a batch-free learned matrix and per-sample right-hand sides."""

    def __init__(self, d: int = 6, T: int = 4, n_cls: int = 3) -> None:
        super().__init__()
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.shared = nn.Parameter(torch.randn(T, T) * 0.3)
        self.head = nn.Linear(d, n_cls)

    def forward(self, x: Tensor) -> Tensor:
        k, v = torch.tanh(self.k(x)), self.v(x)  # [B, T, d]
        eye = torch.eye(x.shape[1], dtype=x.dtype)
        a = eye + torch.tril(k @ k.transpose(1, 2), diagonal=-1) * 0.5  # per sample, unit lower
        u = torch.linalg.solve_triangular(a, v, upper=False)
        s = eye + torch.tril(self.shared, diagonal=-1)  # batch-free
        w = torch.linalg.solve_triangular(s, u, upper=False, unitriangular=True)
        return self.head(w.mean(1))


class ConstrainedWeights(nn.Module):
    """Weights constrained in place inside the forward, out of autograd's sight: Gemma-3n's AltUp
    clamps its coefficients through `.data` on every training step, and a max-norm constraint
    renormalizes rows under no_grad. Neither reads the batch. The constraints bind (the weights
    start outside them). (A buffer counting steps is in tests/test_state_updates.py: torch.func,
    the oracle, cannot run in-place updates of buffers.)"""

    def __init__(self, d: int = 6, n_cls: int = 3) -> None:
        super().__init__()
        self.coefs = nn.Linear(d, d, bias=False)
        self.rows = nn.Linear(d, d)
        self.head = nn.Linear(d, n_cls)
        with torch.no_grad():
            self.coefs.weight.mul_(4.0)
            self.rows.weight.mul_(4.0)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.coefs.weight.data.clamp_(-0.3, 0.3)
            with torch.no_grad():
                self.rows.weight.renorm_(2, 0, 0.8)
        return self.head(torch.tanh(self.rows(self.coefs(x))))


def _tasks(T: int, d: int, tasks: int, n_cls: int) -> InputFn:
    """[B, T, d + 1]: features and a task id per sample (tasks 0 and 1 at B=3, task 2 left out)."""

    def f(B: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        task = torch.arange(B) % (tasks - 1) if B <= 3 else torch.randint(0, tasks, (B,), generator=g)
        x = torch.cat([torch.randn(B, T, d, generator=g), task[:, None, None].expand(B, T, 1).float()], dim=2)
        return x, torch.randint(0, n_cls, (B,), generator=g)

    return f


class ChunkScan(nn.Module):
    """Mamba2's chunked scan as transformers writes it (Bamba, FalconH1): an einsum over the state
    dim whose bmm lowering, in the B=1 graph, views away size-1 dims next to the batch dim, and a
    select on the last dim feeding `ones_like`."""

    def __init__(self, n: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.c, self.b, self.a = nn.Linear(n, n), nn.Linear(n, n), nn.Linear(n, n)
        self.out = nn.Linear(heads, 3)

    def forward(self, x: Tensor) -> Tensor:  # x [B, chunks, l, heads, n]
        G = torch.einsum("bclhn,bcshn->bclsh", self.c(x), self.b(x))  # [B, chunks, l, s, heads]
        decay = torch.exp(self.a(x).sum(-1)).permute(0, 3, 1, 2).unsqueeze(-1).expand(-1, -1, -1, -1, G.shape[3])
        M = G * decay.permute(0, 2, 3, 4, 1) * torch.ones_like(G[..., 0]).unsqueeze(-1)
        return self.out(M.sum(dim=(1, 2, 3)))


class InPlaceSharedQuery(nn.Module):
    """DeBERTa's relative-position query: a Linear of batch-free position embeddings, divided in
    place (`pos_query /= scale`), then contracted with every sample's keys. Its backward reaches the
    position parameters through copy / new_empty_strided / div after the batch contraction."""

    def __init__(self, d: int = 8, positions: int = 6) -> None:
        super().__init__()
        self.rel = nn.Parameter(torch.randn(1, positions, d))
        self.pos_q_proj = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.head = nn.Linear(positions, 3)

    def forward(self, x: Tensor) -> Tensor:  # x [B, T, d]
        pq = self.pos_q_proj(self.rel)
        pq /= 2.0
        att = torch.matmul(self.k(x), pq.transpose(-1, -2))  # [B, T, positions]
        return self.head(torch.tanh(att).mean(1))


class SharedPositionTables(nn.Module):
    """Position tables as Whisper and Speech2Text read them: a learned table indexed with
    arange(T) repeated over the batch (its backward scatters per-sample rows with batch-free ids), and
    a sinusoidal buffer read by index_select with per-sample ids (a cumsum over tokens) flattened to 1-D."""

    def __init__(self, d: int = 8, positions: int = 16) -> None:
        super().__init__()
        self.learned = nn.Parameter(torch.randn(positions, d) * 0.5)
        angles = torch.arange(positions * d, dtype=torch.float32).view(positions, d)
        self.register_buffer("sinusoids", torch.sin(angles))
        self.proj = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:  # x [B, T, d]
        B, T, _ = x.shape
        shared = torch.arange(T, device=x.device).unsqueeze(0).repeat(B, 1)
        own = (x[..., 0] > 0).long().cumsum(-1)  # per-sample ids
        table = self.sinusoids.index_select(0, own.view(-1)).view(B, T, -1)
        h = torch.tanh(self.proj(x + self.learned[shared]) + table)
        return self.head(h.mean(1))


class FlatRowsGroupNorm(nn.Module):
    """A GroupNorm over the batch merged with the positions, `norm(h.flatten(0, 1))` on [B·T, C], as
    LeViT's and PatchTST's BatchNorm1d layers become after grapefx.replace_batch_norm: every row is
    normalized on its own, and each sample's affine gradients sum its T rows."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.norm = nn.GroupNorm(2, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:  # x [B, T, 4]
        h = self.inp(x)
        h = self.norm(h.flatten(0, 1)).reshape_as(h)
        return self.head(torch.tanh(h).mean(1))


@dataclass
class ZooCase:
    name: str
    build: Callable[[], nn.Module]
    inputs: InputFn
    loss: Callable[[Tensor, Tensor, str], Tensor] = class_loss
    tags: set[str] = field(default_factory=set)
    available: Callable[[], bool] = lambda: True

    def make(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        m = self.build()
        m.train()
        return m

    def batch(self, B: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(1000 + 17 * seed + B)
        return self.inputs(B, g)

    def __repr__(self) -> str:
        return self.name


def _dense(shape: tuple[int, ...], n_cls: int) -> InputFn:
    def f(B: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        return torch.randn(B, *shape, generator=g), torch.randint(0, n_cls, (B,), generator=g)

    return f


def _dense_tokens(T: int, d: int, n_cls: int) -> InputFn:
    def f(B: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        return torch.randn(B, T, d, generator=g), torch.randint(0, n_cls, (B, T), generator=g)

    return f


def _ids(T: int, vocab: int, n_cls: int | None = None, pad_frac: float = 0.0) -> InputFn:
    """Token ids [B, T]; targets [B] (n_cls) or next-token-style [B, T] (n_cls None)."""

    def f(B: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        ids = torch.randint(1, vocab, (B, T), generator=g)
        if pad_frac:
            ids = ids.masked_fill(torch.rand(B, T, generator=g) < pad_frac, 0)
        if n_cls is None:
            y = torch.randint(0, vocab, (B, T), generator=g)
        else:
            y = torch.randint(0, n_cls, (B,), generator=g)
        return ids, y

    return f


ZOO: list[ZooCase] = [
    ZooCase("mlp", lambda: MLP(), _dense((10,), 5), tags={"linear", "fast"}),
    ZooCase("linear3d", lambda: TokenMLP(), _dense_tokens(5, 8, 6), token_loss, tags={"linear"}),
    ZooCase("matmul_bmm", lambda: MatmulParams(), _dense((5, 8), 4)),
    ZooCase("conv1d", lambda: Conv1dNet(), _dense((4, 11), 5), tags={"conv"}),
    ZooCase("conv2d", lambda: Conv2dNet(), _dense((3, 9, 8), 5), tags={"conv"}),
    ZooCase("conv3d", lambda: Conv3dNet(), _dense((2, 4, 6, 6), 4), tags={"conv"}),
    ZooCase("conv_transpose", lambda: ConvTransposeNet(), _dense((3, 5, 4), 5), tags={"conv"}),
    ZooCase("bilinear", lambda: BilinearNet(), _dense((6,), 3)),
    ZooCase("embedding_bag", lambda: EmbeddingBag(), _ids(7, 20, n_cls=4, pad_frac=0.25), tags={"embedding"}),
    ZooCase("embedding_bags", lambda: Bags(), _ids(7, 20, n_cls=4, pad_frac=0.25), tags={"embedding"}),
    ZooCase("lookup_tables", lambda: LookupTables(), _ids(7, 20, n_cls=4), tags={"embedding"}),
    ZooCase("long_tokens", lambda: LongTokens(), _ids(70, 20, pad_frac=0.25), token_loss, tags={"embedding"}),
    ZooCase("layernorm", lambda: LayerNormNet(), _dense_tokens(4, 8, 4), token_loss),
    ZooCase("groupnorm", lambda: GroupNormNet(), _dense((3, 6, 6), 4)),
    ZooCase("instance_norm", lambda: InstanceNormNet(), _dense((3, 6, 6), 4), tags={"conv"}),
    ZooCase("rmsnorm", lambda: RMSNormNet(), _dense_tokens(4, 8, 4), token_loss),
    ZooCase("norm_layouts", lambda: NormLayoutsNet(), _dense_tokens(4, 8, 4), token_loss),
    ZooCase("weight_norm", lambda: WeightNormNet(), _dense((4, 6), 4)),
    ZooCase("along_dims", lambda: AlongDims(), _dense((6,), 4)),
    ZooCase("recurrent", lambda: Recurrent(), _dense((3, 6), 4)),
    ZooCase("constants_over_batch", lambda: ConstantsOverBatch(), _dense((6, 8), 4)),
    ZooCase("last_token_pool", lambda: LastTokenPool(), _ids(7, 20, n_cls=3, pad_frac=0.3), tags={"embedding"}),
    ZooCase("eos_pool", lambda: EosPool(), _eos_ids(7, 20, n_cls=3), tags={"embedding"}),
    ZooCase("masked_tokens", lambda: MaskedTokenLM(), _masked_labels(9, 16), summed_loss, tags={"embedding"}),
    ZooCase("masked_tokens_flat", lambda: MaskedTokenLM(flat=True), _masked_labels(9, 16), summed_loss),
    ZooCase("masked_rows_head", lambda: MaskedTokenLM(layers_after=True), _masked_labels(9, 16), summed_loss),
    ZooCase("chunk_scan", lambda: ChunkScan(), _dense((2, 4, 4, 4), 3)),
    ZooCase("task_routed", lambda: TaskRouted(), _tasks(5, 6, 3, 4)),
    ZooCase("normed_shared_table", lambda: NormedSharedTable(), _dense((4, 8), 3)),
    ZooCase("learned_query_pool", lambda: LearnedQueryPool(), _dense((5, 8), 3), tags={"attention"}),
    ZooCase("frame_conv", lambda: FrameConv(), _dense((2, 2, 6, 6), 3), tags={"conv"}),
    ZooCase("triangular_solves", lambda: TriangularSolves(), _dense((4, 6), 3)),
    ZooCase("constrained_weights", lambda: ConstrainedWeights(), _dense((6,), 3)),
    ZooCase("in_place_shared_query", lambda: InPlaceSharedQuery(), _dense((5, 8), 3)),
    ZooCase("shared_position_tables", lambda: SharedPositionTables(), _dense((6, 8), 3)),
    ZooCase("flat_rows_group_norm", lambda: FlatRowsGroupNorm(), _dense((5, 4), 3)),
    ZooCase(
        "masked_rows_head_flat", lambda: MaskedTokenLM(flat=True, layers_after=True), _masked_labels(9, 16), summed_loss
    ),
    ZooCase("masked_mean_flat", lambda: MaskedTokenLM(flat=True, mean=True), _masked_labels(9, 16, 3), rows_mean_loss),
    ZooCase(
        "masked_rows_head_mean",
        lambda: MaskedTokenLM(layers_after=True, mean=True),
        _masked_labels(9, 16, 3),
        rows_mean_loss,
    ),
    ZooCase("mha_tmajor", lambda: MHANet(batch_first=False), _dense((5, 8), 4), tags={"attention"}),
    ZooCase("mha_batch_first", lambda: MHANet(batch_first=True), _dense((5, 8), 4), tags={"attention"}),
    ZooCase("gpt", lambda: TinyGPT(), _ids(8, 32), token_loss, tags={"gpt", "embedding"}),
    ZooCase("gpt_tied", lambda: TinyGPT(tied=True), _ids(8, 32), token_loss, tags={"gpt", "embedding"}),
    ZooCase("gpt_checkpointed", lambda: TinyGPT(checkpointed=True), _ids(8, 32), token_loss, tags={"gpt"}),
    ZooCase("cls_scale", lambda: ClsScaleNet(), _dense((4, 8), 4)),
    ZooCase("frozen", lambda: FrozenMLP(), _dense((10,), 5)),
    ZooCase("vit", lambda: TinyViT(), _dense((3, 8, 8), 5), tags={"attention", "conv"}),
    ZooCase("vit_qkv_unbind", lambda: QkvUnbindViT(), _dense((3, 8, 8), 5), tags={"attention", "conv"}),
    ZooCase("two_views", lambda: TwoViews(), _dense((10,), 5)),
    ZooCase("convnext", lambda: TinyConvNeXt(), _dense((3, 8, 8), 5), tags={"conv"}),
    ZooCase("swin", lambda: TinySwin(), _dense((3, 6, 6), 5), tags={"attention", "conv"}),
    ZooCase("gathered_experts", lambda: GatheredExperts(), _dense((5, 6), 5)),
    ZooCase("routed_row_experts", lambda: RoutedRowExperts(), _dense((5, 6), 5)),
    ZooCase("resnet_gn", lambda: ResNetGN(), _dense((3, 8, 8), 5), tags={"conv"}),
    ZooCase("hf_gpt2", lambda: HFGPT2(), _ids(8, 64), token_loss, tags={"gpt", "hf"}, available=has_transformers),
    ZooCase("encoder_ids", lambda: EncoderIds(), _ids(9, 20, n_cls=4, pad_frac=0.25), tags={"embedding"}),
    ZooCase("hf_bert", lambda: HFText("bert"), _ids(8, 64, n_cls=3), tags={"hf"}, available=has_transformers),
    ZooCase("hf_roberta", lambda: HFText("roberta"), _ids(8, 64, 3, 0.2), tags={"hf"}, available=has_transformers),
    ZooCase("hf_llama", lambda: HFText("llama"), _ids(8, 64), token_loss, tags={"hf"}, available=has_transformers),
    ZooCase("hf_opt", lambda: HFText("opt"), _ids(8, 64), token_loss, tags={"hf"}, available=has_transformers),
]

# More transformers families, checked with -m slow only (each is another ~10 s compile).
HF_MORE: list[ZooCase] = (
    [
        ZooCase(f"hf_{n}", lambda n=n: HFText(n), _ids(8, 64, n_cls=3), tags={"hf"}, available=has_transformers)
        for n in ("albert", "electra", "distilbert")
    ]
    + [
        ZooCase(f"hf_{n}", lambda n=n: HFText(n), _ids(8, 64), token_loss, tags={"hf"}, available=has_transformers)
        for n in ("mistral", "mixtral", "dbrx", "switch", "ctrl", "phi", "gpt_neox", "qwen3_next", "gemma3n")
    ]
    + [
        ZooCase("hf_t5_encoder", lambda: HFEncoderHead("t5", 3), _ids(8, 64, n_cls=3), available=has_transformers),
        ZooCase("hf_vit", lambda: HFEncoderHead("vit", 5), _dense((3, 8, 8), 5), available=has_transformers),
        ZooCase("hf_t5", lambda: HFText("t5"), _ids(8, 64), token_loss, tags={"hf"}, available=has_transformers),
        ZooCase("hf_llama_lora", lambda: HFLoRA(), _ids(8, 64), token_loss, available=has_peft),
        ZooCase("hf_bart_cls", lambda: HFText("bart_cls"), _eos_ids(8, 64, n_cls=3), available=has_transformers),
        ZooCase("hf_wav2vec2", lambda: HFSpeech("wav2vec2", 3), _dense((400,), 3), available=has_transformers),
        ZooCase("hf_modernbert_sparse", HFSparseMLM, _masked_labels(8, 64), summed_loss, available=has_transformers),
        ZooCase("hf_xmod", HFXmod, _lang_ids(8, 64, 3, 3), available=has_transformers),
        ZooCase("hf_llama_checkpointed", HFCheckpointed, _ids(8, 64), token_loss, available=has_transformers),
        ZooCase("hf_hubert", lambda: HFSpeech("hubert", 3), _dense((400,), 3), available=has_transformers),
        ZooCase("hf_wavlm", lambda: HFSpeech("wavlm", 3), _dense((400,), 3), available=has_transformers),
        ZooCase("hf_sew_d", lambda: HFSpeech("sew_d", 3), _dense((400,), 3), available=has_transformers),
        # pools the last non-pad token: h[arange(B), last]
        ZooCase(
            "hf_llama_cls", lambda: HFText("llama_cls"), _ids(8, 64, 3, 0.2), tags={"hf"}, available=has_transformers
        ),
    ]
)

BY_NAME: dict[str, ZooCase] = {c.name: c for c in ZOO + HF_MORE}

_TORCH = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])


def version_marks(name: str) -> list[Any]:
    """pytest marks for cases a torch version refuses (a checked refusal, never a wrong gradient):
    torch 2.11 traces SEW-D's XSoftmax backward, applied to zero tangents, into the forward graph,
    and its sums over the batch read as batch mixing there (2.12 to 2.14 trace it in the backward)."""
    if name == "hf_sew_d" and _TORCH < (2, 12):
        import pytest

        from grapefx.errors import BatchMixingError

        return [pytest.mark.xfail(raises=BatchMixingError, strict=True, reason="torch 2.11: see version_marks")]
    return []


def case(name: str) -> ZooCase:
    return BY_NAME[name]


def dynamo_graph_count() -> int:
    """Graphs Dynamo has compiled so far in this process (monotone; use differences)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
