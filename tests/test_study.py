"""Planning: the paper study composes into exactly its 1,440 cells, ids are stable, and every
bad name or override is refused with a message naming it and the valid choices."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from benchmark.cell import AXES, cell_id
from benchmark.errors import RFTBenchError
from benchmark.study import load_option, options, plan


def test_paper_study_has_1440_valid_cells():
    study = plan(["study=paper"])
    assert len(study.cells) == 1440
    assert len({c.id for c in study.cells}) == 1440
    for axis, expected in zip(AXES, (6, 40, 2, 3)):
        counts = Counter(getattr(c, axis) for c in study.cells)
        assert len(counts) == expected
        assert set(counts.values()) == {1440 // expected}, axis
    for c in study.cells:
        assert list(c.config["eval"]) == ["clean", "linf", "l2", "l1", "common"]
        for axis in AXES:  # each axis node is the option's own config, validated by name
            assert c.config[axis]["name"] == getattr(c, axis)


def test_every_paper_cell_composes_like_hydra_would():
    """The fast product equals Hydra's own composition of the same choices (sampled cells)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from benchmark.paths import CONF_DIR

    study = plan(["study=paper"])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for c in study.cells[::97]:
            cfg = compose("config", overrides=["study=paper", *(f"{a}={n}" for a, n in c.axes.items())])
            composed = OmegaConf.to_container(cfg, resolve=True)
            assert {k: composed[k] for k in c.config} == c.config


def test_cell_ids_are_stable_across_processes():
    code = "from benchmark.study import plan; print(' '.join(c.id for c in plan(['study=demo']).cells))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.split() == [c.id for c in plan(["study=demo"]).cells]


def test_cell_id_depends_on_content_not_key_order():
    assert cell_id({"a": 1, "b": {"c": 2}}) == cell_id({"b": {"c": 2}, "a": 1})
    assert cell_id({"a": 1}) != cell_id({"a": 2})


def test_axis_overrides_choose_options_and_patch_configs():
    study = plan(["study=paper", "dataset=caltech101,flowers102", "model=glob(vit_small*)", "loss.trades_beta=6"])
    assert {c.dataset for c in study.cells} == {"caltech101", "flowers102"}
    assert {c.model for c in study.cells} == {m for m in options("model") if m.startswith("vit_small")}
    assert {c.config["loss"]["trades_beta"] for c in study.cells} == {6}
    default = plan(["study=paper", "dataset=caltech101,flowers102", "model=glob(vit_small*)"])
    assert not {c.id for c in study.cells} & {c.id for c in default.cells}


def test_study_patches_apply_per_option():
    demo = plan(["study=demo"])
    epochs = {c.protocol: c.config["protocol"]["epochs"] for c in demo.cells}
    assert epochs["fft5"] < epochs["fft50"]
    assert all(c.config["protocol"]["batch_size"] == 64 for c in demo.cells)
    assert load_option("protocol", "fft50")["epochs"] == 50  # the option itself is untouched


@pytest.mark.parametrize(
    ("override", "named", "suggested"),
    [
        ("dataset=caltech10", "caltech10", "caltech101"),
        ("model=convnext_bse.fb_in1k", "convnext_bse.fb_in1k", "convnext_base.fb_in1k"),
        ("loss=trade", "trade", "trades"),
        ("protocol=fft55", "fft55", "fft5"),
        ("study=papr", "papr", "paper"),
        ("launcher=slurmm", "slurmm", "local"),
        ("loss.trades_betta=3", "trades_betta", "trades_beta"),
    ],
)
def test_bad_names_are_refused_with_the_closest_choice_first(override, named, suggested):
    with pytest.raises(RFTBenchError) as err:
        plan(["study=paper", override])
    message = str(err.value)
    assert repr(named) in message
    assert suggested in message.split("choices")[-1].split(",")[0] or suggested in message


@pytest.mark.parametrize("override", ["dataset=[oops", "datasetoops", "seed=1,2"])
def test_malformed_overrides_are_refused(override):
    with pytest.raises(RFTBenchError, match="override"):
        plan([override])


def test_cli_plan_json_and_bad_input_exit_code(roots, capsys):
    from benchmark.cli import main

    assert main(["plan", "study=demo", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total"] == 12 and report["by_state"] == {"pending": 12}
    assert set(report["cells"][0]) == {"cell_id", "dataset", "model", "loss", "protocol", "state"}
    assert main(["plan", "study=demo", "model=resnet"]) == 2
    assert "unknown model 'resnet'" in capsys.readouterr().err
    assert not any(roots["results"].iterdir())  # nothing written
