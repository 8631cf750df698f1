"""Decoding: EXIF orientation, odd modes to RGB, failures as values."""

import io

import numpy as np
import pytest
from PIL import Image

from annotator.images import DecodeFailure, ImageDataset, ImageItem, WorkItem, load_rgb
from annotator.sources import ImageRef, discover


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rot.jpg"
    im.save(path, exif=exif.tobytes())
    out = load_rgb(path, 10**8)
    assert out.size == (20, 40)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1", "YCbCr"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    im = Image.new("RGB", (16, 12), (10, 200, 30)).convert(mode) if mode not in ("I;16",) else \
        Image.fromarray(np.arange(16 * 12, dtype=np.uint16).reshape(12, 16) * 300)
    fmt = "TIFF" if mode in ("CMYK", "I;16", "I", "F", "YCbCr") else "PNG"
    if mode in ("YCbCr",):
        fmt = "JPEG"
    path = tmp_path / f"m.{fmt.lower()}"
    im.save(path, fmt)
    out = load_rgb(path, 10**8)
    assert out.mode == "RGB" and out.size == (16, 12)


def test_transparent_pixels_become_white(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(path)
    assert load_rgb(path, 10**8).getpixel((0, 0)) == (255, 255, 255)


def test_first_frame_of_gif(tmp_path):
    frames = [Image.new("P", (8, 8), i) for i in (1, 2)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert load_rgb(path, 10**8).size == (8, 8)


def test_dataset_turns_failures_into_values(tmp_path, tiny_lm):
    good, bad = tmp_path / "good.png", tmp_path / "bad.jpg"
    Image.new("RGB", (30, 20)).save(good)
    bad.write_bytes(b"not an image")
    ds = ImageDataset([WorkItem(ImageRef("good.png", good), ("od",)), WorkItem(ImageRef("bad.jpg", bad), ("od",))],
                      tiny_lm.processor.image_processor, 10**8)
    ok, failed = ds[0], ds[1]
    assert isinstance(ok, ImageItem) and (ok.width, ok.height) == (30, 20) and ok.pixel_values.shape == (3, 64, 64)
    assert isinstance(failed, DecodeFailure) and "UnidentifiedImageError" in failed.error


def test_discover_is_sorted_recursive_and_filters_extensions(tmp_path):
    for rel in ["b/z.JPG", "a.png", "b/a.webp", "notes.txt", "c/d/e.tiff"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    found = discover([tmp_path])
    assert [r.key for r in found.refs] == ["a.png", "b/a.webp", "b/z.JPG", "c/d/e.tiff"]
