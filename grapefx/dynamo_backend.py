"""The torch.compile backend: capture, AOTAutograd wiring, the DP pipeline, codegen.

Dynamo graph ──capture──► AOTAutograd (core-aten decompositions, min-cut partitioner)
    forward compiler:  batch layouts + refusal of batch-mixing forwards, then codegen
    backward compiler: privatize_backward (sites → norms → clip → book-keeping → noise), codegen
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import warnings
from collections.abc import Callable
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import min_cut_rematerialization_partition

from grapefx.analysis.bag_layout import BagOffsets
from grapefx.analysis.capture import Capture, capture_inputs
from grapefx.analysis.forward_checks import check_forward, refuse_batch_norms
from grapefx.analysis.indexing_layout import BatchIndex, masked_selections
from grapefx.analysis.layout import UNKNOWN, BatchLayout, LayoutResult, accepted_row_counts, analyze_layouts
from grapefx.analysis.row_independence import rowwise_selections
from grapefx.analysis.state_updates import check_state_updates, nodes_reading_the_batch
from grapefx.config import PrivacyConfig
from grapefx.decompositions import decomposition_table
from grapefx.distributed.wrap import check_backend_call
from grapefx.errors import GrapefxError, GraphBreakError, describe_node
from grapefx.grape import registry as grape_registry
from grapefx.inductor_cache import salted_config
from grapefx.inspect.dumps import dump_from_env
from grapefx.passes.degenerate_batches import empty_batch_backward, single_sample_backward
from grapefx.passes.equal_count_checks import guard_masked_rows
from grapefx.passes.grape_project import projection_index
from grapefx.passes.interp import ViewTolerantInterpreter
from grapefx.passes.loss_checks import guard_mean_losses
from grapefx.passes.noise_in_place import lower_for_execution
from grapefx.passes.pad_masked_rows import pad_masked_row_sites
from grapefx.passes.privatize_backward import BackwardPlan, privatize_backward
from grapefx.passes.recompute_operands import find_recipes
from grapefx.passes.schedule_memory import schedule_memory
from grapefx.passes.tracing import retrace
from grapefx.passes.two_pass import checkpointing_hint, wants_two_passes
from grapefx.passes.zero_tangents import checking_zero_tangents, fold_zero_tangents
from grapefx.privacy.adaptive_clipping import ClipBoundState
from grapefx.privacy.noise import PrivacyState  # registers the grapefx:: ops
from grapefx.schedule.reorder import copy_graph_module
from grapefx.transformers_compat import unprepared_hint

log = logging.getLogger("grapefx")
aten = torch.ops.aten


def _configure_torch() -> None:
    # Traps that give silently wrong gradients (see DESIGN.md): a cached graph compiled for another
    # privacy config, and Inductor donating buffers of a rewritten backward.
    torch._functorch.config.enable_autograd_cache = False
    if hasattr(torch._functorch.config, "donated_buffer"):
        torch._functorch.config.donated_buffer = False
    # Every grapefx.compile of a model class adds cache entries for the same forward code object
    # (one per privacy config and per B in {0, 1, >=2}); the default limit of 8 is soon hit.
    dyn = torch._dynamo.config
    for name, floor in (("recompile_limit", 64), ("cache_size_limit", 64), ("accumulated_recompile_limit", 1024)):
        if hasattr(dyn, name) and getattr(dyn, name) < floor:
            setattr(dyn, name, floor)
    eager_backward_log = logging.getLogger("torch._functorch._aot_autograd.graph_compile")
    if not any(isinstance(f, _DeferredRefusalFilter) for f in eager_backward_log.filters):
        eager_backward_log.addFilter(_DeferredRefusalFilter())


class _DeferredRefusalFilter(logging.Filter):
    """With dynamic shapes AOTAutograd compiles the backward inside the forward's compile and, when
    that fails, logs the whole traceback as a warning and tries again at the backward call. A grapefx
    refusal is raised there, with its message; the logged copy before it is noise, dropped here."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, GrapefxError)


