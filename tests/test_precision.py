"""Precision as a protocol setting: the mixed-precision training and attack path runs on the CPU
with bfloat16 autocast (so CI exercises the code the GPU runs), and a trainer says which precision
ran (the rows record it)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from benchmark import train
from benchmark.data import Splits
from benchmark.errors import RFTBenchError
from benchmark.losses import make_loss
from benchmark.models import Classifier
from benchmark.study import load_option
from factories import tiny_classifier

CLASSES, SIZE = 10, 32
CPU = torch.device("cpu")


def demo_model() -> Classifier:
    torch.manual_seed(0)
    return tiny_classifier("test_vit", CLASSES)


def images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, SIZE, SIZE, generator=generator), torch.randint(0, CLASSES, (n,), generator=generator)


def test_auto_is_fp16_on_cuda_and_fp32_elsewhere_and_a_bad_name_lists_the_choices():
    assert train.resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert train.resolve_precision("auto", CPU) == "fp32"
    assert train.resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(RFTBenchError, match="protocol.precision 'bf61'.*bf16"):
        train.resolve_precision("bf61", CPU)


@pytest.mark.parametrize("loss", ["classic_at", "trades"])
def test_bf16_adversarial_steps_run_the_attack_under_autocast_and_train(loss):
    model = demo_model()
    loss_cfg = load_option("loss", loss)
    robust_loss, eps = make_loss(loss_cfg), loss_cfg["attack"]["eps"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    attack_dtypes: set[torch.dtype] = set()

    def record(module: nn.Module, _: object, output: torch.Tensor) -> None:
        if not module.training:  # the attack runs the model in eval mode
            attack_dtypes.add(output.dtype)

    model.head().register_forward_hook(record)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = images(16)
    for _ in range(3):
        model.train()
        with train.autocast("bf16", CPU):
            value, logits_adv = robust_loss(model, x, y, eps)
        value.backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # the model computes in bfloat16, the loss in float32
        assert logits_adv.dtype == torch.bfloat16 and value.dtype == torch.float32 and math.isfinite(value.item())
    assert attack_dtypes == {torch.bfloat16}
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_a_trainer_trains_in_the_protocols_precision_and_says_which_ran(precision, tmp_path):
    x, y = images(48)
    splits = Splits(TensorDataset(x[:32], y[:32]), TensorDataset(x[32:], y[32:]), None, CLASSES, [])
    protocol = {**load_option("protocol", "fft5"), "epochs": 1, "batch_size": 16, "effective_batch_size": 32,
                "precision": precision}
    trainer = train.Trainer(demo_model(), splits, load_option("loss", "classic_at"), protocol,
                            ckpt_path=tmp_path / "last.pt", device=CPU, seed=0)
    assert trainer.scaler.is_enabled() == (precision == "fp16")  # the scaler only where fp16's range needs it
    result = trainer.fit()
    assert trainer.precision == precision and len(result.val_accuracy) == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
