"""lowrank: factor a linear or convolution into two thinner ones. Lossy (budgeted).

A layer is a GEMM ``y = W·x + b`` with ``W`` of shape (m, k): a linear's weight (m out, k in
features) or a convolution's weight (O, C, kh, kw) read as (O, C·kh·kw) over the input patches.
It is replaced by two layers through a rank-r bottleneck::

    W ≈ A·B,   A = U_r (m×r, orthonormal columns),   B = U_rᵀ·W (r×k)

- plain SVD: ``U_r`` = the top-r left singular vectors of ``W`` (best in ‖W − A·B‖_F);
- activation-aware (default with calibration data, as SVD-LLM / ASVD): with the layer's inputs
  ``X`` (columns are samples: a linear's input rows, a conv's unfolded patches) and the damped
  Gram matrix ``G = X·Xᵀ + λ·I = L·Lᵀ`` (Cholesky; ``λ = damp·tr(X·Xᵀ)/k`` keeps it positive
  definite when ``X`` is rank-deficient), ``U_r`` = the top-r left singular vectors of ``W·L``.
  That minimizes ‖(W − A·B)·L‖_F, the layer's output error on the calibration inputs: the optimum
  of ``min ‖(W − M)·L‖`` over rank-r ``M`` is ``M·L = U_r·U_rᵀ·W·L``, so ``M = U_r·U_rᵀ·W`` and no
  inverse of ``L`` is ever formed (the factors stay as well scaled as ``W``).

Emitted as ATen ops: a linear becomes ``linear(linear(x, B), A, b)``; a convolution becomes
``conv(x, B as (r, C, kh, kw))`` with the original stride, padding and dilation, then a 1×1
``conv(·, A as (O, r, 1, 1), b)``; a 1×1 conv is the same thing as a linear over channels. At
``r = min(m, k)`` both factorings reproduce ``W`` (up to float rounding); below it the pass is
never exact.

Legal for linears (``addmm`` with a constant weight too) and non-transposed convolutions with
``groups == 1`` whose weight and bias are constants and whose weight no other op reads. Declined:
grouped and transposed convolutions, tied weights, computed weights, and layers where no rank
pays: a factor is proposed only below the *break-even rank*, where the target's roofline
(:func:`optic.pipeline.cost.kernel_seconds`: FLOPs and bytes of each kernel, plus one more launch) says
the pair is faster than the dense layer at its real input shape. Ranks are multiples of the
target's vector width (the CPU's fp32 lanes, 8 on a GPU). When the target is this machine, every
rank is also timed against the dense layer (:func:`optic.pipeline.timing.compare`) and one that is not
faster here is never proposed.

Options: ``lowrank_method`` ("activation", default, or "svd"), ``lowrank_keep`` (``run`` without
the allocator factors every eligible layer keeping this fraction of its rank; unset: ``run``
changes nothing), ``lowrank_levels`` (fractions of the break-even rank proposed),
``lowrank_measure_s`` (timing budget per layer), ``lowrank_samples`` and ``lowrank_damp`` (the
Gram matrix).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from optic import ir
from optic.budget.allocator import Action
from optic.budget.calibration import record_values
from optic.ir import emit
from optic.ir.opview import Op, view
from optic.ir.rewrite import Site, find_sites
from optic.pipeline import cost
from optic.pipeline.registry import Option, register
from optic.pipeline.timing import calls_per_block, compare

aten = torch.ops.aten

RULE = "lowrank"
LEVELS = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4)  # fractions of the break-even rank proposed
GPU_LANES = 8  # rank multiple on GPUs (tensor-core friendly)
DAMP = 1e-2  # λ relative to the mean eigenvalue of X·Xᵀ
SAMPLES = 4096  # input rows / patches kept for the Gram matrix
MEASURE_S = 0.15  # timing budget per layer when the target is this machine
RECORD_BYTES = 256 * 2**20  # activations recorded at once, at most (layers are probed in chunks)
GRAM_MAX = 8192  # longest reduction (k) that gets a k×k Gram matrix

ACTIVATION = "activation-aware SVD"
PLAIN = "SVD"


# -- the math (float64, pure) ------------------------------------------------------------------------
def svd_basis(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors ``U`` (m×min(m,k)) of the 2-D weight ``w`` and the energy of each
    direction (σ², descending)."""
    u, s, _ = torch.linalg.svd(w.double(), full_matrices=False)
    return u, s.square()


