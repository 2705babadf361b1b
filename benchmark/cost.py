"""The cost estimate of `rftbench plan`: how many device-hours a study's cells will take.

The model. A cell is estimated at

    seconds = train_rate * epochs * params_m + eval_rate * params_m

where train_rate (seconds per epoch per million parameters) and eval_rate (seconds per million
parameters) are the medians, over the calibration cells of the cell's (model size, protocol)
group, of each calibration cell's measured train_seconds / (epochs * params_m) and
eval_seconds / params_m. Training scales with epochs and, like an attack's forward and backward
passes, roughly with the parameter count; the size group keeps that linear scaling within one
regime. A group without calibration cells takes the rates of its protocol's calibration cells,
else those of all calibration cells, and the estimate says which cells fell back.

Calibration cells are collected cells (`cells.parquet`) that ran here and are done, in one
attempt, with their train and eval seconds: imported cells have no timings, and a resumed cell's
train seconds cover only its last attempt's epochs. They are the planned study's own when it
has any (same datasets, evaluation and, usually, machines); otherwise those of every collected
study under the results root, which is what gives a fresh study an estimate at all. The seconds
are those measured on the calibration cells' device: hours are GPU-hours only when those cells
ran on a GPU, and the estimate names the device either way.

The prior, used while there is no calibration cell at all (a study planned before anything has
run). A cell is estimated at

    GPU-seconds = F * (epochs * (train * (attack + update) + val) + test * evaluation) / R

F: the backbone's forward GFLOPs per image at the dataset's image size (`conf/model/gflops.csv`,
counted by `benchmark.flops`); train, val, test: the dataset option's `split_sizes` (test: at most
its `test_size`); R: `runtime.gpu_tflops`, the sustained rate of one GPU. The passes per image, in
forward-pass equivalents (a backward pass costs about two forwards with weight gradients, one
without): attack = 2 * steps + 1 (each step a forward and an input-gradient backward, then the
last iterate's forward); update = 3 with full fine-tuning (forward, full backward), 1 with linear
probing (the frozen backbone's forward; the head's backward is negligible); val = 1 per epoch;
evaluation = the sum of the conditions' budgets (EVAL_PASSES). A loss that also trains on the
clean batch (TRADES, MART) adds about 3 passes to the update, which the prior leaves out (it errs
low by about 10% for them with a 10-step attack).
"""
from __future__ import annotations

import csv
import functools
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.conditions import eps_grid
from benchmark.paths import CONF_DIR
from benchmark.study import Study, conf_dirs

MODEL = ("seconds = train_rate * epochs * params_m + eval_rate * params_m; rates: medians over "
         "the calibration cells of the cell's (model size, protocol), else its protocol's, else all")
NO_SIZE = "?"  # the size group of a model whose config has no `size`

PRIOR_MODEL = ("GPU-seconds = forward GFLOPs * (epochs * (train images * (attack + update passes) + val images) "
               "+ test images * evaluation passes) / runtime.gpu_tflops")
FLOPS_FILE = "gflops.csv"  # in a config directory's model/ folder: arch, image_size, gflops
FLOPS_TABLE = CONF_DIR / "model" / FLOPS_FILE  # the project's; extension config folders may add their own
# Forward-pass equivalents per test image of an evaluation condition kind. AutoAttack 'standard':
# APGD-CE's 100 steps (a forward and an input-gradient backward each) on every image, then
# APGD-T (9 targets x 100 steps), FAB-T and Square (5,000 queries) on the images still robust,
# about 9,500 passes each; with about a fifth of the images robust, 200 + 0.2 * 9,500 ~ 2,000.
EVAL_PASSES = {"clean": 1.0, "corruptions": 1.0, "autoattack": 2000.0}

Group = tuple[str | None, str | None]  # (model size, protocol); None: any
Fallbacks = Counter[tuple[Group, Group]]  # planned cells per (their group, the group whose rates they took)


@dataclass(frozen=True)
class Measured:
    """A calibration cell: its group, scale and measured seconds."""

    study: str
    model_size: str
    protocol: str
    epochs: int
    params_m: float
    train_seconds: float
    eval_seconds: float
    device: str


