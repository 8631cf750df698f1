"""Cutting tiles: large images and dense pages as overlapping tiles, each processed like an image.

Florence-2 sees every image at its input size (768x768) and writes at most max_new_tokens: small
objects vanish in the downscale and a dense page is cut off. Here an image is also cut into
overlapping tiles; each tile is just another image to the engine (same batched vision and
generate calls), and after parsing, the tile answers are mapped to image pixels and merged with
the whole image's answer (tile_merge.py). The whole image always runs too, so large objects stay.

Stages: decode (TilingDataset here: whole image + tile crops, in DataLoader workers) -> engine
(whole images and tiles alike; decode/tiled.py) -> merge (answers/tile_merge.py: one row per image
and task, `tiles` = count).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from annotator.config import TileSettings
from annotator.inputs.images import Batch, DecodeFailure, ImageDataset, ImageItem, WorkItem, collate
from annotator.tasks import TASKS

# auto tiles an image whose long side or pixel count is well above the model's input: below
# that, the downscale keeps objects of a few percent of the image, which the model finds.
AUTO_LONG_SIDE = 2.0  # x input side
AUTO_PIXELS = 3.0  # x input side squared
AUTO_MAX_TILES = 16  # auto grows its tiles beyond the input side rather than run more than this
SEP = "\x00"  # tile keys: "<image key>\0tile<n>"; no file name holds a NUL


@dataclass(frozen=True)
class TileBox:
    """A tile's place in the image, in pixels (x1, y1 exclusive)."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def to_image(self, values: list[float]) -> list[float]:
        """x, y, x, y, ... in tile pixels -> image pixels."""
        return [v + (self.x0 if i % 2 == 0 else self.y0) for i, v in enumerate(values)]

    def inner_sides(self, width: int, height: int) -> dict[str, float]:
        """The sides that cut through the image (not its border), with their image coordinate."""
        sides = {"left": self.x0, "top": self.y0, "right": self.x1, "bottom": self.y1}
        inner = {"left": self.x0 > 0, "top": self.y0 > 0, "right": self.x1 < width, "bottom": self.y1 < height}
        return {s: float(v) for s, v in sides.items() if inner[s]}


@dataclass
class TileItem(ImageItem):
    """A tile, to the engine an image like any other (key, size, pixels, tasks)."""

    parent: str = ""
    box: TileBox | None = None


# --------------------------------------------------------------------------- geometry
def axis_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Tile starts along one axis: the fewest tiles overlapping by at least `overlap`, spread evenly."""
    if length <= tile:
        return [0]
    n = math.ceil((length - tile) / (tile * (1 - overlap))) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def tile_grid(width: int, height: int, tile_w: int, tile_h: int, overlap: float) -> list[TileBox]:
    """Row-major tiles covering the image; none when one tile would hold it all."""
    tw, th = min(tile_w, width), min(tile_h, height)
    grid = [TileBox(x, y, x + tw, y + th) for y in axis_starts(height, th, overlap)
            for x in axis_starts(width, tw, overlap)]
    return grid if len(grid) > 1 else []


def needs_tiling(width: int, height: int, input_side: int) -> bool:
    return max(width, height) >= AUTO_LONG_SIDE * input_side or width * height >= AUTO_PIXELS * input_side ** 2


def auto_tile_side(width: int, height: int, input_side: int, overlap: float) -> int:
    """Square tiles of the model's input side, grown until at most AUTO_MAX_TILES are needed.
    An image not much larger than the input (tiled because its answer was truncated) gets two
    tiles along its long side."""
    long = max(width, height)
    if long <= 1.2 * input_side:
        return math.ceil(long / (2 - overlap))
    side = input_side
    while len(tile_grid(width, height, side, side, overlap)) > AUTO_MAX_TILES:
        side = math.ceil(side * 1.25)
    return side


def plan_tiles(width: int, height: int, settings: TileSettings, input_side: int, force: bool = False) -> list[TileBox]:
    """The tiles of one image; `force`: auto tiles it whatever its size (its answer was truncated)."""
    if settings.mode == "fixed":
        return tile_grid(width, height, *settings.size, settings.overlap)
    if settings.mode == "auto" and (force or needs_tiling(width, height, input_side)):
        side = auto_tile_side(width, height, input_side, settings.overlap)
        return tile_grid(width, height, side, side, settings.overlap)
    return []


def input_side(image_processor) -> int:
    """The square side the model sees (768 for Florence-2)."""
    size = getattr(image_processor, "size", None) or {}
    return int(size.get("height") or size.get("shortest_edge") or 768)


# --------------------------------------------------------------------------- decode stage
class TilingDataset(ImageDataset):
    """Each sample is the whole image followed by its tiles (crops, processed like images)."""

    def __init__(self, work: list[WorkItem], image_processor, max_pixels: int, settings: TileSettings,
                 tileable_tasks: frozenset[str], open_image=None):
        super().__init__(work, image_processor, max_pixels, open_image)
        self.settings = settings
        self.tileable = tileable_tasks
        self.side = input_side(image_processor)
        self._index: dict[str, int] | None = None

    @staticmethod
    def collate(samples: list[list]) -> Batch:
        return collate_tiles(samples)

    def __getitem__(self, i: int) -> list:
        image, whole = self.load(i)
        if image is None:
            return [whole]
        return [whole] + self.tiles(image, whole, whole.tasks)

    def tiles(self, image: Image.Image, whole: ImageItem, tasks: tuple[str, ...], force: bool = False) -> list[TileItem]:
        tile_tasks = tuple(dict.fromkeys(TASKS[t].tile_task for t in tasks if t in self.tileable))
        if not tile_tasks:
            return []
        boxes = plan_tiles(whole.width, whole.height, self.settings, self.side, force)
        return [TileItem(f"{whole.key}{SEP}tile{n}", b.width, b.height, self.pixels(image.crop((b.x0, b.y0, b.x1, b.y1))),
                         tile_tasks, parent=whole.key, box=b) for n, b in enumerate(boxes)]

    def retile(self, key: str, tasks: tuple[str, ...]) -> list[TileItem]:
        """Tiles of one image, decoded again in this process (auto: its answer was truncated)."""
        image, whole = self._load(key)
        return self.tiles(image, whole, tasks, force=True) if image is not None else []

    def split(self, tile: TileItem, tasks: tuple[str, ...]) -> list[TileItem]:
        """A tile whose answer was truncated (auto), cut as auto cuts a truncated image (two to
        four overlapping pieces); keys "<tile key>.<n>". The caller splits a tile once only."""
        image, _ = self._load(tile.parent)
        if image is None or tile.box is None:
            return []
        b = tile.box
        side = auto_tile_side(b.width, b.height, self.side, self.settings.overlap)
        pieces = [TileBox(b.x0 + p.x0, b.y0 + p.y0, b.x0 + p.x1, b.y0 + p.y1)
                  for p in tile_grid(b.width, b.height, side, side, self.settings.overlap)]
        return [TileItem(f"{tile.key}.{n}", p.width, p.height, self.pixels(image.crop((p.x0, p.y0, p.x1, p.y1))),
                         tasks, parent=tile.parent, box=p) for n, p in enumerate(pieces)]

    def _load(self, key: str) -> tuple[Image.Image | None, ImageItem | DecodeFailure]:
        if self._index is None:
            self._index = {w.ref.key: i for i, w in enumerate(self.work)}
        return self.load(self._index[key])


def collate_tiles(samples: list[list]) -> Batch:
    return collate([s for sample in samples for s in sample])
