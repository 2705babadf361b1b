"""Sweep state without a cluster: how a cell's files and what its own launcher says of its job
(sacct's record, a local process' liveness) reconcile into the state `status` shows, the status
report, which launcher `resume` sends a cell to, the launch guard around cells a worker is
writing, local workers, resource shapes, the requeue bound, the error when SLURM is not there at
all, and that dispatch and its pre-launch checks import no torch.

The SLURM tests (tests/test_slurm.py) run the same paths against the real local cluster."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest

import launchers.slurm
from benchmark import cell as cells
from benchmark import tables
from benchmark.cell import HEARTBEAT_FILE
from benchmark.cli import main
from benchmark.paths import PROJECT_DIR
from benchmark.study import plan
from benchmark.sweep import STALE_HEARTBEAT_S, cell_states, reconcile
from conftest import COMPUTE_PACKAGES, modules_loaded
from factories import planned_with_directories
from launchers import LAUNCHERS, Launcher, launcher_for, record_config
from launchers.local import HOST
from launchers.slurm import CellJob, RequeueLimitError, job_ranges, outcome, shapes

TWO_CELLS = ["study=demo", "model=test_resnet.demo", "protocol=fft5"]


def _job(state: str, exit_code: str = "0:0", derived: str = "0:0") -> dict[str, str]:
    """A job as sacct describes it (the fields `job_states` asks for)."""
    return {"JobID": "7_1", "State": state, "ExitCode": exit_code, "DerivedExitCode": derived,
            "Reason": "None", "Elapsed": "00:01:02"}


@pytest.mark.parametrize(("file_state", "sacct_state", "exit_code", "shown", "reason_has"), [
    ("submitted", "PENDING", "0:0", "queued", None),
    ("submitted", "RUNNING", "0:0", "running", None),  # the worker has not written yet
    ("running", "RUNNING", "0:0", "running", None),
    ("requeued", "PENDING", "0:0", "queued", None),
    ("running", "PENDING", "0:0", "queued", None),  # requeued by SLURM itself
    ("running", "FAILED", "0:9", "failed", "killed by signal 9 (SIGKILL)"),
    ("running", "CANCELLED by 0", "0:15", "failed", "it was cancelled"),
    ("running", "TIMEOUT", "0:0", "failed", "time limit"),
    ("running", "OUT_OF_MEMORY", "0:125", "failed", "out of memory"),
    ("running", "NODE_FAIL", "0:0", "failed", "node failed"),
    ("submitted", "CANCELLED by 0", "0:0", "failed", "it was cancelled"),
    ("running", "COMPLETED", "0:0", "failed", "without its worker recording an outcome"),
])
def test_an_active_cell_takes_the_state_of_its_job(file_state, sacct_state, exit_code, shown, reason_has):
    record = {"state": file_state, "job_id": "7_1", "launcher": "slurm", "launcher_kind": "slurm"}
    result = reconcile(record, outcome("7_1", _job(sacct_state, exit_code)), heartbeat_age=None)
    assert result["state"] == shown
    if reason_has is None:
        assert "reason" not in result
    else:
        assert reason_has in result["reason"] and "SLURM job 7_1" in result["reason"]
        assert sacct_state.split()[0] in result["reason"]


def test_what_the_worker_recorded_outranks_the_scheduler():
    failed = {"state": "failed", "job_id": "7_1", "reason": "NonFiniteLossError: ...", "traceback": "Traceback ..."}
    assert reconcile(failed, outcome("7_1", _job("RUNNING")), heartbeat_age=None) == failed  # sacct lags the worker
    done = {"state": "done", "job_id": "7_1"}
    assert reconcile(done, outcome("7_1", _job("FAILED", "1:0")), heartbeat_age=None) == done
    # A job sacct does not know yet (it lags sbatch by about a second) is queued.
    assert reconcile({"state": "submitted", "job_id": "7_1"}, None, heartbeat_age=None)["state"] == "queued"


def test_a_running_cell_without_a_job_is_dead_once_its_heartbeat_is_stale():
    record = {"state": "running", "host": "node3", "pid": 4242}
    assert reconcile(record, None, heartbeat_age=5.0)["state"] == "running"
    assert reconcile(record, None, heartbeat_age=None)["state"] == "running"  # just started
    dead = reconcile(record, None, heartbeat_age=STALE_HEARTBEAT_S + 60)
    assert dead["state"] == "failed"
    assert "node3" in dead["reason"] and "4242" in dead["reason"] and "no heartbeat" in dead["reason"]


def test_outcome_reads_exit_codes_and_signals():
    assert outcome("9", _job("FAILED", "1:0", "1:0")).reason == "SLURM job 9: it failed (FAILED, exit code 1, after 00:01:02)"
    # What sacct says of a job whose worker was killed with SIGKILL: srun exits 9, the step got signal 9.
    killed = outcome("9", _job("FAILED", "9:0", "0:9")).reason
    assert killed.endswith("(FAILED, killed by signal 9 (SIGKILL), after 00:01:02)")
    assert outcome("9", _job("SOMETHING_NEW")).state == "ended"  # an unknown end is still an end


def _age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_status_counts_states_and_shows_failed_cells_with_reason_traceback_and_log(roots, capsys):
    study, dirs = planned_with_directories(["study=demo", "model=test_resnet.demo"])  # 6 cells
    (dirs[0] / cells.ROWS_FILE).write_bytes(b"")  # done: its rows exist
    cells.write_state(dirs[1], "running")
    cells.write_state(dirs[1], "failed", reason="NonFiniteLossError: the loss is not finite",
                      traceback="Traceback (most recent call last):\n  ...\nNonFiniteLossError: the loss is not finite")
    (dirs[1] / cells.LOG_FILE).write_text("".join(f"log line {i}\n" for i in range(20)))
    cells.write_state(dirs[2], "running", host="node3", pid=4242)  # died silently, long ago
    (dirs[2] / HEARTBEAT_FILE).touch()
    _age(dirs[2] / HEARTBEAT_FILE, STALE_HEARTBEAT_S + 60)
    cells.write_state(dirs[3], "running", host="node4", pid=99)  # alive
    (dirs[3] / HEARTBEAT_FILE).touch()

    assert main(["status", "study=demo", "model=test_resnet.demo", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total"] == 6
    assert report["by_state"] == {"done": 1, "failed": 2, "running": 1, "pending": 2}
    entries = {e["cell_id"]: e for e in report["cells"]}
    failed = entries[study.cells[1].id]
    assert failed["reason"].startswith("NonFiniteLossError") and failed["traceback"].startswith("Traceback")
    assert "no heartbeat" in entries[study.cells[2].id]["reason"]
    assert set(entries[study.cells[4].id]) == {"cell_id", "dataset", "model", "loss", "protocol", "seed", "state"}

    assert main(["status", "study=demo", "model=test_resnet.demo"]) == 0
    text = capsys.readouterr().out
    assert "done 1, failed 2, pending 2, running 1" in text
    assert f"{study.cells[1].slug} ({study.cells[1].id})" in text
    assert "reason: NonFiniteLossError: the loss is not finite" in text
    assert "log line 19" in text and "log line 14" not in text  # the last lines of its log
    assert "rftbench resume study=demo (each goes back to its own launcher)" in text


def test_status_of_a_seed_sweep_reads_only_the_cells_that_have_a_directory(roots, capsys, monkeypatch):
    overrides = [*TWO_CELLS, "seed=0,1,2"]
    study = plan(overrides)
    by_seed = {(c.model, c.loss, c.seed): c for c in study.cells}
    done, failed = by_seed["test_resnet.demo", "trades", 1], by_seed["test_resnet.demo", "classic_at", 2]
    for cell in (done, failed):
        cells.write_config(cell, cell.directory(study.dir), study.name)
    (done.directory(study.dir) / cells.ROWS_FILE).write_bytes(b"")
    cells.write_state(failed.directory(study.dir), "failed", reason="boom")
    read = []
    read_state = cells.read_state
    monkeypatch.setattr(cells, "read_state", lambda cell_dir: read.append(cell_dir.name) or read_state(cell_dir))

    assert main(["status", *overrides, "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(read) == sorted([done.id, failed.id])  # the 4 others have no directory to read
    assert report["total"] == 6 and report["by_state"] == {"done": 1, "failed": 1, "pending": 4}
    entries = {(e["loss"], e["seed"]): e["state"] for e in report["cells"]}
    assert entries[("trades", 1)] == "done" and entries[("classic_at", 2)] == "failed"
    assert entries[("trades", 0)] == entries[("trades", 2)] == "pending"
    assert main(["status", *overrides]) == 0
    assert "test_resnet.demo__classic_at__fft5__seed2" in capsys.readouterr().out  # the failed cell's slug


def test_launch_and_resume_never_touch_a_cell_a_worker_is_writing(roots, capsys):
    study, (done_dir, busy_dir) = planned_with_directories(TWO_CELLS)
    (done_dir / cells.ROWS_FILE).write_bytes(b"")
    cells.write_state(busy_dir, "running", host="elsewhere", pid=1)
    (busy_dir / HEARTBEAT_FILE).touch()
    before = {p.name: p.read_bytes() for p in busy_dir.iterdir()}
    for command in ("launch", "resume"):
        assert main([command, *TWO_CELLS]) == 0
        assert "nothing to launch" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in busy_dir.iterdir()} == before
    # Its worker stops beating: now it is failed, and resume would take it.
    _age(busy_dir / HEARTBEAT_FILE, STALE_HEARTBEAT_S + 1)
    assert cell_states(study)[study.cells[1].id]["state"] == "failed"


def test_status_watch_refreshes_until_nothing_is_live(roots, capsys, monkeypatch):
    study, (first, second) = planned_with_directories(TWO_CELLS)
    (first / cells.ROWS_FILE).write_bytes(b"")
    cells.write_state(second, "running", host="here", pid=1)
    (second / HEARTBEAT_FILE).touch()
    pause = time.sleep

    def worker_finishes_meanwhile(seconds: float) -> None:  # while `status --watch` waits
        (second / cells.ROWS_FILE).write_bytes(b"")
        pause(seconds)

    monkeypatch.setattr(time, "sleep", worker_finishes_meanwhile)
    assert main(["status", *TWO_CELLS, "--watch", "0.1"]) == 0
    out = capsys.readouterr().out
    assert out.count("study demo: 2 cells") == 2
    assert "done 1, running 1" in out and out.rstrip().endswith("done 2")


def test_cancel_with_nothing_queued_or_running(roots, capsys):
    planned_with_directories(TWO_CELLS)
    assert main(["cancel", *TWO_CELLS]) == 0
    assert "nothing to cancel" in capsys.readouterr().out


def test_paper_cells_group_into_few_resource_shapes():
    study = plan(["study=paper", "launcher=slurm"])
    groups = list(shapes(study.config["launcher"], study.cells).values())
    assert sum(len(group) for _, group in groups) == 1440
    assert len(groups) == 9  # 3 protocols x 3 model sizes
    for shape, group in groups:
        assert len({(c.protocol, c.config["model"]["size"]) for c in group}) == 1
        assert shape["gpus_per_node"] == 1 and shape["cpus_per_task"] == 8
        assert shape["time"] == {"fft50": 1440, "fft5": 240, "lp50": 480}[group[0].protocol]
        assert shape["mem"] == {"small": "16G", "medium": "32G", "large": "64G"}[group[0].config["model"]["size"]]
        assert "partition" not in shape  # unset options are left to the cluster's defaults


def test_a_model_of_its_own_gets_its_own_shape_and_options_reach_every_shape():
    overrides = ["study=paper", "launcher=slurm", "launcher.partition=gpu",
                 "+launcher.resources.model.robust_resnet50.gpus_per_node=2"]
    study = plan(overrides)
    groups = list(shapes(study.config["launcher"], study.cells).values())
    assert len(groups) == 12  # robust_resnet50 (large) leaves each of the 3 large shapes
    for shape, group in groups:
        assert shape["partition"] == "gpu"
        assert shape["gpus_per_node"] == (2 if group[0].model == "robust_resnet50" else 1)


def test_requeues_are_counted_and_bounded(tmp_path):
    job = CellJob({"paths": {}, "runtime": {}}, max_requeues=2, job={"launcher": "slurm", "launcher_kind": "slurm"})
    cells.write_state(tmp_path, "running", launcher="slurm", launcher_kind="slurm", job_id="7_1", log="x.err",
                      requeues=1, host="node1", pid=7)
    resubmission = job.checkpoint(tmp_path)
    assert resubmission.function is job and resubmission.args == (tmp_path,)
    state = cells.read_state(tmp_path)
    assert state["state"] == "requeued" and state["requeues"] == 2 and state["job_id"] == "7_1"
    assert state["launcher"] == "slurm" and state["launcher_kind"] == "slurm"  # still its launcher's job
    cells.write_state(tmp_path, "running", launcher="slurm", job_id="7_1", requeues=2)
    with pytest.raises(RequeueLimitError, match="after 2 requeues"):
        job.checkpoint(tmp_path)


def test_slurm_launch_without_slurm_is_a_clear_error_and_writes_nothing(roots, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    assert main(["launch", "study=demo", "launcher=slurm"]) == 2
    err = capsys.readouterr().err
    assert "launcher=slurm needs the SLURM commands" in err and "sbatch" in err and "launcher=local" in err
    assert not any(roots["results"].iterdir())


def test_job_ids_are_cancelled_in_compact_ranges():
    ids = ["12_0", "12_1", "12_2", "12_5", "13", "14_3", "12_7", "12_6", "12_1"]
    assert job_ranges(ids) == ["13", "12_[0-2,5-7]", "14_[3]"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model=deit_tiny_patch16_224.fb_in1k", "rftbench fetch-weights study=paper model=deit_tiny_patch16_224.fb_in1k"),
        ("dataset=flowers102", "rftbench prepare-data dataset=flowers102"),
        ("eval.linf.norm=Linf3", "eval.linf.norm='Linf3'"),
        ("eval.common.corruptions=[fogg]", "eval.common.corruptions.0='fogg'"),
    ],
)
def test_launch_refuses_missing_inputs_before_writing_anything(roots, capsys, override, message):
    assert main(["launch", "study=demo", override]) == 2
    assert message in capsys.readouterr().err
    assert not any(roots["results"].rglob("*"))


@pytest.mark.slow  # makes the demo weights, then trains two tiny cells: minutes on a busy CPU
def test_a_two_seed_study_runs_end_to_end(roots, capsys):
    overrides = ["study=demo", "model=test_resnet.demo", "loss=classic_at", "protocol=lp50",
                 "protocol.epochs=1", "eval=[clean]", "seed=0,1"]
    assert main(["launch", *overrides, "--wait"]) == 0
    study = plan(overrides)
    assert "collected 2 measurements of 2 cells" in capsys.readouterr().out
    rows = tables.load(study.name)
    assert sorted(rows["seed"]) == [0, 1] and rows[["dataset", "model", "loss", "protocol"]].nunique().max() == 1
    assert dict(zip(rows["seed"], rows["cell_id"])) == {c.seed: c.id for c in study.cells}
    assert main(["launch", *overrides]) == 0
    assert "nothing to launch (2 cells: done 2)" in capsys.readouterr().out


# --- each cell's own launcher -----------------------------------------------------------------

def _gone_pid() -> int:
    """The pid of a process of this host that has ended (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_local_worker_whose_process_is_gone_is_failed_at_once(roots, capsys):
    study, (gone, alive) = planned_with_directories(TWO_CELLS)
    local = {"launcher": "local", "launcher_kind": "local"}
    cells.write_state(gone, "running", **local, host=HOST, pid=_gone_pid())  # kill -9: no word written
    cells.write_state(alive, "running", **local, host=HOST, pid=os.getpid())
    for cell_dir in (gone, alive):
        (cell_dir / HEARTBEAT_FILE).touch()  # fresh: no waiting for it to go stale

    states = cell_states(study)
    assert states[study.cells[1].id]["state"] == "running"
    dead = states[study.cells[0].id]
    assert dead["state"] == "failed" and "its process is gone" in dead["reason"] and HOST in dead["reason"]
    assert main(["status", *TWO_CELLS]) == 0
    assert "failed 1, running 1" in capsys.readouterr().out


def test_only_the_cells_a_slurm_launcher_ran_are_asked_of_sacct(roots, monkeypatch):
    study, (local_dir, slurm_dir) = planned_with_directories(TWO_CELLS)
    cells.write_state(local_dir, "running", launcher="local", launcher_kind="local", host="node3", pid=42)
    cells.write_state(slurm_dir, "submitted", launcher="slurm_cpu", launcher_kind="slurm", job_id="77_3")
    asked: list[list[str]] = []
    monkeypatch.setattr(launchers.slurm, "sacct", lambda ids: asked.append(sorted(ids)) or {})
    cell_states(study)
    assert asked == [["77_3"]]  # one question, about the SLURM cell only


class Recorder(Launcher):
    """A launcher kind of this test's own: records the cells it is given and runs none."""

    kind = "recorder"
    launched: ClassVar[list[list[str]]] = []

    def launch(self, study, todo) -> int:
        Recorder.launched.append([cell.id for cell in todo])
        return 0

    def submit_workers(self, study, fn, n, name) -> list:
        return []

    @classmethod
    def cancel(cls, study, todo) -> int:
        return 0

    @classmethod
    def job_states(cls, records: dict[str, dict[str, Any]]) -> dict:
        return {}


def test_resume_sends_a_failed_cell_back_to_its_own_launcher_unless_the_command_line_names_one(
        roots, capsys, monkeypatch, tmp_path):
    LAUNCHERS.register(Recorder.kind, f"{__name__}:Recorder")
    study, (failed_dir, done_dir) = planned_with_directories(TWO_CELLS)
    recorder = launcher_for({"name": "recorder_cpu", "kind": "recorder", "queue": "long"})
    record_config(study.dir, recorder.config)  # as its launch did
    cells.write_state(failed_dir, "failed", **recorder.job_record(job_id="5"), reason="node failed")
    (done_dir / cells.ROWS_FILE).write_bytes(b"")
    Recorder.launched.clear()

    assert main(["resume", *TWO_CELLS]) == 0  # configured: local; the failed cell's own: recorder
    assert Recorder.launched == [[study.cells[0].id]]
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    assert main(["resume", *TWO_CELLS, "launcher=slurm"]) == 2  # the named launcher is the one checked
    assert "launcher=slurm needs the SLURM commands" in capsys.readouterr().err
    assert Recorder.launched == [[study.cells[0].id]]


def _finish(marker: Path) -> None:
    marker.write_text("done")


def test_local_workers_run_as_processes_log_and_are_known_dead_once_gone(roots):
    study = plan(TWO_CELLS)
    local = launcher_for(study.config["launcher"])
    markers = [roots["results"] / f"marker{i}" for i in range(2)]
    records = [local.submit_workers(study, functools.partial(_finish, marker), 1, f"probe{i}")[0]
               for i, marker in enumerate(markers)]
    assert {r["host"] for r in records} == {HOST} and len({r["pid"] for r in records}) == 2
    by_name = {f"probe{i}": record for i, record in enumerate(records)}
    deadline = time.monotonic() + 60
    while len(local.job_states(by_name)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert {state.state for state in local.job_states(by_name).values()} == {"ended"}
    assert all(marker.read_text() == "done" for marker in markers)
    assert all(Path(record["log"]).exists() for record in records)


def test_dispatch_and_the_pre_launch_checks_import_no_torch(roots):
    script = (
        "import sys\n"
        "import benchmark.sweep, launchers.local, launchers.slurm\n"
        "from benchmark.errors import RFTBenchError\n"
        "from benchmark.study import plan\n"
        "from benchmark.sweep import _check_inputs, cell_states\n"
        "from launchers import launcher_for\n"
        "study = plan(['study=demo'])\n"
        "launcher_for(study.config['launcher']).check(study)\n"
        "try:\n"
        "    _check_inputs(study)\n"
        "except RFTBenchError:\n"
        "    pass  # nothing prepared under this test's roots: refused, as it should be\n"
        "cell_states(study)\n"
    )
    env = {f"RFTBENCH_{k.upper()}": str(v) for k, v in roots.items()}
    assert not modules_loaded(script, cwd=PROJECT_DIR, env=env) & COMPUTE_PACKAGES
