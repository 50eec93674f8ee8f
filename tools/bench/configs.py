"""Training-step builders, one per configuration name.

    np-eager | np-inductor             non-private: the model as is | torch.compile(model)
    gx-<codegen>[-<variant>]           grapefx.compile(..., codegen=eager|inductor); variant: (none) =
                                       strategy "auto" (BK), ghost, instantiate, perlayer (clipping
                                       "per_layer"), grape<r> (strategy "grape", rank r, with
                                       GrapeAdamW / GrapeSGD), minmem (memory_policy "min-memory"),
                                       nonoise (sigma = 0: clipping alone, to separate its cost from the noise)
    opacus-hooks | opacus-ghost        Opacus PrivacyEngine, grad_sample_mode "hooks" | "ghost" (ghost
                                       clipping: two backward passes, DPLossFastGradientClipping)
    func-vmap                          torch.func by hand: vmap(grad(functional_call)) per-sample grads,
                                       flat clip, sum, Gaussian noise, then the optimizer

Every private configuration: flat clipping C=1 (unless perlayer), σ=1, mean loss (the sum of clipped
per-sample gradients plus noise, divided by B). Optimizer: SGD lr 1e-3, or Adam lr 1e-4 for the cases
in tools.models.ADAM_CASES. A step = zero_grad(set_to_none=True), forward, loss, backward, opt.step().
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tools.models import ADAM_CASES, GPT, Case

C, SIGMA = 1.0, 1.0
PEERS = ("opacus-hooks", "opacus-ghost", "func-vmap")


@dataclass
class Trainer:
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    step: Callable[[], torch.Tensor]  # one training step; returns the loss
    private: bool


def _optimizer(case: Case, params, grape: bool = False) -> torch.optim.Optimizer:  # noqa: ANN001
    adam = case.name in ADAM_CASES
    if grape:
        from grapefx.optim import GrapeAdamW, GrapeSGD

        return GrapeAdamW(params, lr=1e-4, weight_decay=0.0) if adam else GrapeSGD(params, lr=1e-3)
    return torch.optim.Adam(params, lr=1e-4) if adam else torch.optim.SGD(params, lr=1e-3)


def _plain_step(fwd, opt, case: Case, x, y) -> Callable[[], torch.Tensor]:  # noqa: ANN001
    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = case.loss_fn(fwd(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def grapefx_kwargs(variant: str) -> dict:
    kw: dict = {"strategy": "auto", "clipping": "flat"}
    if variant in ("ghost", "instantiate"):
        kw["strategy"] = variant
    elif variant == "perlayer":
        kw["clipping"] = "per_layer"
    elif variant.startswith("grape"):
        kw.update(strategy="grape", rank=int(variant[len("grape") :]))
    elif variant == "twopass":  # flat clipping in two backward passes (activation checkpointing)
        kw["two_pass"] = True
    elif variant == "minmem":
        kw["memory_policy"] = "min-memory"
    elif variant == "nonoise":  # sigma = 0: the cost of clipping alone, without the Gaussian draws
        kw["noise_multiplier"] = 0.0
    elif variant not in ("", "auto"):
        raise ValueError(f"unknown grapefx variant {variant!r}")
    return kw


def _opacus(case: Case, x, y, mode: str) -> Trainer:  # noqa: ANN001
    from opacus import PrivacyEngine

    model = case.model
    if isinstance(model, GPT):
        model.batched_pos_ids = True  # Opacus needs the batch dim first in every layer input
    opt = _optimizer(case, model.parameters())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=x.shape[0])
    common = dict(
        module=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=SIGMA,
        max_grad_norm=C,
        poisson_sampling=False,
        grad_sample_mode=mode,
    )
    if mode == "hooks":
        dp_model, dp_opt, _ = PrivacyEngine().make_private(**common)
        return Trainer(model, dp_opt, _plain_step(dp_model, dp_opt, case, x, y), True)
    crit = torch.nn.CrossEntropyLoss(reduction="mean")
    dp_model, dp_opt, dp_crit, _ = PrivacyEngine().make_private(**common, criterion=crit)

    def step() -> torch.Tensor:
        dp_opt.zero_grad(set_to_none=True)
        out = dp_model(x)
        if out.dim() == 3:  # token loss; the privacy unit is the sequence
            loss = dp_crit(out.reshape(-1, out.shape[-1]), y.reshape(-1), shape=out.shape)
        else:
            loss = dp_crit(out, y)
        loss.backward()  # Opacus: norm pass, then the clipped-loss pass
        dp_opt.step()
        return loss.detach()

    return Trainer(model, dp_opt, step, True)


def _func_vmap(case: Case, x, y) -> Trainer:  # noqa: ANN001
    from torch.func import functional_call, grad_and_value, vmap

    model = case.model
    opt = _optimizer(case, model.parameters())
    buffers = dict(model.named_buffers())
    gen = torch.Generator(device=x.device).manual_seed(0)

    def loss_one(params, xi, yi):  # noqa: ANN001, ANN202 - one sample's loss
        return case.loss_fn(functional_call(model, (params, buffers), (xi[None],)), yi[None])

    per_sample = vmap(grad_and_value(loss_one), in_dims=(None, 0, 0))

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
        grads, losses = per_sample(params, x, y)
        sq = sum(g.flatten(1).pow(2).sum(1) for g in grads.values())
        clip = (C / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        B = x.shape[0]
        for p, g in zip(model.parameters(), grads.values(), strict=True):
            noise = torch.randn(p.shape, generator=gen, device=p.device) * (SIGMA * C)
            p.grad = (torch.einsum("b,b...->...", clip, g) + noise) / B
        del grads
        opt.step()
        return losses.mean().detach()

    return Trainer(model, opt, step, True)


def build(case: Case, config: str, device: str = "cpu") -> Trainer:
    """The training step of `config` on `case` (model and batch moved to `device`)."""
    import grapefx

    model = case.model.to(device)
    x, y = case.x.to(device), case.y.to(device)
    if config == "np-eager":
        opt = _optimizer(case, model.parameters())
        return Trainer(model, opt, _plain_step(model, opt, case, x, y), False)
    if config == "np-inductor":
        opt = _optimizer(case, model.parameters())
        return Trainer(model, opt, _plain_step(torch.compile(model), opt, case, x, y), False)
    if config in ("opacus-hooks", "opacus-ghost"):
        return _opacus(case, x, y, config.split("-")[1])
    if config == "func-vmap":
        return _func_vmap(case, x, y)
    kind, codegen, *rest = config.split("-")
    if kind != "gx" or codegen not in ("eager", "inductor"):
        raise ValueError(f"unknown configuration {config!r}")
    kw = grapefx_kwargs(rest[0] if rest else "")
    sigma = kw.pop("noise_multiplier", SIGMA)
    fwd = grapefx.compile(
        model, max_grad_norm=C, noise_multiplier=sigma, loss_reduction="mean", codegen=codegen, seed=0, **kw
    )
    opt = _optimizer(case, model.parameters(), grape=kw["strategy"] == "grape")
    return Trainer(model, opt, _plain_step(fwd, opt, case, x, y), True)
