"""The `grapefx` command: look at what grapefx does to a model's backward graph.

grapefx transform examples/models.py:mlp --input "float32[8,784]" --out dump/ --format code,table,svg,onnx
grapefx inspect   examples/models.py:gpt_small --input "int64[8,128]"
grapefx inspect   examples/models.py:gpt_small --input "int64[8,128]" --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from typing import Any

EXIT_OK, EXIT_COMPILER, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3

_DESCRIPTION = """\
Compile a model with grapefx (per-sample clipping + noise in the backward graph), run one
forward/backward on example inputs, and show what the DP rewrite did.

  transform  write the graphs before and after the rewrite (code, node table, DOT/SVG, ONNX)
  inspect    one row per trainable parameter: rule, norm method (ghost / instantiate) and why,
             plus an estimate of the backward's peak memory, non-private vs private

MODEL is FILE.py:FACTORY or package.module:FACTORY. The factory returns an nn.Module (inputs come
from --input) or a tuple (module, example_inputs, loss_fn) with loss_fn(output) -> scalar.

environment:
  GRAPEFX_DUMP_DIR      when set, every backward grapefx compiles during training is dumped to
                        DIR/state<ID>_graph<N>/ (same files as `transform`)
  GRAPEFX_DUMP_FORMATS  formats for those dumps, default code,table,dot

exit status: 0 ok, 1 grapefx cannot make the model private (message on stderr), 2 bad command
line / model spec / privacy option, 3 internal error. Add --debug for tracebacks and torch's warnings.
"""

_TRANSFORM = """\
Write the graphs a model goes through, one file per stage and format, into --out:

  00_forward            AOTAutograd forward graph
  01_backward_original  backward graph before the DP rewrite (grad sites highlighted)
  02_backward_private   backward graph after the DP rewrite (inserted nodes coloured)
  summary.txt / .json   what the rewrite added and removed (op counts, grapefx ops), estimated
                        peak memory, per-parameter rules and norm methods, ONNX check results

formats (--format, comma-separated, or all):
  code   readable Python (STAGE.py)
  table  one node per line: name, op, target, shape, batch layout, status, provenance (STAGE.table.txt)
  dot    Graphviz DOT (STAGE.dot)
  svg    rendered with Graphviz `dot` if it is on PATH (STAGE.svg); DOT only otherwise
  onnx   the private backward with the noise as explicit standard-normal inputs, specialized to
         the example batch size (02_backward_private.onnx), checked with onnx.checker and run with
         onnxruntime against torch; ops without an ONNX form are named and the other formats written

Which nodes count as inserted / rewritten is a heuristic (structural matching against the original
backward; see grapefx/inspect/diff.py).
"""

_EXAMPLES = """\
examples:
  grapefx inspect   examples/models.py:mlp --input "float32[8,784]"
  grapefx inspect   examples/models.py:gpt_small --input "int64[8,128]" --json
  grapefx transform examples/models.py:mlp --input "float32[8,784]" --out dump/ --format code,table,svg,onnx
  grapefx inspect   examples/models.py:regression --clipping per_layer     # factory returns a triple
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="FILE.py:FACTORY or package.module:FACTORY")
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="DTYPE[SHAPE]",
        help="one per forward argument, batch in dim 0: float32[8,784], int64[8,128], int64[8,128]:512 "
        "(integers drawn from [0, 512); default: [0, smallest nn.Embedding size) or [0, 2))",
    )
    p.add_argument(
        "--loss",
        default="auto",
        choices=("auto", "ce", "mse", "sum"),
        help="loss on the output; auto: cross-entropy vs random labels for [B, C] / [B, T, V] outputs, "
        "else mse (mean of squares); sum: sum of the output (default auto; a factory's loss_fn wins)",
    )
    g = p.add_argument_group("privacy / compile options (grapefx.compile)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping bound C (default 1.0)")
    g.add_argument("--noise-multiplier", type=float, default=1.0, help="sigma: noise std is sigma*C (default 1.0)")
    g.add_argument(
        "--clipping", default="flat", choices=("flat", "per_layer", "group", "automatic"), help="default flat"
    )
    g.add_argument(
        "--clip-groups",
        default=None,
        help="with --clipping group: 'module' (one group per module), or groups of parameter name patterns, "
        "groups separated by ';', patterns by ',' (e.g. 'embed.*;blocks.*,head.*')",
    )
    g.add_argument(
        "--strategy",
        default="auto",
        choices=("auto", "ghost", "instantiate", "grape"),
        help="per-sample norm method: auto picks per layer by cost (default auto)",
    )
    g.add_argument("--rank", type=int, default=16, help="DP-GRAPE projection rank (--strategy grape); default 16")
    g.add_argument("--resample-every", type=int, default=200, help="DP-GRAPE: steps between projections")
    g.add_argument("--codegen", default="eager", choices=("eager", "inductor"), help="default eager")
    g.add_argument("--loss-reduction", default="mean", choices=("mean", "sum"), help="default mean")
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds torch before the factory runs (weights, inputs, labels) and grapefx's noise (default 0)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks and torch warnings")


