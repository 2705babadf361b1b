"""Training attacks: results stay in the eps-ball and [0, 1], raise the loss, fill no parameter
gradient, work with frozen parameters, and APGD matches pyautoattack's own APGD started at x bit
for bit (a CNN and a ViT) while skipping the backward pass of its last iterate."""
from __future__ import annotations

import re

import pytest
import timm
import torch
import torch.nn.functional as F
from pyautoattack.autopgd_base import APGDAttack

from benchmark.attacks import apgd, eval_mode, make_attack, objective_fn, pgd
from benchmark.errors import RFTBenchError
from benchmark.study import load_option

EPS = {"Linf": 8 / 255, "L2": 0.5}
NORM_OF = {"Linf": lambda d: d.flatten(1).abs().amax(1), "L2": lambda d: d.flatten(1).norm(dim=1)}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=10).eval()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(8, 3, 32, 32, generator=generator), torch.randint(0, 10, (8,), generator=generator)


def _attacks(norm: str) -> dict[str, object]:
    eps = EPS[norm]
    return {
        "apgd": lambda m, x, y: apgd(m, x, y, eps=eps, norm=norm, steps=10),
        "pgd": lambda m, x, y: pgd(m, x, y, eps=eps, norm=norm, steps=10, step_size=eps / 4, random_start=False),
        "pgd-random-start": lambda m, x, y: pgd(m, x, y, eps=eps, norm=norm, steps=5, step_size=eps / 4,
                                                random_start=True),
    }


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("name", ["apgd", "pgd", "pgd-random-start"])
def test_result_in_ball_and_range_and_loss_rises(model, batch, norm, name):
    x, y = batch
    x_adv = _attacks(norm)[name](model, x, y)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (NORM_OF[norm](x_adv - x) <= EPS[norm] + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        clean_loss, adv_loss = (F.cross_entropy(model(v), y, reduction="none") for v in (x, x_adv))
    if name == "apgd":  # it keeps each example's best point, starting from x itself
        assert (adv_loss >= clean_loss).all()
    assert adv_loss.mean() > clean_loss.mean()


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("arch", [{"model_name": "test_resnet"}, {"model_name": "test_vit", "img_size": 32}],
                         ids=["test_resnet", "test_vit"])
def test_apgd_matches_pyautoattack_started_at_x(batch, arch, norm):
    """pyautoattack also computes the last iterate's gradient, which ours skips: same result."""
    x, y = batch
    torch.manual_seed(0)
    model = timm.create_model(**arch, num_classes=10).eval()
    reference = APGDAttack(model, n_iter=10, norm=norm, eps=EPS[norm], loss="ce", rho=0.75, device=x.device)
    reference.init_hyperparam(x)
    expected_best, _, expected_loss, _ = reference.attack_single_run(x, y, x_init=x)
    x_adv = apgd(model, x, y, eps=EPS[norm], norm=norm, steps=10)
    assert torch.equal(x_adv, expected_best)  # same arithmetic: bit for bit
    with torch.no_grad():
        torch.testing.assert_close(F.cross_entropy(model(x_adv), y, reduction="none"), expected_loss)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_apgd_runs_steps_plus_one_forward_passes_and_steps_backward_passes(model, batch, norm):
    """The last iterate's loss only decides the best point: its gradient is never computed."""
    passes = {"forward": 0, "backward": 0}

    def count_backward(grad: torch.Tensor) -> None:
        passes["backward"] += 1

    def count_forward(module: torch.nn.Module, inputs: tuple, logits: torch.Tensor) -> None:
        passes["forward"] += 1
        logits.register_hook(count_backward)

    handle = model.register_forward_hook(count_forward)
    try:
        apgd(model, *batch, eps=EPS[norm], norm=norm, steps=10)
    finally:
        handle.remove()
    assert passes == {"forward": 11, "backward": 10}


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_kl_objective_moves_every_example_away_from_the_clean_prediction(model, batch, norm):
    """The KL is 0 at x with a zero gradient there: the attack must still move every example."""
    x, y = batch
    with torch.no_grad():
        clean_logits = model(x)
    kl = objective_fn("kl", clean_logits)
    x_adv = apgd(model, x, y, eps=EPS[norm], norm=norm, steps=10, objective="kl", clean_logits=clean_logits)
    assert (NORM_OF[norm](x_adv - x) <= EPS[norm] + 1e-6).all()
    assert (NORM_OF[norm](x_adv - x) > EPS[norm] / 2).all()  # far beyond TRADES' 0.001 * N(0, 1) start
    with torch.no_grad():
        assert kl(model(x), y).abs().max() < 1e-6
        assert (kl(model(x_adv), y) > 0).all()


def test_attacks_fill_no_parameter_gradient_and_work_frozen(batch):
    x, y = batch
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10).eval()
    for p in model.parameters():
        p.grad = None
    unfrozen = {norm: apgd(model, x, y, eps=EPS[norm], norm=norm, steps=10) for norm in EPS}
    pgd(model, x, y, eps=EPS["Linf"], norm="Linf", steps=3, step_size=0.01, random_start=True)
    assert all(p.grad is None for p in model.parameters())

    frozen = [p for i, p in enumerate(model.parameters()) if i % 2 == 0]  # some frozen, as a protocol may
    for p in frozen:
        p.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    for norm, expected in unfrozen.items():
        torch.testing.assert_close(apgd(model, x, y, eps=EPS[norm], norm=norm, steps=10), expected, rtol=0, atol=0)
    assert [p.requires_grad for p in model.parameters()] == flags
    for p in model.parameters():
        p.requires_grad_(False)
    x_adv = apgd(model, x, y, eps=EPS["Linf"], norm="Linf", steps=10)
    torch.testing.assert_close(x_adv, unfrozen["Linf"], rtol=0, atol=0)
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_apgd_is_deterministic_and_draws_no_random_numbers(model, batch):
    x, y = batch
    rng = torch.get_rng_state()
    first = apgd(model, x, y, eps=EPS["L2"], norm="L2", steps=10)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(apgd(model, x, y, eps=EPS["L2"], norm="L2", steps=10), first)


