"""The cost model: predicted seconds of every valid configuration of a template, to rank them.

It reads the template's declaration (variables, parameters, derived quantities) and the Target's
figures, and restates no limit: what is legal is the constraints' business, this only says what is
fast. All formulas work on numpy arrays (one entry per configuration), so ranking the hundreds of
thousands of valid configurations of a CPU GEMM takes milliseconds.

CPU GEMM (``matmul_cpu``, ``conv2d_cpu``; the schedule of ``optic.backend.codegen_cpu``):

- work: ``2*Mp*Np*Kp`` FLOPs on the zero-padded extents (overhanging blocks are computed, not free);
- micro-kernel: per k step, ``MR*NR/LANES`` FMAs on ``fma_units`` pipes against ``NR/LANES`` loads
  of B and ``MR`` broadcasts of A on ``LOAD_PORTS`` ports, and no faster than one FMA latency (each
  accumulator is a dependency chain), plus the loop's overhead spread over ``UNROLL`` steps and the
  accumulators' reload and store once every ``KC`` steps after a zeroing pass (a single k block,
  ``KC >= K``, zeroes them in registers and stores them once);
- data reuse per cache level: the B micro-panel (``KC x NR``) stays in L1 for all ``MC/MR`` register
  tiles, so A streams from L2 once per ``NR`` columns; the A block (``MC x KC``) stays in L2 for
  ``NC/NR`` micro-panels, so B streams from L3 once per ``MC`` rows; working sets that overflow
  their cache (L1: the micro-panels and accumulators; L2: A block, C block, micro-panel) are served
  by the next level, in proportion to the overflow;
- parallel balance: ``ceil(tiles / PARALLEL)`` macro tiles on the slowest thread;
- packing: each tile packs the B panel of each k block (so a row of ``Mp/MC`` macro tiles packs
  B that many times, into L2); A is copied only when it must be padded or gathered (im2col), and
  then likewise, block by block into L2 by each tile (a column of ``Np/NC`` tiles gathers it that
  many times); the im2col matrix never crosses memory whole;
- write-back: a pass over the output, after each tile, unless the GEMM accumulates in the output
  itself (no padding to clip, no epilogue);
- time = the 3-norm of (compute, L2, L3, DRAM times), a roofline per level that still charges the
  terms it is not bound by, + packing and write-back.

GPU GEMM (``matmul_gpu``, ``conv2d_gpu``): roofline on the padded work with occupancy (blocks per
SM from shared memory, registers, threads and the block limit), wave quantisation, latency hiding
by resident warps and the thread tile's FMA-to-load ratio, and global traffic from the block tiles'
reuse (A re-read once per column of blocks, B once per row), the re-reads served by L2.

GPU tensor-core GEMM (``matmul_tensorcore_gpu``; ``optic.backend.cuda_tensorcore``): roofline on the
target's tensor-core peak for the dtype (``Target.peak_flops``; an mma.sync kernel on sm_90 reaches
only ``MMA_SYNC_SHARE_SM90`` of it, wgmma's figure), with occupancy (shared memory is the larger of
the tile ring and the staged C tile), waves, latency hiding by resident warps, shared-memory
bandwidth (ldmatrix reads ``(WM+WN)*MMA_K`` elements per warp per MMA step, the copies write the
block's tiles), and global traffic as for the SIMT GEMM; the pipeline hides DRAM latency with the
``STAGES-1`` tiles in flight per block (Little's law against ``DRAM_LATENCY_S``), a single stage
serialises loads and math.

CPU depthwise convolution (``depthwise_conv2d_cpu``): per register tile, R*S taps each bound by the
FMAs or the vector loads (an input value feeds one FMA), a spill charge where the registers overflow, the window's
rows from L2 and the tensors streamed once, tasks balanced over the threads; with padding, a test per tap,
column and vector.

Memory-bound kernels (``elementwise_*``, ``reduction_*``): bytes over bandwidth (the cache's when
the data fits, as it does when the same call is timed repeatedly), vector utilisation, per-task and
parallel overheads, occupancy and waves on a GPU.

Constants that no table lists (port counts, latencies, cache bandwidths) are named below: they are
estimates for ranking, checked against measurements by the Spearman rank correlation the tuner
reports, not figures to quote.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from optic import targets
from optic.targets import Target

from .space import Space
from .templates import direct_copies_input

__all__ = ["Prediction", "predict", "predict_rows", "rank", "spearman"]

# CPU core (x86 server cores since Skylake-SP; AArch64 Neoverse are close): estimates.
LOAD_PORTS = 2  # vector loads per cycle
FMA_LATENCY = 4  # cycles
LOOP_OVERHEAD = 1.0  # cycles per iteration of the innermost rolled loop (increment, compare, branch)
L2_BYTES_PER_CYCLE = 64  # L2 -> L1 per core (a line per cycle, Skylake-SP to Sapphire Rapids)
L3_BYTES_PER_CYCLE = 10  # sustained L3 -> L2 per core
RELOAD_STALL_CYCLES = 3.0  # per accumulator vector reloaded from L2 when a k block starts: the FMA chains wait
PARALLEL_REGION_S = 5e-6  # fork/join of one parallel loop in TVM's thread pool
EXP_OPS = 16  # vector instructions of the polynomial exp (codegen_cpu._fast_exp)
CACHE_LINE = 64  # bytes
L1_WAYS = 8  # L1d associativity (Zen 4, Skylake-SP: 8; Ice Lake and later: 12)
SPILL_CYCLES = 2.0  # a vector spilled to the stack and reloaded: a store and a load
REGISTER_HEADROOM = 2  # vector registers LLVM keeps for itself in an unrolled tile (masks, addresses, temporaries)
PAD_TEST_CYCLES = 0.5  # a zero-padding test of one tap of one output column (compare, select or branch)
OVERLAP_NORM = 3.0  # how sharply the slowest concurrent unit dominates (infinity: a pure roofline)
# GPU: estimates.
L2_OVER_DRAM = 3.0  # L2 bandwidth / DRAM bandwidth
WARPS_TO_HIDE_LATENCY = 8  # resident warps per SM that keep the pipes busy
LAUNCH_S = 3e-6
SMEM_BYTES_PER_CYCLE = 128  # shared memory per SM (Volta to Hopper)
WARPS_TO_FEED_TENSOR_CORES = 4  # one warp per SM sub-partition keeps its tensor core issuing
MMA_SYNC_SHARE_SM90 = 0.6  # of an H100's (wgmma) tensor-core peak that mma.sync kernels reach
DRAM_LATENCY_S = 600e-9  # a global load's latency under load (A100/H100)


@dataclass(frozen=True)
class Prediction:
    """Predicted seconds for one configuration and the parts of the estimate."""

    seconds: float
    parts: Mapping[str, float]


def _params(space: Space) -> dict[str, float]:
    return {k: float(v) for k, v in space.params.items()}


def _cdiv(a: Any, b: Any) -> Any:
    return np.ceil(np.asarray(a, dtype=float) / b)


def _overlap(*times: Any) -> Any:
    """Times of units that work concurrently (the pipes, each cache level, DRAM): the slowest bounds the
    total, as in a roofline, and the others still cost a little (a 3-norm), so that of two
    configurations with the same bound the one that moves less data ranks first."""
    return sum(np.asarray(x, dtype=float) ** OVERLAP_NORM for x in times) ** (1.0 / OVERLAP_NORM)


def _ratio_over(size: Any, capacity: float) -> Any:
    """The fraction of a working set that does not fit a cache: 0 when it fits in half of it (the other
    streams need room too), rising to 1 at twice the capacity."""
    return np.clip((np.asarray(size, dtype=float) - 0.5 * capacity) / (1.5 * capacity), 0.0, 1.0)


# -- CPU GEMM -------------------------------------------------------------------------------------------


def _l1_conflicts(rows: Any, stride_bytes: Any, l1_bytes: float) -> Any:
    """Whether ``rows`` lines read at ``stride_bytes`` apart (a register tile's rows of A) fall into so few
    L1 sets that they evict each other between k steps: a stride of a multiple of 4 KiB maps every row to
    one set (measured: a 128x768x3072 GEMM's MR=16 tile ran 2x slower than MR=8, A read in place with
    rows 12 KiB apart; MR=8 rows in one 8-way set ran at full speed)."""
    sets = l1_bytes / (CACHE_LINE * L1_WAYS)
    step = np.maximum(np.asarray(stride_bytes, dtype=float) // CACHE_LINE, 1).astype(np.int64)
    distinct = np.minimum(sets / np.gcd(step, int(sets)), np.asarray(rows, dtype=float))
    return np.ceil(np.asarray(rows, dtype=float) / distinct) > L1_WAYS


def _cpu_gemm(t: Target, p: Mapping[str, float], c: Mapping[str, Any], Mp: Any, Np: Any, Kp: Any,
              MC: Any, a_pack_bytes: Any, io_bytes: float, out_bytes: Any, useful_flops: float,
              b_gathered: bool = False, a_row_bytes: Any = None, b_prepacked: bool = False) -> dict[str, Any]:
    """``a_pack_bytes``: A's padded or gathered copy (``Mp*Kp`` elements; 0 when A is read in place),
    built block by block by the tiles; ``io_bytes``: the operands and the output, which cross DRAM at
    least once; ``out_bytes``: what the write-back copies (0 when the GEMM writes the output);
    ``b_gathered``: B's source is contiguous along neither axis, so B is packed once, before the
    GEMM, an element at a time (an NHWC convolution's weights); ``a_row_bytes``: how far apart the
    rows of A the register tile broadcasts from are (default: a packed block's, ``KC`` elements);
    ``b_prepacked``: B comes packed in its micro-panels (constant weights packed once, ahead): no tile
    packs it, the panels are read where they lie."""
    MR, NR, KC, NC, UNROLL, P = (np.asarray(c[v], dtype=float) for v in ("MR", "NR", "KC", "NC", "UNROLL", "PARALLEL"))
    lanes, esize = p["LANES"], 4.0  # fp32 compute
    clock, fu = t.clock_hz or 2.5e9, float(t.fma_units or 1)
    fmas = MR * NR / lanes
    loads = NR / lanes + MR
    cycles_per_k = np.maximum.reduce([fmas / fu, loads / LOAD_PORTS, np.full_like(fmas, FMA_LATENCY)])
    # rows of A that evict each other from L1: every broadcast refills its line from L2
    a_rows = KC * esize if a_row_bytes is None else np.asarray(a_row_bytes, dtype=float)
    cycles_per_k = cycles_per_k + np.where(_l1_conflicts(MR, a_rows, p["L1"]), MR, 0.0)
    # The accumulator tile's trips to memory: one k block starts it at zero in registers and stores
    # it once; several store it after a zeroing pass, then reload and store it once per block.
    blocks = Kp / KC
    several = blocks > 1
    reloads = np.where(several, blocks, 0.0)
    c_trips = 1 + 2 * reloads
    cycles_per_k = (cycles_per_k + LOOP_OVERHEAD / UNROLL + (c_trips * fmas / LOAD_PORTS) / Kp
                    + reloads * fmas * RELOAD_STALL_CYCLES / Kp)
    # L1 holds the B micro-panel, the A micro-panel and the accumulators' tile of Cb.
    l1_over = _ratio_over((MR + NR) * KC * esize + MR * NR * esize, p["L1"])
    # L2 holds the A block, the C block, the packed B panel of the k block.
    l2_over = _ratio_over(MC * KC * esize + MC * NC * esize + KC * NC * esize, p["L2"])
    tiles = (Mp / MC) * (Np / NC)
    share = np.ceil(tiles / P) / tiles  # the slowest thread's share of the work
    k_steps = (Mp / MR) * (Np / NR) * Kp
    compute = k_steps * share * cycles_per_k / clock
    # Bytes into L1 (from L2 or beyond): A once per micro-panel of B, B once per A block, the
    # micro-panel again for the part that does not stay in L1; C tile once per k block.
    a_stream = Mp * Kp * (Np / NR) * esize
    b_stream = Kp * Np * (Mp / MC) * esize * (1 + l1_over * (MC / MR - 1))
    c_stream = Mp * Np * c_trips * esize
    l2_bytes = (a_stream + b_stream + c_stream) * share
    l2_time = l2_bytes / (L2_BYTES_PER_CYCLE * clock)
    # Bytes from L3: the A block once per column of macro tiles, B's source once per row of them
    # (each tile packs its panel), and whatever overflows L2.
    b_source = Kp * Np * (Mp / MC) * esize
    l3_bytes = (Mp * Kp * (Np / NC) * esize + b_source + l2_over * a_stream) * share
    l3_time = l3_bytes / (L3_BYTES_PER_CYCLE * clock)
    bw = t.mem_bandwidth or 10e9 * (t.cores or 1)
    dram_time = io_bytes / bw
    threads_used = np.minimum(P, tiles)
    # The B panels and A's blocks (when A is copied) are written into L2 by the tile's thread; A's
    # blocks are gathered once per column of tiles, from a source that stays in L3.
    a_packs = a_pack_bytes * (Np / NC) * share
    b_pack = (0.0 if b_prepacked else Kp * Np / (clock * threads_used) if b_gathered
              else b_source * share / (L2_BYTES_PER_CYCLE * clock))
    pack_time = b_pack + a_packs / (L2_BYTES_PER_CYCLE * clock) + a_packs / (L3_BYTES_PER_CYCLE * clock)
    write_back = 2 * out_bytes / (L2_BYTES_PER_CYCLE * clock * threads_used)
    zeroing = np.where(several, Mp * Np * esize, 0.0) * share / (L2_BYTES_PER_CYCLE * clock)
    overhead = np.where(P > 1, 2 * PARALLEL_REGION_S, 0.0)
    gemm = _overlap(compute, l2_time, l3_time, dram_time)
    seconds = gemm + pack_time + write_back + zeroing + overhead
    peak = (t.peak_fp32_flops or 0) or clock * lanes * 2 * fu * (t.cores or 1)
    return {"seconds": seconds, "compute": compute, "l2": l2_time, "l3": l3_time, "dram": dram_time,
            "pack": pack_time, "padding": Mp * Np * Kp * 2 / useful_flops - 1,
            "kernel_efficiency": (fmas / fu) / cycles_per_k, "roofline_s": useful_flops / peak}


def _matmul_cpu(space: Space, t: Target, c: Mapping[str, Any]) -> dict[str, Any]:
    p = _params(space)
    M, N, K = p["M"], p["N"], p["K"]
    MC, NC, KC = (np.asarray(c[v], dtype=float) for v in ("MC", "NC", "KC"))
    Mp, Np, Kp = _cdiv(M, MC) * MC, _cdiv(N, NC) * NC, _cdiv(K, KC) * KC
    a_pack = np.where((Mp != M) | (Kp != K), 4 * Mp * Kp, 0.0)
    # codegen_cpu.matmul: without padding to clip or an epilogue, the GEMM accumulates in C itself.
    direct = (Mp == M) & (Np == N) & (not space.meta.get("epilogue"))
    out = np.where(direct, 0.0, 4 * M * N)
    # A is read in place, rows K apart, unless it is copied into padded blocks
    a_rows = np.where(a_pack > 0, 4 * KC, 4 * K)
    return _cpu_gemm(t, p, c, Mp, Np, Kp, MC, a_pack, 4 * (M * K + K * N + M * N), out, 2 * M * N * K,
                     a_row_bytes=a_rows, b_prepacked=space.meta.get("b_layout") == "packed")


def _conv2d_cpu(space: Space, t: Target, c: Mapping[str, Any]) -> dict[str, Any]:
    p = _params(space)
    shape = space.meta["shape"]
    n, oh, ow = shape["N"], p["OH"], p["OW"]
    TOH = np.asarray(c["TOH"], dtype=float)
    MC = TOH * ow
    Mp = n * _cdiv(oh, TOH) * TOH * ow
    NC, KC = np.asarray(c["NC"], dtype=float), np.asarray(c["KC"], dtype=float)
    kdim = p["C"] * p["R"] * p["S"]
    Np, Kp = _cdiv(p["F"], NC) * NC, _cdiv(kdim, KC) * KC
    inp = n * p["C"] * shape["H"] * shape["W"]
    out = n * p["F"] * oh * ow
    a_pack = 4 * Mp * Kp  # im2col: A is always gathered
    # codegen_cpu.conv2d: NHWC accumulates in the output (no padding, no epilogue) or writes each
    # tile's block back while it is in L2; NCHW transposes after the GEMM, the product and the
    # output both crossing memory.
    nhwc = space.meta["layout"] == "NHWC"
    direct = nhwc & (Np == p["F"]) & (_cdiv(oh, TOH) * TOH == oh) & (not space.meta.get("epilogue"))
    written = np.where(direct, 0.0, 4.0 * out * (1 if nhwc else 2))
    return _cpu_gemm(t, p, c, Mp, Np, Kp, MC, a_pack, 4 * (inp + kdim * p["F"] + out), written, 2 * out * kdim,
                     b_gathered=nhwc)


def _conv2d_direct_cpu(space: Space, t: Target, c: Mapping[str, Any]) -> dict[str, Any]:
    """codegen_cpu.conv2d_direct: the blocked input copy, then per task (image, filter block, output row)
    register tiles of REG_N columns x OC_BN filters, each a chain of C*R*S steps of one weight row
    (OC_BN/LANES vectors) and REG_N broadcasts; the filter block's weights stream from L2 (L3 when they
    do not fit) once per tile; the write-back applies the epilogue and scatters to NCHW."""
    p = _params(space)
    shape = space.meta["shape"]
    n, C, F, R, S, oh, ow = p["N"], p["C"], p["F"], p["R"], p["S"], p["OH"], p["OW"]
    ICB, OCB, RN, UKW, P = (np.asarray(c[v], dtype=float) for v in ("IC_BN", "OC_BN", "REG_N", "UNROLL_KW", "PARALLEL"))
    lanes, esize = p["LANES"], 4.0
    clock, fu = t.clock_hz or 2.5e9, float(t.fma_units or 1)
    vec_oc = np.ceil(OCB / lanes)  # a block narrower than a vector is one (partial) vector
    fmas = RN * vec_oc
    loads = vec_oc + RN  # a weight row, REG_N broadcasts
    # each accumulator takes one FMA a step, so a step lasts at least the FMA latency
    cycles_step = np.maximum.reduce([fmas / fu, loads / LOAD_PORTS, np.full_like(fmas, FMA_LATENCY)])
    # kw unrolled outside a channel loop of one channel (IC_BN=1): the S steps are one straight block, the
    # loop overhead is shared by them, and the broadcasts of the input row repeat across kw (column
    # c*STRIDE + kw*DIL), so LLVM loads each once and keeps it live beside the accumulators; spilled
    # values go to the stack and back once per step. Otherwise the innermost rolled loop (ici within an
    # unrolled kw, or a rolled kw) runs one step per iteration.
    merged = (UKW > 1) & (ICB == 1)
    window = (RN - 1) * shape["stride"] + (S - 1) * shape["dilation"] + 1  # input columns a tile reads per row
    live = RN * vec_oc + np.minimum(window, RN * S) + vec_oc + 1
    spilled = np.where(merged, np.maximum(live - p["VREGS"], 0.0), 0.0)
    cycles_step = cycles_step + (LOOP_OVERHEAD + SPILL_CYCLES * spilled) / np.where(merged, S, 1.0)
    Fp = _cdiv(F, OCB) * OCB
    owp = _cdiv(ow, RN) * RN
    tasks = n * (Fp / OCB) * oh
    share = np.ceil(tasks / P) / tasks
    tiles = tasks * owp / RN
    steps_per_tile = C * R * S
    # the accumulators are zeroed before the channel-block loop and updated at the same addresses in every
    # block, so LLVM keeps them in registers through the whole reduction: one store per tile (measured: C/IC_BN
    # blocks of one channel ran as fast as blocks of 64)
    stores = 2 * fmas / LOAD_PORTS
    compute = tiles * share * (steps_per_tile * cycles_step + stores) / clock
    weight_slice = C * R * S * OCB * esize  # a filter block's weights, read by every tile of its task
    input_tile = R * window * C * esize
    l2_bytes = tiles * share * (weight_slice + input_tile)
    l2_time = l2_bytes / (L2_BYTES_PER_CYCLE * clock)
    l3_bytes = tiles * share * weight_slice * _ratio_over(weight_slice, p["L2"])
    l3_time = l3_bytes / (L3_BYTES_PER_CYCLE * clock)
    inp = n * C * shape["H"] * shape["W"]
    out = n * F * oh * ow
    bw = t.mem_bandwidth or 10e9 * (t.cores or 1)
    dram_time = esize * (inp + C * R * S * F + out) / bw
    threads_used = np.minimum(P, tasks)
    hp, wp = shape["H"] + 2 * shape["padding"], shape["W"] + 2 * shape["padding"]
    # the blocked, padded input copy (templates.direct_copies_input): read along W, written IC_BN apart;
    # without padding to add, the kernel reads the input in place
    copies = direct_copies_input(shape, RN)
    copy_bytes = np.where(copies, 2 * n * C * hp * wp * esize, 0.0)
    copy_time = copy_bytes / (L2_BYTES_PER_CYCLE * clock * threads_used)
    write_back = 2 * out * esize / (L2_BYTES_PER_CYCLE * clock * threads_used)
    overhead = np.where(P > 1, 2 * PARALLEL_REGION_S, 0.0)
    seconds = _overlap(compute, l2_time, l3_time, dram_time) + copy_time + write_back + overhead
    useful = 2 * out * C * R * S
    peak = (t.peak_fp32_flops or 0) or clock * lanes * 2 * fu * (t.cores or 1)
    return {"seconds": seconds, "compute": compute, "l2": l2_time, "l3": l3_time, "dram": dram_time,
            "pack": copy_time, "padding": tiles * RN * OCB * steps_per_tile * 2 / useful - 1,
            "kernel_efficiency": (fmas / fu) / cycles_step, "roofline_s": useful / peak}


def _depthwise_conv2d_cpu(space: Space, t: Target, c: Mapping[str, Any]) -> dict[str, Any]:
    """codegen_cpu.depthwise_conv2d: per task (image, output row) register tiles of RW columns x CB channels
    (CB/LANES vectors each). Per kernel row the tile loads the window's input vectors once (LLVM keeps a
    column live across the S taps that read it) and S weight vectors, and does RW*S FMAs per vector of
    channels; the accumulators, the window and a weight vector must fit the registers, and what does not is
    spilled and reloaded at every tap (measured on Zen 5: 16 channels x 8 columns 0.034 ms on 56x56x144,
    48 x 7, which needs 51 registers, 0.128 ms). Consecutive tiles are independent, so out-of-order
    execution hides the FMA latency. The input streams once (its rows are shared by R output rows, from
    L2), the output is written once; with padding, each tap of each column tests its position, once per vector."""
    p = _params(space)
    shape = space.meta["shape"]
    n, C, oh, ow, R, S = p["N"], p["C"], p["OH"], p["OW"], shape["R"], shape["S"]
    CB, RW, P = (np.asarray(c[v], dtype=float) for v in ("CB", "RW", "PARALLEL"))
    lanes, esize = p["LANES"], 4.0
    clock, fu = t.clock_hz or 2.5e9, float(t.fma_units or 1)
    vec = np.ceil(CB / lanes)
    window = (RW - 1) * shape["stride"] + (S - 1) * shape["dilation"] + 1  # input columns per kernel row
    live = RW * vec + window * vec + vec + REGISTER_HEADROOM
    spilled = np.maximum(live - p["VREGS"], 0.0)
    fmas_row = RW * S * vec
    loads_row = (window + S) * vec
    cycles_row = np.maximum(fmas_row / fu, loads_row / LOAD_PORTS) + SPILL_CYCLES * spilled * S
    # a block that is not whole vectors is split by LLVM into pieces (the direct convolution's 48 lanes ran
    # 10-30x slower than 32 or 64 before it was cut into whole vectors): charged as one more vector
    cycles_row = cycles_row * np.where(np.mod(CB, lanes) != 0, (vec + 1) / vec, 1.0)
    owp = _cdiv(ow, RW) * RW
    tasks = n * oh
    share = np.ceil(tasks / P) / tasks
    tiles = tasks * (owp / RW) * (C / CB)
    # with padding, every tap of every column tests its position once per vector of channels (the test is not
    # hoisted out of the interior tiles; measured: with it the model picks the fastest of 8 spread
    # configurations on all ten of MobileNetV2's depthwise shapes)
    tests = R * S * RW * vec * PAD_TEST_CYCLES if shape["padding"] else 0.0
    per_tile = R * cycles_row + tests + 2 * RW * vec / LOAD_PORTS + LOOP_OVERHEAD * R  # taps, epilogue and store
    compute = tiles * share * per_tile / clock
    inp = n * C * shape["H"] * shape["W"]
    out = n * C * oh * ow
    data = esize * (inp + out + C * R * S)
    threads_used = np.minimum(P, tasks)
    stream = data * share / (_stream_bandwidth(t, p, data, threads_used) / threads_used)
    # one parallel region with dynamic tasks: on the small late layers (7x7x960, 5-15 us) two threads measured
    # 1.7x faster than one, so the fork/join costs about a microsecond here, not PARALLEL_REGION_S
    overhead = np.where(P > 1, PARALLEL_REGION_S / 5, 0.0)
    seconds = _overlap(compute, stream) + overhead
    useful = 2 * out * R * S
    peak = (t.peak_fp32_flops or 0) or clock * lanes * 2 * fu * (t.cores or 1)
    return {"seconds": seconds, "compute": compute, "memory": stream, "spilled": spilled,
            "padding": owp / ow - 1, "roofline_s": useful / peak}

# -- CPU memory-bound --------------------------------------------------------------------------------------


def _stream_bandwidth(t: Target, p: Mapping[str, float], data_bytes: float, threads: Any) -> Any:
    """Bytes per second for ``threads`` threads streaming ``data_bytes`` that are timed repeatedly: from
    L2 when the data fits the threads' L2s, else L3, else DRAM."""
    clock = t.clock_hz or 2.5e9
    threads = np.asarray(threads, dtype=float)
    l2 = L2_BYTES_PER_CYCLE * clock * threads
    l3 = L3_BYTES_PER_CYCLE * clock * threads
    dram = np.minimum(t.mem_bandwidth or 10e9, 10e9 * threads)
    return np.where(data_bytes <= p["L2"] * threads, l2, np.where(data_bytes <= p["L3"] / 2, l3, dram))


def _elementwise_cpu(space: Space, t: Target, c: Mapping[str, Any]) -> dict[str, Any]:
    p = _params(space)
    numel, inputs = p["NUMEL"], p["INPUTS"]
    VEC, CHUNK, P = (np.asarray(c[v], dtype=float) for v in ("VEC", "CHUNK", "PARALLEL"))
    tasks = _cdiv(numel, CHUNK)
    share = np.ceil(tasks / P) * CHUNK / numel
    data = (inputs + 1) * numel * p["BYTES"]
    memory = data * share / (_stream_bandwidth(t, p, data, P) / P)
    clock = t.clock_hz or 2.5e9
    steps = numel * share / VEC
    # A step of VEC lanes is VEC/LANES vector ops per operand; a partial last step is predicated.
    compute = steps * (VEC / p["LANES"] * (inputs + 1) / LOAD_PORTS + LOOP_OVERHEAD) / clock
    overhead = np.where(P > 1, PARALLEL_REGION_S, 0.0)
    return {"seconds": _overlap(memory, compute) + overhead, "memory": memory, "compute": compute}


def _reduction_cpu(space: Space, t: Target, c: Mapping[str, Any]) -> dict[str, Any]:
    p = _params(space)
    rows, cols = p["ROWS"], p["COLS"]
    VEC, RPT, P = (np.asarray(c[v], dtype=float) for v in ("VEC", "RPT", "PARALLEL"))
    tasks = _cdiv(rows, RPT)
    share = np.ceil(tasks / P) * RPT / rows
    clock = t.clock_hz or 2.5e9
    fu = float(t.fma_units or 1)
    lanes = p["LANES"]
    steps = np.ceil(cols / VEC)
    vectors = steps * VEC / lanes  # a partial last step is computed whole, predicated
    # Each of the two statistics (max and sum; mean and variance): VEC partial results, VEC/LANES
    # independent vector chains a step (no faster than one latency), then the lanes combined one
    # after the other (a scalar chain of VEC).
    stat = steps * np.maximum(VEC / lanes / LOAD_PORTS, FMA_LATENCY) + VEC * FMA_LATENCY
    # The elementwise passes: softmax's exp (a polynomial, ~EXP_OPS vector ops) and scaling; layer
    # norm's subtract-and-scale.
    passes = vectors * ((EXP_OPS + 1) if space.meta.get("op") == "softmax" else 2) / fu
    per_row = 2 * stat + passes + LOOP_OVERHEAD * 3 * steps
    compute = rows * share * per_row / clock
    data = 2 * rows * cols * p["BYTES"]
    memory = data * share / (_stream_bandwidth(t, p, data, P) / P)
    overhead = np.where(P > 1, PARALLEL_REGION_S, 0.0)
    return {"seconds": _overlap(memory, compute) + overhead, "memory": memory, "compute": compute}


# -- GPU ---------------------------------------------------------------------------------------------------


def _occupancy(t: Target, threads: Any, smem: Any, regs: Any) -> tuple[Any, Any]:
    """Resident blocks per SM and resident warps per SM."""
    threads, smem, regs = (np.asarray(x, dtype=float) for x in (threads, smem, regs))
    limits = [np.full_like(threads, float(t.max_blocks_per_sm or 32)),
              np.floor((t.max_threads_per_sm or 2048) / threads),
              np.floor((t.regs_per_sm or 65536) / np.maximum(threads * np.ceil(regs), 1))]
    if t.smem_per_sm:
        limits.append(np.floor(t.smem_per_sm / np.maximum(smem, 1)))
    blocks = np.maximum(np.minimum.reduce(limits), 1)
    return blocks, blocks * threads / (t.warp_size or 32)


def _simt_peak(t: Target, bytes_: float) -> float:
    fp32 = t.peak_fp32_flops or 1e13
    return fp32 * (2 if bytes_ == 2 else 1)  # half2 arithmetic doubles the CUDA-core rate


def _gpu_gemm(space: Space, t: Target, c: Mapping[str, Any], Mp: Any, Np: Any, Kp: Any, M: float, N: float,
              K: float, blocks: Any) -> dict[str, Any]:
    p = _params(space)
    BM, BN, TM, TN, STAGES, VEC = (np.asarray(c[v], dtype=float) for v in ("BM", "BN", "TM", "TN", "STAGES", "VEC"))
    threads = BM * BN / (TM * TN)
    smem = np.asarray(space_eval(space, "smem_bytes", c), dtype=float)
    regs = np.asarray(space_eval(space, "regs_per_thread", c), dtype=float)
    per_sm, warps = _occupancy(t, threads, smem, regs)
    sms = float(t.sm_count or 1)
    waves = np.ceil(blocks / (sms * per_sm))
    wave_eff = blocks / (waves * sms * per_sm)
    latency_eff = np.minimum(1.0, warps / WARPS_TO_HIDE_LATENCY)
    flops = 2 * Mp * Np * Kp
    peak = _simt_peak(t, p["BYTES"])
    # A thread loads TM + TN fragments from shared memory per k step for TM*TN FMAs; the SM's shared
    # memory delivers SMEM_BYTES_PER_CYCLE.
    fma_per_cycle = peak / 2 / sms / (t.clock_hz or 1.5e9)
    smem_eff = np.minimum(1.0, SMEM_BYTES_PER_CYCLE / (fma_per_cycle * (TM + TN) * p["BYTES"] / (TM * TN)))
    compute = flops / (peak * wave_eff * latency_eff * smem_eff)
    bw = t.mem_bandwidth or 1e12
    compulsory = p["BYTES"] * (M * K + K * N + M * N)
    rereads = p["BYTES"] * (Mp * Kp * (Np / BN) + Kp * Np * (Mp / BM)) - p["BYTES"] * (M * K + K * N)
    memory = compulsory / bw + np.maximum(rereads, 0) / (L2_OVER_DRAM * bw)
    # One stage: loads and math of a k step do not overlap.
    memory = memory / np.minimum(1.0, 0.6 + 0.4 * VEC * p["BYTES"] / p["LOAD_BYTES"])  # narrow loads: more instructions
    seconds = np.where(STAGES > 1, _overlap(compute, memory), compute + memory) + LAUNCH_S
    return {"seconds": seconds, "compute": compute, "memory": memory, "occupancy_warps": warps, "smem_eff": smem_eff,
            "waves": waves, "wave_efficiency": wave_eff}


def space_eval(space: Space, name: str, c: Mapping[str, Any]) -> Any:
    """A derived quantity of the space for arrays of configurations (numpy evaluation of its sympy form)."""
    import sympy

    expr = space.bound(space.derived[name])
    symbols = sorted(expr.free_symbols, key=lambda s: s.name)
    fn = sympy.lambdify(symbols, expr, modules=[{"ceiling": np.ceil, "floor": np.floor}, "numpy"])
    return fn(*(np.asarray(c[s.name], dtype=float) for s in symbols))


def _matmul_gpu(space: Space, t: Target, c: Mapping[str, Any]) -> dict[str, Any]:
    p = _params(space)
    M, N, K = p["M"], p["N"], p["K"]
    BM, BN, BK = (np.asarray(c[v], dtype=float) for v in ("BM", "BN", "BK"))
    Mp, Np, Kp = _cdiv(M, BM) * BM, _cdiv(N, BN) * BN, _cdiv(K, BK) * BK
    return _gpu_gemm(space, t, c, Mp, Np, Kp, M, N, K, (Mp / BM) * (Np / BN))


def _conv2d_gpu(space: Space, t: Target, c: Mapping[str, Any]) -> dict[str, Any]:
    p = _params(space)
    n = space.meta["shape"]["N"]
    TOH, TOW, BN, BK = (np.asarray(c[v], dtype=float) for v in ("TOH", "TOW", "BN", "BK"))
    ohp, owp = _cdiv(p["OH"], TOH) * TOH, _cdiv(p["OW"], TOW) * TOW
    M, N, K = n * p["OH"] * p["OW"], p["F"], p["C"] * p["R"] * p["S"]
    Mp, Np, Kp = n * ohp * owp, _cdiv(N, BN) * BN, _cdiv(K, BK) * BK
    blocks = np.asarray(space_eval(space, "blocks", c), dtype=float)
    return _gpu_gemm(space, t, c, Mp, Np, Kp, M, N, K, blocks)


def _matmul_tensorcore_gpu(space: Space, t: Target, c: Mapping[str, Any]) -> dict[str, Any]:
    p = _params(space)
    M, N, K, nbytes = p["M"], p["N"], p["K"], p["BYTES"]
    BM, BN, BK, WM, WN, STAGES, VEC = (np.asarray(c[v], dtype=float)
                                       for v in ("BM", "BN", "BK", "WM", "WN", "STAGES", "VEC"))
    threads = np.asarray(space_eval(space, "threads", c), dtype=float)
    smem = np.maximum(*(np.asarray(space_eval(space, k, c), dtype=float) for k in ("smem_tiles", "smem_c")))
    regs = np.asarray(space_eval(space, "regs_per_thread", c), dtype=float)
    per_sm, warps = _occupancy(t, threads, smem, regs)
    sms = float(t.sm_count or 1)
    blocks = (M / BM) * (N / BN)
    waves = np.ceil(blocks / (sms * per_sm))
    wave_eff = blocks / (waves * sms * per_sm)
    latency_eff = np.minimum(1.0, warps / WARPS_TO_FEED_TENSOR_CORES)
    peak = t.peak_flops(space.meta["dtype"]) or _simt_peak(t, nbytes)
    if (t.compute_capability or (0, 0)) >= (9, 0):
        peak *= MMA_SYNC_SHARE_SM90
    clock = t.clock_hz or 1.5e9
    flops_per_cycle = peak / sms / clock
    # Shared-memory bytes per FLOP: ldmatrix of a warp's fragments, plus the copies' writes of the tiles.
    per_flop = (WM + WN) * nbytes / (2 * WM * WN) + (BM + BN) * nbytes / (2 * BM * BN)
    smem_eff = np.minimum(1.0, SMEM_BYTES_PER_CYCLE / (flops_per_cycle * per_flop))
    compute = 2 * M * N * K / (peak * wave_eff * latency_eff * smem_eff)
    bw = t.mem_bandwidth or 1e12
    out_bytes = 4.0 if space.meta.get("accumulator") == "int32" else nbytes
    compulsory = nbytes * (M * K + K * N) + out_bytes * M * N
    rereads = nbytes * (M * K * (N / BN - 1) + K * N * (M / BM - 1))
    memory = compulsory / bw + rereads / (L2_OVER_DRAM * bw)
    # Little's law: the bytes a SM has in flight (STAGES-1 tiles per resident block) against what its
    # share of the bandwidth needs to cover the latency; narrow copies cost instructions.
    in_flight = per_sm * np.maximum(STAGES - 1, 1) * (BM + BN) * BK * nbytes
    memory = memory / np.minimum(1.0, in_flight / (bw / sms * DRAM_LATENCY_S))
    memory = memory / np.minimum(1.0, 0.6 + 0.4 * VEC * nbytes / p["LOAD_BYTES"])
    seconds = np.where(STAGES > 1, _overlap(compute, memory), compute + memory) + LAUNCH_S
    return {"seconds": seconds, "compute": compute, "memory": memory, "occupancy_warps": warps,
            "smem_eff": smem_eff, "waves": waves, "wave_efficiency": wave_eff}


def _gpu_memory_bound(t: Target, data_bytes: float, threads: Any, blocks: Any, regs: Any, smem: Any,
                      vec_eff: Any) -> dict[str, Any]:
    per_sm, warps = _occupancy(t, threads, smem, regs)
    sms = float(t.sm_count or 1)
    waves = np.ceil(blocks / (sms * per_sm))
    wave_eff = blocks / (waves * sms * per_sm)
    latency_eff = np.minimum(1.0, warps / (4 * WARPS_TO_HIDE_LATENCY))  # memory latency needs more warps
    memory = data_bytes / ((t.mem_bandwidth or 1e12) * wave_eff * latency_eff * vec_eff)
    return {"seconds": memory + LAUNCH_S, "memory": memory, "waves": waves}


def _elementwise_gpu(space: Space, t: Target, c: Mapping[str, Any]) -> dict[str, Any]:
    p = _params(space)
    THREADS, EPT, VEC = (np.asarray(c[v], dtype=float) for v in ("THREADS", "EPT", "VEC"))
    blocks = _cdiv(p["NUMEL"], THREADS * EPT)
    regs = np.asarray(space_eval(space, "regs_per_thread", c), dtype=float)
    vec_eff = np.minimum(1.0, 0.6 + 0.4 * VEC * p["BYTES"] / p["LOAD_BYTES"])
    data = (p["INPUTS"] + 1) * p["NUMEL"] * p["BYTES"]
    return _gpu_memory_bound(t, data, THREADS, blocks, regs, np.zeros_like(THREADS), vec_eff)


def _reduction_gpu(space: Space, t: Target, c: Mapping[str, Any]) -> dict[str, Any]:
    p = _params(space)
    TPR, RPB, VEC = (np.asarray(c[v], dtype=float) for v in ("TPR", "RPB", "VEC"))
    blocks = _cdiv(p["ROWS"], RPB)
    smem = np.asarray(space_eval(space, "smem_bytes", c), dtype=float)
    # Lanes that find no element in the last step idle; a row split over more than a warp pays a
    # shared-memory round.
    busy = p["COLS"] / (_cdiv(p["COLS"], TPR * VEC) * TPR * VEC)
    sync = np.where(TPR > p["WARP"], 0.9, 1.0)
    vec_eff = np.minimum(1.0, 0.6 + 0.4 * VEC * p["BYTES"] / p["LOAD_BYTES"]) * busy * sync
    data = 2 * p["ROWS"] * p["COLS"] * p["BYTES"]
    return _gpu_memory_bound(t, data, TPR * RPB, blocks, np.full_like(TPR, 32.0), smem, vec_eff)


MODELS: dict[str, Callable[[Space, Target, Mapping[str, Any]], dict[str, Any]]] = {
    "matmul_cpu": _matmul_cpu, "conv2d_cpu": _conv2d_cpu, "conv2d_direct_cpu": _conv2d_direct_cpu,
    "depthwise_conv2d_cpu": _depthwise_conv2d_cpu,
    "elementwise_cpu": _elementwise_cpu, "reduction_cpu": _reduction_cpu,
    "matmul_gpu": _matmul_gpu, "conv2d_gpu": _conv2d_gpu, "matmul_tensorcore_gpu": _matmul_tensorcore_gpu,
    "elementwise_gpu": _elementwise_gpu, "reduction_gpu": _reduction_gpu,
}  # fmt: skip


def _model(space: Space) -> Callable[[Space, Target, Mapping[str, Any]], dict[str, Any]]:
    name = space.name.split("[", 1)[0]
    if name not in MODELS:
        raise KeyError(f"no cost model for template {name}; known: {sorted(MODELS)}")
    return MODELS[name]


def predict_rows(space: Space, names: Sequence[str], rows: Sequence[Sequence[int]],
                 target: str | Target | None = None) -> dict[str, np.ndarray]:
    """Predicted seconds (``"seconds"``) and the estimate's parts, one entry per row (a configuration as
    a tuple in ``names`` order, as ``solve`` returns them)."""
    t = targets.get(target if target is not None else space.meta["target"])
    arr = np.asarray(rows, dtype=float).reshape(len(rows), len(names))
    cols = {n: arr[:, i] for i, n in enumerate(names)}
    out = _model(space)(space, t, cols)
    return {k: np.broadcast_to(np.asarray(v, dtype=float), (len(rows),)) for k, v in out.items()}


def predict(space: Space, config: Mapping[str, int], target: str | Target | None = None) -> Prediction:
    """Predicted seconds of one configuration."""
    names = space.names
    out = predict_rows(space, names, [tuple(config[n] for n in names)], target)
    return Prediction(float(out["seconds"][0]), {k: float(v[0]) for k, v in out.items() if k != "seconds"})


def rank(space: Space, names: Sequence[str], rows: Sequence[Sequence[int]],
         target: str | Target | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(order, seconds)``: row indices fastest first (ties keep the solver's order) and the predictions."""
    seconds = predict_rows(space, names, rows, target)["seconds"]
    return np.argsort(seconds, kind="stable"), seconds


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None for fewer than 3 pairs or a constant side."""
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return None
    rx, ry = (_ranks([p[i] for p in pairs]) for i in (0, 1))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return None
    return cov / math.sqrt(vx * vy)


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks
