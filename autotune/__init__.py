"""optic.autotune: constraint-based tuning of kernel tile sizes (search spaces, solver, cost model,
measurement, tuning database).

A template (``templates``) declares a kernel's tunable variables and the sympy constraints
that the workload and the target put on them, once, as a ``Space``; ``solve`` enumerates exactly
the configurations that satisfy them all, by propagation and backtracking rather than by
filtering the Cartesian product.
"""

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

__all__ = [
    "TEMPLATES",
    "Constraint",
    "SolveResult",
    "Space",
    "SpaceError",
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
]
