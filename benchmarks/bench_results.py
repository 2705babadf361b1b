"""Result tables on the published 1,440-cell study: import, collect, load and query times.

Goals: a query over the 7,200 measurements answers in under 100 ms warm, a collect of the 1,440
cells takes under 5 s, loading the study into pandas under 1 s. The machine's load average is
printed too: the cores may be shared.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmark import results, tables
from benchmark.collect import MANIFEST_FILE, collect
from benchmark.paths import PROJECT_DIR
from benchmark.query import query
from benchmark.reference import import_reference

REFERENCE = PROJECT_DIR.parent / "shared" / "reference" / "results_dataset.csv"
STUDY = "paper-published"
SQL = "SELECT model, protocol, condition, avg(accuracy) AS mean FROM measurements GROUP BY ALL ORDER BY ALL"


def seconds(work: Callable[[], object], repeat: int = 1, clock: Callable[[], float] = time.perf_counter) -> float:
    """The median time of `repeat` runs of `work`: wall time, or this process' CPU time."""
    times = []
    for _ in range(repeat):
        start = clock()
        work()
        times.append(clock() - start)
    return statistics.median(times)


def fresh_process_seconds(code: str, root: Path) -> float:
    """Wall time of a new interpreter running `code` (imports included), as a user's script."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_DIR), "RFTBENCH_RESULTS": str(root)}
    return seconds(lambda: subprocess.run([sys.executable, "-c", code], check=True, env=env, stdout=subprocess.DEVNULL))


def main() -> None:
    if not REFERENCE.exists():
        print(f"skipped=the published table is absent ({REFERENCE.name} beside the project in shared/reference)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        study = root / STUDY
        print(f"import_seconds={seconds(lambda: import_reference(REFERENCE, STUDY, root)):.2f}", flush=True)
        print(f"collect_unchanged_seconds={seconds(lambda: collect(study), repeat=3):.3f}")
        print(f"load_seconds={seconds(lambda: tables.load(STUDY, root), repeat=5):.3f}")
        load = f"from benchmark import tables; tables.load({STUDY!r})"
        print(f"load_fresh_process_seconds={fresh_process_seconds(load, root):.2f}")
        cli = f"from benchmark.cli import main; main(['query', {SQL!r}, 'study={STUDY}'])"
        print(f"query_fresh_process_seconds={fresh_process_seconds(cli, root):.2f}")

        def full_collect() -> None:
            for name in (results.MEASUREMENTS_FILE, results.CELLS_FILE, MANIFEST_FILE):
                (study / name).unlink()
            collect(study)

        print(f"collect_1440_cells_cpu_seconds={seconds(full_collect, repeat=3, clock=time.process_time):.2f}")
        print(f"collect_1440_cells_seconds={seconds(full_collect, repeat=3):.2f}", flush=True)
        query(SQL, STUDY, root)  # warm: files cached, DuckDB started
        print(f"load_average_1min={os.getloadavg()[0]:.1f}")
        print(f"query_warm_ms={1000 * seconds(lambda: query(SQL, STUDY, root), repeat=20):.1f}")
