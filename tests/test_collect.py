"""`collect`: golden output on the checked-in sweep, incremental and idempotent updates, damaged
cell files reported and skipped, and concurrent writers and collects never showing half a table."""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from argparse import Namespace
from collections.abc import Callable
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml

from benchmark import results
from benchmark.cell import CONFIG_FILE, ROWS_FILE, Cell, cell_id, write_config
from benchmark.collect import CELLS_DIR, MANIFEST_FILE, collect
from benchmark.study import plan
from benchmark.tables import collect_command, wide
from fixtures.make_sweep import STUDY, rows

SWEEP = Path(__file__).parent / "fixtures" / "sweep"
DONE = "4629d91d10bf86ee"      # digits__test_resnet.demo__classic_at__fft5, five whole rows
FAILED = "b7b2efc70b30c0bb"    # digits__test_convnext.demo__trades__fft5, no rows
TRUNCATED = "20e8f5cf5a36c8e4"  # linf and l2 on 150 of 200 examples


@pytest.fixture
def study(tmp_path: Path) -> Path:
    """A copy of the golden sweep (collect writes into its study directory)."""
    return Path(shutil.copytree(SWEEP / STUDY, tmp_path / STUDY))


def as_json(table: pa.Table) -> list[dict]:
    return json.loads(json.dumps(table.to_pylist(), default=str))


def tables(study: Path) -> tuple[pa.Table, pa.Table]:
    measurements = results.read_rows(study / results.MEASUREMENTS_FILE)
    return measurements, results.read_table(study / results.CELLS_FILE, results.CELL_SCHEMA)


def cell_of(study: Path, cell_id: str) -> Cell:
    return Cell.from_config(yaml.safe_load((study / CELLS_DIR / cell_id / CONFIG_FILE).read_text())["config"])


def test_collect_of_the_golden_sweep_gives_the_golden_tables(study: Path):
    report = collect(study)
    measurements, cells = tables(study)
    assert as_json(measurements) == json.loads((SWEEP / "expected_measurements.json").read_text())
    assert as_json(cells) == json.loads((SWEEP / "expected_cells.json").read_text())
    expected = json.loads((SWEEP / "expected_report.json").read_text())
    assert [p.removeprefix(f"{study}/") for p in report.problems] == expected["problems"]
    summary = {"cells": report.cells, "measurements": report.measurements, "truncated": report.truncated}
    assert summary == {key: expected[key] for key in summary}
    assert report.read == 12


def test_the_golden_cells_ids_still_hash_from_their_configs():
    """The fixture's ids are the hashes of its cells' stored configs: if cell identity changes,
    regenerate the fixture with `.venv/bin/python tests/fixtures/make_sweep.py` and read the diff
    of its expected tables."""
    documents = [yaml.safe_load(path.read_text()) for path in (SWEEP / STUDY / CELLS_DIR).glob(f"*/{CONFIG_FILE}")]
    assert len(documents) >= 10
    for document in documents:
        assert cell_id(document["config"]) == document["cell_id"], "regenerate: tests/fixtures/make_sweep.py"


def test_golden_tables_say_what_each_cell_is(study: Path):
    collect(study)
    measurements, cells = tables(study)
    by_id = {cell["cell_id"]: cell for cell in cells.to_pylist()}
    assert sorted(set(measurements["cell_id"].to_pylist())) == sorted([DONE, TRUNCATED, "6103c17465354812"])
    assert sum(c["state"] == "invalid" for c in by_id.values()) == 3  # corrupt, foreign, other schema
    assert by_id[FAILED]["state"] == "failed" and by_id[FAILED]["reason"] == "CUDA out of memory"
    assert by_id[TRUNCATED]["truncated"] is True and by_id[TRUNCATED]["truncation"] == "linf 150/200; l2 150/200"
    assert by_id[DONE]["truncated"] is False and by_id[DONE]["conditions"] == 5
    assert by_id["6103c17465354812"]["attempts"] == 2 and by_id["6103c17465354812"]["requeues"] == 1
    pairs = list(zip(measurements["cell_id"].to_pylist(), measurements["condition"].to_pylist()))
    assert len(pairs) == len(set(pairs))


def test_collect_command_reports_skipped_files_and_truncated_cells(study: Path, capsys: pytest.CaptureFixture):
    code = collect_command(Namespace(overrides=[f"study={STUDY}", f"paths.results={study.parent}"]))
    out, err = capsys.readouterr()
    assert code == 1  # the tables are written, but some cell files were skipped
    assert "12 cells, 15 measurements" in out
    assert f"skipped {study}/cells/ee72cebee1957045/rows.parquet: unreadable Parquet" in err
    assert "foreign rows: cell_id ['4629d91d10bf86ee']" in err
    assert "1 cells were measured on fewer examples than their dataset's test_size" in err and TRUNCATED in err


