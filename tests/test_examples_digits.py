"""The digits examples: the data split, training, the weight cache, and the modules' interface.

The fast tests train nothing bigger than a tiny CNN for one epoch. The real examples (train to
≥ 97 % / ≥ 95 %, then optimize within a 1 % budget) are ``slow``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLES = Path(__file__).parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import digits_cnn  # noqa: E402
import digits_common as common  # noqa: E402
import digits_transformer  # noqa: E402

MODULES = [digits_cnn, digits_transformer]


@pytest.fixture(scope="module")
def data() -> common.Digits:
    return common.load_digits()


def test_split_sizes_disjoint_and_complete(data):
    parts = [data.train, data.calibration, data.test]
    assert [len(p) for p in parts] == [1000, 397, 400]
    rows = torch.cat([p.index for p in parts])
    assert sorted(rows.tolist()) == list(range(1797))  # disjoint and nothing left out


def test_split_is_stratified(data):
    labels = np.load(common.DATA)["labels"]
    share = np.bincount(labels, minlength=10) / len(labels)
    for part in (data.train, data.calibration, data.test):
        counts = torch.bincount(part.y, minlength=10).numpy()
        assert np.abs(counts - share * len(part)).max() <= 1.0, counts


def test_split_is_deterministic_and_seeded(data):
    again = common.load_digits()
    for a, b in ((data.train, again.train), (data.calibration, again.calibration), (data.test, again.test)):
        assert torch.equal(a.index, b.index) and torch.equal(a.x, b.x)
    assert not torch.equal(common.load_digits(seed=1).test.index, data.test.index)


def test_inputs_are_standardized_on_train(data):
    assert data.train.x.shape[1:] == (1, 8, 8) and data.train.x.dtype == torch.float32
    assert abs(float(data.train.x.mean())) < 1e-4 and abs(float(data.train.x.std()) - 1) < 1e-3
    assert data.train.y.dtype == torch.int64


def test_shift_moves_whole_images(data):
    x = data.test.x[:16]
    out = common.shift(x, torch.Generator().manual_seed(0))
    background = float(x.amin())
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), value=background)
    for i in range(len(x)):
        shifted = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(out[i], s) for s in shifted)


def test_one_epoch_beats_chance(data):
    torch.manual_seed(0)
    model = digits_cnn.DigitsCNN((8, 8, 8))
    before = common.accuracy(model.eval(), data.test)
    common.train(model, data, common.TrainConfig(epochs=1, batch_size=32, lr=1e-2, augment=False))
    after = common.accuracy(model, data.test)
    assert after > max(0.3, before + 0.1), (before, after)


def test_training_is_reproducible(data):
    config = common.TrainConfig(epochs=1, batch_size=100, lr=1e-2)
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = common.train(digits_cnn.DigitsCNN((4, 4, 4)), data, config)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_trained_weights_are_cached(tmp_path, monkeypatch, data):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = common.TrainConfig(epochs=1, batch_size=100, lr=1e-2)
    code = (digits_cnn.Block, digits_cnn.DigitsCNN)

    def make():
        return digits_cnn.DigitsCNN((4, 4, 4))

    first = common.trained("tiny", make, config, code, data)
    assert len(list((tmp_path / "optic" / "examples").glob("tiny-*.pt"))) == 1
    monkeypatch.setattr(common, "train", lambda *a, **k: pytest.fail("trained again despite the cache"))
    second = common.trained("tiny", make, config, code, data)
    assert not second.training
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True))
    other = common.cache_key("tiny", code, common.TrainConfig(epochs=1, batch_size=100, lr=1e-2, seed=1))
    assert other != common.cache_key("tiny", code, config)


def test_latency_batch1_times_both(data):
    model = digits_cnn.DigitsCNN((4, 4, 4)).eval()
    t = common.latency_batch1(model, model, data.test.x[:8], rounds=2, budget_s=1.0)
    assert set(t) == {"eager", "optimized"} and all(v.median > 0 for v in t.values())


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.NAME)
def test_example_modules_expose_the_interface(module):
    for name in ("build", "example_inputs", "calibration", "main"):
        assert callable(getattr(module, name))
    (x,) = module.example_inputs()
    assert x.shape == (1, 1, 8, 8)
    batches = module.calibration()
    assert sum(len(y) for _, y in batches) == 397
    assert all(xb.shape[1:] == (1, 8, 8) and yb.dtype == torch.int64 for xb, yb in batches)


def test_example_models_capture_with_fx():
    from optic.ir.capture import capture

    x = digits_cnn.example_inputs()
    for model in (digits_cnn.DigitsCNN(), digits_transformer.DigitsTransformer()):
        program = capture(model.eval(), x)
        assert program.capture == "fx"
        assert torch.allclose(program.gm(*x), model(*x), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("module,floor", [(digits_cnn, 0.97), (digits_transformer, 0.95)], ids=["cnn", "transformer"])
def test_trained_example_accuracy(module, floor, data):
    assert common.accuracy(module.build(), data.test) >= floor


@pytest.mark.slow
@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.NAME)
def test_optimized_within_budget_on_test(module, data):
    _, outcome = common.optimize_and_measure(module.build(), data, module.example_inputs(), 0.01)
    assert outcome.drop <= 0.01 + 1e-9, outcome.summary()
