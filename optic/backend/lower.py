"""Lowering: an optimized Program to TVM Relax, TVM's fusion, and the fused kernels that result.

    lowered = optic.lower(program, "cpu")
    lowered.kernels       # fused TIR functions, each with its workload (op class, shapes, epilogue, key)
    lowered.fallbacks     # every op that stays in PyTorch, with the reason
    lowered.module()(x)   # the partitioned model: TVM parts (LLVM, this CPU) and PyTorch parts

How:

1. ATen graph. ``torch.export`` (non-strict) of the Program's graph (an fx-captured one is exported
   here; an exported one again, since passes rewrote it), then torch's default decomposition to core
   ATen, the one ``from_exported_program`` runs itself, minus scaled-dot-product attention: TVM
   imports it whole, as ``R.nn.attention`` (checked against PyTorch for no mask, causal and 4-D
   float masks), and torch's decomposition of it is fragile (it has failed on GPT-2).
2. Which ops TVM takes: an ATen op the importer has a conversion for, on tensors of dtypes TVM has,
   outside the importer's known gaps (:data:`KNOWN_GAPS`). Everything else stays in PyTorch.
3. Partitioning (:mod:`optic.backend.partition`): the ops TVM takes form maximal convex groups; each group
   becomes a GraphModule, is exported again and imported with ``from_exported_program`` as one Relax
   function (``part_<i>``). Import runs without the importer's own decomposition because the graph
   is already decomposed by the same table; importing an undecomposed graph (or tracing with
   ``from_fx``) maps eval-mode batch norm wrongly, which is why step 1 decomposes first.
4. Fusion: DecomposeOpsForInference, LegalizeOps, AnnotateTIROpPattern, FoldConstant, FuseOps,
   FuseTIR (TVM's CPU pipeline); the kernels are the TIR functions left (:mod:`optic.backend.kernels`).
5. Build and check: the fused module is compiled for this machine (LLVM, untuned default schedules:
   correctness, not speed), and each partition runs on the example inputs and is compared with
   PyTorch (``optic.pipeline.verify``). A group that fails to import, build or agree is bisected down to the
   op that fails, which then stays in PyTorch with the reason; lowering repeats until all agree. So
   one op TVM cannot take never fails the model: it is listed in ``fallbacks``, all at once.

Data crosses between PyTorch and TVM by DLPack, without copies.
"""

from __future__ import annotations

import logging
import math
import operator
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from ..errors import LoweringError, OpticError
from ..ir.graph import fetch_attr
from ..ir.program import Program
from ..pipeline.verify import compare, tolerance_for
from ..tvm_compat import host_target, require_tvm, tensor_types, to_torch, to_tvm, tvm_target, value_type
from .kernels import Kernel, extract_kernels
from .partition import OPS, Subgraph, convex_groups, extract

log = logging.getLogger("optic.lower")

aten = torch.ops.aten

__all__ = ["KNOWN_GAPS", "Fallback", "Lowered", "Partition", "TVMPartition", "lower"]


# -- results ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fallback:
    """An op that stays in PyTorch, and why."""

    node: str  # node name in the ATen graph (Lowered.graph)
    op: str  # "aten.cumsum.default", "mylib.scale.default", ...
    reason: str
    source: str | None = None  # the model's source line, where export recorded it

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {self.reason}" + (f" [{self.source}]" if self.source else "")


