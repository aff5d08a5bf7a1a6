"""Tensor-core GEMM: a ``matmul_tensorcore_gpu`` configuration becomes a scheduled TIR module.

``C[M, N] = epilogue(A[M, K] @ B)`` with B ``[N, K]`` (an nn.Linear weight, ``b_layout="nk"``) or
``[K, N]``, for an operator with ``cores="tensor"``; the hierarchy the template describes::

    blockIdx.x  over (M/BM) x (N/BN)                        a BM x BN block tile of C
    threadIdx.y over (BM/WM) x (BN/WN)                      warps, each a WM x WN warp tile
    threadIdx.x 32                                          the lanes of a warp (inside the intrinsics)
      acc = 0                                               MMA_fill: fp32 (int32) fragments in registers
      for ko in K/BK                                        STAGES-deep ring of shared-memory tiles
        A_s[BM, BK], B_s <- global                          cp.async, VEC elements a copy, rows padded
        for kk in BK/MMA_K
          a[WM/16] <- ldmatrix(A_s), b[WN/16] <- ldmatrix(B_s)
          acc[WM/16, WN/16] += mma.sync(a, b)                two m16n8kK instructions per 16 x 16 tile
      C_s[WM, WN] <- acc                                    each warp stages its tile (the ring's memory)
      C[tile] = epilogue(C_s)                               bias, residual, activation in fp32; cast; 4 lanes

The tensor intrinsics are TVM's (``tvm.s_tir.tensor_intrin.cuda``: ldmatrix, mma, fill, store), and
the recipe is the one TVM's own mma tests use (``tvm.testing.tir.mma_schedule``): blockize the
16 x 16 x MMA_K tile, cache the operands in ``warp`` scope, lay the fragments out with the
ldmatrix index maps, tensorize. What TVM 0.27 does and does not give, as found here:

- ``cp.async`` works: the ring is TVM's software pipeline (``software_pipeline_stage``) with its
  copy stage asynchronous (``software_pipeline_async_stages``), lowered with
  ``tirx.use_async_copy``. Its ``cp.async.wait_group`` counts are immediate operands, which in the
  pipeline's drain loop are constants only once that loop is unrolled in TIR, so this kernel asks
  ``codegen_cuda`` for explicit unrolling (function attributes :data:`LOWER_EXPLICIT_UNROLL`,
  :data:`LOWER_ASYNC_COPY`). That is what the SIMT template could not afford (its unrolled thread
  tiles are megabytes of source); here the unrolled loops are the warp's fragment loops, a few
  dozen intrinsic calls.
- ``wgmma`` (sm_90's warpgroup MMA) is not used: TVM 0.27 has no schedulable tensor intrinsic for
  it (``s_tir.tensor_intrin.cuda`` registers mma.sync and wmma only). Its PTX table lists
  ``wgmma.mma_async`` as a raw instruction for hand-written tirx kernels, and its tile primitives'
  asynchronous GEMM targets only tcgen05 (sm_100); a wgmma kernel would be written by hand, with
  TMA descriptors and warpgroup register layouts, not scheduled from this template. On an H100 this
  kernel is an mma.sync kernel (the cost model discounts the peak accordingly).
- bfloat16: TVM 0.27's ldmatrix generator asserts float16 for 16-deep tiles and its mma generator
  has no bf16 spelling, so there is no bf16 intrinsic to tensorize with; the template refuses it.
- int8 (``mma.sync.m16n8k32``, int32 accumulators): TVM registers its int8 ldmatrix and int32 store
  for static shared memory only; the variants for dynamic shared memory are registered here from
  TVM's own generators (:func:`_intrinsics`). Its B ``[K, N]`` ldmatrix is not an ldmatrix (TVM
  lowers it to a loop of loads); B ``[N, K]`` is.
- The A and B fragments are not always in registers: TVM's ``LowerWarpMemory`` does not rewrite
  the ``warp``-scope fragment buffers that only the ldmatrix and mma intrinsics touch, so each
  thread declares the warp's whole fragment array and indexes it at ``threadIdx.x * lanes``. nvcc
  promotes it to registers for one 16-row fragment per warp, not always beyond (ptxas then reports
  a stack frame of 100-600 bytes for fp16, up to 4 KiB for int8; some int8 configurations spill a
  few bytes). It is correct but costs local-memory traffic; ``within_limits`` does not count it.
- Edges are not masked: the template requires the tiles to divide M, N and K.
- The staged C tile is not padded (its fp32 stores may conflict on banks; the epilogue is a small
  part of a GEMM of this size), and its stores are scalar (TVM's "simple" store intrinsic).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import sys
from collections.abc import Iterator
from typing import Any

from optic.autotune.operator import Operator
from optic.autotune.templates import SMEM_ROW_PAD_BYTES, TENSOR_CORE_MMA
from optic.tvm_compat import require_tvm

from .cuda_config import F32
from .tir_expr import epilogue

__all__ = ["LOWER_ASYNC_COPY", "LOWER_EXPLICIT_UNROLL", "matmul_compute", "matmul_tensorcore"]

# PrimFunc attributes by which a schedule asks ``codegen_cuda._cuda_source`` for a lowering option.
LOWER_EXPLICIT_UNROLL = "optic.explicit_unroll"  # loops marked unrolled are unrolled in TIR, not by nvcc
LOWER_ASYNC_COPY = "optic.async_copy"  # asynchronous pipeline stages become cp.async
_OUT_LANES = 4  # the epilogue computes in fp32: 4 lanes are a 128-bit vector (8 do not compile in TVM 0.27)


def _bare_stack(context: int = 1) -> list[inspect.FrameInfo]:
    """``inspect.stack()`` with file names as the frames' code objects give them and no source lines."""
    frame, out = sys._getframe(1), []
    while frame is not None:
        code = frame.f_code
        out.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, None, None))
        frame = frame.f_back
    return out


