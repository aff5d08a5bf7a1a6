"""The prepared GPU check runs end to end without a GPU (--dry-run), so it does not rot between lent devices."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("tvm")

from benchmarks import gpu_check  # noqa: E402


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="prepare compiles the kernels with nvcc")
def test_prepare_then_a_dry_run_write_every_section(tmp_path):
    manifest = gpu_check.prepare(tmp_path / "prepared", "sm_90", configs=3, say=lambda *_: None)
    kernels = manifest["kernels"]
    assert {k["cores"] for k in kernels} == {"simt", "tensor"} and {k["dtype"] for k in kernels} >= {
        "float32", "float16", "int8"}
    assert all(k["compiled"] and k["within_limits"] is not False for k in kernels), [
        (k["name"], k["reason"]) for k in kernels if not k["compiled"]]
    for k in kernels:  # what the GPU machine needs to launch each one, without TVM
        assert (tmp_path / "prepared" / k["cubin"]).read_bytes()[:4] == b"\x7fELF"
        assert k["launch"]["grid"][0] >= 1 and k["launch"]["block"][0] >= 32 and k["predicted_s"] > 0
    ranked = [k for k in kernels if k["group"] == "rank_tc_4096"]
    assert len(ranked) == 3 and len({json.dumps(k["config"], sort_keys=True) for k in ranked}) == 3
    result = gpu_check.run(tmp_path / "prepared", tmp_path / "out", budget_s=240, dry=True, say=lambda *_: None,
                           models=["tiny_cnn"], batches=[1])
    assert all(r["status"] == "dry run: not launched" for r in result["kernels"])
    (row,) = result["models"]
    assert "error" not in row, row
    assert {"eager", "optic"} <= set(row["systems"]) and row["systems"]["optic"]["checked"]
    assert row["systems"]["eager"]["speedup_vs_eager"] == 1.0 and row["systems"]["optic"]["median_ms"] > 0
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| square_2048_int8_tc | 2048×2048×2048 | int8 | tensor |" in md and "### tiny_cnn, batch 1" in md
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text())["environment"]["dry_run"] is True
