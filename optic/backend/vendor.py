"""cpu_tactics: the fastest kernels PyTorch itself offers on this CPU, chosen by measurement. Exact.

The exact passes' output runs in PyTorch; on the host CPU this pass swaps ops for oneDNN kernels
that Inductor's CPU backend also uses, each one kept only when measured faster here:

- conv (2-D, not transposed) [+ activation] → ``mkldnn._convolution_pointwise`` with the weight
  prepacked once into oneDNN's blocked layout and the activation fused into the kernel;
- linear [+ activation] → ``mkldnn._linear_pointwise`` with the activation fused.

Every candidate is checked numerically on the values it really sees (recorded on the example
inputs) and timed against the original ops on the same values, alternated in blocks
(``optic.pipeline.timing``); identical layer shapes are measured once. Finally the whole model is timed
before and after: the pass keeps its changes only when the model is faster, and records both
latencies. The pass declines on other targets: it chooses by measurement, which needs the target
to be this machine. Prepacked weights are held as plain tensors by :class:`PackedConvWeight`, which packs
them on first use, so the optimized module deep-copies, pickles and exports; the oneDNN kernels run
float32 on the CPU only (the optimized module refuses ``.half()`` and other devices, saying so).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from optic import ir
from optic.ir import emit
from optic.ir.opview import Op, view
from optic.ir.rewrite import MODEL, RuleStats, Site, find_sites
from optic.pipeline import timing
from optic.pipeline.registry import Option, register
from optic.pipeline.verify import compare

from . import profiling, whole

mkldnn = torch.ops.mkldnn

# op-view activation -> (oneDNN attr, scalars, algorithm)
ONEDNN_ATTRS = {
    "relu": lambda a: ("relu", [], ""),
    "sigmoid": lambda a: ("sigmoid", [], ""),
    "tanh": lambda a: ("tanh", [], ""),
    "hardswish": lambda a: ("hardswish", [], ""),
    "hardsigmoid": lambda a: ("hardsigmoid", [], ""),
    "silu": lambda a: ("swish", [], ""),
    "leaky_relu": lambda a: ("leaky_relu", [a.get("negative_slope", 0.01)], ""),
    "hardtanh": lambda a: ("hardtanh", [a.get("min_val", -1.0), a.get("max_val", 1.0)], ""),
    "gelu": lambda a: ("gelu", [], a.get("approximate", "none")),
}
_KEEP_MARGIN = 0.97  # a candidate must be at least 3% faster than what it replaces
# Read by both backend steps (cpu_tactics, tvm_kernels): declared once, here.
TACTICS_CONFIRM_S = Option("tactics_confirm_s", float, 3.0,
                           "seconds spent timing the whole model's variants against each other")


@dataclass
class Candidate:
    op: Op
    act: Op | None
    signature: tuple
    packed: torch.Tensor | None = None
    attr: tuple = ("none", [], "")

    @property
    def last(self) -> fx.Node:
        return (self.act or self.op).node

    @property
    def nodes(self) -> list[fx.Node]:
        return [self.op.node] + ([self.act.node] if self.act else [])


def _fusable_act(op: Op, gm: fx.GraphModule) -> Op | None:
    users = ir.value_users(op.node)
    if len(users) != 1:
        return None
    act = view(users[0], gm)
    if act is None or act.kind != "act" or act.x is not op.node or act.attrs.get("fn") not in ONEDNN_ATTRS:
        return None
    if ir.is_inplace(act.node):
        return None
    return act


_CONV_ONLY = "only 2-D, non-transposed, zero-padded convolutions have a oneDNN pointwise kernel"


def why_not_dense_fp32(op: Op, dtypes: frozenset = frozenset({torch.float32})) -> str | None:
    """Why a conv/linear is not a float32 op (or one of ``dtypes``) on constant, dense weights (what every
    tactic needs)."""
    w = op.const("weight")
    if w is None or "bias" not in op.consts:
        return "weight or bias is computed, not a constant"
    if w.dtype not in dtypes or ir.dtype(op.x) != w.dtype or getattr(w, "is_mkldnn", False):
        return "not a float32 op on dense weights" if dtypes == {torch.float32} else \
            f"not a {'/'.join(sorted(str(d).removeprefix('torch.') for d in dtypes))} op on dense weights"
    if op.kind == "conv" and (op.attrs.get("nd") != 2 or op.attrs.get("padding") is None):
        return _CONV_ONLY
    return None


@dataclass
class DenseSite(Site):
    """An op of ``kinds`` (conv, linear) that reads a node and is float32 (or one of ``dtypes``) on dense
    constant weights."""

    dtypes: frozenset = frozenset({torch.float32})

    def match(self, op: Op, ctx: Any) -> Op | None:
        return op if op.kind in self.kinds and isinstance(op.x, fx.Node) else None

    def guard(self, op: Op, ctx: Any) -> str | None:
        return why_not_dense_fp32(op, self.dtypes)


@dataclass
class OneDNNSite(DenseSite):
    """Where a oneDNN pointwise kernel can run: a dense site, and a conv also not transposed and zero-padded."""

    def guard(self, op: Op, ctx: Any) -> str | None:
        reason = super().guard(op, ctx)
        if reason is None and op.kind == "conv" and (op.attrs.get("transposed")
                                                     or op.attrs.get("padding_mode", "zeros") != "zeros"):
            reason = _CONV_ONLY
        return reason


ONEDNN_SITES = [OneDNNSite("onednn_conv", kinds=frozenset({"conv"})),
                OneDNNSite("onednn_linear", kinds=frozenset({"linear"}))]


def _candidate(op: Op, gm: fx.GraphModule) -> Candidate:
    """The oneDNN kernel for ``op`` (a site), with the activation after it that the kernel fuses."""
    act = _fusable_act(op, gm)
    name, scalars, algo = ONEDNN_ATTRS[act.attrs["fn"]](act.attrs) if act else ("none", [], "")
    attr = (name, scalars or [None], algo)  # the kernels take [None] for "no scalars"
    sig = (op.kind, ir.shape(op.x), tuple(op.const("weight").shape), op.const("bias") is not None, repr(attr),
           repr({k: op.attrs.get(k) for k in ("stride", "padding", "dilation", "groups")}))
    return Candidate(op, act, sig, attr=attr)


def _candidates(gm: fx.GraphModule, stats: RuleStats) -> list[Candidate]:
    """Every oneDNN candidate of ``gm`` in graph order; the ops that cannot be one are declined in ``stats``."""
    return [_candidate(op, gm) for op in find_sites(gm, ONEDNN_SITES, None, stats)]


def recorded_inputs(program, nodes: set[fx.Node]) -> dict[fx.Node, Any]:
    """The values ``nodes`` take on the example inputs (copies: a later in-place op, e.g. ``ReLU6(inplace=True)``,
    must not change what was recorded)."""
    seen: dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n in nodes:
                seen[n] = value.clone() if isinstance(value, torch.Tensor) else value
            return value

    with torch.no_grad():
        Recorder(program.gm).run(*program.flat_inputs())
    return seen


def fast_call(c: Candidate, gm: fx.GraphModule):
    op = c.op
    bias = op.const("bias")
    attr, scalars, algo = c.attr
    if op.kind == "conv":
        a = op.attrs
        c.packed = mkldnn._reorder_convolution_weight(
            op.const("weight").contiguous(), a["padding"], a["stride"], a["dilation"], a["groups"], list(ir.shape(op.x)))
        return lambda x: mkldnn._convolution_pointwise(x, c.packed, bias, a["padding"], a["stride"], a["dilation"],
                                                       a["groups"], attr, scalars, algo)
    w = op.const("weight").contiguous()
    c.packed = w
    return lambda x: mkldnn._linear_pointwise(x, w, bias, attr, scalars, algo)


class PackedConvWeight(nn.Module):
    """A conv weight in oneDNN's blocked layout, packed from the plain weight it holds.

    The plain weight is the buffer (``state_dict``, ``deepcopy``, ``torch.save`` see plain tensors); the
    opaque oneDNN tensor is a cache, packed on first use and again whenever the weight changes (after a
    load, ``load_state_dict``). Where no packing can happen (while ``torch.export`` traces with fake
    tensors), the plain weight is returned: the oneDNN kernel takes it too, reordering it per call."""

    def __init__(self, weight: torch.Tensor, padding, stride, dilation, groups: int, input_size):
        super().__init__()
        self.register_buffer("weight", weight.detach().contiguous())
        self.args = (list(padding), list(stride), list(dilation), int(groups), list(input_size))
        self._packed: torch.Tensor | None = None
        self._source: tuple | None = None

    def forward(self) -> torch.Tensor:
        w = self.weight
        if type(w) is not torch.Tensor or w.dtype != torch.float32 or w.device.type != "cpu":
            return w
        key = (w.data_ptr(), w._version)
        if self._packed is None or self._source != key:
            self._packed = mkldnn._reorder_convolution_weight(w, *self.args)
            self._source = key
        return self._packed

    def __getstate__(self) -> dict:  # the opaque cache is neither copied nor saved: it is packed again
        state = dict(self.__dict__)
        state["_packed"], state["_source"] = None, None
        return state


def _emit(c: Candidate, gm: fx.GraphModule, x: fx.Node) -> fx.Node:
    """The kernel replacing ``c``, reading ``x`` (its input, or the kernel that replaced its input)."""
    graph = gm.graph
    attr, scalars, algo = c.attr
    with graph.inserting_before(c.op.node):
        b = c.op.consts["bias"].tensor
        bn = ir.const_node(graph, gm, b, "bias") if b is not None else None
        if c.op.kind == "conv":
            a = c.op.attrs
            name = ir.free_name(gm, "onednn_weight")
            gm.add_submodule(name, PackedConvWeight(c.op.const("weight"), a["padding"], a["stride"], a["dilation"],
                                                    a["groups"], ir.shape(c.op.x)))
            new = graph.call_function(mkldnn._convolution_pointwise.default, (
                x, graph.call_module(name, ()), bn, list(a["padding"]), list(a["stride"]), list(a["dilation"]),
                int(a["groups"]), attr, scalars, algo))
        else:
            w = ir.const_node(graph, gm, c.packed, "onednn_weight")
            new = graph.call_function(mkldnn._linear_pointwise.default, (x, w, bn, attr, scalars, algo))
    ir.replace(c.last, new, "cpu_tactics", c.nodes)
    ir.erase_replaced(c.nodes)
    return new


def _check_variant(program, candidate, ctx) -> None:
    """Raise when a whole-model variant differs from ``program`` beyond the tolerance on the inputs the
    pass is checked on."""
    with torch.no_grad():
        for args, kwargs in ctx.check_inputs:
            check = compare(program.gm(*args, **kwargs), candidate.gm(*args, **kwargs), ctx.tolerance)
            if not check.ok:
                raise ValueError(f"it differs ({check})")


def to_channels_last(gm: fx.GraphModule, dtypes: frozenset = frozenset({torch.float32})) -> int:
    """Feed every float32 (or ``dtypes``) 2-D conv a channels-last input and weight; keep 4-D outputs
    contiguous. Returns how many convs changed. Exact: only memory layout changes."""
    changed = 0
    graph = gm.graph
    cl = torch.channels_last
    # A conv left out here is declined by the rule onednn_conv for the same reason, and cpu_tactics records
    # that one: these declines are not recorded twice.
    for site in find_sites(gm, DenseSite("channels_last", kinds=frozenset({"conv"}), dtypes=dtypes), None, RuleStats()):
        node = site.node
        op = view(node, gm)  # again: a conv before it, rewritten meanwhile, may be its input
        with graph.inserting_before(node):
            x = graph.call_function(torch.ops.aten.contiguous.default, (op.x,), {"memory_format": cl})
            w = ir.const_node(graph, gm, op.const("weight").contiguous(memory_format=cl), "weight_cl")
            b = op.const("bias")
            bn = ir.const_node(graph, gm, b, "bias") if b is not None else None
            new = emit.conv(graph, x, w, bn, op.attrs)
        ir.replace(node, new, "cpu_tactics")
        changed += 1
    if changed:
        out = next(n for n in graph.nodes if n.op == "output")
        def contiguous(a):
            if isinstance(a, fx.Node) and len(ir.shape(a) or ()) == 4:
                with graph.inserting_before(out):
                    return graph.call_function(torch.ops.aten.contiguous.default, (a,))
            return a
        out.args = fx.map_arg(out.args, contiguous)
        ir.eliminate_dead_code(gm)
        ir.drop_unused_constants(gm)
        gm.recompile()
    return changed


@register
class CpuTactics:
    name = "cpu_tactics"
    exact = True
    compiles_whole_graph = True  # offers the whole graph compiled (the allocator times int8 actions that way)
    description = ("the fastest implementation of the whole model, measured: PyTorch ops, channels-last, oneDNN conv/linear "
                   "kernels (fused activation, prepacked weights), or the whole graph compiled (Inductor, AOTInductor)")
    options = (
        Option("whole_graph", (bool, str), None, "offer the whole graph compiled as one program: True, False, "
               "'compiled', 'packaged' or 'tvm' only (unset: on unless OPTIC_WHOLE_GRAPH=0)",
               choices=(None, True, False, "compiled", "packaged", "tvm")),
        Option("tactics_budget_s", float, 4.0, "seconds spent timing oneDNN kernels one layer at a time"),
        TACTICS_CONFIRM_S,
    )

    def run(self, program, ctx) -> bool:
        if ctx.target.kind != "cpu":
            ctx.stats.decline("cpu_tactics", MODEL, f"target '{ctx.target.name}' is not a CPU")
            return False
        if not ctx.measure:
            ctx.stats.decline("cpu_tactics", MODEL, "tactics are chosen by measurement: measuring is off (measure=False, or the target is not this machine)")
            return False
        if not torch.backends.mkldnn.is_available():
            ctx.stats.decline("cpu_tactics", MODEL, "this PyTorch build has no oneDNN")
            return False
        variants, kernels = self._variants(program, ctx, "")
        fallback = ctx.without_generated  # backend="tvm": the same model with PyTorch's kernels only
        if fallback is not None:
            more, more_kernels = self._variants(fallback, ctx, "no generated kernels: ")
            variants.update(more)
            kernels.update(more_kernels)
        for prog, prefix in ((program, ""), (fallback, "no generated kernels: ")):
            if prog is None:
                continue
            for name, compiled in self._whole_graph(prog, ctx).items():
                variants[prefix + name] = compiled
                kernels[prefix + name] = ["whole_graph_packaged" if name == whole.PACKAGED else "whole_graph_compiled"]
        if whole.choice(ctx) in (True, "tvm") and not ctx.lossy_after:
            for name, candidate in self._tvm_graph(program, ctx).items():
                variants[name], kernels[name] = candidate, ["whole_graph_tvm"]
        for name, (candidate, rules) in self._int8_generated(program, ctx).items():
            variants[name], kernels[name] = candidate, rules
        for name in over_budget(variants, program, ctx):
            del variants[name]
        if len(variants) == 1:
            return False
        best = self._fastest(variants, program, ctx)
        args, kwargs = program.example_args, program.example_kwargs
        kept = variants[best].gm
        from . import tvm_graph

        table = tvm_graph.profile_program(kept, args, kwargs)
        if table is None:
            table = profiling.profile(lambda: kept(*args, **kwargs))
        if table:
            ctx.record.measured["kernels"] = [k.as_dict() for k in table]
            ctx.note(profiling.summary(table))
        if best == "torch ops":
            return False
        program.gm = variants[best].gm
        ctx.stats.match(best)
        for rule in kernels.get(best, []):
            ctx.stats.match(rule)
        return True

    @staticmethod
    def _whole_graph(program, ctx) -> dict[str, Any]:
        """The whole graph as one compiled program (:mod:`.whole`: Inductor through torch.compile, and an
        AOTInductor package), each checked on the inputs the pass is checked on; a decline says why one
        is not offered."""
        why = whole.unavailable()
        which = whole.choice(ctx)
        if not which:
            why = f"switched off (option whole_graph=False, or ${whole.ENV}=0)"
        elif ctx.lossy_after:
            why = "a lossy pass follows and needs to see the graph"
        if why:
            ctx.stats.decline("whole_graph_compiled", MODEL, why)
            return {}
        kinds = [] if which in ("packaged", "tvm") else [(whole.NAME, "whole_graph_compiled", False)]
        if which in (True, "packaged"):
            if whole.writes_state(program):
                ctx.stats.decline("whole_graph_packaged", MODEL, "the model updates a buffer in forward: a package "
                                                                 "would update its own copy")
            elif any(getattr(m, "process_local", False) for m in program.gm.modules()):
                ctx.stats.decline("whole_graph_packaged", MODEL, "optic's generated kernels are called by a key that "
                                                                 "lives in this process only: a package could not "
                                                                 "call them after loading")
            else:
                kinds.append((whole.PACKAGED, "whole_graph_packaged", True))
        found = {}
        for name, rule, packaged in kinds:
            t0 = time.perf_counter()
            try:
                candidate = whole.wrap(program, packaged=packaged)
                _check_variant(program, candidate, ctx)
                if candidate.gm.compiled.failed:
                    raise RuntimeError(candidate.gm.compiled.failed)
            except Exception as e:  # it could not be built: PyTorch's ops and the tactics remain
                ctx.stats.decline(rule, MODEL, whole.error_line(e, 160))
                continue
            ctx.record.measured[rule + "_build_s"] = round(time.perf_counter() - t0, 2)
            found[name] = candidate
        return found

    @staticmethod
    def _tvm_graph(program, ctx) -> dict[str, Any]:
        """The whole graph as one TVM program of optic's kernels (:mod:`.tvm_graph`), checked on the inputs
        the pass is checked on; a decline names what it does not cover."""
        from . import tvm_graph

        why = tvm_graph.unavailable() or tvm_graph.check(program.gm)
        if why:
            ctx.stats.decline("whole_graph_tvm", MODEL, why)
            return {}
        from .generated import trials_for, tuning_budget_s

        # tuning as asked (backend="tvm" sets the effort level; the default measures nothing: the database's
        # best, else the cost model's choice), within the tuning budget
        level = ctx.options.get("tune")
        trials = trials_for(level) if level is not None else 0
        budget = tuning_budget_s(ctx, level)
        db = ctx.option("tuning_db")
        t0 = time.perf_counter()
        try:
            candidate = tvm_graph.wrap(program, trials=trials, db=db, budget_s=budget, progress=ctx.progress)
            _check_variant(program, candidate, ctx)
        except Exception as e:  # noqa: BLE001 - not covered, not built or not right: the others remain
            ctx.stats.decline("whole_graph_tvm", MODEL, whole.error_line(e, 160))
            return {}
        ctx.record.measured["whole_graph_tvm_build_s"] = round(time.perf_counter() - t0, 2)
        ctx.record.measured["tvm_kernels"] = [k.as_dict() for k in candidate.gm.compiled.kernels]
        ctx.record.measured["tvm_tuning_measurements"] = candidate.gm.compiled.measurements
        return {tvm_graph.NAME: candidate}

    @staticmethod
    def _int8_generated(program, ctx) -> dict[str, tuple[Any, list[str]]]:
        """The graph with its int8 operators run by optic's generated AMX kernels (:mod:`.int8_amx`), each
        call on one thread, and again with the large calls on TVM's thread pool where the example has any,
        each checked on the inputs the pass is checked on, with the kernels made; empty where there is none."""
        from . import int8, int8_amx

        if not int8.rounds(program.gm):
            return {}
        why = int8_amx.unavailable()
        if why:
            ctx.stats.decline("int8_generated", MODEL, why)
            return {}
        found = {}
        for name, parallel_macs in whole.int8_generated_variants():
            candidate = program.clone()
            t0 = time.perf_counter()
            try:
                made = int8_amx.use_kernels(candidate.gm, parallel_macs)
                if not made:
                    ctx.stats.decline("int8_generated", MODEL, "no int8 operator the generated kernels cover")
                    return {}
                with torch.no_grad():
                    candidate.gm(*program.example_args, **program.example_kwargs)
                if parallel_macs and not int8_amx.uses_pool(candidate.gm):
                    break  # no call on the example is that large: the variant would be the one-thread one
                _check_variant(program, candidate, ctx)
            except Exception as e:  # not built, or not right: the other variants remain
                ctx.stats.decline("int8_generated", MODEL, f"{name}: {whole.error_line(e, 160)}")
                continue
            ctx.record.measured[("int8_generated_pool" if parallel_macs else "int8_generated") + "_build_s"] = round(
                time.perf_counter() - t0, 2)
            found[name] = candidate, ["int8_generated_" + k for k in made]
        return found

    def _variants(self, program, ctx, prefix: str) -> tuple[dict[str, Any], dict[str, list[str]]]:
        """Whole-model variants of ``program``: as it is, channels-last, and with the oneDNN kernels
        measured faster; and the kernel rules of the oneDNN variant."""
        variants: dict[str, Any] = {prefix + "torch ops": program.clone()}
        base = program.clone()
        if to_channels_last(base.gm):
            base.annotate_shapes()
            variants[prefix + "channels-last"] = base.clone()
        onednn = base.clone()
        kernels = self._choose_kernels(onednn, ctx)
        name = prefix + ("channels-last + " if len(variants) > 1 else "") + "oneDNN kernels"
        if kernels:
            variants[name] = onednn
        return variants, {name: kernels}

    def _choose_kernels(self, program, ctx) -> list[str]:
        """Swap in the oneDNN kernels measured faster one by one; the rules that fired."""
        gm = program.gm
        t_end = time.perf_counter() + float(ctx.option("tactics_budget_s"))
        cands = _candidates(gm, ctx.stats)
        if not cands:
            return []
        values = recorded_inputs(program, {c.op.x for c in cands} | {c.last for c in cands})
        verdicts: dict[tuple, tuple[bool, str]] = {}
        chosen: list[Candidate] = []
        for c in cands:
            if c.signature not in verdicts:
                if time.perf_counter() > t_end:
                    verdicts[c.signature] = (False, "measurement budget spent (option tactics_budget_s)")
                else:
                    verdicts[c.signature] = self._measure(c, gm, values, ctx)
            keep, why = verdicts[c.signature]
            if not keep:
                ctx.stats.decline("onednn_" + c.op.kind, c.op.node.name, why)
                continue
            if c.packed is None:  # same layer shape as a measured one: prepare its own weights
                fast_call(c, gm)
            chosen.append(c)
        renamed: dict[fx.Node, fx.Node] = {}  # a kernel's output replaces the node an earlier one ended with
        for c in chosen:
            renamed[c.last] = _emit(c, gm, renamed.get(c.op.x, c.op.x))
        if chosen:
            ir.eliminate_dead_code(gm)
            ir.drop_unused_constants(gm)
            gm.recompile()
        return ["onednn_" + c.op.kind + ("+" + c.act.attrs["fn"] if c.act else "") for c in chosen]

    @staticmethod
    def _measure(c: Candidate, gm: fx.GraphModule, values: dict, ctx) -> tuple[bool, str]:
        x, expected = values.get(c.op.x), values.get(c.last)
        if not isinstance(x, torch.Tensor) or not isinstance(expected, torch.Tensor):
            return False, "input not recorded"
        try:
            fast = fast_call(c, gm)
            got = fast(x)
        except RuntimeError as e:
            return False, f"oneDNN kernel refused: {str(e).splitlines()[0][:80]}"
        check = compare(expected, got, ctx.tolerance)
        if not check.ok:
            return False, f"oneDNN result differs ({check})"
        slow = ir.subgraph_callable(gm, c.nodes, c.op.x)
        n = timing.calls_per_block(lambda: slow(x), target_s=0.005)
        t = timing.compare({"torch": lambda: slow(x), "onednn": lambda: fast(x)}, rounds=4, block=n, warmup=1)
        ratio = t["onednn"].median / t["torch"].median
        if ratio < _KEEP_MARGIN:
            return True, ""
        return False, f"not faster here ({ratio:.2f}× the time of the torch op)"

    @staticmethod
    def _fastest(variants: dict[str, Any], program, ctx) -> str:
        return fastest(variants, program, ctx)


def over_budget(variants: dict[str, Any], program, ctx) -> list[str]:
    """The variants (other than the first, the program as it is) whose held-out drop exceeds the accuracy budget,
    each declined with its figure.

    Only where the budgeted program rounds values to integers: an int8 layer's output then moves by whole
    quantization steps when float32 rounding before it moves by an ulp, so the numerical check is widened
    (:mod:`optic.pipeline.runner`) and no longer guards the metric. The budget's allocator checked the program
    as it is; a compiled variant rounds differently, and on BERT-base one crossed the budget at the final
    check, which then returned the captured graph and lost every layer."""
    from . import int8

    if ctx.evaluator is None or ctx.budget is None or not int8.rounds(program.gm):
        return []
    out = []
    for name, candidate in list(variants.items())[1:]:
        try:
            drop = ctx.evaluator.drop(candidate.gm, "holdout")
        except Exception as e:  # noqa: BLE001 - a variant that cannot be scored is not offered
            ctx.stats.decline("budget_check", MODEL, f"{name}: not scored ({whole.error_line(e, 120)})")
            out.append(name)
            continue
        if drop > ctx.budget.max_drop:
            ctx.stats.decline("budget_check", MODEL, f"{name}: its rounding moves the held-out drop to {drop:.4f}, "
                                                     f"over the budget {ctx.budget.max_drop:g}")
            out.append(name)
    return out


def fastest(variants: dict[str, Any], program, ctx) -> str:
    """Time the whole model in every variant (the first, "torch ops", the baseline), alternated in
    blocks; the fastest one's name, with the figures in the pass's record and a note."""
    args, kwargs = program.example_args, program.example_kwargs
    fns = {name: (lambda g=v.gm: g(*args, **kwargs)) for name, v in variants.items()}  # "torch ops" first
    t = timing.compare_models(fns, float(ctx.option("tactics_confirm_s")))
    best = min(t, key=lambda k: t[k].median)
    before = t["torch ops"]
    ctx.record.measured["latency_s"] = (before.median, t[best].median)
    ctx.record.measured["variants_ms"] = {k: round(v.median * 1e3, 4) for k, v in t.items()}
    ctx.record.measured["kept"] = best
    ctx.note("measured here: " + ", ".join(f"{k} {v}" for k, v in t.items()) + f" → kept {best}")
    return best
