"""The arrows that must never exist (../shared/DESIGN.md), one test each: a part is imported and
used in a fresh interpreter, and none of the compute packages (torch and the model libraries) is
loaded, nor a part it must not know."""
from __future__ import annotations

from conftest import COMPUTE_PACKAGES, modules_loaded


def test_analysis_never_reaches_compute():
    loaded = modules_loaded("import analysis.report, analysis.compare, analysis.stats, analysis.figures")
    assert not loaded & COMPUTE_PACKAGES


def test_result_tables_load_without_compute():
    loaded = modules_loaded("import benchmark.results, benchmark.tables, benchmark.collect, benchmark.query")
    assert not loaded & (COMPUTE_PACKAGES | {"hydra"})


def test_planning_the_paper_study_builds_no_model():
    loaded = modules_loaded("from benchmark.study import plan\nassert len(plan(['study=paper']).cells) == 1440")
    assert not loaded & COMPUTE_PACKAGES


def test_dispatch_never_imports_compute_but_the_worker_entry():
    loaded = modules_loaded("import benchmark.sweep, launchers, launchers.local, launchers.slurm")
    assert not loaded & COMPUTE_PACKAGES


def test_compute_never_imports_launch_or_analysis():
    loaded = modules_loaded("import benchmark.run, benchmark.train, benchmark.evaluate, benchmark.models")
    assert "torch" in loaded and not loaded & {"launchers", "submitit", "analysis", "matplotlib"}
