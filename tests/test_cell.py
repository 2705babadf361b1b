"""Cell state files and atomic writes: a reader never sees half a file."""
from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from benchmark import cell as cells
from benchmark.atomic import write_atomic, write_text_atomic
from benchmark.study import plan


def test_atomic_write_leaves_old_file_when_writer_fails(tmp_path: Path):
    target = tmp_path / "f.txt"
    write_text_atomic(target, "old")

    def crash(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_atomic(target, crash)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temporary left behind


def _rewrite_forever(path: str, n: int) -> None:
    for i in range(n):
        write_text_atomic(Path(path), str(i % 10) * 10_000)


def test_concurrent_reader_sees_only_whole_files(tmp_path: Path):
    target = tmp_path / "f.txt"
    write_text_atomic(target, "0" * 10_000)
    writer = multiprocessing.get_context("spawn").Process(target=_rewrite_forever, args=(str(target), 300))
    writer.start()
    seen = set()
    while writer.is_alive():
        text = target.read_text()
        assert len(text) == 10_000 and len(set(text)) == 1
        seen.add(text[0])
    writer.join()
    assert writer.exitcode == 0
    assert len(seen) > 1  # the reader really raced the writer


def test_state_transitions_count_attempts(tmp_path: Path):
    assert cells.read_state(tmp_path)["state"] == "pending"
    cells.write_state(tmp_path, "running")
    cells.write_state(tmp_path, "failed", reason="boom")
    cells.write_state(tmp_path, "running")
    state = cells.read_state(tmp_path)
    assert state["state"] == "running" and state["attempt"] == 2
    (tmp_path / cells.ROWS_FILE).write_bytes(b"")
    assert cells.read_state(tmp_path)["state"] == "done"


def test_cell_config_is_written_once_and_read_back(tmp_path: Path):
    cell = plan(["study=demo"]).cells[0]
    cells.write_config(cell, tmp_path, "demo")
    document = cells.read_config(tmp_path)
    assert document["cell_id"] == cell.id == cells.cell_id(document["config"])
    assert document["slug"] == cell.slug and document["study"] == "demo"
    before = os.stat(tmp_path / cells.CONFIG_FILE).st_mtime_ns
    cells.write_config(cell, tmp_path, "demo")
    assert os.stat(tmp_path / cells.CONFIG_FILE).st_mtime_ns == before


def test_grid_ids_are_the_hashes_of_the_whole_configs():
    """Keys that sort otherwise once quoted and escaped ("a" < "a!" but '"a":' > '"a!":'; "é"
    after "z" but escaped before), non-ASCII values, nested unsorted dicts, numbers of every
    kind: each id is cell_id of the whole config."""
    choices = {
        "b": [{"z": 1, "a": [1.5, None, True]}, {"é": "ü\n\"", "a": {"y": 2, "x": 1e-7}}],
        "a": [0, -1, 2**70],
        "a!": ["x", 3],
        "é": [{}],
        "z": [[], "\u2603"],
    }
    configs = list(cells.grid(choices))
    assert len(configs) == 2 * 3 * 2 * 1 * 2
    for id_, config in configs:
        assert list(config) == list(choices) and id_ == cells.cell_id(config)
    # product order: the first key varies slowest
    assert [config["z"] for _, config in configs[:2]] == [[], "\u2603"]


def test_a_cells_slug_names_its_axes_and_seed():
    cell = plan(["study=demo", "model=test_vit.demo", "loss=trades", "protocol=lp50", "seed=3"]).cells[0]
    assert cell.seed == 3 and cell.slug == "digits__test_vit.demo__trades__lp50__seed3"


def test_only_cells_with_a_directory_are_listed(tmp_path: Path):
    assert cells.cells_with_directory(tmp_path) == set()
    study = plan(["study=demo"])
    for cell in study.cells[:2]:
        cell.directory(tmp_path).mkdir(parents=True)
    (tmp_path / cells.CELLS_DIR / "stray-file").write_text("")
    assert cells.cells_with_directory(tmp_path) == {c.id for c in study.cells[:2]}