@dataclass(frozen=True)
class Rates:
    """A group's medians: train seconds per epoch per M params, eval seconds per M params."""

    train: float
    eval: float
    cells: int


@dataclass(frozen=True)
class Calibration:
    """The calibration cells and where they came from."""

    cells: list[Measured]
    scope: str  # "study": the planned study's own cells; "all": every collected study's
    collected_done: set[str] = field(default_factory=set)  # the planned study's collected done cells
    skipped: list[str] = field(default_factory=list)  # "<file>: <reason>", unreadable tables


def groups(size: str, protocol: str) -> list[Group]:
    """A cell's groups, the finest first: its (size, protocol), its protocol, all cells."""
    return [(size, protocol), (None, protocol), (None, None)]


def label(group: Group) -> str:
    size, protocol = group
    return f"{size}/{protocol}" if size else f"protocol {protocol}" if protocol else "all calibration cells"


def fit(measured: list[Measured]) -> dict[Group, Rates]:
    """The rates of every group that has calibration cells."""
    members: dict[Group, list[Measured]] = {}
    for m in measured:
        for group in groups(m.model_size, m.protocol):
            members.setdefault(group, []).append(m)
    return {
        group: Rates(train=statistics.median(m.train_seconds / (m.epochs * m.params_m) for m in ms),
                     eval=statistics.median(m.eval_seconds / m.params_m for m in ms), cells=len(ms))
        for group, ms in members.items()
    }


def calibrate(results_root: Path, study: str) -> Calibration:
    """The planned study's measured cells if it has any, else every collected study's."""
    studies = sorted(p for p in results_root.iterdir() if p.is_dir()) if results_root.is_dir() else []
    if not studies:
        return Calibration([], "all")
    # pyarrow (and pandas, through results) only when there may be a table to read.
    from benchmark import results

    tables = [d for d in studies if (d / results.CELLS_FILE).exists()]
    own_dir = results_root / study
    own, collected_done, skipped = _read_study(own_dir) if own_dir in tables else ([], set(), [])
    if own:
        return Calibration(own, "study", collected_done, skipped)
    cells: list[Measured] = []
    for directory in tables:
        if directory != own_dir:
            measured, _, problems = _read_study(directory)
            cells += measured
            skipped += problems
    return Calibration(cells, "all", collected_done, skipped)


