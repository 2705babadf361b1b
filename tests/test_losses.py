"""Robust losses (values against a direct computation from the same adversarial examples; the
attack in eval mode, the loss in training mode) and the eps schedules."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from benchmark.attacks import apgd, eval_mode
from benchmark.errors import RFTBenchError
from benchmark.losses import NonFiniteLossError, eps_at_epoch, make_loss, plateau_epoch
from benchmark.study import load_option

EPS = 4 / 255


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=10).train()  # BatchNorm, no dropout


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return torch.rand(8, 3, 32, 32, generator=generator), torch.randint(0, 10, (8,), generator=generator)


def _batches_tracked(model: nn.Module) -> int:
    """How many training-mode forward passes the model's first BatchNorm has seen."""
    return int(next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).num_batches_tracked)


def _loss_cfg(option: str, **patch) -> dict:
    return {**load_option("loss", option), **patch}


def _adversarial(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with eval_mode(model):
        return apgd(model, x, y, eps=EPS, norm="Linf", steps=10)


def test_classic_at_is_cross_entropy_on_apgd_examples(model, batch):
    x, y = batch
    reference = copy.deepcopy(model)
    before = _batches_tracked(model)
    loss, logits_adv = make_loss(_loss_cfg("classic_at"))(model, x, y, EPS)

    expected_logits = reference(_adversarial(reference, x, y))
    torch.testing.assert_close(logits_adv, expected_logits.detach())
    torch.testing.assert_close(loss, F.cross_entropy(expected_logits, y))
    assert model.training and all(m.training for m in model.modules())
    assert _batches_tracked(model) == before + 1  # the attack's passes ran in eval mode
    assert all(p.grad is None for p in model.parameters())  # the attack filled no gradient
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_trades_matches_the_reference_formula_on_the_same_examples(model, batch):
    x, y = batch
    reference = copy.deepcopy(model)
    before = _batches_tracked(model)
    loss, logits_adv = make_loss(_loss_cfg("trades", trades_beta=6.0))(model, x, y, EPS)

    x_adv = _adversarial(reference, x, y)  # the study's TRADES uses the same APGD-CE examples
    logits, expected_adv = reference(x), reference(x_adv)
    kl = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(expected_adv, dim=1), F.softmax(logits, dim=1))
    torch.testing.assert_close(loss, F.cross_entropy(logits, y) + 6.0 * kl)
    torch.testing.assert_close(logits_adv, expected_adv.detach())
    assert kl > 0
    assert _batches_tracked(model) == before + 2


@pytest.mark.parametrize("name", ["classic_at", "trades"])
def test_eps_zero_skips_the_attack(model, batch, name):
    x, y = batch
    reference = copy.deepcopy(model)
    before = _batches_tracked(model)
    loss, logits_adv = make_loss(_loss_cfg(name))(model, x, y, 0.0)
    clean_logits = reference(x)
    torch.testing.assert_close(loss, F.cross_entropy(clean_logits, y))  # TRADES' KL term is 0
    torch.testing.assert_close(logits_adv, clean_logits.detach())
    assert _batches_tracked(model) == before + 1  # one training pass, nothing else


def test_kl_objective_attacks_against_the_eval_mode_clean_prediction(model, batch):
    x, y = batch
    cfg = _loss_cfg("trades")
    loss_fn = make_loss({**cfg, "attack": {**cfg["attack"], "objective": "kl"}})
    x_adv = loss_fn.adversarial(model, x, y, EPS)
    assert model.training
    delta = (x_adv - x).flatten(1).abs().amax(1)
    assert (delta <= EPS + 1e-6).all() and (delta > EPS / 2).all()
    loss, _ = loss_fn(model, x, y, EPS)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("eps", [0.0, EPS])
def test_non_finite_loss_raises_a_clear_error(model, batch, eps):
    x, y = batch
    with torch.no_grad():
        model.fc.bias[3] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"the classic_at loss is not finite \(nan\)") as info:
        make_loss(_loss_cfg("classic_at"))(model, x, y, eps)
    assert isinstance(info.value, RFTBenchError)


