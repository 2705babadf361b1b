"""Dataset preparation and loading, on tiny real image files written in each raw layout."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torchvision.datasets import Flowers102
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms import v2

from benchmark import data, prepare
from benchmark.cli import main
from benchmark.errors import RFTBenchError
from benchmark.study import load_option, merged, options
from conftest import COMPUTE_PACKAGES, modules_loaded

CLASSES = 3
SIZE = 16  # image_size for the fixtures: tiny, so loading is fast


@dataclass
class Layout:
    """A raw layout written under `source`: the split the dataset itself gives each image
    (keyed by the image's sha256: every generated image is distinct) and the class names."""

    dataset: str
    source: Path
    official: dict[str, str | None]
    class_names: list[str]
    source_format: str | None = None  # when not the dataset config's own

    @property
    def cfg(self) -> dict:
        """The dataset's config, with the fixture's class count and a tiny image size."""
        patch = {"image_size": SIZE} | ({"source_format": self.source_format} if self.source_format else {})
        if self.dataset != "flowers102":  # flowers' class names are torchvision's full list
            patch["num_classes"] = len(self.class_names)
        return merged(load_option("dataset", self.dataset), patch)


def _image(path: Path, seed: int) -> str:
    """Write a small random image (format from the suffix); return its sha256."""
    pixels = np.random.default_rng(seed).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _images(paths_and_splits: list[tuple[Path, str | None]]) -> dict[str, str | None]:
    return {_image(path, seed): split for seed, (path, split) in enumerate(paths_and_splits)}


def uc_merced(raw: Path) -> Layout:
    names = ["agricultural", "beach", "forest"]
    images = raw / "UCMerced_LandUse" / "Images"
    official = _images([(images / c / f"{c}{i:02d}.tif", None) for c in names for i in range(10)])
    return Layout("uc_merced", raw, official, names)


def caltech101(raw: Path) -> Layout:
    names = ["accordion", "anchor", "ant"]
    images = raw / "caltech101" / "101_ObjectCategories"
    official = _images([(images / c / f"image_{i:04d}.jpg", None) for c in names for i in range(1, 11)])
    _image(images / "BACKGROUND_Google" / "image_0001.jpg", seed=999)  # not a class: dropped
    return Layout("caltech101", raw, official, names)


def fgvc_aircraft(raw: Path) -> Layout:
    names = ["707-320", "Boeing 737-700", "F-16A/B"]  # names with spaces and slashes, as the real ones
    base = raw / "fgvc-aircraft-2013b" / "data"
    base.mkdir(parents=True)
    (base / "variants.txt").write_text("".join(f"{n}\n" for n in names))
    plan = [(split, n) for split, per_class in (("train", 4), ("val", 2), ("test", 4)) for n in names
            for _ in range(per_class)]
    official = _images([(base / "images" / f"{1000000 + i}.jpg", split) for i, (split, _) in enumerate(plan)])
    for split in ("train", "val", "test"):
        lines = [f"{1000000 + i} {name}\n" for i, (s, name) in enumerate(plan) if s == split]
        (base / f"images_variant_{split}.txt").write_text("".join(lines))
    return Layout("fgvc_aircraft", raw, official, names)


def flowers102(raw: Path) -> Layout:
    base = raw / "flowers-102"
    plan = [(split, label) for split, per_class in (("train", 4), ("val", 2), ("test", 4))
            for label in range(1, CLASSES + 1) for _ in range(per_class)]
    official = _images([(base / "jpg" / f"image_{i:05d}.jpg", split) for i, (split, _) in enumerate(plan, 1)])
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array([label for _, label in plan])})
    ids = {split: np.array([i for i, (s, _) in enumerate(plan, 1) if s == split]) for split in ("train", "val", "test")}
    scipy.io.savemat(base / "setid.mat", {"trnid": ids["train"], "valid": ids["val"], "tstid": ids["test"]})
    return Layout("flowers102", raw, official, Flowers102.classes[:CLASSES])


