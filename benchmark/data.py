"""Datasets: raw layouts -> one prepared layout (split rule applied) -> torch Datasets.

Datasets are read from a data root (`$RFTBENCH_DATA`, else `data/`) and never downloaded at run
time: `rftbench prepare-data dataset=NAME source=DIR [data=ROOT]` converts a raw download once.
Only `digits` (bundled with scikit-learn) is prepared automatically when first loaded.

Prepared layout, `<data root>/<name>/`:
  images/<split>/<label:03d>/<file>  the original image files (hard links, else copies), split in
                                     train / val / test; resizing happens when loading
  index.csv      path (relative to the dataset folder), label, class_name, split, sha256 (of the
                 file); rows in split order (train, val, test), then by path. The test rows'
                 order is the test set's order: per-example results are keyed by position.
  manifest.json  dataset, source_format, num_classes, class_names, split_rule (its parameters),
                 counts and class_counts (per split; class_counts indexed by label), test_pool
                 (test images before subsampling), index_sha256, layout_version,
                 rftbench_version. Written last, and the folder is built under a temporary name
                 and renamed into place, so a folder with a manifest is a complete one.

The split rule (parameters from conf/dataset/<name>.yaml): the official train/val/test split
where the dataset has one; where only trainval/test exist, train/val is a stratified 85/15 split
of trainval (`split_seed`); where there is none, a stratified 80/20 train+val/test split, then
85/15 train/val (both `split_seed`). Then the test split is subsampled, stratified, to
`test_size` images (`test_subsample_seed`) unless it is already that small. Images are sorted by
their path in the source before splitting, so the same files give the same split on any machine.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import tomllib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import Flowers102
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms import v2

from benchmark.atomic import write_json_atomic
from benchmark.errors import RFTBenchError, unknown_choice
from benchmark.paths import PROJECT_DIR, root
from benchmark.study import load_option, options

# scipy and scikit-learn serve only the preparation of raw layouts and are imported there: they
# would add seconds to the start of every worker, which loads prepared data only.

LAYOUT_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.csv"
INDEX_COLUMNS = ("path", "label", "class_name", "split", "sha256")
SPLITS = ("train", "val", "test")
TEST_FRACTION = 0.20  # of all images, when the dataset has no official split
VAL_FRACTION = 0.15   # of train+val, when the dataset has no official val split
# A split whose resized uint8 pixels fit in this many bytes is decoded once and kept in memory:
# decoding, not the model, would otherwise dominate an epoch on small images (digits).
CACHE_BYTES = 256 * 2**20


# ---------------------------------------------------------------------------- raw layouts
# Each reader gives torchvision's labels and class order for its layout. The annotation files are
# parsed here because torchvision's classes expose their file lists only as private attributes
# (and Flowers102 insists on the .mat files' md5); folder layouts use torchvision's own helpers.


@dataclass(frozen=True)
class _Item:
    """One image of a raw layout."""

    key: str              # path relative to the layout's folder: the sort key, unique
    path: Path
    label: int
    official: str | None  # the dataset's own split, if it has one


_Raw = tuple[list[_Item], list[str]]  # (images, class names indexed by label)


@dataclass(frozen=True)
class _Format:
    """Where a raw layout sits under `source=DIR` and how to read it."""

    layout: str                # what the user should point at, for error messages
    folders: tuple[str, ...]   # candidate layout folders under the source, most specific first
    marker: str                # a path that exists inside the layout folder
    read: Callable[[Path], _Raw]


def _read_folder(images: Path, base: Path, exclude: Sequence[str] = ()) -> _Raw:
    """`images/<class>/<file>` (torchvision's ImageFolder rules), keys relative to `base`."""
    classes = [c for c in find_classes(images)[0] if c not in exclude]
    samples = make_dataset(images, {c: i for i, c in enumerate(classes)}, extensions=IMG_EXTENSIONS)
    return [_Item(Path(p).relative_to(base).as_posix(), Path(p), y, None) for p, y in samples], classes


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _read_fgvc_aircraft(base: Path) -> _Raw:
    """As torchvision's FGVCAircraft at the variant level: labels index `variants.txt`."""
    classes = _lines(base / "data" / "variants.txt")
    label = {name: i for i, name in enumerate(classes)}
    items = []
    for split in ("train", "val", "test"):
        for line in _lines(base / "data" / f"images_variant_{split}.txt"):
            image_id, variant = line.split(" ", 1)
            key = f"data/images/{image_id}.jpg"
            items.append(_Item(key, base / key, label[variant], split))
    return items, classes


def _read_flowers102(base: Path) -> _Raw:
    """As torchvision's Flowers102 (whose reader checks the .mat files' md5, so not used)."""
    from scipy.io import loadmat

    labels = np.atleast_1d(loadmat(base / "imagelabels.mat", squeeze_me=True)["labels"])
    set_ids = loadmat(base / "setid.mat", squeeze_me=True)
    items = []
    for split, field in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        for image_id in np.atleast_1d(set_ids[field]).tolist():
            key = f"jpg/image_{image_id:05d}.jpg"
            items.append(_Item(key, base / key, int(labels[image_id - 1]) - 1, split))
    return items, list(Flowers102.classes)


def _read_oxford_pet(base: Path) -> _Raw:
    """As torchvision's OxfordIIITPet: label = CLASS-ID - 1, name from the image id."""
    items, names = [], {}
    for split in ("trainval", "test"):
        for line in _lines(base / "annotations" / f"{split}.txt"):
            image_id, class_id, *_ = line.split()
            label = int(class_id) - 1
            names[label] = " ".join(part.title() for part in image_id.rsplit("_", 1)[0].split("_"))
            key = f"images/{image_id}.jpg"
            items.append(_Item(key, base / key, label, split))
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"class ids are not 1..{len(names)}: {sorted(n + 1 for n in names)}")
    return items, [names[label] for label in range(len(names))]


