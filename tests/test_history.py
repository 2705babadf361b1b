"""Learning curves as data: the per-epoch history of a cell, its collection into the study's
`history` table, the "never left chance" rule, and a resumed cell's history (each epoch once)."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from benchmark import history
from benchmark.cell import CELLS_DIR
from benchmark.collect import collect
from benchmark.query import query


def _records(epochs: int, val_accuracy: float = 0.5, val_size: int = 200) -> list[dict]:
    return [{"epoch": e, "step": 10 * e, "samples_seen": 640 * e, "train_loss": 2.0 / e, "train_accuracy": 0.3,
             "val_accuracy": val_accuracy, "val_size": val_size, "eps": 4 / 255, "lr_head": 0.01, "seconds": 1.5}
            for e in range(1, epochs + 1)]


@pytest.fixture
def study_dir(tmp_path: Path) -> Path:
    """A study of two cells with histories (3 and 2 epochs) and one without."""
    directory = tmp_path / "s"
    for cell, epochs in (("aaaa", 3), ("bbbb", 2)):
        history.write_history(directory / CELLS_DIR / cell, "s", cell, _records(epochs))
    (directory / CELLS_DIR / "cccc").mkdir()
    return directory


def test_a_history_file_holds_every_column_and_nulls_what_was_not_measured(tmp_path: Path):
    history.write_history(tmp_path, "s", "aaaa", _records(2))
    table = pq.read_table(tmp_path / history.HISTORY_FILE)
    assert table.schema.equals(history.HISTORY_SCHEMA)
    assert table["epoch"].to_pylist() == [1, 2] and set(table["cell_id"].to_pylist()) == {"aaaa"}
    assert table["val_robust_loss"].null_count == 2 and table["lr_backbone"].null_count == 2  # a linear probe


def test_collect_gathers_every_cells_history_and_rewrites_it_only_on_change(study_dir: Path):
    table = history.collect_history(study_dir)
    assert table.num_rows == 5
    assert list(zip(table["cell_id"].to_pylist(), table["epoch"].to_pylist())) == [
        ("aaaa", 1), ("aaaa", 2), ("aaaa", 3), ("bbbb", 1), ("bbbb", 2)]
    before = os.stat(study_dir / history.HISTORY_FILE)
    history.collect_history(study_dir)
    after = os.stat(study_dir / history.HISTORY_FILE)
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)  # nothing changed: not written
    history.write_history(study_dir / CELLS_DIR / "bbbb", "s", "bbbb", _records(3))  # the cell trained on
    assert history.collect_history(study_dir).num_rows == 6


def test_query_and_tables_see_the_history_table(roots, study_dir: Path):
    from benchmark import tables

    study = roots["results"] / "s"
    study_dir.rename(study)
    collect(study)
    frame = query("select cell_id, max(epoch) as epochs from history group by all order by cell_id",
                  study="s", results_root=roots["results"])
    assert frame.to_dict("list") == {"cell_id": ["aaaa", "bbbb"], "epochs": [3, 2]}
    assert len(tables.history("s", roots["results"])) == 5


def test_a_study_without_histories_has_an_empty_history_table(roots):
    from benchmark import tables

    cell = roots["results"] / "s" / CELLS_DIR / "cccc"
    cell.mkdir(parents=True)
    frame = tables.history("s", roots["results"])
    assert frame.empty and list(frame.columns) == history.HISTORY_SCHEMA.names


def test_never_left_chance_is_accuracy_within_three_standard_errors_of_guessing():
    # 10 classes, 200 val images: chance 0.1, ceiling 0.1 + 3 * sqrt(0.09 / 200) = 0.1636.
    assert history.chance_ceiling(10, 200) == pytest.approx(0.1636, abs=1e-4)
    frame = pd.DataFrame([*({"cell_id": "stuck", **r} for r in _records(3, val_accuracy=0.16)),
                          *({"cell_id": "learnt", **r} for r in _records(2, val_accuracy=0.16)),
                          {"cell_id": "learnt", **_records(3, val_accuracy=0.9)[2]},
                          *({"cell_id": "unknown", **r} for r in _records(1, val_accuracy=0.1))])
    assert history.never_left_chance(frame, {"stuck": 10, "learnt": 10}) == ["stuck"]
    # Two classes: ceiling 0.5 + 3 * sqrt(0.25 / 200) = 0.606; "learnt" (0.9) left it, "stuck" never did.
    assert history.never_left_chance(frame, {"stuck": 2, "learnt": 2}) == ["stuck"]


class _Killed(Exception):
    """Stands for the job being killed at that point."""


@pytest.mark.slow
def test_a_cell_killed_between_checkpoint_and_history_resumes_with_each_epoch_once(roots, monkeypatch):
    """The worst moment: epoch 1's checkpoint written, its history not. The resumed cell's
    history has epochs 1 and 2, once each, epoch 1 as the first attempt measured it."""
    import torch

    from benchmark import cell as cells
    from benchmark.run import Runtime, run_cell
    from benchmark.study import plan

    study = plan(["study=demo", "model=test_resnet.demo", "loss=classic_at", "protocol=fft5", "protocol.epochs=2",
                  "loss.attack.steps=2", "dataset.test_size=22", "eval=[clean]", "runtime.history_validation_size=64"])
    cell = study.cells[0]
    cell_dir = cell.directory(study.dir)
    cells.write_config(cell, cell_dir, study.name)
    runtime = Runtime.from_config(study.config)

    def killed(*args, **kwargs):
        raise _Killed("after the checkpoint of epoch 1")

    monkeypatch.setattr(history, "write_history", killed)
    with pytest.raises(_Killed):
        run_cell(cell_dir, runtime)
    checkpoint = torch.load(cell_dir / "ckpt" / "last.pt", weights_only=True)  # plain types and tensors only
    assert checkpoint["epochs_done"] == 1 and not (cell_dir / history.HISTORY_FILE).exists()
    monkeypatch.undo()

    run_cell(cell_dir, runtime)
    assert "resumed from checkpoint after epoch 1" in (cell_dir / cells.LOG_FILE).read_text()
    table = pq.read_table(cell_dir / history.HISTORY_FILE).to_pandas()
    assert table["epoch"].tolist() == [1, 2]
    assert table["step"].tolist() == [table["step"][0], 2 * table["step"][0]] and table["step"][0] > 0
    assert table["samples_seen"].tolist() == [table["samples_seen"][0], 2 * table["samples_seen"][0]]
    assert table["val_accuracy"][0] == checkpoint["history"][0]["val_accuracy"]
    assert table["val_robust_size"].tolist() == [64, 64] and table["val_robust_loss"].notna().all()
    assert table["val_robust_accuracy"].between(0, 1).all() and table["train_accuracy"].between(0, 1).all()
    assert table["lr_backbone"].notna().all() and (table["val_seconds"] > 0).all()
    assert cells.read_state(cell_dir)["state"] == "done"


def test_learning_curves_are_medians_over_cells_drawn_per_loss():
    from analysis import figures
    from analysis.report import _learning_curves

    rows = [{"cell_id": f"{loss}{k}", "protocol": "fft5", "loss": loss, "epoch": e, "val_accuracy": acc * e,
             "val_robust_accuracy": acc * e / 2}
            for loss, accs in (("classic_at", (0.1, 0.2, 0.4)), ("trades", (0.3,))) for k, acc in enumerate(accs)
            for e in (1, 2)]
    curves = _learning_curves(pd.DataFrame(rows))
    at = curves.set_index(["loss", "metric", "epoch"])
    assert at.loc[("classic_at", "val_accuracy", 2), "median"] == pytest.approx(0.4)  # of 0.2, 0.4, 0.8
    assert at.loc[("classic_at", "val_accuracy", 2), "cells"] == 3
    assert at.loc[("trades", "val_robust_accuracy", 1), "median"] == pytest.approx(0.15)
    fig = figures.learning_curves(curves, "fft5")
    assert [len(ax.get_lines()) for ax in fig.axes] == [2, 2]  # one line per loss in each metric's panel
