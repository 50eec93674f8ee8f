"""Map the inputs of a Dynamo graph to parameters, buffers and batch inputs (by Dynamo source)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.fx as fx

from grapefx.analysis.layout import to_sym


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
    """`names` maps id(parameter) to its name in the user's model (given by grapefx.compile)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    infos: list[InputInfo] = []
    batch_size = None
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
            if batch_size is None and ex.dim() > 0:
                batch_size = _dim0(node, ex)
        infos.append(InputInfo(i, name, kind))
    final = []
    for info, node, ex in zip(infos, placeholders, example_inputs):
        if info.kind == "candidate":
            is_batch = ex.dim() > 0 and sympy.expand(_dim0(node, ex) - batch_size) == 0
            info = InputInfo(info.index, info.name, "batch" if is_batch else "other")
        final.append(info)
    if batch_size is None:
        batch_size = sympy.Integer(1)
    return Capture(tuple(final), batch_size)


def _dim0(node: fx.Node, ex: torch.Tensor) -> Any:
    val = node.meta.get("example_value")
    if isinstance(val, torch.Tensor):
        return to_sym(val.shape[0])
    return to_sym(ex.shape[0])
