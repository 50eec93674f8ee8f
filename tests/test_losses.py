"""grapefx.losses: per-sample token means for padded targets, the DP-safe form of a mean token loss.

Against the oracle (each sample's loss = the mean over its own valid targets) with the loss outside
and inside the compiled module, and the remove-one bound that the batch-wide mean breaks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import grapefx
from grapefx.losses import per_sample_token_mean, sequence_cross_entropy
from tests.oracle import assert_grads_match, oracle_grads
from tests.zoo import LossInside, TinyGPT

C = 0.05  # small enough that every sample is clipped: the bound is attained


def _padded_batch(B: int, T: int = 8, vocab: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and next-token targets with different amounts of padding per sample; the last sample
    (when B > 2) has none left at all."""
    g = torch.Generator().manual_seed(B)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    y = torch.randint(0, vocab, (B, T), generator=g)
    for i in range(B):
        y[i, T - (i % T) :] = -100
    if B > 2:
        y[-1] = -100
    return ids, y


def test_value_is_the_mean_of_per_sample_means() -> None:
    logits, (_, y) = torch.randn(3, 8, 32), _padded_batch(3)
    per_sample = []
    for i in range(3):
        keep = y[i] != -100
        per_sample.append(F.cross_entropy(logits[i][keep], y[i][keep]) if keep.any() else torch.tensor(0.0))
    expected = torch.stack(per_sample)
    torch.testing.assert_close(sequence_cross_entropy(logits, y, reduction="sum"), expected.sum())
    torch.testing.assert_close(sequence_cross_entropy(logits, y), expected.mean())
    assert sequence_cross_entropy(logits[:0], y[:0]).item() == 0.0  # B = 0: no NaN


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        per_sample_token_mean(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="loss_reduction"):
        per_sample_token_mean(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), reduction="none")
    with pytest.raises(ValueError, match="last class dim"):
        sequence_cross_entropy(torch.zeros(2, 32, 8), torch.zeros(2, 8, dtype=torch.long))


def _seq_ce(reduction: str):
    return lambda out, y, r: sequence_cross_entropy(out, y, reduction=r)


@pytest.mark.parametrize("where,reduction", [("outside", "mean"), ("inside", "sum")])
def test_padded_token_loss_matches_the_oracle(where: str, reduction: str) -> None:
    torch.manual_seed(0)
    model = TinyGPT()
    ref_model = TinyGPT()
    ref_model.load_state_dict(model.state_dict())
    module = model if where == "outside" else LossInside(model, _seq_ce(reduction), reduction)
    pm = grapefx.compile(module, max_grad_norm=C, noise_multiplier=0.0, loss_reduction=reduction)
    for B in (4, 1, 5):  # one compiled module, several sizes, samples with little or no valid target
        ids, y = _padded_batch(B)
        model.zero_grad()
        loss = sequence_cross_entropy(pm(ids), y, reduction=reduction) if where == "outside" else pm(ids, y)
        loss.backward()
        ref, norms = oracle_grads(
            ref_model, (ids, y), lambda out, yy: sequence_cross_entropy(out, yy, reduction="sum"), C, reduction
        )
        assert_grads_match(model, ref)


def test_remove_one_moves_the_sum_by_at_most_c() -> None:
    """The property the batch-wide mean over valid targets breaks (README: ignore_index)."""
    torch.manual_seed(0)
    model = TinyGPT()
    pm = grapefx.compile(model, max_grad_norm=C, noise_multiplier=0.0, loss_reduction="sum")
    ids, y = _padded_batch(6)

    def grads(keep: list[int]) -> torch.Tensor:
        model.zero_grad()
        sequence_cross_entropy(pm(ids[keep]), y[keep], reduction="sum").backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    full = grads(list(range(6)))
    moves = [(full - grads([j for j in range(6) if j != i])).norm().item() for i in range(5)]
    assert max(moves) <= C * (1 + 1e-4), moves
    assert max(moves) >= C * 0.99  # attained: each of these samples is clipped