def _read_stanford_cars(base: Path) -> _Raw:
    """As torchvision's StanfordCars: label = annotation `class` - 1, names from cars_meta.mat."""
    from scipy.io import loadmat

    meta = loadmat(base / "devkit" / "cars_meta.mat", squeeze_me=True)
    classes = [str(name) for name in np.atleast_1d(meta["class_names"])]
    items = []
    for split, folder, annotations in (
        ("trainval", "cars_train", base / "devkit" / "cars_train_annos.mat"),
        ("test", "cars_test", base / "cars_test_annos_withlabels.mat"),
    ):
        for record in np.atleast_1d(loadmat(annotations, squeeze_me=True)["annotations"]):
            key = f"{folder}/{record['fname']}"
            items.append(_Item(key, base / key, int(record["class"]) - 1, split))
    return items, classes


def _export_digits(folder: Path) -> Path:
    """scikit-learn's 8x8 digits (values 0..16) as an ImageFolder of RGB PNGs under `folder`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    for i, (image, label) in enumerate(zip(pixels, digits.target)):
        path = folder / str(label) / f"digit_{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).convert("RGB").save(path)
    return folder


FORMATS: dict[str, _Format] = {
    "imagefolder": _Format(
        "<class>/<image> folders, or a parent of UCMerced_LandUse/Images",
        ("UCMerced_LandUse/Images", "Images", "."), ".", lambda base: _read_folder(base, base)),
    "torchvision_caltech101": _Format(
        "caltech101/101_ObjectCategories/<class>/*.jpg",
        ("caltech101", "."), "101_ObjectCategories",
        lambda base: _read_folder(base / "101_ObjectCategories", base, exclude=("BACKGROUND_Google",))),
    "torchvision_fgvc_aircraft": _Format(
        "fgvc-aircraft-2013b/data/{images/,variants.txt,images_variant_{train,val,test}.txt}",
        ("fgvc-aircraft-2013b", "."), "data/variants.txt", _read_fgvc_aircraft),
    "torchvision_flowers102": _Format(
        "flowers-102/{jpg/,imagelabels.mat,setid.mat}",
        ("flowers-102", "."), "imagelabels.mat", _read_flowers102),
    "torchvision_oxford_pet": _Format(
        "oxford-iiit-pet/{images/,annotations/{trainval,test}.txt}",
        ("oxford-iiit-pet", "."), "annotations/trainval.txt", _read_oxford_pet),
    "torchvision_stanford_cars": _Format(
        "stanford_cars/{cars_train/,cars_test/,devkit/cars_meta.mat,devkit/cars_train_annos.mat,"
        "cars_test_annos_withlabels.mat}",
        ("stanford_cars", "."), "devkit/cars_meta.mat", _read_stanford_cars),
    # Generated from scikit-learn into a scratch folder, then read like any ImageFolder.
    "sklearn_digits": _Format("(bundled with scikit-learn)", (".",), ".",
                              lambda base: _read_folder(base, base)),
}
BUNDLED: dict[str, Callable[[Path], Path]] = {"sklearn_digits": _export_digits}


def _format(cfg: dict[str, Any]) -> _Format:
    if cfg["source_format"] not in FORMATS:
        raise unknown_choice(f"source_format of dataset {cfg['name']!r}", cfg["source_format"], FORMATS)
    return FORMATS[cfg["source_format"]]


def _read_source(cfg: dict[str, Any], source: Path) -> _Raw:
    """The raw layout's images, sorted by key, each file checked to exist."""
    fmt = _format(cfg)
    if not source.is_dir():
        raise RFTBenchError(f"source {str(source)!r} is not a directory; for dataset {cfg['name']!r} "
                            f"it should hold {fmt.layout}")
    base = next((source / f for f in fmt.folders if (source / f / fmt.marker).exists()), None)
    if base is None:
        raise RFTBenchError(f"source {str(source)!r} does not hold the {cfg['source_format']} layout "
                            f"of dataset {cfg['name']!r}: expected {fmt.layout}")
    try:
        items, class_names = fmt.read(base)
    except (OSError, KeyError, ValueError, IndexError) as err:
        raise RFTBenchError(f"cannot read the {cfg['source_format']} layout at {str(base)!r}: "
                            f"{type(err).__name__}: {err}") from None
    missing = [item.key for item in items if not item.path.is_file()]
    if missing:
        raise RFTBenchError(f"{len(missing)} image(s) listed in {str(base)!r} are missing, "
                            f"e.g. {', '.join(missing[:3])}")
    bad = sorted({item.label for item in items} - set(range(len(class_names))))
    if bad:
        raise RFTBenchError(f"labels {bad[:5]} in {str(base)!r} have no class name "
                            f"({len(class_names)} classes)")
    return sorted(items, key=lambda item: item.key), class_names


