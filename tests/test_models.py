"""The backbone registry (conf/model) and the loading path: cached checkpoint -> timm model with a
new head behind its normalisation; linear-probe freezing; demo pretraining; fetch-weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from torch import nn

from benchmark import models
from benchmark.errors import RFTBenchError
from benchmark.paths import PROJECT_DIR
from benchmark.study import load_option, options

KEYS = {"name", "study_name", "source", "arch", "type", "size", "params_m", "pretraining", "input", "head", "weights"}
SOURCES = {"timm", "local", "demo"}
TYPES = {"fully convolutional": "convolutional", "fully attention": "attention", "hybrid": "hybrid"}
# Backbones whose study size class is not the one their parameter count gives; the study's class
# is kept (and the YAML says so): eva02_tiny has 5.5M parameters, the study calls it medium.
SIZE_EXCEPTIONS = {"eva02_tiny_patch14_224.mim_in22k"}


def size_class(params_m: float) -> str:
    return "small" if params_m < 20 else "medium" if params_m < 50 else "large"


MODEL_CFGS = {name: load_option("model", name) for name in options("model")}
PAPER_MODELS = load_option("study", "paper")["axes"]["model"]
STUDY_CFGS = [MODEL_CFGS[name] for name in PAPER_MODELS]


# --- the registry -------------------------------------------------------------------------------

def test_every_model_yaml_has_the_schema_and_its_file_name() -> None:
    for file_name, cfg in MODEL_CFGS.items():
        assert set(cfg) == KEYS, file_name
        assert cfg["name"] == file_name
        assert cfg["source"] in SOURCES and cfg["type"] in set(TYPES.values())
        assert cfg["size"] in {"small", "medium", "large"}
        assert set(cfg["pretraining"]) == {"strategy", "data", "images"}
        assert set(cfg["input"]) == {"size", "mean", "std", "normalization"}
        assert len(cfg["input"]["mean"]) == len(cfg["input"]["std"]) == 3
        assert cfg["input"]["normalization"] == "checkpoint" and cfg["head"] == "classifier"  # the options' own
        assert set(cfg["weights"]) == {"file", "url"}
        assert cfg["weights"]["file"].startswith(f"{cfg['name']}/")
        assert (cfg["weights"]["url"] is not None) == (cfg["source"] == "local"), file_name


def test_the_paper_study_has_its_40_backbones_with_unique_study_names() -> None:
    assert len(PAPER_MODELS) == len(set(PAPER_MODELS)) == 40
    study_names = [cfg["study_name"] for cfg in STUDY_CFGS]
    assert None not in study_names and len(set(study_names)) == 40
    demo_names = [cfg["study_name"] for cfg in MODEL_CFGS.values() if cfg["source"] == "demo"]
    assert demo_names and set(demo_names) == {None}


def test_study_metadata_matches_the_published_table(reference_csv: Path) -> None:
    table = pd.read_csv(reference_csv).drop_duplicates("backbone").set_index("backbone")
    assert set(table.index) == {cfg["study_name"] for cfg in STUDY_CFGS}
    for cfg in STUDY_CFGS:
        row = table.loc[cfg["study_name"]]
        assert cfg["type"] == TYPES[row.model_type], cfg["name"]
        assert cfg["size"] == row.model_size, cfg["name"]
        assert cfg["pretraining"] == {"strategy": row.pre_training_strategy, "data": row.pre_training_dataset,
                                      "images": int(row.volume_pre_training_data)}, cfg["name"]


@pytest.mark.parametrize("cfg", [c for c in MODEL_CFGS.values() if c["source"] == "timm"], ids=lambda c: c["name"])
def test_timm_backbones_use_their_checkpoints_normalisation(cfg: dict) -> None:
    pretrained = timm.models.get_pretrained_cfg(cfg["name"])
    assert pretrained is not None and pretrained.architecture == cfg["arch"]
    assert (3, cfg["input"]["size"], cfg["input"]["size"]) == pretrained.input_size
    assert tuple(cfg["input"]["mean"]) == pretrained.mean and tuple(cfg["input"]["std"]) == pretrained.std


def test_local_backbones_are_imagenet_normalised_with_a_download_url() -> None:
    imagenet = timm.models.get_pretrained_cfg("resnet50.a1_in1k")
    local = [cfg for cfg in STUDY_CFGS if cfg["source"] == "local"]
    assert {cfg["name"] for cfg in local} == {name for name in PAPER_MODELS if name.startswith("robust_")}
    for cfg in local:
        assert tuple(cfg["input"]["mean"]) == imagenet.mean and tuple(cfg["input"]["std"]) == imagenet.std
        assert cfg["weights"]["url"].startswith("https://")


def test_size_classes_follow_the_parameter_counts() -> None:
    for cfg in MODEL_CFGS.values():
        if cfg["name"] in SIZE_EXCEPTIONS:
            assert size_class(cfg["params_m"]) != cfg["size"]  # still an exception
        else:
            assert size_class(cfg["params_m"]) == cfg["size"], cfg["name"]


def test_parameter_counts_match_the_architectures() -> None:
    """Built on the meta device (no memory, no weights): each distinct architecture once."""
    by_arch: dict[str, set[float]] = {}
    for cfg in MODEL_CFGS.values():
        by_arch.setdefault(cfg["arch"], set()).add(cfg["params_m"])
    for arch, recorded in by_arch.items():
        with torch.device("meta"):
            backbone = timm.create_model(arch, num_classes=0)
        counted = round(sum(p.numel() for p in backbone.parameters()) / 1e6, 2)
        assert recorded == {counted}, arch


# --- loading ------------------------------------------------------------------------------------

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def tiny_cfg(arch: str, source: str = "timm", file: str = "model.safetensors") -> dict:
    """A model option for one of timm's tiny test architectures, at the demo's 32x32 input."""
    name = {"timm": f"{arch}.r160_in1k", "local": f"robust_{arch}"}[source]
    return {
        "name": name, "study_name": None, "source": source, "arch": arch, "type": "convolutional",
        "size": "small", "params_m": 0.0, "pretraining": {"strategy": "supervised", "data": "in1k", "images": None},
        "input": {"size": 32, "mean": MEAN, "std": STD, "normalization": "checkpoint"}, "head": "classifier",
        "weights": {"file": f"{name}/{file}", "url": "https://example.org/ckpt.pt" if source == "local" else None},
    }


def pretrained_stand_in(arch: str) -> nn.Module:
    """A tiny timm model whose weights and BatchNorm statistics are all non-default."""
    torch.manual_seed(1)
    model = timm.create_model(arch, pretrained_cfg_overlay={"input_size": (3, 32, 32)})
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
        model.train()(torch.rand(8, 3, 32, 32))  # moves BatchNorm running statistics
    return model.eval()


def save_checkpoint(model: nn.Module, cfg: dict, weights_root: Path) -> Path:
    path = models.weights_path(cfg, weights_root)
    path.parent.mkdir(parents=True)
    safetensors.torch.save_file(model.state_dict(), str(path))
    return path


def assert_backbone_equal(classifier: models.Classifier, reference: dict[str, torch.Tensor]) -> None:
    head = {id(p) for p in classifier.head_parameters()}
    state = classifier.model.state_dict(keep_vars=True)
    backbone = {key: value for key, value in state.items() if id(value) not in head}
    assert len(backbone) == len(state) - 2 > 0  # the head is one weight and one bias here
    for key, value in backbone.items():
        assert torch.equal(value.detach(), reference[key]), key


@pytest.mark.parametrize("arch", ["test_resnet", "test_vit"])
def test_create_model_loads_the_cached_checkpoint_with_a_new_head(arch: str, roots: dict[str, Path]) -> None:
    pretrained = pretrained_stand_in(arch)
    cfg = tiny_cfg(arch)
    save_checkpoint(pretrained, cfg, roots["weights"])

    classifier = models.create_model(cfg, 7, roots["weights"]).eval()

    assert_backbone_equal(classifier, pretrained.state_dict())
    assert classifier.model.get_classifier().out_features == 7
    x = torch.rand(4, 3, 32, 32)
    normalised = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.equal(classifier(x), classifier.model(normalised))
        assert torch.equal(classifier.model.forward_features(normalised), pretrained.forward_features(normalised))


def test_a_robust_checkpoint_is_unwrapped_and_loaded(roots: dict[str, Path]) -> None:
    """A robustness-library checkpoint: {"model": ...} with DataParallel, AttackerModel and
    normaliser entries around the architecture's own keys."""
    pretrained = pretrained_stand_in("test_resnet")
    cfg = tiny_cfg("test_resnet", source="local", file="model.pt")
    state = pretrained.state_dict()
    wrapped = {f"module.model.{k}": v for k, v in state.items()}
    wrapped |= {f"module.attacker.model.{k}": torch.zeros_like(v) for k, v in state.items()}
    wrapped |= {"module.normalizer.new_mean": torch.zeros(3, 1, 1), "module.normalizer.new_std": torch.ones(3, 1, 1)}
    path = models.weights_path(cfg, roots["weights"])
    path.parent.mkdir(parents=True)
    torch.save({"model": wrapped, "epoch": 90}, path)

    assert_backbone_equal(models.create_model(cfg, 5, roots["weights"]), state)


