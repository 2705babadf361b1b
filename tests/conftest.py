"""Shared fixtures: every test writes under its own temporary results, data and weights roots."""
from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"
REFERENCE_CSV = SHARED_DIR / "reference" / "results_dataset.csv"


@pytest.fixture
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Fresh results/data/weights roots, exported as the RFTBENCH_* variables."""
    paths = {kind: tmp_path / kind for kind in ("results", "data", "weights")}
    for kind, path in paths.items():
        path.mkdir()
        monkeypatch.setenv(f"RFTBENCH_{kind.upper()}", str(path))
    return paths


@pytest.fixture(scope="session")
def reference_csv() -> Path:
    """The study authors' published table, read from shared/ beside the project; skip without it."""
    if not REFERENCE_CSV.exists():
        pytest.skip(f"the published reference table is absent: {REFERENCE_CSV} (shared/ is not beside the project)")
    return REFERENCE_CSV
