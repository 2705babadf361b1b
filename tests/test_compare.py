"""`rftbench compare`: two studies matched cell by cell; a difference is beyond noise only where the
two test sets' counts say so; nothing unmatched is dropped; JSON mode prints only the document."""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from statsmodels.stats.proportion import proportions_ztest

from analysis.compare import ALPHA, compare, compare_tables, compare_words, to_json, two_proportion_p_value
from benchmark import cli, tables
from benchmark.cell import AXES, CELLS_DIR, ROWS_FILE
from benchmark.collect import collect
from benchmark.errors import RFTBenchError
from benchmark.reference import DEFAULT_STUDY
from benchmark.results import read_rows, write_table
from conftest import COMPUTE_PACKAGES, modules_loaded

SWEEP = Path(__file__).parent / "fixtures" / "sweep"
CHANGED = "paper-changed"
KEY = [*AXES, "condition"]


def copy_study(root: Path, source: str, target: str, keep: Callable[[str], bool] = lambda cell_id: True) -> Path:
    """Copy the cells of `source` that `keep` (by id) into study `target`, their rows re-labelled
    with the new study name (collect refuses another study's rows), and collect it."""
    for cell_dir in sorted((root / source / CELLS_DIR).iterdir()):
        if not keep(cell_dir.name):
            continue
        copy = root / target / CELLS_DIR / cell_dir.name
        shutil.copytree(cell_dir, copy)
        if (copy / ROWS_FILE).exists():
            rows = read_rows(copy / ROWS_FILE)
            write_table(copy / ROWS_FILE, rows.set_column(rows.schema.get_field_index("study"), "study",
                                                         pa.array([target] * rows.num_rows)))
    collect(root / target)
    return root / target


def shift(study_dir: Path, cell_id: str, condition: str, examples: int) -> None:
    """Make `examples` more (fewer, if negative) test examples correct in one measurement."""
    path = study_dir / CELLS_DIR / cell_id / ROWS_FILE
    rows = read_rows(path).to_pandas()
    at = rows["condition"] == condition
    rows.loc[at, "n_correct"] += examples
    rows.loc[at, "accuracy"] += examples / rows.loc[at, "n_examples"]
    write_table(path, pa.Table.from_pandas(rows, schema=read_rows(path).schema, preserve_index=False))


@pytest.fixture
def golden(tmp_path: Path) -> Path:
    """A results root holding the golden sweep (three cells with rows) as study `golden`."""
    shutil.copytree(SWEEP / "golden", tmp_path / "golden")
    return tmp_path


# --- without the published table ------------------------------------------------------------

def test_compare_imports_no_torch():
    assert not modules_loaded("import analysis.compare") & COMPUTE_PACKAGES


def test_the_words_name_a_then_b_and_an_optional_results_root():
    assert compare_words(["study=x", "paths.results=/r", "study=y"]) == ("x", "y", Path("/r"))
    assert compare_words(["study=x", "study=x"]) == ("x", "x", None)
    with pytest.raises(RFTBenchError, match="two studies"):
        compare_words(["study=x"])
    with pytest.raises(RFTBenchError, match="unknown argument 'dataset'.*paths.results"):
        compare_words(["study=x", "study=y", "dataset=caltech101"])
    with pytest.raises(RFTBenchError, match="malformed argument 'study'"):
        compare_words(["study", "study=y"])


def test_the_noise_test_is_the_pooled_two_proportion_z_test():
    counts = [(190, 200, 180, 200), (5, 1000, 0, 1000), (400, 420, 410, 420), (37, 1000, 52, 1000)]
    for k_a, n_a, k_b, n_b in counts:
        expected = proportions_ztest([k_a, k_b], [n_a, n_b])[1]  # statsmodels: pooled, two-sided
        assert two_proportion_p_value(k_a, n_a, k_b, n_b) == pytest.approx(expected)
        assert two_proportion_p_value(k_b, n_b, k_a, n_a) == pytest.approx(expected)  # symmetric
    # Equal counts, including all wrong or all right (no variance), are never beyond noise.
    assert np.all(two_proportion_p_value([0, 1000, 500], 1000, [0, 1000, 500], 1000) == 1.0)


