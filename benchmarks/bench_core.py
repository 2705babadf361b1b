"""The compute core's overheads, each measured beside its baseline in the same run.

adv_step_ratio     one Classic AT step (APGD K=10 + AdamW update, full fine-tuning) of a
                   ResNet-18 at 64 px, batch 32 ÷ (K × a bare forward + input-gradient pass in
                   attack mode + a clean training step). APGD evaluates the loss K+1 times (once
                   at x, then after each step); the last iterate needs no gradient, so that pass
                   runs forward only. The passes alone put the floor at 1 + one forward pass ÷
                   the denominator, printed beside the ratio.
naive_ratio        the same step ÷ (K × a forward + full backward filling weight gradients + a
                   clean step): what keeping weight gradients out of the attack saves.
lp_adv_step_ratio  adv_step_ratio for linear probing (frozen backbone). Its clean step is about a
                   forward pass only, so the extra forward weighs more: a floor near 1.05.
aa_overhead_ratio  our evaluate() AutoAttack condition ÷ pyautoattack called directly, same
                   model, images, attacks and seed.
Timings are medians of interleaved repeats (the cores may be shared).
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyautoattack
import timm
import torch
import torch.nn.functional as F
from torch import nn

from benchmark import study as study_module
from benchmark.attacks import eval_mode
from benchmark.evaluate import evaluate
from benchmark.losses import make_loss
from benchmark.models import Classifier

K = 10
BATCH, SIZE, CLASSES = 32, 64, 10
AA_IMAGES = 64


def interleaved_medians(works: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median wall time of each work, the works run round-robin so that load changes on the
    shared machine hit them alike (one untimed warm-up round first)."""
    times: dict[str, list[float]] = {name: [] for name in works}
    for round_ in range(repeat + 1):
        for name, work in works.items():
            start = time.perf_counter()
            work()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def resnet18(linear_probe: bool) -> Classifier:
    torch.manual_seed(0)
    backbone = timm.create_model("resnet18", pretrained=False, num_classes=CLASSES)
    config = backbone.pretrained_cfg
    model = Classifier(backbone, list(config["mean"]), list(config["std"]))
    if linear_probe:
        model.freeze_backbone()
    return model


def step_timings(linear_probe: bool) -> dict[str, float]:
    """Seconds of the adversarial step and of its baseline passes, for one model, on one thread
    (on shared cores more threads make every figure noise). The input-gradient and full passes
    are timed K in a row, as the attack runs them, and reported per pass: each timed work then
    lasts about as long as the step it is compared with, and load changes hit both alike."""
    model = resnet18(linear_probe)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_cfg = study_module.load_option("loss", "classic_at")
    robust_loss, eps = make_loss(loss_cfg), loss_cfg["attack"]["eps"]
    x, y = torch.rand(BATCH, 3, SIZE, SIZE), torch.randint(0, CLASSES, (BATCH,))

    def update(loss: torch.Tensor) -> None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def adversarial_step() -> None:
        model.train()
        update(robust_loss(model, x, y, eps)[0])

    def clean_step() -> None:
        model.train()
        update(F.cross_entropy(model(x), y))

    def input_gradient_passes() -> None:  # what the K attack steps cannot avoid
        for _ in range(K):
            with eval_mode(model), torch.enable_grad():
                x_in = x.clone().requires_grad_(True)
                torch.autograd.grad(F.cross_entropy(model(x_in), y, reduction="none").sum(), x_in)

    def forward_pass() -> None:  # APGD's last pass: its loss is needed, its gradient is not
        with eval_mode(model), torch.enable_grad():
            F.cross_entropy(model(x.clone().requires_grad_(True)), y, reduction="none")

    def full_backward_passes() -> None:  # K naive attack steps: weight gradients filled too
        for _ in range(K):
            with eval_mode(model):
                x_in = x.clone().requires_grad_(True)
                F.cross_entropy(model(x_in), y, reduction="none").sum().backward()
            model.zero_grad(set_to_none=True)

    works = {"adv": adversarial_step, "clean": clean_step, "input": input_gradient_passes, "forward": forward_pass}
    if not linear_probe:
        works["full"] = full_backward_passes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds = interleaved_medians(works, repeat=5)
    finally:
        torch.set_num_threads(threads)
    return {name: value / K if name in ("input", "full") else value for name, value in seconds.items()}


