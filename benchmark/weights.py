"""The local weights cache, torch-free: where a backbone's pretrained weights file lives and a
clear error, before anything is launched, when it is not there (benchmark.models loads it)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmark.errors import RFTBenchError


def weights_path(model_cfg: dict[str, Any], weights_root: Path) -> Path:
    return Path(weights_root) / model_cfg["weights"]["file"]


def require_weights(model_cfg: dict[str, Any], weights_root: Path) -> None:
    """Raise a clear error when the model's weights file is absent (demo weights are made)."""
    path = weights_path(model_cfg, weights_root)
    if model_cfg["source"] != "demo" and not path.exists():
        raise RFTBenchError(_missing_weights_message(model_cfg, path))


def _missing_weights_message(model_cfg: dict[str, Any], path: Path) -> str:
    name = model_cfg["name"]
    fetch = f"rftbench fetch-weights study=paper model={name}"
    if model_cfg["source"] == "local":
        return (f"pretrained weights of {name!r} not found: {path}. {by_hand(model_cfg, path)} "
                f"(`{fetch}` says the same for every backbone that needs it)")
    return (f"pretrained weights of {name!r} not found: {path}. Fetch them with `{fetch}` on a "
            "machine with internet access, then copy the weights folder here or point "
            "RFTBENCH_WEIGHTS (paths.weights) at it")


def by_hand(model_cfg: dict[str, Any], path: Path) -> str:
    """How to fill the cache with a checkpoint that is downloaded by hand."""
    return (f"Download the checkpoint from {model_cfg['weights']['url']} (conf/model/{model_cfg['name']}.yaml "
            f"says which file) and save it as {path}")