@contextlib.contextmanager
def _frames_without_source() -> Iterator[None]:
    """``inspect.stack`` is :func:`_bare_stack` for as long as the block runs.

    TVMScript's ``prim_func`` decorator takes ``inspect.stack()`` for every function it parses, and
    importing TVM's tensor intrinsics parses some 500 of them: resolving each frame's source file
    (for the import machinery's frozen frames, a search of ``sys.modules``) took 25 s, and a minute
    under pytest. The parser reads the frames; the one use of a source line (is the function
    defined in a class?) does not apply to TVM's intrinsics, which are not."""
    stack = inspect.stack
    inspect.stack = _bare_stack
    try:
        yield
    finally:
        inspect.stack = stack


def _tensor_intrin_cuda() -> Any:
    """``tvm.s_tir.tensor_intrin.cuda``, imported (once) without the cost of source lines."""
    require_tvm()
    name = "tvm.s_tir.tensor_intrin.cuda"
    if name not in sys.modules:
        with _frames_without_source():
            importlib.import_module(name)
    return sys.modules[name]


@functools.cache
def _intrinsics(dtype: str, b_layout: str) -> dict[str, Any]:
    """TVM's tensor intrinsics for ``dtype`` and B's layout: names, fragment shapes and index maps."""
    ci = _tensor_intrin_cuda()
    from tvm.s_tir import TensorIntrin

    def register(name: str, parts: tuple[Any, Any]) -> str:
        if TensorIntrin.get(name, allow_missing=True) is None:
            TensorIntrin.register(name, *parts)
        return name

    nk = b_layout == "nk"
    (mma_m, mma_n, mma_k), _ = TENSOR_CORE_MMA[dtype]

    def fragment_map(rows: int, cols: int, layout: Any) -> Any:
        return lambda i, j: (i // rows, j // cols, *layout(i % rows, j % cols))

    c_map = fragment_map(mma_m, mma_n, ci.shared_16x16_to_ldmatrix_32x8_layout)
    if dtype == "float16":
        f16 = fragment_map(16, 16, ci.shared_16x16_to_ldmatrix_32x8_layout)
        return {"load_a": ci.LDMATRIX_f16_A_DYN_INTRIN,
                "load_b": ci.LDMATRIX_f16_B_TRANS_DYN_INTRIN if nk else ci.LDMATRIX_f16_B_DYN_INTRIN,
                "mma": ci.MMA_f16f16f32_TRANS_B_INTRIN if nk else ci.MMA_f16f16f32_INTRIN,
                "fill": ci.MMA_fill_16x16_f32_INTRIN, "store": ci.MMA_store_16x16_f32_shared_dyn_INTRIN_SIMPLE,
                "a_tile": (16, 16), "b_tile": (16, 16), "a_map": f16, "b_map": f16, "c_map": c_map}
    assert dtype == "int8", dtype
    wide = fragment_map(16, 32, ci.shared_16x32_to_ldmatrix_32x16_layout)
    tall = fragment_map(32, 16, ci.shared_32x16_to_ldmatrix_32x16_layout)
    dyn = "shared.dyn"
    return {"load_a": register("optic_ldmatrix_i8_a_dyn", ci.get_ldmatrix_intrin(32, "int8", "A", False, dyn)),
            "load_b": register(f"optic_ldmatrix_i8_b{'_trans' if nk else ''}_dyn",
                               ci.get_ldmatrix_intrin(32, "int8", "B", nk, dyn)),
            "mma": ci.MMA_i8i8i32_TRANS_B_INTRIN if nk else ci.MMA_i8i8i32_INTRIN,
            "fill": ci.MMA_fill_16x16_i32_INTRIN,
            "store": register("optic_mma_store_16x16_i32_shared_dyn_simple",
                              ci.get_mma_store_intrin("int32", 8, dyn, False)),
            "a_tile": (16, mma_k), "b_tile": (16, mma_k) if nk else (mma_k, 16), "a_map": wide,
            "b_map": wide if nk else tall, "c_map": c_map}


def matmul_compute(operator: Operator, dtype: str) -> Any:
    """The unscheduled PrimFunc the tensor-core schedule starts from (``main``; parameters A, B, then
    bias and residual where the epilogue has them, then C): the math alone, which any TVM target
    can build (tests compare it with PyTorch on the CPU, since the tensorized kernel needs a GPU)."""
    tvm = require_tvm()
    te = tvm.te
    M, N, K = operator.args
    o = operator.opts
    nk = o["b_layout"] == "nk"
    epi = tuple(o.get("epilogue", ()))
    acc_dtype = TENSOR_CORE_MMA[dtype][1]
    A = te.placeholder((M, K), dtype, name="A")
    B = te.placeholder((N, K) if nk else (K, N), dtype, name="B")
    # Identity stages the schedule places in shared memory (the copies it makes asynchronous).
    As = te.compute((M, K), lambda i, k: A[i, k], name="A_shared")
    Bs = te.compute(B.shape, lambda x, y: B[x, y], name="B_shared")
    k = te.reduce_axis((0, K), name="k")
    acc = te.compute((M, N), lambda i, j: te.sum(
        As[i, k].astype(acc_dtype) * (Bs[j, k] if nk else Bs[k, j]).astype(acc_dtype), axis=k), name="C_acc")
    bias = te.placeholder((N,), dtype, name="bias") if "bias" in epi else None
    residual = te.placeholder((M, N), dtype, name="residual") if "residual" in epi else None
    if dtype == "int8":  # the int32 accumulator is the result (the template allows no epilogue)
        C = te.compute((M, N), lambda i, j: acc[i, j], name="C")
    else:
        C = te.compute((M, N), lambda i, j: epilogue(
            tvm, acc[i, j], epi, bias[j].astype(F32) if bias is not None else None,
            residual[i, j].astype(F32) if residual is not None else None).astype(dtype), name="C")
    extra = [t for t in (bias, residual) if t is not None]
    return te.create_prim_func([A, B, *extra, C])


def matmul_tensorcore(operator: Operator, cfg: dict[str, int], dtype: str) -> Any:
    """The scheduled module of a tensor-core matmul (``cfg``: a ``matmul_tensorcore_gpu`` configuration)."""
    tvm = require_tvm()
    M, N, K = operator.args
    nk = operator.opts["b_layout"] == "nk"
    mma_k = TENSOR_CORE_MMA[dtype][0][2]
    intrin = _intrinsics(dtype, operator.opts["b_layout"])
    BM, BN, BK, WM, WN, STAGES, VEC = (cfg[v] for v in ("BM", "BN", "BK", "WM", "WN", "STAGES", "VEC"))
    warps = (BM // WM) * (BN // WN)
    pad = SMEM_ROW_PAD_BYTES * 8 // tvm.DataType(dtype).bits  # in elements
    s = tvm.s_tir.Schedule(matmul_compute(operator, dtype))

    # The MMA tile (16 x 16 x MMA_K) becomes one block the intrinsics replace; the loops above it are
    # the block tile, the warps, and the warp's tiles.
    main = s.get_sblock("C_acc")
    i, j, kk = s.get_loops(main)
    i, i_tc = s.split(i, [None, 16])
    j, j_tc = s.split(j, [None, 16])
    kk, k_tc = s.split(kk, [None, mma_k])
    s.reorder(i, j, kk, i_tc, j_tc, k_tc)
    tile = s.blockize(i_tc)
    bi, wi, fi = s.split(i, [M // BM, BM // WM, WM // 16])
    bj, wj, fj = s.split(j, [N // BN, BN // WN, WN // 16])
    ko, kf = s.split(kk, [K // BK, BK // mma_k])
    s.reorder(bi, bj, wi, wj, ko, kf, fi, fj)
    s.bind(s.fuse(bi, bj), "blockIdx.x")
    ty = s.fuse(wi, wj)
    s.bind(ty, "threadIdx.y")

    for name in ("A_shared", "B_shared"):
        blk = s.get_sblock(name)
        s.set_scope(blk, 0, "shared.dyn")
        s.compute_at(blk, ko)
        # Every thread copies equal VEC-wide vectors (the template's divisibility constraints).
        _, wy, lane, vec = s.split(s.fuse(*s.get_loops(blk)[-2:]), [None, warps, 32, VEC])
        s.bind(wy, "threadIdx.y")
        s.bind(lane, "threadIdx.x")
        s.vectorize(vec)
        # Rows padded by 16 bytes (stride = row + pad), so ldmatrix's eight rows fall in eight bank groups.
        row = BK if name == "A_shared" or nk else BN
        s.storage_align(blk, 0, axis=-2, factor=row + pad, offset=0)

    a_frag = s.cache_read(tile, 0, "warp")
    b_frag = s.cache_read(tile, 1, "warp")
    s.compute_at(a_frag, kf)
    s.compute_at(b_frag, kf)
    c_frag = s.cache_write(tile, 0, "warp")
    s.reverse_compute_at(c_frag, ty)
    s.set_scope(c_frag, 0, "shared.dyn")  # the warp's accumulators staged in shared memory for the epilogue
    out = s.get_sblock("C")
    s.reverse_compute_at(out, ty)
    _, lane, vec = s.split(s.fuse(*s.get_loops(out)[-2:]), [None, 32, _OUT_LANES])
    s.bind(lane, "threadIdx.x")
    s.vectorize(vec)
    c_rows, c_cols = s.get_loops(c_frag)[-2:]
    cio, cii = s.split(c_rows, [None, 16])
    cjo, cji = s.split(c_cols, [None, 16])
    s.reorder(cio, cjo, cii, cji)
    s.decompose_reduction(tile, ko)
    init = s.get_sblock("C_acc_init")

    def fragments(block: Any, rows: int, cols: int) -> Any:
        """Split a warp's fragment copy into rows x cols intrinsic tiles; the loop the intrinsic replaces."""
        r, c = s.get_loops(block)[-2:]
        ro, ri = s.split(r, [None, rows])
        co, ci = s.split(c, [None, cols])
        s.reorder(ro, co, ri, ci)
        for loop in (ro, co):
            s.unroll(loop)
        return ri

    # Constant fragment indices keep the fragments and accumulators in registers.
    for loop in (fi, fj, *s.get_loops(init)[-4:-2], cio, cjo):
        s.unroll(loop)
    load_a = fragments(a_frag, *intrin["a_tile"])
    load_b = fragments(b_frag, *intrin["b_tile"])
    s.transform_layout(a_frag, ("write", 0), intrin["a_map"])
    s.transform_layout(b_frag, ("write", 0), intrin["b_map"])
    s.transform_layout(c_frag, ("read", 0), intrin["c_map"])
    s.tensorize(load_a, intrin["load_a"])
    s.tensorize(load_b, intrin["load_b"])
    s.tensorize(s.get_loops(main)[-3], intrin["mma"])
    s.tensorize(s.get_loops(init)[-2], intrin["fill"])
    s.tensorize(s.get_loops(c_frag)[-2], intrin["store"])
    func = s.mod["main"].with_attr(LOWER_EXPLICIT_UNROLL, True)
    if STAGES > 1:
        # Children of ko: the A copy, the B copy, the MMA loop; the copies run STAGES-1 tiles ahead, async.
        s.annotate(ko, "software_pipeline_stage", [0, 0, STAGES - 1])
        s.annotate(ko, "software_pipeline_order", [0, 1, 2])
        s.annotate(ko, "software_pipeline_async_stages", [0])
        func = s.mod["main"].with_attr(LOWER_EXPLICIT_UNROLL, True).with_attr(LOWER_ASYNC_COPY, True)
    return tvm.IRModule({"main": func})