def test_make_loss_refuses_bad_configs():
    with pytest.raises(RFTBenchError, match="unknown loss kind .* 'trade'; valid choices \\(closest first\\): trades"):
        make_loss(_loss_cfg("trades", kind="trade"))
    with pytest.raises(RFTBenchError, match="trades needs trades_beta"):
        make_loss(_loss_cfg("trades", trades_beta=None))


# --- eps schedules ---------------------------------------------------------------------------

T = 0.25  # target eps (a round number so the expected values are exact)


def _schedule(cfg: dict, epochs: int, history: list[float] | None = None) -> list[float]:
    return [eps_at_epoch(cfg, T, epoch, epochs, history or []) for epoch in range(epochs)]


def test_constant_and_linear_schedules():
    assert _schedule({"name": "constant"}, 3) == [T, T, T]
    assert _schedule({"name": "linear"}, 5) == [0, T / 4, T / 2, 3 * T / 4, T]  # ramp over all epochs
    assert _schedule({"name": "linear", "warmup_epochs": 2}, 5) == [0, T / 2, T, T, T]
    assert _schedule({"name": "linear"}, 1) == [T]


def test_two_hinge_schedule():
    explicit = _schedule({"name": "two_hinge", "t1": 10, "t2": 20}, 30)
    assert explicit[:11] == [0] * 11  # 0 before T1, and at T1 where the ramp starts
    assert explicit[15] == T / 2
    assert explicit[20:] == [T] * 10
    study = _schedule({"name": "two_hinge"}, 50)  # the paper's T1=12, T2=37
    assert study[:13] == [0] * 13 and study[13] == T / 25 and study[37:] == [T] * 13
    assert _schedule({"name": "two_hinge"}, 4) == [0, 0, T / 2, T]  # scaled: T1=1, T2=3


RISE_THEN_FLAT = [0.5, 0.6, 0.7, 0.75, 0.76, 0.765, 0.77, 0.77, 0.771, 0.77, 0.77, 0.772]


def test_plateau_detection():
    # After epoch 9 the best of the last five (0.771) is within 0.02 of the best before (0.76).
    assert plateau_epoch(RISE_THEN_FLAT, patience=5, tolerance=0.02) == 9
    assert plateau_epoch(RISE_THEN_FLAT[:9], patience=5, tolerance=0.02) is None
    assert plateau_epoch(RISE_THEN_FLAT, patience=5, tolerance=0.005) == 11
    assert plateau_epoch([0.1 * i for i in range(10)], patience=5, tolerance=0.02) is None


def test_auto_schedule_waits_for_the_plateau_then_ramps_to_the_last_epoch():
    epochs = 20
    history = RISE_THEN_FLAT + [0.77] * 8  # one accuracy per finished epoch
    values = [eps_at_epoch({"name": "auto"}, T, e, epochs, history[:e]) for e in range(epochs)]
    assert values[:10] == [0] * 10  # the plateau is seen once epoch 9 is done
    assert values[10] == pytest.approx(T / 10) and values[14] == pytest.approx(T / 2)
    assert values[19] == T
    # Only the finished epochs count: the full history does not leak into earlier epochs.
    assert eps_at_epoch({"name": "auto"}, T, 5, epochs, history) == 0
    # Without a plateau the last epoch still trains at the target.
    rising = [0.05 * i for i in range(epochs)]
    assert [eps_at_epoch({"name": "auto"}, T, e, epochs, rising[:e]) for e in range(epochs)] == [0] * 19 + [T]


def test_unknown_schedule_lists_the_choices():
    with pytest.raises(RFTBenchError, match="unknown eps schedule 'two-hinge'; valid choices \\(closest first\\): two_hinge"):
        eps_at_epoch({"name": "two-hinge"}, T, 0, 10, [])
