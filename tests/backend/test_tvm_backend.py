"""backend="tvm": generated kernels replace conv/linear (+ epilogue) layers exactly, only where they win.

The property tests keep every generated kernel (option ``tvm_keep="all"``, no timing) so that the
rewrite itself is what is checked: every dense conv/linear site becomes one compiled kernel, the
pipeline's numerical check does not roll the pass back, and the result matches the original. The
tactic tests feed the decision stored verdicts so that it is checked without timing noise.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given
from hypothesis_profiles import examples

import optic
from optic.errors import OpticError
from tests.strategies import cnn_models, mlp_models

pytest.importorskip("tvm")

from optic.autotune import TuningDB  # noqa: E402
from optic.backend.generated import TVMKernel, kernel_sites, trials_for  # noqa: E402

PASSES = ["cleanup", "fold_norm", "fuse", "cleanup"]  # no cpu_tactics: the generated kernels are what is tested
KEEP_ALL = {"tvm_keep": "all"}


def kernels_of(module: nn.Module) -> list[TVMKernel]:
    return [m for m in module.program.gm.modules() if isinstance(m, TVMKernel)]


def tvm_record(report):
    return next(r for r in report.passes if r.name == "tvm_kernels")


class AfterTVM:
    """An instrument keeping the program the tvm_kernels pass returned (optimize itself may still return
    the captured graph when the whole model measures slower: that guard is not what is tested here)."""

    program = None

    def after_pass(self, record, before, after):
        if record.name == "tvm_kernels":
            self.program = after


class Block(nn.Module):
    """conv → bias → relu, a residual conv, then linear → gelu → linear (+ residual): every epilogue."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.c3 = nn.Conv2d(8, 8, 1, stride=2)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 32)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = torch.relu(self.c2(y) + y)
        y = torch.sigmoid(self.c3(y)).flatten(1)
        h = F.gelu(self.fc1(y))
        return self.fc2(h) + h


def _sites_expected(model, x) -> int:
    from optic.ir.rewrite import RuleStats

    program = optic.optimize(model, x, passes=PASSES, measure=False).program
    return len(kernel_sites(program.gm, RuleStats()))


def test_every_epilogue_becomes_one_kernel_and_matches(tmp_path):
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grab = AfterTVM()
    out = optic.optimize(model, x, passes=PASSES, backend="tvm", tune="none", tuning_db=tmp_path / "t.db",
                         options=KEEP_ALL, instruments=[grab])
    rec = tvm_record(out.report)
    assert rec.changed and not rec.rolled_back
    kernels = [m for m in grab.program.gm.modules() if isinstance(m, TVMKernel)]
    assert len(kernels) == 5  # c1+relu, c2+residual+relu, c3+sigmoid, fc1+gelu, fc2+residual
    epilogues = sorted(k.description.split(";")[0].split(" + ")[-1] for k in kernels)
    assert "residual+relu" in epilogues and "bias+gelu" in epilogues and "bias+residual" in epilogues
    with torch.no_grad():
        for xi in (x, torch.randn(2, 3, 8, 8)):
            torch.testing.assert_close(grab.program.gm(xi), model(xi), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(out(xi), model(xi), rtol=1e-4, atol=1e-4)
        # another batch: each kernel serves its own size, PyTorch's ops (the kernel's reference) any other
        x5 = torch.randn(5, 3, 8, 8)
        torch.testing.assert_close(out(x5), model(x5), rtol=1e-4, atol=1e-4)
        recorded = {}
        hooks = [k.register_forward_pre_hook(lambda m, a: recorded.setdefault(m, a)) for k in kernels]
        grab.program.gm(x)
        for h in hooks:
            h.remove()
        for k, args in recorded.items():  # the reference computes what the kernel does, at the kernel's size
            torch.testing.assert_close(k.reference(*args), k(*args), rtol=1e-4, atol=1e-4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model is untouched


def _check_generated(case, db_dir):
    model, inputs = case
    grab = AfterTVM()
    out = optic.optimize(model, inputs, passes=PASSES, backend="tvm", tune="none", tuning_db=db_dir / "t.db",
                         options=KEEP_ALL, instruments=[grab])
    rec = tvm_record(out.report)
    assert not rec.rolled_back, rec.reason
    expected = _sites_expected(model, inputs)
    got = [m for m in grab.program.gm.modules() if isinstance(m, TVMKernel)]
    assert len(got) == expected
    with torch.no_grad():
        assert optic.pipeline.verify.compare(model(*inputs), grab.program.gm(*inputs), 1e-4).ok
        assert optic.pipeline.verify.compare(model(*inputs), out(*inputs), 1e-4).ok


@examples(6, suppress_health_check=list(HealthCheck))
@given(cnn_models())
def test_property_cnn_generated_kernels_are_exact(tmp_path_factory, case):
    _check_generated(case, tmp_path_factory.mktemp("db"))


@examples(6, suppress_health_check=list(HealthCheck))
@given(mlp_models())
def test_property_mlp_generated_kernels_are_exact(tmp_path_factory, case):
    _check_generated(case, tmp_path_factory.mktemp("db"))


def _stored_verdict(tvm_faster: bool, seen: list):
    """A stand-in for the database's stored tactic verdicts (the pass reads them instead of timing)."""

    def tactic(self, context):
        seen.append(context)
        names = json.loads(context)["candidates"]
        return {n: (0.5e-3 if tvm_faster else 2e-3) if n == "tvm" else 1e-3 for n in names}

    return tactic


@pytest.mark.parametrize("tvm_faster", [False, True])
def test_tactic_keeps_pytorch_when_generated_kernel_is_slower(tmp_path, monkeypatch, tvm_faster):
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 3, 8, 8)
    seen = []
    monkeypatch.setattr(TuningDB, "tactic", _stored_verdict(tvm_faster, seen))
    out = optic.optimize(model, x, passes=PASSES, backend="tvm", tune="none", tuning_db=tmp_path / "t.db")
    kernels = tvm_record(out.report).measured["kernels"]
    assert len(seen) == len(kernels) == 5
    expected = {"tvm"} if tvm_faster else {"torch", "oneDNN"}
    assert all(k["chosen"] in expected for k in kernels), [k["why"] for k in kernels]
    assert all(k["cached"] for k in kernels)
    if not tvm_faster:
        assert not kernels_of(out)  # nothing slower than PyTorch's kernel is kept
        assert all("the time of PyTorch's" in k["why"] for k in kernels)
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-4, atol=1e-4)


