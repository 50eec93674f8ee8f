"""Real torchvision / timm models, built from their own constructors with random weights, against the
torch.func oracle (the same check as tests/test_zoo_oracle.py: float64 reference, noise off, some
samples clipped, batch sizes 3, 1, 6 through one compiled module), twice per model:
- float64 model (eager codegen) against the float64 oracle at rtol 2e-6: a rule error shows at any
  depth, float32 rounding does not (norms accumulate in float32, hence not 1e-12);
- float32 model per codegen at rtol 1e-5, or twice the model's own float32 rounding where that is
  larger (`float32_floor`: plain PyTorch against float64, same codegen, the worst parameter at any
  of the batch sizes checked). Deep CNNs exceed 1e-5 without any DP. Twice: a clipped sample's
  gradient carries its own rounding plus that of the clip factor C/‖g‖, whose norm inherits the
  rounding of the parameters that dominate it (up to the worst one's).

Not part of the test suite: PyPI's torchvision does not import beside the CPU torch 2.13 that CI uses
(README). Run it in an environment that has both, e.g. on this project's machine:

    python3 -m venv /tmp/v214 && /tmp/v214/bin/pip install torch==2.14.1 torchvision==0.29.1 timm
    /tmp/v214/bin/pip install -e ".[test]" && /tmp/v214/bin/python -m tools.ecosystem_check

BatchNorm models go through `grapefx.replace_batch_norm` first (their unchanged form is refused,
and that refusal is checked too); dropout and stochastic depth are set to 0 so that the oracle sees
the same function, and zero-initialized weight matrices get small random values (a zero head gives
every sample the same norm, and the check needs some samples clipped and some not).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import grapefx  # noqa: E402
from tests.test_zoo_oracle import SIZES, run_against_oracle  # noqa: E402
from tests.zoo import ZooCase, _dense, class_loss  # noqa: E402


def _no_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if type(m).__name__ in ("StochasticDepth", "DropPath"):  # torchvision / timm
            for attr in ("p", "drop_prob"):
                if hasattr(m, attr):
                    setattr(m, attr, 0.0)
    return model


def _fixed(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        model = _no_dropout(build())
        grapefx.replace_batch_norm(model)
        with torch.no_grad():  # zero-initialized heads (torchvision's ViT) make every sample's norm equal
            for p in model.parameters():
                if p.dim() > 1 and not p.any():
                    p.normal_(0, 0.02)
        return model

    return make


Case = tuple[str, Callable[[], nn.Module], Callable, bool]  # name, constructor, inputs, has BatchNorm


def _torchvision_cases() -> list[Case]:
    import torchvision.models as tvm
    from torchvision.models.vision_transformer import VisionTransformer

    img = _dense((3, 32, 32), 10)

    def vit() -> nn.Module:
        return VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
        )

    return [
        ("tv_resnet18", lambda: tvm.resnet18(num_classes=10), img, True),
        ("tv_mobilenet_v3_small", lambda: tvm.mobilenet_v3_small(num_classes=10), img, True),
        ("tv_efficientnet_b0", lambda: tvm.efficientnet_b0(num_classes=10), img, True),
        ("tv_convnext_tiny", lambda: tvm.convnext_tiny(num_classes=10), img, False),
        ("tv_vit", vit, img, False),
        ("tv_swin_t", lambda: tvm.swin_t(num_classes=10), _dense((3, 64, 64), 10), False),
    ]


def _timm_cases() -> list[Case]:
    import timm
    from timm.layers import GroupNormAct
    from timm.models.mlp_mixer import MlpMixer

    img = _dense((3, 32, 32), 10)

    def create(name: str, **kw) -> Callable[[], nn.Module]:
        return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kw)

    vit = dict(img_size=32, patch_size=8, depth=2)
    return [
        ("timm_vit_tiny", create("vit_tiny_patch16_224", **vit), img, False),
        ("timm_deit_tiny", create("deit_tiny_patch16_224", **vit), img, False),
        ("timm_resnet18", create("resnet18"), img, True),
        ("timm_convnext_atto", create("convnext_atto"), img, False),
        (
            "timm_mixer",
            lambda: MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=64),
            img,
            False,
        ),
        # timm's BatchNormAct2d fuses the activation: build with its GroupNorm counterpart instead
        ("timm_efficientnet_b0", create("efficientnet_b0", norm_layer=partial(GroupNormAct, num_groups=8)), img, False),
    ]


# grapefx accumulates per-sample norms in (at least) float32, so a float64 model's clip factors, and
# with them its gradients, are exact to ~1e-7 relative
F64_RTOL = 1e-9


def _as_float64(inputs: Callable) -> Callable:
    def f(B: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = inputs(B, g)
        return x.double(), y

    return f


def float32_floor(zc: ZooCase, codegen: str, sizes: tuple[int, ...] = SIZES) -> float:
    """The model's own float32 rounding: the worst per-parameter relative error of plain PyTorch's
    mean-loss gradient (eager, or torch.compile with Inductor) against float64, over the batch sizes
    the oracle check runs. Deep CNNs exceed 1e-5 without any DP (MobileNetV3: 1.3e-5 eager, 2.5e-5
    Inductor; torchvision's EfficientNet-B0: 2.1e-5 eager)."""
    model = zc.make()
    run = model if codegen == "eager" else torch.compile(model)
    worst = 0.0
    for B in sizes:
        x, y = zc.batch(B)
        ref_model = copy.deepcopy(model).double()
        class_loss(ref_model(x.double()), y, "mean").backward()
        model.zero_grad(set_to_none=True)
        class_loss(run(x), y, "mean").backward()
        for p, r in zip(model.parameters(), ref_model.parameters()):
            if r.grad is not None:
                err = (p.grad.double() - r.grad).norm().item() / max(r.grad.norm().item(), 1e-3)
                worst = max(worst, err)
    return worst


def _unfixed_is_refused(build: Callable[[], nn.Module], inputs: Callable) -> str:
    """The model as its constructor builds it (BatchNorm kept): grapefx must refuse it, naming the fix."""
    model = _no_dropout(build())
    x, y = ZooCase("raw", build, inputs).batch(3)
    try:
        class_loss(grapefx.compile(model, noise_multiplier=0.0)(x), y, "mean").backward()
    except grapefx.BatchMixingError as e:
        named = "replace_batch_norm" in str(e) and "BatchNorm" in str(e)
        return f"refused, naming the module and the fix: {str(e)[:110]}..." if named else f"UNCLEAR: {e}"
    return "NOT REFUSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codegens", default="eager,inductor")
    parser.add_argument("--only", default="", help="comma-separated case names")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()
    cases = _torchvision_cases() + _timm_cases()
    if args.only:
        cases = [c for c in cases if c[0] in args.only.split(",")]
    import timm
    import torchvision

    meta = {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__}
    print(meta)
    rows = []
    for name, build, inputs, has_bn in cases:
        zc = ZooCase(name, _fixed(build), inputs)
        zc64 = ZooCase(name, lambda build=build: _fixed(build)().double(), _as_float64(inputs))
        try:
            row = {"model": name, "params": sum(p.numel() for p in zc.make().parameters())}
        except Exception as e:  # a constructor this timm / torchvision version does not have
            rows.append({"model": name, "build": f"FAIL {type(e).__name__}: {e}"})
            print(rows[-1], flush=True)
            continue
        if has_bn:
            row["unchanged"] = _unfixed_is_refused(build, inputs)
        try:  # float64 model and oracle: rule errors stand out from float32 rounding
            start = time.time()
            run_against_oracle(zc64, reduction="mean", codegen="eager", rtol=F64_RTOL)
            row["float64"] = f"ok at rtol {F64_RTOL:.0e} ({time.time() - start:.0f} s)"
        except Exception as e:
            row["float64"] = f"FAIL {type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        for codegen in args.codegens.split(","):
            start = time.time()
            try:
                floor = float32_floor(zc, codegen)
                rtol = max(1e-5, 2 * floor)  # grapefx within twice the model's own float32 rounding
                run_against_oracle(zc, reduction="mean", codegen=codegen, rtol=rtol)
                row[codegen] = (
                    f"ok at rtol {rtol:.1e} (non-private float32 error {floor:.1e}; {time.time() - start:.0f} s)"
                )
            except Exception as e:  # report and go on: this is a survey
                row[codegen] = f"FAIL {type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
        print(row, flush=True)
        rows.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
