"""scripts/gpu-check.sh on a machine without a GPU: it stops within seconds with one line and
installs nothing, and its offline install path (a wheel folder, a private target folder, an
existing interpreter) works up to the point where the check needs CUDA.

The wheel folder built here holds the project's wheel only: without network the dependencies'
wheels cannot be made, so the interpreter (the project's venv) provides them."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from benchmark.paths import PROJECT_DIR

SCRIPT = PROJECT_DIR / "scripts" / "gpu-check.sh"
PYTHON = sys.executable


def check(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "GPU_CHECK_DIR": str(tmp_path / "target"), **env}
    environment.pop("PYTHONPATH", None)
    return subprocess.run(["bash", str(SCRIPT), *args], env=environment, capture_output=True, text=True, timeout=120)


def test_without_cuda_it_stops_within_seconds_with_one_line_and_installs_nothing(tmp_path):
    start = time.monotonic()
    done = check(tmp_path, PYTHON=PYTHON, WHEELS=str(tmp_path))
    assert done.returncode == 3 and time.monotonic() - start < 30
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("gpu-check: no CUDA GPU")
    assert "Traceback" not in done.stderr and not (tmp_path / "target").exists()


def test_without_a_usable_interpreter_it_says_so_in_one_line(tmp_path):
    done = check(tmp_path, PYTHON=str(tmp_path / "python3"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "set PYTHON=" in done.stderr
    shim = tmp_path / "bin" / "python3"  # an interpreter without torch: -I ignores the venv's packages
    shim.parent.mkdir()
    shim.write_text(f"#!/bin/sh\nexec {sys.base_prefix}/bin/python3 -I \"$@\"\n")
    shim.chmod(0o755)
    done = check(tmp_path, PYTHON=str(shim))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "cannot import" in done.stderr


@pytest.mark.slow
def test_the_offline_install_fills_a_private_folder_and_the_check_then_needs_cuda(tmp_path):
    source, wheels = tmp_path / "source", tmp_path / "wheels"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT_DIR / name, source / name)
    for package in ("benchmark", "launchers", "analysis"):
        shutil.copytree(PROJECT_DIR / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([PYTHON, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index", "--no-build-isolation",
                    "-w", str(wheels), str(source)], check=True, capture_output=True)
    site_packages = Path(sysconfig.get_paths()["purelib"])
    before = sorted(p.name for p in site_packages.iterdir())

    done = check(tmp_path, "--install-only", PYTHON=PYTHON, WHEELS=str(wheels))
    assert done.returncode == 0, done.stderr
    target = tmp_path / "target"
    assert done.stdout.strip() == f"installed={target}"
    assert sorted(p.name for p in site_packages.iterdir()) == before  # the interpreter's packages untouched

    env = {**os.environ, "PYTHONPATH": str(target), "RFTBENCH_CONF_PATH": str(PROJECT_DIR / "conf")}
    # Run from elsewhere than the checkout, as on a GPU node: the private folder must serve the import.
    where = subprocess.run([PYTHON, "-c", "import benchmark.gpu_check as m; print(m.__file__)"], env=env,
                           capture_output=True, text=True, check=True, cwd=tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(target)
    run = subprocess.run([PYTHON, "-m", "benchmark.gpu_check"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 3 and run.stderr.count("\n") == 1 and "no CUDA GPU" in run.stderr
