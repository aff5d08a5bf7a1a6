"""optic's rewrite passes, one module per family. Importing this package registers them all."""

from . import cleanup, early_exit, fold_norm, fuse, lowrank, precision, prune, quantize, sparsity  # noqa: F401  (registration)
