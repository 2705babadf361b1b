"""`rftbench compare study=A study=B`: how far two studies' results are from each other.

The studies are read by name from one results root (configured or not: an imported study has no
conf/study file); A = B is allowed. Cells are matched on dataset, model, loss and protocol, the
seeds of each side averaged (accuracy, n_correct and n_examples: a mean over seeds, so the noise
test below sees one test set, not the seeds' repeats of it). Per cell x condition, `diff` is
B's accuracy minus A's, and `beyond_noise` says whether that difference is more than the binomial
noise of the two test sets allow: a two-sided pooled two-proportion z test on each side's
n_correct / n_examples at ALPHA, without a multiplicity correction (over many cells, about ALPHA
of them exceed it by chance alone). Per condition and protocol: the number of cells, the mean and
largest absolute difference, the number beyond noise; per protocol: the Spearman rho between the
Borda scores (analysis.rankings) of A and of B, both ranked over the matched measurements only.
Measurements present in one study only are listed per cell (`only_a`, `only_b`), never dropped.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from scipy import stats

from analysis import figures, rankings
from analysis.data import AnalysisWarning, Skip, conditions, label, prepare, protocols
from benchmark import arguments, tables
from benchmark.cell import AXES
from benchmark.errors import RFTBenchError
from benchmark.paths import study_dir

ALPHA = 0.05
TEST = (f"two-sided pooled two-proportion z test on n_correct / n_examples of each side, alpha {ALPHA:g}, "
        "no multiplicity correction")
ALL_PROTOCOLS = "all"  # the protocol of the summary rows over every protocol
SIDES = ("a", "b")
_SHOWN = 20  # cells printed per list in table mode; --format json lists all


def compare_words(words: Sequence[str]) -> tuple[str, str, Path | None]:
    """(A, B, results root or None) from `study=A study=B [paths.results=DIR]`, A first."""
    parsed = arguments.parse(words, ("study", "paths.results"), repeatable=("study",))
    studies = parsed.all("study")
    if len(studies) != 2:
        raise RFTBenchError(f"compare takes two studies, study=A study=B (A = B allowed); got {len(studies)}: {studies}")
    return studies[0], studies[1], parsed.path("paths.results")


@dataclass
class Comparison:
    """What `compare` found; every frame has the AXES columns and `condition` (summary: not AXES)."""

    a: str
    b: str
    cells: pd.DataFrame     # matched cell x condition: a, b, diff, p_value, beyond_noise, n_examples_a/_b
    only_a: pd.DataFrame    # cell x condition measured in A only
    only_b: pd.DataFrame
    summary: pd.DataFrame   # per condition x protocol (and protocol ALL_PROTOCOLS)
    rankings: pd.DataFrame  # per protocol: n_configurations, spearman_rho
    notes: list[str] = field(default_factory=list)  # warnings a reader must see


def compare(a: str, b: str, results_root: Path | None = None) -> Comparison:
    """Compare studies `a` and `b` under `results_root` (None: the default root); see the module
    docstring. An error when they have no cell in common."""
    return compare_tables(a, tables.load(a, results_root), b, tables.load(b, results_root))


def compare_tables(a: str, long_a: pd.DataFrame, b: str, long_b: pd.DataFrame) -> Comparison:
    """`compare` on two long tables (one row per cell x condition x seed), named `a` and `b`."""
    sides = {"a": per_measurement(long_a), "b": per_measurement(long_b)}
    keys = [*AXES, "condition"]
    merged = sides["a"].merge(sides["b"], on=keys, how="outer", suffixes=("_a", "_b"), indicator=True)
    matched = merged[merged["_merge"] == "both"]
    if matched.empty:
        raise RFTBenchError(
            f"studies {a!r} and {b!r} have no cell in common (matched on {', '.join(AXES)}): "
            f"{_n_cells(sides['a'])} cells in {a!r}, {_n_cells(sides['b'])} in {b!r}")
    cells = matched_cells(matched)
    notes = [f"{side.upper()}: {int((sides[side]['n_seeds'] > 1).sum())} measurements averaged over several seeds"
             for side in SIDES if (sides[side]["n_seeds"] > 1).any()]
    agreement, ranking_notes = ranking_agreement(cells)
    return Comparison(
        a=a, b=b, cells=cells,
        only_a=merged.loc[merged["_merge"] == "left_only", keys].reset_index(drop=True),
        only_b=merged.loc[merged["_merge"] == "right_only", keys].reset_index(drop=True),
        summary=summary(cells), rankings=agreement, notes=notes + ranking_notes,
    )


def per_measurement(long: pd.DataFrame) -> pd.DataFrame:
    """One row per cell x condition: accuracy, n_correct, n_examples (means over seeds), n_seeds."""
    grouped = long.groupby([*AXES, "condition"], observed=True, sort=False)
    return grouped.agg(accuracy=("accuracy", "mean"), n_correct=("n_correct", "mean"),
                       n_examples=("n_examples", "mean"), n_seeds=("accuracy", "size")).reset_index()


def matched_cells(matched: pd.DataFrame) -> pd.DataFrame:
    """The matched measurements with both accuracies, their difference and its noise test."""
    p_value = two_proportion_p_value(matched["n_correct_a"], matched["n_examples_a"],
                                     matched["n_correct_b"], matched["n_examples_b"])
    cells = matched[[*AXES, "condition"]].assign(
        a=matched["accuracy_a"], b=matched["accuracy_b"], diff=matched["accuracy_b"] - matched["accuracy_a"],
        p_value=p_value, beyond_noise=p_value < ALPHA,
        n_examples_a=matched["n_examples_a"], n_examples_b=matched["n_examples_b"])
    return cells.sort_values(list(AXES), kind="stable").reset_index(drop=True)


def two_proportion_p_value(k_a: Any, n_a: Any, k_b: Any, n_b: Any) -> np.ndarray:
    """Two-sided p-value of the pooled two-proportion z test of H0 "same success rate", element-wise.
    Equal proportions at 0 or 1 (no variance under H0) give p = 1."""
    k_a, n_a, k_b, n_b = (np.asarray(x, dtype=float) for x in (k_a, n_a, k_b, n_b))
    pooled = (k_a + k_b) / (n_a + n_b)
    se = np.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, (k_a / n_a - k_b / n_b) / se, 0.0)
    return 2 * stats.norm.sf(np.abs(z))


def summary(cells: pd.DataFrame) -> pd.DataFrame:
    """Per condition x protocol, then per condition over all protocols (protocol ALL_PROTOCOLS):
    n_cells, mean_abs_diff, max_abs_diff, n_beyond_noise."""
    frame = cells.assign(abs_diff=cells["diff"].abs())
    everything = frame.assign(protocol=ALL_PROTOCOLS)
    order = {"condition": conditions(cells), "protocol": [*protocols(cells), ALL_PROTOCOLS]}
    table = (pd.concat([frame, everything])
             .groupby(["condition", "protocol"], observed=True)
             .agg(n_cells=("diff", "size"), mean_abs_diff=("abs_diff", "mean"),
                  max_abs_diff=("abs_diff", "max"), n_beyond_noise=("beyond_noise", "sum"))
             .reset_index())
    for column, values in order.items():
        table[column] = pd.Categorical(table[column], categories=values, ordered=True)
    table = table.sort_values(["condition", "protocol"])
    return table.astype({"condition": str, "protocol": str}).reset_index(drop=True)


def ranking_agreement(cells: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Per protocol: Spearman rho between A's and B's Borda scores of its configurations, each
    ranked over the matched measurements; and the warnings the rankings raised (once each)."""
    rows, notes = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AnalysisWarning)
        prepared = {side: prepare(cells[[*AXES, "condition", side]].rename(columns={side: "accuracy"}))
                    for side in SIDES}
        for protocol in protocols(cells):
            try:
                borda = pd.concat({side: rankings.ranking(prepared[side], protocol).set_index(["model", "loss"])["borda"]
                                   for side in SIDES}, axis=1, join="inner")
            except Skip as skip:
                notes.append(str(skip))
                continue
            rows.append({"protocol": protocol, "n_configurations": len(borda), "spearman_rho": _spearman(borda)})
    notes += list(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, AnalysisWarning)))
    return pd.DataFrame(rows, columns=["protocol", "n_configurations", "spearman_rho"]), notes


