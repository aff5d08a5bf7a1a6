"""quantize: int8 convolutions and linears, chosen per layer under the accuracy budget. Lossy.

Per conv/linear (with the activation after it fused), an int8 kernel of :mod:`optic.backend.int8`: int8
weights with one symmetric scale per output channel, uint8 activations with one scale and zero point per
tensor, int32 accumulation, the float32 result dequantized in the kernel's epilogue where a consumer
stays float, or requantized in it to the next int8 layer's uint8 input when that layer is the only
consumer (also through flatten/reshape/permute), so that consecutive int8 layers pass uint8 tensors and
nothing is quantized between them (:func:`chain`).

Calibration, per layer input: the range is taken three ways from the fit split (min–max; the
0.01 %/99.99 % percentiles; the clipping ratio that minimises the squared quantization error of the
recorded values), and the one whose *layer output* error (relative L2 against the float layer on the
first calibration samples, int8 kernel run for real) is lowest is kept; the report shows which.

Each layer is one action of the budget's allocator (:mod:`optic.budget`): its predicted gain is the
target's roofline at the int8 rate against float32, its metric cost is measured on the fit split,
and on this machine a layer that is not faster in int8 is undone. Layers stay float32, with the
reason in the report, when the weight is computed or shared, the conv is not 2-D with zero padding,
the layer is too small to gain (fewer than ``quantize_min_macs`` multiply-adds), or the CPU has no
int8 kernels (oneDNN needs VNNI or AMX to be faster than float; without them the pass declines).
Activation smoothing (SmoothQuant, Xiao et al. 2023), for linears: where a few input channels carry
much larger values than the rest (a trained transformer's LayerNorm outputs do), one per-tensor
activation scale spends its 256 steps on them and the other channels lose their resolution. The
smoothed alternative divides input channel ``j`` by ``s_j = max|X_j|^α / max|W[:, j]|^(1−α)`` and
multiplies the weight's column ``j`` by it: the product is the same, the activation's channels even
out, the weight (quantized per output channel) takes the spread. ``s_j`` is rounded to a power of two,
so ``x·(1/s)`` and ``W·s`` are exact in float32 and only the int8 rounding changes. Per linear, α in
:data:`SMOOTH_ALPHAS` is calibrated like the plain layer and the smoothed variant is proposed (a
milder level of the same group: the allocator keeps it where the plain one breaks the budget, or where
its gain per metric lost is better) when its output error is at most :data:`SMOOTH_GAIN` of the plain
one's. The division is a ``mul`` before the quantize step, which optic's generated kernels fold into
their input copy.
Bias correction (Nagel et al. 2019), for every variant: the int8 layer's mean error per output channel on
the calibration samples, before its activation, is subtracted from its bias (:func:`bias_correction`). The
weight's rounding times a mostly positive input (after a ReLU or GELU), or a clipped range, shifts every
output of a channel the same way; such shifts add up coherently through the layers while zero-mean noise
adds in quadrature. The correction is kept where the mean is a share of the error that noise would not give
and it lowers the layer's output error; the report says which layers have it ("bias-corrected").
Attention's batched GEMMs (inside ``scaled_dot_product_attention``) stay float32: no int8 kernel for
them is wired in yet.

Runs on the host CPU only (the kernels are oneDNN's through PyTorch); other targets get a note.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx

from optic import device, ir
from optic.backend import int8
from optic.budget.allocator import Action
from optic.budget.calibration import iter_values
from optic.ir.opview import Op, const_value, view
from optic.ir.rewrite import OPAQUE, Rule, RuleStats, Site, apply_rules, find_sites
from optic.pipeline import cost
from optic.pipeline.registry import Option, register

METHODS = ("minmax", "percentile", "mse")
PERCENTILE = 1e-4  # the share of recorded values clipped on each side by "percentile"
SAMPLE = 1 << 16  # recorded activation values kept per layer for percentile and MSE calibration
SMOOTH_ALPHAS = (0.5, 0.75)  # SmoothQuant's migration strengths tried per linear (0.5: the paper's default)
SMOOTH_GAIN = 0.8  # a smoothed linear is proposed when its output error is at most this share of the plain one's
# bias correction is kept where the mean it removes is at least this share of the layer's squared error (pre-activation)
# and at least BIAS_SAMPLES_FACTOR / (samples per channel): a mean of pure noise has a share of about 1 / samples
BIAS_SHARE = 0.05
BIAS_SAMPLES_FACTOR = 4.0
ERROR_SAMPLES = 8  # calibration samples the per-layer output error is measured on
MIN_MACS = 50_000  # below this a layer's int8 kernel cannot pay for its quantize step (default)
# with optic's generated int8 kernels a call costs the kernel and about 3 µs, not oneDNN's ~37 µs, and the pass times
# each layer's kernel against its float op on the example's batch: only layers too small for that to matter stay out
# (the digits CNN's 1->64 stem, 36,864 multiply-adds, fp32 10-39 µs, int8 about 3 µs)
GENERATED_MIN_MACS = 4_096
RULE = "quantize"

# op-view activation -> oneDNN post-op (attr, scalars, algorithm); int8 kernels fuse these
POST_OPS = {
    "relu": lambda a: ("relu", [], ""),
    "gelu": lambda a: ("gelu", [], a.get("approximate", "none")),
    "silu": lambda a: ("swish", [], ""),
    "sigmoid": lambda a: ("sigmoid", [], ""),
    "tanh": lambda a: ("tanh", [], ""),
    "hardtanh": lambda a: ("hardtanh", [float(a.get("min_val", -1.0)), float(a.get("max_val", 1.0))], ""),
}


def activation_params(lo: float, hi: float) -> tuple[float, int]:
    """uint8 scale and zero point covering ``[lo, hi]`` (widened to include 0, which must be exact)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi - lo < 1e-12:
        return 1.0, 0
    scale = (hi - lo) / 255.0
    zp = int(min(255, max(0, round(-lo / scale))))
    return float(scale), zp