def _unfused_rnns(gm: fx.GraphModule) -> contextlib.AbstractContextManager:
    """While AOTAutograd traces a graph with an RNN / GRU / LSTM: oneDNN and cuDNN off, so aten's
    recurrent ops decompose into per-step matmuls (one grad site per time step) instead of the fused
    `mkldnn_rnn_layer` / `_cudnn_rnn`, whose backward has no per-sample form. Only the trace sees the
    flags; the compiled graph holds plain aten ops."""
    names = ("lstm", "gru", "rnn_tanh", "rnn_relu")
    if not any(n.op == "call_function" and getattr(n.target, "__name__", "") in names for n in gm.graph.nodes):
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.backends.mkldnn.flags(enabled=False))
    stack.enter_context(torch.backends.cudnn.flags(enabled=False))
    return stack


def _require_one_graph() -> None:
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except Exception:  # noqa: BLE001 - not under Dynamo (direct call): nothing to check
        return
    if tx is None:
        return
    if getattr(tx, "one_graph", False) or getattr(tx, "error_on_graph_break", False):
        return
    raise GraphBreakError(
        "grapefx needs the whole model (and loss, if compiled) in one graph: per-sample clipping "
        "split over several graphs would clip each part separately. Use grapefx.compile(...) or "
        "torch.compile(..., backend=grapefx.backend(...), fullgraph=True)"
        + (
            " (for a Hugging Face transformers model, call grapefx.prepare(model) before torch.compile)."
            if "transformers" in sys.modules
            else "."
        )
    )


