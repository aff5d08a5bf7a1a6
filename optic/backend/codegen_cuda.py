"""CUDA code generation: a GPU template configuration becomes a scheduled TIR module, CUDA source, a cubin.

``build(operator, config)`` returns a ``tvm.IRModule`` with one PrimFunc, ``main`` (parameters: the
operator's inputs in ``Operator.input_shapes()`` order, then the output), scheduled with exactly the
template's variables (``autotune.templates``: ``matmul_gpu``, ``elementwise_gpu``, ``reduction_gpu``).
``compile_cuda(operator, config, target)`` turns it into CUDA source for the target's ``sm_XX``,
compiles that with ``nvcc -cubin -Xptxas -v`` and reads back what ptxas allocated per kernel
(registers, spills, static shared memory) plus the dynamic shared memory TVM declared, next to the
limits the template's constraints were stated against: the verdict ``within_limits`` is the check
that a configuration the solver called valid really fits the hardware.

GEMM (the SIMT hierarchy the template describes)::

    blockIdx.x  over (Mp/BM) x (Np/BN)                  a BM x BN block tile of C
    threadIdx.x over (BM/WM, BN/WN, WM/TM, WN/TN)        warps, then the 32 threads of a warp's WM x WN tile
      acc[TM, TN] = 0                                     fp32 accumulators in registers
      for ko in Kp/BK                                     STAGES-deep software pipeline (multi-buffered)
        A_s[BM, BK], B_s[BK, BN] <- global                every thread copies equal VEC-wide vectors
        for ki in BK                                      (unrolled)
          a[TM] <- A_s, b[TN] <- B_s                      register fragments
          acc += a (x) b                                  TM x TN FMAs
      C[tile] = epilogue(acc)                             bias, residual, activation, cast; masked at edges

Edges: where the template lets a tile overhang an extent that is not a multiple of 16 (``BM < 2*M``),
the copies into shared memory zero-fill past the edge (a guarded read, never out of bounds) and only
the write-back is predicated. Shared memory is TVM's dynamic shared memory (one buffer for all stages,
so a block can use more than the 48 KiB a static allocation may).

What the schedule does not do, and why:

- The C tile is written from registers, not staged through shared memory: the template reserves the
  room (``BM*BN*ACC_BYTES <= SMEM``) but no staging is needed for correctness, and the direct store is
  coalesced along TN already.
- Vector loads need the contiguous extent to be a multiple of VEC (alignment): where a masked edge
  leaves it not (``K % VEC != 0``, which the template allows when ``K % 16 != 0``) the copies are
  scalar; :func:`notes` says so for a configuration.
- Pipelining is TVM's ``software_pipeline_stage`` annotation (InjectSoftwarePipeline): STAGES buffers
  of A_s and B_s, the copy of tile ``ko + STAGES - 1`` issued before the compute of tile ``ko``. The
  copies are synchronous (``ld.global`` then ``st.shared``), not ``cp.async``: TVM 0.27 lowers
  ``software_pipeline_async_stages`` only inside explicitly unrolled TIR, and explicit unrolling is
  what made nvcc take minutes (see ``_cuda_source``), so the shared-memory budget is the template's
  but the overlap is what the warp scheduler finds.

Memory-bound kernels:

- elementwise: a thread handles EPT elements as EPT/VEC vectors, a block THREADS threads; vector
  ``j`` of thread ``t`` in block ``b`` is at ``((b*EPT/VEC + j)*THREADS + t)*VEC`` (coalesced). The
  inputs are loaded a vector at a time into registers, so that a function TVM cannot vectorize (erf)
  does not turn the loads scalar. ``schedule_injective`` applies the same to a fused kernel's own TIR.
- reduction (softmax, layer norm): a block holds RPB rows, TPR threads per row (``threadIdx.y`` the
  row, ``threadIdx.x`` the thread of the row); each thread reduces its VEC-wide vectors into VEC
  partials, then TVM's cross-thread reduction (warp shuffles, and shared memory across warps when
  TPR > 32) combines them; the normalising pass is VEC-wide too.

conv2d is not generated here (see ``BUILDERS``): its implicit-GEMM gather (a TOH x TOW output patch
per block) needs its own index mapping, and no kernel of the transformer benchmarks is a conv.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optic import targets
from optic.autotune.operator import LAYERNORM_EPS, Operator
from optic.autotune.space import Space, SpaceError
from optic.autotune.templates import elementwise_gpu, matmul_gpu, reduction_gpu
from optic.errors import OpticError
from optic.targets import Target
from optic.tvm_compat import require_tvm

from .codegen_cpu import _elementwise_expr, _epilogue  # the same fp32 expressions on both targets

__all__ = ["BUILDERS", "CODEGEN_VERSION", "CompiledKernel", "PtxasKernel", "build", "compile_cuda",
           "compile_module", "default_schedule", "gpu_space", "model_config", "notes", "nvcc_version",
           "schedule_injective"]

CODEGEN_VERSION = 1
NVCC_TIMEOUT_S = 600

F32 = "float32"
_LOAD_BYTES = 16  # a 128-bit vector: the widest store the write-back issues (as the template's LOAD_BYTES)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _dtype(operator: Operator, dtype: str | None) -> str:
    """The element type: ``dtype`` when given (the Operator accepts only float32 so far), else the operator's."""
    d = str(dtype or operator.opts.get("dtype", F32)).removeprefix("torch.")
    d = {"fp16": "float16", "half": "float16", "fp32": F32, "float": F32}.get(d, d)
    if d not in (F32, "float16"):
        raise SpaceError(f"CUDA code generation takes float32 or float16, not {d}")
    return d


