"""Planning and status: the real planner on the paper study, on every option, and on 100,800 cells.

plan_ratio         plan() of the 1,440-cell paper study ÷ Hydra composing the same grid (one
                   compose per cell, as a multirun does); Hydra composes an evenly spaced sample
                   of cells and its total is extrapolated linearly. Goal ≤ 0.1, and plan < 1 s.
plan_status_all_options_seconds  plan + status of the grid of every option of every axis.
plan_100k_seconds  plan + status (every cell's state read and summarised) of the paper study
                   swept over 70 seeds (`seed='range(70)'`, 100,800 cells) with its 1,440 seed-0
                   cells done; printed beside the same on a fresh study (no cell directory yet).
                   Goal < 10 s.
plan() runs from a cold option cache each time, as a fresh `rftbench plan` would. Timings are
medians of interleaved repeats (the cores may be shared); the load average is printed.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra import compose, initialize_config_dir

from benchmark import study as study_module
from benchmark.cell import AXES, ROWS_FILE, write_config
from benchmark.paths import CONF_DIR
from benchmark.sweep import cell_states, summary
from benchmarks.bench_core import interleaved_medians

PAPER = ["study=paper"]
EVERY_OPTION = [*PAPER, *(f"{axis}=glob(*)" for axis in AXES)]
SEEDS_70 = [*PAPER, "seed=range(70)"]
HYDRA_SAMPLE = 48
REPEAT = 3


def plan(overrides: list[str]) -> study_module.Study:
    """plan() from a cold option cache."""
    study_module.load_option.cache_clear()
    return study_module.plan(overrides)


def plan_and_status(overrides: list[str]) -> int:
    """plan + status of the study of `overrides`; its number of cells."""
    planned = plan(overrides)
    summary(planned, cell_states(planned))
    return len(planned.cells)


def hydra_sample(grid: list[tuple[str, ...]]) -> list[list[str]]:
    """The overrides of HYDRA_SAMPLE evenly spaced cells of `grid`."""
    sample = grid[::max(len(grid) // HYDRA_SAMPLE, 1)][:HYDRA_SAMPLE]
    return [[*PAPER, *(f"{axis}={name}" for axis, name in zip(AXES, combo))] for combo in sample]


def hydra_compose(cells: list[list[str]]) -> None:
    """Hydra initialised once, then composing each cell, as a multirun does."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for overrides in cells:
            compose(config_name="config", overrides=overrides)


def start_seed_zero(results_root: Path) -> None:
    """The paper study's 1,440 seed-0 cells as done cells (config + rows file) under `results_root`."""
    paper = plan(PAPER)
    study_dir = results_root / paper.name
    for cell in paper.cells:
        write_config(cell, cell.directory(study_dir), paper.name)
        (cell.directory(study_dir) / ROWS_FILE).write_bytes(b"")


@contextmanager
def results_root(root: str) -> Iterator[None]:
    """$RFTBENCH_RESULTS set to `root` (the study's results are read from there), then restored."""
    before = os.environ.get("RFTBENCH_RESULTS")
    os.environ["RFTBENCH_RESULTS"] = root
    try:
        yield
    finally:
        if before is None:
            del os.environ["RFTBENCH_RESULTS"]
        else:
            os.environ["RFTBENCH_RESULTS"] = before


def plan_and_status_in(root: str, overrides: list[str]) -> Callable[[], int]:
    def work() -> int:
        with results_root(root):
            return plan_and_status(overrides)
    return work


def main() -> None:
    print(f"load_average={os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as fresh, tempfile.TemporaryDirectory() as started:
        paper = plan(PAPER)
        composes = hydra_sample([tuple(c.axes[axis] for axis in AXES) for c in paper.cells])
        medians = interleaved_medians({
            "plan": lambda: plan(PAPER),
            "hydra": lambda: hydra_compose(composes),
            "hydra_init": lambda: hydra_compose([]),
        }, repeat=REPEAT)
        per_cell = (medians["hydra"] - medians["hydra_init"]) / len(composes)
        hydra_s = medians["hydra_init"] + per_cell * len(paper.cells)
        print(f"plan_seconds={medians['plan']:.3f} cells={len(paper.cells)}")
        print(f"hydra_compose_seconds={hydra_s:.1f} (extrapolated from {len(composes)} composed cells)")
        print(f"plan_ratio={medians['plan'] / hydra_s:.4f}", flush=True)

        start_seed_zero(Path(started))
        works = {"every": plan_and_status_in(fresh, EVERY_OPTION), "fresh": plan_and_status_in(fresh, SEEDS_70),
                 "started": plan_and_status_in(started, SEEDS_70)}
        cells = {name: work() for name, work in works.items()}
        big = interleaved_medians(works, repeat=3)
    print(f"plan_status_all_options_seconds={big['every']:.2f} cells={cells['every']}")
    print(f"plan_100k_fresh_seconds={big['fresh']:.2f} cells={cells['fresh']} (no cell directory yet)")
    print(f"plan_100k: {cells['started']} cells, the {len(paper.cells)} of seed 0 done, the others pending "
          f"without a directory; load_average={os.getloadavg()[0]:.2f}")
    print(f"plan_100k_seconds={big['started']:.2f}", flush=True)
