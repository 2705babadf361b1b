"""A cell on several processes (benchmark.distributed), on the CPU with Gloo, for real: two ranks
train the weights one rank trains with twice their batch, shard the evaluation without changing
a single per-example result, resume a checkpoint of either world size, and fail the cell with
the reason of a rank that dies. The demo ViT (no BatchNorm) with augmentation off, so both
world sizes see the same images."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch

from benchmark import cell as cells
from benchmark import results
from benchmark.cli import main
from benchmark.distributed import Group, batch_sizes, clear_failure, peer_failure, record_failure
from benchmark.errors import RFTBenchError
from benchmark.paths import PROJECT_DIR
from benchmark.study import plan
from conftest import wait_until

VIT = ["study=demo", "model=test_vit.demo", "loss=classic_at", "dataset.augment.rotation_degrees=0",
       "dataset.augment.color_jitter=0", "dataset.test_size=40", "runtime.eval_batch_size=10",
       "runtime.retention=all"]  # a done cell keeps its checkpoint
# Per-rank batch 32 on 2 ranks, 64 on 1; each epoch cut to an even number of images on both.
TRAINED = [*VIT, "protocol=fft5", "protocol.drop_last_multiple=2", "eval=[clean,linf]"]
FAILURE_BOUND_S = 90  # from a rank's death to the launcher's exit with the cell failed


def _cell_dir(overrides: list[str]) -> Path:
    (cell,) = plan(overrides).cells
    return cell.directory(plan(overrides).dir)


def _launch(overrides: list[str], nproc: int) -> None:
    assert main(["launch", *overrides, f"launcher.nproc={nproc}"]) == 0, cells.read_state(_cell_dir(overrides))


def _use_results(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    root.mkdir(exist_ok=True)
    monkeypatch.setenv("RFTBENCH_RESULTS", str(root))


def _weights(cell_dir: Path) -> dict[str, torch.Tensor]:
    """The checkpointed weights but the key biases of attention: softmax ignores them, so their
    gradient is rounding noise, which AdamW normalises into steps of the learning rate's size
    (different for every batching of the same examples)."""
    weights = torch.load(cell_dir / "ckpt" / "last.pt", weights_only=False)["model"]
    for name, weight in weights.items():
        if name.endswith("attn.qkv.bias"):
            weight.view(3, -1)[1] = 0
    return weights


def _examples(cell_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(cell_dir / cells.EXAMPLES_FILE)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_an_update_sees_the_effective_batch_whatever_the_ranks(world_size):
    protocol = {"name": "p", "batch_size": 32, "effective_batch_size": 128}
    per_rank, steps = batch_sizes(protocol, world_size)
    assert per_rank <= protocol["batch_size"] and per_rank * steps * world_size == 128


def test_an_effective_batch_the_ranks_cannot_share_is_refused_naming_it():
    with pytest.raises(RFTBenchError, match="effective_batch_size 64 is not a multiple of the 3 ranks"):
        batch_sizes({"name": "p", "batch_size": 32, "effective_batch_size": 64}, 3)


def test_the_reason_a_rank_records_is_the_one_its_peers_report(tmp_path):
    rank0, rank1 = Group(0, 2), Group(1, 2)
    assert peer_failure(tmp_path, rank0) is None
    try:
        raise ValueError("rank 1's own trouble")
    except ValueError as err:
        record_failure(tmp_path, rank1, err)
    failure = peer_failure(tmp_path, rank0)
    assert failure["rank"] == 1 and failure["reason"] == "ValueError: rank 1's own trouble"
    assert "Traceback" in failure["traceback"] and peer_failure(tmp_path, rank1) is None  # not its own
    clear_failure(tmp_path, rank1)  # a new attempt of rank 1 forgets it
    assert peer_failure(tmp_path, rank0) is None


@pytest.mark.parametrize("bad, named", [(["launcher.nproc=0"], "launcher.nproc=0"),
                                        (["launcher.nproc=2", "runtime.device=cuda"], "launcher.nproc=2")])
def test_bad_rank_counts_are_refused_before_anything_is_written(roots, monkeypatch, capsys, bad, named):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU visible
    assert main(["launch", *TRAINED, *bad]) != 0
    assert named in capsys.readouterr().err
    assert not list(roots["results"].rglob(cells.STATE_FILE))


@pytest.mark.slow
def test_two_ranks_train_like_one_with_twice_the_batch_and_shard_evaluation_exactly(roots, tmp_path, monkeypatch):
    _launch(TRAINED, nproc=2)
    two = _cell_dir(TRAINED)
    _use_results(monkeypatch, tmp_path / "one")
    _launch(TRAINED, nproc=1)
    one = _cell_dir(TRAINED)
    for name, weight in _weights(one).items():
        torch.testing.assert_close(_weights(two)[name], weight, rtol=1e-3, atol=1e-4, msg=name)
    assert results.read_rows(two / cells.ROWS_FILE).column("world_size").to_pylist() == [2, 2]
    assert results.read_rows(one / cells.ROWS_FILE).column("world_size").to_pylist() == [1, 1]

    # The 2-rank checkpoint evaluated by one rank: the very per-example results of the 2 ranks.
    _use_results(monkeypatch, tmp_path / "again")
    again = _cell_dir(TRAINED)
    shutil.copytree(two, again, ignore=shutil.ignore_patterns(cells.ROWS_FILE, cells.EXAMPLES_FILE, cells.STATE_FILE,
                                                              cells.LOG_FILE, "aa_state"))
    _launch(TRAINED, nproc=1)
    assert "resumed from checkpoint after epoch 1" in (again / cells.LOG_FILE).read_text()
    pd.testing.assert_frame_equal(_examples(again), _examples(two))
    assert len(_examples(two)) == 2 * 40


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_a_checkpoint_of_one_world_size_resumes_on_another(roots, first, then):
    two_epochs = [*VIT, "protocol=lp50", "eval=[clean]"]
    one_epoch = [*two_epochs, "protocol.epochs=1"]
    _launch(one_epoch, nproc=first)
    (cell,) = plan(two_epochs).cells
    target = cell.directory(plan(two_epochs).dir)
    cells.write_config(cell, target, "demo")
    (target / "ckpt").mkdir()
    shutil.copy(_cell_dir(one_epoch) / "ckpt" / "last.pt", target / "ckpt" / "last.pt")
    _launch(two_epochs, nproc=then)
    assert "resumed from checkpoint after epoch 1" in (target / cells.LOG_FILE).read_text()
    rows = results.read_rows(target / cells.ROWS_FILE).to_pandas()
    assert rows.world_size.eq(then).all() and rows.n_examples.eq(40).all()


def _rank_processes(launcher_pid: int) -> list[int]:
    """The rank processes the launcher spawned (its children that run multiprocessing's spawn
    main, not its resource tracker)."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    ranks = []
    for pid in map(int, children):
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if "spawn_main" in command:
            ranks.append(pid)
    return ranks


