"""The GPU check (`scripts/gpu-check.sh` runs `python -m benchmark.gpu_check`): a real backbone at
224 px through adversarial training steps with the project's own loss, attack, data pipeline and
gradient averaging, and a small AutoAttack evaluation, on one GPU and then on every GPU. It
prints `name=value` lines:

images_per_s_per_gpu[P]  adversarial training images/s on one GPU at precision P (fp32, fp16, bf16)
images_per_s_per_gpu     the same at protocol.precision=auto (fp16 on CUDA)
gpu_memory_peak_gib      peak allocated GPU memory of those steps
data_wait_share          share of step time spent waiting for the DataLoader (workers: runtime auto)
adv_step_ratio           one adversarial step / (K input-gradient passes + a clean step), as
                         benchmarks/bench_core.py defines it, measured on the GPU
autoattack_seconds       AutoAttack standard (Linf) on AA_IMAGES images
scaling_efficiency       N-GPU images/s / (N x one-GPU images/s); ddp=skipped(reason) with one GPU
sustained_tflops         the FLOPs the cost prior counts for these steps / their seconds: the value
                         to set as runtime.gpu_tflops

The backbone's weights come from the weights cache when it has them, else are random (timings do
not depend on them). Without a CUDA GPU it exits with status 3 and a one-line message.
"""
from __future__ import annotations

import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from benchmark import data, distributed, evaluate, models, paths, train
from benchmark.attacks import eval_mode
from benchmark.cost import train_passes
from benchmark.errors import RFTBenchError
from benchmark.flops import forward_gflops
from benchmark.losses import make_loss
from benchmark.run import loader_workers
from benchmark.study import load_option

MODEL, DATASET, LOSS, PROTOCOL = "convnext_tiny.fb_in1k", "caltech101", "classic_at", "fft5"
CLASSES, BATCH, IMAGES, WARMUP, STEPS, AA_IMAGES = 100, 32, 256, 3, 8, 32
NO_CUDA = 3


def build_model(device: torch.device) -> tuple[models.Classifier, str]:
    """The check's backbone on `device`, and where its weights came from (cache | random)."""
    cfg = load_option("model", MODEL)
    try:
        model, weights = models.create_model(cfg, CLASSES, paths.root("weights")), "cache"
    except RFTBenchError:
        backbone = timm.create_model(cfg["arch"], pretrained=False, num_classes=CLASSES)
        model, weights = models.Classifier(backbone, *models.input_statistics(cfg), head=cfg["head"]), "random"
    return model.to(device), weights


def image_folder(directory: Path) -> data.ImageDataset:
    """IMAGES JPEG files of noise at 300 px, decoded, resized to 224 px and augmented per image as
    a study dataset's training split is."""
    rng = np.random.default_rng(0)
    files = []
    for i in range(IMAGES):
        files.append(directory / f"{i}.jpg")
        Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(files[-1])
    dataset = load_option("dataset", DATASET)
    return data.ImageDataset(files, [i % CLASSES for i in range(IMAGES)], dataset["image_size"],
                             data._augmentation(dataset["augment"]), content_key="gpu-check")


