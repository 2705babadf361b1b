"""cell_overhead_share: the share of a demo cell's wall time spent outside training and
evaluation compute, on the demo's cheapest cell (digits x test_resnet.demo x classic_at x fft5:
one epoch, so the harness' fixed costs weigh the most).

The cell runs as the local launcher runs it: `run_cell` in the launching process, one cell after
another (it spawns no process per cell). The demo's weights and data are made first, in
temporary roots; they are made once for all cells, so they are reported apart.

cell wall       `run_cell` in a process that has already run a cell (the local launcher's second
                and later cells). The figure is the median over WARM_RUNS such cells.
compute         training compute + evaluation compute:
  training      `Trainer.fit` minus what is not arithmetic of the experiment: checkpoint writes,
                DataLoader construction, the resume check, and fetching batches (cache lookup,
                uint8 -> float, collation). The training steps (attack, forward, backward,
                update, loss sync), the validation predictions of every epoch and the per-image
                augmentation the dataset config prescribes (colour jitter, rotation) count as
                compute: any harness running this recipe pays them. `augment` says how much.
  evaluation    the conditions' own seconds (`Measurement.seconds`: attacks, corruptions,
                predictions), not `evaluate`'s checks around them.
overhead        cell wall - compute: loading and verifying the dataset, creating the model and
                verifying its weights, the parts of `fit` above, the test tensors, state, log,
                heartbeat and result files, provenance.

The first cell of a process pays more: it decodes the dataset (kept for the next cells) and
makes the worker's lazy imports. It is timed here too, but left out of the figure. So is what a
user pays for a one-cell launch: `rftbench launch` in a fresh interpreter (interpreter, imports,
plan, input checks, then the worker), its overhead share counted coarsely from its rows
(1 - (train_seconds + eval_seconds) / wall: `fit`'s inner overhead is not visible there).
Timings are taken with one torch thread; the load average is printed (the cores may be shared).
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from benchmark import cell as cells
from benchmark import data, evaluate, models, prepare, results, train
from benchmark.run import Runtime, run_cell
from benchmark.study import plan

CELL = ["study=demo", "model=test_resnet.demo", "loss=classic_at", "protocol=fft5"]
WARM_RUNS = 3
# Parts of `fit` that are not compute (span names below).
FIT_OVERHEAD = ("checkpoint", "loader_setup", "resume")
BREAKDOWN = ("load_splits", "create_model", "fit_checkpoint", "fit_loader_setup", "fit_resume", "fit_fetch",
             "load_tensors", "evaluate_outside_conditions", "write_results", "other")


class Stopwatch:
    """Seconds spent in named spans, keyed by their nesting: "fit/fetch/augment"."""

    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()
        self.eval_compute = 0.0
        self._open: list[str] = []

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        self._open.append(name)
        key, start = "/".join(self._open), time.perf_counter()
        try:
            yield
        finally:
            self.seconds[key] += time.perf_counter() - start
            self._open.pop()

    def wrap(self, function: Callable, name: str) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.span(name):
                return function(*args, **kwargs)
        return timed


@contextmanager
def _replaced(owner: object, name: str, value: object) -> Iterator[None]:
    original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextmanager
def instrumented(watch: Stopwatch) -> Iterator[None]:
    """Time the worker's steps by wrapping the functions it calls (the code itself is unchanged)."""
    original_iter, original_augmentation = DataLoader.__iter__, data._augmentation
    original_evaluate = evaluate.evaluate

    def timed_iter(loader: DataLoader) -> Iterator[Any]:
        with watch.span("fetch"):
            batches = original_iter(loader)
        while True:
            with watch.span("fetch"):
                batch = next(batches, None)
            if batch is None:
                return
            yield batch

    def timed_augmentation(augment: dict[str, Any]) -> list[Callable]:
        steps = original_augmentation(augment)  # in one Compose: same order, same random draws
        return [watch.wrap(v2.Compose(steps), "augment")] if steps else []

    def timed_evaluate(*args: Any, **kwargs: Any) -> list[evaluate.Measurement]:
        with watch.span("evaluate"):
            measurements = original_evaluate(*args, **kwargs)
        watch.eval_compute += sum(m.seconds for m in measurements)
        return measurements

    timed = [(data, "load_splits"), (models, "create_model"), (data, "load_tensors"),
             (train.Trainer, "fit"), (results, "write_table"), (results, "write_rows")]
    with ExitStack() as stack:
        for owner, name in timed:
            stack.enter_context(_replaced(owner, name, watch.wrap(getattr(owner, name), name)))
        for name, span in (("_save", "checkpoint"), ("_loader", "loader_setup"), ("_resume", "resume")):
            stack.enter_context(_replaced(train.Trainer, name, watch.wrap(getattr(train.Trainer, name), span)))
        stack.enter_context(_replaced(DataLoader, "__iter__", timed_iter))
        stack.enter_context(_replaced(data, "_augmentation", timed_augmentation))
        stack.enter_context(_replaced(evaluate, "evaluate", timed_evaluate))
        yield


def fresh_cell_dir(planned: Any) -> Path:
    """The cell's directory as a launch leaves it before the worker starts: config only."""
    cell = planned.cells[0]
    cell_dir = cell.directory(planned.dir)
    shutil.rmtree(cell_dir, ignore_errors=True)
    cells.write_config(cell, cell_dir, planned.name)
    return cell_dir


