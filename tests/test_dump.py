"""Graph dumps: each format of render(), the recorder instrument and its per-pass diff, one file per pass."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn as nn

import optic
from optic import dump


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.mean(dim=(2, 3)))


def model_and_inputs():
    m = ConvBN().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 1.5)
    return m, (torch.randn(1, 3, 8, 8),)


def recorded(model, inputs, passes, **kwargs):
    """The steps a :class:`dump.Recorder` keeps through ``optimize``, and the result."""
    recorder = dump.Recorder()
    result = optic.optimize(model, inputs, "cpu", passes, instruments=[recorder], measure=False, **kwargs)
    return recorder.steps(captured=result.program), result


@pytest.fixture(scope="module")
def steps():
    m, x = model_and_inputs()
    return recorded(m, x, ["cleanup", "fold_norm"])[0]


def test_text_is_fx_source_under_a_header():
    m, x = model_and_inputs()
    text = dump.render(optic.capture(m, x), "text", title="captured graph")
    compile(text, "<dump>", "exec")
    assert text.startswith("# optic graph dump: captured graph\n")
    assert "# inputs: x: float32[1, 3, 8, 8]" in text
    assert "def forward(self, x" in text and "self.bn(" in text


def test_text_after_a_pass_ends_with_provenance(steps):
    text = dump.render(steps[-1].program, "text", title=steps[-1].title)
    compile(text, "<dump>", "exec")
    assert "self.bn(" not in text
    # the folded conv names both captured nodes it came from and the pass that made it
    assert re.search(r"#   \w+ <- conv, bn @ .*test_dump\.py:\d+ \[fold_norm\]", text), text


def test_json_nodes_carry_shape_dtype_args_and_provenance(steps):
    data = json.loads(dump.render(steps[0].program, "json"))
    assert data["capture"] == "fx"
    nodes = {n["name"]: n for n in data["nodes"]}
    assert [n["op"] for n in data["nodes"]][0] == "placeholder" and data["nodes"][-1]["op"] == "output"
    assert nodes["conv"] == {**nodes["conv"], "op": "call_module", "target": "conv", "module": "Conv2d",
                             "args": ["x"], "shape": [1, 4, 8, 8], "dtype": "float32", "origin": ["conv"],
                             "pass": "capture"}
    assert nodes["conv"]["source"].endswith(f"test_dump.py:{ConvBN.forward.__code__.co_firstlineno + 1}")
    assert nodes["mean"]["args"] == ["relu", "(2, 3)"] or nodes["mean"]["kwargs"] == {"dim": "(2, 3)"}
    assert nodes["relu"]["target"] == "torch.relu"
    assert data["nodes"][-1]["args"] == ["fc"]

    folded = json.loads(dump.render(steps[-1].program, "json"))["nodes"]
    conv = [n for n in folded if n["pass"] == "fold_norm"]
    assert len(conv) == 1 and conv[0]["origin"] == ["conv", "bn"] and conv[0]["shape"] == [1, 4, 8, 8]


def test_dot_without_previous_has_every_node_and_edge(steps):
    program = steps[0].program
    text = dump.render(program, "dot")
    assert text.startswith("digraph optic {") and text.rstrip().endswith("}")
    for n in program.gm.graph.nodes:
        assert f'"{n.name}" [' in text
        for i in n.all_input_nodes:
            assert f'"{i.name}" -> "{n.name}";' in text
    assert "1×4×8×8" in text  # shapes in labels
    assert 'class="created"' not in text and 'class="erased"' not in text


def test_dot_diff_marks_created_and_erased_nodes(steps):
    step = steps[-1]  # fold_norm
    assert step.name == "fold_norm" and step.record.changed
    text = dump.render(step.program, "dot", step.previous, title=step.title)
    erased = re.findall(r'^  "(\w+)" \[[^\n]*class="erased"', text, re.M)
    created = re.findall(r'^  "(\w+)" \[[^\n]*class="created"', text, re.M)
    assert set(erased) == {"conv", "bn"}
    created_ops = [n for n in step.program.gm.graph.nodes if n.name in created and n.op != "get_attr"]
    assert len(created_ops) == 1 and created_ops[0].meta["optic"]["origin"] == ["conv", "bn"]
    assert '"bn" -> "relu" [class="erased"' in text  # the wiring the pass removed
    assert "origin: conv, bn" in text and "pass: fold_norm" in text  # provenance in tooltips
    # a step that changed nothing draws no marks
    same = dump.render(step.program, "dot", step.program)
    assert 'class="erased"' not in same and 'class="created"' not in same


def test_svg_draws_or_says_how_to_get_graphviz(steps, monkeypatch):
    program = steps[0].program
    if dump.shutil.which("dot"):
        assert "<svg" in dump.render(program, "svg")
    monkeypatch.setattr(dump.shutil, "which", lambda name: None)
    with pytest.raises(optic.OpticError, match=r"apt-get install graphviz.*--format dot"):
        dump.render(program, "svg")


def test_unknown_format_is_an_optic_error(steps, tmp_path):
    with pytest.raises(optic.OpticError, match="text, json, dot, svg"):
        dump.render(steps[0].program, "png")
    with pytest.raises(optic.OpticError, match="text, json, dot, svg"):
        dump.write_steps(steps, tmp_path, "png")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(optic.OpticError, match=r"tvm=optic\.backend\.inspect\.tvm_view"):
        dump.render(steps[0].program, "tvmscript")  # rendering lowers nothing itself


def test_the_recorder_keeps_programs_apart_and_rolled_back_passes_change_nothing():
    class Breaks:
        name, exact, description = "breaks", True, "test-only: crashes after editing the graph"

        def run(self, program, ctx):
            for n in list(program.gm.graph.nodes):
                if n.op == "call_module" and n.target == "fc":
                    n.target = "conv"  # half-applied edit, then a crash: must be rolled back
            raise RuntimeError("boom")

    m, x = model_and_inputs()
    found, result = recorded(m, x, ["fold_norm", Breaks(), "cleanup"], disable=["cleanup"])
    report = result.report
    assert [s.name for s in found] == ["capture", "fold_norm", "breaks", "cleanup"]
    capture, fold, broken, skipped = found
    assert capture.program.gm is not fold.program.gm
    assert any(n.target == "bn" for n in capture.program.gm.graph.nodes)  # not edited by the later pass
    assert broken.record.rolled_back and broken.program is fold.program and broken.previous is fold.program
    assert skipped.record.skipped and skipped.program is fold.program
    assert "ROLLED BACK" in broken.title and "skipped" in skipped.title
    assert report.pass_record("fold_norm").changed


def test_write_steps_writes_numbered_files_in_order(tmp_path):
    m, x = model_and_inputs()
    found, result = recorded(m, x, "cleanup,fold_norm,cleanup")
    report = result.report
    paths = dump.write_steps(found, tmp_path / "out", "text")
    names = [p.name for p in paths]
    assert names == ["000_capture.py", "001_cleanup.py", "002_fold_norm.py", "003_cleanup.py"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names
    for p in paths:
        compile(p.read_text(), str(p), "exec")
    assert "after pass 2 'fold_norm': changed" in paths[2].read_text()
    assert [r.name for r in report.passes] == ["cleanup", "fold_norm", "cleanup"]


def test_no_pass_recorded_is_the_capture_alone():
    m, x = model_and_inputs()
    found, result = recorded(m, x, [])
    assert [s.name for s in found] == ["capture"] and found[0].program is result.program
    assert found[0].title == "captured graph" and found[0].previous is None
    with pytest.raises(ValueError, match="captured Program"):
        dump.Recorder().steps()


def test_a_step_renderer_is_used_for_every_file(steps, tmp_path):
    paths = dump.write_steps(steps, tmp_path, "tvmscript", lambda s: f"# {s.index} {s.name}\n")
    assert [p.name for p in paths] == ["000_capture.py", "001_cleanup.py", "002_fold_norm.py"]
    assert paths[2].read_text() == "# 2 fold_norm\n"