def oxford_pet(raw: Path) -> Layout:
    breeds = ["Abyssinian", "american_bulldog", "Bengal"]
    base = raw / "oxford-iiit-pet"
    plan = [(split, b, i) for split, per_class in (("trainval", 8), ("test", 3)) for b in breeds for i in range(per_class)]
    image_ids = [f"{breed}_{split}{i}" for split, breed, i in plan]
    official = _images([(base / "images" / f"{image_id}.jpg", split) for image_id, (split, _, _) in zip(image_ids, plan)])
    for split in ("trainval", "test"):
        lines = [f"{image_id} {breeds.index(b) + 1} {1 + b[0].islower()} 1\n"
                 for image_id, (s, b, _) in zip(image_ids, plan) if s == split]
        (base / "annotations").mkdir(exist_ok=True)
        (base / "annotations" / f"{split}.txt").write_text("".join(lines))
    return Layout("oxford_pet", raw, official, ["Abyssinian", "American Bulldog", "Bengal"])


def stanford_cars(raw: Path) -> Layout:
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"]
    base = raw / "stanford_cars"
    fields = [(field, "O") for field in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    (base / "devkit").mkdir(parents=True)
    official = {}
    for seed, (split, folder, annotations, per_class) in enumerate((
        ("trainval", "cars_train", base / "devkit" / "cars_train_annos.mat", 8),
        ("test", "cars_test", base / "cars_test_annos_withlabels.mat", 3),
    )):  # both folders number their files from 00001, as the real ones
        labels = [label for label in range(1, CLASSES + 1) for _ in range(per_class)]
        files = [f"{i:05d}.jpg" for i in range(1, len(labels) + 1)]
        official |= {_image(base / folder / f, seed=1000 * seed + i): split for i, f in enumerate(files)}
        records = np.array([(0, 0, 9, 9, label, f) for label, f in zip(labels, files)], dtype=fields)
        scipy.io.savemat(annotations, {"annotations": records})
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(names, dtype=object)})
    return Layout("stanford_cars", raw, official, names)


def authors_processed(raw: Path) -> Layout:
    """The authors' archive of caltech101, extracted: per split numbered PNGs (the same names in
    every split) and labels.csv, metadata.json; test_common holds other (corrupted) images."""
    base = raw / "caltech101"
    plan = {"train": 4, "val": 2, "test": 3, "test_common": 3}  # images per class
    official, seed = {}, 0
    for split, per_class in plan.items():
        labels = [label for _ in range(per_class) for label in range(CLASSES)]  # interleaved
        lines = ["filename,label\n"]
        for i, label in enumerate(labels):
            seed += 1
            digest = _image(base / split / f"{i:05d}.png", seed)
            official |= {digest: split} if split != "test_common" else {}
            lines.append(f"{i:05d}.png,{label}\n")
        (base / split / "labels.csv").write_text("".join(lines))
    counts = {split: {"count": per_class * CLASSES} for split, per_class in plan.items()}
    (base / "metadata.json").write_text(json.dumps({"N": CLASSES, "splits": counts}))
    return Layout("caltech101", raw, official, [str(label) for label in range(CLASSES)], "authors_processed")


LAYOUTS: list[Callable[[Path], Layout]] = [uc_merced, caltech101, fgvc_aircraft, flowers102, oxford_pet, stanford_cars]


def _index(directory: Path) -> list[dict]:
    with (directory / prepare.INDEX).open() as f:
        return list(csv.DictReader(f))


def _manifest(directory: Path) -> dict:
    return json.loads((directory / prepare.MANIFEST).read_text())


# ---------------------------------------------------------------------------- prepare


