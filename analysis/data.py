"""A study's long table made ready for analysis: one accuracy per cell x condition (the mean over
seeds), joined with each model's registry metadata and each dataset's chance level.

Metadata comes from the config registry (conf/model, conf/dataset), never from the result table,
so imported and own results are described by the same source of truth. Which losses, protocols
and conditions a study has is learned from its table: the configuration only says in which order
to show the ones it knows (`preferred`) and what to call them (`label`).
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from benchmark import tables
from benchmark.cell import AXES
from benchmark.errors import RFTBenchError, closest_first
from benchmark.paths import CONF_DIR
from benchmark.study import load_option, options

# The factors whose effect on the Borda score the study reports (loss is an axis, the rest metadata).
FACTORS = ("size", "type", "loss", "pretraining")
# Model metadata levels in their natural order (the model schema's enumerations): small to large.
METADATA_ORDER = {
    "size": ("small", "medium", "large"),
    "type": ("convolutional", "attention", "hybrid"),
}
CELL = ("protocol", "dataset", "model", "loss")
CONFIGURATION = ("model", "loss")
REQUIRED = (*CELL, "condition", "accuracy")
# The config group each column's values are options of (the condition column names eval options).
GROUPS = {**{axis: axis for axis in AXES}, "condition": "eval"}
LABELLED = ("loss", "protocol", "condition")  # shown by their study_name; datasets and models by name
FLAGS_FILE = "flags.csv"  # in a study's directory: published cells a reader must be warned about
FLAG_COLUMNS = (*AXES, "flag")


class Skip(Exception):
    """An output this study lacks the axes or levels for; the message names what is missing."""


class AnalysisWarning(UserWarning):
    """Something a reader of the results must know: excluded configurations, untested factors."""


def ordered(values: Iterable[str], preferred: Iterable[str] = ()) -> list[str]:
    """The distinct `values`, those in `preferred` first in its order, then the rest as they appear."""
    present = list(dict.fromkeys(values))
    known = set(present)
    first = [v for v in preferred if v in known]
    chosen = set(first)
    return first + [v for v in present if v not in chosen]


@cache
def preferred(column: str) -> tuple[str, ...]:
    """The order the configuration lists a column's values in, for those it knows: a grid axis in
    the configured studies' order (conf/study/*.yaml, by study name), the conditions in the root
    config's `eval` list, model metadata in its natural order; nothing for other columns."""
    if column in METADATA_ORDER:
        return METADATA_ORDER[column]
    if column == "condition":
        root = yaml.safe_load((CONF_DIR / "config.yaml").read_text())
        lists = [entry["eval"] for entry in root.get("defaults", []) if isinstance(entry, dict) and "eval" in entry]
        return tuple(dict.fromkeys(name for names in lists for name in names))
    if column in AXES:
        # A study built on another (Hydra defaults) may state no axes of its own: its base does.
        studies = [(load_option("study", name).get("axes") or {}).get(column, []) for name in options("study")]
        return tuple(dict.fromkeys(name for names in studies for name in names))
    return ()


def levels(frame: pd.DataFrame, column: str) -> list[str]:
    """The values of `column` present in `frame`, the configuration's known ones first in its order."""
    return ordered(frame[column].dropna(), preferred(column))


def conditions(cells: pd.DataFrame) -> list[str]:
    return levels(cells, "condition")


def protocols(cells: pd.DataFrame) -> list[str]:
    return levels(cells, "protocol")


def losses(frame: pd.DataFrame) -> list[str]:
    return levels(frame, "loss")


@cache
def label(column: str, value: str) -> str:
    """How to show a loss, protocol or condition: its option's `study_name` where it has one
    (`Classic AT`, `FFT (50 epochs)`), else its name; other values as they are."""
    group = GROUPS.get(column)
    if column not in LABELLED or value not in options(group):
        return value
    option = load_option(group, value)
    node = option.get(value, {}) if group == "eval" else option  # eval options hold one node under their name
    return node.get("study_name") or value


def load(study: str, results_root: str | Path | None = None) -> pd.DataFrame:
    """The study's prepared cells (see `prepare`), read from its result table (`results_root`
    None: `$RFTBENCH_RESULTS`, else `results/`)."""
    return prepare(tables.load(study, results_root=Path(results_root) if results_root else None))


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


def load_flags(study_dir: Path) -> pd.DataFrame:
    """The study's flagged cells from `<study_dir>/flags.csv` (none: an empty table).

    Columns `dataset, model, loss, protocol, flag`: a row flags the cells it names with a
    sentence saying what is wrong with their numbers (e.g. weights that did not load). An empty
    axis value matches every value of that axis (a row for a model on every dataset). Other
    columns are ignored.
    """
    path = study_dir / FLAGS_FILE
    if not path.exists():
        return pd.DataFrame(columns=list(FLAG_COLUMNS))
    try:
        flags = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise RFTBenchError(f"{path}: not a readable CSV file ({err})") from None
    missing = [c for c in FLAG_COLUMNS if c not in flags.columns]
    if missing:
        raise RFTBenchError(f"{path}: lacks the columns {missing}; a flags file has {list(FLAG_COLUMNS)}")
    flags = flags[list(FLAG_COLUMNS)].apply(lambda column: column.str.strip())
    blank = flags.index[flags["flag"] == ""]
    if len(blank):
        raise RFTBenchError(f"{path}: rows {[int(i) + 2 for i in blank]} have an empty `flag` (say what is wrong)")
    return flags


def flagged_cells(cells: pd.DataFrame, flags: pd.DataFrame) -> pd.DataFrame:
    """One row per cell of `cells` matched by a flag (CELL columns and `flag`); a flag that
    matches no cell is named in a warning."""
    keys = cells[list(CELL)].drop_duplicates()
    matched = []
    for flag in flags.itertuples(index=False):
        mask = np.ones(len(keys), dtype=bool)
        for axis in CELL:
            value = getattr(flag, axis)
            if value:
                mask &= (keys[axis] == value).to_numpy()
        if not mask.any():
            named = ", ".join(f"{axis}={getattr(flag, axis)}" for axis in CELL if getattr(flag, axis))
            warnings.warn(AnalysisWarning(f"the flag for {named or 'every cell'} matches no cell of the table"),
                          stacklevel=2)
        matched.append(keys[mask].assign(flag=flag.flag))
    return pd.concat(matched, ignore_index=True) if matched else pd.DataFrame(columns=list(FLAG_COLUMNS))
