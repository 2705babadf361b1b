"""The cost estimate of `rftbench plan`: rates calibrated on collected cells (written and collected
by the real writers), fallback to coarser groups, the planned study's own cells first, honest
labels (device, GPU or not, no data), all through the command line; before any cell has run, the
prior: counted FLOPs x passes x split sizes at a sustained rate."""
from __future__ import annotations

import functools
import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from benchmark.cell import ROWS_FILE, Cell, write_config
from benchmark.cli import main
from benchmark.collect import collect
from benchmark.results import CELLS_FILE, write_rows
from benchmark.cost import EVAL_PASSES, flops_table
from benchmark.prepare import assign_splits
from benchmark.study import load_option, options, plan
from fixtures.make_sweep import rows

CONDITIONS = 5  # the demo's eval conditions: a cell's eval seconds are the sum over them


@functools.cache
def demo_cells(*overrides: str) -> list[Cell]:
    """The demo's cells (planned once per overrides: a cell does not depend on the results root)."""
    return plan(["study=demo", *overrides]).cells


def demo_cell(model: str, loss: str, protocol: str) -> Cell:
    return next(c for c in demo_cells() if (c.model, c.loss, c.protocol) == (model, loss, protocol))


def run_cells(study_dir: Path, measured: dict[Cell, tuple[float, float]], collected: bool = True, **columns) -> None:
    """Cell directories with the rows a worker writes: {cell: (train seconds, eval seconds per
    condition)}; `columns` override the other row columns (device, source, attempt, ...)."""
    for cell, (train, per_condition) in measured.items():
        cell_dir = cell.directory(study_dir)
        write_config(cell, cell_dir, study_dir.name)
        write_rows(cell_dir / ROWS_FILE, [
            {**row, "study": study_dir.name, "train_seconds": train, "eval_seconds": per_condition, **columns}
            for row in rows(cell, {})
        ])
    if collected:
        collect(study_dir)


def expected_hours(cells: list[Cell], measured: dict[Cell, tuple[float, float]]) -> float:
    """The cost model, written out: per planned cell, the calibration cells of its (size,
    protocol), else of its protocol, else all; median rates scaled by its epochs and params."""
    total = 0.0
    for cell in cells:
        model, epochs = cell.config["model"], cell.config["protocol"]["epochs"]
        same_protocol = [c for c in measured if c.protocol == cell.protocol]
        members = ([c for c in same_protocol if c.config["model"]["size"] == model["size"]]
                   or same_protocol or list(measured))
        train = statistics.median(measured[c][0] / (c.config["protocol"]["epochs"] * c.config["model"]["params_m"])
                                  for c in members)
        evaluation = statistics.median(CONDITIONS * measured[c][1] / c.config["model"]["params_m"] for c in members)
        total += (train * epochs + evaluation) * model["params_m"]
    return total / 3600


def plan_json(capsys: pytest.CaptureFixture, *overrides: str) -> dict:
    assert main(["plan", "--format", "json", *overrides]) == 0
    return json.loads(capsys.readouterr().out)["estimate"]


def plan_text(capsys: pytest.CaptureFixture, *overrides: str) -> str:
    assert main(["plan", *overrides]) == 0
    return capsys.readouterr().out


@pytest.fixture
def measured(roots: dict[str, Path]) -> dict[Cell, tuple[float, float]]:
    """Three demo cells measured on the CPU, collected in a study other than the planned one:
    two FFT-5 cells (different backbones) and one LP-50; no FFT-50 cell."""
    times = {
        demo_cell("test_resnet.demo", "classic_at", "fft5"): (30.0, 2.0),
        demo_cell("test_vit.demo", "classic_at", "fft5"): (50.0, 3.0),
        demo_cell("test_resnet.demo", "trades", "lp50"): (40.0, 1.0),
    }
    run_cells(roots["results"] / "measured", times, device="cpu")
    return times


