"""Robust losses (values against a direct computation from the same adversarial examples; the
attack in eval mode, the loss in training mode; MART against a batch computed by hand), the loss
kinds' registry and config checks, and the eps schedules."""
from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from benchmark import tables
from benchmark.attacks import apgd, eval_mode
from benchmark.cli import main
from benchmark.errors import RFTBenchError
from benchmark.loss_kinds import LOSSES, check_loss_option, eps_at_epoch, plateau_epoch
from benchmark.losses import NonFiniteLossError, make_loss, mart_objective
from benchmark.paths import CONF_DIR
from benchmark.study import load_option, options, plan
from conftest import COMPUTE_PACKAGES, modules_loaded

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


def test_mart_matches_the_formula_on_the_same_examples(model, batch):
    x, y = batch
    reference = copy.deepcopy(model)
    before = _batches_tracked(model)
    loss, logits_adv = make_loss(_loss_cfg("mart"))(model, x, y, EPS)

    x_adv = _adversarial(reference, x, y)  # the same APGD-CE examples as the other losses
    logits, expected_adv = reference(x), reference(x_adv)
    torch.testing.assert_close(loss, mart_objective(logits, expected_adv, y, 5.0))
    torch.testing.assert_close(logits_adv, expected_adv.detach())
    assert _batches_tracked(model) == before + 2
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def _softmax(logits: list[float]) -> list[float]:
    exps = [math.exp(v) for v in logits]
    return [e / sum(exps) for e in exps]


def test_mart_value_on_a_batch_computed_by_hand():
    clean = [[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]]
    adversarial = [[1.0, 2.0, 0.0], [0.5, 0.0, 1.0]]
    labels, lam = [0, 1], 5.0
    boosted_ce, weighted_kl = [], []
    for z, z_adv, label in zip(clean, adversarial, labels):
        p, p_adv = _softmax(z), _softmax(z_adv)
        best_wrong = max(q for k, q in enumerate(p_adv) if k != label)
        boosted_ce.append(-math.log(p_adv[label]) - math.log(1 - best_wrong))
        kl = sum(pk * math.log(pk / qk) for pk, qk in zip(p, p_adv))
        weighted_kl.append(kl * (1 - p[label]))
    expected = sum(boosted_ce) / 2 + lam * sum(weighted_kl) / 2

    value = mart_objective(torch.tensor(clean), torch.tensor(adversarial), torch.tensor(labels), lam)
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_mart_stays_finite_when_a_wrong_class_takes_all_the_probability():
    logits_adv = torch.tensor([[0.0, 200.0, 0.0]])  # p_adv of class 1 rounds to exactly 1
    value = mart_objective(torch.zeros(1, 3), logits_adv, torch.tensor([0]), 5.0)
    assert torch.isfinite(value) and value > 200


@pytest.mark.parametrize("name", ["classic_at", "trades", "mart"])
def test_eps_zero_skips_the_attack(model, batch, name):
    x, y = batch
    reference = copy.deepcopy(model)
    before = _batches_tracked(model)
    loss, logits_adv = make_loss(_loss_cfg(name))(model, x, y, 0.0)
    clean_logits = reference(x)
    # TRADES' and MART's KL terms are 0: what is left is their loss on the clean examples.
    clean_loss = mart_objective(clean_logits, clean_logits, y, 0.0) if name == "mart" else F.cross_entropy(clean_logits, y)
    torch.testing.assert_close(loss, clean_loss)
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


