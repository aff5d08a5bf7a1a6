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


SPIN_PROBE = ("import os, sys; {first}; from optic import threads; "
              "print(os.environ.get('GOMP_SPINCOUNT'), threads.openmp_spin_limited())")


def _spin(first: str, **env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", SPIN_PROBE.format(first=first)], env={**base, **env},
                         capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.split()[-2:]


def test_importing_optic_before_torch_limits_openmp_spinning_and_after_it_says_it_could_not():
    assert _spin("import optic, torch") == ["10000", "True"]
    assert _spin("import torch, optic") == ["None", "False"]
    assert _spin("import optic", OMP_WAIT_POLICY="passive") == ["None", "True"]  # the user's policy holds
    assert _spin("import optic", GOMP_SPINCOUNT="5") == ["5", "True"]
    assert _spin("import optic", OMP_WAIT_POLICY="active") == ["None", "False"]  # spinning on, as asked


def test_the_report_says_why_generated_kernels_lose_while_pytorch_threads_spin(tmp_path, monkeypatch):
    import torch
    from torch import nn

    import optic
    from optic import threads

    model, x = nn.Sequential(nn.Linear(16, 16), nn.ReLU()).eval(), torch.randn(4, 16)
    notes = {}
    for limited in (False, True):
        monkeypatch.setattr(threads, "_limited", limited)
        out = optic.optimize(model, x, passes=["cleanup"], backend="tvm", tune="none",
                             tuning_db=str(tmp_path / "t.db"), options={"tvm_keep": "all"})
        rec = next(r for r in out.report.passes if r.name == "tvm_kernels")
        notes[limited] = " ".join(rec.notes)
    assert "GOMP_SPINCOUNT=10000" in notes[False]
    assert "GOMP_SPINCOUNT" not in notes[True]