def test_a_fresh_study_is_estimated_from_the_other_studies_cells(measured, capsys):
    estimate = plan_json(capsys, "study=demo")
    cells = demo_cells()
    assert estimate["hours"] == pytest.approx(expected_hours(cells, measured))
    assert estimate["hours_not_done"] == pytest.approx(estimate["hours"])  # nothing of demo is done
    assert estimate["calibration"] == {
        "cells": 3, "scope": "all", "studies": {"measured": 3}, "devices": {"cpu": 3},
        "uncollected_done_cells": 0, "skipped": [],
    }
    assert estimate["unit"] == "hours on cpu"
    by_group = {g["group"]: g for g in estimate["groups"]}
    resnet, vit = (c for c in measured if c.protocol == "fft5")
    assert by_group["small/fft5"]["cells"] == 2
    assert by_group["small/fft5"]["train_seconds_per_epoch_per_mparam"] == pytest.approx(statistics.mean(
        [measured[c][0] / (c.config["protocol"]["epochs"] * c.config["model"]["params_m"]) for c in (resnet, vit)]))


def test_a_group_without_calibration_cells_falls_back_and_says_so(measured, capsys):
    # No FFT-50 cell was measured: those cells take the rates of all calibration cells.
    estimate = plan_json(capsys, "study=demo")
    assert estimate["fallbacks"] == [
        {"model_size": "small", "protocol": "fft50", "cells": 4, "rates_of": "all calibration cells"}
    ]
    # A medium backbone has no calibration cell of its size: its protocol's rates, scaled to its params.
    medium = ("study=demo", "model=resnet50.a1_in1k")
    estimate = plan_json(capsys, *medium)
    assert {(f["model_size"], f["protocol"], f["rates_of"]) for f in estimate["fallbacks"]} == {
        ("medium", "fft5", "protocol fft5"), ("medium", "lp50", "protocol lp50"),
        ("medium", "fft50", "all calibration cells"),
    }
    assert estimate["hours"] == pytest.approx(expected_hours(demo_cells(*medium[1:]), measured))
    text = plan_text(capsys, *medium)
    assert ("fallback (no calibration cell of their group): rates of all calibration cells for medium/fft50 (2); "
            "rates of protocol fft5 for medium/fft5 (2); rates of protocol lp50 for medium/lp50 (2)") in text


def test_the_text_says_estimate_device_and_calibration_cells(measured, capsys):
    text = plan_text(capsys, "study=demo")
    hours = expected_hours(demo_cells(), measured)
    assert (f"cost estimate: {hours:.3g} hours on cpu for the 12 cells not done, {hours:.3g} for all 12 "
            "(NOT GPU-hours)") in text
    assert ("calibrated on 3 measured cells of the collected studies measured (3) (this study has none collected), "
            "run on cpu (3)") in text


def test_the_planned_studys_own_cells_come_first_and_done_cells_are_not_left(measured, roots, capsys):
    own = {demo_cell("test_vit.demo", "trades", "fft50"): (80.0, 4.0)}
    run_cells(roots["results"] / "demo", own, device="cuda:0")
    estimate = plan_json(capsys, "study=demo")
    cells = demo_cells()
    assert estimate["calibration"]["scope"] == "study" and estimate["calibration"]["studies"] == {"demo": 1}
    assert estimate["unit"] == "GPU-hours"
    assert estimate["hours"] == pytest.approx(expected_hours(cells, own))
    left = [c for c in cells if c not in own]
    assert estimate["cells_not_done"] == 11
    assert estimate["hours_not_done"] == pytest.approx(expected_hours(left, own))
    assert "NOT GPU-hours" not in plan_text(capsys, "study=demo")


def prior_hours(cells: list[Cell], gpu_tflops: float) -> float:
    """The prior, written out: forward GFLOPs x (epochs x (train x (2K + 1 + update) + val) + tested x
    the conditions' passes), at gpu_tflops; update 3 passes with full fine-tuning, 1 with probing."""
    total = 0.0
    for cell in cells:
        config = cell.config
        dataset, protocol, attack = config["dataset"], config["protocol"], config["loss"]["attack"]
        sizes = dataset["split_sizes"]
        forward = flops_table()[config["model"]["arch"], dataset["image_size"]]
        per_image = 2 * attack["steps"] + 1 + (3 if protocol["train_backbone"] else 1)
        evaluation = sum(EVAL_PASSES[spec["kind"]] for spec in config["eval"].values())
        total += forward * (protocol["epochs"] * (sizes["train"] * per_image + sizes["val"])
                            + min(sizes["test_pool"], dataset["test_size"]) * evaluation)
    return total / (gpu_tflops * 1e3) / 3600


