"""The compute core's overheads, each measured beside its baseline in the same run.

adv_step_ratio     one Classic AT step (APGD K=10 + AdamW update, full fine-tuning) of a
                   ResNet-18 at 64 px, batch 32 ÷ (K × a bare forward + input-gradient pass in
                   attack mode + a clean training step). APGD evaluates the loss K+1 times (once
                   at x, then after each step), so the passes alone put the floor slightly above 1.
naive_ratio        the same step ÷ (K × a forward + full backward filling weight gradients + a
                   clean step): what keeping weight gradients out of the attack saves.
lp_adv_step_ratio  adv_step_ratio for linear probing (frozen backbone).
plan_ratio         plan() of the 1,440-cell paper study ÷ Hydra composing the same grid; Hydra
                   composes a sample of cells and the total is extrapolated linearly.
plan_100k_seconds  plan + status of a 100,000-cell study: the config tree has too few options to
                   build one through the real planner, so plan + status of the largest grid it
                   has is measured instead and reported beside its cell count.
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
from hydra import compose, initialize_config_dir
from torch import nn

from benchmark import study as study_module
from benchmark.attacks import eval_mode
from benchmark.cell import AXES
from benchmark.evaluate import evaluate
from benchmark.losses import make_loss
from benchmark.models import Classifier
from benchmark.paths import CONF_DIR
from benchmark.sweep import cell_states, summary

K = 10
BATCH, SIZE, CLASSES = 32, 64, 10
HYDRA_SAMPLE = 48
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
    """Seconds of the adversarial step and of its baseline passes, for one model."""
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

    def input_gradient_pass() -> None:  # what one attack step cannot avoid
        with eval_mode(model), torch.enable_grad():
            x_in = x.clone().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(model(x_in), y, reduction="none").sum(), x_in)

    def full_backward_pass() -> None:  # a naive attack step: weight gradients filled too
        with eval_mode(model):
            x_in = x.clone().requires_grad_(True)
            F.cross_entropy(model(x_in), y, reduction="none").sum().backward()
        model.zero_grad(set_to_none=True)

    works = {"adv": adversarial_step, "clean": clean_step, "input": input_gradient_pass}
    if not linear_probe:
        works["full"] = full_backward_pass
    return interleaved_medians(works, repeat=3)


def hydra_grid_seconds(grid: list[tuple[str, ...]]) -> float:
    """Hydra composing every cell of `grid` (one compose per cell, as a multirun does),
    extrapolated from an evenly spaced sample of HYDRA_SAMPLE cells."""
    sample = grid[::max(len(grid) // HYDRA_SAMPLE, 1)][:HYDRA_SAMPLE]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        start = time.perf_counter()
        for combo in sample:
            compose(config_name="config",
                    overrides=["study=paper", *(f"{axis}={name}" for axis, name in zip(AXES, combo))])
        elapsed = time.perf_counter() - start
    return elapsed * len(grid) / len(sample)


def plan_seconds(overrides: list[str]) -> tuple[float, study_module.Study]:
    """plan() from a cold option cache, as a fresh `rftbench plan` would run it."""
    study_module.load_option.cache_clear()
    start = time.perf_counter()
    planned = study_module.plan(overrides)
    return time.perf_counter() - start, planned


def plan_and_status_seconds(overrides: list[str]) -> tuple[float, int]:
    """plan + status (every cell's state read and summarised) of a study with no results yet."""
    start = time.perf_counter()
    planned = plan_seconds(overrides)[1]
    summary(planned, cell_states(planned))
    return time.perf_counter() - start, len(planned.cells)


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
    with tempfile.TemporaryDirectory() as results_root:
        os.environ["RFTBENCH_RESULTS"] = results_root  # status reads an empty results tree
        planned_s, paper = plan_seconds(["study=paper"])
        grid = [tuple(c.axes[axis] for axis in AXES) for c in paper.cells]
        hydra_s = hydra_grid_seconds(grid)
        print(f"plan_seconds={planned_s:.3f} cells={len(grid)}")
        print(f"hydra_compose_seconds={hydra_s:.1f} (extrapolated from {HYDRA_SAMPLE} composed cells)")
        print(f"plan_ratio={planned_s / hydra_s:.4f}", flush=True)
        everything = [f"{axis}=glob(*)" for axis in AXES]
        status_s, n_cells = plan_and_status_seconds(["study=paper", *everything])
        print(f"plan_status_all_options_seconds={status_s:.2f} cells={n_cells}")
        print(f"plan_100k_seconds=not measured (the config tree builds at most {n_cells} cells "
              "through the real planner)", flush=True)

    aa = aa_timings()
    print(f"aa_ours_seconds={aa['ours']:.2f} aa_direct_seconds={aa['direct']:.2f}")
    print(f"aa_overhead_ratio={aa['ours'] / aa['direct']:.3f}", flush=True)

    lp = step_timings(linear_probe=True)
    print(f"lp_step_seconds adv={lp['adv']:.3f} input_pass={lp['input']:.3f} clean={lp['clean']:.3f}")
    print(f"lp_adv_step_ratio={lp['adv'] / (K * lp['input'] + lp['clean']):.3f}", flush=True)

    fft = step_timings(linear_probe=False)
    print(f"fft_step_seconds adv={fft['adv']:.3f} input_pass={fft['input']:.3f} "
          f"full_pass={fft['full']:.3f} clean={fft['clean']:.3f} (APGD runs {K + 1} passes for K={K})")
    print(f"naive_ratio={fft['adv'] / (K * fft['full'] + fft['clean']):.3f}")
    print(f"adv_step_ratio={fft['adv'] / (K * fft['input'] + fft['clean']):.3f}")
