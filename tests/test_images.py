"""Decoding: EXIF orientation, odd modes to RGB, failures as values."""

import numpy as np
import pytest
from PIL import Image

from annotator.inputs.images import DecodeFailure, ImageDataset, ImageItem, WorkItem, load_rgb
from annotator.inputs.sources import ImageRef, discover


RED, BLUE, GREENISH = (255, 0, 0), (0, 0, 255), (10, 200, 30)


def _close(a, b, tol=40) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


@pytest.mark.parametrize("orientation,red_at", [
    (6, (15, 5)),  # rotate 90 degrees clockwise on display: the top-left corner goes to the top-right
    (8, (5, 35)),  # counter-clockwise: to the bottom-left
    (5, (5, 5)),  # transpose (mirror on the main diagonal): it stays top-left
    (3, (35, 15)),  # 180 degrees: to the bottom-right
])
def test_exif_orientation_is_applied(tmp_path, orientation, red_at):
    """A red top-left corner on blue tells each orientation from the others, not only by size."""
    im = Image.new("RGB", (40, 20), BLUE)
    im.paste(RED, (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rot.jpg"
    im.save(path, exif=exif.tobytes(), quality=95)
    out = load_rgb(path, 10**8)
    assert out.size == ((40, 20) if orientation == 3 else (20, 40))
    corners = [(5, 5), (out.width - 5, 5), (5, out.height - 5), (out.width - 5, out.height - 5)]
    for xy in corners:
        want = RED if xy == red_at else BLUE
        assert _close(out.getpixel(xy), want), (xy, out.getpixel(xy))
    assert red_at in corners


# the colour each mode should come back as, from an RGB image of GREENISH (None: checked otherwise)
GREY = round(0.299 * 10 + 0.587 * 200 + 0.114 * 30)
MODE_COLOUR = {"L": (GREY,) * 3, "LA": (GREY,) * 3, "P": GREENISH, "RGBA": GREENISH, "CMYK": GREENISH,
               "YCbCr": GREENISH, "I;16": None, "I": None, "F": None, "1": None}


@pytest.mark.parametrize("mode", list(MODE_COLOUR))
def test_every_mode_becomes_rgb(tmp_path, mode):
    im = Image.new("RGB", (16, 12), GREENISH).convert(mode) if mode not in ("I;16",) else \
        Image.fromarray(np.arange(16 * 12, dtype=np.uint16).reshape(12, 16) * 300)
    fmt = "TIFF" if mode in ("CMYK", "I;16", "I", "F", "YCbCr") else "PNG"
    if mode in ("YCbCr",):
        fmt = "JPEG"
    path = tmp_path / f"m.{fmt.lower()}"
    im.save(path, fmt)
    out = load_rgb(path, 10**8)
    assert out.mode == "RGB" and out.size == (16, 12)
    colours = {c for _, c in out.getcolors(1000)}
    if MODE_COLOUR[mode] is not None:  # the right colour on average (P: web palette, dithered)
        mean = tuple(np.asarray(out, dtype=np.float64).reshape(-1, 3).mean(0))
        assert _close(mean, MODE_COLOUR[mode], 12), (mean, colours)
    elif mode == "I;16":  # 16-bit is rescaled to the full 8-bit range, not clipped to white
        assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((15, 11)) == (255, 255, 255)
        assert len(colours) > 100
    elif mode == "1":
        assert colours <= {(0, 0, 0), (255, 255, 255)}


def test_cmyk_jpeg_and_palette_colours(tmp_path):
    """CMYK JPEG (Adobe inverted storage) and a palette PNG with exact palette entries keep their colours."""
    cmyk = Image.new("RGB", (16, 16), GREENISH)
    cmyk.paste(RED, (0, 0, 8, 16))
    cmyk.convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    out = load_rgb(tmp_path / "c.jpg", 10**8)
    assert _close(out.getpixel((2, 8)), RED) and _close(out.getpixel((13, 8)), GREENISH)

    pal = Image.new("P", (4, 2), 0)
    pal.putpalette([*RED, *BLUE, *GREENISH] + [0] * (256 - 3) * 3)
    pal.putpixel((1, 0), 1)
    pal.putpixel((2, 1), 2)
    pal.save(tmp_path / "p.png")
    out = load_rgb(tmp_path / "p.png", 10**8)
    assert (out.getpixel((0, 0)), out.getpixel((1, 0)), out.getpixel((2, 1))) == (RED, BLUE, GREENISH)


def test_transparent_pixels_become_white(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(path)
    assert load_rgb(path, 10**8).getpixel((0, 0)) == (255, 255, 255)


def test_first_frame_of_gif(tmp_path):
    """Red first frame, blue last: only the first may come back."""
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, (0, 255, 0), BLUE)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, disposal=1)
    with Image.open(path) as probe:
        assert probe.n_frames == 3  # the file really is animated
    out = load_rgb(path, 10**8)
    assert out.size == (8, 8) and out.getpixel((4, 4)) == RED


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
