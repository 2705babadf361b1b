"""Shared fixtures: every test writes under its own temporary results, data and weights roots."""
from __future__ import annotations

from collections.abc import Callable
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
def published_root(reference_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results root holding the published table imported as the default study, once per test
    session (about 10 s: 1,440 cell directories). Tests that change it put it back."""
    from benchmark.reference import DEFAULT_STUDY, import_reference

    root = tmp_path_factory.mktemp("published")
    import_reference(reference_csv, DEFAULT_STUDY, root)
    return root


def wait_until(what: str, check: Callable[[], bool], timeout: float) -> None:
    """Poll `check` every second until it holds; fail the test after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting until {what}")
        time.sleep(1)


@pytest.fixture(scope="session")
def reference_csv() -> Path:
    """The study authors' published table, read from shared/ beside the project; skip without it."""
    if not REFERENCE_CSV.exists():
        pytest.skip(f"the published reference table is absent: {REFERENCE_CSV} (shared/ is not beside the project)")
    return REFERENCE_CSV


# Packages that only compute (training, attacks, evaluation) may import: the never-arrows of the
# architecture (../shared/DESIGN.md) are tested as "this part runs without any of them".
COMPUTE_PACKAGES = frozenset({"torch", "torchvision", "timm", "pyautoattack", "imagecorruptions"})


def modules_loaded(script: str, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> set[str]:
    """The top-level packages imported by running `script` in a fresh interpreter (which must
    succeed; its stdout is ignored), for import-hygiene tests."""
    import json
    import os
    import subprocess
    import sys

    from benchmark.paths import PROJECT_DIR

    report = "\nimport json as _j, sys as _s\nprint('\\n' + _j.dumps(sorted({m.split('.')[0] for m in _s.modules})))\n"
    done = subprocess.run([sys.executable, "-c", script + report, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(PROJECT_DIR), **(env or {})})
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))
