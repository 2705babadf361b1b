"""`import-reference`: the published per-cell table as a study of our schema, names mapped through
conf/ both ways, numbers kept exactly, idempotent, and never mixed with other results."""
from __future__ import annotations

import csv
import shutil
from argparse import Namespace
from pathlib import Path

import pandas as pd
import pyarrow.compute as pc
import pytest

from benchmark import results, tables
from benchmark.cell import AXES, ROWS_FILE
from benchmark.collect import collect
from benchmark.errors import RFTBenchError
from benchmark.query import query
from benchmark.reference import (
    AXIS_COLUMNS,
    CONDITIONS,
    DEFAULT_STUDY,
    FLAG_COLUMNS,
    FLAGS_FILE,
    PUBLISHED_FLAWS,
    PUBLISHED_STUDY,
    import_command,
    import_reference,
    name_mapping,
    published_flags,
)
from benchmark.study import load_option, options, plan
from fixtures.make_sweep import rows

SWEEP = Path(__file__).parent / "fixtures" / "sweep"
# "At chance": clean accuracy within this of 1 / num_classes. A few points, because a model that
# predicts one class scores that class' share: on Caltech-101 the largest (airplanes) is about 9%.
NEAR_CHANCE = 0.1


def our_names(axis: str) -> dict[str, str]:
    """Their name -> our option, for an axis, from conf/."""
    return name_mapping(axis, {o: load_option(axis, o).get("study_name") for o in options(axis)})


def published(reference_csv: Path) -> list[dict[str, str]]:
    """The published rows as text, read without pandas (so its float parsing is checked too)."""
    with reference_csv.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def imported(published_root: Path) -> Path:
    """The published table imported once as the default study (conftest)."""
    return published_root


def test_two_options_claiming_one_published_name_is_an_error():
    with pytest.raises(RFTBenchError, match="'TRADES' \\(conf/loss/a.yaml and conf/loss/b.yaml\\)"):
        name_mapping("loss", {"a": "TRADES", "b": "TRADES", "c": None})
    assert name_mapping("loss", {"a": "TRADES", "c": None}) == {"TRADES": "a"}


def test_conf_maps_every_published_name_to_one_option_of_the_paper_study(reference_csv: Path):
    rows = published(reference_csv)
    study = plan([f"study={PUBLISHED_STUDY}"])
    for axis, column in AXIS_COLUMNS.items():
        mapping = our_names(axis)
        theirs = {row[column] for row in rows}
        assert theirs <= mapping.keys(), f"{axis}: unmapped {sorted(theirs - mapping.keys())}"
        assert {mapping[name] for name in theirs} == {getattr(cell, axis) for cell in study.cells}


def test_unknown_published_names_are_all_listed(reference_csv: Path, tmp_path: Path):
    table = pd.read_csv(reference_csv)
    table.loc[0, "backbone"] = "resnet9000"
    table.loc[1, "backbone"] = "vit_gigantic"
    table.loc[2, "dataset"] = "imagenet-21k"
    bad = tmp_path / "bad.csv"
    table.to_csv(bad, index=False)
    with pytest.raises(RFTBenchError) as caught:
        import_reference(bad, "bad", tmp_path / "results")
    message = str(caught.value)
    for name in ("'resnet9000'", "'vit_gigantic'", "'imagenet-21k'"):
        assert name in message
    assert not (tmp_path / "results").exists()  # nothing written