def _read_study(study_dir: Path) -> tuple[list[Measured], set[str], list[str]]:
    """(measured cells, ids of all collected done cells, problems) of a study's collected tables."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from benchmark import results

    try:
        table = results.read_table(study_dir / results.CELLS_FILE, results.CELL_SCHEMA)
    except results.CorruptResultError as err:
        return [], set(), [str(err)]
    done = table.filter(pc.equal(table["state"], "done"))
    usable = done.filter(_usable(done))
    if usable.num_rows == 0:
        return [], set(done["cell_id"].to_pylist()), []
    try:
        rows = pq.ParquetFile(study_dir / results.MEASUREMENTS_FILE).read(columns=["cell_id", "device"])
        devices, problems = dict(zip(rows["cell_id"].to_pylist(), rows["device"].to_pylist())), []
    except (OSError, pa.ArrowException) as err:
        devices, problems = {}, [f"{study_dir / results.MEASUREMENTS_FILE}: unreadable ({err}): devices unknown"]
    columns = ["study", "cell_id", "model_size", "protocol", "epochs", "params_m", "train_seconds", "eval_seconds"]
    measured = [
        Measured(row["study"], row["model_size"] or NO_SIZE, row["protocol"], row["epochs"], row["params_m"],
                 row["train_seconds"], row["eval_seconds"], devices.get(row["cell_id"]) or "unknown")
        for row in usable.select(columns).to_pylist()
    ]
    return measured, set(done["cell_id"].to_pylist()), problems


def _usable(cells: Any) -> Any:
    """Cells run here in one attempt, with what the model needs: epochs and params_m > 0, train
    and eval seconds >= 0."""
    import pyarrow.compute as pc

    checks = [pc.equal(cells["source"], "run"), pc.less_equal(cells["attempts"], 1),
              pc.greater(cells["epochs"], 0), pc.greater(cells["params_m"], 0),
              pc.greater_equal(cells["train_seconds"], 0), pc.greater_equal(cells["eval_seconds"], 0)]
    return pc.fill_null(functools.reduce(pc.and_kleene, checks), False)


def estimate(study: Study, states: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The `estimate` object of `rftbench plan --format json`: hours for all the study's cells
    and for those not done, and what the figures rest on. Hours are None without calibration."""
    calibration = calibrate(study.dir.parent, study.name)
    left = [c for c in study.cells if states[c.id]["state"] != "done"]
    uncollected = sum(states[c.id]["state"] == "done" and c.id not in calibration.collected_done for c in study.cells)
    devices = Counter(m.device for m in calibration.cells)
    out: dict[str, Any] = {
        "kind": "estimate",
        "basis": "measured",
        "model": MODEL,
        "unit": _unit(devices),
        "cells": len(study.cells),
        "cells_not_done": len(left),
        "hours": None,
        "hours_not_done": None,
        "cells_unestimated": [],
        "groups": [],
        "fallbacks": [],
        "message": None,
        "prior": None,
        "calibration": {
            "cells": len(calibration.cells),
            "scope": calibration.scope,
            "studies": dict(Counter(m.study for m in calibration.cells)),
            "devices": dict(devices),
            "uncollected_done_cells": uncollected,
            "skipped": calibration.skipped,
        },
    }
    if not calibration.cells:
        return _prior_estimate(study, left, out)
    rates = fit(calibration.cells)
    seconds, fell_back, unestimated = _seconds(study, rates)
    return {
        **out,
        "hours": sum(seconds.values()) / 3600,
        "hours_not_done": sum(seconds.get(c.id, 0.0) for c in left) / 3600,
        "cells_unestimated": unestimated,
        "groups": [{"group": label((size, protocol)), "model_size": size, "protocol": protocol, "cells": r.cells,
                    "train_seconds_per_epoch_per_mparam": r.train, "eval_seconds_per_mparam": r.eval}
                   for (size, protocol), r in rates.items()],
        "fallbacks": [{"model_size": size, "protocol": protocol, "cells": n, "rates_of": label(used)}
                      for ((size, protocol), used), n in fell_back.items()],
    }


def cell_seconds(study: Study) -> tuple[dict[str, float], str]:
    """Each estimable cell's seconds by id under `estimate`'s model (measured rates, else the
    prior), and what they rest on in a few words: `status --watch` reads the calibration once
    and then only cell files."""
    calibration = calibrate(study.dir.parent, study.name)
    if not calibration.cells:
        tflops = float(study.config["runtime"]["gpu_tflops"])
        return prior_seconds(study.cells, tflops)[0], f"GPU-hours, prior at {tflops:g} TFLOP/s sustained"
    unit = _unit(Counter(m.device for m in calibration.cells))
    return _seconds(study, fit(calibration.cells))[0], f"{unit}, calibrated on {len(calibration.cells)} measured cells"


def _prior_estimate(study: Study, left: list[Any], out: dict[str, Any]) -> dict[str, Any]:
    """The estimate without calibration cells: the prior (module docstring) at runtime.gpu_tflops."""
    tflops = float(study.config["runtime"]["gpu_tflops"])
    seconds, unestimated = prior_seconds(study.cells, tflops)
    where = (f"no measured cells to calibrate on under {study.dir.parent}/ (run and collect some cells "
             "for a measured estimate; imported cells have no timings)")
    return {
        **out, "basis": "prior", "model": PRIOR_MODEL, "unit": "GPU-hours",
        "hours": sum(seconds.values()) / 3600 if seconds else None,
        "hours_not_done": sum(seconds.get(c.id, 0.0) for c in left) / 3600 if seconds else None,
        "cells_unestimated": unestimated,
        "prior": {"gpu_tflops": tflops, "flops_tables": [str(path) for path in _flops_tables()]},
        "message": f"prior: {where}" if seconds else f"none: {where}, and no cell has FLOPs and split sizes",
    }


