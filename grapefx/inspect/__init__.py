"""Looking inside a compiled model: graph dumps (code, node table, DOT/SVG, ONNX), the per-parameter
rule report of `grapefx inspect`, and a static peak-memory estimate.

    from grapefx.inspect import dump_private_module, build_report
    res = dump_private_module(pm, "dump/", ["code", "table", "svg", "onnx"])   # after one backward

Set `GRAPEFX_DUMP_DIR` to dump every backward grapefx compiles while training (`dump_from_env`).
"""

from grapefx.inspect.dumps import FORMATS, DumpResult, dump_from_env, dump_private_module, parse_formats
from grapefx.inspect.memory import MemoryEstimate, estimate_peak
from grapefx.inspect.report import build_report, format_report

__all__ = [
    "FORMATS",
    "DumpResult",
    "MemoryEstimate",
    "build_report",
    "dump_from_env",
    "dump_private_module",
    "estimate_peak",
    "format_report",
    "parse_formats",
]
