"""The row schema, checked reading of result files, and the pandas API (`tables`: load, wide)
without torch."""
from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmark import arguments, results, tables
from benchmark.errors import RFTBenchError
from conftest import COMPUTE_PACKAGES, modules_loaded
from factories import result_row

SWEEP = Path(__file__).parent / "fixtures" / "sweep"
NOT_IN_RESULTS = COMPUTE_PACKAGES | {"hydra"}


def test_rows_round_trip_through_parquet_unchanged(tmp_path: Path):
    rows = [
        result_row(study="s", cell_id="c1", dataset="d", model="m", loss="l", protocol="p", seed=3,
            condition="expected", eps_grid=[0.5, 1.0], n_examples=1000, n_correct=999, accuracy=0.999,
            attempt=2, requeues=1, git_dirty=True, started_at=datetime(2025, 1, 2, 3, 4, 5, 6, tzinfo=UTC)),
        result_row(study="s", cell_id="c1", dataset="d", model="m", loss="l", protocol="p", condition="clean"),
    ]
    path = tmp_path / "rows.parquet"
    results.write_rows(path, rows)
    table = results.read_rows(path)
    assert table.schema.equals(results.ROW_SCHEMA, check_metadata=False)
    assert table.to_pylist() == [{**r, "schema_version": results.SCHEMA_VERSION} for r in rows]
    assert pq.read_schema(path).metadata[b"rftbench_schema_version"] == str(results.SCHEMA_VERSION).encode()


def test_a_row_with_a_missing_or_unknown_column_is_refused():
    incomplete = result_row()
    del incomplete["accuracy"]
    with pytest.raises(ValueError, match="missing \\['accuracy'\\]"):
        results.rows_table([incomplete])
    with pytest.raises(ValueError, match="unknown \\['top5'\\]"):
        results.rows_table([result_row(top5=0.9)])