@pytest.mark.parametrize("build", LAYOUTS, ids=lambda build: build.__name__)
def test_prepare_applies_the_split_rule(build, tmp_path, roots):
    layout = build(tmp_path / "raw")
    manifest = prepare.prepare(layout.cfg, layout.source, roots["data"])
    directory = roots["data"] / layout.dataset
    rows = _index(directory)
    by_split = {split: [row for row in rows if row["split"] == split] for split in prepare.SPLITS}

    assert manifest == _manifest(directory)
    assert manifest["class_names"][:CLASSES] == layout.class_names
    assert manifest["counts"] == {split: len(by_split[split]) for split in prepare.SPLITS}
    assert manifest["index_sha256"] == hashlib.sha256((directory / prepare.INDEX).read_bytes()).hexdigest()
    for row in rows:  # every prepared file is a source image, unchanged, with its recorded checksum
        assert hashlib.sha256((directory / row["path"]).read_bytes()).hexdigest() == row["sha256"]
        assert manifest["class_names"][int(row["label"])] == row["class_name"]
    hashes = {split: {row["sha256"] for row in by_split[split]} for split in prepare.SPLITS}
    assert set().union(*hashes.values()) == set(layout.official)  # all kept (BACKGROUND dropped)
    assert sum(map(len, hashes.values())) == len(rows)  # disjoint
    for split in prepare.SPLITS:  # stratified: every class in every split
        assert {int(row["label"]) for row in by_split[split]} == set(range(CLASSES))

    rule = layout.cfg["official_splits"]
    if "train" in rule:
        assert all(layout.official[h] == split for split in prepare.SPLITS for h in hashes[split])
    elif rule:
        assert all(layout.official[h] == "test" for h in hashes["test"])
        assert len(hashes["val"]) == math.ceil(prepare.VAL_FRACTION * (len(rows) - len(hashes["test"])))
    else:
        assert len(hashes["test"]) == math.ceil(prepare.TEST_FRACTION * len(rows))
        assert len(hashes["val"]) == math.ceil(prepare.VAL_FRACTION * (len(rows) - len(hashes["test"])))
    assert all(original.exists() for original in layout.source.rglob("*"))  # originals kept


def test_test_split_is_a_stratified_deterministic_subsample(tmp_path, roots):
    layout = fgvc_aircraft(tmp_path / "raw")
    cfg = merged(layout.cfg, {"test_size": 6})
    first, second = roots["data"] / "a", roots["data"] / "b"
    manifest = prepare.prepare(cfg, layout.source, first)
    prepare.prepare(cfg, layout.source, second)

    test = [row for row in _index(first / "fgvc_aircraft") if row["split"] == "test"]
    assert manifest["test_pool"] == 12 and manifest["counts"]["test"] == 6
    assert manifest["class_counts"]["test"] == [2, 2, 2]
    assert all(layout.official[row["sha256"]] == "test" for row in test)
    for name in (prepare.INDEX, prepare.MANIFEST):  # same files -> same split, byte for byte
        assert (first / "fgvc_aircraft" / name).read_bytes() == (second / "fgvc_aircraft" / name).read_bytes()


def test_prepare_is_idempotent_and_leaves_nothing_behind(tmp_path, roots):
    layout = uc_merced(tmp_path / "raw")
    prepare.prepare(layout.cfg, layout.source, roots["data"])
    before = {p.relative_to(roots["data"]): p.read_bytes() for p in roots["data"].rglob("*") if p.is_file()}
    prepare.prepare(layout.cfg, layout.source, roots["data"])
    after = {p.relative_to(roots["data"]): p.read_bytes() for p in roots["data"].rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in roots["data"].iterdir()] == ["uc_merced"]


def test_a_failed_prepare_keeps_the_previous_dataset(tmp_path, roots):
    layout = fgvc_aircraft(tmp_path / "raw")
    prepare.prepare(layout.cfg, layout.source, roots["data"])
    manifest = (roots["data"] / "fgvc_aircraft" / prepare.MANIFEST).read_bytes()
    (layout.source / "fgvc-aircraft-2013b" / "data" / "images" / "1000003.jpg").unlink()

    with pytest.raises(RFTBenchError, match=r"1 image\(s\) .* missing, e\.g\. data/images/1000003\.jpg"):
        prepare.prepare(layout.cfg, layout.source, roots["data"])
    assert (roots["data"] / "fgvc_aircraft" / prepare.MANIFEST).read_bytes() == manifest
    assert [p.name for p in roots["data"].iterdir()] == ["fgvc_aircraft"]