def test_second_optimize_measures_nothing(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    x = torch.randn(16, 64)
    db = tmp_path / "tuning.db"
    first = tvm_record(optic.optimize(model, x, passes=PASSES, backend="tvm", tune=2, tuning_db=db).report)
    assert first.measured["tuning_measurements"] == 4  # 2 kernels × 2 candidates
    second = tvm_record(optic.optimize(model, x, passes=PASSES, backend="tvm", tune=2, tuning_db=db).report)
    assert second.measured["tuning_measurements"] == 0
    assert all(k["cached"] and k["tuned"].startswith("database") for k in second.measured["kernels"])
    assert [k["chosen"] for k in second.measured["kernels"]] == [k["chosen"] for k in first.measured["kernels"]]


def test_effort_levels_and_errors():
    assert trials_for("none") == 0 and trials_for("fast") < trials_for("full") and trials_for(7) == 7
    for bad in ("quick", -1, True):
        with pytest.raises(OpticError, match="tune"):
            trials_for(bad)
    model, x = nn.Linear(4, 4).eval(), torch.randn(1, 4)
    with pytest.raises(OpticError, match="tune takes"):
        optic.optimize(model, x, backend="tvm", tune="quick")
    with pytest.raises(OpticError, match="backends are 'torch'"):
        optic.optimize(model, x, backend="tensorrt")
    with pytest.raises(OpticError, match="known targets|unknown target"):
        optic.optimize(model, x, "a101", backend="tvm")


def test_declines_what_has_no_template(tmp_path):
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4, padding=1), nn.ConvTranspose2d(4, 4, 2, stride=2)).eval()
    out = optic.optimize(model, torch.randn(1, 4, 8, 8), passes=PASSES, backend="tvm", tune="none",
                         tuning_db=tmp_path / "t.db", options=KEEP_ALL)
    rec = tvm_record(out.report)
    assert not kernels_of(out)
    assert len(rec.declined) == 2 and all("template" in d["reason"] for d in rec.declined)


@pytest.mark.slow
def test_cli_tune_twice(tmp_path):
    model_file = tmp_path / "m.py"
    model_file.write_text(textwrap.dedent("""
        import torch, torch.nn as nn
        example_inputs = (torch.randn(8, 32),)
        def build():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8)).eval()
    """))
    cmd = [sys.executable, "-m", "optic.cli", "tune", f"{model_file}:build", "--trials", "2", "--db",
           str(tmp_path / "t.db"), "--json", "--quiet"]
    runs = [json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout)
            for _ in range(2)]
    assert [len(r["kernels"]) for r in runs] == [2, 2]
    assert runs[0]["tuning_measurements"] == 4 and runs[1]["tuning_measurements"] == 0
    assert {k["chosen"] for k in runs[0]["kernels"]} <= {"tvm", "torch", "oneDNN"}


