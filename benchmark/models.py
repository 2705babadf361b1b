"""Backbones: a conf/model option -> a timm model with its pretrained weights from the local
cache and a new head, wrapped so that callers and attacks work on [0, 1] pixels.

The weights cache holds one file per backbone, `<weights root>/<weights.file>`: the checkpoint's
state dict in timm's key names, head included (timm's checkpoint filters detect a checkpoint's
format by its keys, the head's among them). Three sources fill it:
  timm   `rftbench fetch-weights` downloads the checkpoint from the Hugging Face hub;
  local  adversarially trained checkpoints the user downloads from `weights.url`;
  demo   tiny architectures pretrained here on a digits source task (`make_demo_weights`).
Loading goes through timm's own pretrained path (checkpoint filter, head replacement) and is then
verified: every backbone tensor must equal the checkpoint's, so a model is never silently random.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from huggingface_hub.errors import LocalEntryNotFoundError
from torch import nn

from benchmark.atomic import write_atomic, write_json_atomic
from benchmark.errors import RFTBenchError
from benchmark.study import plan
from benchmark.weights import by_hand, require_weights, weights_path


# timm's names of the module that classifies, as the published study took its "head".
HEAD_MODULES = ("head", "fc", "classifier")


class Classifier(nn.Module):
    """A timm model behind its input normalisation: `forward` takes [0, 1] pixels.

    The head is timm's classifier (`get_classifier()`, the final linear layer) or, with
    `head="module"`, timm's whole head module (the published study's choice; for ConvNeXt and
    EdgeNeXt it also holds the LayerNorm before the linear layer). `freeze_backbone` makes it a
    linear probe: only the head trains, and the backbone stays in eval mode whatever `.train()`
    says, so BatchNorm statistics and dropout of the fixed feature extractor never change.
    """

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], head: str = "classifier"):
        super().__init__()
        self.model = model
        self.head_kind = head  # a name, not a second reference: state dict keys stay the model's
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.backbone_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)

    def head(self) -> nn.Module:
        return head_module(self.model, self.head_kind)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head().parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        head = {id(p) for p in self.head_parameters()}
        return [p for p in self.model.parameters() if id(p) not in head]

    def freeze_backbone(self) -> None:
        for param in self.backbone_parameters():
            param.requires_grad_(False)
        self.backbone_frozen = True
        self.train(self.training)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.backbone_frozen:
            self.model.eval()
            self.head().train(mode)
        return self


def head_module(model: nn.Module, head: str) -> nn.Module:
    """The module `head` names: timm's classifier, or the model's head/fc/classifier module."""
    if head == "classifier":
        return model.get_classifier()
    for name in HEAD_MODULES:
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return module
    raise RFTBenchError(f"{type(model).__name__} has none of the head modules {', '.join(HEAD_MODULES)} (model.head=module)")


def input_statistics(model_cfg: dict[str, Any]) -> tuple[list[float], list[float]]:
    """(mean, std) the model normalises with: its checkpoint's (`input.mean/std`), or under
    `input.normalization: authors` the published study's rule: OpenAI-CLIP statistics iff the
    backbone's study name contains "laion", ImageNet's otherwise."""
    cfg = model_cfg["input"]
    if cfg["normalization"] == "checkpoint":
        return cfg["mean"], cfg["std"]
    if "laion" in (model_cfg.get("study_name") or model_cfg["name"]):
        return list(timm.data.OPENAI_CLIP_MEAN), list(timm.data.OPENAI_CLIP_STD)
    return list(timm.data.IMAGENET_DEFAULT_MEAN), list(timm.data.IMAGENET_DEFAULT_STD)


def create_model(model_cfg: dict[str, Any], num_classes: int, weights_root: Path) -> Classifier:
    """The backbone of `model_cfg` with its cached pretrained weights and a new `num_classes` head."""
    path = weights_path(model_cfg, weights_root)
    require_weights(model_cfg, weights_root)
    if model_cfg["source"] == "demo":
        make_demo_weights(model_cfg, weights_root)
    checkpoint = timm.models.load_state_dict(str(path))
    if model_cfg["source"] == "local":
        checkpoint = unwrap_robust_checkpoint(checkpoint)
    # We read the file ourselves (to unwrap robust checkpoints and to verify the load below) and
    # hand the tensors to timm's pretrained loader. It drops the checkpoint's head when the class
    # counts differ: declaring 0 classes for the checkpoint makes that always so, even for a
    # target with as many classes as the checkpoint.
    model = _timm_model(model_cfg, num_classes, pretrained=True,
                        overlay={"state_dict": checkpoint, "num_classes": 0})
    model.pretrained_cfg.pop("state_dict")  # timm keeps its cfg on the model: free the tensors
    _check_backbone_loaded(model, checkpoint, path)
    return Classifier(model, *input_statistics(model_cfg), head=model_cfg["head"])


def _timm_model(model_cfg: dict[str, Any], num_classes: int, pretrained: bool,
                overlay: dict[str, Any] | None = None) -> nn.Module:
    # timm's name carries the checkpoint's pretrained cfg (head names, format); the input size
    # overlay makes timm pass `img_size` to the architectures whose input size is fixed (ViTs).
    name = model_cfg["name"] if model_cfg["source"] == "timm" else model_cfg["arch"]
    size = model_cfg["input"]["size"]
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes,
                             pretrained_cfg_overlay={"input_size": (3, size, size), **(overlay or {})})


def _backbone_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's state entries other than its classifier's parameters."""
    head = {id(p) for p in model.get_classifier().parameters()}
    return ((key, value) for key, value in model.state_dict(keep_vars=True).items() if id(value) not in head)


