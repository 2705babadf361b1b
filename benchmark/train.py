"""The training loop: robust loss x protocol, with gradient accumulation, the protocol's
precision, a checkpoint after every epoch, and resume from the last completed epoch.

Precision (`protocol.precision`): fp32; fp16 (autocast, with a gradient scaler); bf16 (autocast,
no scaler: bfloat16 has float32's range); auto = fp16 on CUDA, fp32 elsewhere. The training attack
runs inside the same autocast context as the loss; evaluation always runs in float32.

The optimiser follows the study: AdamW (betas from the protocol) with separate learning rate and
weight decay for backbone and head, and no weight decay on biases and normalisation parameters
(every parameter with fewer than two dimensions, timm's convention).
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from benchmark.atomic import write_atomic
from benchmark.data import Splits
from benchmark.distributed import SINGLE, Group, batch_sizes, rank_seed
from benchmark.errors import RFTBenchError, unknown_choice
from benchmark.loss_kinds import eps_at_epoch
from benchmark.losses import NonFiniteLossError, make_loss
from benchmark.models import Classifier

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision that runs on `device` for the setting `precision` (one of PRECISIONS):
    `auto` is fp16 on CUDA and fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise unknown_choice("protocol.precision", precision, PRECISIONS)
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RFTBenchError(f"protocol.precision=bf16: {torch.cuda.get_device_name(device)} has no bfloat16 "
                            "support; use fp16 or fp32")
    return precision


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """The autocast context of a resolved precision (disabled for fp32)."""
    return torch.autocast(device.type, dtype=_AUTOCAST_DTYPES.get(precision), enabled=precision in _AUTOCAST_DTYPES)


@dataclass
class TrainResult:
    """What training did; `eps_per_epoch` and `val_accuracy` cover every epoch, resumed or not."""

    epochs: int
    resumed_from_epoch: int = 0
    seconds: float = 0.0
    eps_per_epoch: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    # One record per completed epoch (plain numbers, kept in the checkpoint): epoch, step,
    # samples_seen, train_loss, train_accuracy (on the adversarial examples), val_accuracy, eps,
    # lr_backbone (None when frozen), lr_head, seconds, and what `measure` added.
    history: list[dict[str, Any]] = field(default_factory=list)


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
                groups.append({"params": chosen, "lr": optimizer_cfg[f"lr_{part}"], "weight_decay": weight_decay,
                               "part": part})
    return groups


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader, device: torch.device, group: Group = SINGLE) -> float:
    """Accuracy over the examples of `loader` of every rank of `group` (each its own shard)."""
    model.eval()
    counts = torch.zeros(2, dtype=torch.int64)  # correct, total
    for x, y in loader:
        logits = model(x.to(device))
        counts += torch.tensor([(logits.argmax(1).cpu() == y).sum().item(), len(y)])
    correct, total = group.sum(counts).tolist()
    return correct / max(total, 1)


class Trainer:
    """Fits one cell's model; `fit` resumes from `ckpt_path` when a checkpoint exists.

    With a `group` of N ranks (benchmark.distributed), each rank trains on its shard of every
    epoch with its own attack, gradients are averaged across ranks before each update, and an
    update still sees `protocol.effective_batch_size` examples (`distributed.batch_sizes`), so
    the updates per epoch do not depend on N. BatchNorm statistics stay per rank, as in the
    published study. Rank 0 alone writes the checkpoint, which holds nothing of N: a cell
    resumes on any number of ranks."""

    def __init__(self, model: Classifier, splits: Splits, loss_cfg: dict, protocol: dict, *,
                 ckpt_path: Path, device: torch.device, seed: int, num_workers: int = 0,
                 on_epoch_end: Callable[[int, TrainResult], None] | None = None, group: Group = SINGLE,
                 measure: Callable[[], dict[str, Any]] | None = None):
        # on_epoch_end(epochs done, result) runs after each epoch's checkpoint; it may raise to
        # stop training there (a tuning trial reports its objective and is pruned this way).
        # measure() runs before the checkpoint and its values join the epoch's history record:
        # saved with the weights, a resumed cell's history neither repeats nor loses an epoch.
        self.on_epoch_end, self.measure = on_epoch_end, measure
        self.model, self.splits, self.protocol = model.to(device), splits, protocol
        self.loss_cfg, self.robust_loss = loss_cfg, make_loss(loss_cfg)
        self.ckpt_path, self.device, self.seed, self.num_workers = ckpt_path, device, seed, num_workers
        if not protocol["train_backbone"]:
            model.freeze_backbone()
        self.optimizer = torch.optim.AdamW(_param_groups(model, protocol["optimizer"]),
                                           betas=tuple(protocol["optimizer"]["betas"]))
        self.scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=protocol["epochs"])
                          if protocol["cosine"] else None)
        self.precision = resolve_precision(protocol["precision"], device)  # what runs: rows record it
        # fp16's narrow range underflows small gradients: the scaler keeps them representable.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.group = group
        self.batch_size, self.accumulate = batch_sizes(protocol, group.world_size)
        group.broadcast_state(model)  # every rank starts from rank 0's weights
        if group.rank:  # its own augmentation and attack draws; rank 0 keeps the single-process stream
            seed_everything(rank_seed(seed, group))
        self.result = TrainResult(epochs=protocol["epochs"])

    def fit(self) -> TrainResult:
        start = time.perf_counter()
        first_epoch = self._resume()
        val_loader = self._loader(self.splits.val, shuffle=False, epoch=0)
        for epoch in range(first_epoch, self.protocol["epochs"]):
            eps = eps_at_epoch(self.loss_cfg["eps_schedule"], self.loss_cfg["attack"]["eps"], epoch,
                               self.protocol["epochs"], self.result.val_accuracy)
            epoch_start = time.perf_counter()
            lrs = {f"lr_{part}": self._lr(part) for part in ("backbone", "head")}
            train_loss, train_accuracy, seen, steps = self._train_epoch(epoch, eps)
            self.result.eps_per_epoch.append(eps)
            self.result.val_accuracy.append(accuracy(self.model, val_loader, self.device, self.group))
            self._record(epoch, eps, train_loss, train_accuracy, seen, steps, lrs, time.perf_counter() - epoch_start)
            if self.scheduler:
                self.scheduler.step()
            self._save(epoch + 1)
            log.info("epoch %d/%d eps=%.5f train_loss=%.4f val_acc=%.4f", epoch + 1, self.protocol["epochs"],
                     eps, train_loss, self.result.val_accuracy[-1])
            if self.on_epoch_end:
                self.on_epoch_end(epoch + 1, self.result)
        self.result.seconds = time.perf_counter() - start
        return self.result

    def _loader(self, dataset, shuffle: bool, epoch: int) -> DataLoader:
        """This rank's batches of its per-rank batch size. A shuffled epoch is a permutation
        seeded per epoch, the same on every rank (a resumed epoch sees the same batches as the
        original; the same permutation as DataLoader's own shuffling), cut to a multiple of
        `protocol.drop_last_multiple` images as a DistributedSampler with drop_last over that
        many ranks cuts it, then to a multiple of the ranks; rank r takes its positions r::N
        (as DistributedSampler does). Unshuffled (validation), rank r takes examples r::N."""
        order = list(self.group.shard(len(dataset)))
        if shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            order = torch.randperm(len(dataset), generator=generator).tolist()
            order = order[:len(order) - len(order) % self.protocol["drop_last_multiple"]]
            order = order[:len(order) - len(order) % self.group.world_size][self.group.rank::self.group.world_size]
        return DataLoader(dataset, batch_size=self.batch_size, sampler=order,
                          num_workers=self.num_workers, drop_last=False, pin_memory=self.device.type == "cuda")

    def _lr(self, part: str) -> float | None:
        """The learning rate of the backbone's or head's parameters now (None: none trained)."""
        return next((g["lr"] for g in self.optimizer.param_groups if g.get("part") == part), None)

    def _record(self, epoch: int, eps: float, train_loss: float, train_accuracy: float, seen: int, steps: int,
                lrs: dict[str, float | None], seconds: float) -> None:
        """Append the epoch's history record (steps and samples counted from the first epoch)."""
        previous = self.result.history[-1] if self.result.history else {"step": 0, "samples_seen": 0}
        record = {"epoch": epoch + 1, "step": previous["step"] + steps, "samples_seen": previous["samples_seen"] + seen,
                  "train_loss": train_loss, "train_accuracy": train_accuracy,
                  "val_accuracy": self.result.val_accuracy[-1], "eps": eps, **lrs, "seconds": seconds}
        self.result.history.append({**record, **(self.measure() if self.measure else {})})

    def _train_epoch(self, epoch: int, eps: float) -> tuple[float, float, int, int]:
        """One epoch; (mean loss, accuracy on the adversarial examples, examples seen, optimizer
        steps), the first three over every rank."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total, batches, correct, seen, steps = 0.0, 0, 0, 0, 0
        loader = self._loader(self.splits.train, shuffle=True, epoch=epoch)
        for step, (x, y) in enumerate(loader):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with autocast(self.precision, self.device):
                try:
                    loss, logits_adv = self.robust_loss(self.model, x, y, eps)
                except NonFiniteLossError as err:
                    raise NonFiniteLossError(f"epoch {epoch + 1}, step {step + 1}: {err}") from None
            self.scaler.scale(loss / self.accumulate).backward()
            if (step + 1) % self.accumulate == 0 or step + 1 == len(loader):
                self.group.average_gradients(self.model.parameters())
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                steps += 1
            total, batches = total + loss.item(), batches + 1
            correct, seen = correct + (logits_adv.argmax(1) == y).sum().item(), seen + len(y)
        total, batches, correct, seen = self.group.sum(torch.tensor([total, batches, correct, seen],
                                                                    dtype=torch.float64)).tolist()
        return total / max(batches, 1), correct / max(seen, 1), int(seen), steps

    def _save(self, epochs_done: int) -> None:
        if not self.group.writer:
            return
        state = {
            "epochs_done": epochs_done,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "scaler": self.scaler.state_dict(),
            "eps_per_epoch": self.result.eps_per_epoch,
            "val_accuracy": self.result.val_accuracy,
            "history": self.result.history,
        }
        write_atomic(self.ckpt_path, lambda tmp: torch.save(state, tmp))

    def _resume(self) -> int:
        """Load the last checkpoint if any; returns the epoch to start from (0 without one)."""
        if not self.ckpt_path.exists():
            return 0
        # Tensors and plain types only: loading never unpickles arbitrary objects.
        state = torch.load(self.ckpt_path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler:
            self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when saved by a disabled scaler (auto precision resumed on another device)
            self.scaler.load_state_dict(state["scaler"])
        self.result.eps_per_epoch = list(state["eps_per_epoch"])
        self.result.val_accuracy = list(state["val_accuracy"])
        self.result.history = list(state.get("history", []))  # none in a checkpoint written before histories
        self.result.resumed_from_epoch = state["epochs_done"]
        # The attack is deterministic and batches are seeded per epoch; reseed the rest per epoch.
        seed_everything(rank_seed(self.seed + state["epochs_done"], self.group))
        log.info("resumed from checkpoint after epoch %d", state["epochs_done"])
        return state["epochs_done"]