def test_cpu_tactics_also_times_the_model_without_generated_kernels(tmp_path, monkeypatch):
    """backend="tvm" never ends slower than the torch backend: where cpu_tactics follows, tvm_kernels leaves
    the whole-model verdict to it (no eager confirm of its own), and cpu_tactics times its variants of the
    model with the generated kernels and without them, plain and compiled whole, and keeps the fastest."""
    from optic.backend.generated import TVMKernels

    def never(*a, **k):
        raise AssertionError("tvm_kernels confirmed on its own although cpu_tactics follows")

    monkeypatch.setattr(TuningDB, "tactic", _stored_verdict(True, []))
    monkeypatch.setattr(TVMKernels, "_confirm", staticmethod(never))
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 3, 8, 8)
    out = optic.optimize(model, x, passes=[*PASSES, "cpu_tactics"], backend="tvm", tune="none",
                         tuning_db=tmp_path / "t.db", options={"whole_graph": "compiled"})
    record = tvm_record(out.report)
    assert record.changed and any("times the whole model with them and without them" in n for n in record.notes)
    tactics = next(r for r in out.report.passes if r.name == "cpu_tactics")
    variants = tactics.measured["variants_ms"]
    assert {"torch ops", "no generated kernels: torch ops", "whole graph compiled (Inductor, frozen weights)",
            "no generated kernels: whole graph compiled (Inductor, frozen weights)"} <= set(variants)
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-4, atol=1e-4)


def test_layer_followed_by_an_inplace_activation_is_checked_on_its_own_output(tmp_path):
    """The values a layer is checked on are copies: ReLU6(inplace=True) after it must not change them
    (it did: every such conv was declined as 'result differs')."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU6(inplace=True), nn.Conv2d(8, 8, 1), nn.ReLU6(inplace=True)).eval()
    x = torch.randn(1, 3, 8, 8)
    grab = AfterTVM()
    optic.optimize(model, x, passes=PASSES, backend="tvm", tune="none", tuning_db=tmp_path / "t.db",
                   options=KEEP_ALL, instruments=[grab])
    assert len([m for m in grab.program.gm.modules() if isinstance(m, TVMKernel)]) == 2
    with torch.no_grad():
        torch.testing.assert_close(grab.program.gm(x), model(x), rtol=1e-4, atol=1e-4)


def test_a_kernel_the_time_budget_skipped_is_not_tuned_by_the_next_optimize(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    x, db = torch.randn(16, 64), tmp_path / "t.db"
    opts = {"tune_budget_s": 0.0}  # the budget is spent before the first kernel: the cost model decides all
    first = tvm_record(optic.optimize(model, x, passes=PASSES, backend="tvm", tune=2, tuning_db=db,
                                      options=opts).report)
    assert first.measured["tuning_measurements"] == 0
    second = tvm_record(optic.optimize(model, x, passes=PASSES, backend="tvm", tune=2, tuning_db=db).report)
    assert second.measured["tuning_measurements"] == 0  # settled at this level
    third = tvm_record(optic.optimize(model, x, passes=PASSES, backend="tvm", tune=3, tuning_db=db).report)
    assert third.measured["tuning_measurements"] == 6  # a higher level tunes them


def test_a_result_with_generated_kernels_pickles_and_refuses_what_they_cannot_do(tmp_path):
    import io

    from optic.api import OptimizedModule

    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 3, 8, 8)
    grab = AfterTVM()
    out = optic.optimize(model, x, passes=PASSES, backend="tvm", tune="none", tuning_db=tmp_path / "t.db",
                         options=KEEP_ALL, instruments=[grab])
    kept = OptimizedModule(grab.program, out.report)
    assert len(kernels_of(kept)) == 5
    buf = io.BytesIO()
    torch.save(kept, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert len(kernels_of(loaded)) == 5 and all(k._fn is None for k in kernels_of(loaded))  # built on first use
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(optic.OpticError, match="tvm_kernels"):
        loaded.half()
    with pytest.raises(optic.OpticError, match="gradient"):
        loaded(x.clone().requires_grad_())


class Sites(nn.Module):
    """Two kernels (conv+bias+relu, linear+bias+sigmoid) and two convolutions no template covers."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c2 = nn.Conv2d(8, 8, (1, 3), stride=(1, 2), padding=(0, 1))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = self.c2(self.dw(y) + y)
        return torch.sigmoid(self.fc(y.mean((2, 3))))


