"""The TIR expressions both code generators compute, so that a CPU and a GPU kernel of one operator
compute the same thing: the fused epilogue and the elementwise functions (in fp32), and the zero
padding past an edge.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["elementwise_value", "epilogue", "padded"]


def padded(tvm: Any, conds: list[Any], value: Any) -> Any:
    """``value`` where every condition holds, else 0 (padding); no select when there is no condition
    (``None`` entries are conditions that always hold)."""
    conds = [c for c in conds if c is not None]
    if not conds:
        return value
    cond = tvm.tirx.all(*conds) if len(conds) > 1 else conds[0]
    return tvm.tirx.if_then_else(cond, value, tvm.tirx.const(0, value.dtype))


def epilogue(tvm: Any, value: Any, steps: tuple[str, ...], bias: Any, residual: Any) -> Any:
    """The fused epilogue ``steps`` applied to one output element. ``bias``/``residual``: that element's operand."""
    for e in steps:
        if e == "bias":
            value = value + bias
        elif e == "residual":
            value = value + residual
        elif e == "relu":
            value = tvm.tirx.max(value, tvm.tirx.const(0, "float32"))
        elif e == "relu6":
            value = tvm.tirx.min(tvm.tirx.max(value, tvm.tirx.const(0, "float32")), tvm.tirx.const(6, "float32"))
        elif e == "gelu":
            value = 0.5 * value * (1.0 + tvm.tirx.erf(value * (1.0 / math.sqrt(2.0))))
        elif e == "silu":
            value = value * tvm.tirx.sigmoid(value)
        elif e == "tanh":
            value = tvm.tirx.tanh(value)
        elif e == "sigmoid":
            value = tvm.tirx.sigmoid(value)
        else:  # the Operator validated the names against the templates' EPILOGUES
            raise AssertionError(f"epilogue {e} has no code")
    return value


def elementwise_value(tvm: Any, fn: str, values: list[Any]) -> Any:
    """``fn`` (an ``ELEMENTWISE_FNS`` name) of one element of each input: unary on the first, binary
    folded left over all of them."""
    zero = tvm.tirx.const(0, "float32")
    unary = {
        "relu": lambda x: tvm.tirx.max(x, zero), "sigmoid": tvm.tirx.sigmoid, "tanh": tvm.tirx.tanh,
        "exp": tvm.tirx.exp, "neg": lambda x: zero - x, "silu": lambda x: x * tvm.tirx.sigmoid(x),
        "gelu": lambda x: 0.5 * x * (1.0 + tvm.tirx.erf(x * (1.0 / math.sqrt(2.0)))),
    }  # fmt: skip
    binary = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
              "maximum": tvm.tirx.max}
    if fn in unary:
        return unary[fn](values[0])
    out = values[0]
    for v in values[1:]:
        out = binary[fn](out, v)
    return out