def _damaged(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Row files that must be refused, with (a part of) the reason."""
    good = tmp_path / "good.parquet"
    results.write_rows(good, [result_row(cell_id="c", condition="clean")])
    data = good.read_bytes()
    cases = {
        "truncated": (data[: len(data) // 2], "unreadable Parquet"),
        "empty": (b"", "unreadable Parquet"),
        "not parquet": (b"cell_id,accuracy\nc,0.9\n", "unreadable Parquet"),
    }
    out = {}
    for name, (content, reason) in cases.items():
        out[name] = (tmp_path / f"{name}.parquet", reason)
        out[name][0].write_bytes(content)
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"condition": ["clean"], "index": [0], "correct": [True]}), foreign)
    out["foreign"] = (foreign, f"not a result file of this schema: {len(results.COLUMNS) - 1} columns missing")
    future = tmp_path / "future.parquet"
    pq.write_table(results.rows_table([result_row()]).set_column(0, "schema_version", pa.array([99], pa.int16())), future)
    out["future"] = (future, f"schema_version [99], expected {results.SCHEMA_VERSION} or older")
    wrong_type = tmp_path / "wrong_type.parquet"
    table = results.rows_table([result_row(accuracy=0.5)])
    index = table.schema.get_field_index("n_examples")
    pq.write_table(table.set_column(index, "n_examples", pa.array(["many"])), wrong_type)
    out["wrong type"] = (wrong_type, "columns of the wrong type")
    return out


def test_corrupt_truncated_and_foreign_files_are_refused_with_path_and_reason(tmp_path: Path):
    for name, (path, reason) in _damaged(tmp_path).items():
        with pytest.raises(results.CorruptResultError) as caught:
            results.read_rows(path)
        assert caught.value.path == path and reason in caught.value.reason, name
        assert str(path) in str(caught.value)


def test_a_missing_file_is_refused_too(tmp_path: Path):
    with pytest.raises(results.CorruptResultError, match="unreadable Parquet"):
        results.read_rows(tmp_path / "absent.parquet")


def test_commands_over_results_read_study_and_results_root():
    assert arguments.study_and_root([]) == ("demo", None)
    assert arguments.study_and_root(["study=paper", "paths.results=/r"]) == ("paper", Path("/r"))
    assert arguments.study_and_root([], default="paper-published") == ("paper-published", None)
    with pytest.raises(RFTBenchError, match="unknown argument 'studdy'.*study"):
        arguments.study_and_root(["studdy=paper"])
    with pytest.raises(RFTBenchError, match="expected key=value"):
        arguments.study_and_root(["paper"])


def test_load_of_an_unknown_study_lists_the_studies(roots: dict[str, Path]):
    (roots["results"] / "demo").mkdir()
    with pytest.raises(RFTBenchError, match="unknown study 'dmeo'.*demo"):
        tables.load("dmeo")
    (roots["results"] / "empty").mkdir()
    with pytest.raises(RFTBenchError, match="no results"):
        tables.load("empty")


def test_load_collects_a_never_collected_study_and_wide_has_one_column_per_condition(roots: dict[str, Path]):
    shutil.copytree(SWEEP / "golden", roots["results"] / "golden")
    long = tables.load("golden")  # the results root comes from RFTBENCH_RESULTS
    assert (roots["results"] / "golden" / results.MEASUREMENTS_FILE).exists()
    expected = json.loads((SWEEP / "expected_measurements.json").read_text())
    assert len(long) == len(expected) and list(long.columns) == list(results.COLUMNS)
    table = tables.wide(long)
    assert list(table.columns) == ["dataset", "model", "loss", "protocol", "cell_id", "clean", "linf", "l2", "l1", "common"]
    assert len(table) == long["cell_id"].nunique() == 3
    for record in expected:
        cell = table.set_index("cell_id").loc[record["cell_id"]]
        assert cell[record["condition"]] == record["accuracy"]
        assert cell["model"] == record["model"]
    cells = tables.load_cells("golden")
    assert len(cells) == 12 and cells["truncated"].sum() == 1


def test_load_works_on_a_study_copied_elsewhere_with_only_its_tables(roots: dict[str, Path], tmp_path: Path):
    shutil.copytree(SWEEP / "golden", roots["results"] / "golden")
    tables.load("golden")
    laptop = tmp_path / "laptop"
    (laptop / "golden").mkdir(parents=True)
    for name in (results.MEASUREMENTS_FILE, results.CELLS_FILE):
        shutil.copy(roots["results"] / "golden" / name, laptop / "golden" / name)
    pd.testing.assert_frame_equal(tables.load("golden", results_root=laptop), tables.load("golden"))


def test_load_and_wide_import_neither_torch_nor_hydra(roots: dict[str, Path]):
    shutil.copytree(SWEEP / "golden", roots["results"] / "golden")
    script = "from benchmark import tables\nassert len(tables.wide(tables.load('golden'))) == 3\n"
    assert not modules_loaded(script, cwd=roots["results"]) & NOT_IN_RESULTS


def test_the_result_modules_import_neither_torch_nor_hydra():
    """Results -> Compute must never exist: the condition kinds, row schema, study tables and
    collect are what planning, collect and analysis import."""
    script = "import benchmark.conditions, benchmark.results, benchmark.tables, benchmark.collect"
    assert not modules_loaded(script) & NOT_IN_RESULTS


def test_rows_written_by_an_older_schema_version_stay_readable(tmp_path: Path):
    """Version 2 added `precision` and `world_size`: a version-1 file reads with them null."""
    table = results.rows_table([result_row(study="s", cell_id="c", condition="clean", n_examples=2, n_correct=1,
                                    accuracy=0.5, precision="fp32", world_size=1)])
    older = table.drop_columns(list(results.ADDED_COLUMNS[2])).set_column(
        0, "schema_version", pa.array([1], pa.int32()))
    pq.write_table(older, tmp_path / "v1.parquet")
    read = results.read_rows(tmp_path / "v1.parquet").to_pylist()[0]
    assert read["precision"] is None and read["world_size"] is None and read["schema_version"] == 1
    assert read["accuracy"] == 0.5
    newer = table.set_column(0, "schema_version", pa.array([results.SCHEMA_VERSION + 1], pa.int32()))
    pq.write_table(newer, tmp_path / "v3.parquet")
    with pytest.raises(results.CorruptResultError, match="or older"):
        results.read_rows(tmp_path / "v3.parquet")