@dataclass(frozen=True)
class Partition:
    """One group of ops that runs in TVM as the Relax function ``name``."""

    name: str
    nodes: tuple[str, ...]  # op nodes of the ATen graph it computes
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(repr=False)
class Lowered:
    """A Program lowered to TVM: Relax before and after fusion, kernels, fallbacks, a runnable module."""

    target: Any  # tvm.target.Target the kernels are meant for
    graph: fx.GraphModule  # the core-ATen graph that was partitioned (node names below refer to it)
    relax: Any  # tvm.IRModule: one Relax function per partition, as imported (before fusion)
    fused: Any  # tvm.IRModule after FuseOps and FuseTIR
    kernels: list[Kernel]
    fallbacks: list[Fallback]
    partitions: list[Partition]
    build_target: Any = None  # what module() runs on: LLVM for this machine
    _runner: fx.GraphModule | None = field(default=None, repr=False)

    def module(self) -> fx.GraphModule:
        """The partitioned model as a module with the Program's call signature: TVM partitions
        (compiled for this CPU) called through DLPack, PyTorch for the fallbacks."""
        assert self._runner is not None
        return self._runner

    def kernel(self, name: str) -> Kernel:
        for k in self.kernels:
            if k.name == name:
                return k
        raise OpticError(f"no kernel named '{name}'; kernels: {', '.join(k.name for k in self.kernels) or 'none'}.")

    def script(self, fused: bool = False) -> str:
        """The Relax module as TVMScript: as imported, or after fusion (with its TIR kernels)."""
        return (self.fused if fused else self.relax).script()

    def kernel_script(self, name: str) -> str:
        """One fused TIR kernel as TVMScript."""
        return self.kernel(name).script()

    def __repr__(self) -> str:
        return f"<Lowered {self.summary().splitlines()[0]}>"

    def summary(self) -> str:
        lines = [f"lowered to TVM for {self.target.kind.name} ({self.target}): {len(self.partitions)} partition(s), "
                 f"{len(self.kernels)} kernel(s), {len(self.fallbacks)} op(s) kept in PyTorch"]
        lines += [f"  kernel {k}" for k in self.kernels]
        lines += [f"  pytorch {f}" for f in self.fallbacks]
        return "\n".join(lines)


class TVMPartition(nn.Module):
    """Calls one Relax function of a compiled TVM module; tensors in and out by DLPack."""

    def __init__(self, vm: Any, function: str):
        super().__init__()
        self._vm = vm  # keeps the executable (and its constants) alive
        self.function = function
        self._fn = vm[function]

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self._fn(*(to_tvm(t) for t in inputs))
        return tuple(to_torch(o) for o in out)

    def extra_repr(self) -> str:
        return f"function={self.function!r}"


# -- which ops TVM takes -------------------------------------------------------------------------------------
_TVM_DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int16, torch.int32,
               torch.int64, torch.uint8, torch.bool}


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _val(x: Any) -> Any:
    return x.meta.get("val") if isinstance(x, fx.Node) else x


def _bool_scan(node: fx.Node) -> str | None:
    if node.target in (aten.cumsum.default, aten.cumprod.default):
        x = _val(node.args[0])
        if isinstance(x, torch.Tensor) and x.dtype == torch.bool:
            return ("TVM's importer types a cumulative sum/product of bools as bool (PyTorch gives int64), "
                    "which LLVM cannot build")
    return None


def _attention(node: fx.Node) -> str | None:
    if node.target is not aten.scaled_dot_product_attention.default:
        return None
    q, k = _val(node.args[0]), _val(node.args[1])
    mask = _val(_arg(node, 3, "attn_mask"))
    scale = _arg(node, 6, "scale")
    if q.dim() not in (2, 4):
        return f"TVM's attention takes 2-D or 4-D query/key/value (here {q.dim()}-D)"
    if isinstance(mask, torch.Tensor) and not mask.is_floating_point():
        return f"TVM's importer takes only a float attn_mask (this one is {str(mask.dtype).removeprefix('torch.')})"
    if isinstance(mask, torch.Tensor) and mask.dim() != 4:
        return f"TVM's attention takes only a 4-D attn_mask (batch, heads, query, key); this one is {mask.dim()}-D"
    if _arg(node, 4, "dropout_p", 0.0):
        return "TVM's importer has no attention dropout"
    if scale is not None and not math.isclose(scale, q.shape[-1] ** -0.5, rel_tol=1e-6):
        return f"TVM's importer ignores scale= (here {scale:g}, not 1/sqrt(head_dim))"
    if _arg(node, 7, "enable_gqa", False) or (q.dim() == 4 and q.shape[1] != k.shape[1]):
        return "TVM's attention needs as many key/value heads as query heads (no grouped-query attention)"
    return None


_FLOAT32_MATMULS = {aten.mm.default, aten.bmm.default, aten.matmul.default, aten.addmm.default}


def _low_precision_matmul(node: fx.Node) -> str | None:
    if node.target in _FLOAT32_MATMULS:
        dtypes = {_val(a).dtype for a in node.args if isinstance(_val(a), torch.Tensor)}
        if dtypes - {torch.float32}:
            return ("TVM's importer computes this matmul with out_dtype float32, so a "
                    f"{'/'.join(sorted(str(d).removeprefix('torch.') for d in dtypes))} one comes back in another dtype")
    return None