@dataclass
class Layer:
    """A conv or linear the pass can run in int8, with its fused activation."""

    op: Op
    act: Op | None
    post: tuple
    macs: int

    @property
    def last(self) -> fx.Node:
        return (self.act or self.op).node

    @property
    def nodes(self) -> list[fx.Node]:
        return [self.op.node] + ([self.act.node] if self.act else [])


@dataclass
class Calibrated:
    """A layer's input quantization: the chosen method, its (scale, zero point), and every method's error."""

    method: str
    scale: float
    zero_point: int
    errors: dict[str, float] = field(default_factory=dict)  # the chosen method's: after the bias correction
    bias_shift: torch.Tensor | None = None  # per output channel, subtracted from the bias (:func:`bias_correction`)


def int8_supported(isa: Any) -> str | None:
    """Why a CPU with instruction sets ``isa`` cannot run int8 kernels faster than float32 (None when it can)."""
    if not set(isa or ()) & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        return "this CPU has no int8 dot-product instructions (VNNI or AMX): int8 would not be faster than float32"
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN: its int8 kernels are missing"
    return None


def _reason(op: Op, gm: fx.GraphModule, min_macs: int) -> str | None:
    """Why the conv or linear ``op`` stays float32, or None when it has an int8 kernel that pays."""
    w = op.const("weight")
    if w is None or "bias" not in op.consts:
        return "the weight or bias is computed, not a constant"
    if w.dtype != torch.float32 or ir.dtype(op.x) != torch.float32 or w.device.type != "cpu":
        return "not a float32 CPU layer"
    if ir.is_shared(gm, w, op.node):
        return "the weight is shared with another op (tied weights)"
    xs, ys = ir.shape(op.x), ir.shape(op.node)
    if xs is None or ys is None:
        return "input shape unknown"
    if op.kind == "conv":
        if op.attrs.get("nd") != 2 or op.attrs.get("transposed") or op.attrs.get("padding") is None \
                or op.attrs.get("padding_mode", "zeros") != "zeros":
            return "only 2-D, non-transposed, zero-padded convolutions have an int8 kernel"
    elif w.dim() != 2 or len(xs) < 2:
        return "not a 2-D weight"
    macs = _macs(op)
    if macs < min_macs:
        return f"{macs} multiply-adds: too small for int8 to pay for quantizing its input"
    return None


def _macs(op: Op) -> int:
    w = op.const("weight")
    if op.kind == "conv":
        return math.prod(ir.shape(op.node)) * w[0].numel()
    return math.prod(ir.shape(op.x)[:-1]) * w.numel()


def activation_gemms(gm: fx.GraphModule) -> tuple[int, int]:
    """The GEMMs whose operands are both activations (attention's q·kᵀ and p·v, in ``scaled_dot_product_attention``
    or as matmuls): how many, and their multiply-adds (0 where a shape is unknown)."""
    count, macs = 0, 0
    for node in gm.graph.nodes:
        op = view(node, gm)
        if op is None or op.kind not in ("sdpa", "matmul"):
            continue
        if op.kind == "matmul" and (not isinstance(op.x, fx.Node) or not isinstance(op.other, fx.Node)
                                    or const_value(op.other, gm) is not None):
            continue  # a constant operand: a linear in disguise, not attention
        try:
            if op.kind == "sdpa":
                q, k, v = (ir.shape(n) for n in (op.x, *op.other))
                macs += math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])
            else:
                macs += math.prod(ir.shape(op.node)) * ir.shape(op.x)[-1]
        except (TypeError, IndexError, AttributeError):
            pass
        count += 1
    return count, macs


def _fused_activation(op: Op, gm: fx.GraphModule) -> Op | None:
    """The activation the int8 kernel takes over: the layer's only reader, when oneDNN has it as a post-op."""
    users = ir.value_users(op.node)
    if len(users) != 1:
        return None
    a = view(users[0], gm)
    if (a is not None and a.kind == "act" and a.x is op.node and a.attrs.get("fn") in POST_OPS
            and not ir.is_inplace(a.node)):
        return a
    return None


def _layer(op: Op, gm: fx.GraphModule) -> Layer:
    act = _fused_activation(op, gm)
    post = POST_OPS[act.attrs["fn"]](act.attrs) if act else ("none", [], "")
    return Layer(op, act, post, _macs(op))


@dataclass
class QuantizableLayer(Site):
    """Convolutions and linears reading a tensor that have an int8 kernel worth running (:func:`_reason`
    says why not)."""

    min_macs: int = MIN_MACS

    def match(self, op: Op, ctx: Any) -> Op | None:
        return op if op.kind in self.kinds and isinstance(op.x, fx.Node) else None

    def guard(self, op: Op, ctx: Any) -> str | None:
        return _reason(op, op.node.graph.owning_module, self.min_macs)


