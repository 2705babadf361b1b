"""Our AutoAttack (pyautoattack, standard version) against an independent implementation,
torchattacks' AutoAttack: on the same small model and images the robust accuracies agree
within one example, in L-inf and L2. (torchattacks is a test-only dependency.)"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from benchmark.evaluate import evaluate
from factories import tiny_classifier

torchattacks = pytest.importorskip("torchattacks", reason="torchattacks (a test-only dependency) is not installed")

N_TEST, SIZE = 64, 8  # the digits' own 8 px keep the standard version's 4 attacks fast
# Budgets at which APGD-CE leaves ~20% of the briefly trained model's examples robust: the
# comparison counts real successes, and the later attacks run on few examples (fast).
BUDGETS = [("Linf", 16 / 255), ("L2", 0.5)]
STANDARD_ITERATIONS = 100


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16
    x = F.interpolate(x, size=SIZE, mode="bilinear").expand(-1, 3, -1, -1).contiguous()
    return x, torch.tensor(data.target)


@pytest.fixture(scope="module")
def model(digits) -> nn.Module:
    """timm's test_resnet trained briefly on all but the first N_TEST digits."""
    x, y = digits[0][N_TEST:], digits[1][N_TEST:]
    torch.manual_seed(0)
    net = tiny_classifier("test_resnet", 10)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(150):
        idx = torch.randint(0, len(x), (64,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        optimizer.step()
    return net.eval()


@pytest.mark.slow
@pytest.mark.parametrize(("norm", "eps"), BUDGETS)
def test_standard_autoattack_agrees_with_torchattacks(model, digits, norm, eps, tmp_path):
    x, y = digits[0][:N_TEST], digits[1][:N_TEST]
    cfg = {"kind": "autoattack", "norm": norm, "eps": eps, "version": "standard", "seed": 0}
    (ours,) = evaluate(model, x, y, {norm: cfg}, tmp_path, batch_size=N_TEST)

    attack = torchattacks.AutoAttack(model, norm=norm, eps=eps, version="standard", n_classes=10, seed=0)
    for gradient_attack in attack._autoattack.attacks[:3]:  # APGD-CE, APGD-T, FAB-T
        # torchattacks defaults these to 10 iterations; standard AutoAttack runs 100
        # (Croce & Hein 2020), and so does pyautoattack: compare the same attack.
        gradient_attack.steps = STANDARD_ITERATIONS
    x_adv = attack(x, y)
    with torch.no_grad():
        clean = int((model(x).argmax(1) == y).sum())
        theirs = int((model(x_adv).argmax(1) == y).sum())
    assert 0 < theirs < clean, "the budget should leave some examples robust and break others"
    assert abs(ours.n_correct - theirs) <= 1, (norm, ours.n_correct, theirs)
