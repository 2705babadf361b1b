"""`rftbench status --watch`: each refresh's content, on a fake terminal with an injected clock
(nothing sleeps), and the time of a refresh on the 1,440-cell study."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


from benchmark import cell as cells
from benchmark.study import plan
from benchmark.watch import CLEAR, Estimate, frame, watch
from launchers.local import HOST, LocalLauncher
from factories import planned_with_directories

SIX_CELLS = ["study=demo", "model=test_resnet.demo"]
LOCAL = {"launcher": "local", "launcher_kind": "local"}


class Terminal(io.StringIO):
    """What `watch` writes to, as a terminal: each refresh clears the screen."""

    def isatty(self) -> bool:
        return True

    def frames(self) -> list[str]:
        return self.getvalue().split(CLEAR)[1:]


class Clock:
    """The watch's clock and sleep: sleeping advances the clock and lets `meanwhile` act."""

    def __init__(self, meanwhile: Callable[[int], None] = lambda n: None):
        self.now, self.slept, self.meanwhile = time.time(), [], meanwhile

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        self.meanwhile(len(self.slept))


def _running(cell_dir: Path, **progress) -> None:
    cells.write_state(cell_dir, "running", **LOCAL, host=HOST, pid=os.getpid())  # this live process
    cells.write_progress(cell_dir, **progress)


def test_each_refresh_shows_counts_bar_running_progress_and_latest_failures_until_nothing_is_live(roots):
    study, dirs = planned_with_directories(SIX_CELLS)
    (dirs[0] / cells.ROWS_FILE).write_bytes(b"")
    _running(dirs[1], phase="training", epochs_done=2, epochs=5)
    _running(dirs[2], phase="evaluating", condition="linf", conditions_done=1, conditions=3)
    cells.write_state(dirs[3], "failed", reason="NonFiniteLossError: the loss is not finite\nmore detail")

    def workers_finish(refreshes: int) -> None:
        for cell_dir in dirs[1:3]:
            (cell_dir / cells.ROWS_FILE).write_bytes(b"")

    clock, out = Clock(workers_finish), Terminal()
    assert watch(study, 30, out, clock, clock.sleep, width=200) == 0
    first, last = out.frames()
    assert max(len(line) for line in out.getvalue().splitlines()) <= 200  # a line never wraps
    assert clock.slept == [30]  # one wait between the two refreshes, none after the last
    assert "done 1, running 2, failed 1, pending 2" in first and "1/6 done (16.7%)" in first
    assert "ETA" in first
    slugs = {d.name: c.slug for d, c in zip(dirs, study.cells)}
    assert f"{slugs[dirs[1].name]}  epoch 3/5, beat 0 s ago" in first  # the epoch under way
    assert f"{slugs[dirs[2].name]}  evaluating linf (2/3)" in first
    assert f"{slugs[dirs[3].name]}: NonFiniteLossError: the loss is not finite" in first
    assert "more detail" not in first  # a reason's first line only
    assert "done 3, failed 1, pending 2" in last and "3/6 done" in last and "running (" not in last


def test_a_local_worker_whose_process_is_gone_shows_failed_at_the_first_refresh(roots):
    study, dirs = planned_with_directories(SIX_CELLS)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    cells.write_state(dirs[0], "running", **LOCAL, host=HOST, pid=int(gone.stdout))  # kill -9: no word written
    cells.write_progress(dirs[0], phase="training", epochs=5)  # a fresh heartbeat: no waiting for it to go stale
    clock, out = Clock(), Terminal()
    assert watch(study, 30, out, clock, clock.sleep, width=200) == 0  # nothing live: one refresh, no wait
    (only,) = out.frames()
    assert clock.slept == []
    assert "failed 1, pending 5" in only and f"{study.cells[0].slug}: the worker on {HOST}" in only
    assert "its process is gone" in only


def test_the_eta_spreads_the_cost_model_seconds_left_over_the_running_cells(roots):
    study, dirs = planned_with_directories(SIX_CELLS)
    (dirs[0] / cells.ROWS_FILE).write_bytes(b"")
    states = {c.id: {"state": "pending"} for c in study.cells}
    states[study.cells[0].id] = {"state": "done"}
    for cell in study.cells[1:3]:
        states[cell.id] = {"state": "running"}
    hour = Estimate({c.id: 3600.0 for c in study.cells}, "GPU-hours, test")
    now = time.mktime((2030, 1, 7, 9, 0, 0, 0, 0, -1))  # a Monday, 09:00 local time
    lines = frame(study, states, hour, now, 10)
    # 5 cells not done x 1 h, 2 at a time: 2.5 h, so about 11:30.
    assert "  ETA 2.5 h (about Mon 11:30) at 2 cells at a time: 5.0 GPU-hours, test for the 5 cells not done" in lines


def test_a_refresh_of_the_1440_cell_study_reads_cell_files_asks_the_launcher_once_and_takes_under_a_second(
        roots, monkeypatch):
    study = plan(["study=paper"])
    assert len(study.cells) == 1440
    live = []
    for i, cell in enumerate(study.cells):
        cell_dir = cell.directory(study.dir)
        cell_dir.mkdir(parents=True)
        if i % 2 == 0:
            (cell_dir / cells.ROWS_FILE).write_bytes(b"")
        elif i % 45 == 1:
            _running(cell_dir, phase="training", epochs_done=1, epochs=10)
            live.append(cell_dir)
        elif i % 15 == 3:
            cells.write_state(cell_dir, "failed", reason="CUDA out of memory")
    asked = []
    job_states = LocalLauncher.job_states.__func__
    monkeypatch.setattr(LocalLauncher, "job_states",
                        classmethod(lambda cls, records: asked.append(len(records)) or job_states(cls, records)))
    ticks = [time.perf_counter()]

    def next_refresh(refreshes: int) -> None:
        ticks.append(time.perf_counter())
        if refreshes == 3:
            for cell_dir in live:
                (cell_dir / cells.ROWS_FILE).write_bytes(b"")

    clock, out = Clock(next_refresh), Terminal()
    assert watch(study, 10, out, clock, clock.sleep) == 0
    refresh_seconds = [b - a for a, b in zip(ticks, ticks[1:])]
    assert len(out.frames()) == 4 and asked == [len(live)] * 3  # the last has no live cell to ask about
    assert max(refresh_seconds) < 1.0, refresh_seconds
    assert f"running ({len(live)}):" in out.frames()[0]
