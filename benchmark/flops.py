"""Forward FLOPs of the backbones, counted once, for the cost prior of `rftbench plan`.

`forward_gflops` counts one image's forward pass with torch's FLOP counter on the meta device (no
weights, no memory, no data): matrix products and convolutions at 2 FLOPs per multiply-add, as
torch.utils.flop_counter counts them; element-wise work is not counted. The backbone is timm's
architecture with its default head (the datasets' heads differ by a negligible amount).

The table `conf/model/gflops.csv` (arch, image_size, gflops) holds the counts for every model
option at its datasets' image size; `python -m benchmark.flops` rewrites it from the model options
and datasets of the project's config, and tests/test_cost.py recounts a few. `benchmark.cost`
reads the table without torch.
"""
from __future__ import annotations

import csv
import sys

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmark.cost import FLOPS_TABLE
from benchmark.study import load_option, options


def forward_gflops(arch: str, image_size: int) -> float:
    """GFLOPs of one image's forward pass through timm's `arch` at `image_size` pixels."""
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False).eval()
        image = torch.empty(1, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(image)
    return counter.get_total_flops() / 1e9


def table_rows() -> list[tuple[str, int]]:
    """(arch, image size) of every model option at the image sizes of the datasets: the demo
    architectures at the demo's size, the others at the study datasets'."""
    sizes = {load_option("dataset", name)["image_size"] for name in options("dataset")}
    archs = {load_option("model", name)["arch"]: load_option("model", name)["source"] for name in options("model")}
    demo_size = load_option("dataset", "digits")["image_size"]
    return sorted((arch, size) for arch, source in archs.items()
                  for size in ({demo_size} if source == "demo" else sizes - {demo_size}))


def main() -> int:
    rows = [(arch, size, f"{forward_gflops(arch, size):.4g}") for arch, size in table_rows()]
    with FLOPS_TABLE.open("w", newline="") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["arch", "image_size", "gflops"])
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {FLOPS_TABLE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
