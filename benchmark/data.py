"""Prepared datasets as torch Datasets and tensors: transforms, the decoded cache, and the test
images at their native resolution for conditions that must act before the resize (corruptions).

Preparation (raw layouts, the split rule, the prepared layout and its manifest) is
`benchmark.prepare`'s and needs no torch; this module only reads what it wrote. Every image is
read as RGB (grey and palette images converted) and resized to `image_size` x `image_size` (no
crop); val and test are never augmented; tensors are float32 in [0, 1], not normalised (the model
does that, so attacks work in pixel space).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from benchmark.paths import root
from benchmark.prepare import SPLITS, prepared_index

# A split whose resized uint8 pixels fit in this many bytes is decoded once and kept in memory:
# decoding, not the model, would otherwise dominate an epoch on small images (digits).
CACHE_BYTES = 256 * 2**20


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset | None  # None when loaded without it (hyper-parameter search)
    num_classes: int
    class_names: list[str]


def _resized(image: Image.Image, size: int) -> Tensor:
    """An image as a uint8 (3, size, size) tensor: RGB, resized like the study (to size x size)."""
    return v2.functional.pil_to_tensor(v2.functional.resize(image.convert("RGB"), [size, size]))


def _decode(path: Path, size: int) -> Tensor:
    """An image file as `_resized` gives it."""
    with Image.open(path) as image:
        return _resized(image, size)


def _augmentation(augment: dict[str, Any]) -> list[v2.Transform]:
    steps: list[v2.Transform] = []
    if augment.get("hflip"):
        steps.append(v2.RandomHorizontalFlip())
    if jitter := augment.get("color_jitter"):
        steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
    if degrees := augment.get("rotation_degrees"):
        steps.append(v2.RandomRotation(degrees))
    return steps


@functools.lru_cache(maxsize=len(SPLITS))
def _decoded(files: tuple[Path, ...], size: int, content_key: str) -> Tensor:
    """The files decoded into one uint8 (N, 3, size, size) tensor, never written to. The last
    dataset's splits are kept: the local launcher runs a study's cells one after another in one
    process, and each cell would decode the same dataset again. `content_key` stands for the
    files' content, so a dataset prepared anew in place is decoded anew."""
    return torch.stack([_decode(f, size) for f in files])


class ImageDataset(Dataset):
    """One split: items `(x, y)`, x float32 (3, S, S) in [0, 1] (not normalised: the model does
    that, so attacks work in pixel space), y the int label. Small splits are decoded once per
    process (`_decoded`); `content_key` identifies the files' content (e.g. a checksum of it)."""

    def __init__(self, files: list[Path], labels: list[int], size: int,
                 augmentation: Sequence[v2.Transform] = (), *, content_key: str) -> None:
        self.files, self.labels, self.size = files, labels, size
        self.transform = v2.Compose([*augmentation, v2.ToDtype(torch.float32, scale=True)])
        small = 0 < len(files) * 3 * size * size <= CACHE_BYTES
        self.cache = _decoded(tuple(files), size, content_key) if small else None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image = self.cache[i] if self.cache is not None else _decode(self.files[i], self.size)
        return self.transform(image), self.labels[i]


def _split_rows(rows: list[dict], split: str) -> list[dict]:
    return [row for row in rows if row["split"] == split]


def load_splits(dataset_cfg: dict[str, Any], data_root: Path | None = None, *, with_test: bool = True) -> Splits:
    """The prepared dataset `dataset_cfg` (a conf/dataset option) as train/val/test Datasets.

    Train is augmented as the config says; val and test are not. Bundled datasets are prepared
    on first use; any other must have been prepared with `rftbench prepare-data`. Without
    `with_test` the test split is never read (tuning must not see it).
    """
    data_root = Path(data_root) if data_root is not None else root("data")
    directory, manifest, rows = prepared_index(dataset_cfg, data_root)
    size, augmentation = dataset_cfg["image_size"], _augmentation(dataset_cfg.get("augment", {}))

    def split(name: str, steps: Sequence[v2.Transform] = ()) -> ImageDataset:
        chosen = _split_rows(rows, name)
        # The index's checksum covers every file's sha256 (checked against the manifest).
        return ImageDataset([directory / row["path"] for row in chosen],
                            [int(row["label"]) for row in chosen], size, steps,
                            content_key=manifest["index_sha256"])

    return Splits(split("train", augmentation), split("val"), split("test") if with_test else None,
                  manifest["num_classes"], manifest["class_names"])


def load_test_native(dataset_cfg: dict[str, Any], data_root: Path) -> list[np.ndarray]:
    """The prepared test images, in test order, as uint8 (H, W, 3) RGB arrays at the resolution of
    their files (grey and palette images converted to RGB as the loader does): what a condition
    transforms before `test_input` resizes it."""
    directory, _, rows = prepared_index(dataset_cfg, Path(data_root))
    images = []
    for row in _split_rows(rows, "test"):
        with Image.open(directory / row["path"]) as image:
            images.append(np.asarray(image.convert("RGB")))
    return images


def test_input(images: list[np.ndarray], dataset_cfg: dict[str, Any]) -> Tensor:
    """The model input of uint8 (H, W, 3) RGB `images`: float32 (N, 3, S, S) in [0, 1], made as the
    test split makes it (resized to `image_size`, no crop), so that
    `test_input(load_test_native(cfg, root), cfg)` equals the test split's tensors bit for bit."""
    size = dataset_cfg["image_size"]
    pixels = torch.stack([_resized(Image.fromarray(image), size) for image in images])
    return v2.functional.to_dtype(pixels, torch.float32, scale=True)


def load_tensors(dataset: Dataset, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """A whole split as (x float32 (N, 3, S, S), y int64 (N,)), in the dataset's order."""
    batches = list(DataLoader(dataset, batch_size=batch_size, shuffle=False))
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
