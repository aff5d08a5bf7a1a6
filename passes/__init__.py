"""optic's rewrite passes, one module per family. Importing this package registers them all."""

from . import cleanup, cpu_tactics, fold_norm, fuse, lowrank, sparsity  # noqa: F401  (registration)