def activation_basis(w: torch.Tensor, gram: torch.Tensor, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors of ``W·L`` with ``L·Lᵀ = gram + λ·I`` (see the module docstring) and
    the output energy on the calibration inputs each direction carries (descending)."""
    g = gram.double()
    k = g.shape[0]
    mean = float(torch.trace(g)) / k
    if not math.isfinite(mean) or mean <= 0:  # inputs all zero: any factor is exact on them
        return svd_basis(w)
    g = g + damp * mean * torch.eye(k, dtype=torch.float64, device=g.device)
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) != 0:  # not positive definite after rounding: clamp the spectrum instead
        vals, vecs = torch.linalg.eigh(g)
        chol = vecs * vals.clamp_min(damp * mean).sqrt()
    return svd_basis(w.double() @ chol)


def truncate(w: torch.Tensor, basis: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``A`` (m×r) and ``B`` (r×k) with ``A·B = U_r·U_rᵀ·W`` (float64)."""
    a = basis[:, :rank].double()
    return a, a.T @ w.double()


def conv_factors(w: torch.Tensor, basis: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv weight (O, C, k…) as a conv with ``rank`` outputs (rank, C, k…) followed by a pointwise
    conv (O, rank, 1…) whose product is ``U_r·U_rᵀ·W`` (float64; a linear weight is the case k = ())."""
    a, b = truncate(w.reshape(w.shape[0], -1), basis, rank)
    nd = w.dim() - 2
    return b.reshape(rank, *w.shape[1:]), a.reshape(w.shape[0], rank, *[1] * nd)


def energy_kept(energy: torch.Tensor, rank: int) -> float:
    total = float(energy.sum())
    return 1.0 if total <= 0 else float(energy[:rank].sum()) / total


def linear_gram(xs: list[torch.Tensor], samples: int = SAMPLES) -> torch.Tensor:
    """``X·Xᵀ`` over the rows of a linear's inputs (``[..., k]``), at most ``samples`` rows (evenly
    strided, deterministic)."""
    rows = [x.detach().reshape(-1, x.shape[-1]) for x in xs]
    return _gram(rows, samples)


def conv_gram(xs: list[torch.Tensor], kernel: list[int], stride: list[int], padding: list[int],
              dilation: list[int], padding_mode: str = "zeros", samples: int = SAMPLES) -> torch.Tensor:
    """``X·Xᵀ`` over the unfolded input patches of a 1-D or 2-D convolution (channel-major rows
    ``C·kh·kw``, the order of ``W.reshape(O, -1)``)."""
    rows = []
    for x in xs:
        x = x.detach()
        k, s, p, d = list(kernel), list(stride), list(padding), list(dilation)
        if x.dim() == 3:  # conv1d as a conv2d of height 1
            x, k, s, p, d = x.unsqueeze(2), [1, *k], [1, *s], [0, *p], [1, *d]
        if padding_mode != "zeros":
            x = F.pad(x, [q for q in reversed(p) for _ in (0, 1)], mode=padding_mode)
            p = [0] * len(p)
        patches = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (N, C·kh·kw, L)
        rows.append(patches.transpose(1, 2).reshape(-1, patches.shape[1]))
    return _gram(rows, samples)


def _gram(rows: list[torch.Tensor], samples: int) -> torch.Tensor:
    total = sum(r.shape[0] for r in rows)
    step = max(1, total // max(samples, 1))
    g = torch.zeros(rows[0].shape[1], rows[0].shape[1], dtype=torch.float64, device=rows[0].device)
    for r in rows:
        r = r[::step].double()
        g += r.T @ r
    return g


# -- the cost model --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gemm:
    """A layer as the GEMM it computes: ``rows`` outputs of ``m`` features, each reducing ``k``."""

    rows: int  # output positions (batch · spatial for a conv, every leading dim for a linear)
    k: int  # reduction: in features, or C·kh·kw
    m: int  # out features / channels
    in_elems: int  # elements of the input tensor (a conv reads each once, not once per patch)
    itemsize: int
    dtype: str
    bias: bool

    @property
    def full_rank(self) -> int:
        return min(self.m, self.k)

    def _dtype(self, target: Any) -> str:
        # a target without a figure for this dtype (fp16 on most CPUs) is costed at its fp32 rate
        return self.dtype if self.dtype in ("float16", "bfloat16") and target.peak_flops(self.dtype) else "float32"

    def dense_seconds(self, target: Any) -> float:
        nbytes = (self.in_elems + self.m * self.k + self.rows * self.m + self.m * self.bias) * self.itemsize
        return cost.kernel_seconds(2 * self.rows * self.k * self.m, nbytes, target, self._dtype(target))

    def factored_seconds(self, rank: int, target: Any) -> float:
        first = (self.in_elems + rank * self.k + self.rows * rank) * self.itemsize
        second = (self.rows * rank + self.m * rank + self.rows * self.m + self.m * self.bias) * self.itemsize
        dt = self._dtype(target)
        return (cost.kernel_seconds(2 * self.rows * self.k * rank, first, target, dt)
                + cost.kernel_seconds(2 * self.rows * rank * self.m, second, target, dt))

    def weights_removed(self, rank: int) -> float:
        """Fraction of the weight elements the factors save."""
        return 1.0 - rank * (self.m + self.k) / (self.m * self.k)


def lanes(target: Any) -> int:
    """The rank multiple for ``target``: fp32 vector lanes on a CPU, 8 on a GPU."""
    if target.kind == "gpu":
        return GPU_LANES
    return int(target.vector_lanes_fp32 or 8)


def break_even_rank(g: Gemm, target: Any, step: int) -> int:
    """The largest multiple of ``step`` below the full rank whose factors the roofline says are
    faster than the dense layer (0 when none is)."""
    dense = g.dense_seconds(target)
    best = 0
    for r in range(step, g.full_rank, step):  # the factored time only grows with r
        if g.factored_seconds(r, target) >= dense:
            break
        best = r
    return best


def proposed_ranks(break_even: int, step: int, levels: tuple[float, ...] = LEVELS) -> list[int]:
    """Ranks at ``levels`` of the break-even rank, rounded down to multiples of ``step``."""
    if break_even < step:
        return []
    return sorted({min(break_even, max(step, int(f * break_even) // step * step)) for f in levels})


# -- layers --------------------------------------------------------------------------------------------
@dataclass
class Layer:
    node: str
    layer: str
    kind: str  # "linear" | "conv"
    x: str  # the input node's name
    gemm: Gemm
    x_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    attrs: dict[str, Any]  # the conv's hyper-parameters (empty for a linear)
    device: str = "cpu"  # where the weight lives: where timing runs


def _guard(node: fx.Node, op: Op, gm: fx.GraphModule, readers: dict) -> str | None:
    w = op.const("weight")
    if w is None:
        return "the weight is computed, not a constant"
    if "bias" not in op.consts:
        return "the bias is computed, not a constant"
    if not w.is_floating_point():
        return f"weight dtype {w.dtype} is not floating point"
    if op.kind == "conv":
        if op.attrs.get("transposed"):
            return "transposed convolution"
        if op.attrs.get("groups", 1) != 1:
            return f"grouped convolution (groups={op.attrs['groups']}): only groups == 1 factors"
        if op.attrs.get("padding") is None and op.attrs.get("padding_str") is None:
            return "convolution padding is not expressible"
    elif w.dim() != 2:
        return f"linear weight of rank {w.dim()}"
    if ir.is_shared(gm, w, node, readers):
        return "the weight is shared with another op (tied weights): factoring would duplicate it"
    if not isinstance(op.x, fx.Node) or ir.shape(op.x) is None or ir.shape(node) is None:
        return "input or output shape unknown"
    if min(w.shape[0], math.prod(w.shape[1:])) < 2:
        return f"tiny layer: weight {tuple(w.shape)} has rank 1 at most"
    return None


def _layer(node: fx.Node, op: Op) -> Layer:
    w = op.const("weight")
    xs, out = ir.shape(op.x), ir.shape(node)
    m, k = w.shape[0], math.prod(w.shape[1:])
    rows = math.prod(out[:-1]) if op.kind == "linear" else out[0] * math.prod(out[2:])
    dt = str(ir.dtype(node) or w.dtype).replace("torch.", "")
    gemm = Gemm(rows, k, m, math.prod(xs), w.element_size(), dt, op.const("bias") is not None)
    attrs = {}
    if op.kind == "conv":
        attrs = {key: op.attrs.get(key) for key in ("nd", "stride", "padding", "dilation", "padding_mode", "padding_str")}
        attrs["kernel"] = list(w.shape[2:])
    return Layer(node.name, ir.layer_name(node), op.kind, op.x.name, gemm, xs, tuple(w.shape), attrs, str(w.device))


@dataclass
class EligibleLayer(Site):
    """Linears and convolutions the pass may factor (:func:`_guard` says why not); ``readers`` are the
    model's tensor readers, taken once per walk for the tied-weight check."""

    readers: dict = field(default_factory=dict)

    def guard(self, op: Op, ctx: Any) -> str | None:
        return _guard(op.node, op, op.node.graph.owning_module, self.readers)


def eligible_layers(program: Any, ctx: Any) -> list[Layer]:
    """The linears and convolutions the pass may factor; the others are declined with a reason."""
    gm = program.gm
    site = EligibleLayer(RULE, kinds=frozenset({"linear", "conv"}), readers=ir.tensor_readers(gm))
    return [_layer(op.node, op) for op in find_sites(gm, site, ctx, ctx.stats)]


def layer_grams(program: Any, layers: list[Layer], calibration: Any, samples: int = SAMPLES) -> dict[str, torch.Tensor]:
    """The Gram matrix of each layer's inputs on the fit split, held in float32 (layers without one
    are absent and factor by plain SVD: 3-D convs, padding only the functional spelling expresses,
    and reductions longer than ``GRAM_MAX``, whose k×k matrix would not pay for its memory)."""
    inputs = calibration.fit_inputs()
    by_name = {n.name: n for n in program.gm.graph.nodes}
    wanted = [ly for ly in layers if ly.gemm.k <= GRAM_MAX and (
        ly.kind == "linear" or (ly.attrs["nd"] in (1, 2) and ly.attrs["padding"] is not None))]
    grams: dict[str, torch.Tensor] = {}
    chunk: list[Layer] = []
    size = 0
    for i, ly in enumerate(wanted):
        chunk.append(ly)
        size += math.prod(ly.x_shape) * ly.gemm.itemsize * max(len(inputs), 1)
        if size < RECORD_BYTES and i + 1 < len(wanted):
            continue
        xs = list(dict.fromkeys(c.x for c in chunk))
        values = record_values(program, [by_name[x] for x in xs], inputs)
        for c in chunk:
            if c.kind == "linear":
                g = linear_gram(values[c.x], samples)
            else:
                a = c.attrs
                g = conv_gram(values[c.x], a["kernel"], a["stride"], a["padding"], a["dilation"],
                              a.get("padding_mode") or "zeros", samples)
            grams[c.node] = g.float()
        chunk, size = [], 0
    return grams


# -- the surgery -------------------------------------------------------------------------------------
class Factorizer:
    """Bases cached by weight identity and method, so that every level of a layer (and every
    rebuild of the program the allocator makes) runs one SVD."""

    def __init__(self, damp: float = DAMP):
        self.damp = damp
        self._cache: dict[tuple, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}

    def basis(self, w: torch.Tensor, gram: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        key = (w.data_ptr(), tuple(w.shape), tuple(w.stride()), w._version, id(gram))
        hit = self._cache.get(key)
        if hit is not None:
            return hit[1]
        w2 = w.detach().reshape(w.shape[0], -1)
        basis = svd_basis(w2) if gram is None else activation_basis(w2, gram, self.damp)
        self._cache[key] = (w, basis)  # holding ``w`` keeps its address from being reused
        return basis


def _pointwise(nd: int) -> dict[str, Any]:
    return {"nd": nd, "stride": [1] * nd, "padding": [0] * nd, "dilation": [1] * nd, "groups": 1,
            "transposed": False, "output_padding": [0] * nd}


def factor_layer(program: Any, name: str, rank: int, gram: torch.Tensor | None = None,
                 factorizer: Factorizer | None = None) -> float:
    """Rewrite node ``name`` of ``program`` as two layers through rank ``rank`` (clamped to the
    full rank), reading the weight the program holds now; plain SVD when ``gram`` is None.
    Returns the energy the kept directions carry (see :func:`energy_kept`)."""
    gm = program.gm
    node = next((n for n in gm.graph.nodes if n.name == name), None)
    op = view(node, gm) if node is not None else None
    if op is None or op.kind not in ("linear", "conv"):
        raise ValueError(f"lowrank: no linear or convolution named '{name}' in this program")
    w = op.const("weight").detach()
    rank = max(1, min(int(rank), w.shape[0], math.prod(w.shape[1:])))
    basis, energy = (factorizer or Factorizer()).basis(w, gram)
    b, a = conv_factors(w, basis, rank)
    b, a = b.to(w.dtype), a.to(w.dtype)
    bias = op.consts["bias"]
    graph = gm.graph
    with graph.inserting_before(node):
        bias_node = bias.node if bias.node is not None else emit.constant(graph, gm, bias.tensor, "lowrank_b")
        bn, an = emit.constant(graph, gm, b, "lowrank_B"), emit.constant(graph, gm, a, "lowrank_A")
        if op.kind == "linear":
            first = emit.linear(graph, op.x, bn, None)
            second = emit.linear(graph, first, an, bias_node)
        else:
            first = emit.conv(graph, op.x, bn, None, op.attrs)
            second = emit.conv(graph, first, an, bias_node, _pointwise(op.attrs["nd"]))
    ir.stamp(first, [node], RULE)
    ir.replace(node, second, RULE)
    ir.eliminate_dead_code(gm)
    ir.drop_unused_constants(gm)
    return energy_kept(energy, rank)


# -- measuring here ------------------------------------------------------------------------------------
def _kernels(ly: Layer, rank: int | None, x: torch.Tensor):
    """A zero-argument call running the dense layer (``rank`` None) or its factored pair on ``x``
    with random weights of the right shapes (time does not depend on the values)."""
    m, k = ly.gemm.m, ly.gemm.k

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, dtype=x.dtype, device=x.device)

    bias = rand(m) if ly.gemm.bias else None
    if ly.kind == "linear":
        if rank is None:
            w = rand(m, k)
            return lambda: aten.linear(x, w, bias)
        b, a = rand(rank, k), rand(m, rank)
        return lambda: aten.linear(aten.linear(x, b), a, bias)
    at = ly.attrs
    nd = at["nd"]
    pad = at["padding"]
    if at.get("padding_mode") not in (None, "zeros"):
        x = F.pad(x, [q for q in reversed(pad) for _ in (0, 1)], mode=at["padding_mode"])
        pad = [0] * nd
    conv = getattr(F, f"conv{nd}d")
    pad = at["padding_str"] if pad is None else pad
    if rank is None:
        w = rand(*ly.weight_shape)
        return lambda: conv(x, w, bias, at["stride"], pad, at["dilation"])
    b, a = rand(rank, *ly.weight_shape[1:]), rand(m, rank, *[1] * nd)
    return lambda: conv(conv(x, b, None, at["stride"], pad, at["dilation"]), a, bias)


def _signature(ly: Layer) -> tuple:
    return (ly.kind, ly.x_shape, ly.weight_shape, ly.gemm.dtype, ly.gemm.bias,
            tuple((k, str(v)) for k, v in sorted(ly.attrs.items())))


def measured_gains(ly: Layer, ranks: list[int], budget_s: float, cache: dict) -> dict[int, float]:
    """Seconds each factored rank saves against the dense layer on this machine (one
    :func:`optic.pipeline.timing.compare` per layer; layers of the same shape are timed once)."""
    sig = _signature(ly)
    todo = [r for r in ranks if (sig, r) not in cache]
    if todo:
        x = torch.randn(ly.x_shape, dtype=getattr(torch, ly.gemm.dtype, torch.float32), device=ly.device)
        fns = {"dense": _kernels(ly, None, x)}
        fns.update({str(r): _kernels(ly, r, x) for r in todo})
        rounds = 5
        block = calls_per_block(fns["dense"], target_s=budget_s / (rounds * len(fns)), cap=200)
        t = compare(fns, rounds=rounds, block=block, warmup=1, budget_s=budget_s)
        for r in todo:
            cache[(sig, r)] = t["dense"].median - t[str(r)].median
    return {r: cache[(sig, r)] for r in ranks}


# -- the pass --------------------------------------------------------------------------------------
@dataclass
class Plan:
    """A layer some rank pays for on the target: its break-even rank and the ranks proposed."""

    layer: Layer
    break_even: int
    ranks: list[int]


def _faster_here(ranks: list[int], measured: dict[int, float]) -> list[int]:
    """The ranks measured faster than the dense layer here (all of them when nothing was measured)."""
    return [r for r in ranks if measured[r] > 0] if measured else ranks


@register
class LowRank:
    name = "lowrank"
    exact = False
    description = ("factor linears and convolutions into two thinner layers (activation-aware SVD), "
                   "below the rank where the target's cost model says the pair is faster")
    options = (
        Option("lowrank_method", str, "activation", "how factors are found: activation-aware SVD on calibration "
               "inputs, or plain SVD of the weights", choices=("activation", "svd")),
        Option("lowrank_samples", int, SAMPLES, "input rows (or patches) kept per layer for the Gram matrix"),
        Option("lowrank_levels", (tuple, list), LEVELS, "the fractions of the break-even rank proposed per layer"),
        Option("lowrank_measure_s", float, MEASURE_S, "timing budget per layer when the target is this machine"),
        Option("lowrank_damp", float, DAMP, "damping of X·Xᵀ, relative to its mean eigenvalue"),
        Option("lowrank_keep", float, None, "without a budget: factor every eligible layer keeping this fraction "
               "of its rank (unset: change nothing)"),
    )

    def _method(self, ctx: Any) -> str:
        method = ctx.option("lowrank_method")
        if method not in ("activation", "svd"):
            raise ValueError(f"lowrank_method={method!r}: use 'activation' (activation-aware SVD) or 'svd'")
        if method == "activation" and ctx.calibration is None:
            ctx.note("no calibration data: factors by plain SVD of the weights")
            return "svd"
        return method

    def _grams(self, program: Any, layers: list[Layer], ctx: Any) -> dict[str, torch.Tensor]:
        if self._method(ctx) == "svd" or not layers:
            return {}
        return layer_grams(program, layers, ctx.calibration, int(ctx.option("lowrank_samples")))

    def candidates(self, program: Any, ctx: Any) -> list[Action]:
        plans = self._plans(eligible_layers(program, ctx), ctx)
        grams = self._grams(program, [p.layer for p in plans], ctx)
        factorizer = Factorizer(float(ctx.option("lowrank_damp")))
        measure_s = float(ctx.option("lowrank_measure_s"))
        timed: dict = {}
        actions = []
        for plan in plans:
            ly = plan.layer
            measured = measured_gains(ly, plan.ranks, measure_s, timed) if ctx.measure else {}
            ranks = _faster_here(plan.ranks, measured)
            if not ranks:
                ctx.stats.decline(RULE, ly.node, "no rank below break-even measured faster than the dense layer here")
                continue
            ctx.stats.match(RULE)
            actions += [self._action(ly, r, grams.get(ly.node), factorizer, ctx.target, plan.break_even,
                                     measured.get(r)) for r in ranks]
        return actions

    @staticmethod
    def _plans(layers: list[Layer], ctx: Any) -> list[Plan]:
        """The layers some rank below break-even pays for on the target, with the ranks proposed; the
        others are declined with the reason."""
        tgt = ctx.target
        step = lanes(tgt)
        levels = tuple(ctx.option("lowrank_levels"))
        plans = []
        for ly in layers:
            if ly.gemm.full_rank <= step:
                ctx.stats.decline(RULE, ly.node, f"tiny layer: full rank {ly.gemm.full_rank} leaves no rank "
                                  f"that is a multiple of {step} below it")
                continue
            be = break_even_rank(ly.gemm, tgt, step)
            ranks = proposed_ranks(be, step, levels)
            if not ranks:
                ctx.stats.decline(RULE, ly.node, f"no rank below break-even on {tgt.name}: at "
                                  f"[{ly.gemm.rows}×{ly.gemm.k}]·[{ly.gemm.k}×{ly.gemm.m}] two kernels cost more "
                                  "than the dense one (launch overhead or memory-bound)")
                continue
            plans.append(Plan(ly, be, ranks))
        return plans

    def _action(self, ly: Layer, rank: int, gram: torch.Tensor | None, factorizer: Factorizer, target: Any,
                break_even: int | None = None, measured: float | None = None) -> Action:
        method = PLAIN if gram is None else ACTIVATION
        full = ly.gemm.full_rank
        info: dict[str, Any] = {"rank": rank, "full_rank": full, "method": method}
        if break_even is not None:
            info["break_even_rank"] = break_even
        if measured is not None:
            info["layer_measured_gain_s"] = measured

        def apply(prog: Any) -> None:
            # the SVD runs here, once per layer (cached), not when proposing: the allocator applies
            # every action it scores, and proposing stays cheap for layers it never scores
            info["energy_kept"] = factor_layer(prog, ly.node, rank, gram, factorizer)

        return Action(
            pass_name=self.name, group=ly.node, layer=ly.layer, describe=f"rank {rank} of {full} ({method})",
            level=ly.gemm.weights_removed(rank), nodes=frozenset({ly.node}),
            predicted_gain_s=ly.gemm.dense_seconds(target) - ly.gemm.factored_seconds(rank, target),
            apply=apply, info=info)

    def actions_at(self, program: Any, ctx: Any, keep: float) -> list[Action]:
        """One action per eligible layer keeping ``keep`` of its full rank, whatever the cost
        model says (``keep=1`` reproduces every layer)."""
        layers = eligible_layers(program, ctx)
        grams = self._grams(program, layers, ctx)
        factorizer = Factorizer(float(ctx.option("lowrank_damp")))
        out = []
        for ly in layers:
            rank = min(ly.gemm.full_rank, max(1, round(keep * ly.gemm.full_rank)))
            out.append(self._action(ly, rank, grams.get(ly.node), factorizer, ctx.target))
        return out

    def run(self, program: Any, ctx: Any) -> bool:
        """Without the allocator: factor every eligible layer keeping the fraction of its rank given
        by option ``lowrank_keep`` (no option: change nothing)."""
        keep = ctx.option("lowrank_keep")
        if keep is None:
            return False
        actions = self.actions_at(program, ctx, float(keep))
        for a in actions:
            a.apply(program)
            ctx.stats.match(RULE)
        return bool(actions)
