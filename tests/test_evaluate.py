"""Evaluation conditions on a small CNN trained on scikit-learn's digits at 32x32: clean accuracy,
AutoAttack exactly as pyautoattack computes it (also after a resume), common corruptions (at the
native resolution or the input's), and the condition kinds' checks and row descriptions."""
from __future__ import annotations

import importlib.metadata
import itertools
import json
import logging
import re
import warnings

import numpy as np
import pyautoattack
import pytest
import torch
import torch.nn.functional as F
from pyautoattack.state import EvaluationState
from sklearn.datasets import load_digits
from torch import nn

from benchmark import data, tables
from benchmark.conditions import CORRUPTIONS, condition_columns
from benchmark.errors import RFTBenchError
from benchmark.evaluate import (
    Context,
    NativeImages,
    corrupt_images,
    corrupted_inputs,
    corruption_plan,
    evaluate,
    trapezoid_scores,
)
from benchmark.study import load_option

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # imagecorruptions' pkg_resources warning
    from imagecorruptions import corrupt, get_corruption_names

N_TEST = 32
# APGD-CE alone (pyautoattack's custom version: 5 restarts) keeps these tests fast; the standard
# version runs in the slow test below.
APGD_CE = {"kind": "autoattack", "norm": "Linf", "eps": 8 / 255, "version": "custom", "attacks": ["apgd-ce"], "seed": 0}
COMMON = load_option("eval", "common")["common"]  # the published way: native resolution, blocks
COMMON_INPUT = {**COMMON, "resolution": "input"}
NATIVE_SIZE = 40  # the test's "native" resolution of the digits, resized to 32 by the test transform
# Expected robustness over 0..4/255 on a 1/255 grid, APGD-CE with a small budget.
EXPECTED = {**load_option("eval", "expected_linf")["expected_linf"], "n_iter": 10}


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as 3x32x32 images in [0, 1] (the corruptions need at least 32 px)."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16
    x = F.interpolate(x, size=32, mode="bilinear").expand(-1, 3, -1, -1).contiguous()
    return x, torch.tensor(data.target)


