"""GrapeAdamW / GrapeSGD: moments of projected weights are r × n (or m × r), not m × n.

For a weight privatized by strategy="grape", the backward stashes the privatized projected gradient
Ĝ (r × n for Ĝ = P G, m × r for Ĝ = G Pᵀ). These optimizers keep their moments at Ĝ's shape, compute
the update there, back-project it with the same P (regenerated from its seed, never stored) and apply
decoupled weight decay to W. p.grad (the dense back-projection Pᵀ Ĝ) is ignored for such weights;
every other parameter is updated exactly like torch.optim.AdamW / SGD from p.grad.

When P is resampled (every `resample_every` steps) the moments are kept, as GaLore does: they are
carried into the new subspace unchanged. This keeps the step size continuous; the first steps after a
resample mix directions of two subspaces, which in practice is benign (GaLore / DP-GRAPE).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from grapefx.grape.projection import projection_matrix
from grapefx.grape.registry import owner


def _projected(p: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]] | None:
    """(Ĝ, back_project) for a projected parameter with a fresh stashed gradient, else None."""
    found = owner(p)
    if found is None:
        return None
    state, name = found
    ghat = state.projected_grads.pop(name, None)
    if ghat is None:
        return None
    info = state.projected[name]
    block = state.projection_blocks.get(info["index"], 0)
    P = projection_matrix(state.projection_seed, block, info["index"], info["rank"], info["dim"], p.device, p.dtype)
    if info["rows"]:
        return ghat, lambda u: P.t() @ u
    return ghat, lambda u: u @ P


class GrapeAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid GrapeAdamW hyper-parameters lr={lr} betas={betas} eps={eps} wd={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                proj = _projected(p)
                if proj is None and p.grad is None:
                    continue
                grad, back = proj if proj is not None else (p.grad, lambda u: u)
                st = self.state[p]
                if not st or st["exp_avg"].shape != grad.shape:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(grad)
                    st["exp_avg_sq"] = torch.zeros_like(grad)
                st["step"] += 1
                m, v, t = st["exp_avg"], st["exp_avg_sq"], st["step"]
                m.mul_(b1).add_(grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                update = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt_().add_(eps))
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(back(update), alpha=-lr)
        return loss


class GrapeSGD(torch.optim.Optimizer):
    def __init__(
        self, params: Iterable[Any], lr: float = 1e-2, momentum: float = 0.0, weight_decay: float = 0.0
    ) -> None:
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"invalid GrapeSGD hyper-parameters lr={lr} momentum={momentum} wd={weight_decay}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                proj = _projected(p)
                if proj is None and p.grad is None:
                    continue
                grad, back = proj if proj is not None else (p.grad, lambda u: u)
                if mom:
                    st = self.state[p]
                    buf = st.get("momentum_buffer")
                    if buf is None or buf.shape != grad.shape:
                        buf = st["momentum_buffer"] = grad.clone()
                    else:
                        buf.mul_(mom).add_(grad)
                    grad = buf
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(back(grad), alpha=-lr)
        return loss


__all__ = ["GrapeAdamW", "GrapeSGD"]
