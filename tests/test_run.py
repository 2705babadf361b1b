"""A real demo cell end to end on the CPU: digits, a tiny timm backbone with pretrained weights
made by the project, a robust loss, AutoAttack and corruptions, five result rows."""
from __future__ import annotations

import pytest

from benchmark import cell as cells
from benchmark import results
from benchmark.cli import main
from benchmark.study import plan

pytestmark = pytest.mark.slow

ONE_CELL = ["study=demo", "model=test_convnext.demo", "loss=trades", "protocol=fft5"]


def _cell_dir(overrides: list[str]):
    study = plan(overrides)
    assert len(study.cells) == 1
    return study.cells[0].directory(study.dir)


def test_demo_cell_trains_evaluates_and_writes_five_rows(roots, capsys):
    assert main(["launch", *ONE_CELL]) == 0
    cell_dir = _cell_dir(ONE_CELL)
    table = results.read_rows(cell_dir / cells.ROWS_FILE).to_pandas()
    assert list(table.condition) == ["clean", "linf", "l2", "l1", "common"]
    assert (table.n_examples == 100).all()
    assert table.accuracy.between(0, 1).all()
    clean = table.set_index("condition").accuracy
    assert clean["clean"] > 0.5  # pretrained and fine-tuned: far above chance (0.1)
    assert clean["linf"] <= clean["clean"] and clean["l2"] <= clean["clean"]
    assert (table.accuracy == table.n_correct / table.n_examples).all()
    assert table.source.eq("run").all() and table.attempt.eq(1).all()
    for column in ("git_commit", "torch_version", "timm_version", "autoattack_version", "device", "host"):
        assert table[column].notna().all(), column
    assert cells.read_state(cell_dir)["state"] == "done"
    # Retention `final` (the default): the final weights kept, the checkpoint and optimizer state gone.
    assert (cell_dir / "weights.safetensors").exists() and not (cell_dir / "ckpt").exists()
    assert (cell_dir / cells.LOG_FILE).read_text()
    # Relaunching finds the cell done and launches nothing.
    capsys.readouterr()
    assert main(["launch", *ONE_CELL]) == 0
    assert "nothing to launch" in capsys.readouterr().out


def test_nan_loss_fails_the_cell_with_a_reason_and_keeps_done_cells(roots):
    assert main(["launch", *ONE_CELL]) == 0
    done_rows = (_cell_dir(ONE_CELL) / cells.ROWS_FILE).read_bytes()
    exploding = [*ONE_CELL[:-1], "protocol=fft5", "protocol.optimizer.lr_head=1e20", "protocol.optimizer.lr_backbone=1e20"]
    assert main(["launch", *exploding]) == 1
    failed_dir = _cell_dir(exploding)
    state = cells.read_state(failed_dir)
    assert state["state"] == "failed" and "NonFiniteLossError" in state["reason"]
    assert "Traceback" in state["traceback"]
    assert not (failed_dir / cells.ROWS_FILE).exists()
    assert (_cell_dir(ONE_CELL) / cells.ROWS_FILE).read_bytes() == done_rows


def test_training_resumes_from_the_last_completed_epoch(roots, tmp_path):
    from benchmark import data, models, train
    from benchmark.run import Runtime

    config = plan(["study=demo", "model=test_resnet.demo", "protocol=lp50"]).cells[0].config
    runtime = Runtime(roots["data"], roots["weights"], device="cpu")
    splits = data.load_splits(config["dataset"], runtime.data_root)
    ckpt = tmp_path / "last.pt"

    def trainer(epochs: int) -> train.Trainer:
        model = models.create_model(config["model"], splits.num_classes, runtime.weights_root)
        return train.Trainer(model, splits, config["loss"], {**config["protocol"], "epochs": epochs},
                             ckpt_path=ckpt, device=runtime.torch_device(), seed=0)

    first = trainer(1).fit()
    assert first.resumed_from_epoch == 0 and len(first.val_accuracy) == 1
    second = trainer(2).fit()
    assert second.resumed_from_epoch == 1
    assert second.val_accuracy[0] == first.val_accuracy[0] and len(second.val_accuracy) == 2