def test_import_into_a_configured_study_is_refused(reference_csv: Path, tmp_path: Path):
    with pytest.raises(RFTBenchError, match="study=paper is a configured study"):
        import_reference(reference_csv, PUBLISHED_STUDY, tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_table_without_the_accuracy_columns_is_refused(reference_csv: Path, tmp_path: Path):
    bad = tmp_path / "bad.csv"
    pd.read_csv(reference_csv).drop(columns=["L1_acc"]).to_csv(bad, index=False)
    with pytest.raises(RFTBenchError, match="no columns \\['L1_acc'\\]"):
        import_reference(bad, "bad", tmp_path)


@pytest.mark.slow
def test_import_gives_every_published_cell_and_measurement(imported: Path):
    long = tables.load(DEFAULT_STUDY, imported)
    cells = tables.load_cells(DEFAULT_STUDY, imported)
    assert len(long) == 7_200 and len(cells) == 1_440
    per_cell = cells.drop_duplicates(["cell_id"])
    assert set(per_cell.groupby("dataset").size()) == {240}
    assert set(per_cell.groupby("model").size()) == {36} and per_cell["model"].nunique() == 40
    assert set(per_cell.groupby("loss").size()) == {720}
    assert set(per_cell.groupby("protocol").size()) == {480}
    assert set(long["condition"]) == set(CONDITIONS.values())
    assert set(cells["state"]) == {"done"} and not cells["truncated"].any()
    assert set(long["source"]) == {"imported"} and long["source_file"].str.fullmatch(r"results_dataset\.csv sha256:[0-9a-f]{64}").all()
    assert long[["seed", "attempt", "git_commit", "torch_version", "started_at"]].isna().all().all()
    assert set(cells["cell_id"]) == {cell.id for cell in plan([f"study={PUBLISHED_STUDY}"]).cells}


@pytest.mark.slow
def test_counts_use_the_configured_test_size_and_keep_the_published_accuracy(imported: Path):
    long = tables.load(DEFAULT_STUDY, imported)
    sizes = {name: load_option("dataset", name)["test_size"] for name in long["dataset"].unique()}
    assert (long["n_examples"] == long["dataset"].map(sizes)).all() and sizes["uc_merced"] == 420
    assert (long["n_correct"] == (long["accuracy"] * long["n_examples"]).round()).all()
    linf = long[long["condition"] == "linf"]
    assert set(linf["norm"]) == {"Linf"} and set(linf["attack"]) == {"autoattack-standard"}
    assert set(linf["epsilon"]) == {load_option("eval", "linf")["linf"]["eps"]}


@pytest.mark.slow
def test_querying_a_cell_returns_exactly_its_published_numbers(imported: Path, reference_csv: Path):
    mappings = {axis: our_names(axis) for axis in AXES}
    rows = published(reference_csv)
    for row in rows[::97]:
        cell = {axis: mappings[axis][row[column]] for axis, column in AXIS_COLUMNS.items()}
        where = " AND ".join(f"{axis} = '{name}'" for axis, name in cell.items())
        frame = query(f"SELECT condition, accuracy FROM measurements WHERE {where}", DEFAULT_STUDY, imported)
        assert dict(zip(frame["condition"], frame["accuracy"])) == {ours: float(row[theirs]) for theirs, ours in CONDITIONS.items()}
        wide = query(f"SELECT * FROM accuracy WHERE {where}", DEFAULT_STUDY, imported)
        assert len(wide) == 1 and [wide[ours][0] for ours in CONDITIONS.values()] == [float(row[c]) for c in CONDITIONS]
    every = tables.load(DEFAULT_STUDY, imported).set_index([*AXES, "condition"])["accuracy"]
    expected = {
        (*(mappings[axis][row[column]] for axis, column in AXIS_COLUMNS.items()), ours): float(row[theirs])
        for row in rows for theirs, ours in CONDITIONS.items()
    }
    assert every.to_dict() == expected


@pytest.mark.slow
def test_importing_twice_gives_the_same_tables(imported: Path, reference_csv: Path, tmp_path: Path):
    first = tables.load(DEFAULT_STUDY, imported), tables.load_cells(DEFAULT_STUDY, imported)
    assert collect(imported / DEFAULT_STUDY).read == 0  # collect keeps the import intact
    flags_written = (imported / DEFAULT_STUDY / FLAGS_FILE).stat().st_mtime_ns
    code = import_command(Namespace(path=str(reference_csv), overrides=[f"paths.results={imported}"]))
    assert code == 0
    assert import_reference(reference_csv, DEFAULT_STUDY, imported).read == 0  # no file changed
    assert (imported / DEFAULT_STUDY / FLAGS_FILE).stat().st_mtime_ns == flags_written
    pd.testing.assert_frame_equal(tables.load(DEFAULT_STUDY, imported), first[0])
    pd.testing.assert_frame_equal(tables.load_cells(DEFAULT_STUDY, imported), first[1])


@pytest.mark.slow
def test_import_refuses_a_study_holding_other_results(imported: Path, reference_csv: Path):
    study = imported / DEFAULT_STUDY
    own = next(iter(plan([f"study={PUBLISHED_STUDY}", "dataset=uc_merced", "model=resnet50.a1_in1k", "loss=trades", "protocol=fft5"]).cells))
    original = (study / "cells" / own.id / ROWS_FILE).read_bytes()
    results.write_table(study / "cells" / own.id / ROWS_FILE,
                        results.rows_table([{**r, "study": DEFAULT_STUDY} for r in rows(own, {})]))
    try:
        with pytest.raises(RFTBenchError, match="already holds 1 cells of own runs: import into another study=NAME"):
            import_reference(reference_csv, DEFAULT_STUDY, imported)
        measurements = tables.load(DEFAULT_STUDY, imported)
        mine = measurements[measurements["cell_id"] == own.id]
        assert set(mine["source"]) == {"run"}  # the own result was not overwritten
    finally:
        (study / "cells" / own.id / ROWS_FILE).write_bytes(original)
        collect(study)


def test_import_into_a_study_of_own_runs_is_refused(reference_csv: Path, tmp_path: Path):
    shutil.copytree(SWEEP / "golden", tmp_path / "golden")
    with pytest.raises(RFTBenchError, match="study 'golden' already holds"):
        import_reference(reference_csv, "golden", tmp_path)
    assert set(pc.unique(results.read_rows(tmp_path / "golden" / results.MEASUREMENTS_FILE)["source"]).to_pylist()) == {"run"}
    assert len(list((tmp_path / "golden" / "cells").iterdir())) == 12


def test_every_published_flaw_names_an_option_and_flags_all_its_paper_cells():
    cells = plan([f"study={PUBLISHED_STUDY}"]).cells
    flags = published_flags(cells)
    assert list(flags.columns) == list(FLAG_COLUMNS) and flags["flag"].str.contains("strict=False").all()
    for flaw in PUBLISHED_FLAWS:
        assert flaw.model in options("model") and flaw.protocol in options("protocol")
        mine = flags[(flags["model"] == flaw.model) & (flags["protocol"] == flaw.protocol)]
        expected = {tuple(c.axes.values()) for c in cells if (c.model, c.protocol) == (flaw.model, flaw.protocol)}
        assert set(mine[list(AXES)].itertuples(index=False, name=None)) == expected and len(expected) == 12
    assert len(flags) == 12 * len(PUBLISHED_FLAWS)  # 6 datasets x 2 losses each, no other cell


@pytest.mark.slow
def test_import_flags_exactly_the_lp50_cells_of_the_backbones_that_did_not_load(imported: Path):
    flags = pd.read_csv(imported / DEFAULT_STUDY / FLAGS_FILE)
    assert list(flags.columns) == list(FLAG_COLUMNS)
    cells = tables.load_cells(DEFAULT_STUDY, imported)
    flawed = {(flaw.model, flaw.protocol) for flaw in PUBLISHED_FLAWS}
    expected = cells[[(m, p) in flawed for m, p in zip(cells["model"], cells["protocol"])]]
    assert sorted(flags[list(AXES)].itertuples(index=False, name=None)) == \
        sorted(expected[list(AXES)].itertuples(index=False, name=None))
    assert len(flags) == 24 and set(flags["protocol"]) == {"lp50"}  # 2 backbones x 6 datasets x 2 losses


@pytest.mark.slow
def test_the_flagged_cells_published_clean_accuracy_is_at_chance(imported: Path):
    long = tables.load(DEFAULT_STUDY, imported)
    clean = long[long["condition"] == "clean"]
    flags = pd.read_csv(imported / DEFAULT_STUDY / FLAGS_FILE)
    flagged = flags.merge(clean, on=list(AXES), how="left")
    flagged["chance"] = [1 / load_option("dataset", name)["num_classes"] for name in flagged["dataset"]]
    assert len(flagged) == len(flags) and flagged["accuracy"].notna().all()
    assert ((flagged["accuracy"] - flagged["chance"]).abs() <= NEAR_CHANCE).all()


@pytest.mark.slow
def test_no_other_backbone_is_at_chance_on_every_dataset_under_a_flagged_protocol(imported: Path):
    long = tables.load(DEFAULT_STUDY, imported)
    clean = long[long["condition"] == "clean"]
    chance = clean["dataset"].map(lambda name: 1 / load_option("dataset", name)["num_classes"])
    at_chance = clean.assign(at=(clean["accuracy"] - chance).abs() <= NEAR_CHANCE).groupby(["protocol", "model"])["at"].all()
    for protocol in {flaw.protocol for flaw in PUBLISHED_FLAWS}:
        models = set(at_chance[protocol].index[at_chance[protocol]])
        assert models == {flaw.model for flaw in PUBLISHED_FLAWS if flaw.protocol == protocol}
