"""Dataset preparation, without torch: raw layouts -> one prepared layout (split rule applied).

Datasets are read from a data root (`$RFTBENCH_DATA`, else `data/`) and never downloaded at run
time: `rftbench prepare-data dataset=NAME source=DIR [source_format=FORMAT] [paths.data=ROOT]` converts
a download once (`source_format` defaults to the dataset config's). Only `digits` (bundled with
scikit-learn) is prepared automatically when first loaded. Loading the prepared layout into
tensors is `benchmark.data`'s; this module also serves the pre-launch check (`require_prepared`),
which must stay fast and torch-free.

Prepared layout, `<data root>/<name>/`:
  images/<split>/<label:03d>/<file>  the original image files (hard links, else copies), split in
                                     train / val / test; resizing happens when loading, so the
                                     native resolution stays available (corruptions need it)
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
A source format with final splits (the authors' processed archives) skips the rule: its
train/val/test are kept exactly as shipped.
"""
from __future__ import annotations

import csv
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
from PIL import Image

from benchmark import arguments
from benchmark.atomic import write_json_atomic
from benchmark.errors import RFTBenchError, unknown_choice
from benchmark.paths import PROJECT_DIR, root
from benchmark.registry import Registry
from benchmark.study import load_option, merged, options

# scipy and scikit-learn serve only some raw layouts and the split rule, and are imported there:
# the pre-launch check and the worker's loading of prepared data need neither.

LAYOUT_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.csv"
INDEX_COLUMNS = ("path", "label", "class_name", "split", "sha256")
SPLITS = ("train", "val", "test")
TEST_FRACTION = 0.20  # of all images, when the dataset has no official split
VAL_FRACTION = 0.15   # of train+val, when the dataset has no official val split
# The file suffixes an image folder may hold: torchvision's ImageFolder's, so that a folder reads
# the same here as in the study authors' pipeline.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Flowers-102 ships labels only; these names, indexed by label, are torchvision's Flowers102.classes.
FLOWERS102_CLASSES = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold",
    "tiger lily", "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon",
    "colt's foot", "king protea", "spear thistle", "yellow iris", "globe-flower",
    "purple coneflower", "peruvian lily", "balloon flower", "giant white arum lily", "fire lily",
    "pincushion flower", "fritillary", "red ginger", "grape hyacinth", "corn poppy",
    "prince of wales feathers", "stemless gentian", "artichoke", "sweet william", "carnation",
    "garden phlox", "love in the mist", "mexican aster", "alpine sea holly", "ruby-lipped cattleya",
    "cape flower", "great masterwort", "siam tulip", "lenten rose", "barbeton daisy", "daffodil",
    "sword lily", "poinsettia", "bolero deep blue", "wallflower", "marigold", "buttercup",
    "oxeye daisy", "common dandelion", "petunia", "wild pansy", "primula", "sunflower",
    "pelargonium", "bishop of llandaff", "gaura", "geranium", "orange dahlia", "pink-yellow dahlia?",
    "cautleya spicata", "japanese anemone", "black-eyed susan", "silverbush", "californian poppy",
    "osteospermum", "spring crocus", "bearded iris", "windflower", "tree poppy", "gazania", "azalea",
    "water lily", "rose", "thorn apple", "morning glory", "passion flower", "lotus", "toad lily",
    "anthurium", "frangipani", "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow",
    "magnolia", "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss",
    "foxglove", "bougainvillea", "camellia", "mallow", "mexican petunia", "bromelia",
    "blanket flower", "trumpet creeper", "blackberry lily",
)


# ---------------------------------------------------------------------------- raw layouts
# Each reader gives torchvision's labels and class order for its layout. The annotation files are
# parsed here rather than through torchvision's dataset classes: those need torch, expose their
# file lists only as private attributes, and Flowers102 insists on the .mat files' md5.


@dataclass(frozen=True)
class Item:
    """One image of a raw layout."""

    key: str              # path relative to the layout's folder: the sort key, unique
    path: Path
    label: int
    official: str | None  # the dataset's own split, if it has one