def test_a_second_collect_reads_and_writes_nothing(study: Path):
    collect(study)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in study.iterdir() if p.is_file()}
    report = collect(study)
    assert report.read == 0 and report.measurements == 15
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in study.iterdir() if p.is_file()} == before


def test_collect_reads_only_changed_cells_and_equals_a_full_collect(study: Path, tmp_path: Path):
    collect(study)
    failed = cell_of(study, FAILED)
    results.write_rows(study / CELLS_DIR / FAILED / ROWS_FILE, rows(failed, {}, attempt=2))  # its retry succeeded
    shutil.rmtree(study / CELLS_DIR / "718f6ff3920eb81a")                                 # a pending cell removed
    report = collect(study)
    assert report.read == 1 and report.cells == 11 and report.measurements == 20
    fresh = Path(shutil.copytree(study, tmp_path / "fresh" / STUDY))
    (fresh / MANIFEST_FILE).unlink()
    assert collect(fresh).read == 11
    for incremental, full in zip(tables(study), tables(fresh)):
        assert incremental.equals(full)


def test_the_latest_attempt_of_a_cell_replaces_its_rows(study: Path):
    collect(study)
    done = cell_of(study, DONE)
    results.write_rows(study / CELLS_DIR / DONE / ROWS_FILE, rows(done, {"clean": 190}, attempt=3, requeues=2))
    collect(study)
    measurements, cells = tables(study)
    mine = measurements.filter(pc.equal(measurements["cell_id"], DONE))
    assert mine.num_rows == 5 and set(mine["attempt"].to_pylist()) == {3}
    assert mine.filter(pc.equal(mine["condition"], "clean"))["n_examples"].to_pylist() == [190]
    cell = cells.filter(pc.equal(cells["cell_id"], DONE)).to_pylist()[0]
    assert (cell["attempts"], cell["requeues"], cell["truncated"], cell["truncation"]) == (3, 2, True, "clean 190/200")


def test_cells_of_several_seeds_are_collected_side_by_side(tmp_path: Path):
    """Two seeds of each grid point: same axes, different cells; the wide table keeps them
    apart, the analysis averages them (and says so); rows without a seed are accepted."""
    from analysis.data import AnalysisWarning, prepare

    study_dir = tmp_path / STUDY
    cells = plan(["study=demo", "model=test_resnet.demo", "protocol=fft5", "seed=0,1"]).cells
    for cell in cells:
        write_config(cell, cell.directory(study_dir), STUDY)
        # made-up counts: the seeds' clean accuracies differ (90/100 and 140/150)
        results.write_rows(cell.directory(study_dir) / ROWS_FILE, rows(cell, {"clean": 100 + 50 * cell.seed}))
    report = collect(study_dir)
    assert (report.cells, report.measurements, report.problems) == (4, 20, [])
    measurements, collected = tables(study_dir)
    assert sorted(zip(collected["loss"].to_pylist(), collected["seed"].to_pylist())) == [
        ("classic_at", 0), ("classic_at", 1), ("trades", 0), ("trades", 1)]
    assert set(collected["slug"].to_pylist()) == {c.slug for c in cells}
    long = measurements.to_pandas()
    assert len(wide(long)) == 4  # one row per cell, two per grid point
    with pytest.warns(AnalysisWarning, match="averaged"):
        averaged = prepare(long)
    assert len(averaged) == 10 and set(averaged["n_seeds"]) == {2}
    clean = averaged[averaged["condition"] == "clean"]["accuracy"]
    assert clean.tolist() == [((100 - 10) / 100 + (150 - 10) / 150) / 2] * 2

    unseeded = _set_rows("seed", None)  # imported rows carry no seed
    unseeded(cells[0].directory(study_dir))
    assert collect(study_dir).problems == []


def _set_rows(column: str, value: object) -> Callable[[Path], None]:
    """A damage: every row of the cell's file gets `value` in `column` (written atomically)."""
    def damage(cell_dir: Path) -> None:
        table = results.read_rows(cell_dir / ROWS_FILE)
        values = pa.array([value] * table.num_rows, table.schema.field(column).type)
        results.write_table(cell_dir / ROWS_FILE, table.set_column(table.schema.get_field_index(column), column, values))
    return damage


def _edit_config(old: str, new: str) -> Callable[[Path], None]:
    def damage(cell_dir: Path) -> None:
        (cell_dir / CONFIG_FILE).write_text((cell_dir / CONFIG_FILE).read_text().replace(old, new))
    return damage