def gpu_space(operator: Operator, target: str | Target, dtype: str | None = None) -> Space:
    """The GPU template's space for ``operator`` on ``target``: ``Operator.space`` with the element type
    ``dtype`` and, for a matmul, the B layout the code generator reads (``b_layout="kn"``: N contiguous)."""
    t = targets.get(target)
    if t.kind != "gpu":
        raise SpaceError(f"target {t.name} is a {t.kind}; CUDA code generation needs a GPU target")
    d = _dtype(operator, dtype)
    o = operator.opts
    if operator.op == "matmul":
        M, N, K = operator.args
        return matmul_gpu(M, N, K, t, dtype=d, epilogue=tuple(o.get("epilogue", ())),
                          b_contiguous="n" if o["b_layout"] == "kn" else "k")
    if operator.op == "elementwise":
        return elementwise_gpu(operator.args[0], t, dtype=d, inputs=o["inputs"])
    if operator.op == "reduction":
        return reduction_gpu(*operator.args, t, kind=o["kind"], dtype=d)
    raise SpaceError(f"no CUDA code generator for {operator.op}; known: {sorted(BUILDERS)}")


def model_config(operator: Operator, target: str | Target, dtype: str | None = None) -> dict[str, int]:
    """The cost model's best valid configuration of ``operator`` on the GPU ``target`` (nothing can be
    measured here); ``SpaceError`` when no configuration fits the sizes."""
    from optic.autotune import cost_model
    from optic.autotune.solver import solve

    space = gpu_space(operator, target, dtype)
    solved = solve(space)
    if not solved.valid:
        raise SpaceError(f"no configuration of {space.name} fits these sizes")
    order, _ = cost_model.rank(space, solved.names, solved.rows, targets.get(target))
    return dict(zip(solved.names, (int(v) for v in solved.rows[int(order[0])]), strict=True))


def build(operator: Operator, config: Mapping[str, int], dtype: str | None = None) -> Any:
    """The scheduled TIR module (``main``) of ``operator`` with the GPU template ``config``.

    ``dtype``: the element type (float32 or float16), by default the operator's. The configuration
    must satisfy the template's constraints (it is checked: an invalid one raises ``SpaceError``,
    never builds), with the target's limits for any GPU: the schedule reads only the variables."""
    if operator.op not in BUILDERS:
        raise SpaceError(f"no CUDA code generator for {operator.op}; known: {sorted(BUILDERS)}")
    cfg = dict(config)
    d = _dtype(operator, dtype)
    space = gpu_space(operator, targets.get("a100"), d)  # the shapes' constraints; limits are checked per target
    missing = sorted(set(space.names) - set(cfg))
    if missing:
        raise SpaceError(f"configuration for {space.name} lacks {', '.join(missing)}")
    return BUILDERS[operator.op](operator, cfg, d)


def notes(operator: Operator, config: Mapping[str, int]) -> list[str]:
    """Where the schedule of ``config`` departs from the template's letter (scalar copies at a masked edge)."""
    out = []
    if operator.op == "matmul":
        M, N, K = operator.args
        vec = config["VEC"]
        if K % vec:
            out.append(f"K={K} is not a multiple of VEC={vec}: A (and K-major B) copied with scalar loads")
        if operator.opts["b_layout"] == "kn" and N % vec:
            out.append(f"N={N} is not a multiple of VEC={vec}: B copied with scalar loads")
    return out


# -- expressions -------------------------------------------------------------------------------------------


def _guard(tvm: Any, conds: list[Any], value: Any) -> Any:
    conds = [c for c in conds if c is not None]
    if not conds:
        return value
    cond = tvm.tirx.all(*conds) if len(conds) > 1 else conds[0]
    return tvm.tirx.if_then_else(cond, value, tvm.tirx.const(0, value.dtype))


# -- GEMM ------------------------------------------------------------------------------------------------


def _vector_width(lanes_max: int, extent: int, tile: int) -> int:
    """The widest power-of-two vector <= ``lanes_max`` that divides both ``tile`` and ``extent``."""
    w = 1
    while w * 2 <= lanes_max and tile % (w * 2) == 0 and extent % (w * 2) == 0:
        w *= 2
    return w