@pytest.mark.slow
def test_a_rank_that_dies_fails_the_cell_with_its_reason_within_bounded_time(roots):
    overrides = [*VIT, "protocol=fft50", "protocol.epochs=20", "eval=[clean]"]
    launcher = subprocess.Popen([sys.executable, "-m", "benchmark.cli", "launch", *overrides, "launcher.nproc=2"],
                                cwd=PROJECT_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cell_dir = _cell_dir(overrides)
    deadline = time.monotonic() + 300
    while "epoch 1/20" not in ((cell_dir / cells.LOG_FILE).read_text() if (cell_dir / cells.LOG_FILE).exists() else ""):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[0]
        time.sleep(0.5)
    rank0 = cells.read_state(cell_dir)["pid"]
    (rank1,) = [pid for pid in _rank_processes(launcher.pid) if pid != rank0]
    os.kill(rank1, signal.SIGKILL)
    killed = time.monotonic()
    out, _ = launcher.communicate(timeout=FAILURE_BOUND_S)
    assert launcher.returncode == 1 and time.monotonic() - killed < FAILURE_BOUND_S
    state = cells.read_state(cell_dir)
    assert state["state"] == "failed" and state["reason"].startswith(f"rank 1 (pid {rank1}) was killed by signal 9")
    assert state["reason"] in out  # the launcher says why
    assert not (cell_dir / cells.ROWS_FILE).exists()
    status = subprocess.run([sys.executable, "-m", "benchmark.cli", "status", *overrides, "--format", "json"],
                            cwd=PROJECT_DIR, capture_output=True, text=True, check=True)
    (entry,) = json.loads(status.stdout)["cells"]
    assert entry["state"] == "failed" and entry["reason"] == state["reason"]


# --- on the real local SLURM cluster (scripts/slurm-local.sh) ---------------------------------
# A cell of 2 tasks, one CPU each, no GPU: the two ranks find each other from submitit's
# distributed environment. The demo's test_resnet cell on 20 test images at an Linf budget APGD-CE
# breaks at once (as tests/test_slurm.py), so that what is timed is the dispatch.

SLURM_CELL = ["study=demo", "model=test_resnet.demo", "loss=classic_at", "dataset.test_size=20",
              "eval.linf.eps=0.25", "runtime.eval_batch_size=10"]
TWO_TASKS = ["launcher=slurm", "launcher.resources.protocol=null", "launcher.resources.model_size=null",
             "launcher.resources.default.gpus_per_node=null", "launcher.resources.default.mem=3G",
             "launcher.resources.default.cpus_per_task=1", "launcher.resources.default.ntasks_per_node=2",
             "launcher.resources.default.time=10", "runtime.collective_timeout_s=120"]
SLURM_TIMEOUT_S = 420  # a few cells on a busy two-core machine


def _wait_until(what: str, check: Callable[[], bool], timeout: float = SLURM_TIMEOUT_S) -> None:
    wait_until(what, check, timeout)


def _status(capsys, overrides: list[str]) -> dict:
    capsys.readouterr()
    assert main(["status", *overrides, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def slurm_roots(roots):
    """The roots, and every job still queued or running at the end cancelled."""
    from slurm_cluster import require_slurm

    require_slurm()
    yield roots
    job_ids = {cells.read_state(p.parent).get("job_id") for p in roots["results"].glob("*/cells/*/state.json")}
    if job_ids - {None}:
        subprocess.run(["scancel", *sorted(job_ids - {None})], capture_output=True)


@pytest.mark.slurm
def test_a_killed_rank_fails_the_slurm_cell_in_bounded_time_and_resume_finishes_it(slurm_roots, capsys):
    """A 2-task cell: its rank 0 killed, the cell fails; resumed, it completes with world_size 2."""
    overrides = [*SLURM_CELL, "protocol=fft50", "protocol.epochs=3", *TWO_TASKS]
    cell_dir = _cell_dir(overrides)
    assert main(["launch", *overrides]) == 0
    assert "ntasks_per_node=2" in capsys.readouterr().out
    log = cell_dir / cells.LOG_FILE
    _wait_until("rank 0 has checkpointed its first epoch", lambda: log.exists() and "epoch 1/3" in log.read_text())
    os.kill(cells.read_state(cell_dir)["pid"], signal.SIGKILL)  # rank 0: no chance to write anything
    _wait_until("the cell is failed", lambda: _status(capsys, overrides)["by_state"] == {"failed": 1}, FAILURE_BOUND_S)
    (entry,) = _status(capsys, overrides)["cells"]
    assert entry["reason"].startswith(f"SLURM job {entry['job_id']}: ")

    assert main(["resume", *overrides]) == 0
    _wait_until("the resumed cell is done", lambda: _status(capsys, overrides)["by_state"] == {"done": 1})
    assert "resumed from checkpoint after epoch 1" in log.read_text() or "resumed from checkpoint after epoch 2" in log.read_text()
    rows = results.read_rows(cell_dir / cells.ROWS_FILE).to_pandas()
    assert len(rows) == 5 and not rows.condition.duplicated().any() and rows.world_size.eq(2).all()
    assert rows.attempt.eq(2).all() and rows.n_examples.eq(20).all()
