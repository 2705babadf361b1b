"""One study from several results roots: `export` writes a study's results to one archive,
`import-study` merges it cell by cell, refuses conflicts and foreign archives, and a kill -9
leaves each cell as it was or whole."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmark import archive, results, tables
from benchmark.archive import export_study, import_study
from benchmark.cell import ROWS_FILE, Cell, read_config, write_config, write_state
from benchmark.cli import main
from benchmark.errors import RFTBenchError
from benchmark.paths import PROJECT_DIR
from benchmark.reference import FLAGS_FILE, import_reference, name_mapping
from benchmark.study import load_option, options, plan
from factories import result_row

# Real demo-study cell configs, kept with the golden sweep fixture; measurements are made up below.
GOLDEN_CELLS = Path(__file__).parent / "fixtures" / "sweep" / "golden" / "cells"
# What was measured, compared across roots (times, hosts and study names differ by design).
MEASURED = ["cell_id", "dataset", "model", "loss", "protocol", "seed", "condition", "n_examples", "n_correct", "accuracy"]


def made_up_rows(cell: Cell, study: str, correct: int = 60) -> list[dict]:
    test_size = cell.config["dataset"]["test_size"]
    return [
        result_row(cell, condition, study=study, n_examples=test_size, n_correct=correct - i,
                   accuracy=(correct - i) / test_size, attempt=1, source="run", host="node1")
        for i, condition in enumerate(cell.config["eval"])
    ]


def write_done_cell(root: Path, study: str, cell: Cell, correct: int = 60) -> Path:
    """A done cell as a worker leaves it: config, state, log, checkpoint, AutoAttack state,
    per-example results, a history table and, last, its rows."""
    cell_dir = cell.directory(root / study)
    write_config(cell, cell_dir, study)
    write_state(cell_dir, "running")
    (cell_dir / "train.log").write_text("epoch 1\n")
    (cell_dir / "ckpt").mkdir()
    (cell_dir / "ckpt" / "last.pt").write_bytes(b"weights")
    (cell_dir / "aa_state").mkdir()
    (cell_dir / "aa_state" / "linf.yaml").write_text("left: 3\n")
    pq.write_table(pa.table({"condition": ["clean"] * 3, "index": [0, 1, 2], "correct": [True, False, True]}),
                   cell_dir / "examples.parquet")
    pq.write_table(pa.table({"study": [study] * 2, "epoch": [0, 1], "train_loss": [2.0, 1.5]}), cell_dir / "history.parquet")
    results.write_rows(cell_dir / ROWS_FILE, made_up_rows(cell, study, correct))
    return cell_dir


@pytest.fixture
def three() -> list[Cell]:
    """Three cells of the golden fixture's configs (no planning: only their configs are used)."""
    return [Cell.from_config(read_config(cell_dir)["config"], cell_dir.name)
            for cell_dir in sorted(GOLDEN_CELLS.iterdir())[:3]]