def _cooperative_copy(s: Any, block: Any, ko: Any, threads: int, vec: int) -> None:
    """Spread a shared-memory tile's copy over the block's threads, ``vec`` contiguous elements each."""
    fused = s.fuse(*_inner_loops(s, block, ko))  # the tile's two axes (both at least 16)
    _, t, v = s.split(fused, [None, threads, vec])
    s.bind(t, "threadIdx.x")
    if vec > 1:
        s.vectorize(v)


def matmul(operator: Operator, cfg: dict[str, int], dtype: str) -> Any:
    """``C[M, N] = epilogue(A[M, K] @ B)`` with B ``[K, N]`` (``b_layout="kn"``) or ``[N, K]``."""
    tvm = require_tvm()
    te = tvm.te
    M, N, K = operator.args
    o = operator.opts
    kn = o["b_layout"] == "kn"
    epi = tuple(o.get("epilogue", ()))
    BM, BN, BK, WM, WN, TM, TN, STAGES, VEC = (cfg[v] for v in ("BM", "BN", "BK", "WM", "WN", "TM", "TN",
                                                                 "STAGES", "VEC"))
    threads = BM * BN // (TM * TN)
    Mp, Np, Kp = _cdiv(M, BM) * BM, _cdiv(N, BN) * BN, _cdiv(K, BK) * BK
    A = te.placeholder((M, K), dtype, name="A")
    B = te.placeholder((K, N) if kn else (N, K), dtype, name="B")

    def inside(i: Any, extent: int, padded: int) -> Any:
        return i < extent if padded != extent else None

    As = te.compute((Mp, Kp), lambda i, k: _guard(tvm, [inside(i, M, Mp), inside(k, K, Kp)], A[i, k]),
                    name="A_shared")
    if kn:
        Bs = te.compute((Kp, Np), lambda k, j: _guard(tvm, [inside(k, K, Kp), inside(j, N, Np)], B[k, j]),
                        name="B_shared")
    else:
        Bs = te.compute((Np, Kp), lambda j, k: _guard(tvm, [inside(j, N, Np), inside(k, K, Kp)], B[j, k]),
                        name="B_shared")
    k = te.reduce_axis((0, Kp), name="k")
    acc = te.compute((Mp, Np), lambda i, j: te.sum(
        As[i, k].astype(F32) * (Bs[k, j] if kn else Bs[j, k]).astype(F32), axis=k), name="C_local")
    bias = te.placeholder((N,), dtype, name="bias") if "bias" in epi else None
    residual = te.placeholder((M, N), dtype, name="residual") if "residual" in epi else None
    C = te.compute((M, N), lambda i, j: _epilogue(
        tvm, acc[i, j], epi, bias[j].astype(F32) if bias is not None else None,
        residual[i, j].astype(F32) if residual is not None else None).astype(dtype), name="C")
    extra = [t for t in (bias, residual) if t is not None]
    s = tvm.s_tir.Schedule(te.create_prim_func([A, B, *extra, C]))

    cl = s.get_sblock("C_local")
    i, j, kk = s.get_loops(cl)
    bi, wi, ti, mi = s.split(i, [Mp // BM, BM // WM, WM // TM, TM])
    bj, wj, tj, nj = s.split(j, [Np // BN, BN // WN, WN // TN, TN])
    ko, ki = s.split(kk, [Kp // BK, BK])
    s.reorder(bi, bj, wi, wj, ti, tj, ko, ki, mi, nj)
    bx = s.fuse(bi, bj)
    s.bind(bx, "blockIdx.x")
    # Warps first, then a warp's threads: 32 consecutive thread ids own one WM x WN warp tile.
    tx = s.fuse(wi, wj, ti, tj)
    s.bind(tx, "threadIdx.x")
    s.set_scope(cl, 0, "local")

    wb = s.get_sblock("C")
    s.reverse_compute_at(wb, tx)
    wb_loops = _named_loops(s, wb, tx, [("m", TM), ("n", TN)])
    # The epilogue computes in fp32, so a store is at most 4 lanes (a 128-bit fp32 vector): TVM 0.27's
    # CUDA code for 8-lane fp32 vectors (fp16 C, 8 lanes) does not compile.
    out_vec = _vector_width(_LOAD_BYTES // _itemsize(F32), N, TN) if Np == N else 1
    if out_vec > 1:
        wb_loops["n"], lane = s.split(wb_loops["n"], [None, out_vec])
        s.vectorize(lane)
    for loop in wb_loops.values():  # constant indices into the accumulators keep them in registers
        s.unroll(loop)

    a_s, b_s = s.get_sblock("A_shared"), s.get_sblock("B_shared")
    for blk in (a_s, b_s):
        # Scope first: compute_at then relaxes the region over the thread loops (a tile every thread shares).
        s.set_scope(blk, 0, "shared.dyn")
        s.compute_at(blk, ko)
    # Vector width of a copy: VEC along the contiguous axis, when the global rows keep vectors aligned.
    _cooperative_copy(s, a_s, ko, threads, VEC if K % VEC == 0 else 1)
    b_vec = VEC if (N if kn else K) % VEC == 0 else 1
    _cooperative_copy(s, b_s, ko, threads, b_vec)

    a_r = s.cache_read(cl, 0, "local")
    b_r = s.cache_read(cl, 1, "local")
    s.compute_at(a_r, ki)
    s.compute_at(b_r, ki)
    init = s.decompose_reduction(cl, ko)
    # The thread tile's loops unrolled: constant indices keep accumulators and fragments in registers.
    for blk, outer in ((init, tx), (cl, ki), (a_r, ki), (b_r, ki)):
        for loop in _inner_loops(s, blk, outer):
            s.unroll(loop)
    # ki stays a loop: nvcc unrolls it as far as it sees fit (fully unrolled, a 4 x 16 tile over a
    # 32-deep K tile took ptxas minutes).
    if STAGES > 1:
        # Children of ko: the A copy, the B copy, the compute (ki); copies run STAGES-1 tiles ahead.
        s.annotate(ko, "software_pipeline_stage", [0, 0, STAGES - 1])
        s.annotate(ko, "software_pipeline_order", [0, 1, 2])
    return s.mod


def _has(s: Any, name: str) -> bool:
    try:
        s.get_sblock(name)
    except Exception:  # TVM raises its own error type for a missing block
        return False
    return True


def _inner_loops(s: Any, block: Any, outer: Any) -> list[Any]:
    """The loops of ``block`` nested inside ``outer``."""
    loops = s.get_loops(block)
    refs = [s.get_sref(lp) for lp in loops]
    at = refs.index(s.get_sref(outer))
    return list(loops[at + 1:])


def _itemsize(dtype: str) -> int:
    return {F32: 4, "float16": 2}[dtype]


# -- elementwise -----------------------------------------------------------------------------------------


def schedule_injective(func: Any, cfg: Mapping[str, int], stage_inputs: int = 0) -> Any:
    """Schedule an injective PrimFunc (any kernel whose blocks are all elementwise, broadcast or
    reshape) with the ``elementwise_gpu`` configuration: every block but the output's is inlined,
    the output's loops fused into one of NUMEL elements, written VEC at a time.

    ``stage_inputs``: how many 1-D inputs of NUMEL elements the output block reads; each is loaded
    VEC elements at a time into registers and the output computed there, so the loads stay vector
    loads even where the computation (erf, tanh) does not vectorize and would scalarize the loop."""
    tvm = require_tvm()
    s = tvm.s_tir.Schedule(func)
    blocks = s.get_child_blocks(s.get_sblock("root"))
    for b in blocks[:-1]:
        s.compute_inline(b)
    out = s.get_child_blocks(s.get_sblock("root"))[-1]
    staged = [s.cache_read(out, i, "local") for i in range(stage_inputs)]
    compute = None
    if stage_inputs:  # cache_write returns the copy to the output; ``out`` now computes into registers
        compute, out = out, s.cache_write(out, 0, "local")
    loops = s.get_loops(out)
    flat = s.fuse(*loops) if len(loops) > 1 else loops[0]
    THREADS, EPT, VEC = cfg["THREADS"], cfg["EPT"], cfg["VEC"]
    # Vectors first (the template guarantees NUMEL % VEC == 0, so this split is exact and the edge
    # predicate below never cuts a vector), then blocks x EPT/VEC vectors x THREADS threads.
    vecs, lane = s.split(flat, [None, VEC])
    bx, j, tx = s.split(vecs, [None, EPT // VEC, THREADS])
    s.reorder(bx, tx, j, lane)
    s.bind(bx, "blockIdx.x")
    s.bind(tx, "threadIdx.x")
    s.unroll(j)
    if compute is not None:
        s.compute_at(compute, j)
        for blk in staged:
            s.compute_at(blk, j)
            if VEC > 1:
                s.vectorize(_inner_loops(s, blk, j)[-1])
    if VEC > 1:
        s.vectorize(lane)
    return s.mod


def elementwise(operator: Operator, cfg: dict[str, int], dtype: str) -> Any:
    """``out[i] = fn(x0[i], x1[i], ...)`` (fn computed in fp32), THREADS x EPT elements a block."""
    tvm = require_tvm()
    te = tvm.te
    (numel,) = operator.args
    o = operator.opts
    xs = [te.placeholder((numel,), dtype, name=f"x{i}") for i in range(o["inputs"])]

    def value(i: Any) -> Any:  # in fp32, as the CPU generator computes it
        return _elementwise_expr(tvm, o["fn"], [x[i].astype(F32) for x in xs])

    C = te.compute((numel,), lambda i: value(i).astype(dtype), name="C")
    return schedule_injective(te.create_prim_func([*xs, C]), cfg, stage_inputs=len(xs))


# -- reductions ------------------------------------------------------------------------------------------


def reduction(operator: Operator, cfg: dict[str, int], dtype: str) -> Any:
    """Softmax or layer norm (no affine parameters, as the Operator defines it) over the last axis."""
    tvm = require_tvm()
    te = tvm.te
    rows, cols = operator.args
    kind = operator.opts["kind"]
    TPR, RPB, VEC = cfg["TPR"], cfg["RPB"], cfg["VEC"]
    steps = _cdiv(cols, TPR * VEC)
    X = te.placeholder((rows, cols), dtype, name="X")
    lowest = tvm.tirx.const(-3.4028234663852886e38, F32)

    def stat(name: str, value: Callable[[Any, Any], Any], combine: str) -> Any:
        """``stat[r] = combine_c value(r, c)``: each thread folds its VEC-wide vectors into VEC partials
        (``name_part``, registers), the row's threads combine those (a cross-thread reduction)."""
        identity = lowest if combine == "max" else tvm.tirx.const(0.0, F32)
        reducer = te.max if combine == "max" else te.sum
        step = te.reduce_axis((0, steps), name=f"{name}_step")

        def lane_value(r: Any, t: Any, v: Any) -> Any:
            col = (step * TPR + t) * VEC + v
            if steps * TPR * VEC == cols:
                return value(r, col)
            # Whole vectors past the row's end (COLS % VEC == 0: never part of one): the identity.
            return tvm.tirx.if_then_else(col < cols, value(r, col), identity)

        part = te.compute((rows, TPR, VEC), lambda r, t, v: reducer(lane_value(r, t, v), axis=step),
                          name=f"{name}_part")
        t = te.reduce_axis((0, TPR), name=f"{name}_t")
        v = te.reduce_axis((0, VEC), name=f"{name}_v")
        return te.compute((rows,), lambda r: reducer(part[r, t, v], axis=[t, v]), name=name)

    def x(r: Any, c: Any) -> Any:
        return X[r, c].astype(F32)

    if kind == "softmax":
        mx = stat("stat0", x, "max")
        sm = stat("stat1", lambda r, c: tvm.tirx.exp(x(r, c) - mx[r]), "sum")
        Y = te.compute((rows, cols), lambda r, c: (tvm.tirx.exp(x(r, c) - mx[r]) / sm[r]).astype(dtype), name="C")
    else:
        mean = stat("stat0", lambda r, c: x(r, c) * (1.0 / cols), "sum")
        var = stat("stat1", lambda r, c: (x(r, c) - mean[r]) * (x(r, c) - mean[r]) * (1.0 / cols), "sum")
        Y = te.compute((rows, cols), lambda r, c: ((x(r, c) - mean[r]) * te.rsqrt(var[r] + LAYERNORM_EPS))
                       .astype(dtype), name="C")
    s = tvm.s_tir.Schedule(te.create_prim_func([X, Y]))

    out = s.get_sblock("C")
    r, c = s.get_loops(out)
    bx, ty = s.split(r, [None, RPB])
    s.bind(bx, "blockIdx.x")
    s.bind(ty, "threadIdx.y")
    cv, lane = s.split(c, [None, VEC])  # COLS % VEC == 0 (a template constraint): exact
    step, tx = s.split(cv, [None, TPR])
    s.reorder(tx, step, lane)
    s.bind(tx, "threadIdx.x")
    if VEC > 1:
        s.vectorize(lane)
    for name in ("stat1", "stat0"):
        blk = s.get_sblock(name)
        s.compute_at(blk, ty)
        s.set_scope(blk, 0, "local")  # every thread of the row holds the row's statistic
        part = s.get_sblock(f"{name}_part")
        s.compute_at(part, ty)
        s.set_scope(part, 0, "local")
    for name in ("stat0", "stat1"):
        # compute_at made only the loops of extent > 1: name them by their extents.
        loops = _named_loops(s, s.get_sblock(name), ty, [("t", TPR), ("v", VEC)])
        if "t" in loops:
            s.bind(loops["t"], "threadIdx.x")
        loops = _named_loops(s, s.get_sblock(f"{name}_part"), ty, [("t", TPR), ("v", VEC), ("step", steps)])
        if "t" in loops:
            s.bind(loops["t"], "threadIdx.x")
        if "v" in loops:
            if "step" in loops:
                s.reorder(loops["step"], loops["v"])
            # The partials' init stays in the block (a decomposed one is no reduction to vectorize).
            s.vectorize(loops["v"])
    return s.mod


def _named_loops(s: Any, block: Any, outer: Any, expected: list[tuple[str, int]]) -> dict[str, Any]:
    """The loops of ``block`` inside ``outer``, named after ``expected`` (name, extent) in nesting order,
    where TVM left out the loops of extent 1."""
    names = [n for n, extent in expected if extent > 1]
    loops = _inner_loops(s, block, outer)
    extents = [int(s.get(lp).extent) for lp in loops]
    assert extents == [e for _, e in expected if e > 1], (extents, expected)
    return dict(zip(names, loops, strict=True))


def default_schedule(func: Any, target: str | Target) -> tuple[Any, str]:
    """A kernel no template covers, scheduled by TVM's generic GPU rules (dlight): ``(module, rule name)``.
    Rules are tried in dlight's usual order; ``Fallback`` takes any kernel the others decline."""
    tvm = require_tvm()
    from tvm.s_tir import dlight as dl

    t = _gpu_target(target)
    tgt = tvm.target.Target({"kind": "cuda", "arch": t.arch})
    func = func.with_attr("global_symbol", "main")
    for rule in (dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(), dl.gpu.Reduction(),
                 dl.gpu.GeneralReduction(), dl.gpu.Transpose(), dl.gpu.Fallback()):
        with tgt:
            try:
                sch = rule.apply(func, tgt, False)
            except Exception:  # a rule that matched the pattern but cannot schedule it: the next rule
                continue
        if sch is None:
            continue
        sch = sch[0] if isinstance(sch, list) else sch
        return sch.mod, type(rule).__name__
    raise OpticError("no dlight rule could schedule this kernel for CUDA")


BUILDERS: dict[str, Callable[[Operator, dict[str, int], str], Any]] = {
    "matmul": matmul, "elementwise": elementwise, "reduction": reduction,
}


# -- CUDA source, nvcc, ptxas ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PtxasKernel:
    """What ptxas allocated for one ``__global__`` function (``-Xptxas -v``)."""

    name: str
    registers: int
    static_smem: int  # bytes of __shared__ arrays; dynamic shared memory is not in ptxas's figure
    spill_stores: int = 0
    spill_loads: int = 0
    stack_frame: int = 0


@dataclass
class CompiledKernel:
    """A configuration compiled for a GPU, what ptxas allocated, and whether that fits the limits.

    ``compiled`` is False when nvcc is absent or refused the arch (``reason`` says which); then the
    ptxas figures are empty and ``within_limits`` is None. ``limits`` are the target's figures the
    template's constraints were stated with (``regs_per_thread``, ``regs_per_sm``, ``smem_per_block``,
    ``threads_per_block``); ``expected`` what the template's derived quantities say for this
    configuration (its register estimate, shared-memory bytes, threads)."""

    name: str
    target: str
    arch: str
    config: dict[str, int]
    source: str
    compiled: bool
    reason: str = ""
    kernels: list[PtxasKernel] = field(default_factory=list)
    threads: int = 0  # threads per block of the (largest) kernel, from the launch TVM generated
    dynamic_smem: int = 0  # bytes of dynamic shared memory TVM declared (the largest kernel's)
    limits: dict[str, int] = field(default_factory=dict)
    expected: dict[str, float] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    codegen_seconds: float = 0.0
    nvcc_seconds: float = 0.0
    cu_path: str | None = None
    module: Any = field(default=None, repr=False, compare=False)  # the scheduled TIR module the source came from

    @property
    def registers(self) -> int:
        return max((k.registers for k in self.kernels), default=0)

    @property
    def smem(self) -> int:
        """Shared memory per block: ptxas's static bytes plus TVM's dynamic bytes (largest kernel)."""
        return max((k.static_smem for k in self.kernels), default=0) + self.dynamic_smem

    @property
    def spills(self) -> int:
        return max((k.spill_stores + k.spill_loads for k in self.kernels), default=0)

    @property
    def within_limits(self) -> bool | None:
        return None if not self.compiled else not self.violations

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "target": self.target, "arch": self.arch, "config": self.config,
                "compiled": self.compiled, "reason": self.reason, "registers": self.registers,
                "smem": self.smem, "dynamic_smem": self.dynamic_smem, "threads": self.threads,
                "spills": self.spills, "kernels": [vars(k) for k in self.kernels], "limits": self.limits,
                "expected": self.expected, "within_limits": self.within_limits, "violations": self.violations,
                "notes": self.notes, "codegen_seconds": round(self.codegen_seconds, 3),
                "nvcc_seconds": round(self.nvcc_seconds, 3)}


def target_limits(t: Target) -> dict[str, int]:
    """The per-block and per-thread limits a kernel must fit on ``t`` (the templates' parameters)."""
    return {"regs_per_thread": t.regs_per_thread, "regs_per_sm": t.regs_per_sm,
            "smem_per_block": t.smem_per_block, "threads_per_block": t.max_threads_per_block}


def _gpu_target(target: str | Target) -> Target:
    t = targets.get(target)
    if t.kind != "gpu" or not t.arch:
        raise OpticError(f"target {t.name} is a {t.kind}; CUDA code generation needs a GPU target "
                         f"(one of {', '.join(g for g in targets.names() if targets.get(g).kind == 'gpu')})")
    return t


def compile_cuda(operator: Operator, config: Mapping[str, int], target: str | Target, *,
                 dtype: str | None = None, workdir: str | os.PathLike | None = None) -> CompiledKernel:
    """Build ``operator`` with ``config`` for ``target``'s arch, compile it with nvcc when present, and
    check ptxas's registers and shared memory against the limits the template's constraints used.

    An invalid configuration (one the solver would not produce) raises ``SpaceError``; a missing
    nvcc, or one that does not know the arch, gives ``compiled=False`` with the reason."""
    t = _gpu_target(target)
    space = gpu_space(operator, t, dtype)
    cfg = {n: int(config[n]) for n in space.names if n in config}
    problems = space.check(cfg) if len(cfg) == len(space.names) else [
        f"missing {', '.join(sorted(set(space.names) - set(cfg)))}"]
    if problems:
        raise SpaceError(f"configuration {cfg} is not valid for {space.name}: {'; '.join(problems)}")
    start = time.perf_counter()
    mod = build(operator, cfg, dtype)
    built = time.perf_counter() - start
    expected = {k: float(space.evaluate(v, cfg)) for k, v in space.derived.items()
                if k in ("threads", "smem_bytes", "regs_per_thread")}
    if operator.op == "elementwise":
        expected["threads"] = float(cfg["THREADS"])
    result = compile_module(mod, t, name=str(operator), config=cfg, expected=expected, workdir=workdir)
    result.codegen_seconds += built
    result.notes = notes(operator, cfg)
    if result.compiled and "threads" in expected and result.threads != expected["threads"]:
        result.violations.append(f"threads per block {result.threads} != the template's {expected['threads']:g}")
    return result


def compile_module(mod: Any, target: str | Target, *, name: str = "main", config: Mapping[str, int] | None = None,
                   expected: Mapping[str, float] | None = None,
                   workdir: str | os.PathLike | None = None) -> CompiledKernel:
    """CUDA source of a scheduled TIR module for ``target``, compiled with nvcc (when on PATH), and the
    ptxas figures checked against the target's limits (any module: a template's, or a default schedule)."""
    tvm = require_tvm()
    t = _gpu_target(target)
    start = time.perf_counter()
    try:
        source, dyn_smem, threads = _cuda_source(tvm, mod, t)
    except OpticError:
        raise
    except Exception as e:
        raise OpticError(f"TVM could not generate CUDA for {name} ({t.arch}): "
                         f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}") from None
    codegen = time.perf_counter() - start
    result = CompiledKernel(name=name, target=t.name, arch=t.arch, config=dict(config or {}), source=source,
                            compiled=False, threads=max(threads, default=0), dynamic_smem=max(dyn_smem, default=0),
                            limits=target_limits(t), expected=dict(expected or {}), codegen_seconds=codegen,
                            module=mod)
    if shutil.which("nvcc") is None:
        result.reason = "not compiled: nvcc is not on PATH (the CUDA source was generated)"
        return result
    with _workdir(workdir) as d:
        cu = Path(d) / f"{_file_stem(name)}_{t.arch}.cu"
        cu.write_text(source)
        result.cu_path = str(cu) if workdir is not None else None
        start = time.perf_counter()
        try:
            proc = subprocess.run(["nvcc", "-cubin", f"-arch={t.arch}", "-Xptxas", "-v", "-o",
                                   str(cu.with_suffix(".cubin")), str(cu)], capture_output=True, text=True,
                                  timeout=NVCC_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            result.reason = f"nvcc took over {NVCC_TIMEOUT_S} s for {t.arch}; not compiled"
            return result
        finally:
            result.nvcc_seconds = time.perf_counter() - start
    if proc.returncode != 0:
        result.reason = f"nvcc failed for {t.arch}: {_nvcc_error(proc.stderr or proc.stdout)}"
        return result
    result.compiled = True
    result.kernels = parse_ptxas(proc.stderr + proc.stdout)
    if not result.kernels:
        result.compiled = False
        result.reason = "nvcc succeeded but ptxas reported no kernel"
        return result
    result.violations = _violations(result)
    return result


def _violations(r: CompiledKernel) -> list[str]:
    lim, out = r.limits, []
    for k in r.kernels:
        if k.registers > lim["regs_per_thread"]:
            out.append(f"{k.name}: {k.registers} registers per thread > {lim['regs_per_thread']}")
        if r.threads and k.registers * r.threads > lim["regs_per_sm"]:
            out.append(f"{k.name}: {k.registers} registers x {r.threads} threads > {lim['regs_per_sm']} per SM")
        if k.static_smem + r.dynamic_smem > lim["smem_per_block"]:
            out.append(f"{k.name}: {k.static_smem} + {r.dynamic_smem} bytes of shared memory > "
                       f"{lim['smem_per_block']} per block")
    if r.threads > lim["threads_per_block"]:
        out.append(f"{r.threads} threads per block > {lim['threads_per_block']}")
    return out


class _workdir:
    """The given directory (kept), or a temporary one (removed)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path, self._tmp = path, None

    def __enter__(self) -> str:
        if self.path is not None:
            Path(self.path).mkdir(parents=True, exist_ok=True)
            return str(self.path)
        self._tmp = tempfile.TemporaryDirectory(prefix="optic-cuda-")
        return self._tmp.name

    def __exit__(self, *exc: Any) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[:80] or "kernel"


def _nvcc_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() or "fatal" in ln.lower()]
    return (errors or lines or ["(no message)"])[0][:300]


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(text: str) -> list[PtxasKernel]:
    """Per-kernel figures from ``ptxas -v`` output (``Compiling entry function 'f'`` then its lines)."""
    out: list[PtxasKernel] = []
    current: dict[str, Any] | None = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            if current:
                out.append(PtxasKernel(**current))
            current = {"name": m.group(1), "registers": 0, "static_smem": 0}
            continue
        if current is None:
            continue
        m = _SPILL.search(line)
        if m:
            current.update(stack_frame=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _USED.search(line)
        if m:
            current["registers"] = int(m.group(1))
            current["static_smem"] = int(m.group(2) or 0)
    if current:
        out.append(PtxasKernel(**current))
    return out


def nvcc_version() -> str | None:
    """``nvcc --version``'s release line, or None without nvcc."""
    if shutil.which("nvcc") is None:
        return None
    proc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=60)
    m = re.search(r"release [^\n]*", proc.stdout)
    return m.group(0) if m else proc.stdout.strip().splitlines()[-1]


def _cuda_source(tvm: Any, mod: Any, t: Target) -> tuple[str, list[int], list[int]]:
    """CUDA source of ``mod`` for ``t``, with each kernel's dynamic shared-memory bytes and threads per block.

    This is ``tvm.tirx.build`` up to the device code generator (TVM's build would also compile the
    source itself, through NVRTC, which nvcc does here instead)."""
    # The module, which ``tvm.tirx.build`` (the function) hides as an attribute.
    from tvm.tirx.build import split_host_device_mods

    target = tvm.target.Target({"kind": "cuda", "arch": t.arch}, host={"kind": "llvm"})
    if isinstance(mod, tvm.tirx.PrimFunc):
        mod = tvm.IRModule.from_expr(mod)
    mod = tvm.tirx.transform.BindTarget(target)(mod)
    pipeline, _, finalize_device = tvm.tirx.get_default_tir_pipeline(target)
    # Loops marked unrolled reach nvcc as ``#pragma unroll`` loops, not as unrolled TIR: a 4 x 16
    # thread tile over a 32-deep K tile is otherwise megabytes of source and minutes of nvcc.
    with target, tvm.transform.PassContext(config={"tirx.UnrollLoop": {"explicit_unroll": False}}):
        mod = pipeline(mod)
        _, devices = split_host_device_mods(mod)
        device = [finalize_device()(m) for m in devices.values()]
    dyn, threads = [], []
    for dmod in device:
        for _, func in dmod.functions_items():
            d, th = _launch_figures(func)
            dyn.append(d)
            threads.append(th)
    sources = []
    for dmod in device:
        bf = tvm.get_global_func("target.build.cuda")
        sources.append(bf(dmod, target).inspect_source())
    return "\n".join(sources), dyn, threads


def _launch_figures(func: Any) -> tuple[int, int]:
    """``(dynamic shared-memory bytes, threads per block)`` of one device kernel, read from its TVMScript
    (TVM's Python API has no TIR visitor in 0.27): the ``shared.dyn`` allocations TVM merged, and the
    ``threadIdx`` extents it launches."""
    text = re.sub(r"T\.u?int(?:32|64)\((\d+)\)", r"\1", func.script())  # T.int64(1024) -> 1024
    dyn = 0
    for shape, dtype in _DYN_ALLOC.findall(text):
        dims = [int(d) for d in shape.replace(" ", "").strip(",").split(",") if d]
        dyn += math.prod(dims) * _DTYPE_BYTES[dtype]
    extents = {tag: int(n) for tag, n in _THREAD.findall(text)}
    return dyn, math.prod(extents.values()) if extents else 1


_DYN_ALLOC = re.compile(r'alloc_buffer\(\(([\d, ]+)\),\s*"(\w+)",\s*scope="shared\.dyn"')
_THREAD = re.compile(r'launch_thread\("(threadIdx\.[xyz])",\s*(\d+)\)')
_DTYPE_BYTES = {"uint8": 1, "int8": 1, "float16": 2, "bfloat16": 2, "float32": 4, "int32": 4, "float64": 8}
