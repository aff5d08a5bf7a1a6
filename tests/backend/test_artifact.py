"""GPU artifacts (backend="tvm" with a GPU target): CUDA kernels generated, ptxas-checked, saved with the graph.

No GPU here: what is checked is what can be, the kernels' resources against the limits the constraints
allowed (with nvcc), the saved graph against the optimized model (each kernel runs PyTorch's ops for
its layer on CPU tensors), and that running the CUDA kernels without a CUDA runtime is a clear error.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import optic
from optic.errors import OpticError

pytest.importorskip("tvm")

from optic.backend.artifact import GPUKernel  # noqa: E402


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 256), nn.Linear(256, 64), nn.Linear(64, 64)

    def forward(self, x):
        h = self.fc2(F.gelu(self.fc1(x))) + x
        return self.fc3(h)


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    model, x = Mlp().eval(), torch.randn(32, 64)
    return model, x, optic.optimize(model, x, "a100", backend="tvm")


def test_artifact_kernels_within_the_limits(built):
    _, _, out = built
    art = out.artifact
    assert art is not None and art.arch == "sm_80"
    assert len(art.kernels) == 3  # fc1+gelu, fc2+residual, fc3
    assert {k.operator.split(" + ")[-1] for k in art.kernels} >= {"bias+gelu float32", "bias+residual float32"}
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH: kernels generated, not compiled")
    for k in art.kernels:
        c = k.compiled
        assert c["compiled"], c["reason"]
        assert c["within_limits"] and not c["violations"]
        assert c["registers"] <= c["limits"]["regs_per_thread"]
        assert c["smem"] <= c["limits"]["smem_per_block"]
        assert 0 < c["threads"] <= c["limits"]["threads_per_block"]


def test_saved_artifact_computes_the_same_on_cpu(built, tmp_path):
    model, x, out = built
    path = out.artifact.save(tmp_path / "mlp.artifact")
    assert sorted(p.name for p in path.iterdir()) == ["cuda", "kernels.so", "manifest.json", "model.pt"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["target"] == "a100" and len(manifest["kernels"]) == 3
    from optic.backend.cuda_toolchain import nvcc_version

    assert manifest["toolchain"]["nvcc"] == nvcc_version()  # the cubins' compiler, None without nvcc
    assert manifest["toolchain"]["tvm"]
    assert len(list((path / "cuda").glob("*.cu"))) == 3
    loaded = optic.load_artifact(path)
    kernels = [m for m in loaded.modules() if isinstance(m, GPUKernel)]
    assert len(kernels) == 3 and all(k.library and k.library.endswith("kernels.so") for k in kernels)
    with torch.no_grad():
        x2 = torch.randn(32, 64)
        torch.testing.assert_close(loaded(x2), model(x2), rtol=1e-4, atol=1e-4)
    # the CUDA kernels need a GPU (or a CUDA runtime in TVM): a clear reason here, not a crash deep inside TVM
    if not torch.cuda.is_available():
        with pytest.raises(OpticError, match="cannot run here: PyTorch sees no CUDA GPU.*TVM runtime built with CUDA"):
            kernels[0]._runner()


def test_the_kernels_run_inside_the_returned_module_with_their_cubins(built):
    model, x, out = built
    kernels = [m for m in out.modules() if isinstance(m, GPUKernel)]
    assert len(kernels) == 3  # no save/load round-trip needed
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH: no cubins")
    from optic.backend import cuda_driver

    by_symbol = {a.symbol: a for a in out.artifact.kernels}
    for k in kernels:
        assert k.cubin and k.cubin[:4] == b"\x7fELF" and k.arch == "sm_80"  # nvcc's cubin is an ELF image
        launch, built_with = k.launch, by_symbol[k.symbol]
        assert {n for n, _ in launch.params} == {"A", "B", "C"} | ({"bias"} if k.bias is not None else set()) | (
            {"residual"} if "residual" in k.description else set())
        assert all(pointer for _, pointer in launch.params)
        # one block per BM x BN tile of C, as many threads as TVM's launch and ptxas's report say
        (m, _), n, cfg = k.in_shape, k.out_shape[-1], built_with.config
        assert launch.grid == (-(-m // cfg["BM"]) * -(-n // cfg["BN"]), 1, 1)
        assert launch.block == (built_with.compiled["threads"], 1, 1)
        assert launch.dynamic_smem == built_with.compiled["dynamic_smem"]
    source = out.artifact.sources["k0.cu"]
    assert cuda_driver.kernel_entries(source)[0][0] == kernels[0].launch.kernel


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the kernels run")
def test_a_kernel_that_cannot_run_falls_back_to_pytorch_with_a_note(built):
    model, x, out = built
    k = copy_of_first_kernel(out)
    with torch.no_grad():
        ref = k.fallback(x)
        got = k._on_device(x, ())  # what a CUDA call does, on a machine where the kernel cannot run
        again = k._on_device(x, ())
    assert torch.equal(got, ref) and torch.equal(again, ref)
    assert k.choice == "torch" and "PyTorch sees no CUDA GPU" in k.note
    assert "runs PyTorch's ops" in repr(k)


def copy_of_first_kernel(out):
    import copy

    return copy.deepcopy(next(m for m in out.modules() if isinstance(m, GPUKernel)))


def test_what_has_no_cuda_kernel_stays_and_is_listed():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    out = optic.optimize(model, torch.randn(1, 3, 8, 8), "h100", backend="tvm")
    assert out.artifact is None
    assert any("no artifact" in n for n in out.report.notes)
    assert any("stays with PyTorch" in n and "conv" in n.lower() for n in out.report.notes)


def test_load_rejects_a_directory_that_is_not_an_artifact(tmp_path):
    with pytest.raises(OpticError, match="not an optic artifact"):
        optic.load_artifact(tmp_path)


def test_a_result_with_an_artifact_deep_copies_and_pickles_and_the_copy_still_saves(built, tmp_path):
    import copy
    import io

    model, x, out = built
    clone = copy.deepcopy(out)
    buf = io.BytesIO()
    torch.save(out, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for i, result in enumerate((clone, loaded)):
        with torch.no_grad():
            torch.testing.assert_close(result(x), model(x), rtol=1e-4, atol=1e-4)
        path = result.artifact.save(tmp_path / f"copy{i}.artifact")
        again = optic.load_artifact(path)
        with torch.no_grad():
            torch.testing.assert_close(again(x), model(x), rtol=1e-4, atol=1e-4)