def timed_cell(planned: Any, runtime: Runtime) -> dict[str, float]:
    """One instrumented `run_cell`: its wall time, compute and overhead parts."""
    cell_dir, watch = fresh_cell_dir(planned), Stopwatch()
    with instrumented(watch):
        start = time.perf_counter()
        run_cell(cell_dir, runtime)
        wall = time.perf_counter() - start
    s = watch.seconds
    fetch_in_fit = s["fit/fetch"] - s["fit/fetch/augment"]
    train_compute = s["fit"] - sum(s[f"fit/{name}"] for name in FIT_OVERHEAD) - fetch_in_fit
    compute = train_compute + watch.eval_compute
    parts = {
        "load_splits": s["load_splits"], "create_model": s["create_model"],
        **{f"fit_{name}": s[f"fit/{name}"] for name in FIT_OVERHEAD}, "fit_fetch": fetch_in_fit,
        "load_tensors": s["load_tensors"], "evaluate_outside_conditions": s["evaluate"] - watch.eval_compute,
        "write_results": s["write_table"] + s["write_rows"],
    }
    top_level = ("load_splits", "create_model", "fit", "load_tensors", "evaluate", "write_table", "write_rows")
    parts["other"] = wall - sum(s[name] for name in top_level)  # state, log, heartbeat, provenance, seeding
    return {"wall": wall, "train_compute": train_compute, "eval_compute": watch.eval_compute,
            "augment": s["fit/fetch/augment"], "overhead": wall - compute, **parts}


def launch_process(env: dict[str, str]) -> dict[str, float]:
    """A one-cell `rftbench launch` in a fresh interpreter, as a user runs it."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "benchmark.cli", "launch", *CELL], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    planned = plan(CELL)
    rows = results.read_rows(planned.cells[0].directory(planned.dir) / cells.ROWS_FILE).to_pandas()
    in_worker = (rows.finished_at.iloc[0] - rows.started_at.iloc[0]).total_seconds()
    return {"wall": wall, "worker": in_worker, "compute": rows.train_seconds.iloc[0] + rows.eval_seconds.sum()}


def prepare_inputs(planned: Any, runtime: Runtime) -> dict[str, float]:
    """The demo's weights and dataset, made once before any cell (as the first cell would),
    without loading the dataset: the first cell of this process decodes it as a user's would."""
    config = planned.cells[0].config
    start = time.perf_counter()
    models.make_demo_weights(config["model"], runtime.weights_root)
    made = time.perf_counter()
    prepare.prepare(config["dataset"], None, runtime.data_root)
    return {"weights": made - start, "data": time.perf_counter() - made}


def imports_seconds(env: dict[str, str]) -> float:
    """A fresh interpreter importing what `rftbench launch` with the local launcher imports."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import benchmark.cli, benchmark.sweep, launchers.local"],
                   check=True, env=env)
    return time.perf_counter() - start


def _print_run(label: str, run: dict[str, float]) -> None:
    print(f"{label}: wall={run['wall']:.2f} train_compute={run['train_compute']:.2f} "
          f"(augment {run['augment']:.2f}) eval_compute={run['eval_compute']:.2f} "
          f"overhead={run['overhead']:.3f} share={run['overhead'] / run['wall']:.4f}", flush=True)


def _print_breakdown(label: str, run: dict[str, float]) -> None:
    print(f"{label} overhead_seconds " + " ".join(f"{key}={run[key]:.3f}" for key in BREAKDOWN))


@contextmanager
def temporary_roots() -> Iterator[dict[str, str]]:
    """Fresh results, data and weights roots exported as RFTBENCH_* (restored afterwards); yields
    the environment for a fresh process, with one torch thread like this one."""
    names = [f"RFTBENCH_{kind.upper()}" for kind in ("results", "data", "weights")]
    saved = {name: os.environ.get(name) for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update({name: str(Path(tmp) / name.lower()) for name in names})
        try:
            yield {**os.environ, "OMP_NUM_THREADS": "1"}
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name)
                else:
                    os.environ[name] = value


def main() -> None:
    torch.set_num_threads(1)
    print(f"threads={torch.get_num_threads()} load_average={os.getloadavg()[0]:.2f}", flush=True)
    with temporary_roots() as env:
        planned = plan(CELL)
        runtime = Runtime.from_config(planned.config)
        made = prepare_inputs(planned, runtime)
        print(f"once per study: demo_weights_seconds={made['weights']:.1f} prepare_data_seconds={made['data']:.2f}")

        launched = launch_process(env)
        print(f"fresh process: launch_seconds={launched['wall']:.2f} worker_seconds={launched['worker']:.2f} "
              f"compute_seconds={launched['compute']:.2f}; outside the worker: interpreter and imports "
              f"(imports_seconds={imports_seconds(env):.2f} alone), plan, input checks")
        print(f"launch_overhead_share={1 - launched['compute'] / launched['wall']:.4f} "
              f"first_cell_overhead_share={1 - launched['compute'] / launched['worker']:.4f} (coarse, from rows)",
              flush=True)

        first = timed_cell(planned, runtime)
        _print_run("first cell of this process", first)
        warm = [timed_cell(planned, runtime) for _ in range(WARM_RUNS)]
        for i, run in enumerate(warm, 1):
            _print_run(f"later cell {i}", run)
    _print_breakdown("first cell", first)
    _print_breakdown("later cells (medians)", {key: statistics.median(run[key] for run in warm) for key in warm[0]})
    print(f"load_average={os.getloadavg()[0]:.2f}")
    print(f"cell_overhead_share={statistics.median(run['overhead'] / run['wall'] for run in warm):.4f}")