def test_kernel_sites_come_in_graph_order_leave_the_graph_alone_and_declines_name_their_node():
    from optic.ir.rewrite import RuleStats

    program = optic.capture(Sites().eval(), (torch.randn(2, 3, 8, 8),))
    code = program.gm.code
    stats = RuleStats()
    sites = kernel_sites(program.gm, stats, b_layout="kn")
    assert program.gm.code == code
    assert [([n.name for n in s.nodes], s.epilogue) for s in sites] == [
        (["c1", "relu"], ("bias", "relu")), (["fc", "sigmoid"], ("bias", "sigmoid"))]
    conv, linear = (s.operator for s in sites)
    assert (conv.op, conv.args, conv.opts["epilogue"]) == ("conv2d", (2, 3, 8, 8, 8, 3, 3), ("bias", "relu"))
    assert (linear.op, linear.args, linear.opts["b_layout"]) == ("matmul", (2, 4, 8), "kn")  # M x N x K
    assert [s.onednn_act.attrs["fn"] for s in sites] == ["relu", "sigmoid"]
    assert list(stats.declined) == [
        ("tvm_conv", "dw", "only dense, non-transposed, zero-padded 2-D convolutions have a template"),
        ("tvm_conv", "c2", "stride, padding or dilation differ between the dims")]
    assert stats.matched == {}


def test_on_a_target_that_is_not_this_cpu_the_step_declines_for_the_whole_model():
    from types import SimpleNamespace

    from optic import targets
    from optic.backend.generated import TVMKernels
    from optic.ir.rewrite import MODEL, RuleStats

    program = optic.capture(nn.Linear(4, 4).eval(), (torch.randn(1, 4),))
    code = program.gm.code
    for target, measure in (("a100", True), ("cpu", False)):
        ctx = SimpleNamespace(target=targets.get(target), measure=measure, stats=RuleStats())
        assert TVMKernels().run(program, ctx) is False
        ((rule, node, reason),) = ctx.stats.declined
        assert (rule, node) == ("tvm_kernels", MODEL) and "this machine's CPU with measuring on" in reason
    assert program.gm.code == code