def prior_seconds(cells: list[Any], gpu_tflops: float) -> tuple[dict[str, float], list[str]]:
    """Each cell's prior GPU-seconds by id, and the ids of cells the prior cannot estimate (no
    FLOPs for their backbone at their image size, or a dataset without `split_sizes`)."""
    table = flops_table()
    per_point: dict[tuple[Any, ...], float | None] = {}
    seconds: dict[str, float] = {}
    unestimated = []
    for cell in cells:
        # The prior depends on the axis options and the evaluation only: computed once per point.
        key = (*cell.axes.values(), cell.config["protocol"]["epochs"], id(cell.config["eval"]))
        if key not in per_point:
            per_point[key] = cell_gflops(cell.config, table)
        gflops = per_point[key]
        if gflops is None:
            unestimated.append(cell.id)
        else:
            seconds[cell.id] = gflops / (gpu_tflops * 1e3)
    return seconds, unestimated


def cell_gflops(config: dict[str, Any], table: dict[tuple[str, int], float]) -> float | None:
    """A cell's GFLOPs under the prior's model, None without the FLOPs or split sizes it needs."""
    dataset, protocol = config["dataset"], config["protocol"]
    forward = table.get((config["model"]["arch"], dataset["image_size"]))
    sizes = dataset.get("split_sizes")
    if forward is None or not sizes:
        return None
    tested = min(sizes["test_pool"], dataset["test_size"])
    evaluation = sum(eval_passes(spec) for spec in config["eval"].values())
    per_epoch = sizes["train"] * train_passes(config["loss"], protocol) + sizes["val"]
    return forward * (protocol["epochs"] * per_epoch + tested * evaluation)


def train_passes(loss_cfg: dict[str, Any], protocol: dict[str, Any]) -> float:
    """Forward-pass equivalents per training image of one adversarial step: the attack's
    2 * steps + 1, then the update's 3 (full fine-tuning) or 1 (linear probing)."""
    return 2 * loss_cfg["attack"]["steps"] + 1 + (3 if protocol["train_backbone"] else 1)


def eval_passes(spec: dict[str, Any]) -> float:
    """Forward-pass equivalents per test image of a condition (EVAL_PASSES; expected robustness:
    an APGD run of n_iter steps and restarts at each budget of its grid but 0; a kind without a
    known budget counts as one forward pass)."""
    if spec["kind"] == "expected":
        return 1 + (len(eps_grid(spec)) - 1) * spec["n_restarts"] * (2 * spec["n_iter"] + 1)
    return EVAL_PASSES.get(spec["kind"], 1.0)


def _flops_tables() -> list[Path]:
    return [path for path in (d / "model" / FLOPS_FILE for d in conf_dirs()) if path.is_file()]


@functools.cache
def _read_flops_table(path: Path) -> dict[tuple[str, int], float]:
    with path.open(newline="") as rows:
        return {(row["arch"], int(row["image_size"])): float(row["gflops"]) for row in csv.DictReader(rows)}


def flops_table() -> dict[tuple[str, int], float]:
    """(arch, image size) -> forward GFLOPs per image, from every config directory's table (the
    first directory that has an entry wins, as for options)."""
    table: dict[tuple[str, int], float] = {}
    for path in reversed(_flops_tables()):
        table |= _read_flops_table(path)
    return table


def _seconds(study: Study, rates: dict[Group, Rates]) -> tuple[dict[str, float], Fallbacks, list[str]]:
    """Each estimable cell's seconds by id, the fallbacks, and the ids of the cells whose config
    has no params_m or epochs."""
    seconds: dict[str, float] = {}
    fell_back: Fallbacks = Counter()
    unestimated = []
    for cell in study.cells:
        model, epochs = cell.config["model"], cell.config["protocol"].get("epochs")
        params = model.get("params_m")
        if not params or not epochs:
            unestimated.append(cell.id)
            continue
        own, *coarser = groups(model.get("size") or NO_SIZE, cell.protocol)
        used = next(group for group in (own, *coarser) if group in rates)
        if used != own:
            fell_back[own, used] += 1
        seconds[cell.id] = (rates[used].train * epochs + rates[used].eval) * params
    return seconds, fell_back, unestimated