# ---------------------------------------------------------------------------- split rule


def split_rule(cfg: dict[str, Any]) -> dict[str, Any]:
    """The split rule's parameters, as recorded in (and checked against) the manifest."""
    return {
        "official_splits": list(cfg["official_splits"]),
        "split_seed": cfg["split_seed"],
        "test_fraction": TEST_FRACTION,
        "val_fraction": VAL_FRACTION,
        "test_size": cfg["test_size"],
        "test_subsample_seed": cfg["test_subsample_seed"],
    }


def _stratified(labels: np.ndarray, idx: np.ndarray, seed: int, **size: float) -> tuple[np.ndarray, ...]:
    """scikit-learn's stratified split of the positions `idx`, each part sorted."""
    from sklearn.model_selection import train_test_split

    try:
        parts = train_test_split(idx, stratify=labels[idx], random_state=seed, **size)
    except ValueError as err:
        raise RFTBenchError(f"cannot split {len(idx)} images stratified by class: {err}") from None
    return tuple(np.sort(part) for part in parts)


def assign_splits(labels: np.ndarray, official: Sequence[str | None],
                  cfg: dict[str, Any]) -> tuple[dict[str, np.ndarray], int]:
    """({split: positions}, test pool size) under the split rule; positions index `labels`."""
    rule, seed = list(cfg["official_splits"]), cfg["split_seed"]
    official = np.asarray(official, dtype=object)
    given = sorted(set(official) - {None})
    if rule and given != sorted(rule):
        raise RFTBenchError(f"dataset {cfg['name']!r}: the source has splits {given}, "
                            f"the config's official_splits are {rule}")
    if not rule:
        trainval, test = _stratified(labels, np.arange(len(labels)), seed, test_size=TEST_FRACTION)
    elif sorted(rule) in (["test", "trainval"], ["test", "train", "val"]):
        trainval, test = np.flatnonzero(official != "test"), np.flatnonzero(official == "test")
    else:
        raise RFTBenchError(f"dataset {cfg['name']!r}: official_splits {rule} is not one of "
                            "[], [trainval, test], [train, val, test]")
    if "train" in rule:
        train, val = np.flatnonzero(official == "train"), np.flatnonzero(official == "val")
    else:
        train, val = _stratified(labels, trainval, seed, test_size=VAL_FRACTION)
    pool = len(test)
    if pool > cfg["test_size"]:
        test = _stratified(labels, test, cfg["test_subsample_seed"], train_size=cfg["test_size"])[0]
    return {"train": train, "val": val, "test": test}, pool