@pytest.fixture
def exported(tmp_path: Path, three: list[Cell]) -> Path:
    """An archive of study `east` holding the three cells and a flags.csv."""
    for cell in three:
        write_done_cell(tmp_path / "east", "east", cell)
    (tmp_path / "east" / "east" / FLAGS_FILE).write_text("dataset,model,loss,protocol,flag\ndigits,m,l,p,why\n")
    export_study("east", tmp_path / "east.tar.gz", tmp_path / "east")
    return tmp_path / "east.tar.gz"


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` and its bytes (the lock file aside: it holds nothing)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != ".collect.lock"}


def measured(study: str, root: Path) -> pd.DataFrame:
    return tables.load(study, root)[MEASURED].sort_values(["cell_id", "condition"]).reset_index(drop=True)


# --- export ------------------------------------------------------------------------------------

def test_an_archive_holds_the_done_cells_results_and_no_checkpoints(tmp_path: Path, three: list[Cell]):
    for cell in three[:2]:
        write_done_cell(tmp_path, "east", cell)
    write_config(three[2], three[2].directory(tmp_path / "east"), "east")  # pending: nothing to move
    report = export_study("east", tmp_path / "east.tar.gz", tmp_path)
    with tarfile.open(tmp_path / "east.tar.gz") as tar:
        names = tar.getnames()
        manifest = json.loads(tar.extractfile(names[0]).read())
    assert names[0] == "manifest.json" and report.cells == 2 and not report.skipped
    assert manifest["study"] == "east" and manifest["cells"] == sorted(c.id for c in three[:2])
    assert sorted(names[1:]) == sorted(manifest["files"]) == sorted(
        f"cells/{cell.id}/{name}" for cell in three[:2]
        for name in ("config.yaml", "rows.parquet", "examples.parquet", "history.parquet"))


def test_a_cell_whose_rows_cannot_be_trusted_is_left_out_and_named(tmp_path: Path, three: list[Cell]):
    write_done_cell(tmp_path, "east", three[0])
    foreign = write_done_cell(tmp_path, "east", three[1])
    (foreign / ROWS_FILE).write_bytes((three[0].directory(tmp_path / "east") / ROWS_FILE).read_bytes())
    assert main(["export", "study=east", f"paths.results={tmp_path}", "--out", str(tmp_path / "a.tar.gz")]) == 1
    with tarfile.open(tmp_path / "a.tar.gz") as tar:
        assert json.loads(tar.extractfile("manifest.json").read())["cells"] == [three[0].id]


def test_an_imported_reference_study_exports_what_it_has(tmp_path: Path):
    """Published rows (no per-example results, no histories) and their flags.csv travel whole."""
    theirs = {axis: {ours: name for name, ours in name_mapping(axis, {
        o: load_option(axis, o).get("study_name") for o in options(axis)}).items()}
        for axis in ("dataset", "model", "loss", "protocol")}
    table = tmp_path / "published.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["dataset", "backbone", "loss_function", "ft_strategy",
                         "clean_acc", "Linf_acc", "L2_acc", "L1_acc", "common_acc"])
        for protocol in ("lp50", "fft50"):  # the LP-50 cell of this backbone is a published flaw
            writer.writerow([theirs["dataset"]["caltech101"], theirs["model"]["tf_efficientnet_b0.in1k"],
                             theirs["loss"]["trades"], theirs["protocol"][protocol], 0.5, 0.2, 0.3, 0.25, 0.4])
    import_reference(table, "published", tmp_path / "one")
    export_study("published", tmp_path / "published.tar.gz", tmp_path / "one")

    imported = import_study(tmp_path / "published.tar.gz", "copy", tmp_path / "two")
    assert len(imported.added) == 2 and not imported.collected.problems
    flags = (tmp_path / "one" / "published" / FLAGS_FILE).read_text()
    assert len(flags.splitlines()) == 2 and (tmp_path / "two" / "copy" / FLAGS_FILE).read_text() == flags
    copy, original = tables.load("copy", tmp_path / "two"), tables.load("published", tmp_path / "one")
    assert set(copy["study"]) == {"copy"} and set(copy["source"]) == {"imported"}
    pd.testing.assert_frame_equal(copy.drop(columns="study"), original.drop(columns="study"))


# --- import ------------------------------------------------------------------------------------

def test_importing_the_same_archive_twice_changes_nothing(tmp_path: Path, exported: Path, three: list[Cell]):
    first = import_study(exported, "east", tmp_path / "west")
    assert sorted(first.added) == sorted(c.id for c in three) and not first.unchanged
    before = {p: os.stat(tmp_path / "west" / "east" / p).st_ino for p in snapshot(tmp_path / "west" / "east")}
    second = import_study(exported, "east", tmp_path / "west")
    assert not second.added and sorted(second.unchanged) == sorted(c.id for c in three) and second.collected.read == 0
    assert {p: os.stat(tmp_path / "west" / "east" / p).st_ino for p in snapshot(tmp_path / "west" / "east")} == before


def test_imported_cells_name_the_target_study_and_keep_everything_else(tmp_path: Path, exported: Path, three: list[Cell]):
    report = import_study(exported, "merged", tmp_path / "west")
    assert report.collected.cells == 3 and not report.collected.problems
    for cell in three:
        source, target = cell.directory(tmp_path / "east" / "east"), cell.directory(tmp_path / "west" / "merged")
        assert read_config(target)["study"] == "merged"
        assert read_config(target)["config"] == read_config(source)["config"]
        assert pq.read_table(target / "history.parquet")["study"].to_pylist() == ["merged", "merged"]
        assert (target / "examples.parquet").read_bytes() == (source / "examples.parquet").read_bytes()
        assert not (target / "ckpt").exists() and not (target / "aa_state").exists()
    long = tables.load("merged", tmp_path / "west")
    assert set(long["study"]) == {"merged"}
    pd.testing.assert_frame_equal(measured("merged", tmp_path / "west"), measured("east", tmp_path / "east"))
    assert (tmp_path / "west" / "merged" / FLAGS_FILE).read_text().endswith("digits,m,l,p,why\n")


def test_a_conflicting_cell_is_refused_and_listed_and_nothing_is_written(tmp_path: Path, exported: Path, three: list[Cell]):
    write_done_cell(tmp_path / "west", "east", three[1], correct=70)  # other measurements
    tables.load("east", tmp_path / "west")
    before = snapshot(tmp_path / "west" / "east")
    with pytest.raises(RFTBenchError) as refused:
        import_study(exported, "east", tmp_path / "west")
    assert f"1 cells of {exported.name}" in str(refused.value) and three[1].id in str(refused.value)
    assert "accuracy" in str(refused.value) and three[0].id not in str(refused.value)
    assert snapshot(tmp_path / "west" / "east") == before
    assert not (tmp_path / "west" / "east" / archive.STAGING_DIR).exists()


def test_the_same_measurements_from_another_run_keep_the_studys_rows(tmp_path: Path, exported: Path, three: list[Cell]):
    cell_dir = write_done_cell(tmp_path / "west", "east", three[0])
    results.write_rows(cell_dir / ROWS_FILE, [{**row, "host": "node9"} for row in made_up_rows(three[0], "east")])
    kept = (cell_dir / ROWS_FILE).read_bytes()
    report = import_study(exported, "east", tmp_path / "west")
    assert report.rerun == [three[0].id] and len(report.added) == 2
    assert (cell_dir / ROWS_FILE).read_bytes() == kept


def test_a_cell_without_rows_is_completed_by_the_import(tmp_path: Path, exported: Path, three: list[Cell]):
    failed = three[2].directory(tmp_path / "west" / "east")
    write_config(three[2], failed, "east")
    write_state(failed, "failed", reason="out of memory")
    assert three[2].id in import_study(exported, "east", tmp_path / "west").added
    assert results.read_rows(failed / ROWS_FILE).num_rows == len(three[2].config["eval"])


def _archive_with(tmp_path: Path, exported: Path, change) -> Path:
    """A copy of `exported` whose members pass through `change(name, data) -> data`."""
    out = tmp_path / "changed.tar.gz"
    with tarfile.open(exported) as source, tarfile.open(out, "w:gz") as target:
        for member in source.getmembers():
            data = change(member.name, source.extractfile(member).read())
            member.size = len(data)
            target.addfile(member, io.BytesIO(data))
    return out


def _flip_last_byte(name: str, data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1]) if name.endswith(ROWS_FILE) else data


@pytest.mark.parametrize("make, message", [
    (lambda tmp, good: (tmp / "notes.txt").write_text("hello") and tmp / "notes.txt", "not a tar file"),
    (lambda tmp, good: _archive_with(tmp, good, lambda name, data: b"{}" if name == "manifest.json" else data),
     "not an rftbench study archive"),
    (lambda tmp, good: _archive_with(tmp, good, _flip_last_byte), "does not match its sha256"),
])
def test_a_foreign_or_corrupted_archive_is_refused_before_the_study_exists(tmp_path: Path, exported: Path, make, message):
    bad = make(tmp_path, exported)
    assert main(["import-study", str(bad), f"paths.results={tmp_path / 'west'}"]) == 2
    with pytest.raises(RFTBenchError, match=message):
        import_study(bad, "east", tmp_path / "west")
    assert not (tmp_path / "west" / "east").exists()


# --- kill -9 -----------------------------------------------------------------------------------

# Runs an import that kills itself (SIGKILL: no cleanup runs) right after the first call of
# `archive.<step>`: after the first member is staged, or after the first cell is placed.
KILLED_IMPORT = """
import os, signal, sys
from pathlib import Path
from benchmark import archive
step = sys.argv[1]
real = getattr(archive, step)
def then_die(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
setattr(archive, step, then_die)
archive.import_study(Path(sys.argv[2]), "east", Path(sys.argv[3]))
"""


@pytest.mark.parametrize("step", ["_stage_member", "_place_cell"])
def test_a_kill_mid_import_leaves_each_cell_as_before_or_whole_and_the_next_import_finishes(
        tmp_path: Path, exported: Path, three: list[Cell], step: str):
    west = tmp_path / "west"
    write_done_cell(west, "east", three[0])  # the study already holds one of the cells
    before = snapshot(west / "east")
    killed = subprocess.run([sys.executable, "-c", KILLED_IMPORT, step, str(exported), str(west)],
                            cwd=PROJECT_DIR, env={**os.environ, "PYTHONPATH": str(PROJECT_DIR)})
    assert killed.returncode == -9
    study = west / "east"
    for cell in three:  # each cell of the study as before (absent) or whole
        cell_dir = cell.directory(study)
        assert not cell_dir.exists() or results.read_rows(cell_dir / ROWS_FILE).num_rows == len(cell.config["eval"])
    placed = [cell for cell in three[1:] if cell.directory(study).exists()]
    assert len(placed) == (1 if step == "_place_cell" else 0)
    if step == "_stage_member":
        assert {p: b for p, b in snapshot(study).items() if not p.startswith(archive.STAGING_DIR)} == before

    report = import_study(exported, "east", west)  # finishes (or drops) the interrupted import first
    assert not (study / archive.STAGING_DIR).exists() and report.collected.cells == 3
    pd.testing.assert_frame_equal(measured("east", west), measured("east", tmp_path / "east"))


# --- a study split over two results roots --------------------------------------------------------

@pytest.mark.slow  # trains three tiny cells (one grid point, two seeds, one of them twice)
def test_a_study_split_over_two_roots_and_merged_equals_the_study_run_in_one(roots: dict[str, Path], tmp_path: Path):
    study = ["study=demo", "model=test_resnet.demo", "loss=classic_at", "protocol=lp50", "protocol.epochs=1",
             "eval=[clean]", "dataset.test_size=20"]
    one, two, merged = tmp_path / "cluster1", tmp_path / "cluster2", tmp_path / "merged"
    for root, seeds in ((one, "seed=0"), (two, "seed=1")):
        assert main(["launch", *study, seeds, f"paths.results={root}"]) == 0
        assert main(["export", "study=demo", f"paths.results={root}", "--out", str(root / "demo.tar.gz")]) == 0
    for root in (one, two):
        assert main(["import-study", str(root / "demo.tar.gz"), f"paths.results={merged}"]) == 0
    # The same study run in one root: cluster 1 runs the seed it lacked.
    assert main(["launch", *study, "seed=0,1", f"paths.results={one}"]) == 0
    assert main(["collect", "study=demo", f"paths.results={one}"]) == 0
    ids = {cell.id for cell in plan([*study, "seed=0,1"]).cells}
    assert set(tables.load("demo", merged)["cell_id"]) == ids
    pd.testing.assert_frame_equal(measured("demo", merged), measured("demo", one))


def test_the_archive_module_imports_no_torch():
    script = ("import sys\nimport benchmark.archive\n"
              "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'hydra', 'pyautoattack'))\n"
              "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=PROJECT_DIR,
                   env={**os.environ, "PYTHONPATH": str(PROJECT_DIR)})
