"""optic.autotune: constraint-based tuning of kernel tile sizes (search spaces, solver, cost model,
measurement, tuning database).

A template (``templates``) declares a kernel's tunable variables and the sympy constraints
that the workload and the target put on them, once, as a ``Space``; ``solve`` enumerates exactly
the configurations that satisfy them all, by propagation and backtracking rather than by
filtering the Cartesian product. ``cost_model`` ranks them for the target; the code generators
(``optic.backend.codegen_cpu`` for LLVM, ``optic.backend.codegen_cuda`` for CUDA) turn one into a
scheduled TIR module; ``measure`` builds, checks and times candidates in a worker
process (locally or through TVM's RPC tracker); ``db`` keeps every result; ``tune`` does it all
for one ``Operator``:

    from optic.autotune import Operator, tune
    result = tune(Operator("matmul", (512, 512, 512)), "cpu", trials=32)
"""

from .db import TuningDB
from .measure import EvaluatorConfig, Measurement, Runner
from .operator import Operator
from .solver import SolveResult, brute_force, solve
from .space import Constraint, Space, SpaceError, Var, divisors, powers_of_two, range_, symbols
from .templates import (
    TEMPLATES,
    conv2d_cpu,
    conv2d_gpu,
    elementwise_cpu,
    elementwise_gpu,
    matmul_cpu,
    matmul_gpu,
    reduction_cpu,
    reduction_gpu,
    template,
)
from .tune import TuneResult, tune

__all__ = [
    "TEMPLATES",
    "Constraint",
    "EvaluatorConfig",
    "Measurement",
    "Operator",
    "Runner",
    "SolveResult",
    "Space",
    "SpaceError",
    "TuneResult",
    "TuningDB",
    "Var",
    "brute_force",
    "conv2d_cpu",
    "conv2d_gpu",
    "divisors",
    "elementwise_cpu",
    "elementwise_gpu",
    "matmul_cpu",
    "matmul_gpu",
    "powers_of_two",
    "range_",
    "reduction_cpu",
    "reduction_gpu",
    "solve",
    "symbols",
    "template",
    "tune",
]
