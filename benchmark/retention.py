"""What a done cell keeps on disk (`runtime.retention`), what a study takes (`disk_estimate`, for
`plan`) and takes now (`disk_used`, for `status`). Torch-free but for `keep_weights` and
`load_weights`, which import safetensors' torch half when called.

Retention, applied by the worker once the cell's rows are written (it never changes a result,
so it is not part of the cell's id):
  final  the final weights in `weights.safetensors` (a state dict of tensors: loading it runs no
         code), then `ckpt/` (weights and optimizer state) and `aa_state/` removed. The default.
  all    the final weights, and `ckpt/` and `aa_state/` kept as they are.
  none   no weights: `ckpt/` and `aa_state/` removed. The cell cannot be re-evaluated.
A cell that kept its weights can be measured under new conditions without retraining
(`rftbench evaluate`, benchmark.reevaluate).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmark.atomic import write_atomic
from benchmark.errors import unknown_choice

if TYPE_CHECKING:
    from torch import Tensor

    from benchmark.study import Study

RETENTIONS = ("final", "all", "none")
WEIGHTS_FILE = "weights.safetensors"
DROPPED = ("ckpt", "aa_state")  # removed by `final` and `none`

BYTES_PER_PARAMETER = 4  # float32 weights
# AdamW keeps two float32 moments per trained parameter: a checkpoint (weights + moments) of a
# fully fine-tuned model is three times its weights, of a linear probe about its weights.
ADAMW_MOMENTS = 2
# Per test example and condition in examples.parquet (condition, index, correct, score), compressed:
# measured: about 1.6 bytes for 5 conditions x 1,000 examples of 0/1 scores; rounded up.
BYTES_PER_EXAMPLE = 2.0
# config.yaml, rows.parquet, history.parquet, state, log: about 20 kB for a demo cell; on the safe side.
BYTES_PER_CELL_FILES = 64_000


def check_retention(setting: str) -> str:
    if setting not in RETENTIONS:
        raise unknown_choice("runtime.retention", setting, RETENTIONS)
    return setting


def keep_weights(cell_dir: Path, setting: str, state_dict: dict[str, Tensor]) -> None:
    """Apply `setting` to the done cell in `cell_dir`, whose final weights are `state_dict`."""
    check_retention(setting)
    if setting in ("final", "all"):
        from safetensors.torch import save_file

        # Independent, contiguous CPU copies: safetensors refuses tensors that share memory.
        tensors = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in state_dict.items()}
        write_atomic(cell_dir / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp)))
    drop_training_state(cell_dir, setting)


def drop_training_state(cell_dir: Path, setting: str) -> None:
    """Remove what `setting` does not keep of a done cell: its checkpoint and AutoAttack state
    (unless `all`), its final weights (with `none`)."""
    if setting != "all":
        for name in DROPPED:
            shutil.rmtree(cell_dir / name, ignore_errors=True)
    if setting == "none":
        (cell_dir / WEIGHTS_FILE).unlink(missing_ok=True)


def load_weights(cell_dir: Path) -> dict[str, Tensor]:
    """The final weights a done cell kept (FileNotFoundError when it kept none)."""
    from safetensors.torch import load_file

    return load_file(str(cell_dir / WEIGHTS_FILE))


def disk_used(directory: Path) -> int:
    """Bytes of the files under `directory` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # a temporary file renamed away meanwhile
                pass
    return total


def cell_disk_estimate(config: dict[str, Any], setting: str) -> float:
    """Bytes a done cell of resolved `config` keeps under retention `setting`: its weights from
    the backbone's parameter count (`model.params_m`; the new head is negligible), its
    per-example results, its small files."""
    weights = config["model"]["params_m"] * 1e6 * BYTES_PER_PARAMETER
    kept = {"final": weights, "none": 0.0,
            "all": weights * (2 + (ADAMW_MOMENTS if config["protocol"]["train_backbone"] else 0))}[setting]
    examples = config["dataset"]["test_size"] * len(config["eval"]) * BYTES_PER_EXAMPLE
    return kept + examples + BYTES_PER_CELL_FILES


def disk_estimate(study: Study) -> dict[str, Any]:
    """The study's disk estimate under its `runtime.retention`: bytes for all its done cells."""
    setting = check_retention(study.config["runtime"]["retention"])
    per_cell = [cell_disk_estimate(cell.config, setting) for cell in study.cells]
    return {"retention": setting, "bytes": sum(per_cell), "cells": len(per_cell),
            "largest_cell_bytes": max(per_cell, default=0.0)}


def describe_disk(estimate: dict[str, Any]) -> str:
    """`disk_estimate` in one line, for `rftbench plan`."""
    return (f"disk estimate: {human_bytes(estimate['bytes'])} for all {estimate['cells']} cells done "
            f"(runtime.retention={estimate['retention']}: weights from model.params_m, per-example results; "
            f"largest cell {human_bytes(estimate['largest_cell_bytes'])})")


def human_bytes(n: float) -> str:
    """`n` bytes for a reader: 1.2 GB (powers of 1000)."""
    units = ("B", "kB", "MB", "GB", "TB", "PB")
    power = 0
    while abs(n) >= 1000 and power < len(units) - 1:
        n, power = n / 1000, power + 1
    return f"{n:.0f} B" if power == 0 else f"{n:.1f} {units[power]}"
