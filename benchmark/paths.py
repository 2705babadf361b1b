"""Where results, prepared datasets and weights live: an environment variable, else a default.

The Hydra config (`paths.*`) resolves the same variables; this module serves code that runs
without a config, such as `tables.load()` on a laptop.
"""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_DIR / "conf"

_ENV = {"results": "RFTBENCH_RESULTS", "data": "RFTBENCH_DATA", "weights": "RFTBENCH_WEIGHTS"}


def root(kind: str) -> Path:
    """The results, data or weights root: `$RFTBENCH_<KIND>` when set, else `./<kind>`."""
    return Path(os.environ.get(_ENV[kind], kind))


def study_dir(study: str, results_root: Path | None = None) -> Path:
    """`<results root>/<study>`: everything a study produced, movable as one folder."""
    return (results_root or root("results")) / study
