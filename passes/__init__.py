"""optic's rewrite passes, one module per family. Importing this package registers them all."""

from . import cleanup, cpu_tactics, early_exit, fold_norm, fuse, lowrank, prune, sparsity, tvm_kernels  # noqa: F401  (registration)
