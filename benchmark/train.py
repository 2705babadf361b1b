"""The training loop: robust loss x protocol, with gradient accumulation, AMP on CUDA only,
a checkpoint after every epoch, and resume from the last completed epoch.

The optimiser follows the study: AdamW (betas from the protocol) with separate learning rate and
weight decay for backbone and head, and no weight decay on biases and normalisation parameters
(every parameter with fewer than two dimensions, timm's convention).
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from benchmark.atomic import write_atomic
from benchmark.data import Splits
from benchmark.errors import RFTBenchError
from benchmark.losses import NonFiniteLossError, eps_at_epoch, make_loss
from benchmark.models import Classifier

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What training did; `eps_per_epoch` and `val_accuracy` cover every epoch, resumed or not."""

    epochs: int
    resumed_from_epoch: int = 0
    seconds: float = 0.0
    eps_per_epoch: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _param_groups(model: Classifier, optimizer_cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """AdamW groups: (backbone | head) x (decay | no decay); frozen parameters are left out."""
    groups = []
    for part, params in (("backbone", model.backbone_parameters()), ("head", model.head_parameters())):
        trainable = [p for p in params if p.requires_grad]
        for decay in (True, False):
            chosen = [p for p in trainable if (p.ndim > 1) == decay]
            if chosen:
                weight_decay = optimizer_cfg[f"weight_decay_{part}"] if decay else 0.0
                groups.append({"params": chosen, "lr": optimizer_cfg[f"lr_{part}"], "weight_decay": weight_decay})
    return groups


def _accumulation_steps(protocol: dict[str, Any]) -> int:
    steps, remainder = divmod(protocol["effective_batch_size"], protocol["batch_size"])
    if remainder or steps < 1:
        raise RFTBenchError(
            f"protocol {protocol['name']!r}: effective_batch_size {protocol['effective_batch_size']} "
            f"must be a multiple of batch_size {protocol['batch_size']}"
        )
    return steps


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        logits = model(x.to(device))
        correct += (logits.argmax(1).cpu() == y).sum().item()
        total += len(y)
    return correct / max(total, 1)


class Trainer:
    """Fits one cell's model; `fit` resumes from `ckpt_path` when a checkpoint exists."""

    def __init__(self, model: Classifier, splits: Splits, loss_cfg: dict, protocol: dict, *,
                 ckpt_path: Path, device: torch.device, seed: int, num_workers: int = 0):
        self.model, self.splits, self.protocol = model.to(device), splits, protocol
        self.loss_cfg, self.robust_loss = loss_cfg, make_loss(loss_cfg)
        self.ckpt_path, self.device, self.seed, self.num_workers = ckpt_path, device, seed, num_workers
        if not protocol["train_backbone"]:
            model.freeze_backbone()
        self.optimizer = torch.optim.AdamW(_param_groups(model, protocol["optimizer"]),
                                           betas=tuple(protocol["optimizer"]["betas"]))
        self.scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=protocol["epochs"])
                          if protocol["cosine"] else None)
        self.amp = device.type == "cuda"  # AMP only where it pays and is numerically checked
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.accumulate = _accumulation_steps(protocol)
        self.result = TrainResult(epochs=protocol["epochs"])

    def fit(self) -> TrainResult:
        start = time.perf_counter()
        first_epoch = self._resume()
        val_loader = self._loader(self.splits.val, shuffle=False, epoch=0)
        for epoch in range(first_epoch, self.protocol["epochs"]):
            eps = eps_at_epoch(self.loss_cfg["eps_schedule"], self.loss_cfg["attack"]["eps"], epoch,
                               self.protocol["epochs"], self.result.val_accuracy)
            train_loss = self._train_epoch(epoch, eps)
            self.result.eps_per_epoch.append(eps)
            self.result.val_accuracy.append(accuracy(self.model, val_loader, self.device))
            if self.scheduler:
                self.scheduler.step()
            self._save(epoch + 1)
            log.info("epoch %d/%d eps=%.5f train_loss=%.4f val_acc=%.4f", epoch + 1, self.protocol["epochs"],
                     eps, train_loss, self.result.val_accuracy[-1])
        self.result.seconds = time.perf_counter() - start
        return self.result

    def _loader(self, dataset, shuffle: bool, epoch: int) -> DataLoader:
        # A per-epoch generator seed makes a resumed epoch see the same batches as the original.
        generator = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        return DataLoader(dataset, batch_size=self.protocol["batch_size"], shuffle=shuffle,
                          num_workers=self.num_workers, generator=generator, drop_last=False,
                          pin_memory=self.device.type == "cuda")

    def _train_epoch(self, epoch: int, eps: float) -> float:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total, batches = 0.0, 0
        loader = self._loader(self.splits.train, shuffle=True, epoch=epoch)
        for step, (x, y) in enumerate(loader):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with torch.autocast("cuda", enabled=self.amp):
                try:
                    loss, _ = self.robust_loss(self.model, x, y, eps)
                except NonFiniteLossError as err:
                    raise NonFiniteLossError(f"epoch {epoch + 1}, step {step + 1}: {err}") from None
            self.scaler.scale(loss / self.accumulate).backward()
            if (step + 1) % self.accumulate == 0 or step + 1 == len(loader):
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
            total, batches = total + loss.item(), batches + 1
        return total / max(batches, 1)

    def _save(self, epochs_done: int) -> None:
        state = {
            "epochs_done": epochs_done,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "scaler": self.scaler.state_dict(),
            "eps_per_epoch": self.result.eps_per_epoch,
            "val_accuracy": self.result.val_accuracy,
        }
        write_atomic(self.ckpt_path, lambda tmp: torch.save(state, tmp))

    def _resume(self) -> int:
        """Load the last checkpoint if any; returns the epoch to start from (0 without one)."""
        if not self.ckpt_path.exists():
            return 0
        state = torch.load(self.ckpt_path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.result.eps_per_epoch = list(state["eps_per_epoch"])
        self.result.val_accuracy = list(state["val_accuracy"])
        self.result.resumed_from_epoch = state["epochs_done"]
        # The attack is deterministic and batches are seeded per epoch; reseed the rest per epoch.
        seed_everything(self.seed + state["epochs_done"])
        log.info("resumed from checkpoint after epoch %d", state["epochs_done"])
        return state["epochs_done"]