def test_unwrap_robust_checkpoint_strips_wrappers_and_their_entries() -> None:
    tensor = torch.zeros(1)
    unwrapped = models.unwrap_robust_checkpoint({
        "normalize.mean": tensor, "model.stem.0.weight": tensor, "base_model.stages.0.w": tensor,
        "model.base_model.head.fc.bias": tensor, "normalizer.new_std": tensor, "attacker.model.fc.weight": tensor,
        "blocks.0.attn.qkv.weight": tensor,
    })
    assert set(unwrapped) == {"stem.0.weight", "stages.0.w", "head.fc.bias", "blocks.0.attn.qkv.weight"}


def test_a_checkpoint_of_another_architecture_is_an_error(roots: dict[str, Path]) -> None:
    cfg = tiny_cfg("test_resnet")
    save_checkpoint(pretrained_stand_in("test_convnext"), cfg, roots["weights"])
    with pytest.raises(RFTBenchError, match="did not load from the checkpoint"):
        models.create_model(cfg, 3, roots["weights"])


@pytest.mark.parametrize("source", ["timm", "local"])
def test_missing_weights_name_the_file_and_how_to_get_it(source: str, roots: dict[str, Path]) -> None:
    cfg = tiny_cfg("test_resnet", source=source)
    with pytest.raises(RFTBenchError) as err:
        models.create_model(cfg, 3, roots["weights"])
    message = str(err.value)
    assert str(models.weights_path(cfg, roots["weights"])) in message
    assert f"rftbench fetch-weights study=paper model={cfg['name']}" in message
    if source == "local":
        assert cfg["weights"]["url"] in message