# Ops the importer has a conversion for but gets wrong or cannot build (TVM 0.27), found by testing;
# each rule returns why it declines. Bisection finds the ones not listed, at the cost of extra builds.
KNOWN_GAPS: list[Callable[[fx.Node], str | None]] = [_bool_scan, _attention, _low_precision_matmul]


def _op_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t.__name__}"
    return getattr(t, "__name__", str(t))


def _decline(node: fx.Node, convert_map: dict) -> str | None:
    """Why TVM cannot take ``node`` (a call_function of the core-ATen graph), or None."""
    t = node.target
    if node.op != "call_function":
        return f"a {node.op} node, not an ATen call"
    if t is operator.getitem:
        return None  # goes with the op whose tuple it reads
    if not isinstance(t, torch._ops.OpOverload):
        return f"{_op_name(node)} is Python, not an ATen op"
    if t.namespace != "aten":
        return f"custom op {t.namespace}::{t.__name__.split('.')[0]}: TVM's importer converts ATen ops only"
    if t.__name__ not in convert_map:
        return f"TVM's importer has no conversion for aten.{t.__name__}"
    val = node.meta.get("val")
    outs = list(val) if isinstance(val, list | tuple) else [val]
    if not all(isinstance(v, torch.Tensor) for v in outs):
        return "produces a Python value, not tensors"
    if isinstance(val, list | tuple) and any(u.target is not operator.getitem for u in node.users):
        return "its tuple of results is used whole"
    ins = [_val(a) for a in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(a, fx.Node)]
    for v in [*ins, *outs]:
        if isinstance(v, torch.Tensor) and v.dtype not in _TVM_DTYPES:
            return f"dtype {str(v.dtype).removeprefix('torch.')} has no TVM equivalent here"
    for rule in KNOWN_GAPS:
        reason = rule(node)
        if reason:
            return reason
    return None


def _propagate(gm: fx.GraphModule, declined: dict[fx.Node, str]) -> None:
    """Ops that cannot go to TVM because of their neighbours: a tuple element whose producer stays,
    and an op that reads a value that is not a tensor (nothing but tensors cross to TVM)."""
    for n in gm.graph.nodes:
        if n.op not in OPS or n in declined:
            continue
        if n.target is operator.getitem:
            src = n.args[0]
            if not isinstance(src, fx.Node) or src.op not in OPS or src in declined:
                declined[n] = f"reads the tuple of {getattr(src, 'name', src)}, which stays in PyTorch"
            continue
        for i in n.all_input_nodes:
            if i.op != "get_attr" and not isinstance(_val(i), torch.Tensor) and i.target is not operator.getitem:
                declined[n] = f"reads {i.name}, a value that is not a tensor"
                break


# -- the ATen graph ---------------------------------------------------------------------------------------------
def decomposition_table() -> dict:
    """torch.export's default decompositions (what ``from_exported_program`` runs) minus SDPA's."""
    table = torch.export.default_decompositions()
    for op in list(table.keys()):
        if "scaled_dot_product" in str(op):
            del table[op]
    return table


def aten_graph(program: Program) -> fx.GraphModule:
    """The Program as one core-ATen GraphModule (flat tensor placeholders, parameters as get_attr)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ep = torch.export.export(program.gm, program.example_args, program.example_kwargs, strict=False)
        except Exception as e:
            raise LoweringError(f"torch.export could not export the program's graph, so it cannot be lowered: "
                                f"{type(e).__name__}: {_first_line(e)}") from None
        try:
            ep = ep.run_decompositions(decomposition_table())
        except Exception as e:
            raise LoweringError(f"torch's decomposition to core ATen failed: {type(e).__name__}: "
                                f"{_first_line(e)}") from None
        gm = ep.module()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            gm.graph.erase_node(node)
        elif node.op == "call_function" and node.target is aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)  # dtype/device assertions export adds; nothing reads them
    gm.graph.eliminate_dead_code()  # e.g. batch norm's num_batches_tracked, which inference never reads
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


class _Recorder(fx.Interpreter):
    """Runs the graph once and keeps every value (the references each partition is checked against)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        self.values[n] = super().run_node(n)
        return self.values[n]