def test_prepare_rejects_bad_sources(tmp_path, roots):
    cfg = load_option("dataset", "fgvc_aircraft")
    with pytest.raises(RFTBenchError, match="needs source=DIR"):
        prepare.prepare(cfg, None, roots["data"])
    with pytest.raises(RFTBenchError, match=r"'.*absent' is not a directory.*fgvc-aircraft-2013b"):
        prepare.prepare(cfg, tmp_path / "absent", roots["data"])
    with pytest.raises(RFTBenchError, match="does not hold the torchvision_fgvc_aircraft layout"):
        prepare.prepare(cfg, tmp_path, roots["data"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RFTBenchError, match="cannot read the imagefolder layout"):
        prepare.prepare(load_option("dataset", "uc_merced"), tmp_path / "empty", roots["data"])
    assert list(roots["data"].iterdir()) == []


# ---------------------------------------------------------------------------- source formats


def test_every_configured_source_format_is_registered():
    used = {load_option("dataset", name)["source_format"] for name in options("dataset")}
    assert used <= set(prepare.SOURCE_FORMATS.names())
    assert "authors_processed" in prepare.SOURCE_FORMATS.names("authors_*")


def test_preparation_and_the_prelaunch_check_import_no_torch(tmp_path, roots):
    layout = uc_merced(tmp_path / "raw")
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from benchmark.cli import main\n"
        "from benchmark.prepare import prepared_index, require_prepared\n"
        "from benchmark.study import load_option, merged\n"
        "assert main(['prepare-data', 'dataset=uc_merced', 'source=' + sys.argv[1]]) == 0\n"
        "cfg = merged(load_option('dataset', 'uc_merced'), {'num_classes': 3})\n"
        "require_prepared(cfg, Path(sys.argv[2]))\n"
        "assert len(prepared_index(cfg, Path(sys.argv[2]))[2]) == 30\n"
    )
    assert not modules_loaded(script, str(layout.source), str(roots["data"]), cwd=tmp_path) & COMPUTE_PACKAGES


def test_folder_layouts_and_flowers_read_as_torchvision_reads_them(tmp_path):
    images = caltech101(tmp_path / "raw").source / "caltech101" / "101_ObjectCategories"
    (images / "accordion" / "notes.txt").write_text("not an image")
    _image(images / "ant" / "nested" / "image_0001.PNG", seed=77)
    items, classes = prepare._read_folder(images, images)
    assert classes == find_classes(images)[0]
    expected = make_dataset(images, find_classes(images)[1], extensions=IMG_EXTENSIONS)
    assert [(item.path, item.label) for item in items] == [(Path(path), label) for path, label in expected]
    assert prepare.IMAGE_SUFFIXES == IMG_EXTENSIONS
    assert list(prepare.FLOWERS102_CLASSES) == Flowers102.classes


