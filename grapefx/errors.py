"""Errors grapefx raises. Every message names the culprit (module / parameter / aten op) and a fix."""

from __future__ import annotations


class GrapefxError(RuntimeError):
    """Base class: the model cannot be made private as written."""


class BatchMixingError(GrapefxError):
    """An op combines values of different samples, so per-sample gradients do not exist."""


class UnsupportedOpError(GrapefxError):
    """No rule and no fallback can derive per-sample gradients through this op."""


class GraphBreakError(GrapefxError):
    """The model did not compile to one graph; clipping split over graphs would be wrong."""


class ConfigError(GrapefxError, ValueError):
    """A privacy or compile option is invalid."""


def describe_node(node) -> str:  # noqa: ANN001 - torch.fx.Node, kept untyped to avoid import cost
    """Human-readable location of an fx node: aten op plus the module it came from, when known."""
    target = getattr(node.target, "__name__", str(node.target))
    where = module_path(node)
    return f"aten op `{target}`" + (f" in module `{where}`" if where else "")


def module_path(node) -> str:  # noqa: ANN001
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, cls = list(stack.values())[-1]
        cls_name = getattr(cls, "__name__", str(cls)).split(".")[-1]
        return f"{_clean_path(path)} ({cls_name})"
    fwd = node.meta.get("fwd_nn_module_stack") or {}
    if fwd:
        path, cls = list(fwd.values())[-1]
        return f"{_clean_path(path)} ({getattr(cls, '__name__', str(cls)).split('.')[-1]})"
    return ""


def _clean_path(path: str) -> str:
    # Dynamo writes paths such as "L['self'].layer1[0].bn1"; users know "layer1.0.bn1".
    import re

    path = re.sub(r"^L\['[^']*'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    return path.strip(".") or "<root>"
