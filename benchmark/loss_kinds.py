"""The loss kinds and eps schedules a `conf/loss` option can name: torch-free, so that planning
checks a loss option without loading torch.

A loss option's `kind` selects a `LossKind` of `LOSSES`: its name, the pydantic model of the
keys only that kind has (`schema`, e.g. TRADES' `trades_beta`), and its torch-side function by
import path into `benchmark.losses`. Adding a loss is one `LOSSES.register` here (or in a plugin
module) plus one `conf/loss` file.

An option's `eps_schedule.name` selects a `Schedule` of `SCHEDULES`: the model of its parameters
and the function giving the training eps of an epoch (pure arithmetic, so it lives here).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field, ValidationError, model_validator

from benchmark.errors import RFTBenchError, unknown_choice
from benchmark.registry import Registry
from benchmark.schema import LossOption, Strict, describe


def validated(model: type[BaseModel], values: dict[str, Any], where: str, prefix: str) -> BaseModel:
    """`values` checked by `model` (as `schema.check`, returning the checked instance)."""
    try:
        return model.model_validate(values)
    except ValidationError as err:
        raise RFTBenchError(f"{where}: {describe(err, prefix)}") from None


# --- loss kinds -------------------------------------------------------------------------------

@dataclass(frozen=True)
class LossKind:
    """Everything about one loss kind.

    `function` is the import path (`"benchmark.losses:trades"`, resolved with
    `registry.resolve` where training runs) of `(model, x, x_adv, y, params) -> (loss, adversarial
    logits)`, called in training mode after the attack; `x_adv` is `x` itself when eps is 0, and
    `params` is the option's `schema` instance.
    """

    name: str
    schema: type[Strict]
    function: str

    def params(self, loss_cfg: dict[str, Any]) -> BaseModel:
        """The keys of a loss option that `schema.LossOption` does not declare, checked as this
        kind's own (a key of another kind, e.g. trades_beta on classic_at, is refused)."""
        own = {key: value for key, value in loss_cfg.items() if key not in LossOption.model_fields}
        return validated(self.schema, own, f"loss option {loss_cfg.get('name')!r}", "loss")


class ClassicATParams(Strict):
    """Classic AT has no keys of its own."""


class TradesParams(Strict):
    trades_beta: float = Field(gt=0, description="weight of KL(clean || adversarial); the study used 1.0")


class MartParams(Strict):
    mart_lambda: float = Field(ge=0, description="weight of the misclassification-aware KL term; "
                                                 "the paper used 5.0")


LOSSES: Registry[LossKind] = Registry("loss kind")
LOSSES.register("classic_at", LossKind("classic_at", ClassicATParams, "benchmark.losses:classic_at"))
LOSSES.register("trades", LossKind("trades", TradesParams, "benchmark.losses:trades"))
LOSSES.register("mart", LossKind("mart", MartParams, "benchmark.losses:mart"))


def loss_kind(loss_cfg: dict[str, Any]) -> LossKind:
    """The registered kind a loss option names (an option's `name` may differ from its kind,
    e.g. trades_two_hinge)."""
    kind = loss_cfg.get("kind")
    if kind not in LOSSES:
        raise unknown_choice(f"loss kind (loss option {loss_cfg.get('name')!r})", str(kind), LOSSES)
    return LOSSES[kind]


# --- eps schedules ----------------------------------------------------------------------------

# (params, target eps, epoch (0-based), epochs, validation accuracy after each finished epoch) -> eps
EpsFunction = Callable[[Any, float, int, int, list[float]], float]


@dataclass(frozen=True)
class Schedule:
    """One eps schedule: the model of its parameters (the keys beside `name`) and its function."""

    name: str
    schema: type[Strict]
    epsilon: EpsFunction


class ConstantParams(Strict):
    """The constant schedule has no parameters."""


class LinearParams(Strict):
    warmup_epochs: int | None = Field(default=None, ge=0, description="epochs of the ramp from 0 to "
                                      "the target; default: all epochs but the last")


class TwoHingeParams(Strict):
    t1: int | None = Field(default=None, ge=0, description="last epoch at eps 0; default 12 of 50, scaled")
    t2: int | None = Field(default=None, ge=0, description="first epoch at the target; default 37 of 50, scaled")

    @model_validator(mode="after")
    def _ordered(self) -> TwoHingeParams:
        if self.t1 is not None and self.t2 is not None and self.t1 > self.t2:
            raise ValueError(f"t1 ({self.t1}) must not exceed t2 ({self.t2})")
        return self


class AutoParams(Strict):
    patience: int = Field(default=5, ge=1, description="epochs without gain that make a plateau")
    tolerance: float = Field(default=0.02, ge=0, description="largest validation-accuracy gain that "
                                                             "counts as none (accuracies in [0, 1])")


def _constant(params: ConstantParams, target: float, epoch: int, epochs: int, history: list[float]) -> float:
    return target


def _linear(params: LinearParams, target: float, epoch: int, epochs: int, history: list[float]) -> float:
    return _ramp(target, epoch, 0, epochs - 1 if params.warmup_epochs is None else params.warmup_epochs)


def _two_hinge(params: TwoHingeParams, target: float, epoch: int, epochs: int, history: list[float]) -> float:
    t1 = _half_up(12 * epochs / 50) if params.t1 is None else params.t1
    t2 = _half_up(37 * epochs / 50) if params.t2 is None else params.t2
    return _ramp(target, epoch, t1, t2)


def _auto(params: AutoParams, target: float, epoch: int, epochs: int, history: list[float]) -> float:
    plateau = plateau_epoch(history[:epoch], params.patience, params.tolerance)
    start = epochs - 1 if plateau is None else min(plateau, epochs - 1)
    return _ramp(target, epoch, start, epochs - 1)


SCHEDULES: Registry[Schedule] = Registry("eps schedule")
SCHEDULES.register("constant", Schedule("constant", ConstantParams, _constant))
SCHEDULES.register("linear", Schedule("linear", LinearParams, _linear))
SCHEDULES.register("two_hinge", Schedule("two_hinge", TwoHingeParams, _two_hinge))
SCHEDULES.register("auto", Schedule("auto", AutoParams, _auto))


def schedule_params(schedule_cfg: dict[str, Any], where: str = "eps schedule") -> tuple[Schedule, BaseModel]:
    """The schedule an `eps_schedule` block names and its checked parameters (the other keys)."""
    schedule = SCHEDULES[str(schedule_cfg.get("name"))]
    params = {key: value for key, value in schedule_cfg.items() if key != "name"}
    return schedule, validated(schedule.schema, params, where, "loss.eps_schedule")


def check_loss_option(loss_cfg: dict[str, Any]) -> None:
    """What a loss option needs checked beyond `schema.LossOption`: its kind is registered, its
    other keys are that kind's and valid, and its eps schedule and parameters are valid."""
    loss_kind(loss_cfg).params(loss_cfg)
    schedule_params(loss_cfg["eps_schedule"], f"loss option {loss_cfg.get('name')!r}")


def eps_at_epoch(schedule_cfg: dict[str, Any], target_eps: float, epoch: int, epochs: int,
                 val_history: list[float]) -> float:
    """The training eps for `epoch` (0-based, of `epochs`) under the schedule `schedule_cfg`
    (`name` and the schedule's parameters).

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
    schedule, params = schedule_params(schedule_cfg)
    return schedule.epsilon(params, target_eps, epoch, epochs, val_history)


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