def test_authors_archive_keeps_their_split_membership(tmp_path, roots, capsys):
    layout = authors_processed(tmp_path / "raw")
    assert main(["prepare-data", "dataset=caltech101", f"source={layout.source}",
                 "source_format=authors_processed"]) == 0
    assert "dataset.source_format=authors_processed" in capsys.readouterr().err
    directory = roots["data"] / "caltech101"
    rows, manifest = _index(directory), _manifest(directory)
    shipped = {}  # (split, file name) -> label, as their labels.csv give them
    for split in prepare.SPLITS:
        with (layout.source / "caltech101" / split / "labels.csv").open() as f:
            shipped |= {(split, row["filename"]): int(row["label"]) for row in csv.DictReader(f)}

    assert {row["sha256"]: row["split"] for row in rows} == layout.official  # exactly theirs, no test_common
    assert {(row["split"], Path(row["path"]).name): int(row["label"]) for row in rows} == shipped
    metadata = json.loads((layout.source / "caltech101" / "metadata.json").read_text())
    assert manifest["counts"] == {split: metadata["splits"][split]["count"] for split in prepare.SPLITS}
    assert manifest["test_pool"] == manifest["counts"]["test"]  # not subsampled
    assert manifest["split_rule"] == {"final_splits": list(prepare.SPLITS)}
    splits = data.load_splits(layout.cfg, roots["data"])
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 6, 9)
    assert splits.class_names == layout.class_names

    default = merged(load_option("dataset", "caltech101"), {"num_classes": CLASSES})
    with pytest.raises(RFTBenchError, match=r"source_format is authors_processed, the config wants "
                                            r"torchvision_caltech101.*prepare-data dataset=caltech101 source=DIR paths.data="):
        prepare.require_prepared(default, roots["data"])
    prepare.prepare(default, caltech101(tmp_path / "raw2").source, roots["data"])
    with pytest.raises(RFTBenchError, match=r"wants authors_processed.*source=DIR source_format=authors_processed"):
        prepare.require_prepared(layout.cfg, roots["data"])


def test_a_damaged_authors_archive_is_refused(tmp_path, roots):
    layout = authors_processed(tmp_path / "raw")
    labels = layout.source / "caltech101" / "val" / "labels.csv"
    labels.write_text(labels.read_text() + "00000.png,7\n")
    with pytest.raises(RFTBenchError, match=r"val/labels\.csv lists 7 images, metadata\.json says 6"):
        prepare.prepare(layout.cfg, layout.source, roots["data"])
    metadata = layout.source / "caltech101" / "metadata.json"
    metadata.write_text(metadata.read_text().replace('"val": {"count": 6}', '"val": {"count": 7}'))
    with pytest.raises(RFTBenchError, match=r"labels \[7\] .* have no class name \(3 classes\)"):
        prepare.prepare(layout.cfg, layout.source, roots["data"])
    assert list(roots["data"].iterdir()) == []


# ---------------------------------------------------------------------------- load


@pytest.fixture
def prepared(tmp_path, roots) -> Layout:
    layout = uc_merced(tmp_path / "raw")
    prepare.prepare(layout.cfg, layout.source, roots["data"])
    return layout


def test_load_splits_items(prepared, roots):
    splits = data.load_splits(prepared.cfg, roots["data"])
    assert splits.num_classes == CLASSES and splits.class_names == prepared.class_names
    counts = _manifest(roots["data"] / "uc_merced")["counts"]
    assert {split: len(getattr(splits, split)) for split in prepare.SPLITS} == counts
    for dataset in (splits.train, splits.val, splits.test):
        x, y = dataset[0]
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
        assert 0 <= x.min() and x.max() <= 1 and x.max() > 0
        assert isinstance(y, int) and 0 <= y < CLASSES

    x, y = data.load_tensors(splits.test)
    assert x.shape == (counts["test"], 3, SIZE, SIZE) and y.dtype == torch.int64
    test_rows = [row for row in _index(roots["data"] / "uc_merced") if row["split"] == "test"]
    assert y.tolist() == [int(row["label"]) for row in test_rows]  # index order


def test_only_train_is_augmented(prepared, roots):
    torch.manual_seed(0)
    splits = data.load_splits(prepared.cfg, roots["data"])
    train_draws = [splits.train[0][0] for _ in range(4)]
    assert any(not torch.equal(train_draws[0], draw) for draw in train_draws[1:])
    for dataset in (splits.val, splits.test):
        assert torch.equal(dataset[0][0], dataset[0][0])
    steps = {type(step): step for step in splits.train.transform.transforms}
    assert steps[v2.ColorJitter].brightness == (0.75, 1.25) and steps[v2.RandomRotation].degrees == [-2.0, 2.0]
    assert v2.RandomHorizontalFlip in steps
    assert v2.RandomHorizontalFlip not in map(type, data._augmentation(load_option("dataset", "digits")["augment"]))
    no_augment = data.load_splits(merged(prepared.cfg, {"augment": {"hflip": False, "color_jitter": 0,
                                                                    "rotation_degrees": 0}}), roots["data"])
    assert torch.equal(no_augment.train[0][0], no_augment.train[0][0])