def _unit(devices: Counter[str]) -> str:
    """GPU-hours when every calibration cell ran on a GPU, else hours on the devices they ran on."""
    if devices and all(device.startswith("cuda") for device in devices):
        return "GPU-hours"
    return f"hours on {'/'.join(sorted(devices))}" if devices else "hours"


def describe(estimate: dict[str, Any]) -> list[str]:
    """The estimate in a few lines of text, for `rftbench plan`."""
    calibration = estimate["calibration"]
    lines = []
    if estimate["hours"] is None:
        lines.append(f"cost estimate: {estimate['message']}")
    elif estimate["basis"] == "prior":
        lines += _describe_prior(estimate)
    else:
        unit = estimate["unit"]
        lines.append(f"cost estimate: {_hours(estimate['hours_not_done'])} {unit} for the "
                     f"{estimate['cells_not_done']} cells not done, {_hours(estimate['hours'])} for all "
                     f"{estimate['cells']}" + ("" if unit == "GPU-hours" else " (NOT GPU-hours)"))
        where = ("this study" if calibration["scope"] == "study"
                 else f"the collected studies {_counts(calibration['studies'])} (this study has none collected)")
        lines.append(f"  calibrated on {calibration['cells']} measured cells of {where}, "
                     f"run on {_counts(calibration['devices'])}")
        lines.append("  model: per (model size, protocol), median train seconds per epoch per M params and eval "
                     "seconds per M params, times each cell's epochs and params_m")
        if estimate["fallbacks"]:
            lines.append("  fallback (no calibration cell of their group): " + _fallbacks(estimate["fallbacks"]))
        if estimate["cells_unestimated"]:
            lines.append(f"  {len(estimate['cells_unestimated'])} cells not estimated: their config has no "
                         "model.params_m or protocol.epochs")
    if calibration["uncollected_done_cells"]:
        lines.append(f"  {calibration['uncollected_done_cells']} done cells of this study are not collected yet "
                     "(`rftbench collect` adds them to the calibration)")
    lines += [f"  skipped {problem}" for problem in calibration["skipped"]]
    return lines


def _describe_prior(estimate: dict[str, Any]) -> list[str]:
    tflops = estimate["prior"]["gpu_tflops"]
    lines = [f"cost estimate: ≈ {_hours(estimate['hours_not_done'])} GPU-hours at {tflops:g} TFLOP/s sustained "
             f"for the {estimate['cells_not_done']} cells not done, {_hours(estimate['hours'])} for all "
             f"{estimate['cells']}",
             f"  {estimate['message']}",
             "  prior: forward FLOPs per image (conf/model/gflops.csv) x the datasets' split_sizes x epochs x passes "
             "per image (attack, update, evaluation budgets) / runtime.gpu_tflops (scripts/gpu-check.sh measures it)"]
    if estimate["cells_unestimated"]:
        lines.append(f"  {len(estimate['cells_unestimated'])} cells not estimated: no FLOPs for their backbone at "
                     "their image size (python -m benchmark.flops) or no dataset split_sizes")
    return lines


def _fallbacks(fallbacks: list[dict[str, Any]]) -> str:
    """E.g. 'rates of protocol fft5 for large/fft5 (216), medium/fft5 (180); rates of ...'."""
    by_used: dict[str, list[str]] = {}
    for f in fallbacks:
        by_used.setdefault(f["rates_of"], []).append(f"{f['model_size']}/{f['protocol']} ({f['cells']})")
    return "; ".join(f"rates of {used} for {', '.join(cells)}" for used, cells in by_used.items())


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} ({n})" for name, n in sorted(counts.items()))


def _hours(hours: float) -> str:
    return f"{hours:,.0f}" if hours >= 100 else f"{hours:.3g}"