def test_without_measured_cells_the_prior_gives_gpu_hours_at_the_configured_rate(roots, capsys):
    cell = demo_cell("test_resnet.demo", "classic_at", "fft5")
    run_cells(roots["results"] / "imported", {cell: (0.0, 0.0)}, source="imported",
              train_seconds=None, eval_seconds=None)
    # A resumed cell's train seconds cover only its last attempt: not a calibration cell either.
    run_cells(roots["results"] / "resumed", {cell: (30.0, 2.0)}, attempt=2)
    estimate = plan_json(capsys, "study=demo")
    assert estimate["calibration"]["cells"] == 0
    assert (estimate["basis"], estimate["unit"], estimate["prior"]["gpu_tflops"]) == ("prior", "GPU-hours", 100.0)
    assert estimate["hours"] == pytest.approx(prior_hours(demo_cells(), 100.0))
    assert plan_json(capsys, "study=demo", "runtime.gpu_tflops=50")["hours"] == pytest.approx(2 * estimate["hours"])
    text = plan_text(capsys, "study=demo")
    assert f"cost estimate: ≈ {estimate['hours']:.3g} GPU-hours at 100 TFLOP/s sustained for the 12 cells" in text
    assert "prior: no measured cells to calibrate on" in text


def test_the_paper_study_has_a_prior_for_every_cell_before_anything_ran(roots, capsys):
    estimate = plan_json(capsys, "study=paper")
    assert estimate["basis"] == "prior" and estimate["cells_unestimated"] == []
    assert estimate["hours"] == pytest.approx(prior_hours(plan(["study=paper"]).cells, 100.0))


def test_measured_cells_take_over_from_the_prior(measured, capsys):
    estimate = plan_json(capsys, "study=demo")
    assert (estimate["basis"], estimate["prior"]) == ("measured", None)
    assert "calibrated on 3 measured cells" in plan_text(capsys, "study=demo")


def test_the_flops_table_has_every_backbone_and_recounts_the_same():
    flops = pytest.importorskip("benchmark.flops")
    table = flops_table()
    assert set(flops.table_rows()) <= set(table)
    for arch, size in [("test_resnet", 32), ("test_vit", 32), ("mobilenetv3_large_100", 224)]:
        assert flops.forward_gflops(arch, size) == pytest.approx(table[arch, size], rel=1e-3)


@pytest.mark.parametrize("name", options("dataset"))
def test_split_sizes_are_those_of_the_split_rule(name):
    """Counts depend only on the number of images per official split, not on the images:
    labels made up over the published totals give the option's split sizes."""
    cfg = load_option("dataset", name)
    sizes = cfg["split_sizes"]
    official = {(): [None] * (sizes["train"] + sizes["val"] + sizes["test_pool"]),
                ("trainval", "test"): ["trainval"] * (sizes["train"] + sizes["val"]) + ["test"] * sizes["test_pool"],
                ("train", "val", "test"): ["train"] * sizes["train"] + ["val"] * sizes["val"]
                                          + ["test"] * sizes["test_pool"]}[tuple(cfg["official_splits"])]
    labels = np.arange(len(official)) % cfg["num_classes"]
    splits, pool = assign_splits(labels, official, cfg)
    assert (len(splits["train"]), len(splits["val"]), pool) == (sizes["train"], sizes["val"], sizes["test_pool"])


def test_an_empty_results_root_is_a_prior_estimate(roots, capsys):
    assert "GPU-hours at 100 TFLOP/s sustained" in plan_text(capsys, "study=demo")


def test_done_cells_not_collected_yet_are_pointed_out(measured, roots, capsys):
    run_cells(roots["results"] / "demo", {demo_cell("test_vit.demo", "trades", "fft50"): (80.0, 4.0)}, collected=False)
    estimate = plan_json(capsys, "study=demo")
    assert estimate["calibration"]["uncollected_done_cells"] == 1 and estimate["calibration"]["scope"] == "all"
    assert "1 done cells of this study are not collected yet" in plan_text(capsys, "study=demo")


def test_an_unreadable_table_is_skipped_with_its_path(measured, roots, capsys):
    broken = roots["results"] / "broken" / CELLS_FILE
    broken.parent.mkdir()
    broken.write_bytes(b"not parquet")
    estimate = plan_json(capsys, "study=demo")
    assert estimate["calibration"]["cells"] == 3
    assert [problem.split(":")[0] for problem in estimate["calibration"]["skipped"]] == [str(broken)]
    assert f"skipped {broken}: unreadable Parquet" in plan_text(capsys, "study=demo")
