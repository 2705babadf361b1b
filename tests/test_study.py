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
    """The fast product equals Hydra's own composition of the same choices, with the study's own
    layers (`set`, `set_per_option`, the per-cell batching rule and table) merged over it
    (sampled cells)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from benchmark.paths import CONF_DIR
    from benchmark.study import merged

    study = plan(["study=paper"])
    settings = load_option("study", "paper")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for c in study.cells[::97]:
            cfg = compose("config", overrides=["study=paper", *(f"{a}={n}" for a, n in c.axes.items())])
            composed = OmegaConf.to_container(cfg, resolve=True)
            for axis in AXES:
                composed[axis] = merged(composed[axis], settings["set"].get(axis, {}))
            for _, patch in study.layers.point_layers(composed):
                composed["protocol"] = merged(composed["protocol"], patch)
            composed["seed"] = settings["set"]["seed"]
            assert {k: composed[k] for k in c.config} == c.config


def test_cell_ids_are_stable_across_processes():
    code = "from benchmark.study import plan; print(' '.join(c.id for c in plan(['study=demo']).cells))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.split() == [c.id for c in plan(["study=demo"]).cells]


def test_cell_id_depends_on_content_not_key_order():
    assert cell_id({"a": 1, "b": {"c": 2}}) == cell_id({"b": {"c": 2}, "a": 1})
    assert cell_id({"a": 1}) != cell_id({"a": 2})


def test_axis_overrides_choose_options_and_patch_configs():
    study = plan(["study=paper", "dataset=caltech101,flowers102", "model=glob(vit_small*)", "loss.attack.steps=6"])
    assert {c.dataset for c in study.cells} == {"caltech101", "flowers102"}
    assert {c.model for c in study.cells} == {m for m in options("model") if m.startswith("vit_small")}
    assert {c.config["loss"]["attack"]["steps"] for c in study.cells} == {6}
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
        ("loss.attack.stepz=3", "stepz", "steps"),
    ],
)
def test_bad_names_are_refused_with_the_closest_choice_first(override, named, suggested):
    with pytest.raises(RFTBenchError) as err:
        plan(["study=paper", override])
    message = str(err.value)
    assert repr(named) in message
    assert suggested in message.split("choices")[-1].split(",")[0] or suggested in message


@pytest.mark.parametrize("override", ["dataset=[oops", "datasetoops", "eval.linf.eps=0.1,0.2"])
def test_malformed_overrides_are_refused(override):
    with pytest.raises(RFTBenchError, match="override"):
        plan([override])


def test_a_seed_sweep_plans_one_cell_per_seed_per_grid_point():
    default = plan(["study=demo"])
    swept = plan(["study=demo", "seed=0,1,2"])
    assert len(swept.cells) == 3 * len(default.cells) and len({c.id for c in swept.cells}) == len(swept.cells)
    assert [c.id for c in swept.cells if c.seed == 0] == [c.id for c in default.cells]  # seed 0 keeps its ids
    for i, cell in enumerate(default.cells):  # a grid point's seeds are adjacent
        point = swept.cells[3 * i:3 * i + 3]
        assert [c.seed for c in point] == [0, 1, 2] and {c.axes == cell.axes for c in point} == {True}
        assert len({c.slug for c in point}) == 3 and point[1].slug.endswith("__seed1")
    point = ["study=demo", "model=test_vit.demo", "protocol=fft5"]
    ranged = plan([*point, "seed=range(5,9)"])
    assert [c.seed for c in ranged.cells] == [5, 6, 7, 8] * 2  # two losses, four seeds each
    listed = plan([*point, "seed=5,6,5,7,8"])  # each seed once
    assert [c.id for c in listed.cells] == [c.id for c in ranged.cells]
    one = plan(["study=demo", "seed=5"])
    assert {c.seed for c in one.cells} == {5} and not {c.id for c in one.cells} & {c.id for c in swept.cells}


def test_the_paper_study_swept_over_70_seeds_has_100800_cells():
    study = plan(["study=paper", "seed=range(70)"])
    assert len(study.cells) == 100_800 == len({c.id for c in study.cells})
    assert Counter(c.seed for c in study.cells) == dict.fromkeys(range(70), 1440)


@pytest.mark.parametrize(("override", "shown"), [
    ("seed=abc", "'abc'"), ("seed=-1", "-1"), ("seed=1.5", "1.5"), ("seed=true", "True"),
    ("seed=range(0)", "no seed"), ("seed=range(0,2,0.5)", "0.5"), ("seed=glob(*)", "Glob("),
    ("seed=interval(0,1)", "IntervalSweep"),
])
def test_bad_seeds_are_refused_with_the_value(override, shown):
    with pytest.raises(RFTBenchError, match="a seed is an integer >= 0") as err:
        plan(["study=demo", override])
    assert override in str(err.value) and shown in str(err.value)


def test_every_cell_id_is_the_hash_of_its_whole_config():
    """plan() assembles ids from each option's JSON: the bytes must be json.dumps' of the whole
    config, whatever the options, patches and seeds."""
    study = plan(["study=paper", *(f"{axis}=glob(*)" for axis in AXES), "loss.attack.steps=6",
                  "protocol.optimizer.lr_head=0.5", "model.study_name='é \\ \"q\"'", "eval.linf.eps=0.03", "seed=0,7"])
    assert len(study.cells) > 7000
    assert all(c.id == cell_id(c.config) for c in study.cells)
    assert {c.config["model"]["study_name"] for c in study.cells} == {'é \\ "q"'}  # escaped in the JSON


@pytest.mark.parametrize("group", ["dataset", "model", "loss", "protocol", "eval", "study", "launcher", "tune"])
def test_config_files_read_as_omegaconf_loads_them(group):
    """The planner's fast reader gives OmegaConf's values for every file, bases included (how
    bases merge is checked against Hydra in test_schema)."""
    from omegaconf import OmegaConf

    from benchmark.paths import CONF_DIR
    from benchmark.study import read_yaml

    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        expected = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        assert json.dumps(read_yaml(path)) == json.dumps(expected), path.name  # 1 and 1.0 differ here


def test_cli_plan_json_and_bad_input_exit_code(roots, capsys):
    from benchmark.cli import main

    assert main(["plan", "study=demo", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total"] == 12 and report["by_state"] == {"pending": 12}
    assert set(report["cells"][0]) == {"cell_id", "dataset", "model", "loss", "protocol", "seed", "state"}
    assert main(["plan", "study=demo", "model=resnet"]) == 2
    assert "unknown model 'resnet'" in capsys.readouterr().err
    assert not any(roots["results"].iterdir())  # nothing written