@pytest.fixture(scope="module")
def model(digits) -> nn.Module:
    """A small CNN trained for a few steps on all but the first 200 digits (~80% accuracy)."""
    x, y = digits[0][200:], digits[1][200:]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        idx = torch.randint(0, len(x), (64,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        optimizer.step()
    return net.eval()


@pytest.fixture(scope="module")
def test_split(digits) -> tuple[torch.Tensor, torch.Tensor]:
    return digits[0][:N_TEST], digits[1][:N_TEST]


def _direct_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return (model(x).argmax(1) == y).numpy()


@pytest.fixture(scope="module")
def fresh(model, test_split, tmp_path_factory):
    """One AutoAttack (APGD-CE) evaluation from scratch, and its work directory."""
    work_dir = tmp_path_factory.mktemp("fresh")
    (measurement,) = evaluate(model, *test_split, {"linf": APGD_CE}, work_dir, batch_size=20)
    return measurement, work_dir


def test_clean_accuracy_is_the_argmax_accuracy(model, digits, tmp_path):
    x, y = digits[0][:120], digits[1][:120]
    model.train()
    model[0].eval()
    (m,) = evaluate(model, x, y, {"clean": {"kind": "clean"}}, tmp_path, batch_size=50)  # 3 batches, one short
    assert [sub.training for sub in model.modules()] == [True, False] + [True] * 6  # flags restored
    model.eval()
    expected = _direct_correct(model, x, y)
    assert m.correct.dtype == bool and np.array_equal(m.correct, expected)
    assert (m.condition, m.n_examples, m.n_correct) == ("clean", 120, expected.sum())
    assert 0.5 < m.n_correct / m.n_examples < 1  # a non-trivial model
    assert (m.norm, m.epsilon, m.eps_grid, m.attack, m.attack_version) == (None,) * 5
    assert m.seconds > 0


def test_autoattack_equals_pyautoattack_called_directly(model, test_split, fresh):
    m, work_dir = fresh
    x, y = test_split
    expected = []
    for k, (x_batch, y_batch) in enumerate(zip(x.split(20), y.split(20))):  # each batch seeded by its index
        adversary = pyautoattack.AutoAttack(model, norm="Linf", eps=APGD_CE["eps"], version="custom",
                                            attacks=["apgd-ce"], device="cpu", seed=k)
        x_adv, _ = adversary.run_standard_evaluation(x_batch, y_batch, batch_size=20)
        expected.append(_direct_correct(model, x_adv, y_batch))
    expected = np.concatenate(expected)
    assert np.array_equal(m.correct, expected)
    assert 0 < m.n_correct < _direct_correct(model, x, y).sum()  # the attack fools some, not all
    assert (m.n_examples, m.norm, m.epsilon) == (N_TEST, "Linf", APGD_CE["eps"])
    assert (m.attack, m.attack_version) == ("autoattack-custom(apgd-ce)", pyautoattack.__version__)
    state = json.loads((work_dir / "aa_state" / "linf" / "batch1.json").read_text())
    assert state["_robust_flags"] == expected[20:].tolist() and state["_run_attacks"] == ["apgd-ce"]


def test_second_evaluation_resumes_from_the_finished_state(model, test_split, fresh, caplog):
    m, work_dir = fresh
    with caplog.at_level(logging.INFO, logger="benchmark.evaluate"):
        (again,) = evaluate(model, *test_split, {"linf": APGD_CE}, work_dir, batch_size=20)
    assert "attacks left: none" in caplog.text  # nothing was attacked again
    assert np.array_equal(again.correct, m.correct) and again.n_examples == N_TEST


def test_resume_after_an_interruption_gives_the_uninterrupted_result(model, test_split, fresh, tmp_path):
    """The state of the first batch as pyautoattack leaves it when stopped right after its clean pass."""
    x, y = test_split
    path = tmp_path / "aa_state" / "linf" / "batch0.json"
    path.parent.mkdir(parents=True)
    clean = torch.from_numpy(_direct_correct(model, x[:20], y[:20]))
    state = EvaluationState({"apgd-ce"}, path=path)
    state.robust_flags = clean
    state.clean_accuracy = int(clean.sum()) / 20
    (resumed,) = evaluate(model, x, y, {"linf": APGD_CE}, tmp_path, batch_size=20)
    assert np.array_equal(resumed.correct, fresh[0].correct)
    saved = json.loads(path.read_text())
    assert saved["_robust_flags"] == resumed.correct[:20].tolist() and saved["_run_attacks"] == ["apgd-ce"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["batch0.json", "batch1.json"]


@pytest.mark.parametrize("damage", ["truncated", "another model"])
def test_a_state_that_does_not_fit_is_ignored(model, test_split, fresh, tmp_path, damage):
    path = tmp_path / "aa_state" / "linf" / "batch0.json"
    path.parent.mkdir(parents=True)
    saved = json.loads((fresh[1] / "aa_state" / "linf" / "batch0.json").read_text())
    if damage == "truncated":
        path.write_text(json.dumps(saved)[:50])
    else:  # an evaluation of a model with other clean predictions
        path.write_text(json.dumps({**saved, "_clean_accuracy": 0.5, "_robust_flags": [True] * 20}))
    (m,) = evaluate(model, *test_split, {"linf": APGD_CE}, tmp_path, batch_size=20)
    assert np.array_equal(m.correct, fresh[0].correct)


@pytest.mark.slow
def test_standard_autoattack_equals_pyautoattack_and_resumes(model, digits, tmp_path):
    """The study's standard version (APGD-CE, APGD-T, FAB-T, Square) at the study's L2 budget."""
    x, y = digits[0][:16], digits[1][:16]
    cfg = {**load_option("eval", "l2")["l2"], "eps": 1.0}  # 2.0 fools every digit; 1.0 leaves some
    (m,) = evaluate(model, x, y, {"l2": cfg}, tmp_path, batch_size=250)
    adversary = pyautoattack.AutoAttack(model, norm="L2", eps=1.0, version="standard", device="cpu", seed=0)
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=250)
    assert np.array_equal(m.correct, _direct_correct(model, x_adv, y))
    assert 0 < m.n_correct and m.attack == "autoattack-standard"
    (again,) = evaluate(model, x, y, {"l2": cfg}, tmp_path, batch_size=250)
    assert np.array_equal(again.correct, m.correct)


def _uint8(x: torch.Tensor) -> list[np.ndarray]:
    return list((x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy())


def _authors_corruption(i: int, n: int) -> str:
    """The published study's rule: example i of n gets type (i // floor(n / 11)) % 11."""
    return COMMON["corruptions"][(i // (n // 11)) % 11]


def test_corruptions_follow_the_given_names_and_seeds(digits):
    images = _uint8(digits[0][:25])
    names = [COMMON["corruptions"][k % 11] for k in range(25)]
    before = np.random.get_state()
    corrupted = corrupt_images(images, 100, names, 3, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), before))  # global RNG restored
    for offset, (image, result, name) in enumerate(zip(images, corrupted, names)):
        assert result.shape == image.shape and result.dtype == np.uint8
        if name == "impulse_noise":  # salt and pepper, from its own seeded generator
            changed = result != image
            assert changed.any() and np.isin(result[changed], [0, 255]).all()
            continue
        np.random.seed(7 * 1_000_003 + 100 + offset)  # the seed of test example 100 + offset
        assert np.array_equal(result, corrupt(image, corruption_name=name, severity=3)), name
    np.random.set_state(before)


def test_corruptions_keep_the_size_of_224px_images():
    images = _uint8(torch.rand(11, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    corrupted = corrupt_images(images, 0, COMMON["corruptions"], 3, seed=0)
    assert all(c.shape == i.shape and not np.array_equal(c, i) for c, i in zip(corrupted, images))


def test_block_assignment_is_the_published_studys_for_1000_images_and_11_corruptions():
    plan = corruption_plan(1000, COMMON["corruptions"], "blocks")
    assert plan == [_authors_corruption(i, 1000) for i in range(1000)]
    runs = [(name, len(list(run))) for name, run in itertools.groupby(plan)]
    # contiguous blocks of floor(1000 / 11) = 90 in the list's order, the last 10 wrapping round
    assert runs == [(name, 90) for name in COMMON["corruptions"]] + [(COMMON["corruptions"][0], 10)]
    assert corruption_plan(25, COMMON["corruptions"], "round_robin") == [COMMON["corruptions"][i % 11] for i in range(25)]
    assert corruption_plan(5, COMMON["corruptions"], "blocks") == COMMON["corruptions"][:5]  # fewer than 11: blocks of 1


@pytest.fixture(scope="module")
def native_digits(digits) -> NativeImages:
    """The first 60 digits as uint8 images at a "native" 40x40, and the real test transform to 32x32."""
    x = F.interpolate(digits[0][:60], size=NATIVE_SIZE, mode="bilinear")
    images = _uint8(x)
    return NativeImages(images=lambda: images, to_input=lambda batch: data.test_input(batch, {"image_size": 32}))


def test_a_corrupted_test_image_is_the_native_image_corrupted_then_resized(model, digits, native_digits, tmp_path):
    natives, y = native_digits.images(), digits[1][:60]
    x = data.test_input(natives, {"image_size": 32})
    context = Context(model, x, y, torch.device("cpu"), tmp_path, 25, "common", native_digits)
    inputs = torch.cat(list(corrupted_inputs(context, COMMON)))
    assert inputs.shape == x.shape
    expected = []
    for i, native in enumerate(natives):
        name = _authors_corruption(i, 60)
        if name == "impulse_noise":  # its own seeded generator: see the test above
            expected.append(inputs[i])
            assert not torch.equal(inputs[i], x[i])
            continue
        np.random.seed(COMMON["seed"] * 1_000_003 + i)
        corrupted = corrupt(native, corruption_name=name, severity=COMMON["severity"])
        assert corrupted.shape[:2] == (NATIVE_SIZE, NATIVE_SIZE)  # corrupted at the native size
        expected.append(data.test_input([corrupted], {"image_size": 32})[0])
    assert torch.equal(inputs, torch.stack(expected))
    (m,) = evaluate(model, x, y, {"common": COMMON}, tmp_path, batch_size=25, native=native_digits)
    assert np.array_equal(m.correct, _direct_correct(model, inputs, y))
    assert m.attack == "corruptions-severity3"


def test_native_corruptions_refuse_images_below_32_pixels_and_a_missing_native_split(model, digits, tmp_path):
    x, y = digits[0][:11], digits[1][:11]
    small = NativeImages(images=lambda: _uint8(F.interpolate(x, size=8)), to_input=lambda b: data.test_input(b, {"image_size": 32}))
    with pytest.raises(RFTBenchError, match=re.escape("a side of 8 pixels; corrupt the model's input instead (eval.common.resolution=input)")):
        evaluate(model, x, y, {"common": COMMON}, tmp_path, native=small)
    with pytest.raises(RFTBenchError, match="resolution native need the test images at their native resolution"):
        evaluate(model, x, y, {"common": COMMON}, tmp_path)


def test_corruption_condition_is_deterministic_and_independent_of_batching(model, digits, tmp_path):
    x, y = digits[0][:60], digits[1][:60]
    first, second = (evaluate(model, x, y, {"common": COMMON_INPUT}, tmp_path, batch_size=size)[0] for size in (25, 60))
    assert np.array_equal(first.correct, second.correct)
    names = [_authors_corruption(i, 60) for i in range(60)]
    expected = _direct_correct(model, torch.from_numpy(np.stack(corrupt_images(_uint8(x), 0, names, 3, COMMON["seed"])))
                               .permute(0, 3, 1, 2).float().div(255), y)
    assert np.array_equal(first.correct, expected)
    assert first.n_examples == 60 and 0 < first.n_correct < 60
    assert (first.attack, first.attack_version) == ("corruptions-severity3(resolution=input)",
                                                     importlib.metadata.version("imagecorruptions"))


def test_trapezoid_scores_average_a_known_accuracy_curve():
    """Four examples on a 5-point grid: accuracies 1, .75, .5, .5, .25 (example 2 is broken at
    the third budget but not the fourth: an attack need not be monotone in eps)."""
    correct = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    scores = trapezoid_scores(correct)
    curve = correct.double().mean(1).numpy()
    assert scores.mean().item() == pytest.approx(np.trapezoid(curve, dx=1) / 4)
    assert scores.tolist() == [1.0, 5 / 8, 5 / 8, 1 / 8]  # (c0 + 2 c1 + 2 c2 + 2 c3 + c4) / 8


def test_expected_robustness_is_the_trapezoid_of_the_attack_accuracies(model, test_split, tmp_path, caplog):
    x, y = test_split
    (m,) = evaluate(model, x, y, {"expected_linf": EXPECTED}, tmp_path / "expected", batch_size=20)
    grid = [k / 255 for k in range(5)]
    assert m.eps_grid == pytest.approx(grid, abs=1e-15) and m.eps_grid[-1] == m.epsilon == EXPECTED["eps"]
    correct_at = [_direct_correct(model, x, y)]
    for eps in grid[1:]:  # each budget measured on its own as an AutoAttack condition
        linf = {**EXPECTED, "kind": "autoattack", "eps": eps}
        correct_at.append(evaluate(model, x, y, {"linf": linf}, tmp_path / f"{eps}", batch_size=20)[0].correct)
    curve = [c.mean() for c in correct_at]
    assert curve[0] > curve[-1] > 0  # the budgets matter
    assert m.accuracy == pytest.approx(np.trapezoid(curve, grid) / grid[-1], abs=1e-12)
    assert m.n_correct == np.logical_and.reduce(correct_at).sum()  # correct at every budget
    assert (m.norm, m.attack) == ("Linf", "expected-autoattack-custom(apgd-ce,n_iter=10,n_restarts=1)")
    with caplog.at_level(logging.INFO, logger="benchmark.evaluate"):
        (again,) = evaluate(model, x, y, {"expected_linf": EXPECTED}, tmp_path / "expected", batch_size=20)
    assert caplog.text.count("attacks left: none") == 4 * 2 and again.accuracy == m.accuracy  # budgets x batches


def test_conditions_come_back_in_the_config_order(model, test_split, tmp_path):
    cfg = {"common": COMMON_INPUT, "clean": {"kind": "clean"}}
    assert [m.condition for m in evaluate(model, *test_split, cfg, tmp_path)] == ["common", "clean"]


@pytest.mark.parametrize(("cfg", "message"), [
    ({"c": {"kind": "clean"}, "x": {"kind": "autoatack"}}, "unknown eval kind (condition x) 'autoatack'"),
    ({"x": {**APGD_CE, "norm": "Linf2"}}, "unknown AutoAttack norm (condition x) 'Linf2'"),
    ({"x": {**APGD_CE, "version": "standard"}}, "AutoAttack takes a list of `attacks` with version custom"),
    ({"x": {**COMMON, "corruptions": ["fogg"]}}, "unknown corruption (condition x) 'fogg'; valid choices (closest first): fog"),
    ({"x": {**COMMON, "severity": 6}}, "condition x: corruption severity must be an integer from 1 to 5, got 6"),
    ({"x": {**COMMON, "resolution": "nativ"}}, "unknown corruption resolution (condition x) 'nativ'"),
    ({"x": {**COMMON, "assignment": "block"}}, "unknown corruption assignment (condition x) 'block'"),
    ({"x": {k: v for k, v in COMMON.items() if k != "resolution"}}, "condition x: no resolution in its config"),
    ({"x": {**EXPECTED, "grid_step": 3 / 255}}, "eps > 0 that is a whole number of grid steps"),
    ({"c": {"kind": "clean"}, "x": {**EXPECTED, "version": "plus"}}, "AutoAttack takes a list of `attacks`"),
])
def test_bad_conditions_are_refused(model, test_split, tmp_path, cfg, message):
    with pytest.raises(RFTBenchError, match=re.escape(message)):
        evaluate(model, *test_split, cfg, tmp_path)


@pytest.mark.slow
def test_a_cell_measures_expected_robustness_into_its_rows(roots):
    """End to end: a demo cell with the expected-robustness condition, launched and collected."""
    from benchmark.cli import main

    overrides = ["study=demo", "model=test_resnet.demo", "loss=classic_at", "protocol=lp50",
                 "eval=[clean,expected_linf]", "eval.expected_linf.n_iter=10",
                 "runtime.retention=all"]  # keep the AutoAttack state to look at (`final` drops it)
    assert main(["launch", *overrides]) == 0
    long = tables.load("demo")
    assert list(long["condition"]) == ["clean", "expected_linf"]
    clean, expected = long.to_dict("records")
    assert list(expected["eps_grid"]) == pytest.approx([k / 255 for k in range(5)], abs=1e-15)
    assert expected["attack"] == "expected-autoattack-custom(apgd-ce,n_iter=10,n_restarts=1)"
    assert expected["n_correct"] <= expected["accuracy"] * expected["n_examples"] <= clean["n_correct"]
    cell_dir = roots["results"] / "demo" / "cells" / expected["cell_id"]
    assert sorted(p.name for p in (cell_dir / "aa_state").iterdir()) == [f"expected_linf@{k}" for k in range(1, 5)]


def test_the_corruption_names_checked_without_imagecorruptions_are_its_own():
    assert list(CORRUPTIONS) == get_corruption_names("all")


def test_condition_columns_describe_each_kind_of_condition():
    assert condition_columns({"kind": "clean"}) == {"norm": None, "epsilon": None, "eps_grid": None, "attack": None}
    linf = {"kind": "autoattack", "norm": "Linf", "eps": 4 / 255, "version": "standard", "seed": 0}
    assert condition_columns(linf) == {"norm": "Linf", "epsilon": 4 / 255, "eps_grid": None, "attack": "autoattack-standard"}
    assert condition_columns(COMMON) == {"norm": None, "epsilon": None, "eps_grid": None, "attack": "corruptions-severity3"}
    departed = {**COMMON, "resolution": "input", "assignment": "round_robin"}
    assert condition_columns(departed)["attack"] == "corruptions-severity3(resolution=input,assignment=round_robin)"
    expected = {**linf, "kind": "expected", "grid_step": 2 / 255, "version": "custom", "attacks": ["apgd-ce"], "n_iter": 9}
    assert condition_columns(expected) == {
        "norm": "Linf", "epsilon": 4 / 255, "eps_grid": [0.0, 2 / 255, 4 / 255],
        "attack": "expected-autoattack-custom(apgd-ce,n_iter=9)"}
