"""Per-cell hyper-parameter tables: the values enter the cells' resolved configs (and ids) with
the documented precedence, the paper study trains with the authors' tuned table (or its named
fallback), and a bad table is refused before anything is written, naming file, line and value."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from benchmark.errors import RFTBenchError
from benchmark.study import load_option, plan
from conftest import SHARED_DIR

TUNED_CSV = SHARED_DIR / "reference" / "tuned_hparams.csv"
POINT = ["study=demo", "model=test_resnet.demo", "loss=classic_at"]
HEADER = ["dataset", "model", "loss", "protocol", "lr_backbone", "lr_head", "weight_decay_backbone",
          "weight_decay_head", "cosine", "n_trials"]


def write_table(path: Path, rows: list[list[object]], header: list[str] = HEADER) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


@pytest.fixture
def table(tmp_path: Path) -> Path:
    return write_table(tmp_path / "tuned.csv", [
        ["digits", "test_resnet.demo", "classic_at", "fft5", 0.002, 0.03, 1e-4, 2e-4, "TRUE", 7],
        ["digits", "test_resnet.demo", "classic_at", "lp50", "", 0.05, "", 3e-3, "False", 4],
    ])


def test_table_values_reach_the_cells_they_name_and_enter_their_ids(table: Path):
    plain = {c.protocol: c for c in plan(POINT).cells}
    tuned = {c.protocol: c for c in plan([*POINT, f"study.hparams={table}"]).cells}
    fft5 = tuned["fft5"].config["protocol"]
    assert fft5["optimizer"] | {"betas": None} == {"betas": None, "lr_backbone": 0.002, "lr_head": 0.03,
                                                  "weight_decay_backbone": 1e-4, "weight_decay_head": 2e-4}
    assert fft5["cosine"] is True and fft5["epochs"] == plain["fft5"].config["protocol"]["epochs"]
    lp50 = tuned["lp50"].config["protocol"]  # empty backbone columns keep the protocol's values
    assert lp50["optimizer"]["lr_head"] == 0.05 and lp50["cosine"] is False
    assert lp50["optimizer"]["lr_backbone"] == plain["lp50"].config["protocol"]["optimizer"]["lr_backbone"]
    assert tuned["fft50"].id == plain["fft50"].id  # a cell the table does not name is unchanged
    assert tuned["fft5"].id != plain["fft5"].id and tuned["lp50"].id != plain["lp50"].id


def test_precedence_option_then_study_then_table_then_command_line(table: Path):
    demo_lr = load_option("study", "demo")["set_per_option"]["protocol/fft5"]["optimizer"]["lr_head"]
    assert load_option("protocol", "fft5")["optimizer"]["lr_head"] != demo_lr
    by_study = {c.protocol: c for c in plan(POINT).cells}["fft5"]
    assert by_study.config["protocol"]["optimizer"]["lr_head"] == demo_lr  # study over option
    study = plan([*POINT, "protocol=fft5", f"study.hparams={table}"])
    assert study.cells[0].config["protocol"]["optimizer"]["lr_head"] == 0.03  # table over study
    assert study.sources(study.cells[0])["protocol.optimizer.lr_head"] == "study.hparams (tuned.csv)"
    cli = plan([*POINT, "protocol=fft5", f"study.hparams={table}", "protocol.optimizer.lr_head=0.5"])
    assert cli.cells[0].config["protocol"]["optimizer"]["lr_head"] == 0.5  # command line over table
    assert cli.sources(cli.cells[0])["protocol.optimizer.lr_head"].startswith("command line")


@pytest.mark.parametrize(("row", "named"), [
    (["digits", "test_resnet.demo", "classic_at", "fft55", 1, 1, 0, 0, "true", 1], "'fft55'"),
    (["digits", "test_resnt.demo", "classic_at", "fft5", 1, 1, 0, 0, "true", 1], "'test_resnt.demo'"),
    (["digits", "test_resnet.demo", "classic_at", "fft5", "fast", 1, 0, 0, "true", 1], "'fast'"),
    (["digits", "test_resnet.demo", "classic_at", "fft5", 0, 1, 0, 0, "true", 1], "learning rate must be > 0"),
    (["digits", "test_resnet.demo", "classic_at", "fft5", 1, 1, -1, 0, "true", 1], "weight decay must be >= 0"),
    (["digits", "test_resnet.demo", "classic_at", "fft5", 1, 1, 0, 0, "yes", 1], "'yes'"),
])
def test_a_bad_row_is_refused_naming_file_line_and_value(tmp_path: Path, roots, row, named):
    good = ["digits", "test_resnet.demo", "classic_at", "fft50", 1, 1, 0, 0, "true", 1]
    path = write_table(tmp_path / "bad.csv", [good, row])
    with pytest.raises(RFTBenchError) as err:
        plan([*POINT, f"study.hparams={path}"])
    assert str(path) in str(err.value) and "line 3" in str(err.value) and named in str(err.value)
    assert not any(roots["results"].iterdir())


def test_a_missing_column_and_a_duplicated_cell_are_refused(tmp_path: Path):
    row = ["digits", "test_resnet.demo", "classic_at", "fft5", 1, 1, 0, 0, "true", 1]
    with pytest.raises(RFTBenchError, match="missing columns cosine"):
        plan([*POINT, f"study.hparams={write_table(tmp_path / 'a.csv', [row[:-2]], HEADER[:-2])}"])
    with pytest.raises(RFTBenchError, match="a second row for cell digits/test_resnet.demo/classic_at/fft5.*line 2"):
        plan([*POINT, f"study.hparams={write_table(tmp_path / 'b.csv', [row, row])}"])
    with pytest.raises(RFTBenchError, match="does not exist"):
        plan([*POINT, f"study.hparams={tmp_path / 'none.csv'}"])


def test_a_parquet_table_is_read_like_a_csv(table: Path, tmp_path: Path):
    import pyarrow.csv

    parquet = tmp_path / "tuned.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pyarrow.csv.read_csv(table, convert_options=pyarrow.csv.ConvertOptions(
        column_types={"lr_backbone": "string", "weight_decay_backbone": "string"})), parquet)
    from_csv = [c.config for c in plan([*POINT, f"study.hparams={table}"]).cells]
    assert [c.config for c in plan([*POINT, f"study.hparams={parquet}"]).cells] == from_csv


def paper_cells():
    return {tuple(c.axes.values()): c for c in plan(["study=paper"]).cells}


def test_the_shipped_paper_table_is_the_authors_after_mapping_names():
    if not TUNED_CSV.exists():
        pytest.skip(f"the authors' tuned table is absent: {TUNED_CSV} (shared/ is not beside the project)")
    from benchmark.reference import name_mapping
    from benchmark.study import options

    theirs = {"dataset": "dataset", "model": "backbone", "loss": "loss_function", "protocol": "ft_strategy"}
    names = {axis: name_mapping(axis, {o: load_option(axis, o).get("study_name") for o in options(axis)})
             for axis in theirs}
    with open(TUNED_CSV, newline="") as f:
        expected = {tuple(names[a][row[c]] for a, c in theirs.items()): row for row in csv.DictReader(f)}
    shipped_path = Path(load_option("study", "paper")["hparams"])
    with open(shipped_path, newline="") as f:
        shipped = {tuple(row[a] for a in theirs): row for row in csv.DictReader(f)}
    assert shipped.keys() == expected.keys() and len(shipped) == 1337
    for key, row in shipped.items():
        mine = expected[key]
        probe = key[3] == "lp50"
        assert (row["lr_head"], row["weight_decay_head"]) == (mine["lr2"], mine["weight_decay2"])
        assert (row["lr_backbone"], row["weight_decay_backbone"]) == (("", "") if probe else (mine["lr1"], mine["weight_decay1"]))
        assert row["cosine"] == mine["scheduler"].lower()


def test_paper_cells_train_with_the_tuned_values_or_the_named_fallback(capsys):
    cells = paper_cells()
    shipped_path = Path(load_option("study", "paper")["hparams"])
    with open(shipped_path, newline="") as f:
        rows = {tuple(row[a] for a in ("dataset", "model", "loss", "protocol")): row for row in csv.DictReader(f)}
    fallback = load_option("study", "paper")["hparams_fallback"]["lp50"]
    assert fallback == {"lr_head": 0.00012164941464151844, "weight_decay_head": 0.0007608481233714791, "cosine": False}
    missing = [key for key in cells if key not in rows]
    assert len(missing) == 103 and {key[3] for key in missing} == {"lp50"}
    for key, cell in list(cells.items())[::37]:
        protocol = cell.config["protocol"]
        row = rows.get(key)
        if row is None:
            assert protocol["optimizer"]["lr_head"] == fallback["lr_head"] and protocol["cosine"] is False
        else:
            assert protocol["optimizer"]["lr_head"] == float(row["lr_head"])
            assert protocol["cosine"] == (row["cosine"] == "true")
    from benchmark.cli import main

    assert main(["plan", "study=paper", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)  # stdout holds only the document
    assert report["notes"]["hparams"] | {"table": None} == {
        "table": None, "points": 1440, "from_table": 1337, "from_fallback": 103, "from_protocol": 0}
    assert main(["plan", "study=paper"]) == 0
    assert "103 from the study's hparams_fallback" in capsys.readouterr().err


def test_show_prints_a_cells_config_and_sources_as_json(capsys, table: Path):
    from benchmark.cli import main

    args = ["show", "digits__test_resnet.demo__classic_at__fft5__seed0", *POINT, "protocol=fft5",
            f"study.hparams={table}", "--format", "json"]
    assert main(args) == 0
    shown = json.loads(capsys.readouterr().out)
    assert set(shown) == {"cell_id", "slug", "study", "config", "sources", "notes"}
    assert shown["config"]["protocol"]["optimizer"]["lr_backbone"] == 0.002
    assert shown["config"]["protocol"]["cosine"] is True
    assert shown["sources"]["protocol.cosine"] == "study.hparams (tuned.csv)"
    study = plan([*POINT, "protocol=fft5", f"study.hparams={table}"])
    assert shown["cell_id"] == study.cells[0].id
    assert main(["show", "digits__test_resnet.demo__classic_at__fft4", *POINT]) == 2
    assert "closest slugs: digits__test_resnet.demo__classic_at__fft5__seed0" in capsys.readouterr().err