def _check_backbone_loaded(model: nn.Module, checkpoint: dict[str, torch.Tensor], path: Path) -> None:
    """timm loads non-strictly when the head changes, so a checkpoint with other key names would
    leave part of the backbone random without an error: require every tensor to match."""
    wrong = [key for key, value in _backbone_state(model)
             if key not in checkpoint or not torch.equal(value.detach(), checkpoint[key].to(value.dtype))]
    if wrong:
        raise RFTBenchError(
            f"{path}: {len(wrong)} backbone tensors of {type(model).__name__} did not load from the "
            f"checkpoint (e.g. {', '.join(wrong[:5])}): it is not a checkpoint of this architecture "
            "in timm's key names"
        )


# Prefixes of the wrappers around robust checkpoints: a normalising `model`/`base_model` module
# (Singh et al. 2023), `model` inside the robustness library's AttackerModel (Salman et al. 2020).
# timm's reader already removed DataParallel's `module.` and took the robustness library's "model".
_WRAPPERS = ("model.", "base_model.")
# The wrappers' own entries: normalisation constants and the attacker's copy of the model.
_WRAPPER_ENTRIES = ("normalize.", "normalizer.", "attacker.")


def unwrap_robust_checkpoint(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A robust checkpoint's model tensors under timm's key names (the architecture's own)."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPERS):
            key = key.split(".", 1)[1]
        if not key.startswith(_WRAPPER_ENTRIES):
            out[key] = value
    return out


# The demo's source pretraining: classify the digits 0-5 of scikit-learn's bundled 8x8 digits,
# upsampled to 32x32 like the demo's target dataset. A task of its own (the target classifies all
# ten digits with a new head), but on the same pool of images, some of them in the target's test
# split: it shows the mechanics of transfer, it is no clean transfer experiment. Changing the
# recipe invalidates the cached weights.
DEMO_RECIPE = {
    "task": "sklearn load_digits, digits 0-5, 8x8 upsampled (bilinear) to 32x32, 3 channels",
    "classes": 6,
    "held_out_fraction": 0.25,
    "epochs": 5,
    "batch_size": 64,
    "optimizer": "AdamW",
    "lr": 2e-3,
    "weight_decay": 0.05,
    "schedule": "cosine per step",
    "seed": 0,
}


def make_demo_weights(model_cfg: dict[str, Any], weights_root: Path) -> Path:
    """Pretrain a demo backbone on the digits source task, once: the weights are cached with a
    JSON record of the recipe and the held-out source accuracy beside them."""
    path = weights_path(model_cfg, weights_root)
    if _demo_weights_cached(path):
        return path
    start = time.perf_counter()
    with torch.random.fork_rng(), _one_thread():  # fork: leave the caller's random stream untouched
        model, accuracy, sizes = _pretrain_on_digits(model_cfg)
    _save_checkpoint(model, path)
    write_json_atomic(path.with_suffix(".json"), {
        "model": model_cfg["name"], "arch": model_cfg["arch"], "recipe": DEMO_RECIPE,
        "source_accuracy": accuracy, **sizes, "seconds": round(time.perf_counter() - start, 1),
        "timm_version": timm.__version__, "torch_version": torch.__version__,
    })
    return path


@contextmanager
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads (on a busy CPU they lose a lot), and one
    thread keeps the weights independent of the machine's core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _demo_weights_cached(path: Path) -> bool:
    """Weights made by the current recipe (their record is written after them)."""
    try:
        return path.exists() and json.loads(path.with_suffix(".json").read_text())["recipe"] == DEMO_RECIPE
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return False


def _digits_source() -> tuple[torch.Tensor, torch.Tensor]:
    # scikit-learn only here: importing it would add seconds to every worker's start.
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = digits.target < DEMO_RECIPE["classes"]
    x = torch.tensor(digits.images[keep] / 16.0, dtype=torch.float32).unsqueeze(1)
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).clamp(0, 1).repeat(1, 3, 1, 1)
    return x, torch.tensor(digits.target[keep])


def _pretrain_on_digits(model_cfg: dict[str, Any]) -> tuple[nn.Module, float, dict[str, int]]:
    from sklearn.model_selection import train_test_split

    recipe = DEMO_RECIPE
    torch.manual_seed(recipe["seed"])
    x, y = _digits_source()
    train_idx, held_idx = train_test_split(np.arange(len(y)), test_size=recipe["held_out_fraction"],
                                           random_state=recipe["seed"], stratify=y.numpy())
    model = Classifier(_timm_model(model_cfg, recipe["classes"], pretrained=False),
                       model_cfg["input"]["mean"], model_cfg["input"]["std"])
    steps = recipe["epochs"] * math.ceil(len(train_idx) / recipe["batch_size"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    model.train()
    for _ in range(recipe["epochs"]):
        for batch in torch.randperm(len(train_idx)).split(recipe["batch_size"]):
            index = train_idx[batch.numpy()]
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[held_idx]).argmax(1) == y[held_idx]).float().mean().item()
    return model.model, round(accuracy, 4), {"n_train": len(train_idx), "n_held_out": len(held_idx)}


def fetch_weights_command(args: argparse.Namespace) -> int:
    """`rftbench fetch-weights study=NAME [model=...]`: fill the weights cache for a study's
    backbones. Exit code 0 when every backbone's weights are in the cache afterwards."""
    study = plan(args.overrides)
    weights_root = Path(study.config["paths"]["weights"])
    model_cfgs = {cell.config["model"]["name"]: cell.config["model"] for cell in study.cells}
    hub_offline = False
    complete = True
    for name, model_cfg in model_cfgs.items():
        path = weights_path(model_cfg, weights_root)
        if model_cfg["source"] == "demo" and not _demo_weights_cached(path):
            make_demo_weights(model_cfg, weights_root)
            print(f"{name}: made by the demo's source pretraining on digits: {path}")
        elif path.exists():
            print(f"{name}: present {path}")
        elif model_cfg["source"] == "local":
            complete = False
            print(f"{name}: to download by hand. {by_hand(model_cfg, path)}")
        elif hub_offline:
            complete = False
            print(f"{name}: not attempted: the Hugging Face hub is unreachable (see above)")
        else:
            try:
                _download(model_cfg, path)
                print(f"{name}: fetched {path}")
            except LocalEntryNotFoundError as err:  # no connection and not in the hub's cache
                complete, hub_offline = False, True
                print(f"{name}: FAILED: cannot reach the Hugging Face hub ({err}); run this command "
                      "on a machine with internet access")
            except (OSError, RuntimeError) as err:
                complete = False
                print(f"{name}: FAILED: {type(err).__name__}: {err}")
    print(f"weights root: {weights_root.resolve()}")
    return 0 if complete else 1


def _download(model_cfg: dict[str, Any], path: Path) -> None:
    """The timm checkpoint of `model_cfg`, through timm's hub download, saved in the cache."""
    _save_checkpoint(timm.create_model(model_cfg["name"], pretrained=True), path)


def _save_checkpoint(model: nn.Module, path: Path) -> None:
    # Copies: safetensors refuses tensors that share memory, and some models tie weights (CoaT).
    state = {key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}
    write_atomic(path, lambda tmp: safetensors.torch.save_file(state, str(tmp)))