# damage -> (what it does to a done cell's directory, the start of the reported reason)
DAMAGE = {
    "rows of another study": (_set_rows("study", "paper"), "rows.parquet: foreign rows: study ['paper']"),
    "rows of another model": (_set_rows("model", "resnet50.a1_in1k"), "rows.parquet: foreign rows: model ['resnet50.a1_in1k']"),
    "rows of another seed": (_set_rows("seed", 1), "rows.parquet: foreign rows: seed [1], this cell's is 0"),
    "a condition twice": (_set_rows("condition", "clean"), "rows.parquet: conditions ['clean'] appear more than once"),
    "a null accuracy": (_set_rows("accuracy", None), "rows.parquet: incomplete rows: null accuracy"),
    "no rows": (lambda d: results.write_table(d / ROWS_FILE, results.ROW_SCHEMA.empty_table()), "rows.parquet: no rows"),
    "no config": (lambda d: (d / CONFIG_FILE).unlink(), "rows.parquet: no config.yaml beside it"),
    "another cell's config": (lambda d: shutil.copy(d.parent / FAILED / CONFIG_FILE, d / CONFIG_FILE),
                              f"config.yaml: the config of cell '{FAILED}', not of this cell"),
    "unparsable config": (_edit_config("cell_id:", "cell_id: [unclosed"), "config.yaml: unreadable"),
    "a config value of the wrong type": (_edit_config("test_size: 200", "test_size: all"),
                                         "config.yaml: test_size 'all' is not of type int64"),
    "an unreadable state": (lambda d: (d / "state.json").write_bytes(b"\xff\xfe"), "state.json: unreadable"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_cell_is_reported_and_skipped_without_hiding_the_others(study: Path, damage: str):
    collect(study)
    change, reason = DAMAGE[damage]
    change(study / CELLS_DIR / DONE)
    report = collect(study)
    measurements, cells = tables(study)
    assert any(p.startswith(f"{study}/cells/{DONE}/{reason}") for p in report.problems), report.problems
    assert DONE not in measurements["cell_id"].to_pylist() and measurements.num_rows == 10
    assert cells.filter(pc.equal(cells["cell_id"], DONE))["state"].to_pylist() == ["invalid"]


@pytest.mark.parametrize("damaged", [results.MEASUREMENTS_FILE, results.CELLS_FILE, MANIFEST_FILE])
def test_damaged_collected_files_are_rebuilt_from_the_cells(study: Path, damaged: str):
    collect(study)
    expected = tables(study)
    (study / damaged).write_bytes((study / damaged).read_bytes()[:100])
    assert collect(study).read == 12
    for table, want in zip(tables(study), expected):
        assert table.equals(want)


# --- concurrency: workers finishing while collects run and readers read ---------------------

ATTEMPTS = 30


def _finish_cells(start: Barrier, jobs: list[tuple[str, list[list[dict]]]]) -> None:
    """A worker: write each attempt's rows of its cells in turn, like requeued jobs finishing."""
    start.wait()
    for attempt in range(ATTEMPTS):
        for path, attempts in jobs:
            results.write_rows(Path(path), attempts[attempt])


def _collect_until(start: Barrier, study: str, stop: str) -> None:
    start.wait()
    while not Path(stop).exists():
        collect(Path(study))


@pytest.mark.slow  # three spawned interpreters: a few seconds, more on a busy machine
def test_concurrent_writers_and_collects_never_show_half_a_table(tmp_path: Path):
    study = tmp_path / STUDY
    cells = plan(["study=demo"]).cells
    jobs = []
    for cell in cells:
        write_config(cell, cell.directory(study), STUDY)
        jobs.append((str(cell.directory(study) / ROWS_FILE), [rows(cell, {}, attempt=a + 1) for a in range(ATTEMPTS)]))
    stop = tmp_path / "stop"
    spawn = multiprocessing.get_context("spawn")
    start = spawn.Barrier(4)  # two writers, a collector and this reader start together
    writers = [spawn.Process(target=_finish_cells, args=(start, jobs[i::2])) for i in range(2)]
    collector = spawn.Process(target=_collect_until, args=(start, str(study), str(stop)))
    for process in (*writers, collector):
        process.start()
    start.wait()
    attempts_seen = set()
    while any(w.is_alive() for w in writers):
        collect(study)  # races the other collect and the writers
        table = results.read_rows(study / results.MEASUREMENTS_FILE)  # raises on half a file
        pairs = list(zip(table["cell_id"].to_pylist(), table["condition"].to_pylist()))
        assert len(pairs) == len(set(pairs))
        attempts_seen.update(table["attempt"].to_pylist())
    stop.touch()
    for process in (*writers, collector):
        process.join(timeout=60)
        assert process.exitcode == 0
    assert len(attempts_seen) > 2  # the reads really raced the writers
    collect(study)
    measurements, collected = tables(study)
    assert measurements.num_rows == 5 * len(cells) and collected.num_rows == len(cells)
    assert set(measurements["attempt"].to_pylist()) == {ATTEMPTS}
    assert not [name for name in os.listdir(study) if name.endswith(".tmp")]
