"""Robust decode (EXIF orientation, any mode -> RGB, size limits) and the torch Dataset/collate.

Decoding runs inside DataLoader workers; every failure is turned into a DecodeFailure value
so that one bad file becomes error rows instead of stopping the run."""

from __future__ import annotations

import contextlib

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import torch
from PIL import Image, ImageOps

from annotator.inputs.sources import WorkItem, image_source  # WorkItem: re-exported (it lives in sources.py)


@dataclass
class ImageItem:
    key: str
    width: int  # after EXIF orientation: every coordinate refers to this size
    height: int
    pixel_values: torch.Tensor  # [3, H, W], processor-normalised
    tasks: tuple[str, ...]  # tasks still to do for this image


@dataclass
class DecodeFailure:
    key: str
    error: str
    tasks: tuple[str, ...]


@dataclass
class Batch:
    items: list[ImageItem]
    pixel_values: torch.Tensor | None  # [B, 3, H, W] or None when every image failed
    failures: list[DecodeFailure]

    def __len__(self) -> int:
        return len(self.items) + len(self.failures)

    def pin_memory(self) -> "Batch":  # DataLoader calls this when pin_memory=True
        if self.pixel_values is not None:
            self.pixel_values = self.pixel_values.pin_memory()
        return self


@contextlib.contextmanager
def own_pixel_limit():
    """PIL's fixed global bomb limit off while load_rgb applies --max-image-pixels itself (PIL's would
    override a limit the user raised on purpose); restored after, so nothing else in the process
    (exports, previews, a library user's own code) loses PIL's protection."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def load_rgb(source: Path | BinaryIO, max_pixels: int) -> Image.Image:
    """Open, refuse decompression bombs before decoding, apply EXIF orientation, convert to RGB."""
    with own_pixel_limit(), Image.open(source) as im:
        w, h = im.size  # read from the header: nothing decoded yet
        if w * h > max_pixels:
            raise ValueError(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
                             "(raise --max-image-pixels if it is genuine)")
        im.seek(0)  # first frame of animations
        im = ImageOps.exif_transpose(im)
        return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any mode to RGB. Alpha is composited on white (not black, which PIL's convert would give);
    16-bit and float grayscale are rescaled to 8 bits instead of clipped."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


class DecodedElsewhere(Exception):
    """A decode failure already described where the image was read (a Ray decode task): its message is the row's error."""


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, DecodedElsewhere):
        return str(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    # Messages quote file names; a non-UTF-8 name arrives as lone surrogates, which Arrow
    # refuses to store: escape them as \x.. like the image keys.
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ImageDataset(torch.utils.data.Dataset):
    """Work items -> processed images. `open_image` reads one item's image (default: its file or URL,
    decoded here); a Ray actor passes the images its decode task already read."""

    def __init__(self, work: list[WorkItem], image_processor, max_pixels: int,
                 open_image: Callable[[WorkItem], Image.Image] | None = None):
        self.work = work
        self.image_processor = image_processor
        self.max_pixels = max_pixels
        self.open_image = open_image or self.read

    @staticmethod
    def collate(samples: list) -> "Batch":
        return collate(samples)

    def __len__(self) -> int:
        return len(self.work)

    def __getitem__(self, i: int) -> ImageItem | DecodeFailure:
        return self.load(i)[1]

    def load(self, i: int) -> tuple[Image.Image | None, ImageItem | DecodeFailure]:
        """The decoded image too (None on failure): tiling crops it."""
        item = self.work[i]
        try:
            image = self.open_image(item)
            pixels = self.pixels(image)
        except Exception as exc:  # any decode problem is data, not a crash
            return None, DecodeFailure(item.ref.key, describe_error(exc), item.tasks)
        return image, ImageItem(item.ref.key, image.width, image.height, pixels, item.tasks)

    def read(self, item: WorkItem) -> Image.Image:
        return load_rgb(image_source(item.ref), self.max_pixels)  # remote: bytes, retried

    def pixels(self, image: Image.Image) -> torch.Tensor:
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]


def collate(samples: list[ImageItem | DecodeFailure]) -> Batch:
    items = [s for s in samples if isinstance(s, ImageItem)]
    failures = [s for s in samples if isinstance(s, DecodeFailure)]
    pixels = torch.stack([s.pixel_values for s in items]) if items else None
    return Batch(items, pixels, failures)