# -- lowering -----------------------------------------------------------------------------------------------------
def lower(program: Program, target: Any = "cpu", *, check: bool = True, tolerance: float | None = None) -> Lowered:
    """Lower ``program`` to TVM Relax, fuse, and return the kernels and the ops that stay in PyTorch.

    ``target``: an optic target name or row, a TVM target kind, config dict or ``tvm.target.Target``;
    it is recorded for tuning (fusion itself is TVM's generic one and gives the same kernels for every
    target), and the partitioned module is always built for this machine's CPU (LLVM).
    ``check``: run every TVM partition on the example inputs and keep in PyTorch the ops whose TVM
    result differs from PyTorch's (beyond ``tolerance``, default by dtype as in ``optic.pipeline.verify``).
    """
    tvm = require_tvm()
    tgt = tvm_target(target)
    if program.runner is not None:
        raise LoweringError("this Program runs in segments (a pass such as early exit set a runner); "
                            "lower it before that pass, or without it.")
    gm = aten_graph(program)
    return _Lowering(tvm, tgt, gm, program, check, tolerance).run()


class _Lowering:
    def __init__(self, tvm: Any, target: Any, gm: fx.GraphModule, program: Program, check: bool,
                 tolerance: float | None):
        from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

        self.tvm, self.target, self.gm, self.check, self.tolerance = tvm, target, gm, check, tolerance
        self.host = host_target()
        flat = pytree.tree_leaves((program.example_args, program.example_kwargs))
        rec = _Recorder(gm)
        with torch.no_grad():
            rec.run(*flat, enable_io_processing=False)
        self.values = rec.values
        convert_map = ExportedProgramImporter().convert_map
        self.declined: dict[fx.Node, str] = {}
        for n in gm.graph.nodes:
            if n.op in OPS and (reason := _decline(n, convert_map)):
                self.declined[n] = reason
        _propagate(gm, self.declined)
        self.cut: dict[fx.Node, int] = {}
        self._imported: dict[frozenset[str], tuple[Subgraph, Any]] = {}

    # -- the fixed point: group, import, build, check; bisect what fails ------------------------------------
    def run(self) -> Lowered:
        while True:
            groups = convex_groups(self.gm.graph, lambda n: n not in self.declined, self.cut)
            if not groups:
                return self._result([], [], self.tvm.IRModule({}), None, None)
            failed = [(g, err) for g in groups if (err := self._trial(g, "import"))]
            if failed:
                for g, err in failed:
                    self._bisect(g, "import", err)
                continue
            parts = [self._import(g) for g in groups]
            relax_mod = self._merge([f for _, f in parts])
            try:
                stages = self._fuse(relax_mod)
                vm = self._build(stages["fused"])
            except Exception as e:
                self._isolate(groups, "build", e)
                continue
            if self.check:
                bad = [(g, err) for i, (g, (sub, _)) in enumerate(zip(groups, parts, strict=True))
                       if (err := self._compare(sub, vm, f"part_{i}"))]
                if bad:
                    for g, err in bad:
                        self._bisect(g, "run", err)
                    continue
            return self._result(groups, parts, relax_mod, stages, vm)

    def _isolate(self, groups: list[list[fx.Node]], stage: str, error: Exception) -> None:
        """The whole module failed at ``stage``: find the groups that fail alone and bisect them."""
        if len(groups) == 1:
            failed = [(groups[0], self._reason(stage, error))]
        else:
            failed = [(g, err) for g in groups if (err := self._trial(g, stage))]
        if not failed:  # each builds alone but not together: keep them apart
            raise LoweringError(f"TVM builds each partition alone but not the module of all of them: "
                                f"{_first_line(error)}")
        for g, err in failed:
            self._bisect(g, stage, err)

    def _bisect(self, ops: list[fx.Node], stage: str, error: str) -> None:
        """Find the ops of a failing group that fail alone; they stay in PyTorch (with ``error``)."""
        # split points: never between an op and the elements of its tuple
        splits = [i for i in range(1, len(ops)) if ops[i].target is not operator.getitem]
        if not splits:  # one op (with its tuple's elements): it stays in PyTorch
            log.debug("%s stays in PyTorch: %s", ops[0].name, error)
            self.declined[ops[0]] = error
            _propagate(self.gm, self.declined)
            return
        mid = min(splits, key=lambda i: abs(2 * i - len(ops)))
        halves = [ops[:mid], ops[mid:]]
        errors = [self._trial(h, stage) for h in halves]
        for h, err in zip(halves, errors, strict=True):
            if err:
                self._bisect(h, stage, err)
        if not any(errors):  # each half works alone, not together: split the group there
            salt = max(self.cut.values(), default=0) + 1
            for n in halves[1]:
                self.cut[n] = salt

    def _trial(self, ops: list[fx.Node], stage: str) -> str | None:
        """None if ``ops`` import (stage "import"), build ("build") and agree with PyTorch ("run")."""
        try:
            sub, func = self._import(ops)
        except Exception as e:
            return self._reason("import", e)
        if stage == "import":
            return None
        try:
            vm = self._build(self._fuse(self._merge([func]))["fused"])
        except Exception as e:
            return self._reason("build", e)
        return self._compare(sub, vm, "part_0") if stage == "run" else None

    @staticmethod
    def _reason(stage: str, e: Exception) -> str:
        if isinstance(e, _WrongTypes):
            return f"TVM's importer gets the result type wrong: {e}"
        what = {"import": "TVM's importer failed", "build": "TVM could not build it"}[stage]
        return f"{what}: {type(e).__name__}: {_first_line(e)}"

    # -- one group: export, import ---------------------------------------------------------------------------
    def _import(self, ops: list[fx.Node]) -> tuple[Subgraph, Any]:
        key = frozenset(n.name for n in ops)
        if key not in self._imported:
            from tvm.relax.frontend.torch import from_exported_program

            sub = extract(self.gm, ops)
            inputs = tuple(self.values[i] for i in sub.inputs)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ep = torch.export.export(sub.gm, inputs, strict=False)
                # Already decomposed by decomposition_table(); see the module docstring.
                mod = from_exported_program(ep, run_ep_decomposition=False)
            func = mod["main"]
            self._check_types(sub, func)
            self._imported[key] = (sub, func)
        return self._imported[key]

    def _check_types(self, sub: Subgraph, func: Any) -> None:
        got = tensor_types(value_type(func.body))
        want = [(tuple(self.values[o].shape), str(self.values[o].dtype).removeprefix("torch.")) for o in sub.outputs]
        if got != want:
            raise _WrongTypes(", ".join(f"{_spec(*g)} for {o.name} where PyTorch has {_spec(*w)}"
                                        for g, w, o in zip(got, want, sub.outputs, strict=False) if g != w)
                              or f"{len(got)} results where PyTorch has {len(want)}")

    def _merge(self, funcs: list[Any]) -> Any:
        mod = self.tvm.IRModule({})
        for i, func in enumerate(funcs):
            mod[f"part_{i}"] = func.with_attr("global_symbol", f"part_{i}")
        return mod

    # -- fusion and build ------------------------------------------------------------------------------------
    def _fuse(self, mod: Any) -> dict[str, Any]:
        tvm = self.tvm
        t = tvm.relax.transform
        seq = tvm.transform.Sequential
        with self.host:
            decomposed = seq([t.DecomposeOpsForInference(), t.CanonicalizeBindings(),
                              tvm.relax.backend.DispatchSampling(), tvm.relax.backend.DispatchSortScan()])(mod)
            legalized = seq([t.LegalizeOps(), t.AnnotateTIROpPattern()])(decomposed)
            grouped = seq([t.FoldConstant(), t.FuseOps()])(legalized)
            fused = t.FuseTIR()(grouped)
        return {"decomposed": decomposed, "legalized": legalized, "grouped": grouped, "fused": fused}

    def _build(self, fused: Any) -> Any:
        tvm = self.tvm
        from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

        # Legalization and fusion are done: the rest of TVM's CPU pipeline, not all of it (which
        # would fuse the fused kernels again and build kernels other than the ones listed).
        pipeline = tvm.transform.Sequential(cpu_generic.dataflow_lower_passes(self.host)
                                            + cpu_generic.finalize_passes(self.host))
        with self.host:
            ex = tvm.compile(fused, self.host, relax_pipeline=pipeline)
        return tvm.relax.VirtualMachine(ex, tvm.cpu())

    def _compare(self, sub: Subgraph, vm: Any, function: str) -> str | None:
        ref = [self.values[o] for o in sub.outputs]
        try:
            got = list(TVMPartition(vm, function)(*(self.values[i] for i in sub.inputs)))
        except Exception as e:
            return f"TVM failed running it: {type(e).__name__}: {_first_line(e)}"
        c = compare(ref, got, tolerance_for(ref, self.tolerance))
        return None if c.ok else f"TVM's result differs from PyTorch's ({c})"

    # -- the result -------------------------------------------------------------------------------------------
    def _result(self, groups: list[list[fx.Node]], parts: list[tuple[Subgraph, Any]], relax_mod: Any,
                stages: dict[str, Any] | None, vm: Any) -> Lowered:
        kernels = [] if stages is None else extract_kernels(
            stages["decomposed"], stages["legalized"], stages["grouped"], stages["fused"])
        fallbacks = [Fallback(n.name, _op_name(n), self.declined[n], _source(n))
                     for n in self.gm.graph.nodes if n in self.declined]
        partitions = [Partition(f"part_{i}", tuple(n.name for n in g), tuple(n.name for n in sub.inputs),
                                tuple(n.name for n in sub.outputs))
                      for i, (g, (sub, _)) in enumerate(zip(groups, parts, strict=True))]
        runner = _runner(self.gm, [sub for sub, _ in parts], vm)
        fused = relax_mod if stages is None else stages["fused"]
        return Lowered(self.target, self.gm, relax_mod, fused, kernels, fallbacks, partitions,
                       self.host, runner)


