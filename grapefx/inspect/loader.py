"""Command-line model loading: `file.py:factory` / `package.module:factory`, `--input` specs, losses."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

LOSSES = ("auto", "ce", "mse", "sum")


class UsageError(ValueError):
    """A bad command line (model spec, input spec, loss): exit status 2, no traceback."""


@dataclass
class LoadedModel:
    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    loss_fn: Callable[[Any], torch.Tensor] | None  # None: pick one from the output (`default_loss`)
    input_specs: list[str]


# -- model spec -------------------------------------------------------------------------------
def load_factory(spec: str) -> Any:
    """`path/to/file.py:name` or `package.module:name` -> the named object."""
    if ":" not in spec:
        raise UsageError(f"model spec {spec!r} must be FILE.py:FACTORY or package.module:FACTORY")
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise UsageError(f"model spec {spec!r} must be FILE.py:FACTORY or package.module:FACTORY")
    if where.endswith(".py") or os.sep in where or "/" in where:
        path = os.path.abspath(where)
        if not os.path.isfile(path):
            raise UsageError(f"model file {where!r} not found (from {spec!r})")
        mod_name = "_grapefx_user_" + re.sub(r"\W", "_", path)
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise UsageError(f"cannot import {where!r} as Python")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module  # dataclasses / pickling look the module up
        sys.path.insert(0, os.path.dirname(path))  # sibling imports of the model file
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            raise UsageError(f"importing {where!r} failed: {type(e).__name__}: {e}") from e
        finally:
            sys.path.remove(os.path.dirname(path))
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise UsageError(f"cannot import module {where!r} (from {spec!r}): {e}") from None
    if not hasattr(module, name):
        public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise UsageError(f"{where!r} has no {name!r}; callables there: {', '.join(public) or 'none'}")
    return getattr(module, name)


def build_model(spec: str, input_specs: list[str]) -> LoadedModel:
    obj = load_factory(spec)
    if isinstance(obj, nn.Module):
        made = obj
    elif callable(obj):
        try:
            made = obj()
        except Exception as e:
            raise UsageError(f"calling the factory {spec!r} failed: {type(e).__name__}: {e}") from e
    else:
        raise UsageError(f"{spec!r} is neither an nn.Module nor a factory returning one")
    if isinstance(made, nn.Module):
        if not input_specs:
            raise UsageError(f"{spec!r} returns a module: give its inputs with --input, e.g. --input 'float32[8,784]'")
        inputs = tuple(make_input(parse_input(s), made) for s in input_specs)
        return LoadedModel(made, inputs, None, list(input_specs))
    if isinstance(made, tuple) and len(made) in (2, 3) and isinstance(made[0], nn.Module):
        module, inputs = made[0], made[1]
        loss_fn = made[2] if len(made) == 3 else None
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
        inputs = tuple(inputs)
        if not all(isinstance(x, torch.Tensor) for x in inputs):
            raise UsageError(f"{spec!r}: example_inputs must be a tensor or a tuple of tensors")
        specs = [describe_tensor(x) for x in inputs]
        return LoadedModel(module, inputs, loss_fn, specs)
    raise UsageError(
        f"{spec!r} returned {type(made).__name__}; a factory must return an nn.Module or a "
        "(module, example_inputs, loss_fn) tuple"
    )


# -- inputs -----------------------------------------------------------------------------------
_INPUT = re.compile(r"^\s*([A-Za-z0-9_]+)\s*\[\s*([0-9,\s]*)\]\s*(?::\s*(\d+))?\s*$")


@dataclass(frozen=True)
class InputSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]
    high: int | None  # integer inputs: values in [0, high)


def parse_input(text: str) -> InputSpec:
    """`float32[8,784]`, `int64[8,128]`, `int64[8,128]:512` (integers drawn from [0, 512))."""
    m = _INPUT.match(text)
    if not m:
        raise UsageError(f"--input {text!r}: expected DTYPE[D0,D1,...] such as float32[8,784] or int64[8,128]:512")
    dtype_name, dims, high = m.groups()
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        raise UsageError(
            f"--input {text!r}: unknown dtype {dtype_name!r} (float32, float64, bfloat16, int64, bool, ...)"
        )
    shape = tuple(int(d) for d in dims.replace(" ", "").split(",") if d)
    if not shape:
        raise UsageError(f"--input {text!r}: needs at least the batch dimension")
    return InputSpec(dtype, shape, int(high) if high else None)


def make_input(spec: InputSpec, module: nn.Module) -> torch.Tensor:
    if spec.dtype.is_floating_point or spec.dtype.is_complex:
        return torch.randn(spec.shape, dtype=spec.dtype)
    if spec.dtype == torch.bool:
        return torch.randint(0, 2, spec.shape).bool()
    high = spec.high
    if high is None:
        # Token ids: stay inside the smallest embedding table; without one, 0/1 are safe indices.
        sizes = [m.num_embeddings for m in module.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
        high = min(sizes) if sizes else 2
    return torch.randint(0, high, spec.shape, dtype=spec.dtype)


def describe_tensor(x: torch.Tensor) -> str:
    return f"{str(x.dtype).replace('torch.', '')}[{','.join(str(s) for s in x.shape)}]"


# -- losses -----------------------------------------------------------------------------------
def first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = out.get("logits", next(iter(out.values()), None))
        return first_tensor(out)
    if isinstance(out, (list, tuple)) and out:
        return first_tensor(out[0])
    raise UsageError(
        f"the model returned {type(out).__name__}, not a tensor: return (module, inputs, loss_fn) from the factory"
    )


def default_loss(kind: str, reduction: str, seed_out: torch.Tensor) -> tuple[str, Callable[[Any], torch.Tensor]]:
    """A loss for `--loss` (auto / ce / mse / sum) with the given reduction; labels are random.

    auto: cross-entropy vs random int labels for floating outputs shaped [B, C] (classes) or
    [B, T, V] (tokens, flattened), else mse. mse: mean (sum) of squares of the output, i.e. MSE
    against a zero target. sum: the sum of the output (divided by B for reduction mean).
    """
    out = seed_out
    if kind == "auto":
        kind = "ce" if out.is_floating_point() and out.dim() in (2, 3) and out.shape[-1] > 1 else "mse"
    if kind == "ce":
        if out.dim() not in (2, 3):
            raise UsageError(f"--loss ce needs an output shaped [B, C] or [B, T, V], got {list(out.shape)}")
        labels = torch.randint(0, out.shape[-1], out.shape[:-1])

        def ce(o: Any) -> torch.Tensor:
            o = first_tensor(o)
            return F.cross_entropy(o.reshape(-1, o.shape[-1]).float(), labels.reshape(-1), reduction=reduction)

        return "ce", ce
    if kind == "mse":

        def mse(o: Any) -> torch.Tensor:
            o = first_tensor(o).float()
            return o.pow(2).sum() if reduction == "sum" else o.pow(2).mean()

        return "mse", mse
    if kind == "sum":

        def total(o: Any) -> torch.Tensor:
            o = first_tensor(o).float()
            return o.sum() if reduction == "sum" else o.sum() / o.shape[0]

        return "sum", total
    raise UsageError(f"--loss {kind!r}: choose from {', '.join(LOSSES)}")
