"""The robust training losses (Classic AT, TRADES) and the epsilon schedules.

A loss generates adversarial examples with the model in eval mode (as the study did), then
computes the training loss with the model in whatever mode the caller left it in (training).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.attacks import Attack, eval_mode, make_attack
from benchmark.errors import RFTBenchError, unknown_choice

LOSSES = ("classic_at", "trades")
SCHEDULES = ("constant", "linear", "two_hinge", "auto")


class NonFiniteLossError(RFTBenchError):
    """The training loss became NaN or infinite (the trainer adds the epoch and step)."""


@dataclass(frozen=True)
class RobustLoss:
    """`loss(model, x, y, eps) -> (loss, adversarial logits, detached)`.

    classic_at: CE(model(x_adv), y).
    trades:     CE(model(x), y) + beta * KLDivLoss(batchmean)(log_softmax(model(x_adv)),
                softmax(model(x))), exactly as Zhang et al.'s reference code (the clean
                distribution is not detached).
    With eps == 0 no attack runs and x_adv is x (TRADES then reuses the clean logits: KL = 0).
    """

    name: str
    attack: Attack
    objective: str
    trades_beta: float | None = None

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        x_adv = self.adversarial(model, x, y, eps) if eps > 0 else x
        if self.name == "classic_at":
            logits_adv = model(x_adv)
            loss = F.cross_entropy(logits_adv.float(), y)
        else:
            logits = model(x)
            logits_adv = logits if x_adv is x else model(x_adv)
            kl = F.kl_div(F.log_softmax(logits_adv.float(), dim=1), F.softmax(logits.float(), dim=1),
                          reduction="batchmean")
            loss = F.cross_entropy(logits.float(), y) + self.trades_beta * kl
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"the {self.name} loss is not finite ({loss.item()}) at eps={eps:.6g}")
        return loss, logits_adv.detach()

    def adversarial(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
        """The training attack's examples, generated with the model in eval mode."""
        with eval_mode(model):
            clean_logits = None
            if self.objective == "kl":
                with torch.no_grad():
                    clean_logits = model(x)
            return self.attack(model, x, y, eps, clean_logits).detach()


def make_loss(loss_cfg: dict[str, Any]) -> RobustLoss:
    """The RobustLoss of a `conf/loss` option."""
    kind = loss_cfg["kind"]  # the option's `name` may differ, e.g. trades_two_hinge
    if kind not in LOSSES:
        raise unknown_choice(f"loss kind (loss {loss_cfg['name']!r})", kind, LOSSES)
    beta = loss_cfg.get("trades_beta")
    if kind == "trades" and beta is None:
        raise RFTBenchError(f"loss {loss_cfg['name']!r}: trades needs trades_beta (the study used 1.0)")
    return RobustLoss(kind, make_attack(loss_cfg["attack"]), loss_cfg["attack"]["objective"],
                      float(beta) if kind == "trades" else None)


def eps_at_epoch(schedule_cfg: dict[str, Any], target_eps: float, epoch: int, epochs: int,
                 val_history: list[float]) -> float:
    """The training eps for `epoch` (0-based, of `epochs`) under the schedule `schedule_cfg`
    (`name` and optional keys `warmup_epochs`, `t1`, `t2`, `patience`, `tolerance`).

    constant:  target_eps at every epoch.
    linear:    target * epoch / W, capped at the target: 0 at epoch 0, the target from epoch W
               on. W = `warmup_epochs`, default epochs - 1 (the ramp spans all epochs).
    two_hinge: 0 for epoch < T1, target * (epoch - T1) / (T2 - T1) for T1 <= epoch < T2, the
               target from T2 on. Defaults T1=12, T2=37 are for 50 epochs; for another epoch
               count they scale by epochs/50, rounded half up (4 epochs: T1=1, T2=3).
    auto:      0 until the validation accuracy plateaus, then a linear ramp that reaches the
               target at the last epoch (epochs - 1). val_history[j] is the validation accuracy
               after epoch j; only val_history[:epoch] is read. The plateau epoch P is the
               first j >= patience with max(h[j-patience+1 : j+1]) <= max(h[:j-patience+1])
               + tolerance (no gain above `tolerance` for `patience` epochs; defaults 5 and
               0.02, accuracies in [0, 1]); then eps = target * (epoch - P) / (epochs - 1 - P)
               for epoch > P. The last epoch always trains at the target, even with no plateau.
    """
    name = schedule_cfg["name"]
    if name == "constant":
        return target_eps
    if name == "linear":
        warmup = schedule_cfg.get("warmup_epochs")
        return _ramp(target_eps, epoch, 0, epochs - 1 if warmup is None else warmup)
    if name == "two_hinge":
        t1 = schedule_cfg.get("t1", _half_up(12 * epochs / 50))
        t2 = schedule_cfg.get("t2", _half_up(37 * epochs / 50))
        return _ramp(target_eps, epoch, t1, t2)
    if name == "auto":
        plateau = plateau_epoch(val_history[:epoch], schedule_cfg.get("patience", 5), schedule_cfg.get("tolerance", 0.02))
        start = epochs - 1 if plateau is None else min(plateau, epochs - 1)
        return _ramp(target_eps, epoch, start, epochs - 1)
    raise unknown_choice("eps schedule", name, SCHEDULES)


def plateau_epoch(history: list[float], patience: int, tolerance: float) -> int | None:
    """The first epoch j >= patience whose last `patience` accuracies gain at most `tolerance`
    over the best before them; None if there is none yet."""
    for j in range(patience, len(history)):
        if max(history[j - patience + 1:j + 1]) <= max(history[:j - patience + 1]) + tolerance:
            return j
    return None


def _ramp(target: float, epoch: int, start: int, end: int) -> float:
    """0 up to `start`, linear to `target` at `end`, `target` from then on."""
    if epoch >= end:
        return target
    if epoch <= start:
        return 0.0
    return target * (epoch - start) / (end - start)


def _half_up(value: float) -> int:
    return math.floor(value + 0.5)