def test_eval_mode_restores_every_flag_even_after_an_error():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2), torch.nn.Dropout())
    model.train()
    model[1].eval()  # a frozen BatchNorm stays in eval mode while the rest trains
    before = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not any(m.training for m in model.modules())
        raise RuntimeError("interrupted")
    assert [m.training for m in model.modules()] == before == [True, True, False, True]


def test_make_attack_from_the_loss_config(model, batch):
    x, y = batch
    cfg = load_option("loss", "classic_at")["attack"]
    attack = make_attack(cfg)
    expected = apgd(model, x, y, eps=0.01, norm=cfg["norm"], steps=cfg["steps"])
    assert torch.equal(attack(model, x, y, 0.01, None), expected)  # eps comes from the call

    with_pgd = make_attack({**cfg, "name": "pgd", "step_size": 0.0025})
    expected = pgd(model, x, y, eps=0.01, norm="Linf", steps=10, step_size=0.0025, random_start=False)
    assert torch.equal(with_pgd(model, x, y, 0.01, None), expected)


@pytest.mark.parametrize(("patch", "message"), [
    ({"name": "apgdd"}, "unknown attack 'apgdd'; valid choices (closest first): apgd, pgd"),
    ({"norm": "linf"}, "unknown attack norm 'linf'"),
    ({"objective": "dlr"}, "unknown attack objective 'dlr'"),
    ({"name": "pgd"}, "attack pgd needs attack.step_size"),
    ({"step_size": 0.001}, "apgd adapts its own step size"),
    ({"random_start": True}, "apgd adapts its own step size and starts at x"),
])
def test_make_attack_refuses_bad_options(patch, message):
    with pytest.raises(RFTBenchError, match=re.escape(message)):
        make_attack({**load_option("loss", "classic_at")["attack"], **patch})