# ---------------------------------------------------------------------------- prepare


def _rftbench_version() -> str:
    try:
        return metadata.version("rftbench")
    except metadata.PackageNotFoundError:  # running from a checkout that is not installed
        return tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())["project"]["version"]


def _sha256(data: bytes | Path) -> str:
    if isinstance(data, Path):
        with data.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    return hashlib.sha256(data).hexdigest()


def _place(source: Path, target: Path) -> None:
    """Hard-link `source` to `target` (no extra disk), copying across file systems."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _index_rows(items: list[_Item], class_names: list[str], splits: dict[str, np.ndarray]) -> list[dict]:
    rows = [
        {"path": f"images/{split}/{items[i].label:03d}/{items[i].path.name}", "label": items[i].label,
         "class_name": class_names[items[i].label], "split": split, "source": items[i].path}
        for split in SPLITS for i in splits[split]
    ]
    clashes = [path for path, n in Counter(row["path"] for row in rows).items() if n > 1]
    if clashes:
        raise RFTBenchError(f"{len(clashes)} images share a file name within one split and class, "
                            f"e.g. {clashes[0]}")
    return sorted(rows, key=lambda row: (SPLITS.index(row["split"]), row["path"]))


def _counts(rows: list[dict], num_classes: int) -> tuple[dict[str, int], dict[str, list[int]]]:
    """(images per split, images per split and label)."""
    per_class = {split: [0] * num_classes for split in SPLITS}
    for row in rows:
        per_class[row["split"]][int(row["label"])] += 1
    return {split: sum(counts) for split, counts in per_class.items()}, per_class


def _build(cfg: dict[str, Any], items: list[_Item], class_names: list[str], out: Path) -> dict[str, Any]:
    """Write the prepared layout of `items` into the empty folder `out`; return its manifest."""
    splits, pool = assign_splits(np.array([item.label for item in items]),
                                 [item.official for item in items], cfg)
    rows = _index_rows(items, class_names, splits)
    for row in rows:
        _place(row.pop("source"), out / row["path"])
        row["sha256"] = _sha256(out / row["path"])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=INDEX_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    index = buffer.getvalue().encode()
    (out / INDEX).write_bytes(index)
    counts, class_counts = _counts(rows, len(class_names))
    manifest = {
        "layout_version": LAYOUT_VERSION, "dataset": cfg["name"], "source_format": cfg["source_format"],
        "num_classes": len(class_names), "class_names": class_names, "split_rule": split_rule(cfg),
        "counts": counts, "class_counts": class_counts, "test_pool": pool,
        "index_sha256": _sha256(index), "rftbench_version": _rftbench_version(),
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def _install(tmp: Path, target: Path, replace: bool) -> None:
    """Move the finished folder `tmp` to `target`; an existing `target` is replaced or kept."""
    if replace and target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
        os.replace(target, old)  # onto the empty placeholder: atomic
        os.rename(tmp, target)
        shutil.rmtree(old)
        return
    try:
        os.rename(tmp, target)
    except OSError:
        if not (target / MANIFEST).exists():  # else a concurrent process prepared it first
            raise RFTBenchError(f"{str(target)!r} exists but holds no prepared dataset; "
                                "remove it or run rftbench prepare-data") from None


def prepare(cfg: dict[str, Any], source: Path | None, data_root: Path,
            replace: bool = True) -> dict[str, Any]:
    """Prepare dataset `cfg` from the raw layout in `source` into `<data_root>/<name>/`.

    Built in a hidden temporary folder beside the target and renamed into place, so a crash
    leaves either the previous prepared dataset or none. `source` is ignored for bundled
    datasets. Returns the manifest.
    """
    fmt_name, fmt = cfg["source_format"], _format(cfg)
    if source is None and fmt_name not in BUNDLED:
        raise RFTBenchError(f"dataset {cfg['name']!r} needs source=DIR, the folder holding {fmt.layout}")
    data_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=data_root, prefix=f".{cfg['name']}.", suffix=".tmp"))
    try:
        if fmt_name in BUNDLED:
            source = BUNDLED[fmt_name](tmp / "source")
        items, class_names = _read_source(cfg, source)
        out = tmp / "prepared"
        out.mkdir()
        manifest = _build(cfg, items, class_names, out)
        _install(out, data_root / cfg["name"], replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _words(words: Sequence[str], allowed: Sequence[str]) -> dict[str, str]:
    parsed = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not value:
            raise RFTBenchError(f"expected key=value, got {word!r} (keys: {', '.join(allowed)})")
        if key not in allowed:
            raise unknown_choice("prepare-data argument", key, allowed)
        parsed[key] = value
    return parsed


def prepare_command(args: Any) -> int:
    """`rftbench prepare-data dataset=NAME source=DIR [data=ROOT]`."""
    words = _words(args.overrides, ("dataset", "source", "data"))
    if "dataset" not in words:
        raise RFTBenchError("prepare-data needs dataset=NAME; datasets: "
                            + ", ".join(options("dataset")))
    cfg = load_option("dataset", words["dataset"])
    data_root = Path(words["data"]) if "data" in words else root("data")
    source = Path(words["source"]) if "source" in words else None
    manifest = prepare(cfg, source, data_root)
    counts = ", ".join(f"{split} {manifest['counts'][split]}" for split in SPLITS)
    if manifest["test_pool"] > manifest["counts"]["test"]:
        counts += f" (subsampled from {manifest['test_pool']})"
    print(f"prepared {cfg['name']} ({manifest['num_classes']} classes): {counts} "
          f"-> {data_root / cfg['name']}")
    if manifest["num_classes"] != cfg["num_classes"]:
        print(f"warning: the config says {cfg['name']} has {cfg['num_classes']} classes, the source "
              f"has {manifest['num_classes']}; loading it will fail", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- load


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    class_names: list[str]


def _decode(path: Path, size: int) -> Tensor:
    """An image file as a uint8 (3, size, size) tensor (resized like the study: to size x size)."""
    with Image.open(path) as image:
        resized = v2.functional.resize(image.convert("RGB"), [size, size])
    return v2.functional.pil_to_tensor(resized)


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


def _prepare_hint(name: str, data_root: Path) -> str:
    return f"rftbench prepare-data dataset={name} source=DIR data={data_root}"


def _checked(directory: Path, cfg: dict[str, Any], data_root: Path) -> tuple[dict, list[dict]]:
    """The manifest and index rows, checked against each other, the files and the config."""
    fix = f"prepare it again: {_prepare_hint(cfg['name'], data_root)}"
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        index = (directory / INDEX).read_bytes()
        rows = list(csv.DictReader(io.StringIO(index.decode())))
        counts, class_counts = _counts(rows, manifest["num_classes"])
        problems = []
        if _sha256(index) != manifest["index_sha256"]:
            problems.append(f"{INDEX}'s checksum differs from the manifest's")
        if counts != manifest["counts"] or class_counts != manifest["class_counts"]:
            problems.append(f"the manifest's counts {manifest['counts']} (or per class) differ from "
                            f"{INDEX}'s {counts}")
    except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise RFTBenchError(f"corrupted prepared dataset {str(directory)!r}: "
                            f"{type(err).__name__}: {err}; {fix}") from None
    missing = [row["path"] for row in rows if not (directory / row["path"]).is_file()]
    if missing:
        problems.append(f"{len(missing)} image files are missing, e.g. {missing[0]}")
    if problems:
        raise RFTBenchError(f"corrupted prepared dataset {str(directory)!r}: "
                            f"{'; '.join(problems)}; {fix}")
    wanted = {"source_format": cfg["source_format"], "split_rule": split_rule(cfg),
              "num_classes": cfg["num_classes"], "layout_version": LAYOUT_VERSION}
    stale = [f"{key} is {manifest.get(key)}, the config wants {want}"
             for key, want in wanted.items() if manifest.get(key) != want]
    if stale:
        raise RFTBenchError(f"prepared dataset {str(directory)!r} does not match its config: "
                            f"{'; '.join(stale)}; {fix}")
    return manifest, rows


def require_prepared(dataset_cfg: dict[str, Any], data_root: Path) -> Path:
    """The dataset's prepared directory; a clear error when it is unknown or, unless bundled
    (prepared on first use), not prepared yet."""
    name = dataset_cfg["name"]
    if name not in options("dataset"):
        raise unknown_choice("dataset", name, options("dataset"))
    directory = Path(data_root) / name
    if not (directory / MANIFEST).exists() and dataset_cfg["source_format"] not in BUNDLED:
        where = "" if Path(data_root).is_dir() else f" (the data root {str(data_root)!r} does not exist)"
        raise RFTBenchError(f"dataset {name!r} is not prepared: {str(directory / MANIFEST)!r} "
                            f"not found{where}. Prepare it with: {_prepare_hint(name, data_root)}")
    return directory


def load_splits(dataset_cfg: dict[str, Any], data_root: Path | None = None) -> Splits:
    """The prepared dataset `dataset_cfg` (a conf/dataset option) as train/val/test Datasets.

    Train is augmented as the config says; val and test are not. Bundled datasets are prepared
    on first use; any other must have been prepared with `rftbench prepare-data`.
    """
    data_root = Path(data_root) if data_root is not None else root("data")
    directory = require_prepared(dataset_cfg, data_root)
    if not (directory / MANIFEST).exists():  # bundled: prepared on first use
        prepare(dataset_cfg, None, data_root, replace=False)
    manifest, rows = _checked(directory, dataset_cfg, data_root)
    size, augmentation = dataset_cfg["image_size"], _augmentation(dataset_cfg.get("augment", {}))

    def split(name: str, steps: Sequence[v2.Transform] = ()) -> ImageDataset:
        chosen = [row for row in rows if row["split"] == name]
        # The index's checksum covers every file's sha256 (checked against the manifest above).
        return ImageDataset([directory / row["path"] for row in chosen],
                            [int(row["label"]) for row in chosen], size, steps,
                            content_key=manifest["index_sha256"])

    return Splits(split("train", augmentation), split("val"), split("test"),
                  manifest["num_classes"], manifest["class_names"])


def load_tensors(dataset: Dataset, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """A whole split as (x float32 (N, 3, S, S), y int64 (N,)), in the dataset's order."""
    batches = list(DataLoader(dataset, batch_size=batch_size, shuffle=False))
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
