"""optic.autotune: constraint-based tuning of kernel tile sizes (search spaces, solver, cost model,
measurement, tuning database). Built in the lowering/tuning issue; empty until then."""
