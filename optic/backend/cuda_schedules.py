"""CUDA schedules: a GPU template configuration becomes a scheduled TIR module.

Each builder in :data:`BUILDERS` takes an operator, a configuration of its GPU template (checked by
``codegen_cuda.build``, which is what callers use) and the element type, and returns a
``tvm.IRModule`` with one PrimFunc, ``main`` (parameters: the operator's inputs in
``Operator.input_shapes()`` order, then the output), scheduled with exactly the template's variables.
:func:`default_schedule` schedules a kernel no template covers with TVM's generic rules.

GEMM (the SIMT hierarchy the template describes; a matmul with ``cores="tensor"`` is
:mod:`.cuda_tensorcore`'s)::

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
  what made nvcc take minutes (see ``codegen_cuda._cuda_source``), so the shared-memory budget is the
  template's but the overlap is what the warp scheduler finds.

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

from collections.abc import Callable, Mapping
from typing import Any

from optic.autotune.operator import LAYERNORM_EPS, Operator
from optic.errors import OpticError
from optic.targets import Target
from optic.tvm_compat import require_tvm

from .cuda_config import F32, gpu_target, tensor_cores
from .cuda_tensorcore import matmul_tensorcore
from .tir_expr import elementwise_value, epilogue, padded  # the same fp32 expressions on both targets

__all__ = ["BUILDERS", "default_schedule", "notes", "schedule_injective"]

_LOAD_BYTES = 16  # a 128-bit vector: the widest store the write-back issues (as the template's LOAD_BYTES)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def notes(operator: Operator, config: Mapping[str, int]) -> list[str]:
    """Where the schedule of ``config`` departs from the template's letter (scalar copies at a masked edge)."""
    out = []
    if operator.op == "matmul" and not tensor_cores(operator):  # the tensor-core template has no masked edges
        M, N, K = operator.args
        vec = config["VEC"]
        if K % vec:
            out.append(f"K={K} is not a multiple of VEC={vec}: A (and K-major B) copied with scalar loads")
        if operator.opts["b_layout"] == "kn" and N % vec:
            out.append(f"N={N} is not a multiple of VEC={vec}: B copied with scalar loads")
    return out


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

    As = te.compute((Mp, Kp), lambda i, k: padded(tvm, [inside(i, M, Mp), inside(k, K, Kp)], A[i, k]),
                    name="A_shared")
    if kn:
        Bs = te.compute((Kp, Np), lambda k, j: padded(tvm, [inside(k, K, Kp), inside(j, N, Np)], B[k, j]),
                        name="B_shared")
    else:
        Bs = te.compute((Np, Kp), lambda j, k: padded(tvm, [inside(j, N, Np), inside(k, K, Kp)], B[j, k]),
                        name="B_shared")
    k = te.reduce_axis((0, Kp), name="k")
    acc = te.compute((Mp, Np), lambda i, j: te.sum(
        As[i, k].astype(F32) * (Bs[k, j] if kn else Bs[j, k]).astype(F32), axis=k), name="C_local")
    bias = te.placeholder((N,), dtype, name="bias") if "bias" in epi else None
    residual = te.placeholder((M, N), dtype, name="residual") if "residual" in epi else None
    C = te.compute((M, N), lambda i, j: epilogue(
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
        return elementwise_value(tvm, o["fn"], [x[i].astype(F32) for x in xs])

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

    t = gpu_target(target)
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


def _matmul(operator: Operator, cfg: dict[str, int], dtype: str) -> Any:
    """A matmul's schedule: the tensor-core template's (``cuda_tensorcore``) for ``cores="tensor"``, else SIMT."""
    return (matmul_tensorcore if tensor_cores(operator) else matmul)(operator, cfg, dtype)


BUILDERS: dict[str, Callable[[Operator, dict[str, int], str], Any]] = {
    "matmul": _matmul, "elementwise": elementwise, "reduction": reduction,
}