def quantizable(min_macs: int) -> QuantizableLayer:
    return QuantizableLayer(RULE, kinds=frozenset({"conv", "linear"}), min_macs=min_macs)


# -- calibration --------------------------------------------------------------------------------------
@dataclass
class _Range:
    lo: float = math.inf
    hi: float = -math.inf
    samples: list[torch.Tensor] = field(default_factory=list)
    first: torch.Tensor | None = None  # the first ERROR_SAMPLES samples of the first batch, as recorded
    # per channel of the last dimension (a linear's inputs): the exact min and max, for smoothing
    chan_lo: torch.Tensor | None = None
    chan_hi: torch.Tensor | None = None


def observe(program: Any, nodes: list[fx.Node], inputs: list[tuple[tuple, dict]], seed: int = 0,
            channels: frozenset[str] = frozenset()) -> dict[str, _Range]:
    """Per node: the exact min and max over ``inputs``, a uniform sample of its values, and its first
    samples as they are (what the per-layer output error is measured on); for the nodes named in
    ``channels``, also the min and max of each channel of the last dimension."""
    gen = torch.Generator().manual_seed(seed)
    ranges = {n.name: _Range() for n in nodes}
    per_batch = max(1, SAMPLE // max(len(inputs), 1))
    for values in iter_values(program, nodes, inputs):
        for name, v in values.items():
            r = ranges[name]
            if r.first is None:
                r.first = v.detach()[:ERROR_SAMPLES].clone()
            flat = v.detach().float().reshape(-1)
            r.lo, r.hi = min(r.lo, float(flat.min())), max(r.hi, float(flat.max()))
            if name in channels and v.dim() >= 1:
                rows = v.detach().float().reshape(-1, v.shape[-1])
                lo, hi = rows.amin(0).cpu(), rows.amax(0).cpu()
                r.chan_lo = lo if r.chan_lo is None else torch.minimum(r.chan_lo, lo)
                r.chan_hi = hi if r.chan_hi is None else torch.maximum(r.chan_hi, hi)
            idx = device.randint(0, flat.numel(), (min(per_batch, flat.numel()),), gen, flat.device)
            r.samples.append(flat[idx].clone())
    return ranges


def smoothing_factors(x_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors for a linear's weight ``w`` [N, K] and its input's per-channel
    ``max|X_j|``: ``s_j = max|X_j|^α / max|W[:, j]|^(1−α)``, rounded to a power of two (so dividing the input
    and multiplying the weight are exact in float32), 1 where a channel or a column is all zero."""
    xmax = x_absmax.detach().double().cpu()
    wmax = w.detach().abs().amax(0).double().cpu()
    s = xmax.pow(alpha) / wmax.pow(1 - alpha)
    ok = (xmax > 0) & (wmax > 0) & torch.isfinite(s)
    s = torch.where(ok, s, torch.ones_like(s)).clamp(2.0 ** -20, 2.0 ** 20)
    return torch.exp2(torch.round(torch.log2(s))).float()


def _inverse(s: torch.Tensor) -> torch.Tensor:
    """``1/s`` in float32 for smoothing factors (powers of two: exact), what the input is multiplied by."""
    return (1.0 / s.double()).float()


def _smoothed_range(r: _Range, s: torch.Tensor, x: torch.Tensor, seed: int = 0) -> _Range:
    """The recorded range of ``X / s``: exact bounds from the per-channel ones, a sample from ``x`` (the first
    recorded samples) divided by ``s``."""
    inv = _inverse(s)
    flat = (x.detach().float().cpu() * inv).reshape(-1)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, flat.numel(), (min(SAMPLE, flat.numel()),), generator=gen)
    return _Range(lo=float((r.chan_lo * inv).min()), hi=float((r.chan_hi * inv).max()), samples=[flat[idx]])


def candidate_ranges(r: _Range) -> dict[str, tuple[float, int]]:
    """(scale, zero point) of each calibration method for one recorded range."""
    sample = torch.cat(r.samples).double().cpu() if r.samples else torch.zeros(1, dtype=torch.float64, device="cpu")
    out = {"minmax": activation_params(r.lo, r.hi)}
    q = torch.quantile(sample, torch.tensor([PERCENTILE, 1 - PERCENTILE], dtype=torch.float64, device="cpu"))
    out["percentile"] = activation_params(float(q[0]), float(q[1]))
    best, best_err = out["minmax"], math.inf
    for ratio in torch.logspace(-2.5, 0, 61, device="cpu").tolist():  # clipping ratios of the min-max range
        s, z = activation_params(r.lo * ratio, r.hi * ratio)
        err = float((int8.fake_quantize(sample, s, z) - sample).pow(2).mean())
        if err < best_err:
            best, best_err = (s, z), err
    out["mse"] = best
    return out


# -- emitting the int8 layer -----------------------------------------------------------------------------
def _kernel_args(layer: Layer, xq: Any, scale: float, zp: int, qw: Any, ws: Any, b: Any) -> tuple:
    """The int8 kernel's arguments (float32 out), as graph nodes or as tensors alike."""
    attr, scalars, algo = layer.post
    out = (1.0, 0, False, attr, [float(v) for v in scalars], algo)
    if layer.op.kind == "conv":
        a = layer.op.attrs
        return (xq, scale, zp, qw, ws, b, list(a["stride"]), list(a["padding"]), list(a["dilation"]),
                int(a["groups"]), *out)
    return (xq, scale, zp, qw, ws, b, *out)


def _weights(layer: Layer, smooth: torch.Tensor | None = None,
             shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The int8 weight, its per-channel scales and the float bias; ``smooth``: of the weight with its input
    columns multiplied by the smoothing factors; ``shift``: subtracted from the bias (a zero bias where the
    layer has none), :func:`bias_correction`."""
    w = layer.op.const("weight")
    if smooth is not None:
        w = w.detach().float() * smooth.to(w.device)  # a power of two per column: exact
    ws = int8.weight_scales(w)
    b = layer.op.const("bias")
    b = None if b is None else b.detach().float()
    if shift is not None:
        b = (torch.zeros(w.shape[0], device=w.device) if b is None else b) - shift.to(w.device).float()
    return int8.quantize_weight(w, ws), ws, b


def _kernel(layer: Layer, gm: fx.GraphModule, scale: float, zp: int, smooth: torch.Tensor | None = None,
            shift: torch.Tensor | None = None) -> fx.Node:
    """Replace ``layer`` by ``quantize → int8 kernel (float32 out)``; returns the kernel's node. ``smooth``:
    the input is divided by these per-channel factors first (a ``mul`` by their inverses: powers of two, exact)
    and the weight's columns multiplied by them; ``shift``: the bias correction, subtracted from the bias."""
    graph, op = gm.graph, layer.op
    qw, ws, b = _weights(layer, smooth, shift)
    with graph.inserting_before(op.node):
        x = op.x
        if smooth is not None:
            inv = ir.const_node(graph, gm, _inverse(smooth).to(op.const("weight").device), "int8_smooth")
            x = graph.call_function(torch.ops.aten.mul.Tensor, (x, inv))
            ir.stamp(x, layer.nodes, "quantize")
        xq = graph.call_function(int8.quantize_u8, (x, scale, zp, op.kind == "conv"))
        ir.stamp(xq, layer.nodes, "quantize")  # a quantize boundary: dumps show which layer's and which pass's
        wn = ir.const_node(graph, gm, qw, "int8_weight")
        sn = ir.const_node(graph, gm, ws, "int8_scale")
        bn = ir.const_node(graph, gm, b, "int8_bias") if b is not None else None
        target = int8.CONV if op.kind == "conv" else int8.LINEAR
        new = graph.call_function(target, _kernel_args(layer, xq, scale, zp, wn, sn, bn))
    ir.replace(layer.last, new, "quantize", layer.nodes)
    for n in reversed(layer.nodes):
        if not n.users:
            graph.erase_node(n)
    return new


def _batch_like(x: torch.Tensor, node: fx.Node) -> torch.Tensor:
    """``x`` (a calibration batch) cut or repeated to the batch of the example the graph was traced on."""
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    n = int(val.shape[0]) if hasattr(val, "shape") and len(val.shape) and isinstance(val.shape[0], int) else None
    if n is None or n == x.shape[0] or x.dim() < 2:
        return x
    return x[:n] if x.shape[0] >= n else x.repeat(-(-n // x.shape[0]), *([1] * (x.dim() - 1)))[:n]


def run_int8(layer: Layer, x: torch.Tensor, scale: float, zp: int, smooth: torch.Tensor | None = None,
             shift: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's int8 kernel on ``x`` (float32 out), outside any graph (``smooth``, ``shift``: as :func:`_kernel`)."""
    qw, ws, b = _weights(layer, smooth, shift)
    target = int8.CONV if layer.op.kind == "conv" else int8.LINEAR
    with torch.no_grad():
        if smooth is not None:
            x = x.float() * _inverse(smooth).to(x.device)
        xq = int8.quantize_u8(x, scale, zp, layer.op.kind == "conv")
        return target(*_kernel_args(layer, xq, scale, zp, qw, ws, b))


def measured_gain_generated(layer: Layer, x: torch.Tensor, scale: float, zp: int) -> float | None:
    """Seconds the layer saves on ``x`` (the example's batch) run by optic's generated int8 kernels (the
    quantize step and the kernel, :mod:`optic.backend.int8_amx`) instead of PyTorch's float32 op with its
    activation, timed here; None where those kernels do not cover the layer."""
    from optic.backend import int8_amx
    from optic.pipeline import timing

    attr = layer.post[0]
    a = layer.op.attrs
    conv = layer.op.kind == "conv"
    if not (int8_amx.covers(attr, a["stride"], a["dilation"], a["groups"]) if conv
            else int8_amx.covers(attr, [1, 1], [1, 1], 1)):
        return None
    qw, ws, b = _weights(layer)
    w = layer.op.const("weight").detach().float()
    bias = layer.op.const("bias")
    bias = None if bias is None else bias.detach().float()
    f = torch.nn.functional
    x = x.float()  # in the layout the layer sees: PyTorch's float op and the kernel each read it so
    # the kernel quantizes its float input itself (as in the graph, where no int8 kernel wrote it in uint8)
    kernel = int8_amx.Int8Kernel(qw, ws, b, scale, zp, int(a["stride"][0]) if conv else 1,
                                 tuple(a["padding"]) if conv else (0, 0), 1.0, 0, False, attr == "relu", False, conv,
                                 float_input=True, gelu=(layer.post[2] or "none") if attr == "gelu" else "")

    def floating() -> torch.Tensor:
        y = f.conv2d(x, w, bias, a["stride"], a["padding"], a["dilation"], a["groups"]) if conv else f.linear(x, w, bias)
        return int8.post_op(y, *layer.post)
    with torch.no_grad():
        generated = lambda: kernel(x)  # noqa: E731
        generated()
        t = timing.compare({"float": floating, "int8": generated}, rounds=3,
                           block=timing.calls_per_block(floating, target_s=0.003, cap=50), warmup=1)
    return t["float"].median - t["int8"].median


def run_float(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """The float layer (with its activation) on ``x``, in float64."""
    op, f = layer.op, torch.nn.functional
    w, b = op.const("weight").detach().double(), op.const("bias")
    b = None if b is None else b.detach().double()
    a = op.attrs
    if op.kind == "conv":
        y = f.conv2d(x.double(), w, b, a["stride"], a["padding"], a["dilation"], a["groups"])
    else:
        y = f.linear(x.double(), w, b)
    return int8.post_op(y, *layer.post)


LAYOUT_KINDS = ("flatten", "reshape", "permute", "transpose", "contiguous", "squeeze", "unsqueeze")


@dataclass
class RequantizeInEpilogue(Rule):
    """An int8 kernel whose only consumer is a quantize step writes that step's uint8 directly (the
    step is removed). Int8 kernels are optic's own ops, which the op view does not classify: the rule
    names them (``targets``) and the driver shows them as opaque ops."""

    def match(self, op: Op, ctx: Any) -> tuple[fx.Node, fx.Node, fx.Node] | None:
        kernel = op.node
        if op.kind != OPAQUE or kernel.args[int8.OUT_ARGS[kernel.target][2]]:
            return None  # not an int8 kernel, or one that already writes uint8
        found = _quantize_consumer(kernel, kernel.graph.owning_module)
        return None if found is None else (kernel, *found)

    def apply(self, m: tuple[fx.Node, fx.Node, fx.Node], ctx: Any) -> None:
        _requantize_in_epilogue(*m)


@dataclass
class ResidualFromQuantized(Rule):
    """A residual add after an int8 convolution (float out, no activation, the add its only reader) whose other
    operand is also quantized for an int8 layer (a ResNet block's input, quantized for the block's first
    conv) reads that int8 value, dequantized, instead of the float one.

    What ONNX Runtime's and PyTorch's own int8 flows (QDQ, PT2E) compute: the residual stream in uint8. It
    costs the other operand its quantization error (the same rounding its int8 reader already has), and it
    lets the compiled program fuse the add, its ReLU and the next quantize step into the convolution (oneDNN's
    ``sum`` post-op, accumulating into the uint8 buffer), so that the block's output is never written in
    float32. Linears keep the float residual (Inductor fuses a linear's add with a float operand; a
    transformer's residual stream is where its int8 error would matter most)."""

    def match(self, op: Op, ctx: Any) -> tuple[fx.Node, fx.Node, fx.Node] | None:
        node = op.node
        if op.kind != "add" or len(node.args) != 2 or node.kwargs or not all(isinstance(a, fx.Node) for a in node.args):
            return None
        for k, other in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            if (k is other or k.op != "call_function" or k.target is not int8.CONV or len(k.users) != 1
                    or k.args[int8.OUT_ARGS[k.target][2]] or k.args[13] != "none"):
                continue
            if ir.shape(other) is None or ir.shape(other) != ir.shape(k) or ir.dtype(other) != torch.float32:
                continue
            # a quantize step that comes before the add (the dequantized value is read there)
            q = next((u for u in other.users if u.op == "call_function" and u.target is int8.quantize_u8
                      and u.args[0] is other and u < node), None)
            if q is not None:
                return node, other, q
        return None

    def apply(self, m: tuple[fx.Node, fx.Node, fx.Node], ctx: Any) -> None:
        add, other, q = m
        with add.graph.inserting_before(add):
            dq = add.graph.call_function(int8.dequantize_u8, (q, float(q.args[1]), int(q.args[2])))
        dq.meta = dict(other.meta)  # the same shape, dtype and layout as the float value it stands for
        ir.stamp(dq, [add], "quantize")
        add.replace_input_with(other, dq)


def chain(gm: fx.GraphModule) -> int:
    """Requantize in the producers' epilogues (:class:`RequantizeInEpilogue`) and let convolutions' residual adds
    read the int8 value (:class:`ResidualFromQuantized`); how many were chained."""
    stats = RuleStats()
    apply_rules(gm, [RequantizeInEpilogue("requantize_in_epilogue", targets=frozenset(int8.OUT_ARGS)),
                     ResidualFromQuantized("residual_from_quantized")], None, stats)
    return stats.matched.get("requantize_in_epilogue", 0)


def _quantize_consumer(kernel: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node, fx.Node] | None:
    """(the value the quantize step reads, the step) when ``kernel``'s only consumer is a quantize
    step, directly or through ops that only move elements (flatten, reshape, permute: they take uint8
    alike); else None."""
    cur = kernel
    while len(cur.users) == 1:
        nxt = next(iter(cur.users))
        v = view(nxt, gm)
        if v is None or v.kind not in LAYOUT_KINDS or v.x is not cur:
            break
        cur = nxt
    q = next(iter(cur.users)) if len(cur.users) == 1 else None
    if q is None or q.op != "call_function" or q.target is not int8.quantize_u8 or q.args[0] is not cur:
        return None
    return cur, q


def _requantize_in_epilogue(kernel: fx.Node, value: fx.Node, q: fx.Node) -> None:
    """``kernel`` writes ``q``'s uint8 (its scale and zero point) and ``q`` goes."""
    i_s, i_z, i_u8 = int8.OUT_ARGS[kernel.target]
    args = list(kernel.args)
    args[i_s], args[i_z], args[i_u8] = float(q.args[1]), int(q.args[2]), True
    kernel.args = tuple(args)
    q.replace_all_uses_with(value)
    kernel.graph.erase_node(q)


def _still_quantizable(node: fx.Node, gm: fx.GraphModule, min_macs: int) -> Op:
    """The layer at ``node`` of the program an action is applied to, checked by the same site that proposed it."""
    site = quantizable(min_macs)
    op = view(node, gm)
    op = site.match(op, None) if op is not None else None
    why = "it is no longer a conv or linear reading a tensor" if op is None else site.guard(op, None)
    if why:
        raise RuntimeError(f"{node.name} can no longer be quantized: {why}")
    return op


def _applier(name: str, scale: float, zp: int, min_macs: int, smooth: torch.Tensor | None = None,
             shift: torch.Tensor | None = None):
    def apply(program: Any) -> None:
        gm = program.gm
        op = _still_quantizable(next(n for n in gm.graph.nodes if n.name == name), gm, min_macs)
        _kernel(_layer(op, gm), gm, scale, zp, smooth, shift)
        chain(gm)
        ir.eliminate_dead_code(gm)
        ir.drop_unused_constants(gm)
    return apply


def _layer_error(layer: Layer, x: torch.Tensor, scale: float, zp: int, smooth: torch.Tensor | None = None,
                 shift: torch.Tensor | None = None, ref: torch.Tensor | None = None) -> float:
    """Relative L2 error of the int8 layer (the kernel run for real) against the float layer on ``x``
    (``ref``: that float layer's output, where the caller has it already)."""
    x = x.detach()
    ref = run_float(layer, x) if ref is None else ref
    got = run_int8(layer, x, scale, zp, smooth, shift).double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-12))


def bias_correction(layer: Layer, x: torch.Tensor, scale: float, zp: int,
                    smooth: torch.Tensor | None = None) -> torch.Tensor | None:
    """Empirical bias correction (Nagel et al., "Data-Free Quantization", ICCV 2019, section 4.2, measured on
    the calibration samples instead of derived from BatchNorm statistics): the int8 layer's mean error per
    output channel, before its activation, on ``x``; subtracted from the bias, it removes the systematic part
    of the rounding error (the weight's rounding times the input's mean: large where the input is mostly
    positive, after a ReLU or GELU, or where clipping cuts one side of the range). Errors in later layers add
    up coherently from such shifts, while zero-mean noise adds in quadrature. None where the mean is too small
    a share of the error to tell from noise (:data:`BIAS_SHARE`, :data:`BIAS_SAMPLES_FACTOR`)."""
    linear = replace(layer, post=("none", [], ""))
    x = x.detach()
    err = run_int8(linear, x, scale, zp, smooth).double() - run_float(linear, x)
    dim = 1 if layer.op.kind == "conv" else err.dim() - 1
    others = [d for d in range(err.dim()) if d != dim]
    samples = err.numel() // max(err.shape[dim], 1)
    mean = err.mean(dim=others)
    total = float(err.pow(2).sum())
    share = float(mean.pow(2).sum()) * samples / total if total > 0 else 0.0
    if samples < 2 or share < max(BIAS_SHARE, BIAS_SAMPLES_FACTOR / samples):
        return None
    return mean.float()


_OVERHEAD: dict[bool, float] = {}


def call_overhead_s(generated: bool = False) -> float:
    """What an int8 layer costs beyond a float one whatever its size, measured once per process: a
    quantize step and an int8 conv on a tiny input against the float conv (oneDNN's int8 call through
    PyTorch and the quantize step: about 0.1 ms on the development machine; ``generated``: optic's
    generated AMX kernels for both, :mod:`optic.backend.int8_amx`)."""
    if generated not in _OVERHEAD:
        from optic.pipeline import timing

        x, w = torch.rand(1, 8, 4, 4, device="cpu"), torch.randn(8, 8, 3, 3, device="cpu")  # CPU kernels
        qw, ws = int8.quantize_weight(w, int8.weight_scales(w)), int8.weight_scales(w)
        args = ([1, 1], [1, 1], [1, 1], 1, 1.0, 0, False, "none", [], "")
        if generated:
            from optic.backend import int8_amx

            quant = int8_amx.Quantize(0.01, 0, True)
            kernel = int8_amx.Int8Kernel(qw, ws, None, 0.01, 0, 1, (1, 1), 1.0, 0, False, False, False, True)
            run = lambda: kernel(quant(x))  # noqa: E731
        else:
            run = lambda: int8.CONV(int8.quantize_u8(x, 0.01, 0, True), 0.01, 0, qw, ws, None, *args)  # noqa: E731
        run()
        t = timing.compare({"float": lambda: torch.nn.functional.conv2d(x, w, None, 1, 1), "int8": run},
                           rounds=5, block=20, warmup=5)
        _OVERHEAD[generated] = max(0.0, t["int8"].median - t["float"].median)
    return _OVERHEAD[generated]


# -- the pass -----------------------------------------------------------------------------------------
@register
class Quantize:
    name = "quantize"
    exact = False
    description = "int8 convolutions and linears (oneDNN kernels), per layer under the accuracy budget"
    options = (
        Option("quantize_min_macs", int, None, "layers with fewer multiply-adds than this stay fp32 (their "
               f"int8 kernel cannot pay for its quantize step; unset: {MIN_MACS} with oneDNN's int8 kernels, "
               f"{GENERATED_MIN_MACS} where optic's generated ones will run, each layer's gain being timed)"),
        Option("quantize_bias_correction", bool, True, "subtract each int8 layer's mean output error per channel, "
               "measured on the calibration samples, from its bias where that lowers the layer's error "
               "(False: never)"),
    )

    @staticmethod
    def _min_macs(ctx: Any) -> int:
        value = ctx.option("quantize_min_macs")
        if value is not None:
            return int(value)
        return GENERATED_MIN_MACS if ctx.generated_after else MIN_MACS

    def layers(self, program: Any, ctx: Any) -> list[Layer]:
        """The layers that can run in int8; the others are declined with the reason."""
        site = quantizable(self._min_macs(ctx))
        return [_layer(op, program.gm) for op in find_sites(program.gm, site, ctx, ctx.stats)]

    def candidates(self, program: Any, ctx: Any) -> list[Action]:
        why = self._why_not_here(ctx)
        if why:
            ctx.note(why)
            return []
        layers = self.layers(program, ctx)
        n_att, att_macs = activation_gemms(program.gm)
        if n_att:
            total = att_macs + sum(la.macs for la in layers)
            share = f" ({att_macs / total:.1%} of the multiply-adds of the GEMMs here)" if att_macs and total else ""
            ctx.note(f"{n_att} attention GEMM(s){share} stay float32: both operands are activations, so an int8 "
                     "kernel would quantize both on every call, and they run inside PyTorch's fused attention; "
                     "quantize takes the convolutions and linears, which hold the weights and most of the work")
        if not layers or ctx.calibration is None:
            return []
        ranges = observe(program, [la.op.x for la in layers], ctx.calibration.fit_inputs(),
                         channels=frozenset(la.op.x.name for la in layers if la.op.kind == "linear"))
        min_macs = self._min_macs(ctx)
        correct = bool(ctx.option("quantize_bias_correction"))
        actions = []
        for i, layer in enumerate(layers):
            if ctx.progress:
                ctx.progress("calibrating int8 layers", i, len(layers))
            r = ranges[layer.op.x.name]
            cal = self._calibrate(layer, r, r.first, correct=correct)
            if cal is None:
                ctx.stats.decline(RULE, layer.op.node.name, "the int8 kernel failed on the recorded input")
                continue
            measured = None
            if ctx.generated_after:  # the kernels that will run it, timed on the example's batch
                try:
                    measured = measured_gain_generated(layer, _batch_like(r.first, layer.op.x), cal.scale,
                                                       cal.zero_point)
                except Exception as e:  # noqa: BLE001 - the cost model predicts instead
                    ctx.note(f"{layer.op.node.name}: generated int8 kernel not timed ({str(e).splitlines()[0][:80]})")
            plain = self._action(layer, cal, ctx.target, min_macs, ctx.compiled_after, ctx.generated_after, measured)
            actions.append(plain)
            smoothed = self._calibrate_smoothed(layer, r, r.first, correct)
            if smoothed is not None and smoothed[0].errors[smoothed[0].method] <= SMOOTH_GAIN * cal.errors[cal.method]:
                actions.append(self._smoothed_action(plain, layer, *smoothed, ctx.target, min_macs, ctx.compiled_after))
        return actions

    @staticmethod
    def _why_not_here(ctx: Any) -> str | None:
        """Why no layer can be quantized for this target (a note for the whole model), or None."""
        if ctx.target.kind != "cpu":
            return (f"int8 kernels exist for CPUs only (oneDNN's, optic's AMX/VNNI ones); target '{ctx.target.name}' "
                    "is a GPU, so no layer was quantized (pass precision chooses bf16/fp16 layers there)")
        if not ctx.measure:
            return (f"int8 runs through this CPU's oneDNN kernels; target '{ctx.target.name}' is not this "
                    "machine, so no layer was quantized")
        why = int8_supported(getattr(ctx.target, "isa", ()))
        return f"no layer was quantized: {why}" if why else None

    def _action(self, layer: Layer, cal: Calibrated, target: Any, min_macs: int, compiled: bool = False,
                generated: bool = False, measured_gain_s: float | None = None) -> Action:
        w = layer.op.const("weight")
        t_fp32 = cost.kernel_seconds(2 * layer.macs, _bytes(layer, 4, 4), target, "float32")
        # the int8 call's fixed cost in the plain graph, measured on this machine: it decides small layers
        # there; compiled, the quantize step fuses into the producer and the call is one of the program's
        # (optic's generated kernels, where the CPU step offers them: their own, smaller fixed cost)
        fixed = 0.0 if compiled else call_overhead_s(generated)
        t_int8 = cost.kernel_seconds(2 * layer.macs, _bytes(layer, 1, 1), target, "int8") + fixed
        return Action(
            pass_name=self.name, group=layer.op.node.name, layer=ir.layer_name(layer.op.node),
            describe=f"int8 {tuple(w.shape)}, {cal.method}{_corrected(cal)} ({cal.errors[cal.method]:.2%} out err)",
            level=1.0, nodes=frozenset(n.name for n in layer.nodes),
            # timed with the generated kernels where they will run it (measured_gain_generated), else the
            # cost model's
            predicted_gain_s=max(t_fp32 - t_int8 if measured_gain_s is None else measured_gain_s, 0.0),
            apply=_applier(layer.op.node.name, cal.scale, cal.zero_point, min_macs, shift=cal.bias_shift),
            # compiled, the kernels fuse their quantize steps, residual adds and neighbours' requantization
            compiled_gain=True,
            info={"precision": "int8", "calibration": cal.method, "x_scale": cal.scale,
                  "x_zero_point": cal.zero_point, "layer_errors": cal.errors,
                  "bias_corrected": cal.bias_shift is not None})

    def _smoothed_action(self, plain: Action, layer: Layer, cal: Calibrated, smooth: torch.Tensor, alpha: float,
                         target: Any, min_macs: int, compiled: bool) -> Action:
        """The smoothed alternative of ``plain``: a milder level of its group (less error for about the same
        gain: in the plain graph the division is one more pass over the input; compiled, it fuses into the
        quantize step or the generated kernel's input copy)."""
        x = ir.shape(layer.op.x)
        extra = 0.0 if compiled else cost.kernel_seconds(math.prod(x), 8 * math.prod(x), target, "float32")
        w = layer.op.const("weight")
        return Action(
            pass_name=self.name, group=plain.group, layer=plain.layer,
            describe=f"int8 {tuple(w.shape)}, smoothed α={alpha:g}, {cal.method}{_corrected(cal)} "
                     f"({cal.errors[cal.method]:.2%} out err)",
            level=0.5, nodes=plain.nodes, predicted_gain_s=max(plain.predicted_gain_s - extra, 0.0),
            apply=_applier(layer.op.node.name, cal.scale, cal.zero_point, min_macs, smooth, cal.bias_shift),
            compiled_gain=True,
            info={**plain.info, "calibration": cal.method, "x_scale": cal.scale, "x_zero_point": cal.zero_point,
                  "layer_errors": cal.errors, "smoothing_alpha": alpha, "bias_corrected": cal.bias_shift is not None})

    @staticmethod
    def _calibrate(layer: Layer, r: _Range, x: torch.Tensor, smooth: torch.Tensor | None = None,
                   correct: bool = True) -> Calibrated | None:
        """The calibration method with the lowest layer output error, bias-corrected where that lowers it
        (``correct``)."""
        errors, params = {}, candidate_ranges(r)
        ref = run_float(layer, x.detach())  # the float layer: the same for every method and the correction
        for method, (s, z) in params.items():
            try:
                errors[method] = _layer_error(layer, x, s, z, smooth, ref=ref)
            except Exception:  # noqa: BLE001 - a kernel that fails here is never proposed
                return None
        method = min(METHODS, key=lambda m: errors[m])
        s, z = params[method]
        shift = bias_correction(layer, x, s, z, smooth) if correct else None
        if shift is not None:
            corrected = _layer_error(layer, x, s, z, smooth, shift, ref)
            if corrected < errors[method]:  # after the activation too
                return Calibrated(method, s, z, {**errors, method: corrected}, shift)
        return Calibrated(method, s, z, errors)

    def _calibrate_smoothed(self, layer: Layer, r: _Range, x: torch.Tensor,
                            correct: bool = True) -> tuple[Calibrated, torch.Tensor, float] | None:
        """The best smoothed calibration of a linear over :data:`SMOOTH_ALPHAS` (by the layer's output error):
        (its calibration, the factors, α); None for a conv, or where every factor is 1 (nothing to even out)."""
        if layer.op.kind != "linear" or r.chan_lo is None or x is None:
            return None
        amax = torch.maximum(r.chan_lo.abs(), r.chan_hi.abs())
        best = None
        for alpha in SMOOTH_ALPHAS:
            s = smoothing_factors(amax, layer.op.const("weight"), alpha)
            if bool((s == s[0]).all()):  # one factor for every channel: the plain layer, rescaled
                continue
            cal = self._calibrate(layer, _smoothed_range(r, s, x), x, s, correct)
            if cal is not None and (best is None or cal.errors[cal.method] < best[0].errors[best[0].method]):
                best = (cal, s, alpha)
        return best

    def run(self, program: Any, ctx: Any) -> bool:
        """Without the allocator: every proposed layer in int8, smoothed where that was proposed (used by tests
        and by hand)."""
        actions = one_per_layer(self.candidates(program, ctx))
        for a in actions:
            a.apply(program)
            ctx.stats.match("quantize")  # as lowrank's and prune's runs count theirs
        return bool(actions)


def one_per_layer(actions: list[Action], smoothed: bool = True) -> list[Action]:
    """Per layer, of its proposed int8 actions, the one with the lowest output error (``smoothed=False``: the
    plain one), in the order proposed: every layer in int8 without the allocator."""
    best: dict[str, Action] = {}
    for a in actions:
        if not smoothed and "smoothing_alpha" in a.info:
            continue
        err = a.info["layer_errors"][a.info["calibration"]]
        cur = best.get(a.group)
        if cur is None or err < cur.info["layer_errors"][cur.info["calibration"]]:
            best[a.group] = a
    return [a for a in actions if best.get(a.group) is a]


def _corrected(cal: Calibrated) -> str:
    return ", bias-corrected" if cal.bias_shift is not None else ""


def _bytes(layer: Layer, x_size: int, w_size: int) -> int:
    x, y = ir.shape(layer.op.x), ir.shape(layer.last)
    return math.prod(x) * x_size + layer.op.const("weight").numel() * w_size + math.prod(y) * 4
