"""`query`: read-only SQL over a study's tables, its four output formats, clear errors, warnings."""
from __future__ import annotations

import io
import json
import shutil
from argparse import Namespace
from pathlib import Path

import pandas as pd
import pytest

from benchmark import results, tables
from benchmark.errors import RFTBenchError
from benchmark.query import query, query_command
from conftest import COMPUTE_PACKAGES, modules_loaded

SWEEP = Path(__file__).parent / "fixtures" / "sweep"
TRUNCATED = "20e8f5cf5a36c8e4"
SQL = "SELECT cell_id, condition, n_correct, accuracy, finished_at FROM measurements ORDER BY cell_id, condition"


@pytest.fixture
def golden(roots: dict[str, Path]) -> Path:
    """The golden sweep, collected, under the test's results root."""
    study = Path(shutil.copytree(SWEEP / "golden", roots["results"] / "golden"))
    tables.load("golden")
    return study


def run(capsys: pytest.CaptureFixture, sql: str, fmt: str = "table", study: str = "golden") -> tuple[int, str, str]:
    code = query_command(Namespace(sql=sql, overrides=[f"study={study}"], format=fmt))
    out, err = capsys.readouterr()
    return code, out, err


def test_query_returns_the_rows_of_the_long_table(golden: Path):
    frame = query(SQL, "golden")
    assert len(frame) == 15 and list(frame.columns) == ["cell_id", "condition", "n_correct", "accuracy", "finished_at"]
    long = tables.load("golden").sort_values(["cell_id", "condition"], ignore_index=True)
    pd.testing.assert_series_equal(frame["accuracy"], long["accuracy"])


def test_the_accuracy_view_is_the_wide_table(golden: Path):
    frame = query("SELECT * FROM accuracy", "golden")
    pd.testing.assert_frame_equal(frame, tables.wide(tables.load("golden")), check_dtype=False)


def test_cells_view_has_one_row_per_cell_with_its_state(golden: Path):
    frame = query("SELECT state, count(*) AS n FROM cells GROUP BY state ORDER BY state", "golden")
    assert dict(zip(frame["state"], frame["n"])) == {"done": 3, "failed": 1, "invalid": 3, "pending": 4, "running": 1}


def test_csv_and_json_carry_exact_values(golden: Path, capsys: pytest.CaptureFixture):
    expected = query(SQL, "golden")
    _, out, _ = run(capsys, SQL, "csv")
    pd.testing.assert_frame_equal(pd.read_csv(io.StringIO(out))[["cell_id", "condition", "n_correct", "accuracy"]],
                                  expected[["cell_id", "condition", "n_correct", "accuracy"]], check_dtype=False)
    _, out, _ = run(capsys, SQL, "json")
    records = json.loads(out)
    assert [r["accuracy"] for r in records] == expected["accuracy"].tolist()
    assert records[0]["finished_at"] == expected["finished_at"][0].isoformat()
    _, out, _ = run(capsys, "SELECT sum(n_correct) AS total FROM measurements", "json")
    assert json.loads(out) == [{"total": int(expected["n_correct"].sum())}]  # DuckDB's exact sum, as a number


def test_table_and_markdown_show_every_row(golden: Path, capsys: pytest.CaptureFixture):
    _, out, _ = run(capsys, SQL, "table")
    lines = out.splitlines()
    assert lines[0].split() == ["cell_id", "condition", "n_correct", "accuracy", "finished_at"] and len(lines) == 16
    _, out, _ = run(capsys, SQL, "markdown")
    lines = out.splitlines()
    assert lines[0].startswith("| cell_id") and set(lines[1]) <= set("|:- ") and len(lines) == 17


def test_a_query_names_the_truncated_cells_on_stderr(golden: Path, capsys: pytest.CaptureFixture):
    code, out, err = run(capsys, "SELECT count(*) AS n FROM measurements")
    assert code == 0 and "15" in out
    assert "warning: 1 cells were measured on fewer examples than their dataset's test_size" in err
    assert f"digits__test_resnet.demo__trades__fft5__seed0 ({TRUNCATED}): linf 150/200; l2 150/200" in err


def test_an_unknown_column_is_an_error_with_duckdbs_message(golden: Path):
    with pytest.raises(RFTBenchError, match='Referenced column "acuracy" not found.*\n.*accuracy'):
        query("SELECT acuracy FROM measurements", "golden")
    with pytest.raises(RFTBenchError, match="measurement does not exist!\nDid you mean \"measurements\""):
        query("SELECT * FROM measurement", "golden")
    with pytest.raises(RFTBenchError, match="syntax error"):
        query("SELEC 1", "golden")


def test_a_query_can_neither_write_nor_read_files(golden: Path, tmp_path: Path):
    target = tmp_path / "out.csv"
    with pytest.raises(RFTBenchError, match="disabled by configuration"):
        query(f"COPY measurements TO '{target}'", "golden")
    assert not target.exists()
    with pytest.raises(RFTBenchError, match="disabled by configuration"):
        query(f"SELECT * FROM read_parquet('{golden / results.CELLS_FILE}')", "golden")
    with pytest.raises(RFTBenchError, match="locked"):
        query("SET enable_external_access = true", "golden")


def test_a_never_collected_study_is_collected_first(roots: dict[str, Path], capsys: pytest.CaptureFixture):
    shutil.copytree(SWEEP / "golden", roots["results"] / "golden")
    code, out, err = run(capsys, "SELECT count(*) AS n FROM cells")
    assert code == 0 and out.split() == ["n", "12"]
    assert "collected study golden first: 12 cells, 15 measurements" in err and "skipped" in err


def test_an_unknown_study_lists_the_studies(golden: Path):
    with pytest.raises(RFTBenchError, match="unknown study 'goldne'.*golden"):
        query("SELECT 1", "goldne")


def test_the_query_command_imports_no_torch(golden: Path):
    script = ("from benchmark.cli import main\n"
              "assert main(['query', 'SELECT count(*) AS n FROM accuracy', 'study=golden', '--format', 'json']) == 0\n")
    assert not modules_loaded(script) & (COMPUTE_PACKAGES | {"hydra"})
