"""What a done cell keeps on disk, the disk estimate of `plan` and the use of `status`, and
re-evaluation of kept weights under new conditions (`rftbench evaluate`) without retraining."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmark import cell as cells
from benchmark import retention
from benchmark.cli import main
from benchmark.errors import RFTBenchError
from benchmark.results import read_rows
from benchmark.study import plan

CELL = ["study=demo", "model=test_resnet.demo", "loss=classic_at", "protocol=fft5", "loss.attack.steps=2",
        "dataset.test_size=22", "runtime.history_validation_size=32"]


def test_conditions_and_retention_are_not_part_of_a_cells_identity():
    ids = [c.id for c in plan(["study=demo", "eval=[clean]"]).cells]
    assert ids == [c.id for c in plan(["study=demo", "eval=[clean,linf,l2]", "eval.linf.eps=0.03"]).cells]
    assert ids == [c.id for c in plan(["study=demo", "runtime.retention=none"]).cells]
    assert ids != [c.id for c in plan(["study=demo", "loss.attack.steps=3"]).cells]


def test_an_unknown_retention_is_refused_with_the_choices():
    with pytest.raises(RFTBenchError, match="retention") as err:
        plan(["study=demo", "runtime.retention=weights"])
    assert "weights" in str(err.value)


def test_plan_estimates_the_disk_from_parameters_and_retention(roots, capsys):
    assert main(["plan", "study=demo", "--format", "json"]) == 0
    final = json.loads(capsys.readouterr().out)["disk"]
    assert main(["plan", "study=demo", "runtime.retention=all", "--format", "json"]) == 0
    kept_all = json.loads(capsys.readouterr().out)["disk"]
    assert main(["plan", "study=demo", "runtime.retention=none", "--format", "json"]) == 0
    none = json.loads(capsys.readouterr().out)["disk"]
    assert none["bytes"] < final["bytes"] < kept_all["bytes"] and final["cells"] == 12
    weights = sum(c.config["model"]["params_m"] * 4e6 for c in plan(["study=demo"]).cells)
    assert final["bytes"] - none["bytes"] == pytest.approx(weights)
    assert main(["plan", "study=demo"]) == 0
    assert "disk estimate:" in capsys.readouterr().out


@pytest.fixture(scope="module")
def done_cell(tmp_path_factory) -> dict[str, Path]:
    """One demo cell trained (one epoch) and measured clean, keeping everything (retention all)."""
    root = tmp_path_factory.mktemp("done")
    env = {kind: root / kind for kind in ("results", "data", "weights")}
    with pytest.MonkeyPatch.context() as patch:
        for kind, path in env.items():
            path.mkdir()
            patch.setenv(f"RFTBENCH_{kind.upper()}", str(path))
        assert main(["launch", *CELL, "eval=[clean]", "runtime.retention=all"]) == 0
        study = plan(CELL)
    return {**env, "cell": study.cells[0].directory(study.dir)}


def _copy(cell_dir: Path, target: Path) -> Path:
    shutil.copytree(cell_dir, target)
    return target


@pytest.mark.slow
def test_retention_final_keeps_only_the_evaluated_weights_within_the_estimate(done_cell, tmp_path: Path):
    import torch

    original = done_cell["cell"]
    # `all`: the checkpoint stays, of tensors and plain types (loaded without unpickling objects).
    assert torch.load(original / "ckpt" / "last.pt", weights_only=True)["epochs_done"] == 1
    assert (original / retention.WEIGHTS_FILE).exists()
    weights = retention.load_weights(original)
    final = _copy(original, tmp_path / "final")
    retention.keep_weights(final, "final", weights)
    assert not (final / "ckpt").exists() and not (final / "aa_state").exists()
    assert {name: t.equal(weights[name]) for name, t in retention.load_weights(final).items()} == dict.fromkeys(weights, True)
    none = _copy(original, tmp_path / "none")
    retention.keep_weights(none, "none", weights)
    assert not (none / retention.WEIGHTS_FILE).exists() and not (none / "ckpt").exists()
    assert (none / cells.ROWS_FILE).exists()  # the results stay whatever is kept

    config = cells.read_config(final)["config"]
    assert _clean_correct(final, config, done_cell) == read_rows(final / cells.ROWS_FILE)["n_correct"][0].as_py()

    estimated = config["model"]["params_m"] * 1e6 * retention.BYTES_PER_PARAMETER
    actual = (final / retention.WEIGHTS_FILE).stat().st_size
    assert abs(estimated - actual) / actual < 0.10, (estimated, actual)
    whole = retention.cell_disk_estimate(config, "final")
    assert abs(whole - retention.disk_used(final)) / retention.disk_used(final) < 0.10


def _clean_correct(cell_dir: Path, config: dict, roots: dict[str, Path]) -> int:
    """Clean test examples right by a fresh model given the cell's kept weights."""
    from benchmark import data, evaluate, models

    splits = data.load_splits(config["dataset"], roots["data"])
    model = models.create_model(config["model"], splits.num_classes, roots["weights"])
    model.load_state_dict(retention.load_weights(cell_dir))
    x, y = data.load_tensors(splits.test)
    return evaluate.evaluate(model, x, y, {"clean": config["eval"]["clean"]}, cell_dir)[0].n_correct


