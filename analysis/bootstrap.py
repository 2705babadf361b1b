"""Bootstrap confidence intervals from per-example results (our own runs only: imported results
have none).

A seeded numpy percentile bootstrap: each replicate resamples a cell's test examples with
replacement (as multinomial counts), the same resample for all its conditions, so intervals of
quantities that combine conditions (mean robust accuracy) keep their pairing. A configuration's
interval combines independent resamples of its cells, one per dataset.
"""
from __future__ import annotations

import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.data import CELL, CONFIGURATION, AnalysisWarning, ordered, preferred
from benchmark.cell import EXAMPLES_FILE
from benchmark.collect import CELLS_DIR

N_RESAMPLES = 1000
LEVEL = 0.95
SEED = 0

Replicates = dict[tuple[str, ...], pd.DataFrame]  # cell key -> (N_RESAMPLES x conditions) accuracies


def replicates(long: pd.DataFrame, study_dir: Path, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> Replicates:
    """Bootstrap accuracies of every cell that has per-example results, keyed by its CELL axes
    (the replicates of several seeds of one cell are averaged)."""
    out: dict[tuple[str, ...], list[pd.DataFrame]] = {}
    ids = long[[*CELL, "cell_id"]].drop_duplicates("cell_id")
    for row in ids.itertuples(index=False):
        path = study_dir / CELLS_DIR / row.cell_id / EXAMPLES_FILE
        if not path.exists():
            continue
        try:
            examples = _scores(pq.read_table(path))
        except (OSError, pa.ArrowException) as err:
            warnings.warn(AnalysisWarning(f"{path}: unreadable per-example results, no interval for its cell ({err})"),
                          stacklevel=2)
            continue
        key = tuple(getattr(row, axis) for axis in CELL)
        out.setdefault(key, []).append(_resample(examples, row.cell_id, n_resamples, seed))
    return {key: sum(frames) / len(frames) for key, frames in out.items()}


def _scores(examples: pa.Table) -> pd.DataFrame:
    """condition, index, score: each example's share of its condition's accuracy. Files written
    before expected robustness have no score column: their score is `correct`."""
    value = "score" if "score" in examples.column_names else "correct"
    return examples.select(["condition", "index", value]).rename_columns(["condition", "index", "score"]).to_pandas()


def _resample(examples: pd.DataFrame, cell_id: str, n_resamples: int, seed: int) -> pd.DataFrame:
    scores = examples.pivot(index="condition", columns="index", values="score")
    scores = scores.loc[ordered(scores.index, preferred("condition"))].astype(float)
    measured = scores.notna().to_numpy(float)  # a condition may cover fewer examples
    hits = scores.fillna(0.0).to_numpy()
    n = hits.shape[1]
    rng = np.random.default_rng([seed, zlib.crc32(cell_id.encode())])
    counts = rng.multinomial(n, np.full(n, 1 / n), size=n_resamples)
    return pd.DataFrame((counts @ hits.T) / (counts @ measured.T), columns=scores.index)


def _interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def cell_intervals(reps: Replicates) -> pd.DataFrame:
    """Per cell x condition: the percentile interval of its accuracy."""
    rows = [
        {**dict(zip(CELL, key)), "condition": condition, **dict(zip(("ci_low", "ci_high"), _interval(frame[condition])))}
        for key, frame in reps.items() for condition in frame.columns
    ]
    return pd.DataFrame(rows, columns=[*CELL, "condition", "ci_low", "ci_high"])


def configuration_intervals(reps: Replicates, ranking: pd.DataFrame, datasets: list[str]) -> pd.DataFrame:
    """Per configuration of a ranking whose cells on all `datasets` were bootstrapped: intervals
    of its mean clean and mean robust accuracy over datasets (robust = every other condition)."""
    protocol = ranking["protocol"].iloc[0]
    rows = []
    for model, loss in ranking[list(CONFIGURATION)].itertuples(index=False):
        frames = [reps.get((protocol, dataset, model, loss)) for dataset in datasets]
        if any(frame is None or "clean" not in frame for frame in frames):
            continue
        clean = np.mean([f["clean"].to_numpy() for f in frames], axis=0)
        robust = np.mean([f.drop(columns="clean").mean(axis=1).to_numpy() for f in frames], axis=0)
        rows.append({"model": model, "loss": loss,
                     **dict(zip(("clean_low", "clean_high"), _interval(clean))),
                     **dict(zip(("robust_low", "robust_high"), _interval(robust)))})
    return pd.DataFrame(rows, columns=[*CONFIGURATION, "clean_low", "clean_high", "robust_low", "robust_high"])