def step_ratios(seconds: dict[str, float]) -> tuple[float, float]:
    """adv_step_ratio and its floor: the passes APGD cannot avoid (K input-gradient passes and
    one forward) plus the clean step, over the same denominator."""
    denominator = K * seconds["input"] + seconds["clean"]
    return seconds["adv"] / denominator, 1 + seconds["forward"] / denominator


def aa_timings() -> dict[str, float]:
    """Our AutoAttack condition and pyautoattack direct, on a random-init timm test_resnet at
    32 px whose own predictions are the labels, so every image is attacked."""
    torch.manual_seed(0)
    model = Classifier(timm.create_model("test_resnet", pretrained=False, num_classes=CLASSES),
                       [0.5] * 3, [0.5] * 3).eval()
    x = torch.rand(AA_IMAGES, 3, 32, 32)
    with torch.no_grad():
        y = model(x).argmax(1)
    cfg = {"kind": "autoattack", "norm": "Linf", "eps": study_module.load_option("eval", "linf")["linf"]["eps"],
           "version": "custom", "attacks": ["apgd-ce"], "n_restarts": 1, "seed": 0}  # as the demo study

    def direct() -> None:
        adversary = pyautoattack.AutoAttack(model, norm=cfg["norm"], eps=cfg["eps"], version="custom",
                                            attacks=cfg["attacks"], device=torch.device("cpu"), seed=cfg["seed"])
        adversary.apgd.n_restarts = cfg["n_restarts"]
        adversary.run_standard_evaluation(x, y, batch_size=AA_IMAGES)

    with tempfile.TemporaryDirectory() as tmp:
        def ours() -> None:  # a fresh work dir each time: no state to resume from
            evaluate(model, x, y, {"linf": cfg}, Path(tempfile.mkdtemp(dir=tmp)), batch_size=AA_IMAGES)

        return interleaved_medians({"ours": ours, "direct": direct}, repeat=3)


def main() -> None:
    print(f"threads={torch.get_num_threads()} load_average={os.getloadavg()[0]:.2f}", flush=True)

    aa = aa_timings()
    print(f"aa_ours_seconds={aa['ours']:.2f} aa_direct_seconds={aa['direct']:.2f}")
    print(f"aa_overhead_ratio={aa['ours'] / aa['direct']:.3f}", flush=True)

    lp = step_timings(linear_probe=True)
    lp_ratio, lp_floor = step_ratios(lp)
    print(f"lp_step_seconds adv={lp['adv']:.3f} input_pass={lp['input']:.3f} forward_pass={lp['forward']:.3f} "
          f"clean={lp['clean']:.3f} (1 thread) floor={lp_floor:.3f} load_average={os.getloadavg()[0]:.2f}")
    print(f"lp_adv_step_ratio={lp_ratio:.3f}", flush=True)

    fft = step_timings(linear_probe=False)
    ratio, floor = step_ratios(fft)
    print(f"fft_step_seconds adv={fft['adv']:.3f} input_pass={fft['input']:.3f} forward_pass={fft['forward']:.3f} "
          f"full_pass={fft['full']:.3f} clean={fft['clean']:.3f} (1 thread; APGD: {K} input-gradient passes "
          f"+ 1 forward for K={K}) floor={floor:.3f} load_average={os.getloadavg()[0]:.2f}")
    print(f"naive_ratio={fft['adv'] / (K * fft['full'] + fft['clean']):.3f}")
    print(f"adv_step_ratio={ratio:.3f}")