def build_parser() -> argparse.ArgumentParser:
    from grapefx import __version__

    parser = argparse.ArgumentParser(
        prog="grapefx", description=_DESCRIPTION, epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"grapefx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser(
        "transform",
        help="write the graphs before/after the DP rewrite",
        description=_TRANSFORM,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(t)
    t.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    t.add_argument(
        "--format", default="code,table,svg", metavar="LIST", help="comma-separated (default code,table,svg)"
    )
    t.set_defaults(func=cmd_transform)

    i = sub.add_parser(
        "inspect",
        help="per-parameter rules and norm methods, memory estimate",
        description="One row per trainable parameter: name, shape, rule (the kind of op that sums its "
        "gradient over the batch), method (ghost / instantiate) and why; then totals and the estimated "
        "peak memory of the backward, non-private vs private (a static liveness estimate, not a measurement).",
    )
    _common(i)
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.set_defaults(func=cmd_inspect)
    return parser


# -- running a model ---------------------------------------------------------------------------
def compile_and_run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import grapefx
    from grapefx.inspect.loader import UsageError, build_model, default_loss, first_tensor

    torch.manual_seed(args.seed)
    loaded = build_model(args.model, args.input)
    if not any(p.requires_grad for p in loaded.module.parameters()):
        raise UsageError(f"{args.model!r} has no trainable parameters: nothing to privatize")
    batch = loaded.inputs[0].shape[0] if loaded.inputs and loaded.inputs[0].dim() > 0 else None
    pm = grapefx.compile(
        loaded.module,
        max_grad_norm=args.max_grad_norm,
        noise_multiplier=args.noise_multiplier,
        loss_reduction=args.loss_reduction,
        clipping=args.clipping,
        clip_groups=_clip_groups(args.clip_groups),
        strategy=args.strategy,
        codegen=args.codegen,
        rank=args.rank,
        resample_every=args.resample_every,
        seed=args.seed,
    )
    loaded.module.train()
    started = time.perf_counter()
    _progress("compiling the forward graph (Dynamo + AOTAutograd)...")
    out = pm(*loaded.inputs)
    if loaded.loss_fn is not None:
        loss_name, loss_fn = "factory loss_fn", loaded.loss_fn
    else:
        loss_name, loss_fn = default_loss(args.loss, args.loss_reduction, first_tensor(out))
    loss = loss_fn(out)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise UsageError("the loss must be a scalar tensor")
    _progress("compiling the private backward (DP rewrite)...")
    loss.backward()
    _progress(f"compiled in {time.perf_counter() - started:.1f}s")
    return {
        "pm": pm,
        "module": loaded.module,
        "inputs": loaded.input_specs,
        "batch_size": batch,
        "loss": loss_name,
    }


def _clip_groups(spec: str | None) -> str | list[list[str]] | None:
    """--clip-groups: 'module', or 'a.*,b.*;c.*' (groups by ';', patterns by ',')."""
    if spec is None or spec == "module":
        return spec
    return [[p.strip() for p in group.split(",") if p.strip()] for group in spec.split(";")]


def _progress(message: str) -> None:
    """Progress of long compiles on an interactive stderr (stdout stays clean for --json and pipes;
    logs and scripts see only results and errors)."""
    if sys.stderr.isatty():
        print(f"grapefx: {message}", file=sys.stderr, flush=True)


def _report_info(args: argparse.Namespace, run: dict[str, Any]) -> dict[str, Any]:
    keys = ("inputs", "batch_size", "module", "loss")
    return {"model": args.model, **{k: run[k] for k in keys}}


def cmd_inspect(args: argparse.Namespace) -> int:
    from grapefx.inspect.graphs import current_plan
    from grapefx.inspect.loader import UsageError
    from grapefx.inspect.report import build_report, format_report

    run = compile_and_run(args)
    backend = run["pm"].grapefx_backend
    if current_plan(backend) is None:
        raise UsageError(
            f"no per-parameter plan for batch size {run['batch_size']}: grapefx compiles B=0 and B=1 on a "
            "special path without per-layer rules; use a batch of at least 2"
        )
    report = build_report(backend, **_report_info(args, run))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(format_report(report), end="")
    return EXIT_OK


def cmd_transform(args: argparse.Namespace) -> int:
    from grapefx.inspect.dumps import dump_private_module, format_summary, parse_formats
    from grapefx.inspect.loader import UsageError

    try:
        formats = parse_formats(args.format)
    except ValueError as e:
        raise UsageError(str(e)) from None
    run = compile_and_run(args)
    info = _report_info(args, run)
    res = dump_private_module(run["pm"], args.out, formats, **info)
    print(format_summary(res.summary, res.notes), end="")
    print("\nwrote:")
    for f in res.files:
        print(f"  {f}")
    return EXIT_OK


# -- errors -----------------------------------------------------------------------------------
def _find_grapefx_error(exc: BaseException) -> BaseException | None:
    from grapefx.errors import GrapefxError

    seen = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, GrapefxError):
            return e
        stack.extend([getattr(e, "inner_exception", None), e.__cause__, e.__context__])
    return None


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Hide torch's warnings and log chatter for the duration of a command (restored after)."""
    if not enabled:
        yield
        return
    names = ("torch", "torch._dynamo", "torch._inductor", "torch.onnx", "onnxscript", "grapefx")
    levels = {n: logging.getLogger(n).level for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    from grapefx.inspect.loader import UsageError

    try:
        with _quiet(not args.debug):
            return args.func(args)
    except UsageError as e:
        if args.debug:
            traceback.print_exc()
        print(f"grapefx: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BaseException as e:  # noqa: BLE001 - one clear message, traceback only with --debug
        if isinstance(e, SystemExit):
            raise
        if args.debug:
            traceback.print_exc()
        found = _find_grapefx_error(e)
        if found is not None:
            from grapefx.errors import ConfigError

            print(f"grapefx: error: {found}", file=sys.stderr)
            return EXIT_USAGE if isinstance(found, ConfigError) else EXIT_COMPILER
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"grapefx: internal error: {type(e).__name__}: {msg}", file=sys.stderr)
        if not args.debug:
            print("(run again with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
