"""One operator to tune on its own: the template's arguments plus what code generation needs.

An :class:`Operator` is data: the op (``matmul``, ``conv2d``, ``depthwise_conv2d``, ``elementwise``,
``reduction``),
the positional arguments of its template (``matmul``: M, N, K) and options (dtype, epilogue,
layout, ...). Options the template declares go to the template; the others (``b_layout`` of a
matmul, ``fn`` of an elementwise kernel) only to the code generator. The operator also makes
seeded inputs, the reference result (PyTorch, computed in float64) and the PyTorch call that is
the vendor-library baseline, and it counts FLOPs and the bytes that must cross memory at least.

Shapes on the command line (``parse``)::

    matmul       MxNxK[,b_layout=nk][,epilogue=bias+relu]      C[M,N] = A[M,K] @ B[K,N] (B[N,K] with nk)
                 [,cores=tensor][,dtype=float16|int8]          on tensor cores (a GPU's code generator only)
    conv2d       NxCxHxW,OxCxKHxKW[,stride=S][,pad=P][,dilation=D][,layout=NHWC|NCHWc|NHWCc]
                 NCHWc / NHWCc: NCHW / NHWC tensors, computed directly on channel blocks (the weights
                 packed once)
    depthwise_conv2d NxCxHxW,KHxKW[,stride=S][,pad=P][,dilation=D]   groups = C, NHWC tensors, weights [KH, KW, C]
    elementwise  NUMEL or AxBx...[,inputs=2][,fn=add]
    reduction    ROWSxCOLS[,kind=softmax|layernorm]
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from optic import targets
from optic.targets import Target

from .space import Space, SpaceError
from .templates import EPILOGUES, TEMPLATES, tensor_core_dtype

__all__ = ["ELEMENTWISE_FNS", "Operator"]

# Elementwise functions the CPU code generator knows: name -> (arity, torch function).
ELEMENTWISE_FNS = {
    "add": (2, torch.add), "sub": (2, torch.sub), "mul": (2, torch.mul), "maximum": (2, torch.maximum),
    "relu": (1, torch.relu), "gelu": (1, F.gelu), "silu": (1, F.silu), "sigmoid": (1, torch.sigmoid),
    "tanh": (1, torch.tanh), "exp": (1, torch.exp), "neg": (1, torch.neg),
}  # fmt: skip
_ACTIVATIONS = {"relu": torch.relu, "relu6": F.relu6, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}
# ``cores`` of a matmul: "simt" (CUDA cores, the default) or "tensor" (``matmul_tensorcore_gpu`` on a GPU).
_CODEGEN_OPTIONS = {"matmul": {"b_layout": "kn", "cores": None}, "conv2d": {}, "depthwise_conv2d": {},
                    "elementwise": {"fn": None}, "reduction": {}}
_ALIASES = {"pad": "padding", "dilate": "dilation", "act": "epilogue"}
LAYERNORM_EPS = 1e-5


def _template_keywords(op: str) -> dict[str, Any]:
    """The keyword options the template for ``op`` declares, with their defaults (CPU and GPU agree)."""
    sig = inspect.signature(TEMPLATES[op, "cpu"])
    return {n: p.default for n, p in sig.parameters.items()
            if p.default is not inspect.Parameter.empty and n != "target"}


@dataclass(frozen=True)
class Operator:
    """An operator with fixed shapes: ``Operator("matmul", (512, 512, 512))``."""

    op: str
    args: tuple[int, ...]
    options: tuple[tuple[str, Any], ...] = ()

    def __init__(self, op: str, args: tuple[int, ...] | list[int], **options: Any):
        if op not in _CODEGEN_OPTIONS:
            raise SpaceError(f"no template for operator {op!r}; known: {sorted(_CODEGEN_OPTIONS)}")
        known = {**_template_keywords(op), **_CODEGEN_OPTIONS[op]}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise SpaceError(f"{op} has no option {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        merged = {**known, **{k: v for k, v in options.items() if v is not None}}
        merged["epilogue"] = tuple(merged.get("epilogue") or ()) if "epilogue" in merged else None
        if merged.get("epilogue") is None:
            merged.pop("epilogue", None)
        bad = [e for e in merged.get("epilogue", ()) if e not in EPILOGUES]
        if bad:
            raise SpaceError(f"unknown epilogue {bad}; known: {list(EPILOGUES)}")
        if op == "elementwise":
            merged["fn"] = merged.get("fn") or ("add" if merged["inputs"] >= 2 else "relu")
            arity = ELEMENTWISE_FNS.get(merged["fn"], (None,))[0]
            if arity is None:
                raise SpaceError(f"unknown elementwise fn {merged['fn']!r}; known: {sorted(ELEMENTWISE_FNS)}")
            if arity == 1 and merged["inputs"] != 1:
                raise SpaceError(f"elementwise fn {merged['fn']} takes one input, not {merged['inputs']}")
        if op == "matmul" and merged["b_layout"] not in ("kn", "nk", "packed"):
            raise SpaceError(f"matmul b_layout is 'kn' (B[K,N]), 'nk' (B[N,K], nn.Linear's weight) or 'packed' "
                             f"(B[K,N] packed once for the configuration: constant weights), not {merged['b_layout']!r}")
        cores = merged.pop("cores", None) or "simt"  # SIMT, the default, stays out of the key (keys predate it)
        if cores not in ("simt", "tensor"):
            raise SpaceError(f"cores is 'simt' or 'tensor' (a matmul's tensor-core template), not {cores!r}")
        if cores == "tensor":
            # A tensor-core GEMM is generated for a GPU, never tuned on this machine: its dtype is the GPU's.
            merged["cores"], merged["dtype"] = cores, tensor_core_dtype(options.get("dtype") or "float16")
        elif str(merged.get("dtype", "float32")) != "float32":
            raise SpaceError(f"only float32 operators can be tuned here yet, not {merged['dtype']} "
                             "(a matmul with cores='tensor' takes float16 or int8)")
        args = tuple(int(a) for a in args)
        if any(a < 1 for a in args):
            raise SpaceError(f"{op} sizes must be positive: {args}")
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "options", tuple(sorted(merged.items())))

    # -- declaration ----------------------------------------------------------------------------------
    @property
    def opts(self) -> dict[str, Any]:
        return dict(self.options)

    def template_kwargs(self) -> dict[str, Any]:
        names = _template_keywords(self.op)
        return {k: v for k, v in self.options if k in names}

    def space(self, target: str | Target = "cpu") -> Space:
        """The template's search space for this operator on ``target``."""
        t = targets.get(target)
        if self.opts.get("cores") == "tensor":
            if t.kind != "gpu":
                raise SpaceError(f"a tensor-core matmul has no {t.kind} template")
            return TEMPLATES["matmul_tensorcore", "gpu"](
                *self.args, target=t, b_contiguous="n" if self.opts["b_layout"] == "kn" else "k",
                **self.template_kwargs())
        if self.direct and t.kind != "cpu":
            raise SpaceError(f"the direct ({self.opts['layout']}) convolution has no {t.kind} template; use layout "
                             "NCHW or NHWC")
        if (self.op, t.kind) not in TEMPLATES:
            raise SpaceError(f"no {t.kind} template for {self.op}")
        if self.packed_b and t.kind != "cpu":
            raise SpaceError(f"a matmul with B packed for its configuration has no {t.kind} template")
        space = TEMPLATES[self.op, t.kind](*self.args, target=t, **self.template_kwargs())
        if self.packed_b:  # the cost model charges B's packing unless it was done once, ahead
            return space.with_meta(b_layout="packed")
        return space

    def as_dict(self) -> dict[str, Any]:
        return {"op": self.op, "args": list(self.args),
                "options": {k: list(v) if isinstance(v, tuple) else v for k, v in self.options}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Operator:
        return cls(d["op"], tuple(d["args"]), **d.get("options", {}))

    @property
    def key(self) -> str:
        """A structural hash of the operator (op, shapes, options): equal for equal computations."""
        text = json.dumps(self.as_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def __str__(self) -> str:
        o = self.opts
        if self.op == "matmul":
            text = "matmul {}x{}x{}".format(*self.args) + {"nk": " (B[N,K])", "packed": " (B packed)"}.get(
                o["b_layout"], "")
            text += " on tensor cores" if o.get("cores") == "tensor" else ""
        elif self.op == "conv2d":
            n, c, h, w, f, r, s = self.args
            text = (f"conv2d {n}x{c}x{h}x{w},{f}x{c}x{r}x{s} stride {o['stride']} pad {o['padding']}"
                    + (f" dilation {o['dilation']}" if o["dilation"] != 1 else "") + f" {o['layout']}")
        elif self.op == "depthwise_conv2d":
            n, c, h, w, r, s = self.args
            text = (f"depthwise conv2d {n}x{h}x{w}x{c},{r}x{s} stride {o['stride']} pad {o['padding']}"
                    + (f" dilation {o['dilation']}" if o["dilation"] != 1 else "") + " NHWC")
        elif self.op == "elementwise":
            text = f"elementwise {o['fn']} over {self.args[0]} elements"
        else:
            text = f"{o['kind']} {self.args[0]}x{self.args[1]}"
        epi = o.get("epilogue") or ()
        return text + (f" + {'+'.join(epi)}" if epi else "") + f" {o.get('dtype', 'float32')}"

    # -- parsing --------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, op: str, shape: str, **options: Any) -> Operator:
        """An operator from the command line's OP and SHAPE (see the module docstring)."""
        parts = [p.strip() for p in shape.split(",") if p.strip()]
        dims, opts = [], {}
        for p in parts:
            if "=" in p:
                k, v = (x.strip() for x in p.split("=", 1))
                opts[_ALIASES.get(k, k)] = _value(k, v)
            else:
                try:
                    dims.append(tuple(int(x) for x in p.lower().split("x")))
                except ValueError:
                    raise SpaceError(f"bad size {p!r} in {op} shape {shape!r}: sizes are integers joined by 'x'") from None
        opts.update({k: v for k, v in options.items() if v is not None})
        if op == "matmul":
            if len(dims) != 1 or len(dims[0]) != 3:
                raise SpaceError(f"matmul SHAPE is MxNxK, not {shape!r}")
            return cls(op, dims[0], **opts)
        if op == "conv2d":
            if len(dims) != 2 or len(dims[0]) != 4 or len(dims[1]) != 4:
                raise SpaceError(f"conv2d SHAPE is NxCxHxW,OxCxKHxKW[,stride=S][,pad=P], not {shape!r}")
            (n, c, h, w), (f, c2, r, s) = dims
            if c2 != c:
                raise SpaceError(f"conv2d weight has {c2} input channels but the input has {c} (groups are not tuned)")
            return cls(op, (n, c, h, w, f, r, s), **opts)
        if op == "depthwise_conv2d":
            if len(dims) != 2 or len(dims[0]) != 4 or len(dims[1]) != 2:
                raise SpaceError(f"depthwise_conv2d SHAPE is NxCxHxW,KHxKW[,stride=S][,pad=P], not {shape!r}")
            (n, c, h, w), (r, s) = dims
            return cls(op, (n, c, h, w, r, s), **opts)
        if op == "elementwise":
            if len(dims) != 1:
                raise SpaceError(f"elementwise SHAPE is NUMEL or AxBx..., not {shape!r}")
            return cls(op, (math.prod(dims[0]),), **opts)
        if op == "reduction":
            if len(dims) != 1 or len(dims[0]) < 2:
                raise SpaceError(f"reduction SHAPE is ROWSxCOLS (the last size is reduced), not {shape!r}")
            return cls(op, (math.prod(dims[0][:-1]), dims[0][-1]), **opts)
        raise SpaceError(f"no template for operator {op!r}; known: {sorted(_CODEGEN_OPTIONS)}")

    @classmethod
    def from_workload(cls, workload: Any) -> Operator | None:
        """The operator of a lowered kernel's workload (``optic.backend.kernels.Workload``), or None when no
        template covers it."""
        spec = workload.template_args()
        if spec is None:
            return None
        op, args, kwargs = spec
        try:
            return cls(op, args, **kwargs)
        except SpaceError:
            return None

    # -- numbers --------------------------------------------------------------------------------------
    @property
    def out_shape(self) -> tuple[int, ...]:
        if self.op == "matmul":
            return self.args[0], self.args[1]
        if self.op == "conv2d":
            n, _, h, w, f, r, s = self.args
            oh, ow = self.conv_out_hw
            return (n, oh, ow, f) if self.nhwc else (n, f, oh, ow)
        if self.op == "depthwise_conv2d":
            oh, ow = self.conv_out_hw
            return self.args[0], oh, ow, self.args[1]
        if self.op == "elementwise":
            return (self.args[0],)
        return self.args[0], self.args[1]

    @property
    def packed_b(self) -> bool:
        """A matmul whose B (constant weights) is packed once for the configuration (``codegen_cpu.kernel_args``)."""
        return self.op == "matmul" and self.opts["b_layout"] == "packed"

    @property
    def direct(self) -> bool:
        """A convolution computed directly on channel blocks (layout "NCHWc" or "NHWCc"): its weights are packed for the
        configuration (``codegen_cpu.kernel_args``)."""
        return self.op == "conv2d" and self.opts["layout"] in ("NCHWc", "NHWCc")

    @property
    def nhwc(self) -> bool:
        """A convolution whose tensors (input, output, residual) are NHWC."""
        return self.op == "depthwise_conv2d" or (self.op == "conv2d" and self.opts["layout"] in ("NHWC", "NHWCc"))

    @property
    def conv_shape(self) -> dict[str, int]:
        """A conv2d's sizes and options by name, as its template's ``meta["shape"]`` has them."""
        if self.op == "depthwise_conv2d":
            n, c, h, w, r, s = self.args
            f = c
        else:
            n, c, h, w, f, r, s = self.args
        o = self.opts
        return dict(N=n, C=c, H=h, W=w, F=f, R=r, S=s, stride=o["stride"], padding=o["padding"],
                    dilation=o["dilation"])

    @property
    def conv_out_hw(self) -> tuple[int, int]:
        h, w, r, s = self.args[2], self.args[3], self.args[-2], self.args[-1]
        o = self.opts
        return tuple((x + 2 * o["padding"] - o["dilation"] * (k - 1) - 1) // o["stride"] + 1
                     for x, k in ((h, r), (w, s)))  # type: ignore[return-value]

    @property
    def flops(self) -> int:
        """Floating-point operations (a multiply-add counts two)."""
        if self.op == "matmul":
            m, n, k = self.args
            return 2 * m * n * k
        if self.op == "conv2d":
            n, c, _, _, f, r, s = self.args
            oh, ow = self.conv_out_hw
            return 2 * n * f * oh * ow * c * r * s
        if self.op == "depthwise_conv2d":
            n, c, _, _, r, s = self.args
            oh, ow = self.conv_out_hw
            return 2 * n * c * oh * ow * r * s
        if self.op == "elementwise":
            return self.args[0] * max(1, self.opts["inputs"] - 1)
        rows, cols = self.args
        return 5 * rows * cols

    @property
    def min_bytes(self) -> int:
        """Bytes every input and the output must cross memory at least once."""
        return 4 * (sum(math.prod(s) for s in self.input_shapes()) + math.prod(self.out_shape))

    # -- data -----------------------------------------------------------------------------------------
    def input_shapes(self) -> list[tuple[int, ...]]:
        o, epi = self.opts, self.opts.get("epilogue", ())
        if self.op == "matmul":
            m, n, k = self.args
            shapes = [(m, k), (n, k) if o["b_layout"] == "nk" else (k, n)]
            feat = n
        elif self.op == "conv2d":
            n, c, h, w, f, r, s = self.args
            shapes = [(n, h, w, c) if self.nhwc else (n, c, h, w), (f, c, r, s)]
            feat = f
        elif self.op == "depthwise_conv2d":
            n, c, h, w, r, s = self.args
            shapes, feat = [(n, h, w, c), (r, s, c)], c
        elif self.op == "elementwise":
            return [(self.args[0],)] * o["inputs"]
        else:
            return [tuple(self.args)]
        if "bias" in epi:
            shapes.append((feat,))
        if "residual" in epi:
            shapes.append(self.out_shape)
        return shapes

    def make_inputs(self, seed: int = 0) -> list[torch.Tensor]:
        """Seeded float32 inputs, normal with a spread that keeps outputs near unit scale."""
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(s, generator=gen, dtype=torch.float32) for s in self.input_shapes()]

    def reference(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The result, computed by PyTorch in float64 and rounded to float32."""
        return self._torch([t.double() for t in inputs]).float()

    def torch_call(self, inputs: list[torch.Tensor]):
        """A zero-argument call of PyTorch's own kernels for this operator (the baseline)."""
        return lambda: self._torch(inputs)

    def _torch(self, x: list[torch.Tensor]) -> torch.Tensor:
        o, epi = self.opts, list(self.opts.get("epilogue", ()))
        if self.op == "matmul":
            y = F.linear(x[0], x[1]) if o["b_layout"] == "nk" else x[0] @ x[1]
        elif self.op == "conv2d":
            inp = x[0].permute(0, 3, 1, 2) if self.nhwc else x[0]
            y = F.conv2d(inp, x[1], stride=o["stride"], padding=o["padding"], dilation=o["dilation"])
            if self.nhwc:
                y = y.permute(0, 2, 3, 1)
        elif self.op == "depthwise_conv2d":
            w = x[1].permute(2, 0, 1).unsqueeze(1)  # [R, S, C] -> [C, 1, R, S]
            y = F.conv2d(x[0].permute(0, 3, 1, 2), w, stride=o["stride"], padding=o["padding"],
                         dilation=o["dilation"], groups=self.args[1]).permute(0, 2, 3, 1)
        elif self.op == "elementwise":
            fn = ELEMENTWISE_FNS[o["fn"]][1]
            if ELEMENTWISE_FNS[o["fn"]][0] == 1:
                return fn(x[0])
            y = fn(x[0], x[1])
            for t in x[2:]:
                y = fn(y, t)
            return y
        elif o["kind"] == "softmax":
            return torch.softmax(x[0], dim=-1)
        else:
            return F.layer_norm(x[0], (self.args[1],), eps=LAYERNORM_EPS)
        extra = iter(x[2:])
        for e in epi:
            if e == "bias":
                b = next(extra)
                y = y + (b.view(1, -1, 1, 1) if self.op == "conv2d" and not self.nhwc else b)
            elif e == "residual":
                y = y + next(extra)
            else:
                y = _ACTIVATIONS[e](y)
        return y


def _value(key: str, text: str) -> Any:
    if key in ("epilogue", "act"):
        return tuple(e for e in text.replace("+", " ").split() if e)
    try:
        return int(text)
    except ValueError:
        return text
