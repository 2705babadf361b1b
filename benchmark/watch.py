"""`rftbench status --watch [SECONDS]`: a study's live view, redrawn at each refresh until no cell
is queued or running.

A refresh shows the counts per state, a bar of the cells done, an ETA, the running cells with
where their worker is (the progress it writes into its heartbeat file: its epoch, or the
evaluation condition it measures) and the latest failures with their reason (`rftbench status`
lists every failed cell with its log).

A refresh reads only cell files (state, rows' existence, heartbeat) and asks each launcher kind
once about its active cells (benchmark.sweep.cell_states): a cell whose local worker is gone, or
whose job ended, shows failed at that very refresh. The ETA rests on `plan`'s cost model
(benchmark.cost), read once when the watch starts: the estimated seconds of the cells not done
(running ones counted whole), spread over as many workers as cells run now.
"""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from benchmark import cell as cells
from benchmark.study import Study

CLEAR = "\033[2J\033[H"  # clear the screen, cursor home: each refresh replaces the last
RUNNING_ROWS = 12  # running cells listed; the rest are counted
FAILED_ROWS = 5  # latest failures listed
BAR_WIDTH = 40
STATE_ORDER = ("done", "running", "queued", "failed", "pending")


@dataclass(frozen=True)
class Estimate:
    """The cost model's seconds per cell (benchmark.cost.cell_seconds) and what they rest on."""

    seconds: dict[str, float]
    basis: str


def watch(study: Study, interval: float, out: TextIO, clock: Callable[[], float] = time.time,
          sleep: Callable[[float], None] = time.sleep, width: int | None = None) -> int:
    """Redraw the study's view on `out` every `interval` seconds (by `sleep`, with the time of
    `clock`), its lines cut to `width` characters (None: not cut), until none of its cells is
    queued or running; 0 (as `status`). On a terminal each refresh clears the screen first."""
    from benchmark.cost import cell_seconds
    from benchmark.sweep import LIVE, cell_states

    estimate = Estimate(*cell_seconds(study))
    while True:
        states = cell_states(study)
        lines = frame(study, states, estimate, clock(), interval)
        out.write((CLEAR if out.isatty() else "") + "\n".join(_fit(line, width) for line in lines) + "\n")
        out.flush()
        if not any(r["state"] in LIVE for r in states.values()):
            return 0
        sleep(interval)


def frame(study: Study, states: dict[str, dict[str, Any]], estimate: Estimate, now: float,
          interval: float) -> list[str]:
    """The lines of one refresh (see the module's docstring)."""
    counts = Counter(r["state"] for r in states.values())
    running = [c for c in study.cells if states[c.id]["state"] == "running"]
    failed = sorted((c for c in study.cells if states[c.id]["state"] == "failed"),
                    key=lambda c: states[c.id].get("time", 0.0), reverse=True)
    lines = [f"study {study.name}: {len(study.cells)} cells in {study.dir}  "
             f"({time.strftime('%H:%M:%S', time.localtime(now))}, every {interval:g} s)",
             "  " + bar(counts["done"], len(study.cells)),
             "  " + ", ".join(f"{state} {counts[state]}" for state in _ordered(counts))]
    lines += _eta(study, states, estimate, now, len(running))
    if running:
        lines.append(f"running ({len(running)}):")
        lines += [f"  {c.slug}  {_where(study, c, now)}" for c in running[:RUNNING_ROWS]]
        if len(running) > RUNNING_ROWS:
            lines.append(f"  ... {len(running) - RUNNING_ROWS} more")
    if failed:
        lines.append(f"latest failures ({len(failed)} failed; `rftbench status study={study.name}` shows their logs):")
        lines += [f"  {_clock(states[c.id].get('time'))} {c.slug}: {_first_line(states[c.id].get('reason'))}"
                  for c in failed[:FAILED_ROWS]]
    return lines


def bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """E.g. `[##########..............................] 312/1440 done (21.7%)`."""
    share = done / total if total else 1.0
    filled = round(share * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} done ({share:.1%})"


def progress_text(progress: dict[str, Any]) -> str:
    """Where a worker is, from what it wrote in its heartbeat (benchmark.cell.write_progress)."""
    if progress.get("phase") == "training":
        epochs = progress.get("epochs", "?")
        if "epochs_done" not in progress:
            return f"training ({epochs} epochs)"
        return f"epoch {min(progress['epochs_done'] + 1, epochs)}/{epochs}"
    if progress.get("phase") == "evaluating":
        return f"evaluating {progress['condition']} ({progress['conditions_done'] + 1}/{progress['conditions']})"
    return "starting"


def _where(study: Study, cell: cells.Cell, now: float) -> str:
    cell_dir = cell.directory(study.dir)
    try:
        beat = f", beat {now - (cell_dir / cells.HEARTBEAT_FILE).stat().st_mtime:.0f} s ago"
    except FileNotFoundError:
        beat = ""
    return progress_text(cells.read_progress(cell_dir)) + beat


def _eta(study: Study, states: dict[str, dict[str, Any]], estimate: Estimate, now: float, running: int) -> list[str]:
    left = [c.id for c in study.cells if states[c.id]["state"] != "done"]
    if not left:
        return []
    seconds = sum(estimate.seconds.get(cell_id, 0.0) for cell_id in left)
    unestimated = sum(cell_id not in estimate.seconds for cell_id in left)
    if not seconds:
        return [f"  ETA: unknown (the cost model estimates none of the {len(left)} cells not done)"]
    workers = max(running, 1)
    wall = seconds / workers
    finish = time.strftime("%a %H:%M", time.localtime(now + wall))
    return [f"  ETA {duration(wall)} (about {finish}) at {workers} cell{'s' * (workers > 1)} at a time: "
            f"{seconds / 3600:,.1f} {estimate.basis} for the {len(left)} cells not done"
            + (f" ({unestimated} not estimated)" if unestimated else "")]


def duration(seconds: float) -> str:
    """E.g. `45 s`, `12 min`, `3.4 h`, `2 d 5 h`."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86_400:
        return f"{seconds / 3600:.1f} h"
    days, hours = divmod(round(seconds / 3600), 24)
    return f"{days} d {hours} h"


def _ordered(counts: Counter[str]) -> list[str]:
    return [s for s in STATE_ORDER if counts[s]] + sorted(s for s in counts if s not in STATE_ORDER)


def _clock(timestamp: float | None) -> str:
    return time.strftime("%m-%d %H:%M", time.localtime(timestamp)) if timestamp else "--"


def _first_line(reason: str | None) -> str:
    return (reason or "no reason recorded").strip().splitlines()[0]


def _fit(line: str, width: int | None) -> str:
    """`line` cut to the terminal's width (None: as it is), so a refresh never wraps."""
    return line if width is None or len(line) <= width else line[:width - 1] + "…"
