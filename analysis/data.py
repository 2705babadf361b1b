"""A study's long table made ready for analysis: one accuracy per cell x condition (the mean over
seeds), joined with each model's registry metadata and each dataset's chance level.

Metadata comes from the config registry (conf/model, conf/dataset), never from the result table,
so imported and own results are described by the same source of truth.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from benchmark import results
from benchmark.errors import RFTBenchError, closest_first
from benchmark.study import load_option, options

CONDITIONS = ("clean", "linf", "l2", "l1", "common")
CONDITION_LABELS = {"clean": "clean", "linf": "L∞", "l2": "L2", "l1": "L1", "common": "common",
                    "expected_linf": "expected L∞"}
PROTOCOLS = ("fft50", "fft5", "lp50")
# The factors whose effect on the Borda score the study reports (loss is an axis, the rest metadata).
FACTORS = ("size", "type", "loss", "pretraining")
LEVEL_ORDER = {
    "size": ("small", "medium", "large"),
    "type": ("convolutional", "attention", "hybrid"),
    "loss": ("classic_at", "trades"),
}
CELL = ("protocol", "dataset", "model", "loss")
CONFIGURATION = ("model", "loss")
REQUIRED = (*CELL, "condition", "accuracy")


class Skip(Exception):
    """An output this study lacks the axes or levels for; the message names what is missing."""


class AnalysisWarning(UserWarning):
    """Something a reader of the results must know: excluded configurations, untested factors."""


def ordered(values: Iterable[str], preferred: Iterable[str] = ()) -> list[str]:
    """The distinct `values`, those in `preferred` first in its order, then the rest sorted."""
    present = set(values)
    first = [v for v in preferred if v in present]
    return first + sorted(present - set(first))


def condition_label(condition: str) -> str:
    return CONDITION_LABELS.get(condition, condition)


def conditions(cells: pd.DataFrame) -> list[str]:
    return ordered(cells["condition"], CONDITIONS)


def protocols(cells: pd.DataFrame) -> list[str]:
    return ordered(cells["protocol"], PROTOCOLS)


def levels(frame: pd.DataFrame, factor: str) -> list[str]:
    return ordered(frame[factor].dropna(), LEVEL_ORDER.get(factor, ()))


def load(study: str, results_root: str | Path | None = None) -> pd.DataFrame:
    """The study's prepared cells (see `prepare`), read from its result table (`results_root`
    None: `$RFTBENCH_RESULTS`, else `results/`)."""
    return prepare(results.load(study, results_root=Path(results_root) if results_root else None))


def prepare(long: pd.DataFrame) -> pd.DataFrame:
    """One row per cell x condition: accuracy averaged over seeds, model metadata, chance level."""
    missing = [c for c in REQUIRED if c not in long.columns]
    if missing:
        raise RFTBenchError(f"the result table lacks the columns {missing}; it has {list(long.columns)}")
    if long.empty:
        raise RFTBenchError("the result table has no rows: nothing to analyse")
    keys = [*CELL, "condition"]
    grouped = long.groupby(keys, sort=False, observed=True)
    cells = grouped["accuracy"].agg(accuracy="mean", n_seeds="size").reset_index()
    if (cells["n_seeds"] > 1).any():
        warnings.warn(AnalysisWarning(
            f"{int((cells['n_seeds'] > 1).sum())} cell x condition measurements have several "
            "rows (seeds or repeats); their accuracies are averaged"), stacklevel=2)
    cells = cells.merge(model_metadata(cells["model"].unique()), left_on="model", right_index=True)
    cells["chance"] = cells["dataset"].map(chance_levels(cells["dataset"].unique()))
    return cells


def model_metadata(models: Iterable[str]) -> pd.DataFrame:
    """Size class, type, parameter count and pretraining of each model, from conf/model/*.yaml."""
    models = list(models)
    known = set(options("model"))
    unknown = sorted(set(models) - known)
    if unknown:
        raise RFTBenchError(
            f"the result table names models without a config in conf/model: {', '.join(unknown)}; "
            f"closest registered names for {unknown[0]!r}: {', '.join(closest_first(unknown[0], known)[:5])}"
        )
    rows = {name: _metadata(load_option("model", name)) for name in models}
    return pd.DataFrame.from_dict(rows, orient="index")


def _metadata(option: dict) -> dict:
    pretraining = option.get("pretraining") or {}
    return {
        "size": option.get("size"),
        "type": option.get("type"),
        "params_m": option.get("params_m"),
        "pretraining": pretraining.get("strategy"),
        "pretraining_data": pretraining.get("data"),
    }


def chance_levels(datasets: Iterable[str]) -> pd.Series:
    """1 / num_classes of each dataset (the accuracy of guessing), from conf/dataset/*.yaml."""
    return pd.Series({name: 1.0 / load_option("dataset", name)["num_classes"] for name in datasets})