def test_uncached_loading_matches_cached(prepared, roots, monkeypatch):
    cached = data.load_splits(prepared.cfg, roots["data"])
    monkeypatch.setattr(data, "CACHE_BYTES", 0)
    uncached = data.load_splits(prepared.cfg, roots["data"])
    assert cached.val.cache is not None and uncached.val.cache is None
    assert torch.equal(data.load_tensors(cached.val)[0], data.load_tensors(uncached.val)[0])


def test_decoded_pixels_are_shared_until_the_dataset_is_prepared_anew(prepared, roots):
    first, again = (data.load_splits(prepared.cfg, roots["data"]) for _ in range(2))
    assert again.train.cache is first.train.cache  # the next cell of a local sweep decodes nothing
    image = next((prepared.source / "UCMerced_LandUse" / "Images").rglob("*.tif"))
    Image.fromarray(np.zeros((10, 12, 3), dtype=np.uint8)).save(image)
    prepare.prepare(prepared.cfg, prepared.source, roots["data"])
    anew = data.load_splits(prepared.cfg, roots["data"])
    changed = [int((getattr(anew, split).cache != getattr(first, split).cache).flatten(1).any(1).sum())
               for split in prepare.SPLITS]
    assert sum(changed) == 1  # the image replaced, decoded anew


def test_digits_prepare_themselves(roots):
    cfg = load_option("dataset", "digits")
    splits = data.load_splits(cfg, roots["data"])
    manifest = _manifest(roots["data"] / "digits")
    assert manifest["counts"]["train"] + manifest["counts"]["val"] + manifest["test_pool"] == 1797
    assert manifest["test_pool"] == math.ceil(prepare.TEST_FRACTION * 1797)
    assert len(splits.test) == cfg["test_size"] and splits.class_names == [str(d) for d in range(10)]
    x, y = data.load_tensors(splits.test)
    assert x.shape == (cfg["test_size"], 3, cfg["image_size"], cfg["image_size"])
    assert sorted(set(y.tolist())) == list(range(10))
    assert torch.equal(x[:, 0], x[:, 1])  # grey saved as RGB


def test_native_test_images_resize_to_the_test_tensors(tmp_path, roots):
    images = tmp_path / "raw" / "UCMerced_LandUse" / "Images"
    for label, name in enumerate(["agricultural", "beach", "forest"]):
        (images / name).mkdir(parents=True)
        for i in range(10):  # sizes above and below image_size; grey, palette and RGB files
            rgb = np.random.default_rng(10 * label + i).integers(0, 256, (7 + 3 * i, 30 - 2 * i, 3), dtype=np.uint8)
            Image.fromarray(rgb).convert(("L", "P", "RGB")[i % 3]).save(images / name / f"{name}{i:02d}.png")
    cfg = merged(load_option("dataset", "uc_merced"), {"num_classes": 3, "image_size": SIZE})
    prepare.prepare(cfg, tmp_path / "raw", roots["data"])

    native = data.load_test_native(cfg, roots["data"])
    test_rows = [row for row in _index(roots["data"] / "uc_merced") if row["split"] == "test"]
    assert len(native) == len(test_rows)
    for array, row in zip(native, test_rows):
        with Image.open(roots["data"] / "uc_merced" / row["path"]) as image:
            assert array.dtype == np.uint8 and array.shape == (image.height, image.width, 3)
            if image.mode == "L":
                assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    x, _ = data.load_tensors(data.load_splits(cfg, roots["data"]).test)
    assert torch.equal(data.test_input(native, cfg), x)


# ---------------------------------------------------------------------------- bad state


