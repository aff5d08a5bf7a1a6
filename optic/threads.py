"""Two thread pools in one process: PyTorch's (OpenMP, libgomp) and TVM's, on the same cores.

optic's generated kernels (TVM) run between PyTorch's ops in the same process. Each pool's idle threads
spin for a while before they sleep, and a spinning thread holds a core: libgomp's default spin lasts
milliseconds, longer than the gap between two ops, so on a 2-core machine a generated parallel kernel
that follows a PyTorch op shares its cores with PyTorch's spinning worker. Measured per layer on
ResNet-50 and BERT-base (benchmarks/results/layers.md): with libgomp's default, every generated kernel
took 2-3x its time; with the spin limited, they ran at 0.7-1.2x PyTorch's and oneDNN's kernels. PyTorch's
own eager times did not change beyond the noise (ResNet-50, BERT-base, MobileNetV2 at batch 1).

libgomp reads its limit (``GOMP_SPINCOUNT``, or ``OMP_WAIT_POLICY``) once, when PyTorch loads it, so
:func:`limit_openmp_spin` runs when optic is imported and works only if PyTorch is not imported yet; a
limit the user set is kept. :func:`openmp_spin_limited` says whether the limit is in force, so that a
report can say why its generated kernels lost. TVM's pool reads its variables when it first runs a
kernel: :func:`size_tvm_pool` runs before that (``optic.tvm_compat``).
"""

from __future__ import annotations

import os
import sys

GOMP_SPIN_COUNT = "10000"  # spins before an idle OpenMP thread sleeps (libgomp's default: 300,000)
TVM_SPIN_COUNT = "10000"  # the same for TVM's pool (autotune.measure.SPIN_LIMITS measures with it)
SPIN_HINT = (f"start Python with GOMP_SPINCOUNT={GOMP_SPIN_COUNT} in the environment, or import optic before "
             "torch (libgomp reads it when torch loads)")


def limit_openmp_spin() -> bool:
    """Set ``GOMP_SPINCOUNT`` for libgomp unless the user set a spin policy or PyTorch has loaded libgomp
    already (then what was in the environment holds); whether a spin limit is in force."""
    if "torch" not in sys.modules and "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = GOMP_SPIN_COUNT
    return _user_limit()


def _user_limit() -> bool:
    """A spin limit in the environment: a spin count, or the passive wait policy (active spins on)."""
    return "GOMP_SPINCOUNT" in os.environ or os.environ.get("OMP_WAIT_POLICY", "").lower() == "passive"


def openmp_spin_limited() -> bool:
    """Whether PyTorch's OpenMP threads stop spinning soon after an op (a spin limit was in force when
    libgomp loaded)."""
    return _limited


def size_tvm_pool() -> None:
    """Give TVM's thread pool PyTorch's thread count, unless the user set one (``TVM_NUM_THREADS`` or
    ``OMP_NUM_THREADS``): TVM's own default is half the logical CPUs on x86 (it assumes two hardware
    threads per core), so on a 2-vCPU machine every generated parallel kernel ran on one thread while
    PyTorch's ran on two. Its idle threads spin briefly, then sleep (``TVM_THREAD_POOL_SPIN_COUNT``): spinning
    on, they take the cores from the PyTorch ops that follow a generated kernel. The autotuning workers
    inherit both."""
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        import torch

        os.environ["TVM_NUM_THREADS"] = str(max(1, torch.get_num_threads()))
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", TVM_SPIN_COUNT)


_limited = limit_openmp_spin()  # on import: optic imports this module before anything that loads torch
