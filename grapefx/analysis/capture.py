"""Map the inputs of a Dynamo graph to parameters, buffers and batch inputs (by Dynamo source)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.fx as fx

from grapefx.analysis.layout import to_sym
from grapefx.errors import GrapefxError


@dataclass(frozen=True)
class InputInfo:
    index: int  # position among the graph's inputs (= AOTAutograd primal index)
    name: str  # readable name: "layer1.0.weight" for parameters, "x" for arguments
    kind: str  # "param" | "frozen_param" | "buffer" | "batch" | "other" | "symint"


@dataclass(frozen=True)
class Capture:
    inputs: tuple[InputInfo, ...]
    batch_size: Any  # sympy expression (a symbol, or an integer for specialized graphs)

    @property
    def params(self) -> list[InputInfo]:
        return [i for i in self.inputs if i.kind == "param"]


def readable_source(source_name: str) -> str:
    """L['self']._modules['layer1']._modules['0']._parameters['weight'] -> layer1.0.weight"""
    name = re.sub(r"^[LG]\['([^']*)'\]", r"\1", source_name)
    name = re.sub(r"\._(modules|parameters|buffers)\['([^']*)'\]", r".\2", name)
    name = re.sub(r"\['([^']*)'\]", r".\1", name)
    name = re.sub(r"\[(\d+)\]", r".\1", name)
    name = re.sub(r"^(self|fn|mod|model|module)\.", "", name)
    return name


def capture_inputs(gm: fx.GraphModule, example_inputs: list[Any], names: dict[int, str] | None = None) -> Capture:
    """`names` maps id(parameter) to its name in the user's model (given by grapefx.compile).

    The batch size is dim 0 of the compiled function's tensor arguments: a tensor the graph reads
    from a global or a module attribute (a constant [1, T] prompt expanded over the batch) is not a
    batch input, even when it comes first. Taken from such a tensor, the batch size would be
    its dim 0 (1 for that prompt), and grapefx would clip the whole batch as one sample."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    infos: list[InputInfo] = []
    sources: list[str] = []
    for i, (node, ex) in enumerate(zip(placeholders, example_inputs)):
        grapharg = node.meta.get("grapharg")
        src = grapharg.source.name if grapharg is not None and grapharg.source is not None else node.name
        name = (names or {}).get(id(ex)) or readable_source(src)
        if not isinstance(ex, torch.Tensor):
            kind = "symint"
        elif isinstance(ex, torch.nn.Parameter) or "_parameters[" in src:
            kind = "param" if ex.requires_grad else "frozen_param"
        elif "_buffers[" in src:
            kind = "buffer"
        else:
            kind = "candidate"
        infos.append(InputInfo(i, name, kind))
        sources.append(src)
    batch_size = _batch_size(infos, sources, placeholders, example_inputs)
    final = []
    for info, node, ex in zip(infos, placeholders, example_inputs):
        if info.kind == "candidate":
            is_batch = ex.dim() > 0 and sympy.expand(_dim0(node, ex) - batch_size) == 0
            info = InputInfo(info.index, info.name, "batch" if is_batch else "other")
        final.append(info)
    return Capture(tuple(final), batch_size)


def _is_argument(source: str) -> bool:
    """A local of the compiled frame other than `self`: an argument of forward (or of the function)."""
    return source.startswith("L[") and not source.startswith("L['self']")


def _batch_size(infos: list[InputInfo], sources: list[str], placeholders: list[fx.Node], inputs: list[Any]) -> Any:
    """dim 0 of the first tensor argument whose dim 0 is dynamic (else of the first tensor argument;
    without arguments, of the first other non-parameter tensor)."""
    candidates = [
        (info.name, src, _dim0(node, ex))
        for info, src, node, ex in zip(infos, sources, placeholders, inputs)
        if info.kind == "candidate" and ex.dim() > 0
    ]
    if not candidates:
        return sympy.Integer(1)
    chosen = [c for c in candidates if _is_argument(c[1])] or candidates
    # Tensor arguments whose dim 0 are different symbols: which one is the batch is ambiguous, and
    # taking the wrong one would clip the wrong rows. Refuse, naming them.
    symbolic = {size: name for name, _, size in reversed(chosen) if not isinstance(size, sympy.Integer)}
    if len(symbolic) > 1:
        listed = ", ".join(f"`{name}` ({size})" for size, name in symbolic.items())
        raise GrapefxError(
            "grapefx takes the batch size from dim 0 of the model's tensor arguments, but they differ "
            f"there: {listed}. Pass only batch tensors (batch in dim 0) as arguments; keep other "
            "tensors as module attributes or buffers."
        )
    return next((size for _, _, size in chosen if not isinstance(size, sympy.Integer)), chosen[0][2])


def _dim0(node: fx.Node, ex: torch.Tensor) -> Any:
    val = node.meta.get("example_value")
    if isinstance(val, torch.Tensor):
        return to_sym(val.shape[0])
    return to_sym(ex.shape[0])