def train_steps(model: models.Classifier, dataset: data.ImageDataset, precision: str, device: torch.device,
                group: distributed.Group = distributed.SINGLE) -> dict[str, float]:
    """Adversarial training steps as the trainer runs them; images/s, data wait share and peak
    memory over the steps after the warm-up."""
    loss_cfg = load_option("loss", LOSS)
    robust_loss = make_loss(loss_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    workers = loader_workers("auto", device)
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True, pin_memory=True,
                        num_workers=workers, persistent_workers=workers > 0)
    torch.cuda.reset_peak_memory_stats(device)
    waited = elapsed = 0.0
    images = step = 0
    while step < WARMUP + STEPS:
        batches = iter(loader)
        while step < WARMUP + STEPS:
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            try:
                x, y = next(batches)
            except StopIteration:
                break
            fetched = time.perf_counter()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            model.train()
            with train.autocast(precision, device):
                loss, _ = robust_loss(model, x, y, loss_cfg["attack"]["eps"])
            scaler.scale(loss).backward()
            group.average_gradients(model.parameters())
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize(device)
            if step >= WARMUP:
                waited, elapsed, images = waited + fetched - start, elapsed + time.perf_counter() - start, images + len(y)
            step += 1
    return {"images_per_s": images / elapsed, "data_wait_share": waited / elapsed,
            "memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def adv_step_ratio(model: models.Classifier, precision: str, device: torch.device) -> float:
    """One adversarial step (attack + update) / (K input-gradient passes + one clean step), medians."""
    loss_cfg = load_option("loss", LOSS)
    robust_loss, eps, steps = make_loss(loss_cfg), loss_cfg["attack"]["eps"], loss_cfg["attack"]["steps"]
    x, y = torch.rand(BATCH, 3, 224, 224, device=device), torch.randint(0, CLASSES, (BATCH,), device=device)

    def adversarial() -> None:
        with train.autocast(precision, device):
            loss, _ = robust_loss(model, x, y, eps)
        loss.backward()

    def clean() -> None:
        with train.autocast(precision, device):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()

    def input_gradients() -> None:
        with eval_mode(model), train.autocast(precision, device):
            for _ in range(steps):
                x_in = x.clone().requires_grad_(True)
                torch.autograd.grad(F.cross_entropy(model(x_in).float(), y), x_in)

    seconds = {name: _median_seconds(work, device) for name, work in
               {"adv": adversarial, "clean": clean, "input": input_gradients}.items()}
    model.zero_grad(set_to_none=True)
    return seconds["adv"] / (seconds["input"] + seconds["clean"])


def _median_seconds(work: Any, device: torch.device, repeat: int = 5) -> float:
    times = []
    for round_ in range(repeat + 1):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        work()
        torch.cuda.synchronize(device)
        if round_:  # the first round warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def autoattack_seconds(model: models.Classifier, device: torch.device) -> float:
    """AutoAttack standard (Linf) through the project's evaluation on AA_IMAGES images labelled
    with the model's own predictions (so every image is attacked)."""
    x = torch.rand(AA_IMAGES, 3, 224, 224)
    with torch.no_grad(), eval_mode(model):
        y = model(x.to(device)).argmax(1).cpu()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work_dir:
        evaluate.evaluate(model, x, y, load_option("eval", "linf"), Path(work_dir), batch_size=AA_IMAGES)
    return time.perf_counter() - start


def _rank(rank: int, world_size: int, port: int, folder: str, results: Any) -> None:
    """One rank of the multi-GPU run: the same steps, gradients averaged over the ranks."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    group = distributed.Group(rank, world_size, rank)
    device = distributed.rank_device(torch.device("cuda"), group)
    distributed.connect(group, device, timeout_s=300)
    try:
        model, _ = build_model(device)
        dataset = data.ImageDataset(sorted(Path(folder).glob("*.jpg")), [i % CLASSES for i in range(IMAGES)], 224,
                                    data._augmentation(load_option("dataset", DATASET)["augment"]),
                                    content_key="gpu-check")
        rate = train_steps(model, dataset, train.resolve_precision("auto", device), device, group)["images_per_s"]
        results.put((rank, rate))
    finally:
        group.close()


def multi_gpu_rate(world_size: int, folder: Path) -> float:
    """Adversarial training images/s per GPU with `world_size` ranks (their mean)."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank, args=(world_size, port, str(folder), results), nprocs=world_size, join=True)
    rates = [results.get()[1] for _ in range(world_size)]
    return statistics.mean(rates)


def report(name: str, value: Any) -> None:
    print(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}", flush=True)


def main() -> int:
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        print(f"gpu-check: no CUDA GPU visible to torch {torch.__version__}: nothing to check", file=sys.stderr)
        return NO_CUDA
    device = torch.device("cuda", 0)
    gpus = torch.cuda.device_count()
    report("gpu", torch.cuda.get_device_name(device))
    report("gpus", gpus)
    report("torch", torch.__version__)
    model, weights = build_model(device)
    report("backbone", f"{MODEL}@224px,weights={weights}")
    auto = train.resolve_precision("auto", device)
    precisions = ["fp32", "fp16", *(["bf16"] if torch.cuda.is_bf16_supported() else [])]
    with tempfile.TemporaryDirectory() as folder:
        dataset = image_folder(Path(folder))
        measured = {}
        for precision in precisions:
            measured[precision] = train_steps(model, dataset, precision, device)
            report(f"images_per_s_per_gpu[{precision}]", measured[precision]["images_per_s"])
        report("images_per_s_per_gpu", measured[auto]["images_per_s"])
        report("gpu_memory_peak_gib", max(m["memory_gib"] for m in measured.values()))
        report("data_wait_share", measured[auto]["data_wait_share"])
        report("adv_step_ratio", adv_step_ratio(model, auto, device))
        report("autoattack_seconds", autoattack_seconds(model, device))
        if gpus > 1:
            del model
            torch.cuda.empty_cache()
            report("scaling_efficiency", multi_gpu_rate(gpus, Path(folder)) / measured[auto]["images_per_s"])
        else:
            report("ddp", "skipped(one GPU)")
    flops = train_passes(load_option("loss", LOSS), load_option("protocol", PROTOCOL)) * forward_gflops(
        load_option("model", MODEL)["arch"], 224)
    report("sustained_tflops", measured[auto]["images_per_s"] * flops / 1e3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