def _spearman(borda: pd.DataFrame) -> float:
    """rho of the two columns; NaN when it is undefined (fewer than 2 configurations, or a constant side)."""
    if len(borda) < 2 or borda["a"].nunique() < 2 or borda["b"].nunique() < 2:
        return float("nan")
    return float(stats.spearmanr(borda["a"], borda["b"]).statistic)


def scatter(cells: pd.DataFrame, condition: str, a: str, b: str) -> Figure:
    """A's vs B's accuracy of every matched cell on `condition`, one colour per protocol, the
    diagonal (no difference) drawn, the cells beyond noise ringed in red."""
    sub = cells[cells["condition"] == condition]
    fig = Figure(figsize=(6, 6), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.5", linewidth=0.8, zorder=0, label="no difference")
    palette = colormaps["tab10"].colors
    for i, protocol in enumerate(protocols(sub)):
        colour = palette[i % len(palette)]
        points = sub[sub["protocol"] == protocol]
        ax.scatter(points["a"], points["b"], s=18, color=colour, edgecolors="none", alpha=0.8,
                   label=label("protocol", protocol), gid=figures.POINTS)
    beyond = sub[sub["beyond_noise"]]
    ax.scatter(beyond["a"], beyond["b"], s=40, facecolors="none", edgecolors=figures.DEGENERATE_COLOUR,
               linewidths=1.0, label=f"beyond noise (p < {ALPHA:g})")
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), aspect="equal", xlabel=f"{a}: accuracy", ylabel=f"{b}: accuracy",
           title=f"{label('condition', condition)}: {int(sub['beyond_noise'].sum())} of {len(sub)} cells beyond noise")
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    ax.grid(alpha=0.3)
    return fig


