"""Choosing a CUDA kernel's configuration: the GPU template's space for an operator on a GPU target
(``autotune.templates``: ``matmul_gpu``, or ``matmul_tensorcore_gpu`` for a matmul with
``cores="tensor"``, ``elementwise_gpu``, ``reduction_gpu``), and the cost model's best configuration
in it (nothing can be measured on a GPU here, so the model decides).
"""

from __future__ import annotations

from collections.abc import Callable

from optic import targets
from optic.autotune.operator import Operator
from optic.autotune.space import Space, SpaceError
from optic.autotune.templates import (
    elementwise_gpu,
    matmul_gpu,
    matmul_tensorcore_gpu,
    reduction_gpu,
    tensor_core_dtype,
)
from optic.errors import OpticError
from optic.targets import Target

__all__ = ["F32", "SPACES", "element_type", "gpu_space", "gpu_target", "model_config", "tensor_cores"]

F32 = "float32"


def tensor_cores(operator: Operator) -> bool:
    """Whether ``operator`` is a matmul for tensor cores (``cores="tensor"``: ``matmul_tensorcore_gpu``)."""
    return operator.op == "matmul" and operator.opts.get("cores") == "tensor"


def element_type(operator: Operator, dtype: str | None) -> str:
    """The element type: ``dtype`` when given, else the operator's (float32, or a tensor-core matmul's
    float16 or int8)."""
    if tensor_cores(operator):
        return tensor_core_dtype(dtype or operator.opts["dtype"])
    d = str(dtype or operator.opts.get("dtype", F32)).removeprefix("torch.")
    d = {"fp16": "float16", "half": "float16", "fp32": F32, "float": F32}.get(d, d)
    if d not in (F32, "float16"):
        raise SpaceError(f"CUDA code generation takes float32 or float16, not {d}")
    return d


def gpu_target(target: str | Target) -> Target:
    """``target`` as a GPU with an arch nvcc compiles for; an ``OpticError`` naming the GPUs otherwise."""
    t = targets.get(target)
    if t.kind != "gpu" or not t.arch:
        raise OpticError(f"target {t.name} is a {t.kind}; CUDA code generation needs a GPU target "
                         f"(one of {', '.join(g for g in targets.names() if targets.get(g).kind == 'gpu')})")
    return t


def _matmul(operator: Operator, t: Target, dtype: str) -> Space:
    M, N, K = operator.args
    o = operator.opts
    template = matmul_tensorcore_gpu if tensor_cores(operator) else matmul_gpu
    return template(M, N, K, t, dtype=dtype, epilogue=tuple(o.get("epilogue", ())),
                    b_contiguous="n" if o["b_layout"] == "kn" else "k")


def _elementwise(operator: Operator, t: Target, dtype: str) -> Space:
    return elementwise_gpu(operator.args[0], t, dtype=dtype, inputs=operator.opts["inputs"])


def _reduction(operator: Operator, t: Target, dtype: str) -> Space:
    return reduction_gpu(*operator.args, t, kind=operator.opts["kind"], dtype=dtype)


# The GPU template of each operator that has a CUDA schedule (``cuda_schedules.BUILDERS``: the same ops).
SPACES: dict[str, Callable[[Operator, Target, str], Space]] = {
    "matmul": _matmul, "elementwise": _elementwise, "reduction": _reduction,
}


def gpu_space(operator: Operator, target: str | Target, dtype: str | None = None) -> Space:
    """The GPU template's space for ``operator`` on ``target``: ``Operator.space`` with the element type
    ``dtype`` and, for a matmul, the B layout the code generator reads (``b_layout="kn"``: N contiguous)."""
    t = targets.get(target)
    if t.kind != "gpu":
        raise SpaceError(f"target {t.name} is a {t.kind}; CUDA code generation needs a GPU target")
    d = element_type(operator, dtype)
    if operator.op not in SPACES:
        raise SpaceError(f"no CUDA code generator for {operator.op}; known: {sorted(SPACES)}")
    return SPACES[operator.op](operator, t, d)


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