class _WrongTypes(Exception):
    """The importer's Relax function returns other shapes or dtypes than PyTorch computes."""


def _spec(shape: tuple[int, ...], dtype: str) -> str:
    return f"{dtype}[{'x'.join(map(str, shape))}]"


_LIBRARY_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))


def _source(node: fx.Node) -> str | None:
    """The innermost line of the model's own code in the node's recorded stack (not torch's or optic's)."""
    trace = node.meta.get("stack_trace") or ""
    for line in reversed(trace.strip().splitlines()):
        line = line.strip()
        if line.startswith("File "):
            parts = line.split(",")
            file = parts[0].removeprefix("File ").strip().strip('"')
            if not file.startswith(_LIBRARY_DIRS) and "<eval_with_key>" not in file:
                return f"{file}:{parts[1].replace('line', '').strip()}" if len(parts) > 1 else file
    return None


def _runner(gm: fx.GraphModule, subs: list[Subgraph], vm: Any) -> fx.GraphModule:
    """``gm`` with each partition replaced by a call of its TVM function (same call signature)."""
    import networkx as nx

    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    unit = {n: ("tvm", i) for i, sub in enumerate(subs) for n in sub.nodes}
    deps = nx.DiGraph()
    for n in gm.graph.nodes:
        u = unit.get(n, n)
        deps.add_node(u)
        for i in n.all_input_nodes:
            if unit.get(i, i) != u:
                deps.add_edge(unit.get(i, i), u)
    first = {}
    for n in gm.graph.nodes:
        first.setdefault(unit.get(n, n), order[n])

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    root: dict[str, Any] = {}
    for u in nx.lexicographical_topological_sort(deps, key=first.__getitem__):
        if isinstance(u, tuple):
            sub = subs[u[1]]
            name = f"tvm_part_{u[1]}"
            root[name] = TVMPartition(vm, f"part_{u[1]}")
            call = graph.call_module(name, tuple(env[i] for i in sub.inputs))
            for k, o in enumerate(sub.outputs):
                env[o] = graph.call_function(operator.getitem, (call, k))
                env[o].meta = dict(o.meta)
        else:
            if u.op == "get_attr":
                root[u.target] = fetch_attr(gm, u.target)
            env[u] = graph.node_copy(u, env.__getitem__)
    graph._codegen = gm.graph._codegen  # the model's call signature (pytree in/out specs)
    runner = fx.GraphModule(root, graph, class_name="LoweredModule")
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(runner, attr, getattr(gm, attr))
    return runner


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    # TVM's errors end with the message after a C++ traceback; take the last "Check failed"/message line
    for ln in reversed(lines):
        if "Check failed" in ln or "Error" in ln:
            return ln[:300]
    return (lines[-1] if lines else type(e).__name__)[:300]
