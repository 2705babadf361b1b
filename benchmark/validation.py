"""The robust validation loss: the one number hyper-parameter search minimises (and the number a
learning curve records per epoch).

Definition: the mean cross-entropy of the model on a fixed validation subset attacked with the
cell's own training attack (its `loss.attack`: same attack, norm, target eps, steps and step
size), whatever the training loss; lower is better. The subset is at most SUBSET_SIZE images of
the val split, stratified by class and drawn with SUBSET_SEED, so every trial, epoch and seed
of a dataset is measured on the same images. The attack maximises the cross-entropy (objective
`ce`, even for TRADES, whose training attack maximises a KL divergence): it attacks the very
quantity measured, and the number means the same for every loss. The model is in eval mode.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Subset

from benchmark.attacks import eval_mode, make_attack
from benchmark.data import ImageDataset, load_tensors
from benchmark.errors import RFTBenchError

SUBSET_SIZE = 512
SUBSET_SEED = 0


def validation_subset(val: ImageDataset, size: int = SUBSET_SIZE, seed: int = SUBSET_SEED) -> tuple[Tensor, Tensor]:
    """(x, y) of at most `size` images of the val split, stratified by class, in split order."""
    positions = np.arange(len(val))
    if len(val) > size:
        from sklearn.model_selection import train_test_split

        try:
            positions = np.sort(train_test_split(positions, train_size=size, stratify=val.labels,
                                                 random_state=seed)[0])
        except ValueError as err:  # e.g. more classes than `size`
            raise RFTBenchError(f"cannot draw a stratified validation subset of {size} images: {err}") from None
    return load_tensors(Subset(val, positions.tolist()))


def robust_validation_loss(model: nn.Module, x: Tensor, y: Tensor, attack_cfg: dict[str, Any],
                           device: torch.device, batch_size: int = 256) -> float:
    """The mean cross-entropy on (x, y) attacked with `attack_cfg` (a loss config's `attack`
    node) at its target eps, objective forced to cross-entropy; see the module docstring."""
    return robust_validation(model, x, y, attack_cfg, device, batch_size)[0]


@torch.no_grad()
def robust_validation(model: nn.Module, x: Tensor, y: Tensor, attack_cfg: dict[str, Any],
                      device: torch.device, batch_size: int = 256) -> tuple[float, float]:
    """(robust validation loss, accuracy on the same attacked images): one attack, two numbers."""
    attack = make_attack({**attack_cfg, "objective": "ce"})
    total, correct = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(y), batch_size):
            xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
            x_adv = attack(model, xb, yb, attack_cfg["eps"], None) if attack_cfg["eps"] > 0 else xb
            logits = model(x_adv).float()
            total += F.cross_entropy(logits, yb, reduction="sum").item()
            correct += (logits.argmax(1) == yb).sum().item()
    return total / len(y), correct / len(y)