@pytest.mark.parametrize("patch, message", [
    ({"kind": "trade"}, r"unknown loss kind .* 'trade'; valid choices \(closest first\): trades"),
    ({"trades_beta": None}, r"loss option 'trades': loss.trades_beta=None: input should be a valid number"),
    ({"trades_beta": 0}, r"loss.trades_beta=0: input should be greater than 0"),
    ({"mart_lambda": 5.0}, r"loss.mart_lambda is not a known key"),  # another kind's key
    ({"eps_schedule": {"name": "two_hinge", "t1": 30, "t2": 20}}, r"t1 \(30\) must not exceed t2 \(20\)"),
    ({"eps_schedule": {"name": "linear", "warmup": 3}}, r"loss.eps_schedule.warmup is not a known key"),
])
def test_bad_loss_options_are_refused_without_torch_and_by_make_loss(patch, message):
    cfg = _loss_cfg("trades", **patch)
    with pytest.raises(RFTBenchError, match=message):
        check_loss_option(cfg)
    if "eps_schedule" not in patch:  # the schedule is read per epoch, by the trainer
        with pytest.raises(RFTBenchError, match=message):
            make_loss(cfg)


def test_a_missing_kind_key_is_refused():
    cfg = {key: value for key, value in _loss_cfg("trades").items() if key != "trades_beta"}
    with pytest.raises(RFTBenchError, match="loss.trades_beta is missing"):
        check_loss_option(cfg)
    with pytest.raises(RFTBenchError, match="loss.mart_lambda=-1: input should be greater than or equal to 0"):
        check_loss_option(_loss_cfg("mart", mart_lambda=-1))


def test_loss_options_are_checked_without_torch():
    script = ("from benchmark.loss_kinds import check_loss_option, eps_at_epoch\n"
              "from benchmark.study import load_option, options\n"
              "for option in options('loss'):\n"
              "    check_loss_option(load_option('loss', option))\n"
              "assert eps_at_epoch({'name': 'two_hinge'}, 1.0, 2, 4, []) == 0.5\n")
    assert not modules_loaded(script) & COMPUTE_PACKAGES


@pytest.mark.parametrize("option", options("loss"))
def test_every_loss_option_is_a_registered_kind_and_composes_as_hydra_does(option):
    cfg = load_option("loss", option)
    assert cfg["kind"] in LOSSES and cfg["name"] == option
    check_loss_option(cfg)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        composed = compose(config_name="config", overrides=[f"loss={option}"])
    assert OmegaConf.to_container(composed.loss) == cfg  # the base merged in, as Hydra merges it


def test_the_loss_base_is_no_option_and_every_option_states_its_identity():
    assert all(not name.startswith("_") for name in options("loss"))
    for option in options("loss"):
        text = (CONF_DIR / "loss" / f"{option}.yaml").read_text()
        own = OmegaConf.create(text)
        assert {"name", "kind", "study_name"} <= set(own), option
        assert set(own) - {"defaults", "name", "kind", "study_name", "eps_schedule"} <= set(LOSSES[own.kind].schema.model_fields)


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


# --- the three-loss study ---------------------------------------------------------------------

def test_the_three_loss_study_is_the_demo_grid_with_mart():
    demo, losses3 = plan(["study=demo"]), plan(["study=losses3"])
    assert len(losses3.cells) == len(demo.cells) // 2 * 3
    assert {c.id for c in demo.cells} < {c.id for c in losses3.cells}  # the shared cells are the same cells
    assert {c.config["loss"]["kind"] for c in losses3.cells if c.loss == "mart"} == {"mart"}


@pytest.mark.slow  # makes the demo weights, trains three tiny cells (one per loss) and measures them
def test_three_losses_run_end_to_end_and_collect_side_by_side(roots):
    # One backbone, one protocol (one epoch), a 2-step training attack, and 22 test images: 2 per
    # corruption of the `common` condition.
    overrides = ["study=losses3", "model=test_resnet.demo", "protocol=fft5", "loss.attack.steps=2",
                 "dataset.test_size=22"]
    assert main(["launch", *overrides, "--wait"]) == 0
    study = plan(overrides)
    rows = tables.load(study.name)
    assert sorted(rows["cell_id"].unique()) == sorted(c.id for c in study.cells)
    conditions = rows.groupby("loss")["condition"].apply(sorted).to_dict()
    assert conditions == {loss: sorted(["clean", "linf", "l2", "l1", "common"]) for loss in ("classic_at", "trades", "mart")}
    assert (rows["n_examples"] == 22).all() and rows["accuracy"].between(0, 1).all()