class Residual(nn.Module):
    """A ResNet block with a projection shortcut: both convs' outputs meet in one add (+ relu)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.ds = nn.Conv2d(4, 8, 1)

    def forward(self, x):
        y = self.c2(torch.relu(self.c1(x)))
        return torch.relu(y + self.ds(x))


def test_an_add_two_kernels_could_take_goes_to_one_and_the_other_keeps_its_layer(tmp_path):
    """Both c2 and the shortcut ds could end in the block's add + relu: one kernel takes them, the other
    keeps its layer and bias as a kernel of its own (two sites claiming one add would both be tuned and
    reported while the second ends up dead in the graph; declining the second left ResNet-50's four
    shortcut convs to PyTorch). The optimized block computes the block."""
    from optic.ir.rewrite import RuleStats

    torch.manual_seed(0)
    model, x = Residual().eval(), torch.randn(1, 4, 8, 8)
    program = optic.capture(model, (x,))
    stats = RuleStats()
    sites = kernel_sites(program.gm, stats)
    claimed = [n for s in sites for n in s.nodes]
    assert len(claimed) == len(set(claimed)), "two kernel sites claim the same node"
    (first_add,) = [s for s in sites if "residual" in s.epilogue]
    (loser,) = [s for s in sites if s.op.node.name in {"c2", "ds"} - {first_add.op.node.name}]
    assert loser.epilogue == ("bias",) and loser.residual is None and loser.nodes == [loser.op.node]
    assert loser.operator is not None and "residual" not in loser.operator.opts["epilogue"]
    assert not stats.declined
    grab = AfterTVM()
    out = optic.optimize(model, x, passes=PASSES, backend="tvm", tune="none", tuning_db=tmp_path / "t.db",
                         options=KEEP_ALL, instruments=[grab])
    assert len([m for m in grab.program.gm.modules() if isinstance(m, TVMKernel)]) == 3
    with torch.no_grad():
        for xi in (x, torch.randn(1, 4, 8, 8)):
            torch.testing.assert_close(grab.program.gm(xi), model(xi), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(out(xi), model(xi), rtol=1e-4, atol=1e-4)


def test_a_saved_kernel_brings_its_library_and_rebuilds_only_on_another_machine(tmp_path, monkeypatch):
    """Pickled, a generated kernel carries its compiled library: loaded on the same machine it runs without
    compiling; on another machine (another fingerprint) it is compiled again from its tuning records."""
    import io

    from optic.backend import generated

    grab = AfterTVM()
    model, x = nn.Sequential(nn.Linear(16, 8), nn.ReLU()).eval(), torch.randn(4, 16)
    optic.optimize(model, (x,), passes=PASSES, backend="tvm", tune="none", options=KEEP_ALL, instruments=[grab],
                   tuning_db=str(tmp_path / "db.json"))
    (kernel,) = kernels_of(SimpleNamespace(program=grab.program))
    with torch.no_grad():
        want = kernel(x)
    buf = io.BytesIO()
    torch.save(kernel, buf)
    compiled = []
    real = generated.compile_kernel
    monkeypatch.setattr(generated, "compile_kernel", lambda *a: compiled.append(a) or real(*a))

    def load():
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    same = load()
    assert same.stored_library is not None
    with torch.no_grad():
        assert torch.equal(same(x), want)
    assert compiled == [], "the stored library was compiled again on the machine that built it"
    monkeypatch.setattr("optic.targets.cpu.host_fingerprint", lambda: "another|cpu|avx2|torch x")
    other = load()
    with torch.no_grad():
        assert torch.equal(other(x), want)
    assert len(compiled) == 1, "a library built for another machine was used instead of compiling"


def _all_generated(model, x, tmp_path):
    """The program tvm_kernels returns with every site generated (no timing)."""
    grab = AfterTVM()
    optic.optimize(model, x, passes=PASSES, backend="tvm", tune="none", tuning_db=tmp_path / "t.db",
                   options=KEEP_ALL, instruments=[grab])
    return grab.program


class InplaceReLUNet(nn.Module):
    """conv → nn.ReLU(inplace=True), twice (ResNet's spelling): the replaced ops are in-place modules."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.c2(self.relu(self.c1(x))))


def test_replaced_layers_leave_the_graph_with_in_place_activations(tmp_path):
    # an in-place activation module whose value nobody reads is not dead code to fx: it mutates its input.
    # Left in the graph, the replaced conv and its relu still ran beside the kernel that replaced them (every
    # replaced layer computed twice in the plain graph)
    torch.manual_seed(0)
    model, x = InplaceReLUNet().eval(), torch.randn(1, 3, 8, 8)
    gm = _all_generated(model, x, tmp_path).gm
    assert len([m for m in gm.modules() if isinstance(m, TVMKernel)]) == 2
    left = [n for n in gm.graph.nodes if n.op in ("call_function", "call_module", "call_method")
            and not isinstance(gm.get_submodule(n.target) if n.op == "call_module" else None, TVMKernel)]
    assert left == [], f"replaced ops still run: {[n.format_node() for n in left]}"
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)


def test_a_compiled_whole_graph_calls_the_generated_kernels_without_graph_breaks(tmp_path):
    # the generated kernels are one opaque operator each (optic::generated_kernel) to Dynamo and Inductor: the
    # whole graph compiles as one program around them, and the kernels themselves run (not PyTorch's ops)
    from torch._dynamo.utils import counters

    from optic.backend import whole

    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 3, 8, 8)
    program = _all_generated(model, x, tmp_path)
    kernels = [m for m in program.gm.modules() if isinstance(m, TVMKernel)]
    assert len(kernels) == 5
    calls = []
    for k in kernels:
        k.run = (lambda run: lambda *a: calls.append(1) or run(*a))(k.run)
    compiled = whole.wrap(program).gm
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        got = compiled(x)
    assert compiled.compiled.failed is None
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    assert len(calls) == 5  # every kernel ran once, inside the compiled program
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-4)


def test_a_kernel_is_called_by_a_key_of_its_own_and_a_stale_key_says_what_to_do(tmp_path):
    import copy
    import pickle

    torch.manual_seed(0)
    model, x = InplaceReLUNet().eval(), torch.randn(1, 3, 8, 8)
    k = next(m for m in _all_generated(model, x, tmp_path).gm.modules() if isinstance(m, TVMKernel))
    twin, loaded = copy.deepcopy(k), pickle.loads(pickle.dumps(k))
    assert len({k.key, twin.key, loaded.key}) == 3
    y = model.c1(x).relu()
    with torch.no_grad():
        for kernel in (k, twin, loaded):
            torch.testing.assert_close(torch.ops.optic.generated_kernel(kernel.key, x, None), y, rtol=1e-4, atol=1e-4)
    key = twin.key
    del twin
    import gc

    gc.collect()
    with pytest.raises(RuntimeError, match="compile the graph again"):
        torch.ops.optic.generated_kernel(key, x, None)
