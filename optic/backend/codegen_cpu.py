"""CPU code generation: a template configuration becomes a scheduled TIR module for LLVM.

Every function here takes an :class:`~optic.autotune.operator.Operator` and one configuration
of its template (``operator.space("cpu")``) and returns a ``tvm.IRModule`` with one PrimFunc,
``main``, whose parameters are the operator's inputs in ``Operator.input_shapes()`` order and
then the output. The schedule applies the template's variables and nothing else: every limit
the configuration respects was stated once, in the template, and the constraints there are what
make every schedule here legal (whole register tiles in a block, whole vectors in a tile).

GEMM (matmul, and conv2d as an implicit GEMM), BLIS's blocking::

    for outer in (N/NC) x (M/MC)         PARALLEL threads, each taking the next macro tile (dynamic)
      Cb[MC, NC] = 0                     Cb: C's own tile when the product is the output, else Cp's
      for ko in K/KC                     a KC-deep slice: A block MC x KC in L2
        Ap[MC, KC] = the tile's A block, padded or gathered (im2col); A itself when it needs neither
        Bp[NC/NR, KC, NR] = the tile's B panel, packed in NR-column micro-panels
        for jr in NC/NR                  a KC x NR micro-panel of B in L1, reused by every ir
          for ir in MC/MR                MR x NR accumulators in vector registers
            for ki in KC/UNROLL, ku in UNROLL (unrolled), ii in MR (unrolled), jv in NR (vectorized)
              Cb[ii, jv] += Ap[ir*MR + ii, k] * Bp[jr, k, jv]
      C[tile] = epilogue(Cb)             bias, residual, activations, fused into the write-back
                                         (none when C itself accumulated: nothing to clip or apply)

When one k block covers K (``KC >= K``) there is no ``ko`` loop and no ``Cb = 0`` pass: each register
tile starts at zero in its accumulators and is stored once (the packing then happens per macro tile,
and the micro-panels stream from L2).

A convolution's GEMM rows are the output's own (n, OH, OW) (a macro tile is TOH whole output rows),
so with NHWC the tile is a block of the output: it accumulates there, or is written back while in
L2; NCHW transposes after the GEMM. Its weights, contiguous along neither GEMM axis with NHWC, are
packed once before the GEMM instead of by every row of tiles.

Edges: the template lets a block overhang the extent (``MC < 2*M``); the packing stages pad A and B
with zeros to whole blocks (``Mp = ceil(M/MC)*MC``, likewise N and K), so the GEMM loops never need
a predicate and only the write-back clips to the real extent. Padding costs work the cost model
charges (``Mp*Np*Kp`` against ``M*N*K``).

The expressions this shares with the CUDA generator (epilogue, elementwise functions, zero padding)
are in :mod:`.tir_expr`; the TIR pipeline :func:`compile_module` runs, with the GEMM's dynamic macro
tiles, is in :mod:`.dynamic_tiles`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from optic.autotune.operator import ELEMENTWISE_FNS, LAYERNORM_EPS, Operator
from optic.autotune.templates import direct_copies_input, direct_input_columns
from optic.tvm_compat import require_tvm

from .dynamic_tiles import TIR_PIPELINE, mark_dynamic, register_pipeline
from .tir_expr import elementwise_value, epilogue, padded

__all__ = ["BUILDERS", "CODEGEN_VERSION", "TIR_PIPELINE", "build", "compile_module", "kernel_args",
           "direct_weight_shape", "gemm_weight_shape", "pack_direct_weight", "pack_gemm_weight", "unpack_direct_weight"]

# Part of every tuning-database key: records measured with another code generator are not reused.
CODEGEN_VERSION = 4


VECTOR_LANES = 16  # fp32 lanes the direct convolution's vector loop is cut into (an AVX-512 register)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def build(operator: Operator, config: Mapping[str, int]) -> Any:
    """The scheduled TIR module (``main``) of ``operator`` with ``config`` (see the module docstring).
    Compile it with :func:`compile_module` (TVM's own pipeline also builds it, with static threads)."""
    if operator.direct:
        return conv2d_direct(operator, dict(config))
    return BUILDERS[operator.op](operator, dict(config))


def compile_module(mod: Any, target: Any) -> Any:
    """``tvm.compile`` of a module from :func:`build` (or any TIR module) for a CPU ``target``, with
    the dynamic macro tiles (:mod:`.dynamic_tiles`)."""
    tvm = require_tvm()
    register_pipeline(tvm)
    return tvm.compile(mod, target=target, tir_pipeline=TIR_PIPELINE)


# -- GEMM ------------------------------------------------------------------------------------------------


def _gemm_te(tvm: Any, rows: tuple[int, ...], Np: int, Kp: int, NR: int,
             a_value: Callable[..., Any], b_value: Callable[[Any, Any], Any] | Any, pack_a: bool = True,
             name: str = "Cp") -> Any:
    """The packing stages and the padded product ``Cp[*rows, Np] = sum_k Ap * Bp``.

    ``rows``: the (padded) extents of the GEMM's row index, one dimension (a matmul's Mp) or several
    (a convolution's n, OHp, OW: rows in the output's own order, so that the product, or its
    write-back, lands in an NHWC output block by block). ``a_value(*row, k)`` / ``b_value(k, j)``:
    the (zero-padded) operand elements as TE expressions. A is copied row-major (``Ap[*rows, Kp]``:
    the micro-kernel broadcasts one element of each of MR rows per k step, and contiguous rows are
    all that needs; an MR-panel layout measured slower, its copy being a transposition), and only
    when it must be padded or gathered (im2col): ``pack_a=False`` reads ``a_value`` directly. ``b_value``
    may also be B already packed (a placeholder ``[Np/NR, Kp, NR]``): then nothing packs it."""
    te = tvm.te
    if pack_a:
        Ap = te.compute((*rows, Kp), a_value, name="Ap")

        def a(*idx: Any) -> Any:
            return Ap[idx]
    else:
        a = a_value
    if isinstance(b_value, te.Tensor):  # packed ahead
        Bp = b_value
    else:
        Bp = te.compute((Np // NR, Kp, NR), lambda jo, k, jv: b_value(k, jo * NR + jv), name="Bp")
    k = te.reduce_axis((0, Kp), name="k")
    return te.compute((*rows, Np), lambda *ij: te.sum(a(*ij[:-1], k) * Bp[ij[-1] // NR, k, ij[-1] % NR], axis=k),
                      name=name)


def _schedule_gemm(tvm: Any, func: Any, cfg: Mapping[str, int], MC: int, Mp: int, Np: int, Kp: int,
                   write_back_at_tile: bool, out_inner: int, b_k_contiguous: bool, pack_b_once: bool = False) -> Any:
    """Schedule the GEMM of ``func`` (blocks ``Ap`` (if A is packed), ``Bp``, ``Cp`` and the write-back
    ``C``) with the template's tiles; ``write_back_at_tile``: the write-back runs inside each macro
    tile (its region is affine in the tile), else as its own parallel loop nest after the GEMM.
    ``out_inner``: extent of the write-back's innermost (contiguous) loop, vectorized.
    ``b_k_contiguous``: B's source is contiguous along k (an nn.Linear weight), not along n.
    ``pack_b_once``: B is packed whole before the GEMM (its source is contiguous along neither
    axis, so that packing is a gather best done once, not once per row of macro tiles)."""
    MR, NR, KC, NC, UNROLL, PARALLEL = (cfg[v] for v in ("MR", "NR", "KC", "NC", "UNROLL", "PARALLEL"))
    s = tvm.s_tir.Schedule(func)
    names = {s.get(b).name_hint for b in s.get_child_blocks(s.get_sblock("root"))}
    direct = "Cp" not in names  # the GEMM accumulates in the output itself: no write-back
    cp = s.get_sblock("C" if direct else "Cp")
    *rows, j, k = s.get_loops(cp)
    if len(rows) == 1:
        ic, ir, ii = s.split(rows[0], [Mp // MC, MC // MR, MR])
    else:  # (n, OHp, OW): a macro tile is MC // OW whole output rows of one image
        n, oh, ow = rows
        oh_o, oh_i = s.split(oh, [None, MC // s.get(ow).extent])
        ic = s.fuse(n, oh_o)
        ir, ii = s.split(s.fuse(oh_i, ow), [MC // MR, MR])
    jc, jr, jv = s.split(j, [Np // NC, NC // NR, NR])
    # One k block (KC covers K): no k-block loop, so the accumulators can start at zero in registers
    # and be stored once (the reduction is decomposed inside the register tile). Several k blocks
    # reload and store them once per block, after an initialising pass over the macro tile's output;
    # the single block measured 6% faster on a 512^3 GEMM on one core.
    if Kp == KC:
        ki, ku = s.split(k, [KC // UNROLL, UNROLL])
        ko = None
        s.reorder(jc, ic, jr, ir, ki, ku, ii, jv)
    else:
        ko, ki, ku = s.split(k, [Kp // KC, KC // UNROLL, UNROLL])
        s.reorder(jc, ic, ko, jr, ir, ki, ku, ii, jv)
    outer = s.fuse(jc, ic)
    k_block = ko if ko is not None else outer  # where one k block's operands are packed
    s.unroll(ku)
    s.unroll(ii)
    s.vectorize(jv)
    wb = None if direct else s.get_sblock("C")
    if write_back_at_tile and wb is not None:
        s.reverse_compute_at(wb, outer)
    if PARALLEL > 1:
        s.parallel(outer)
        mark_dynamic(s, outer, PARALLEL)
    # B is packed where it is used: the KC x NC panel of each k block, by the thread that owns the
    # tile, while it is hot in L2 (a separate pass over all of B measured up to 20% slower on wide
    # GEMMs). A row of macro tiles packs it again: the cost model charges Mp/MC packings.
    packs_b = "Bp" in names
    if not pack_b_once and packs_b:
        s.compute_at(s.get_sblock("Bp"), k_block)
    if "Ap" in names:
        # Likewise A's padded or gathered (im2col) block: MC x KC into L2 by the tile's thread, just
        # before its use (a pass over all of A first wrote, and read back, the whole im2col matrix:
        # 9x the input for a 3x3 convolution). A column of macro tiles gathers it again: the cost
        # model charges Np/NC gatherings.
        s.compute_at(s.get_sblock("Ap"), k_block)
    init = s.decompose_reduction(cp, ko if ko is not None else ki)
    update_loops = s.get_loops(cp)
    init_loops = _own_loops(s, init, update_loops)
    if init_loops:
        s.vectorize(init_loops[-1])
    if ko is None and len(init_loops) > 1:  # the register tile's rows: zeroed registers, unrolled
        s.unroll(init_loops[-2])
    wl = [] if wb is None else _own_loops(s, wb, update_loops)
    if wl:
        _vectorize_inner(s, wl[-1], out_inner)
    if not write_back_at_tile and PARALLEL > 1 and len(wl) > 1:
        s.parallel(s.fuse(*wl[:-1]) if len(wl) > 2 else wl[0])
    # Packing reads its source along the source's contiguous axis (a gather along the other would be
    # a strided load per element): A's rows and a K-contiguous B are copied k innermost.
    bp_loops = _own_loops(s, s.get_sblock("Bp"), update_loops) if packs_b else []  # (panel, k, lane)
    if pack_b_once and PARALLEL > 1 and len(bp_loops) > 1:
        s.parallel(s.fuse(*bp_loops[:-1]) if len(bp_loops) > 2 else bp_loops[0])
    if len(bp_loops) == 3 and b_k_contiguous:
        s.reorder(bp_loops[2], bp_loops[1])
    elif bp_loops and not b_k_contiguous:
        s.vectorize(bp_loops[-1])
    if "Ap" in names:  # rows of A's block, padded: contiguous in k
        ap_loops = _own_loops(s, s.get_sblock("Ap"), update_loops)
        if ap_loops:
            _vectorize_inner(s, ap_loops[-1], KC)
    return s.mod


def _own_loops(s: Any, block: Any, others: list[Any]) -> list[Any]:
    """The loops of ``block`` that enclose none of ``others`` (unit loops vanish, so the innermost loop
    of a block may be one it shares with the GEMM)."""
    shared = {s.get_sref(loop) for loop in others}
    return [loop for loop in s.get_loops(block) if s.get_sref(loop) not in shared]


def _split_init_and_vectorize(s: Any, block: Any, at: Any, write_back: Any, out_inner: int) -> None:
    """The accumulation ``block``'s zeroing split off at loop ``at`` (its register tile, vectorized), and the
    ``write_back``'s innermost (contiguous, ``out_inner`` long) loop vectorized."""
    init = s.decompose_reduction(block, at)
    init_loops = _own_loops(s, init, s.get_loops(block))
    if init_loops:
        s.vectorize(init_loops[-1])
    wl = _own_loops(s, write_back, s.get_loops(block))
    if wl:
        _vectorize_inner(s, wl[-1], out_inner)


def _vectorize_inner(s: Any, loop: Any, extent: int, lanes: int = 16) -> None:
    """Vectorize a contiguous innermost loop ``lanes`` at a time (a partial vector is predicated)."""
    if extent >= lanes:
        _, v = s.split(loop, [None, lanes])
        s.vectorize(v)
    else:
        s.vectorize(loop)


def matmul(operator: Operator, cfg: dict[str, int]) -> Any:
    """``C[M, N] = epilogue(A[M, K] @ B)``, B as ``[K, N]``, with ``b_layout="nk"`` ``[N, K]``, or with
    ``"packed"`` already in the GEMM's micro-panels ``[Np/NR, Kp, NR]`` (zero-padded; :func:`pack_gemm_weight`,
    done once for constant weights: no packing at run time)."""
    tvm = require_tvm()
    te = tvm.te
    M, N, K = operator.args
    o = operator.opts
    epi = tuple(o.get("epilogue", ()))
    MR, NR, KC, MC, NC = (cfg[v] for v in ("MR", "NR", "KC", "MC", "NC"))
    Mp, Np, Kp = _cdiv(M, MC) * MC, _cdiv(N, NC) * NC, _cdiv(K, KC) * KC
    A = te.placeholder((M, K), name="A")
    packed = operator.packed_b
    B = te.placeholder(gemm_weight_shape(operator, cfg) if packed else (K, N) if o["b_layout"] == "kn" else (N, K),
                       name="B")
    in_m = (lambda i: i < M) if Mp != M else (lambda i: None)
    in_n = (lambda j: j < N) if Np != N else (lambda j: None)
    in_k = (lambda k: k < K) if Kp != K else (lambda k: None)

    def a_value(i: Any, k: Any) -> Any:
        return padded(tvm, [in_m(i), in_k(k)], A[i, k])

    def b_value(k: Any, j: Any) -> Any:
        return padded(tvm, [in_n(j), in_k(k)], B[k, j] if o["b_layout"] == "kn" else B[j, k])

    direct = (Mp, Np) == (M, N) and not epi  # nothing to clip or apply: accumulate in C itself
    Cp = _gemm_te(tvm, (Mp,), Np, Kp, NR, a_value, B if packed else b_value, pack_a=(Mp, Kp) != (M, K),
                  name="C" if direct else "Cp")
    bias = te.placeholder((N,), name="bias") if "bias" in epi else None
    residual = te.placeholder((M, N), name="residual") if "residual" in epi else None
    extra = [t for t in (bias, residual) if t is not None]
    C = Cp if direct else te.compute((M, N), lambda i, j: epilogue(
        tvm, Cp[i, j], epi, bias[j] if bias is not None else None,
        residual[i, j] if residual is not None else None), name="C")
    func = te.create_prim_func([A, B, *extra, C])
    return _schedule_gemm(tvm, func, cfg, MC, Mp, Np, Kp, write_back_at_tile=True, out_inner=min(NC, N),
                          b_k_contiguous=o["b_layout"] == "nk")


def conv2d(operator: Operator, cfg: dict[str, int]) -> Any:
    """2-D convolution as an implicit GEMM: rows are output pixels ``(n, oh, ow)`` with OH padded to
    whole TOH-row blocks, columns are filters, the reduction is ``(c, r, s)`` (NCHW) or ``(r, s, c)``
    (NHWC, channels innermost, as the template prefers). A packs the input patches (im2col) in MR-row
    panels; the write-back scatters the GEMM's rows into the output layout."""
    tvm = require_tvm()
    te = tvm.te
    n_, c_, h_, w_, f_, r_, s_ = operator.args
    o = operator.opts
    epi = tuple(o.get("epilogue", ()))
    stride, pad, dil, nhwc = o["stride"], o["padding"], o["dilation"], o["layout"] == "NHWC"
    oh_, ow_ = operator.conv_out_hw
    MR, NR, KC, NC, TOH = (cfg[v] for v in ("MR", "NR", "KC", "NC", "TOH"))
    OHp = _cdiv(oh_, TOH) * TOH
    MC = TOH * ow_
    Kdim = c_ * r_ * s_
    Mp, Np, Kp = n_ * OHp * ow_, _cdiv(f_, NC) * NC, _cdiv(Kdim, KC) * KC
    X = te.placeholder((n_, h_, w_, c_) if nhwc else (n_, c_, h_, w_), name="X")
    Wt = te.placeholder((f_, c_, r_, s_), name="W")

    def split_k(k: Any) -> tuple[Any, Any, Any]:
        if nhwc:
            return k % c_, k // (s_ * c_), k // c_ % s_
        return k // (r_ * s_), k // s_ % r_, k % s_

    def a_value(n: Any, oh: Any, ow: Any, k: Any) -> Any:
        c, r, s = split_k(k)
        h, w = oh * stride - pad + r * dil, ow * stride - pad + s * dil
        conds = [oh < oh_ if OHp != oh_ else None, k < Kdim if Kp != Kdim else None]
        if pad:
            conds += [h >= 0, h < h_, w >= 0, w < w_]
        return padded(tvm, conds, X[n, h, w, c] if nhwc else X[n, c, h, w])

    def b_value(k: Any, f: Any) -> Any:
        c, r, s = split_k(k)
        return padded(tvm, [f < f_ if Np != f_ else None, k < Kdim if Kp != Kdim else None], Wt[f, c, r, s])

    # NHWC without padding to clip or an epilogue: the product is the output, accumulated in place.
    direct = nhwc and (OHp, Np) == (oh_, f_) and not epi
    Cp = _gemm_te(tvm, (n_, OHp, ow_), Np, Kp, NR, a_value, b_value, name="C" if direct else "Cp")
    bias = te.placeholder((f_,), name="bias") if "bias" in epi else None
    residual = te.placeholder(operator.out_shape, name="residual") if "residual" in epi else None
    extra = [t for t in (bias, residual) if t is not None]

    def out(n: Any, f: Any, oh: Any, ow: Any, idx: tuple[Any, ...]) -> Any:
        return epilogue(tvm, Cp[n, oh, ow, f], epi, bias[f] if bias is not None else None,
                         residual[idx] if residual is not None else None)

    if direct:
        C = Cp
    elif nhwc:
        C = te.compute(operator.out_shape, lambda n, oh, ow, f: out(n, f, oh, ow, (n, oh, ow, f)), name="C")
    else:
        C = te.compute(operator.out_shape, lambda n, f, oh, ow: out(n, f, oh, ow, (n, f, oh, ow)), name="C")
    func = te.create_prim_func([X, Wt, *extra, C])
    # NHWC: the tile's rows are whole output rows, so its write-back is a block of the output, done
    # while the tile is in L2; NCHW transposes, after the GEMM. With NHWC the reduction runs (r, s, c)
    # while the weights are stored (f, c, r, s): contiguous along neither GEMM axis, they are packed
    # once (a strided gather), not by every row of tiles.
    return _schedule_gemm(tvm, func, cfg, MC, Mp, Np, Kp, write_back_at_tile=nhwc,
                          out_inner=min(NC, f_) if nhwc else ow_, b_k_contiguous=not nhwc, pack_b_once=nhwc)


def conv2d_direct(operator: Operator, cfg: dict[str, int]) -> Any:
    """2-D convolution computed directly on channel blocks (template ``conv2d_direct_cpu``, layout
    "NCHWc", or "NHWCc" for NHWC tensors): ``Xp`` copies the input into ``[N, C/IC_BN, H+2p, W', IC_BN]``
    (zero-padded, W' covering the padded columns of the last tile) where it must be padded
    (``templates.direct_copies_input``), else the kernel reads it in place; ``conv`` accumulates
    ``[N, F'/OC_BN, OH, OW', OC_BN]`` from the weights packed by :func:`pack_direct_weight`; the
    write-back applies the epilogue and stores NCHW (or NHWC), a task's row at a time while it is in L1. Loops of
    ``conv`` per task (image, filter block, output row; PARALLEL threads)::

        for owo in OW'/REG_N                     a register tile: REG_N columns x OC_BN filters
          for ico in C/IC_BN                     (the accumulators stay in registers across it)
            for kh in R
              for kw in S (unrolled), ici in IC_BN       (UNROLL_KW=2; else ici outside a rolled kw)
                for owi in REG_N (unrolled), ob in OC_BN (vectorized)
                  conv[..., owo*REG_N + owi, ob] += Xp[ico, row, col, ici] * Wp[ico, kh, kw, ici, ob]
    """
    tvm = require_tvm()
    te = tvm.te
    n_, c_, h_, w_, f_, r_, s_ = operator.args
    o = operator.opts
    epi = tuple(o.get("epilogue", ()))
    stride, pad, dil = o["stride"], o["padding"], o["dilation"]
    oh_, ow_ = operator.conv_out_hw
    ICB, OCB, RN, UKW, PARALLEL = (cfg[v] for v in ("IC_BN", "OC_BN", "REG_N", "UNROLL_KW", "PARALLEL"))
    nhwc = operator.nhwc
    owp, fp = _cdiv(ow_, RN) * RN, _cdiv(f_, OCB) * OCB
    hp = h_ + 2 * pad
    wp = max(w_ + 2 * pad, direct_input_columns(operator.conv_shape, RN))
    X = te.placeholder((n_, h_, w_, c_) if nhwc else (n_, c_, h_, w_), name="X")

    def x_at_source(n: Any, c: Any, h: Any, w: Any) -> Any:
        return X[n, h, w, c] if nhwc else X[n, c, h, w]
    Wb = te.placeholder(direct_weight_shape(operator, cfg), name="W")

    def x_value(n: Any, co: Any, h: Any, w: Any, ci: Any) -> Any:
        conds = [h >= pad, h < h_ + pad, w >= pad] if pad else []
        if pad or wp > w_:
            conds.append(w < w_ + pad)
        return padded(tvm, conds, x_at_source(n, co * ICB + ci, h - pad, w - pad))

    # The input is only ever broadcast one element at a time, so the kernel can read NCHW itself; it is
    # copied only where zeros must surround it (padding, or columns of the last tile beyond W).
    copy = direct_copies_input(operator.conv_shape, RN)
    if copy:
        Xp = te.compute((n_, c_ // ICB, hp, wp, ICB), x_value, name="Xp")

        def x_at(n: Any, ic: Any, h: Any, w: Any) -> Any:
            return Xp[n, ic // ICB, h, w, ic % ICB]
    else:
        def x_at(n: Any, ic: Any, h: Any, w: Any) -> Any:
            return x_at_source(n, ic, h, w)
    ic = te.reduce_axis((0, c_), name="ic")
    kh = te.reduce_axis((0, r_), name="kh")
    kw = te.reduce_axis((0, s_), name="kw")
    conv = te.compute((n_, fp // OCB, oh_, owp, OCB), lambda n, oc, oh, ow, ob: te.sum(
        x_at(n, ic, oh * stride + kh * dil, ow * stride + kw * dil)
        * Wb[oc, ic // ICB, kh, kw, ic % ICB, ob], axis=[ic, kh, kw]), name="conv")
    bias = te.placeholder((f_,), name="bias") if "bias" in epi else None
    residual = te.placeholder(operator.out_shape, name="residual") if "residual" in epi else None
    extra = [t for t in (bias, residual) if t is not None]
    def out_value(n: Any, f: Any, oh: Any, ow: Any, idx: tuple[Any, ...]) -> Any:
        return epilogue(tvm, conv[n, f // OCB, oh, ow, f % OCB], epi, bias[f] if bias is not None else None,
                        residual[idx] if residual is not None else None)

    if nhwc:
        out = te.compute(operator.out_shape, lambda n, oh, ow, f: out_value(n, f, oh, ow, (n, oh, ow, f)), name="C")
    else:
        out = te.compute(operator.out_shape, lambda n, f, oh, ow: out_value(n, f, oh, ow, (n, f, oh, ow)), name="C")
    func = te.create_prim_func([X, Wb, *extra, out])
    s = tvm.s_tir.Schedule(func)
    cb = s.get_sblock("conv")
    n, oc, oh, ow, ob, icl, khl, kwl = s.get_loops(cb)
    owo, owi = s.split(ow, [None, RN])
    ico, ici = s.split(icl, [None, ICB])
    if UKW > 1:
        s.reorder(n, oc, oh, owo, ico, khl, kwl, ici, owi, ob)
    else:
        s.reorder(n, oc, oh, owo, ico, khl, ici, kwl, owi, ob)
    task = s.fuse(n, oc, oh)
    # the write-back of a task's output row, while it is in L1 (filters outer, columns contiguous)
    wb = s.get_sblock("C")
    s.reverse_compute_at(wb, task)
    if PARALLEL > 1:
        s.parallel(task)
        mark_dynamic(s, task, PARALLEL)
    # whole vectors: LLVM splits a 48-lane vector badly (OC_BN=48 measured 10-30x slower than 32 or 64),
    # so a block of several vectors is a loop over them, unrolled, each one vectorized
    if OCB > VECTOR_LANES and OCB % VECTOR_LANES == 0:
        obo, ob = s.split(ob, [None, VECTOR_LANES])
        s.unroll(obo)
    s.vectorize(ob)
    s.unroll(owi)
    if UKW > 1:
        s.unroll(kwl)
    _split_init_and_vectorize(s, cb, ico, wb, min(OCB, f_) if nhwc else ow_)
    if copy:  # the input copy: every thread a share of (image, channel block, row), read along its source's rows
        xl = s.get_loops(s.get_sblock("Xp"))
        if not nhwc:  # NCHW is contiguous along W; NHWC along the channels, already innermost
            s.reorder(xl[0], xl[1], xl[2], xl[4], xl[3])
        rows = s.fuse(xl[0], xl[1], xl[2])
        if PARALLEL > 1:
            s.parallel(rows)
    return s.mod


def depthwise_conv2d(operator: Operator, cfg: dict[str, int]) -> Any:
    """Depthwise 2-D convolution on NHWC (template ``depthwise_conv2d_cpu``): ``X[N, H, W, C]``, weights
    ``[R, S, C]``, output ``[N, OH, OW, C]``. Loops per task (image, output row; PARALLEL threads)::

        for owo in OW'/RW                    a register tile: RW columns x CB channels
          for co in C/CB
            for kh in R, kw in S (unrolled)  one tap: a weight vector, and per column an input vector
              for owi in RW (unrolled), cv in CB (vectorized, whole vectors)
                conv[owo*RW + owi, co*CB + cv] += X[row, col, c] * W[kh, kw, c]   (0 outside the input)
            C[tile] = epilogue(conv[tile])   while in registers; columns beyond OW are dropped

    The zero padding is a test per tap and column (it does not depend on the channel), so the input is
    read in place and never copied."""
    tvm = require_tvm()
    te = tvm.te
    n_, c_, h_, w_, r_, s_ = operator.args
    o = operator.opts
    epi = tuple(o.get("epilogue", ()))
    stride, pad, dil = o["stride"], o["padding"], o["dilation"]
    oh_, ow_ = operator.conv_out_hw
    CB, RW, PARALLEL = (cfg[v] for v in ("CB", "RW", "PARALLEL"))
    owp = _cdiv(ow_, RW) * RW
    X = te.placeholder((n_, h_, w_, c_), name="X")
    Wt = te.placeholder((r_, s_, c_), name="W")
    kh = te.reduce_axis((0, r_), name="kh")
    kw = te.reduce_axis((0, s_), name="kw")

    def x_value(n: Any, h: Any, w: Any, c: Any) -> Any:  # h, w: padded coordinates
        conds = [h >= pad, h < h_ + pad, w >= pad] if pad else []
        if pad or (owp - 1) * stride + (s_ - 1) * dil >= w_:
            conds.append(w < w_ + pad)
        return padded(tvm, conds, X[n, h - pad, w - pad, c])

    conv = te.compute((n_, oh_, owp, c_), lambda n, oh, ow, c: te.sum(
        x_value(n, oh * stride + kh * dil, ow * stride + kw * dil, c) * Wt[kh, kw, c], axis=[kh, kw]),
        name="conv")
    bias = te.placeholder((c_,), name="bias") if "bias" in epi else None
    residual = te.placeholder(operator.out_shape, name="residual") if "residual" in epi else None
    extra = [t for t in (bias, residual) if t is not None]
    out = te.compute(operator.out_shape, lambda n, oh, ow, c: epilogue(
        tvm, conv[n, oh, ow, c], epi, bias[c] if bias is not None else None,
        residual[n, oh, ow, c] if residual is not None else None), name="C")
    s = tvm.s_tir.Schedule(te.create_prim_func([X, Wt, *extra, out]))
    cb = s.get_sblock("conv")
    n, oh, ow, c, khl, kwl = s.get_loops(cb)
    owo, owi = s.split(ow, [None, RW])
    co, cv = s.split(c, [None, CB])
    s.reorder(n, oh, owo, co, khl, kwl, owi, cv)
    task = s.fuse(n, oh)
    if CB > VECTOR_LANES and CB % VECTOR_LANES == 0:  # whole vectors (see conv2d_direct)
        cvo, cv = s.split(cv, [None, VECTOR_LANES])
        s.unroll(cvo)
    s.vectorize(cv)
    s.unroll(owi)
    s.unroll(kwl)
    s.unroll(khl)
    wb = s.get_sblock("C")
    s.reverse_compute_at(wb, co)
    if PARALLEL > 1:
        s.parallel(task)
        mark_dynamic(s, task, PARALLEL)
    _split_init_and_vectorize(s, cb, khl, wb, CB)
    return s.mod


def gemm_weight_shape(operator: Operator, cfg: Mapping[str, int]) -> tuple[int, int, int]:
    """A matmul's B packed in its micro-panels (``b_layout="packed"``): ``[Np/NR, Kp, NR]``."""
    _, n, k = operator.args
    NR, KC, NC = cfg["NR"], cfg["KC"], cfg["NC"]
    return _cdiv(n, NC) * NC // NR, _cdiv(k, KC) * KC, NR


def pack_gemm_weight(b: Any, operator: Operator, cfg: Mapping[str, int]) -> Any:
    """``b`` ``[K, N]`` (a torch tensor) in the micro-panels of :func:`gemm_weight_shape`, zero-padded."""

    panels, kp, nr = gemm_weight_shape(operator, cfg)
    k, n = b.shape
    padded_b = b.new_zeros((kp, panels * nr))
    padded_b[:k, :n] = b.detach().float()
    return padded_b.reshape(kp, panels, nr).permute(1, 0, 2).contiguous()


def direct_weight_shape(operator: Operator, cfg: Mapping[str, int]) -> tuple[int, ...]:
    """The packed weights of :func:`conv2d_direct`: ``[F'/OC_BN, C/IC_BN, R, S, IC_BN, OC_BN]``."""
    _, c_, _, _, f_, r_, s_ = operator.args
    ICB, OCB = cfg["IC_BN"], cfg["OC_BN"]
    return _cdiv(f_, OCB), c_ // ICB, r_, s_, ICB, OCB


def pack_direct_weight(weight: Any, operator: Operator, cfg: Mapping[str, int]) -> Any:
    """``weight`` ``[F, C, R, S]`` (a torch tensor) in :func:`conv2d_direct`'s layout, F zero-padded to
    whole filter blocks; done once, when the kernel is made."""
    import torch

    fo, co, r_, s_, ICB, OCB = direct_weight_shape(operator, cfg)
    f_ = weight.shape[0]
    w = weight.detach().float()
    if fo * OCB != f_:
        w = torch.cat([w, w.new_zeros((fo * OCB - f_, *w.shape[1:]))])
    return w.reshape(fo, OCB, co, ICB, r_, s_).permute(0, 2, 4, 5, 3, 1).contiguous()


def unpack_direct_weight(packed: Any, operator: Operator) -> Any:
    """The ``[F, C, R, S]`` weights :func:`pack_direct_weight` packed (its inverse)."""
    fo, co, r_, s_, icb, ocb = packed.shape
    return packed.permute(0, 5, 1, 4, 2, 3).reshape(fo * ocb, co * icb, r_, s_)[: operator.args[4]]


# -- memory-bound kernels --------------------------------------------------------------------------------


def elementwise(operator: Operator, cfg: dict[str, int]) -> Any:
    """``out[i] = fn(x0[i], x1[i], ...)``: tasks of CHUNK elements over PARALLEL threads, VEC lanes a step.
    The last task may be partial (the template allows CHUNK to overhang): its steps are predicated."""
    tvm = require_tvm()
    te = tvm.te
    (numel,) = operator.args
    o = operator.opts
    assert ELEMENTWISE_FNS[o["fn"]][0] in (1, 2)
    xs = [te.placeholder((numel,), name=f"x{i}") for i in range(o["inputs"])]
    C = te.compute((numel,), lambda i: elementwise_value(tvm, o["fn"], [x[i] for x in xs]), name="C")
    s = tvm.s_tir.Schedule(te.create_prim_func([*xs, C]))
    (i,) = s.get_loops(s.get_sblock("C"))
    VEC, CHUNK = cfg["VEC"], cfg["CHUNK"]
    task, step, lane = s.split(i, [None, CHUNK // VEC, VEC])
    s.vectorize(lane)
    if cfg["PARALLEL"] > 1:
        s.parallel(task)
    return s.mod


def reduction(operator: Operator, cfg: dict[str, int]) -> Any:
    """Softmax or layer norm over the last axis of ``x[ROWS, COLS]``: tasks of RPT rows over PARALLEL
    threads; a row's statistics are computed at the row as VEC partial results (one accumulator per
    lane, a vector of dependency chains instead of one; lanes past the row's end contribute the
    reduction's identity) then combined, and the elementwise passes run VEC lanes a step (a partial
    last step predicated)."""
    tvm = require_tvm()
    te = tvm.te
    rows, cols = operator.args
    kind = operator.opts["kind"]
    VEC = cfg["VEC"]
    steps = _cdiv(cols, VEC)
    X = te.placeholder((rows, cols), name="X")

    def partial(name: str, value: Callable[[Any, Any], Any], combine: str) -> Any:
        """``stat[r] = combine_c value(r, c)`` as VEC lanes of partial results, then across the lanes."""
        identity = tvm.tirx.const(-3.4028234663852886e38 if combine == "max" else 0.0, "float32")
        reducer = te.max if combine == "max" else te.sum
        ko = te.reduce_axis((0, steps), name=f"{name}_k")

        def lane_value(r: Any, lane: Any) -> Any:
            col = ko * VEC + lane
            if cols % VEC == 0:
                return value(r, col)
            # Past the row's end: the identity, from an in-bounds (clamped) read, so that a vector
            # select that evaluates both sides never reads outside X.
            return tvm.tirx.if_then_else(col < cols, value(r, tvm.tirx.min(col, cols - 1)), identity)

        part = te.compute((rows, VEC), lambda r, lane: reducer(lane_value(r, lane), axis=ko), name=f"{name}_part")
        lane = te.reduce_axis((0, VEC), name=f"{name}_lane")
        return te.compute((rows,), lambda r: reducer(part[r, lane], axis=lane), name=name)

    if kind == "softmax":
        mx = partial("stat0", lambda r, c: X[r, c], "max")
        e = te.compute((rows, cols), lambda r, c: _fast_exp(tvm, X[r, c] - mx[r]), name="expv")
        sm = partial("stat1", lambda r, c: e[r, c], "sum")
        Y = te.compute((rows, cols), lambda r, c: e[r, c] * (1.0 / sm[r]), name="C")
        stages = ["stat0_part", "stat0", "expv", "stat1_part", "stat1"]
    else:
        mean = partial("stat0", lambda r, c: X[r, c] * (1.0 / cols), "sum")
        var = partial("stat1", lambda r, c: (X[r, c] - mean[r]) * (X[r, c] - mean[r]) * (1.0 / cols), "sum")
        Y = te.compute((rows, cols), lambda r, c: (X[r, c] - mean[r]) * te.rsqrt(var[r] + LAYERNORM_EPS),
                       name="C")
        stages = ["stat0_part", "stat0", "stat1_part", "stat1"]
    s = tvm.s_tir.Schedule(te.create_prim_func([X, Y]))
    r, c = s.get_loops(s.get_sblock("C"))
    task, row = s.split(r, [None, cfg["RPT"]])
    for name in reversed(stages):
        s.compute_at(s.get_sblock(name), row)
    for name in stages:
        loops = _own_loops(s, s.get_sblock(name), [task, row])
        if name.endswith("_part"):  # (lane, step) or, with one step, (lane): lanes go innermost, vectorized
            if len(loops) == 2:
                s.reorder(loops[1], loops[0])
            if loops:
                s.vectorize(loops[0])
        elif name == "expv" and loops:
            _vectorize_inner(s, loops[-1], cols, VEC)
    _vectorize_inner(s, c, cols, VEC)
    if cfg["PARALLEL"] > 1:
        s.parallel(task)
    return s.mod


def _fast_exp(tvm: Any, x: Any) -> Any:
    """``exp(x)`` for float32 as Cephes' ``expf`` computes it (range reduction by ln 2, a degree-6
    polynomial, the exponent set directly): vectorizes, where LLVM's ``exp`` becomes a libm call per
    lane. Relative error about 1e-7; underflows to 0 below -88."""
    f32 = "float32"
    x = tvm.tirx.max(tvm.tirx.min(x, tvm.tirx.const(88.3762626647949, f32)), tvm.tirx.const(-88.3762626647949, f32))
    n = tvm.tirx.floor(x * tvm.tirx.const(1.44269504088896341, f32) + tvm.tirx.const(0.5, f32))
    r = x - n * tvm.tirx.const(0.693359375, f32) + n * tvm.tirx.const(2.12194440e-4, f32)
    p = tvm.tirx.const(1.9875691500e-4, f32)
    for coef in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + tvm.tirx.const(coef, f32)
    p = p * r * r + r + tvm.tirx.const(1.0, f32)
    scale = tvm.tirx.reinterpret(f32, tvm.tirx.shift_left(n.astype("int32") + 127, 23))
    return p * scale


BUILDERS: dict[str, Callable[[Operator, dict[str, int]], Any]] = {
    "matmul": matmul, "conv2d": conv2d, "depthwise_conv2d": depthwise_conv2d, "elementwise": elementwise,
    "reduction": reduction,
}


def kernel_args(operator: Operator, config: Mapping[str, int], inputs: list[Any]) -> list[Any]:
    """What the built function takes before its output, from the operator's inputs (torch tensors, in
    ``Operator.input_shapes()`` order): the same, except a direct convolution's packed weights and a
    matmul's packed B."""
    if operator.direct:
        return [inputs[0], pack_direct_weight(inputs[1], operator, config), *inputs[2:]]
    if operator.packed_b:
        return [inputs[0], pack_gemm_weight(inputs[1], operator, config), *inputs[2:]]
    return list(inputs)