RawDataset = tuple[list[Item], list[str]]  # (images, class names indexed by label)


@dataclass(frozen=True)
class SourceFormat:
    """Everything about one raw layout: what it looks like, where it sits under `source=DIR`,
    how to read it and whose splits it brings.

    `folders` are tried in order, each formatted with the dataset config (`{study_name}`), and
    the first holding `marker` is the layout's folder. `final_splits`: the layout's own
    train/val/test are the prepared splits as they are (the config's split keys are not
    applied); otherwise the layout brings the official splits the config's `official_splits`
    names, and the split rule does the rest. `bundled`: the data ships with a library and this
    writes it as the layout into the given folder (no `source=DIR`).
    """

    layout: str                # the raw layout, one line: what the user should point at
    folders: tuple[str, ...]
    marker: str
    read: Callable[[Path], RawDataset]
    final_splits: bool = False
    bundled: Callable[[Path], Path] | None = None


SOURCE_FORMATS: Registry[SourceFormat] = Registry("dataset source format")


def _read_folder(images: Path, base: Path, exclude: Sequence[str] = ()) -> RawDataset:
    """`images/<class>/…/<file>` by torchvision's ImageFolder rules (classes sorted by name, files
    by walk order, image suffixes only, no empty class), keys relative to `base`."""
    classes = sorted(entry.name for entry in os.scandir(images) if entry.is_dir() and entry.name not in exclude)
    if not classes:
        raise FileNotFoundError(f"no class folder in {images}")
    items = []
    for label, name in enumerate(classes):
        found = [Path(folder) / file for folder, _, files in sorted(os.walk(images / name, followlinks=True))
                 for file in sorted(files) if file.lower().endswith(IMAGE_SUFFIXES)]
        if not found:
            raise FileNotFoundError(f"class folder {name!r} holds no {'/'.join(IMAGE_SUFFIXES)} file")
        items += [Item(path.relative_to(base).as_posix(), path, label, None) for path in found]
    return items, classes


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _read_fgvc_aircraft(base: Path) -> RawDataset:
    """As torchvision's FGVCAircraft at the variant level: labels index `variants.txt`."""
    classes = _lines(base / "data" / "variants.txt")
    label = {name: i for i, name in enumerate(classes)}
    items = []
    for split in SPLITS:
        for line in _lines(base / "data" / f"images_variant_{split}.txt"):
            image_id, variant = line.split(" ", 1)
            key = f"data/images/{image_id}.jpg"
            items.append(Item(key, base / key, label[variant], split))
    return items, classes


def _read_flowers102(base: Path) -> RawDataset:
    """As torchvision's Flowers102: label = imagelabels - 1, splits from setid.mat."""
    from scipy.io import loadmat

    labels = np.atleast_1d(loadmat(base / "imagelabels.mat", squeeze_me=True)["labels"])
    set_ids = loadmat(base / "setid.mat", squeeze_me=True)
    items = []
    for split, field in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        for image_id in np.atleast_1d(set_ids[field]).tolist():
            key = f"jpg/image_{image_id:05d}.jpg"
            items.append(Item(key, base / key, int(labels[image_id - 1]) - 1, split))
    return items, list(FLOWERS102_CLASSES)


def _read_oxford_pet(base: Path) -> RawDataset:
    """As torchvision's OxfordIIITPet: label = CLASS-ID - 1, name from the image id."""
    items, names = [], {}
    for split in ("trainval", "test"):
        for line in _lines(base / "annotations" / f"{split}.txt"):
            image_id, class_id, *_ = line.split()
            label = int(class_id) - 1
            names[label] = " ".join(part.title() for part in image_id.rsplit("_", 1)[0].split("_"))
            key = f"images/{image_id}.jpg"
            items.append(Item(key, base / key, label, split))
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"class ids are not 1..{len(names)}: {sorted(n + 1 for n in names)}")
    return items, [names[label] for label in range(len(names))]


