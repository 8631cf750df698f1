"""YOLO export, checked by ultralytics itself: `verify_image_label` accepts every label file and
its YOLODataset loader reads the folder through data.yaml."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest
import yaml

from exporters import run_export
from exporters.options import ExportOptions
from conftest import consumer_import
from export_fixtures import make_run

# class id, cx, cy, w, h (normalized), worked out by hand from export_fixtures.standard_rows:
# names are car 0, cat 1, dog 2, text 3, straßenbahn 4
EXPECTED = {
    # od boxes replaced by the boxes of their region_to_segmentation masks (200x100):
    # (12,12,58,48) and the two-part mask's bounds (100,20,190,90)
    "a/cat.jpg": [(1, 35 / 200, 30 / 100, 46 / 200, 36 / 100), (2, 145 / 200, 55 / 100, 90 / 200, 70 / 100)],
    # 'cats' box (-5,-5,30,40) clipped to the 64x48 image; the zero-width car box dropped
    "b/CAT.png": [(1, 15 / 64, 20 / 48, 30 / 64, 40 / 48)],
    # ocr_with_region quads (300x200) by their bounds
    "doc.png": [(3, 65 / 300, 20 / 200, 110 / 300, 20 / 200), (3, 105 / 300, 162.5 / 200, 190 / 300, 25 / 200)],
    # the retried od row (160x120; the second box clipped to (30,30,160,120)) and the OVD polygon's bounds
    "b/cat.jpg": [(0, 79.5 / 160, 59.5 / 120, 159 / 160, 119 / 120), (0, 95 / 160, 75 / 120, 130 / 160, 90 / 120),
                  (0, 45 / 160, 35 / 120, 70 / 160, 50 / 120)],
    "ü/straße.png": [(4, 37.5 / 80, 30 / 60, 65 / 80, 50 / 60), (2, 5 / 80, 5 / 60, 8 / 80, 8 / 60)],
}


@pytest.fixture(scope="module")
def ultra(tmp_path_factory):
    """ultralytics' data utilities. ultralytics reads torchvision's version at import (for a
    compatibility warning) but its detection data path never imports torchvision; where torchvision
    is not installed (no build of it loads beside this machine's CPU torch), that one metadata
    lookup is answered for the import only."""
    consumer_import("cv2")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("ultralytics-config")))
    os.environ.setdefault("YOLO_OFFLINE", "1")
    real = importlib.metadata.version
    try:
        real("torchvision")
        patched = False
    except importlib.metadata.PackageNotFoundError:
        import torch

        minor = int(torch.__version__.split(".")[1])
        importlib.metadata.version = lambda name: f"0.{min(minor + 15, 29)}.0" if name == "torchvision" else real(name)
        patched = True
    from PIL import Image

    pil_open = Image.open  # ultralytics replaces it process-wide (HEIF support): put it back afterwards
    try:
        consumer_import("ultralytics")
        from ultralytics.data import YOLODataset
        from ultralytics.data.utils import check_det_dataset, verify_image_label
    finally:
        if patched:
            importlib.metadata.version = real
    yield verify_image_label, YOLODataset, check_det_dataset
    Image.open = pil_open


def _pairs(out: Path):
    for split in ("train", "val"):
        for im in sorted((out / "images" / split).iterdir()):
            yield im, out / "labels" / split / (im.stem + ".txt")


@pytest.mark.parametrize("segments", [False, True])
def test_yolo_labels_verified_by_ultralytics(tmp_path, ultra, segments):
    verify_image_label, YOLODataset, check_det_dataset = ultra
    ann, _ = make_run(tmp_path)
    out = tmp_path / "out"
    s = run_export(ann, "yolo", out, ExportOptions(include_ocr=True, segments=segments))
    data = yaml.safe_load((out / "data.yaml").read_text(encoding="utf-8"))
    nc = len(data["names"])
    pairs = list(_pairs(out))
    assert len(pairs) == s.images == 5
    total = 0
    root = (tmp_path / "images").resolve()
    for im, lb in pairs:
        assert im.is_symlink() and lb.exists()
        res = verify_image_label((str(im), str(lb), "", False, nc, 0, 0, False))
        im_file, labels, shape, segs, _, nm, nf, ne, nc_bad, msg = res
        assert nc_bad == 0 and nm == 0, msg
        # the values ultralytics read are the expected ones (in segment mode: the boxes of the polygons)
        key = im.resolve().relative_to(root).as_posix()
        assert labels.tolist() == [pytest.approx(list(e), abs=1e-5) for e in EXPECTED.get(key, [])], key
        if segments:
            assert len(segs) == len(labels)
        total += len(labels)
    assert data["names"] == {0: "car", 1: "cat", 2: "dog", 3: "text", 4: "straßenbahn"}
    assert total == s.instances == 10  # od boxes of a/cat.jpg replaced by their region_to_segmentation masks
    assert s.dropped["box replaced by its mask"] == 2
    # the dataset loader, through data.yaml as `yolo train data=...` reads it
    cfg = check_det_dataset(str(out / "data.yaml"))
    for split in ("train", "val"):
        ds = YOLODataset(img_path=cfg[split], data=cfg, task="segment" if segments else "detect", augment=False,
                         imgsz=64, cache=False, batch_size=2, stride=32)
        assert len(ds) == s.splits[split]
        item = ds[0]
        assert item["img"].shape[0] == 3
    assert sum(len(ds.labels[i]["cls"]) for i in range(len(ds))) <= total


def test_yolo_layout_names_split_and_negatives(tmp_path):
    ann, root = make_run(tmp_path)
    out = tmp_path / "out"
    s = run_export(ann, "yolo", out, ExportOptions(val_fraction=0.5, copy_images=True))
    ims = sorted(p.name for split in ("train", "val") for p in (out / "images" / split).iterdir())
    # same file names in different folders do not collide; stems are unique ignoring case
    assert len({n.rsplit(".", 1)[0].casefold() for n in ims}) == len(ims) == 5
    assert not any((out / "images" / sp / n).is_symlink() for sp in ("train", "val") for n in ims
                   if (out / "images" / sp / n).exists())
    # doc.png has no boxes: an empty label file (a negative)
    docs = list(out.glob("labels/*/doc.txt"))
    assert len(docs) == 1 and docs[0].read_text() == ""
    # the split is a function of the key: a second export puts every image in the same split
    s2 = run_export(ann, "yolo", tmp_path / "out2", ExportOptions(val_fraction=0.5))
    assert sorted(p.name for p in (tmp_path / "out2/images/val").iterdir()) == sorted(p.name for p in (out / "images/val").iterdir())
    assert s2.splits == s.splits
    # --skip-empty leaves doc.png out
    s3 = run_export(ann, "yolo", tmp_path / "out3", ExportOptions(skip_empty=True))
    assert not list((tmp_path / "out3").glob("labels/*/doc.txt")) and s3.dropped["empty images skipped"] == 1
    data = yaml.safe_load((out / "data.yaml").read_text(encoding="utf-8"))
    assert data["path"] == str(out.resolve()) and data["train"] == "images/train" and data["val"] == "images/val"


def test_yolo_missing_image_files_are_counted(tmp_path):
    ann, root = make_run(tmp_path)
    (root / "a" / "cat.jpg").unlink()
    s = run_export(ann, "yolo", tmp_path / "out", ExportOptions())
    assert s.dropped["image file not found"] == 1 and s.images == 4
    # --images points at another copy of the inputs
    other = tmp_path / "elsewhere"
    make_run(other)
    s2 = run_export(ann, "yolo", tmp_path / "out2", ExportOptions(image_roots=(other / "images",)))
    assert s2.images == 5 and not s2.dropped["image file not found"]