@pytest.mark.slow
def test_evaluate_adds_the_missing_conditions_to_a_done_cell_without_retraining(done_cell, monkeypatch, capsys):
    for kind in ("results", "data", "weights"):
        monkeypatch.setenv(f"RFTBENCH_{kind.upper()}", str(done_cell[kind]))
    cell_dir = done_cell["cell"]
    before = read_rows(cell_dir / cells.ROWS_FILE).to_pylist()
    log = (cell_dir / cells.LOG_FILE).read_text()
    history = (cell_dir / "history.parquet").read_bytes()

    assert main(["launch", *CELL, "eval=[clean,linf]"]) == 0  # the cell is done: nothing is retrained
    assert "nothing to launch" in capsys.readouterr().out
    assert main(["evaluate", *CELL, "eval=[clean,linf]"]) == 0
    after = read_rows(cell_dir / cells.ROWS_FILE).to_pylist()
    assert [r["condition"] for r in after] == ["clean", "linf"] and after[0] == before[0]
    assert {r["cell_id"] for r in after} == {cell_dir.name} and after[1]["train_seconds"] == before[0]["train_seconds"]
    assert 0 <= after[1]["accuracy"] <= after[0]["accuracy"]
    assert (cell_dir / cells.LOG_FILE).read_text() == log and (cell_dir / "history.parquet").read_bytes() == history
    assert list(cells.read_config(cell_dir)["config"]["eval"]) == ["clean", "linf"]
    capsys.readouterr()
    assert main(["query", "select condition from measurements", "--format", "json"]) == 0
    assert [r["condition"] for r in json.loads(capsys.readouterr().out)] == ["clean", "linf"]

    assert main(["evaluate", *CELL, "eval=[clean,linf]"]) == 0  # again: nothing left to measure
    assert "has every condition" in capsys.readouterr().out
    assert main(["evaluate", *CELL, "eval=[clean,linf]", "eval.linf.eps=0.1"]) == 2  # linf means another thing now
    assert "measured under another config of the same name" in capsys.readouterr().err
    assert read_rows(cell_dir / cells.ROWS_FILE).to_pylist() == after

    (cell_dir / retention.WEIGHTS_FILE).unlink()  # as retention `none` leaves it
    assert main(["evaluate", *CELL, "eval=[clean,linf,l2]"]) == 0
    assert "kept no weights" in capsys.readouterr().out
    assert main(["status", *CELL]) == 0
    assert "on disk in their directories" in capsys.readouterr().out
