"""The norm-method cost model's device term: a fresh per-sample buffer costs page faults on CPU."""

from __future__ import annotations

import torch

import grapefx
from grapefx.rules.registry import fresh_memory_weight, mm_extra_costs
from tests.oracle import assert_grads_match, oracle_grads


def test_fresh_pages_tip_cpu_towards_ghost_norms() -> None:
    """M3's qkv Linear (256 -> 768 on 128 tokens): instantiating its [B, 768, 256] gradient costs
    fewer flop-equivalents than ghost norms without the fresh-page cost (CUDA), more with it (CPU,
    measured ~40 ms per M3 step). At 512 tokens (M4) instantiation stays cheaper on both."""
    assert fresh_memory_weight("cuda") == 0.0 < fresh_memory_weight("cpu")
    ghost, inst, fits = mm_extra_costs(128, 768, 256, fresh_memory_weight("cpu"))
    assert fits and ghost < inst
    ghost, inst, _ = mm_extra_costs(128, 768, 256, fresh_memory_weight("cuda"))
    assert inst < ghost
    ghost, inst, _ = mm_extra_costs(512, 768, 256, fresh_memory_weight("cpu"))
    assert inst < ghost


class Qkv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(256, 768)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qkv(x)


def test_cpu_plan_uses_the_device_cost() -> None:
    """The rule reads the site's device: on CPU the qkv geometry above gets ghost norms, exactly."""
    torch.manual_seed(0)
    model = Qkv()
    x, y = torch.randn(3, 128, 256), torch.randn(3, 128, 768)

    def loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ((out - t) ** 2).sum()

    pm = grapefx.compile(model, max_grad_norm=1.0, noise_multiplier=0.0, loss_reduction="sum")
    loss(pm(x), y).backward()
    choices = pm.grapefx_backend.plans[-1].choices
    assert [c.method for _, c in choices["qkv.weight"]] == ["ghost"]
    ref, _ = oracle_grads(model, (x, y), loss, 1.0, "sum")
    assert_grads_match(model, ref)


def test_large_expert_tables_get_ghost_norms() -> None:
    """Expert weights gathered per token: instantiating means a whole [E, f, d] table per sample, the
    ghost norm a Gram over the sample's rows masked to equal experts; with 32 experts the plan picks
    ghost for the rank-1 rows (both orientations), and the gradients match the oracle."""
    from tests.zoo import GatheredExperts

    torch.manual_seed(0)
    model = GatheredExperts(d=32, f=64, n_experts=32)
    x, y = torch.randn(3, 5, 6), torch.randint(0, 5, (3,))

    def loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(out, t, reduction="sum")

    pm = grapefx.compile(model, max_grad_norm=1.0, noise_multiplier=0.0, loss_reduction="sum")
    loss(pm(x), y).backward()
    choices = pm.grapefx_backend.plans[-1].choices
    assert [c.method for _, c in choices["up"]] == ["ghost"]
    assert [c.method for _, c in choices["down"]] == ["ghost"]
    ref, _ = oracle_grads(model, (x, y), loss, 1.0, "sum")
    assert_grads_match(model, ref)