# --- linear probing -----------------------------------------------------------------------------

def test_freeze_backbone_trains_only_the_head_and_keeps_batchnorm_still(roots: dict[str, Path]) -> None:
    cfg = tiny_cfg("test_resnet")
    save_checkpoint(pretrained_stand_in("test_resnet"), cfg, roots["weights"])
    classifier = models.create_model(cfg, 4, roots["weights"])
    all_params = {id(p) for p in classifier.parameters()}
    head, backbone = classifier.head_parameters(), classifier.backbone_parameters()
    assert {id(p) for p in head} | {id(p) for p in backbone} == all_params and len(head) == 2

    classifier.freeze_backbone()
    classifier.train()
    batchnorms = [m for m in classifier.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert batchnorms and not any(m.training for m in batchnorms)
    assert classifier.training and classifier.model.get_classifier().training
    assert [id(p) for p in classifier.parameters() if p.requires_grad] == [id(p) for p in head]

    before_backbone = {k: v.clone() for k, v in classifier.model.state_dict().items()}
    before_head = [p.detach().clone() for p in head]
    optimizer = torch.optim.SGD([p for p in classifier.parameters() if p.requires_grad], lr=0.5)
    F.cross_entropy(classifier(torch.rand(8, 3, 32, 32)), torch.arange(8) % 4).backward()
    optimizer.step()

    head_ids = {id(p) for p in head}
    for key, value in classifier.model.state_dict(keep_vars=True).items():
        if id(value) not in head_ids:
            assert torch.equal(value.detach(), before_backbone[key]), key
    assert not all(torch.equal(p.detach(), b) for p, b in zip(head, before_head))
    classifier.eval()
    assert not classifier.model.get_classifier().training


# --- demo pretraining ---------------------------------------------------------------------------

def test_make_demo_weights_pretrains_once_and_loads(roots: dict[str, Path]) -> None:
    cfg = load_option("model", "test_vit.demo")  # the fastest demo backbone
    torch.manual_seed(123)
    expected_stream = torch.rand(3)
    torch.manual_seed(123)
    path = models.make_demo_weights(cfg, roots["weights"])
    assert torch.equal(torch.rand(3), expected_stream)  # the caller's random stream is untouched
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["recipe"] == models.DEMO_RECIPE and record["source_accuracy"] > 0.8
    mtime = path.stat().st_mtime_ns

    start = time.perf_counter()
    assert models.make_demo_weights(cfg, roots["weights"]) == path
    assert time.perf_counter() - start < 1.0 and path.stat().st_mtime_ns == mtime

    classifier = models.create_model(cfg, 10, roots["weights"])
    assert classifier.model.get_classifier().out_features == 10
    assert_backbone_equal(classifier, safetensors.torch.load_file(str(path)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["test_resnet.demo", "test_convnext.demo"])
def test_demo_weights_are_deterministic_and_good(name: str, tmp_path: Path) -> None:
    cfg = load_option("model", name)
    first = models.make_demo_weights(cfg, tmp_path / "a")
    second = models.make_demo_weights(cfg, tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()
    assert json.loads(first.with_suffix(".json").read_text())["source_accuracy"] > 0.9


# --- fetch-weights ------------------------------------------------------------------------------

@pytest.mark.slow
def test_fetch_weights_without_internet_fails_clearly_and_writes_nothing(tmp_path: Path) -> None:
    """Hub offline and its cache empty, as on a machine without internet; through the real CLI."""
    weights = tmp_path / "weights"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "RFTBENCH_WEIGHTS": str(weights),
           "RFTBENCH_RESULTS": str(tmp_path / "results"), "PYTHONPATH": str(PROJECT_DIR)}
    chosen = ["mobilenetv3_large_100.ra_in1k", "deit_tiny_patch16_224.fb_in1k", "robust_resnet50"]
    done = subprocess.run([sys.executable, "-m", "benchmark.cli", "fetch-weights", "study=paper",
                           f"model={','.join(chosen)}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = {line.split(":")[0]: line for line in done.stdout.splitlines()}
    assert "FAILED: cannot reach the Hugging Face hub" in lines[chosen[0]]
    assert "not attempted" in lines[chosen[1]]
    assert "to download by hand" in lines[chosen[2]] and MODEL_CFGS[chosen[2]]["weights"]["url"] in lines[chosen[2]]
    assert not weights.exists() or not any(weights.rglob("*"))
