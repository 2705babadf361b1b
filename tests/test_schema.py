"""Typed configs checked at plan time: every option of every group passes its schema, a bad value
is refused before anything is written with the dotted key, the value and the rule, options share
bases the way Hydra merges them, and one parser reads the key=value words of result commands."""
from __future__ import annotations

import pytest

from benchmark import arguments, schema
from benchmark.cell import AXES
from benchmark.errors import RFTBenchError
from benchmark.study import conf_dirs, load_option, options, plan


@pytest.mark.parametrize(("override", "key", "rule"), [
    ("protocol.epochs=abc", "protocol.epochs='abc'", "valid integer"),
    ("protocol.epochs=-3", "protocol.epochs=-3", "greater than or equal to 1"),
    ("protocol.epochs=2.5", "protocol.epochs=2.5", "valid integer"),
    ("loss.attack.eps=-1", "loss.attack.eps=-1", "greater than or equal to 0"),
    ("eval.common.severity=9", "eval.common.severity=9", "less than or equal to 5"),
    ("protocol.batch_size=0", "protocol.batch_size=0", "greater than or equal to 1"),
    ("protocol.optimizer.lr_head=-1e-3", "protocol.optimizer.lr_head=-0.001", "greater than 0"),
    ("model.size=huge", "model.size='huge'", "'small', 'medium' or 'large'"),
    ("dataset.augment.hflip=maybe", "dataset.augment.hflip='maybe'", "valid boolean"),
    ("+protocol.warmup=3", "protocol.warmup", "not a known key"),
    ("runtime.num_workers=-1", "runtime.num_workers=-1", "greater than or equal to 0"),
])
def test_a_bad_value_is_refused_by_plan_naming_the_dotted_key(roots, override, key, rule):
    with pytest.raises(RFTBenchError) as err:
        plan(["study=demo", override])
    assert key in str(err.value) and rule in str(err.value)
    assert not any(roots["results"].iterdir())


def test_launch_refuses_a_bad_value_before_writing_anything(roots, capsys):
    from benchmark.cli import main

    assert main(["launch", "study=demo", "protocol.epochs=-3"]) == 2
    assert "protocol.epochs=-3" in capsys.readouterr().err
    assert not any(roots["results"].iterdir())


def test_every_option_of_every_axis_passes_its_schema():
    study = plan(["study=paper", *(f"{axis}=glob(*)" for axis in AXES)])
    for axis in AXES:
        assert {getattr(c, axis) for c in study.cells} == set(options(axis))
    for name in options("study"):
        plan([f"study={name}", "dataset=digits", "model=test_vit.demo"])


def test_the_schema_documents_every_key_the_options_use():
    for axis in AXES:
        fields = set(schema.GROUPS[axis].model_fields)
        for name in options(axis):
            node = load_option(axis, name)
            kind_keys = set(node) - fields
            assert axis == "loss" or not kind_keys, (axis, name, kind_keys)


def test_bases_are_not_options_and_merge_as_hydra_merges_them():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from benchmark.paths import CONF_DIR

    bases = {axis: [p.stem for p in (CONF_DIR / axis).glob("_*.yaml")] for axis in AXES}
    assert bases["model"] and bases["loss"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for axis in ("model", "loss"):
            assert not set(bases[axis]) & set(options(axis))
            for name in options(axis):
                composed = OmegaConf.to_container(compose("config", overrides=[f"{axis}={name}"]), resolve=True)
                assert composed[axis] == load_option(axis, name), name
                assert "defaults" not in load_option(axis, name)
    for name in options("model"):  # each option still names itself and its identifying keys
        text = (CONF_DIR / "model" / f"{name}.yaml").read_text()
        assert f"name: {name}\n" in text and "study_name:" in text and "params_m:" in text


def test_a_defaults_entry_that_is_not_a_base_of_the_group_is_refused(tmp_path, monkeypatch):
    (tmp_path / "protocol").mkdir()
    (tmp_path / "protocol" / "odd.yaml").write_text("defaults: [fft5]\nname: odd\n")
    monkeypatch.setenv("RFTBENCH_CONF_PATH", str(tmp_path))
    load_option.cache_clear()
    try:
        assert tmp_path in conf_dirs() and "odd" in options("protocol")
        with pytest.raises(RFTBenchError, match="only bases of its own group.*'fft5'"):
            load_option("protocol", "odd")
    finally:
        load_option.cache_clear()


def test_one_parser_reads_the_words_of_result_commands():
    words = arguments.parse(["study=a", "study='b c'", "paths.results=/r"], ("study", "paths.results"),
                            repeatable=("study",))
    assert words.all("study") == ["a", "b c"] and str(words.path("paths.results")) == "/r"
    assert arguments.study_and_root([], default="demo") == ("demo", None)
    with pytest.raises(RFTBenchError, match="unknown argument 'stuy'.*study"):
        arguments.parse(["stuy=a"], ("study",))
    with pytest.raises(RFTBenchError, match="given twice"):
        arguments.parse(["study=a", "study=b"], ("study",))
    with pytest.raises(RFTBenchError, match="malformed argument 'study'"):
        arguments.parse(["study"], ("study",))