def test_seeds_are_averaged_before_matching(golden: Path):
    long = tables.load("golden", golden)
    reseeded = long.assign(seed=1, n_correct=long["n_correct"] - 10,
                           accuracy=(long["n_correct"] - 10) / long["n_examples"])
    comparison = compare_tables("two seeds", pd.concat([long, reseeded]), "one", long)
    assert np.allclose(comparison.cells["diff"], 5 / comparison.cells["n_examples_b"])  # mean of 0 and -10 examples
    assert any("averaged over several seeds" in note for note in comparison.notes)


def test_a_study_against_itself_differs_nowhere_and_prints_only_json(golden: Path, capsys: pytest.CaptureFixture[str]):
    out = golden / "figures"
    code = cli.main(["compare", "study=golden", "study=golden", f"paths.results={golden}", "--format", "json",
                     "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0
    document = json.loads(captured.out)  # stdout is the JSON document and nothing else
    assert len(document["cells"]) == 3 and not document["only_a"] and not document["only_b"]
    assert all(v["diff"] == 0 and not v["beyond_noise"] for cell in document["cells"] for v in cell["conditions"].values())
    assert [row["spearman_rho"] for row in document["summary"]["rankings"]] == pytest.approx([1.0])
    conditions = {c for cell in document["cells"] for c in cell["conditions"]}
    assert {p.name for p in out.iterdir()} == {f"compare_{c}.{fmt}" for c in conditions for fmt in ("png", "pdf")}


def test_the_table_format_names_the_test_and_the_counts(golden: Path, capsys: pytest.CaptureFixture[str]):
    assert cli.main(["compare", "study=golden", "study=golden", f"paths.results={golden}",
                     "--out", str(golden / "figures")]) == 0
    text = capsys.readouterr().out
    assert "3 matched cells, 0 only in A, 0 only in B" in text and "two-proportion z test" in text


def test_studies_without_a_common_cell_are_an_error(golden: Path):
    with_rows = sorted(tables.load("golden", golden)["cell_id"].unique())  # its three measured cells
    copy_study(golden, "golden", "first", lambda cell_id: cell_id == with_rows[0])
    copy_study(golden, "golden", "others", lambda cell_id: cell_id in with_rows[1:])
    with pytest.raises(RFTBenchError, match="'first' and 'others' have no cell in common.*1 cells in 'first', 2 in 'others'"):
        compare("first", "others", golden)
    code = cli.main(["compare", "study=first", "study=others", f"paths.results={golden}"])
    assert code == 2  # the CLI's exit code for an RFTBenchError: a message, no traceback


def test_an_unknown_study_names_the_studies_there(golden: Path):
    with pytest.raises(RFTBenchError, match="unknown study 'goldne'.*golden"):
        compare("golden", "goldne", golden)


# --- on the published table ------------------------------------------------------------------

@pytest.fixture(scope="module")
def published(published_root: Path) -> Path:
    """The results root holding the published table as DEFAULT_STUDY (conftest)."""
    return published_root


@pytest.fixture(scope="module")
def changed(published: Path) -> dict[tuple[str, ...], int]:
    """Study CHANGED: the published cells of two datasets, four measurements shifted by some test
    examples (three far beyond noise, one by a single example). Returns measurement key -> shift."""
    cells = tables.load_cells(DEFAULT_STUDY, published)
    long = tables.load(DEFAULT_STUDY, published).merge(cells[["cell_id", "slug"]], on="cell_id")
    kept = set(cells.loc[cells["dataset"].isin(["uc_merced", "flowers102"]), "cell_id"])
    candidates = long[long["cell_id"].isin(kept)]
    picks = [  # (protocol, condition, accuracy range that the shift keeps in [0, 1], share of the test set)
        ("fft50", "clean", (0.6, 1.0), -0.3),
        ("lp50", "linf", (0.0, 0.5), 0.2),
        ("fft5", "common", (0.0, 0.5), 0.15),
        ("fft50", "l2", (0.2, 0.8), None),  # one example: within noise
    ]
    shifts = {}
    for protocol, condition, (low, high), share in picks:
        rows = candidates[(candidates["protocol"] == protocol) & (candidates["condition"] == condition)
                          & candidates["accuracy"].between(low, high)]
        row = rows.iloc[len(shifts)]
        examples = round(share * row["n_examples"]) if share else 1
        shifts[(row["cell_id"], *(row[axis] for axis in AXES), condition)] = examples
    directory = copy_study(published, DEFAULT_STUDY, CHANGED, kept.__contains__)
    for (cell_id, *_, condition), examples in shifts.items():
        shift(directory, cell_id, condition, examples)
    collect(directory)
    return {key[1:]: examples for key, examples in shifts.items()}


@pytest.mark.slow
def test_the_published_table_against_itself_differs_nowhere(published: Path):
    comparison = compare(DEFAULT_STUDY, DEFAULT_STUDY, published)
    assert len(comparison.cells) == 7_200 and comparison.only_a.empty and comparison.only_b.empty
    assert (comparison.cells["diff"] == 0).all() and not comparison.cells["beyond_noise"].any()
    assert (comparison.summary["mean_abs_diff"] == 0).all() and (comparison.summary["n_beyond_noise"] == 0).all()
    assert set(comparison.rankings["protocol"]) == {"fft50", "fft5", "lp50"}
    assert comparison.rankings["spearman_rho"].tolist() == pytest.approx([1.0] * 3)


@pytest.mark.slow
def test_a_changed_copy_shows_exactly_the_changed_measurements(published: Path, changed: dict[tuple[str, ...], int]):
    comparison = compare(DEFAULT_STUDY, CHANGED, published)
    cells = comparison.cells.set_index(KEY)
    moved = cells[cells["diff"] != 0]
    assert set(moved.index) == set(changed)
    for key, examples in changed.items():
        assert moved.loc[key, "diff"] == pytest.approx(examples / moved.loc[key, "n_examples_a"])
    beyond = set(cells.index[cells["beyond_noise"]])
    assert beyond == {key for key, examples in changed.items() if abs(examples) > 1}
    assert comparison.summary.query("protocol == 'all'")["n_beyond_noise"].sum() == len(beyond)
    # every measurement is either matched or listed as A's only; B has none of its own
    published_keys = set(tables.load(DEFAULT_STUDY, published).set_index(KEY).index)
    only_a = set(comparison.only_a.set_index(KEY).index)
    assert only_a | set(cells.index) == published_keys and not only_a & set(cells.index)
    assert comparison.only_b.empty and set(comparison.only_a["dataset"]).isdisjoint({"uc_merced", "flowers102"})


@pytest.mark.slow
def test_swapping_a_and_b_swaps_the_lists_and_the_sign(published: Path, changed: dict[tuple[str, ...], int]):
    forward, backward = compare(DEFAULT_STUDY, CHANGED, published), compare(CHANGED, DEFAULT_STUDY, published)
    assert backward.only_a.empty and backward.only_b.equals(forward.only_a)
    assert np.array_equal(backward.cells["diff"], -forward.cells["diff"])
    assert backward.cells["beyond_noise"].equals(forward.cells["beyond_noise"])


@pytest.mark.slow
def test_the_json_document_has_the_documented_shape(published: Path, changed: dict[tuple[str, ...], int]):
    document = json.loads(json.dumps(to_json(compare(DEFAULT_STUDY, CHANGED, published)), allow_nan=False))
    assert set(document) == {"summary", "cells", "only_a", "only_b"}
    assert document["summary"]["alpha"] == ALPHA and "z test" in document["summary"]["test"]
    for row in document["summary"]["conditions"]:
        assert set(row) == {"condition", "protocol", "n_cells", "mean_abs_diff", "max_abs_diff", "n_beyond_noise"}
    assert len(document["cells"]) == document["summary"]["matched_cells"] == 480
    for cell in document["cells"]:
        assert set(cell) == {*AXES, "conditions"}
        assert set(cell["conditions"]) == {"clean", "linf", "l2", "l1", "common"}
        for value in cell["conditions"].values():
            assert set(value) == {"a", "b", "diff", "beyond_noise"} and isinstance(value["beyond_noise"], bool)
    assert len(document["only_a"]) == document["summary"]["only_a_cells"] == 960 and document["only_b"] == []
    assert all(set(cell) == {*AXES, "conditions"} and len(cell["conditions"]) == 5 for cell in document["only_a"])
    flagged = {(c["dataset"], c["model"], c["loss"], c["protocol"], name)
               for c in document["cells"] for name, v in c["conditions"].items() if v["beyond_noise"]}
    assert flagged == {key for key, examples in changed.items() if abs(examples) > 1}