def _read_stanford_cars(base: Path) -> RawDataset:
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
            items.append(Item(key, base / key, int(record["class"]) - 1, split))
    return items, classes


def _read_authors_processed(base: Path) -> RawDataset:
    """The study authors' published processed split of one dataset (`<dataset>_processed.tar.zst`,
    extracted): `{train,val,test}/labels.csv` (filename,label) beside the split's PNGs, and
    `metadata.json` (`N` classes, `splits.<split>.count`).

    Their split membership is kept exactly: train/val/test as shipped, test not subsampled
    further (theirs is already their stratified 1,000-image subsample). `test_common/`, present
    in early versions of the archives, is not read: it holds their test images with their
    severity-3 corruptions already applied, while RFTBench corrupts the test split itself.
    The PNGs are 224 x 224 (their training images with one draw of their augmentation baked
    in), so for this source the native resolution is 224. The archives name no classes: class
    names are the labels as text.
    """
    meta = json.loads((base / "metadata.json").read_text())
    items = []
    for split in SPLITS:
        with (base / split / "labels.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
        shipped = meta["splits"][split]["count"]
        if len(rows) != shipped:
            raise ValueError(f"{split}/labels.csv lists {len(rows)} images, metadata.json says {shipped}")
        items += [Item(f"{split}/{row['filename']}", base / split / row["filename"], int(row["label"]), split)
                  for row in rows]
    return items, [str(label) for label in range(int(meta["N"]))]


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


SOURCE_FORMATS.register("imagefolder", SourceFormat(
    "<class>/<image> folders, or a parent of UCMerced_LandUse/Images",
    ("UCMerced_LandUse/Images", "Images", "."), ".", lambda base: _read_folder(base, base)))
SOURCE_FORMATS.register("torchvision_caltech101", SourceFormat(
    "caltech101/101_ObjectCategories/<class>/*.jpg",
    ("caltech101", "."), "101_ObjectCategories",
    lambda base: _read_folder(base / "101_ObjectCategories", base, exclude=("BACKGROUND_Google",))))
SOURCE_FORMATS.register("torchvision_fgvc_aircraft", SourceFormat(
    "fgvc-aircraft-2013b/data/{images/,variants.txt,images_variant_{train,val,test}.txt}",
    ("fgvc-aircraft-2013b", "."), "data/variants.txt", _read_fgvc_aircraft))
SOURCE_FORMATS.register("torchvision_flowers102", SourceFormat(
    "flowers-102/{jpg/,imagelabels.mat,setid.mat}",
    ("flowers-102", "."), "imagelabels.mat", _read_flowers102))
SOURCE_FORMATS.register("torchvision_oxford_pet", SourceFormat(
    "oxford-iiit-pet/{images/,annotations/{trainval,test}.txt}",
    ("oxford-iiit-pet", "."), "annotations/trainval.txt", _read_oxford_pet))
SOURCE_FORMATS.register("torchvision_stanford_cars", SourceFormat(
    "stanford_cars/{cars_train/,cars_test/,devkit/cars_meta.mat,devkit/cars_train_annos.mat,"
    "cars_test_annos_withlabels.mat}",
    ("stanford_cars", "."), "devkit/cars_meta.mat", _read_stanford_cars))
SOURCE_FORMATS.register("authors_processed", SourceFormat(
    "the extracted <dataset>_processed.tar.zst: {train,val,test}/{*.png,labels.csv}, metadata.json",
    ("{study_name}", "{study_name}_processed", "."), "metadata.json", _read_authors_processed,
    final_splits=True))
# Generated from scikit-learn into a scratch folder, then read like any ImageFolder.
SOURCE_FORMATS.register("sklearn_digits", SourceFormat(
    "(bundled with scikit-learn)", (".",), ".", lambda base: _read_folder(base, base),
    bundled=_export_digits))


def _read_source(cfg: dict[str, Any], source: Path) -> RawDataset:
    """The raw layout's images, sorted by key, each file checked to exist."""
    fmt_name = cfg["source_format"]
    fmt = SOURCE_FORMATS[fmt_name]
    if not source.is_dir():
        raise RFTBenchError(f"source {str(source)!r} is not a directory; for dataset {cfg['name']!r} "
                            f"it should hold {fmt.layout}")
    folders = [source / folder.format(**cfg) for folder in fmt.folders]
    base = next((folder for folder in folders if (folder / fmt.marker).exists()), None)
    if base is None:
        raise RFTBenchError(f"source {str(source)!r} does not hold the {fmt_name} layout "
                            f"of dataset {cfg['name']!r}: expected {fmt.layout}")
    try:
        items, class_names = fmt.read(base)
    except (OSError, KeyError, ValueError, IndexError, TypeError) as err:
        raise RFTBenchError(f"cannot read the {fmt_name} layout at {str(base)!r}: "
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
    if SOURCE_FORMATS[cfg["source_format"]].final_splits:
        return {"final_splits": list(SPLITS)}  # as the source ships them: no parameter applies
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
    official = np.asarray(official, dtype=object)
    if SOURCE_FORMATS[cfg["source_format"]].final_splits:
        final = {split: np.flatnonzero(official == split) for split in SPLITS}
        return final, len(final["test"])
    rule, seed = list(cfg["official_splits"]), cfg["split_seed"]
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


def _index_rows(items: list[Item], class_names: list[str], splits: dict[str, np.ndarray]) -> list[dict]:
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


def _build(cfg: dict[str, Any], items: list[Item], class_names: list[str], out: Path) -> dict[str, Any]:
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
    """Prepare dataset `cfg` from the raw layout (`cfg["source_format"]`) in `source` into
    `<data_root>/<name>/`.

    Built in a hidden temporary folder beside the target and renamed into place, so a crash
    leaves either the previous prepared dataset or none. `source` is ignored for bundled
    datasets. Returns the manifest.
    """
    fmt = SOURCE_FORMATS[cfg["source_format"]]
    if source is None and fmt.bundled is None:
        raise RFTBenchError(f"dataset {cfg['name']!r} needs source=DIR, the folder holding {fmt.layout}")
    data_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=data_root, prefix=f".{cfg['name']}.", suffix=".tmp"))
    try:
        if fmt.bundled is not None:
            source = fmt.bundled(tmp / "source")
        items, class_names = _read_source(cfg, source)
        out = tmp / "prepared"
        out.mkdir()
        manifest = _build(cfg, items, class_names, out)
        _install(out, data_root / cfg["name"], replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def prepare_command(args: Any) -> int:
    """`rftbench prepare-data dataset=NAME source=DIR [source_format=FORMAT] [paths.data=ROOT]`."""
    words = arguments.parse(args.overrides, ("dataset", "source", "source_format", "paths.data"))
    if words.get("dataset") is None:
        raise RFTBenchError("prepare-data needs dataset=NAME; datasets: "
                            + ", ".join(options("dataset")))
    option = load_option("dataset", words.get("dataset"))
    cfg = merged(option, {"source_format": words.get("source_format", option["source_format"])})
    data_root = words.path("paths.data") or root("data")
    source = words.path("source")
    manifest = prepare(cfg, source, data_root)
    counts = ", ".join(f"{split} {manifest['counts'][split]}" for split in SPLITS)
    if manifest["test_pool"] > manifest["counts"]["test"]:
        counts += f" (subsampled from {manifest['test_pool']})"
    print(f"prepared {cfg['name']} ({manifest['num_classes']} classes): {counts} -> {data_root / cfg['name']}")
    if manifest["num_classes"] != cfg["num_classes"]:
        print(f"warning: the config says {cfg['name']} has {cfg['num_classes']} classes, the source "
              f"has {manifest['num_classes']}; loading it will fail", file=sys.stderr)
    if cfg["source_format"] != option["source_format"]:
        print(f"note: cells use it when run with dataset.source_format={cfg['source_format']}",
              file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- prepared state


def _prepare_hint(cfg: dict[str, Any], data_root: Path) -> str:
    fmt = cfg["source_format"]
    named = "" if fmt == load_option("dataset", cfg["name"])["source_format"] else f" source_format={fmt}"
    return f"rftbench prepare-data dataset={cfg['name']} source=DIR{named} paths.data={data_root}"


def _stale(manifest: dict[str, Any], cfg: dict[str, Any], data_root: Path, directory: Path) -> None:
    """Refuse a prepared dataset built under another format, split rule or class count."""
    wanted = {"source_format": cfg["source_format"], "split_rule": split_rule(cfg),
              "num_classes": cfg["num_classes"], "layout_version": LAYOUT_VERSION}
    stale = [f"{key} is {manifest.get(key)}, the config wants {want}"
             for key, want in wanted.items() if manifest.get(key) != want]
    if stale:
        raise RFTBenchError(f"prepared dataset {str(directory)!r} does not match its config: "
                            f"{'; '.join(stale)}; prepare it again: {_prepare_hint(cfg, data_root)}")


def _corrupted(directory: Path, problem: str, cfg: dict[str, Any], data_root: Path) -> RFTBenchError:
    return RFTBenchError(f"corrupted prepared dataset {str(directory)!r}: {problem}; "
                         f"prepare it again: {_prepare_hint(cfg, data_root)}")


def require_prepared(dataset_cfg: dict[str, Any], data_root: Path) -> Path:
    """The dataset's prepared directory, after the pre-launch check (one small file read): a
    clear error when the dataset is unknown, not prepared yet (unless bundled: prepared on first
    use), or prepared under another source format, split rule or class count."""
    name = dataset_cfg["name"]
    if name not in options("dataset"):
        raise unknown_choice("dataset", name, options("dataset"))
    data_root = Path(data_root)
    directory = data_root / name
    if not (directory / MANIFEST).exists():
        if SOURCE_FORMATS[dataset_cfg["source_format"]].bundled is None:
            where = "" if data_root.is_dir() else f" (the data root {str(data_root)!r} does not exist)"
            raise RFTBenchError(f"dataset {name!r} is not prepared: {str(directory / MANIFEST)!r} "
                                f"not found{where}. Prepare it with: {_prepare_hint(dataset_cfg, data_root)}")
        return directory
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise _corrupted(directory, f"{type(err).__name__}: {err}", dataset_cfg, data_root) from None
    _stale(manifest, dataset_cfg, data_root, directory)
    return directory


def prepared_index(dataset_cfg: dict[str, Any], data_root: Path) -> tuple[Path, dict, list[dict]]:
    """(directory, manifest, index rows) of the prepared dataset, checked against each other, the
    files and the config; a bundled dataset is prepared first if it is not yet."""
    directory = require_prepared(dataset_cfg, data_root)
    if not (directory / MANIFEST).exists():
        prepare(dataset_cfg, None, Path(data_root), replace=False)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        index = (directory / INDEX).read_bytes()
        rows = list(csv.DictReader(io.StringIO(index.decode())))
        counts, class_counts = _counts(rows, manifest["num_classes"])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise _corrupted(directory, f"{type(err).__name__}: {err}", dataset_cfg, data_root) from None
    problems = []
    if _sha256(index) != manifest["index_sha256"]:
        problems.append(f"{INDEX}'s checksum differs from the manifest's")
    if counts != manifest["counts"] or class_counts != manifest["class_counts"]:
        problems.append(f"the manifest's counts {manifest['counts']} (or per class) differ from "
                        f"{INDEX}'s {counts}")
    missing = [row["path"] for row in rows if not (directory / row["path"]).is_file()]
    if missing:
        problems.append(f"{len(missing)} image files are missing, e.g. {missing[0]}")
    if problems:
        raise _corrupted(directory, "; ".join(problems), dataset_cfg, data_root)
    return directory, manifest, rows