class GrapefxBackend:
    """One instance per compiled model: holds the privacy config and run-time state."""

    def __init__(
        self, config: PrivacyConfig, state: PrivacyState | None = None, model: torch.nn.Module | None = None
    ) -> None:
        self.config = config
        # Parameter names as the user's model spells them (Dynamo sources add prefixes like `fn.`).
        self.param_names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        self.param_objects: dict[str, torch.Tensor] = {}
        self.state = state or PrivacyState(
            seed=config.seed, secure=config.secure_noise, clip=ClipBoundState.from_config(config)
        )
        self.state.resample_every = config.resample_every
        self.state.projection_seed = config.seed if config.seed is not None else self.state.id
        self.managed = False  # set by PrivateModule (grapefx.compile), which owns the distributed set-up
        self.plans: list[BackwardPlan] = []
        self.graphs: dict[str, fx.GraphModule] = {}
        # Tests / tools set this to keep a clone of the next backward call's inputs (to replay the
        # graph alone, e.g. to measure its memory) in `captured_inputs`.
        self.capture_backward_inputs = False
        self.captured_inputs: list[Any] | None = None
        self.refusal: GrapefxError | None = None  # the last backward compile's refusal (see bw_compiler)
        _configure_torch()

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        check_backend_call(self.config.distributed, self.managed)  # DDPOptimizer / wrong DDP order
        _require_one_graph()
        capture = capture_inputs(gm, example_inputs, self.param_names)
        self.param_objects = {info.name: ex for info, ex in zip(capture.inputs, example_inputs) if info.kind == "param"}
        self.state.param_names = [p.name for p in capture.params]
        shared: dict[str, Any] = {}

        def fw_compiler(fw_gm: fx.GraphModule, fw_inputs: list[Any]) -> Callable[..., Any]:
            self._analyze_forward(fw_gm, capture, shared)
            # a mean over ignore_index-padded targets raises at run time
            guard_mean_losses(fw_gm, shared.get("forward_layouts", {}))
            # x[mask] read per sample: every sample must select as many rows, checked at run time
            guard_masked_rows(
                fw_gm, shared.get("guarded_rows", {}), shared.get("forward_layouts", {}), shared.get("returned_rows")
            )
            self.graphs["forward"] = fw_gm
            return self._codegen(fw_gm, fw_inputs, is_backward=False)

        def bw_compiler(bw_gm: fx.GraphModule, bw_inputs: list[Any]) -> Callable[..., Any]:
            self.graphs["backward_original"] = bw_gm
            try:
                new_gm = self._privatize(bw_gm, bw_inputs, capture, shared)
            except GrapefxError as e:
                hint = unprepared_hint(shared.get("culprit_modules", []))
                if hint and e.args and isinstance(e.args[0], str):
                    e.args = (e.args[0] + hint, *e.args[1:])
                # torch compiles a dynamic-shape backward eagerly inside the forward's compile and
                # defers its errors to the backward call; on torch 2.14 a guard failure in between
                # (the batch size specialized by the very op refused here) would hide this message.
                self.refusal = e
                raise
            self.graphs["backward"] = new_gm
            dump_from_env(self)  # GRAPEFX_DUMP_DIR set: dump this backward's graphs (never raises)
            backward = self._capturing(self._codegen(new_gm, bw_inputs, is_backward=True))
            if shared.get("checked_tangents"):
                backward = checking_zero_tangents(backward, shared["checked_tangents"])
            return backward

        def inference_compiler(gm_: fx.GraphModule, inputs: list[Any]) -> Callable[..., Any]:
            return self._codegen(gm_, inputs, is_backward=False)

        with _unfused_rnns(gm):
            return aot_autograd(
                fw_compiler=fw_compiler,
                bw_compiler=bw_compiler,
                inference_compiler=inference_compiler,
                decompositions=decomposition_table(),
                partition_fn=min_cut_rematerialization_partition,
                keep_inference_input_mutations=True,
            )(gm, example_inputs)

    # -- forward ---------------------------------------------------------------------------------
    def _analyze_forward(self, fw_gm: fx.GraphModule, capture: Capture, shared: dict[str, Any]) -> None:
        placeholders = [n for n in fw_gm.graph.nodes if n.op == "placeholder"]
        seeds = {
            ph.name: BatchLayout(0, sympy.Integer(1), sympy.Integer(1))
            for ph, info in zip(placeholders, capture.inputs)
            if info.kind == "batch"
        }
        shared["batch"] = capture.batch_size
        if capture.batch_size == 0:
            return
        layouts = analyze_layouts(fw_gm, capture.batch_size, seeds)
        if capture.batch_size != 1:
            refuse_batch_norms(layouts)
        # before the mixing checks: a buffer updated from a batch mean would read as a mixed loss
        check_state_updates(fw_gm, capture, _mutated_input_outputs())
        if capture.batch_size != 1:
            # one sample cannot be mixed with another, and its graph's size-1 batch dim is ambiguous
            # (a bmm lowering's view that drops size-1 dims reads as a batch reduction): the B=1
            # backward clips the whole gradient (degenerate_batches); B >= 2 graphs are checked
            check_forward(fw_gm, layouts)
        shared["forward_culprits"] = tuple(describe_node(n) for n in layouts.unknown_ops)
        shared["culprit_modules"] = [
            cls for n in layouts.unknown_ops for _, cls in (n.meta.get("nn_module_stack") or {}).values()
        ]
        shared["forward_layouts"] = layouts.layouts
        shared["masked_rows"] = layouts.masked_rows
        shared["checked_rows"] = accepted_row_counts(layouts, capture.batch_size)
        outputs = list(fw_gm.graph.output_node().args[0])
        # x[mask] rows used one by one (a masked-token loss) are per sample whatever each sample's
        # count; the others are read as B equal blocks, checked on every step
        uses = rowwise_selections(
            fw_gm, layouts.layouts, layouts.masked_rows, layouts.batch_reductions, _user_outputs(outputs)
        )
        shared["guarded_rows"] = {n: v for n, v in layouts.masked_rows.items() if n not in uses.rowwise}
        shared["returned_rows"] = uses.returned
        shared["saved"] = {n.name: _saved_seed(n, layouts) for n in outputs if isinstance(n, fx.Node)}
        shared["tangent_layouts"] = _tangent_layouts(outputs, layouts.layouts)
        shared["zero_tangents"] = _hidden_mutation_tangents()
        # outputs computed from parameters alone (a weight a deprecated weight_norm hook stores)
        reads_batch = nodes_reading_the_batch(fw_gm, capture)
        shared["parameter_only_tangents"] = {
            k: describe_node(o)
            for k, o in enumerate(_tangent_outputs(outputs))
            if isinstance(o, fx.Node) and o not in reads_batch
        }
        available = {n.name for n in fw_gm.graph.nodes if n.op == "placeholder"} | set(shared["saved"])
        shared["recipes"] = find_recipes(fw_gm, available)  # for recompute-after-barrier

    # -- backward --------------------------------------------------------------------------------
    def _privatize(
        self, bw_gm: fx.GraphModule, bw_inputs: list[Any], capture: Capture, shared: dict[str, Any]
    ) -> fx.GraphModule:
        n_out = len(bw_gm.graph.output_node().args[0])
        params = [(i.index, i.name) for i in capture.params if i.index < n_out]
        if capture.batch_size in (0, 1):
            self._register_projections(bw_gm, params)
            build = empty_batch_backward if capture.batch_size == 0 else single_sample_backward
            return build(bw_gm, bw_inputs, params, self.config, self.state.id)
        seeds: dict[str, Any] = {}
        tangents = [n for n in bw_gm.graph.nodes if n.op == "placeholder" and n.name.startswith("tangents")]
        tangent_layouts = shared["tangent_layouts"]
        if len(tangents) != len(tangent_layouts):
            raise GrapefxError(
                f"grapefx could not match the {len(tangents)} backward tangents to the forward outputs "
                f"({len(tangent_layouts)} candidates); please report this model."
            )
        for ph in bw_gm.graph.nodes:
            if ph.op == "placeholder" and ph.name in shared["saved"]:
                seeds[ph.name] = shared["saved"][ph.name]
        for t, lay in zip(tangents, tangent_layouts):
            seeds[t.name] = lay
        # a parameter changed through .data / under no_grad in the forward: its tangent is zero; an
        # output computed from parameters alone (a weight a deprecated weight_norm hook stores on
        # its module) gets none unless the user differentiates it, checked at run time
        zero = {tangents[k].name for k in shared.get("zero_tangents", ())}
        described = {tangents[k].name: where for k, where in shared.get("parameter_only_tangents", {}).items()}
        parameter_only = set(described) - zero
        if zero or parameter_only:  # AOTAutograd's graph is left as it handed it over
            bw_gm = copy_graph_module(bw_gm)
        checked = fold_zero_tangents(bw_gm, zero, parameter_only)
        placeholders = [n for n in bw_gm.graph.nodes if n.op == "placeholder"]
        shared["checked_tangents"] = {i: described[ph.name] for i, ph in enumerate(placeholders) if ph.name in checked}
        checked_rows = shared.get("checked_rows", {})
        # layers applied to x[mask] rows: their sites read the rows padded to [B·T]; a refused site
        # hides the ones behind it (its input gradient is unknown), hence rounds until none is left
        while checked_rows:
            padded = pad_masked_row_sites(bw_gm, analyze_layouts(bw_gm, shared["batch"], seeds, checked_rows))
            if padded is None:
                break
            bw_gm = padded
        # the graph the DP rewrite reads (its plan's nodes), for `grapefx transform` / `inspect`
        self.graphs["backward_original"] = bw_gm

        def plan_with(config: PrivacyConfig) -> tuple[fx.GraphModule, BackwardPlan, Any]:
            def build(
                ghost: frozenset[str], instantiate: frozenset[str] = frozenset()
            ) -> tuple[fx.GraphModule, BackwardPlan]:
                return privatize_backward(
                    bw_gm,
                    bw_inputs,
                    seeds,
                    shared["batch"],
                    params,
                    config,
                    self.state.id,
                    ghost,
                    instantiate,
                    shared.get("forward_culprits", ()),
                    checked_rows,
                )

            return schedule_memory(build, bw_gm, config, shared.get("recipes"))

        new_gm, plan, memory_plan = plan_with(self.config)
        if wants_two_passes(bw_gm, self.config, memory_plan.peak):
            # min-memory / an unmet budget under activation checkpointing: plan the two-pass
            # backward too, and keep it if it peaks lower (it is refused without per-sample tangents)
            with contextlib.suppress(GrapefxError):
                two = plan_with(dataclasses.replace(self.config, two_pass=True))
                if two[2].peak < memory_plan.peak:
                    two[2].notes.append(f"two passes (one pass: estimated peak {memory_plan.peak} bytes)")
                    new_gm, plan, memory_plan = two
        plan.memory = memory_plan
        two_pass = self.config.two_pass or any(n.startswith("two passes") for n in memory_plan.notes)
        hint = checkpointing_hint(bw_gm, memory_plan.peak, memory_plan.original_peak, two_pass, self.config.clipping)
        if hint:
            warnings.warn(hint, stacklevel=2)
        self.plans.append(plan)
        self.state.param_names = [g.name for g in plan.grads]  # columns of per_layer_norms()
        for name, proj in plan.projections.items():
            info = {"index": proj.index, "rank": proj.rank, "dim": proj.dim, "rows": proj.rows}
            self._register_projection(name, info)
        return new_gm

    def _register_projections(self, bw_gm: fx.GraphModule, params: list[tuple[int, str]]) -> None:
        """B=0/1 graphs project by shape alone (same P and index as the B>=2 graph)."""
        outputs = bw_gm.graph.output_node().args[0]
        for index, name in params:
            if name in set(self.config.grape_params or ()) and outputs[index] is not None:
                m, n = outputs[index].meta["val"].shape
                rows = m <= n
                stable = projection_index(name, self.config)
                info = {"index": stable, "rank": self.config.rank, "dim": m if rows else n, "rows": rows}
                self._register_projection(name, info)

    def _register_projection(self, name: str, info: dict[str, Any]) -> None:
        self.state.projected[name] = info
        param = self.param_objects.get(name)
        if param is not None:
            grape_registry.register(param, self.state, name)

    def _capturing(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(args: list[Any]) -> Any:
            if self.capture_backward_inputs:
                self.capture_backward_inputs = False
                self.captured_inputs = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
            return fn(args)

        run._boxed_call = True  # type: ignore[attr-defined]
        return run

    # -- codegen ---------------------------------------------------------------------------------
    def _codegen(self, gm: fx.GraphModule, inputs: list[Any], is_backward: bool) -> Callable[..., Any]:
        lowered = lower_for_execution(gm)  # noise into the clipped sums' own buffers
        own_copy = lowered is not gm  # a copy only this call holds: boxed in place, not copied again
        gm = lowered
        if self.config.codegen == "inductor" and _has_inductor_trap(gm):
            warnings.warn(
                "grapefx: this graph uses max pooling, whose Inductor lowering gives wrong gradients on "
                "torch 2.13 CPU (also without grapefx); running it with codegen='eager' instead.",
                stacklevel=2,
            )
        elif self.config.codegen == "inductor" and masked_selections(gm):
            warnings.warn(
                "grapefx: this graph selects rows with a boolean mask (x[mask], a size only the data "
                "fixes); Inductor cannot lower views of such sizes (torch 2.13, also without grapefx): "
                "running it with codegen='eager' instead.",
                stacklevel=2,
            )
        elif self.config.codegen == "inductor":
            from torch._inductor.compile_fx import compile_fx_inner
            from torch._inductor.decomposition import select_decomp_table

            # Inductor lowers its own decomposition set (e.g. native_group_norm must be decomposed).
            # Random ops (dropout) stay whole and run as eager ATen calls: Inductor rewrites them
            # into its own RNG only inside compile_fx (replace_random), which this path does not
            # take, and the fallback draws the very masks eager PyTorch draws for the same seed.
            table = {k: v for k, v in select_decomp_table().items() if not _is_random(k)}
            gm = retrace(ViewTolerantInterpreter(gm).run, inputs, decompositions=table)
            with torch._inductor.config.patch(fallback_random=True, **salted_config()):
                return compile_fx_inner(gm, inputs, is_backward=is_backward)
        return _boxed(gm, in_place=own_copy)


def _boxed(gm: fx.GraphModule, in_place: bool = False) -> Callable[..., Any]:
    """Eager codegen with the boxed calling convention: the generated code clears the argument
    list, so each saved activation is freed after its last use instead of at the end of the
    backward (what `make_boxed_func` alone would do). Runs a copy, so `gm` stays callable as is,
    unless `in_place` (a copy no one else holds: a deep backward's second copy would stay
    resident, tens of MB, for the model's lifetime)."""
    boxed_codegen = getattr(torch.fx.graph, "_BoxedCodeGen", None)
    if boxed_codegen is None:  # private torch API: without it, inputs live to the end
        return make_boxed_func(gm)
    if not in_place:
        return copy_graph_module(gm, boxed_codegen())
    gm.graph.set_codegen(boxed_codegen())
    gm.recompile()
    return gm


_INDUCTOR_TRAPS = (
    aten.max_pool2d_with_indices,
    aten.max_pool3d_with_indices,
    aten.max_pool2d_with_indices_backward,
    aten.max_pool3d_with_indices_backward,
)


def _is_random(op: Any) -> bool:
    return torch.Tag.nondeterministic_seeded in getattr(op, "tags", ())


def _has_inductor_trap(gm: fx.GraphModule) -> bool:
    return any(getattr(n.target, "overloadpacket", None) in _INDUCTOR_TRAPS for n in gm.graph.nodes)


def _saved_seed(node: fx.Node, layouts: LayoutResult) -> Any:
    """The backward's seed for a saved forward value: its layout, or `BatchIndex` for an arange(B)
    (batch-free, but it lets the backward's index_put keep row j with sample j), or `BagOffsets` for
    nn.EmbeddingBag's offsets (bag b holds sample b's ids)."""
    if node in layouts.batch_index:
        return BatchIndex(layouts.batch_index[node])
    if node in layouts.bag_offsets:
        return BagOffsets(layouts.bag_offsets[node])
    return layouts.layouts.get(node)


def _user_outputs(outputs: list[Any]) -> set[fx.Node]:
    """The forward outputs the compiled function returns to its caller (not the saved tensors)."""
    ctx = torch._guards.TracingContext.try_get()
    meta = getattr(ctx, "fw_metadata", None)
    if meta is None:
        return {n for n in outputs if isinstance(n, fx.Node)}  # unknown: treat every output as seen
    first = meta.num_mutated_inp_runtime_indices
    return {n for n in outputs[first : first + len(meta.output_info)] if isinstance(n, fx.Node)}


def _tangent_outputs(outputs: list[Any]) -> list[Any]:
    """The forward output each tangent belongs to, in tangent order (UNKNOWN: an intermediate base)."""
    ctx = torch._guards.TracingContext.try_get()
    meta = getattr(ctx, "fw_metadata", None)
    if meta is None:
        raise GrapefxError("grapefx needs AOTAutograd's forward metadata (torch >= 2.11)")
    n_mut = meta.num_mutated_inp_runtime_indices
    result = [outputs[k] for k, _ in _mutated_input_tangents(meta)]
    result += [outputs[n_mut + k] for k, info in enumerate(meta.output_info) if info.requires_grad]
    result.extend(UNKNOWN for _ in range(meta.num_intermediate_bases))
    return result


def _tangent_layouts(outputs: list[Any], layouts: dict[fx.Node, Any]) -> list[Any]:
    """Layouts of the forward outputs that receive a tangent, in tangent order."""
    return [
        o if o is UNKNOWN else layouts.get(o) if isinstance(o, fx.Node) else None for o in _tangent_outputs(outputs)
    ]


def _hidden_mutation_tangents() -> set[int]:
    """Tangent positions of inputs mutated out of autograd's sight (`.data`, no_grad): always zero.

    AOTAutograd copies their new values back without autograd (a leaf that requires grad, such as a
    parameter, can only have been mutated that way: it is copied through `.detach()`), so no
    gradient reaches them."""
    meta = torch._guards.TracingContext.get().fw_metadata
    return {
        position
        for position, (_, info) in enumerate(_mutated_input_tangents(meta))
        if info.is_leaf or info.mutations_hidden_from_autograd or info.mutations_under_no_grad_or_inference_mode
    }


def _mutated_input_outputs() -> list[int]:
    """The input index of each of the forward's first outputs (the new values of mutated inputs)."""
    return list(torch._guards.TracingContext.get().fw_metadata.mutated_inp_runtime_indices)


def _mutated_input_tangents(meta: Any) -> list[tuple[int, Any]]:
    """(forward output index, input info) of the mutated inputs that get a tangent, in tangent order.

    AOTAutograd returns the inputs it mutates outside the graph first among the forward outputs;
    those whose data changed and that require grad get a tangent (mutations kept in the graph, as
    under no_grad, get none)."""
    infos = [meta.input_info[i] for i in meta.mutated_inp_runtime_indices]
    return [(k, info) for k, info in enumerate(infos) if info.mutates_data and info.requires_grad]


def backend(config: PrivacyConfig | None = None, **options: Any) -> GrapefxBackend:
    """A torch.compile backend: `torch.compile(m, backend=grapefx.backend(max_grad_norm=1.0), fullgraph=True)`."""
    cfg = config if config is not None else PrivacyConfig.from_options(options)
    return GrapefxBackend(cfg)


def grapefx_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict[str, Any] | None = None) -> Any:
    """Entry point for `torch.compile(model, backend="grapefx", options={...})`.

    Each compiled graph gets its own privacy state; use grapefx.compile to read norms afterwards.
    """
    return GrapefxBackend(PrivacyConfig.from_options(options))(gm, example_inputs)
