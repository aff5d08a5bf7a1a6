"""TVM's thread pool gets PyTorch's thread count: its own default (half the logical CPUs on x86) ran every
generated parallel kernel on one thread of this 2-vCPU machine while PyTorch's ran on two."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("tvm")

PROBE = ("import torch, optic.tvm_compat, tvm, tvm_ffi; "
         "print(tvm_ffi.get_global_func('runtime.NumThreads')(), torch.get_num_threads())")


def _probe(**env: str) -> tuple[int, int]:
    base = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True,
                         timeout=120, check=True)
    tvm_threads, torch_threads = (int(v) for v in out.stdout.split()[-2:])
    return tvm_threads, torch_threads


def test_tvm_runs_on_as_many_threads_as_pytorch():
    tvm_threads, torch_threads = _probe()
    assert tvm_threads == torch_threads


def test_a_thread_count_the_user_set_is_kept():
    assert _probe(TVM_NUM_THREADS="1")[0] == 1
    assert _probe(OMP_NUM_THREADS="1") == (1, 1)
