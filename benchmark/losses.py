"""The robust training losses (Classic AT, TRADES, MART): the torch side of the loss kinds
registered in `benchmark.loss_kinds`.

A loss generates adversarial examples with the model in eval mode (as the study did), then
computes the training loss with the model in whatever mode the caller left it in (training).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import Tensor, nn

from benchmark.attacks import Attack, eval_mode, make_attack
from benchmark.errors import RFTBenchError
from benchmark.loss_kinds import ClassicATParams, MartParams, TradesParams, loss_kind
from benchmark.registry import resolve


# (model, x, x_adv, y, the kind's params) -> (loss, adversarial logits); see LossKind
LossFunction = Callable[[nn.Module, Tensor, Tensor, Tensor, Any], tuple[Tensor, Tensor]]


class NonFiniteLossError(RFTBenchError):
    """The training loss became NaN or infinite (the trainer adds the epoch and step)."""


@dataclass(frozen=True)
class RobustLoss:
    """`loss(model, x, y, eps) -> (loss, adversarial logits, detached)`: the training attack's
    examples (none when eps == 0: x_adv is x), then the kind's `function` on them."""

    name: str
    attack: Attack
    objective: str
    function: LossFunction
    params: BaseModel  # the kind's schema instance

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        x_adv = self.adversarial(model, x, y, eps) if eps > 0 else x
        loss, logits_adv = self.function(model, x, x_adv, y, self.params)
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
    kind = loss_kind(loss_cfg)
    return RobustLoss(kind.name, make_attack(loss_cfg["attack"]), loss_cfg["attack"]["objective"],
                      resolve(kind.function), kind.params(loss_cfg))


def classic_at(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, params: ClassicATParams) -> tuple[Tensor, Tensor]:
    """CE(model(x_adv), y) (Madry et al.)."""
    logits_adv = model(x_adv)
    return F.cross_entropy(logits_adv.float(), y), logits_adv


def trades(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, params: TradesParams) -> tuple[Tensor, Tensor]:
    """CE(model(x), y) + beta * KLDivLoss(batchmean)(log_softmax(model(x_adv)), softmax(model(x))),
    exactly as Zhang et al.'s reference code (the clean distribution is not detached)."""
    logits, logits_adv = _clean_and_adversarial_logits(model, x, x_adv)
    kl = F.kl_div(F.log_softmax(logits_adv.float(), dim=1), F.softmax(logits.float(), dim=1), reduction="batchmean")
    return F.cross_entropy(logits.float(), y) + params.trades_beta * kl, logits_adv


def mart(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, params: MartParams) -> tuple[Tensor, Tensor]:
    """MART (Wang et al., ICLR 2020) on the clean and adversarial logits, see `mart_objective`."""
    logits, logits_adv = _clean_and_adversarial_logits(model, x, x_adv)
    return mart_objective(logits, logits_adv, y, params.mart_lambda), logits_adv


def mart_objective(logits: Tensor, logits_adv: Tensor, y: Tensor, mart_lambda: float) -> Tensor:
    """mean_i BCE_i + lambda * mean_i KL(p_i || p_adv_i) * (1 - p_i[y_i]), where p = softmax(logits)
    and BCE_i = -log p_adv_i[y_i] - log(1 - max_{k != y_i} p_adv_i[k]) (the boosted cross-entropy).

    Reductions as the authors' reference code (`mart_loss`): BCE averaged over the batch, KL
    summed over classes per example then averaged over the batch, and no term detached (the
    gradient flows through the clean distribution and the weight too). Where that code adds
    small constants inside its logarithms and to the weight (log(p + 1e-12), log(1.0001 - p +
    1e-12), 1.0000001 - p) to stay finite, this computes the exact formula stably instead:
    log(1 - p_adv[k]) as logsumexp of the other classes' logits minus logsumexp of all.
    """
    logits, logits_adv = logits.float(), logits_adv.float()
    log_p, log_p_adv = F.log_softmax(logits, dim=1), F.log_softmax(logits_adv, dim=1)
    true = y.unsqueeze(1)
    wrong_best = logits_adv.scatter(1, true, float("-inf")).argmax(1, keepdim=True)
    log_not_wrong_best = (torch.logsumexp(logits_adv.scatter(1, wrong_best, float("-inf")), dim=1)
                          - torch.logsumexp(logits_adv, dim=1))
    boosted_ce = F.nll_loss(log_p_adv, y) - log_not_wrong_best.mean()
    kl = F.kl_div(log_p_adv, log_p, reduction="none", log_target=True).sum(1)
    misclassification_weight = 1 - log_p.gather(1, true).squeeze(1).exp()
    return boosted_ce + mart_lambda * (kl * misclassification_weight).mean()


def _clean_and_adversarial_logits(model: nn.Module, x: Tensor, x_adv: Tensor) -> tuple[Tensor, Tensor]:
    """model(x) and model(x_adv), one pass when there is no attack (x_adv is x)."""
    logits = model(x)
    return logits, logits if x_adv is x else model(x_adv)