def write_figures(comparison: Comparison, out: Path) -> list[Path]:
    """One scatter per condition (PNG and PDF) into `out`; returns the paths."""
    return [path for condition in conditions(comparison.cells)
            for path in figures.save(scatter(comparison.cells, condition, comparison.a, comparison.b), out,
                                     f"compare_{condition}")]


def to_json(comparison: Comparison) -> dict[str, Any]:
    """The JSON document: `summary` (the studies, the test, counts, `conditions`: the summary
    table's rows, `rankings`, `notes`), `cells` (one object per matched cell, its conditions keyed
    by name, each {a, b, diff, beyond_noise}), `only_a`, `only_b` (per cell: the conditions
    measured on that side only)."""
    cells = []
    for key, group in comparison.cells.groupby(list(AXES), sort=False):
        conditions_ = {row.condition: {"a": row.a, "b": row.b, "diff": row.diff, "beyond_noise": bool(row.beyond_noise)}
                       for row in group.itertuples()}
        cells.append({**dict(zip(AXES, key)), "conditions": conditions_})
    return {
        "summary": {
            "a": comparison.a, "b": comparison.b, "test": TEST, "alpha": ALPHA,
            "matched_cells": len(cells), "only_a_cells": _n_cells(comparison.only_a),
            "only_b_cells": _n_cells(comparison.only_b),
            "conditions": _records(comparison.summary), "rankings": _records(comparison.rankings),
            "notes": comparison.notes,
        },
        "cells": cells,
        "only_a": _unmatched(comparison.only_a),
        "only_b": _unmatched(comparison.only_b),
    }


def render_table(comparison: Comparison) -> str:
    """The comparison as text: counts, the summary, the rankings' agreement, the largest
    differences beyond noise and the unmatched cells (the first _SHOWN of each list)."""
    c = comparison
    beyond = c.cells[c.cells["beyond_noise"]]
    beyond = beyond.reindex(beyond["diff"].abs().sort_values(ascending=False).index)
    parts = [
        f"compare A={c.a} with B={c.b}: {_n_cells(c.cells)} matched cells, {_n_cells(c.only_a)} only in A, "
        f"{_n_cells(c.only_b)} only in B; diff = B - A",
        f"beyond noise: {TEST}",
        c.summary.to_string(index=False, float_format="{:.4f}".format),
        "Borda ranking agreement (Spearman rho between A and B, per protocol):",
        c.rankings.to_string(index=False, float_format="{:.3f}".format) if len(c.rankings) else "  none",
        _listing(f"measurements beyond noise, largest |diff| first ({len(beyond)})",
                 beyond[[*AXES, "condition", "a", "b", "diff", "p_value"]]),
        _listing(f"cells with measurements only in A ({_n_cells(c.only_a)})", _per_cell(c.only_a)),
        _listing(f"cells with measurements only in B ({_n_cells(c.only_b)})", _per_cell(c.only_b)),
    ]
    return "\n\n".join(parts)


def compare_command(args: argparse.Namespace) -> int:
    """`rftbench compare study=A study=B [paths.results=DIR] [--out DIR] [--format table|json]`:
    figures go to --out (default `<A's directory>/figures/compare_<B>`); in JSON mode stdout holds
    only the JSON document and everything else goes to stderr."""
    import matplotlib

    matplotlib.use("Agg")  # headless: the command never opens a window
    a, b, results_root = compare_words(args.overrides)
    comparison = compare(a, b, results_root)
    out = Path(args.out) if args.out else study_dir(a, results_root) / "figures" / f"compare_{b}"
    written = write_figures(comparison, out)
    log = sys.stderr if args.format == "json" else sys.stdout
    if args.format == "json":
        print(json.dumps(to_json(comparison), indent=2, allow_nan=False))
    else:
        print(render_table(comparison))
    for note in comparison.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {len(written)} figures to {out}", file=log)
    return 0


def _n_cells(frame: pd.DataFrame) -> int:
    return len(frame[list(AXES)].drop_duplicates())


def _per_cell(frame: pd.DataFrame) -> pd.DataFrame:
    """Unmatched measurements grouped per cell: AXES and the list of its `conditions`."""
    return frame.groupby(list(AXES), sort=True)["condition"].agg(list).rename("conditions").reset_index()


def _unmatched(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return _per_cell(frame).to_dict("records")


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as dicts of plain Python values, NaN as None (JSON null)."""
    return [{k: None if isinstance(v, float) and np.isnan(v) else v for k, v in row.items()}
            for row in frame.to_dict("records")]


def _listing(title: str, frame: pd.DataFrame) -> str:
    if frame.empty:
        return f"{title}: none"
    more = f"\n... and {len(frame) - _SHOWN} more (--format json lists all)" if len(frame) > _SHOWN else ""
    return f"{title}:\n{frame.head(_SHOWN).to_string(index=False)}{more}"