def test_unknown_dataset_lists_the_closest_first(roots):
    with pytest.raises(RFTBenchError, match=r"unknown dataset 'uc_merce'.*closest first\): uc_merced"):
        data.load_splits({"name": "uc_merce"}, roots["data"])


def test_unprepared_dataset_names_the_fix(tmp_path, roots):
    cfg = load_option("dataset", "caltech101")
    with pytest.raises(RFTBenchError, match=r"not prepared: .*caltech101/manifest\.json.* "
                                            r"rftbench prepare-data dataset=caltech101 source=DIR"):
        data.load_splits(cfg, roots["data"])
    with pytest.raises(RFTBenchError, match=r"data root '.*nowhere' does not exist.*rftbench prepare-data"):
        data.load_splits(cfg, tmp_path / "nowhere")


def _corrupt_counts(directory: Path) -> None:
    manifest = _manifest(directory)
    manifest["counts"]["train"] += 1
    (directory / prepare.MANIFEST).write_text(json.dumps(manifest))


def _delete_an_image(directory: Path) -> None:
    (directory / _index(directory)[0]["path"]).unlink()


def _edit_index(directory: Path) -> None:
    (directory / prepare.INDEX).write_text((directory / prepare.INDEX).read_text().replace(",train,", ",val,", 1))


@pytest.mark.parametrize("corrupt, message", [
    (_corrupt_counts, r"corrupted .* counts .* differ"),
    (_delete_an_image, r"corrupted .* 1 image files are missing"),
    (_edit_index, r"corrupted .* index\.csv's checksum differs"),
    (lambda directory: (directory / prepare.MANIFEST).write_text("{"), r"corrupted .* JSONDecodeError"),
])
def test_corrupted_prepared_data_is_refused(prepared, roots, corrupt, message):
    corrupt(roots["data"] / "uc_merced")
    with pytest.raises(RFTBenchError, match=message + r".*rftbench prepare-data dataset=uc_merced"):
        data.load_splits(prepared.cfg, roots["data"])


def test_data_prepared_under_another_rule_is_refused(prepared, roots):
    with pytest.raises(RFTBenchError, match=r"does not match its config: split_rule"):
        data.load_splits(merged(prepared.cfg, {"split_seed": 7}), roots["data"])
    with pytest.raises(RFTBenchError, match=r"num_classes is 3, the config wants 21"):
        data.load_splits(load_option("dataset", "uc_merced"), roots["data"])


# ---------------------------------------------------------------------------- command line


def test_prepare_data_command(tmp_path, roots, capsys):
    layout = uc_merced(tmp_path / "raw")
    assert main(["prepare-data", "dataset=uc_merced", f"source={layout.source}"]) == 0
    out, err = capsys.readouterr()
    assert "prepared uc_merced (3 classes): train 20, val 4, test 6" in out
    assert "config says uc_merced has 21 classes" in err
    assert (roots["data"] / "uc_merced" / prepare.MANIFEST).is_file()

    elsewhere = tmp_path / "elsewhere"
    assert main(["prepare-data", "dataset=uc_merced", f"source={layout.source}", f"paths.data={elsewhere}"]) == 0
    assert _index(elsewhere / "uc_merced") == _index(roots["data"] / "uc_merced")


@pytest.mark.parametrize("argv, message", [
    (["dataset=uc_merce", "source=x"], "unknown dataset 'uc_merce'"),
    (["source=x"], "needs dataset=NAME"),
    (["dataset=uc_merced", "sauce=x"], "unknown argument 'sauce'.*: source"),
    (["dataset=uc_merced", "source=x", "source_format=authors"],
     "unknown dataset source format 'authors'.*: authors_processed"),
])
def test_prepare_data_command_rejects_bad_words(roots, capsys, argv, message):
    assert main(["prepare-data", *argv]) == 2
    assert re.search(f"rftbench prepare-data: error: .*{message}", capsys.readouterr().err)
    assert list(roots["data"].iterdir()) == []
