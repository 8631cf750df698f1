"""Tiled inference: large images and dense pages as overlapping tiles, merged back into one row.

Florence-2 sees every image at its input size (768x768) and writes at most max_new_tokens: small
objects vanish in the downscale and a dense page is cut off. Here an image is also cut into
overlapping tiles; each tile is just another image to the engine (same batched vision and
generate calls), and after parsing, the tile answers are mapped to image pixels and merged with
the whole image's answer (tile_merge.py). The whole image always runs too, so large objects stay.

Stages: decode (TilingDataset: whole image + tile crops, in DataLoader workers) -> engine (whole
images and tiles alike) -> TiledAnnotator.merge (one row per image and task, `tiles` = count).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from PIL import Image

from annotator.config import TileSettings
from annotator.inputs.images import Batch, DecodeFailure, ImageDataset, ImageItem, WorkItem, collate
from annotator.outdir.table import OK, Annotation
from annotator.tasks import TASKS, Output, Task
from annotator.answers.parse import bounds
from annotator.answers.tile_merge import Instance, merge, ocr_text

# auto tiles an image whose long side or pixel count is well above the model's input: below
# that, the downscale keeps objects of a few percent of the image, which the model finds.
AUTO_LONG_SIDE = 2.0  # x input side
AUTO_PIXELS = 3.0  # x input side squared
AUTO_MAX_TILES = 16  # auto grows its tiles beyond the input side rather than run more than this
# The task each tileable task runs on tiles: `ocr` runs ocr_with_region there, because pieces of
# text can only be put back together in reading order when each comes with its place.
TILE_TASK = {"od": "od", "dense_region_caption": "dense_region_caption", "region_proposal": "region_proposal",
             "open_vocabulary_detection": "open_vocabulary_detection",
             "caption_to_phrase_grounding": "caption_to_phrase_grounding",
             "ocr_with_region": "ocr_with_region", "ocr": "ocr_with_region"}
# Free-text labels (one caption per box) or none at all: duplicates are found across labels.
LABEL_FREE = {"dense_region_caption", "region_proposal"}
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


def engine_tasks(tasks: list[Task], settings: TileSettings) -> list[Task]:
    """The run's tasks plus the ones tiles run for them (ocr_with_region for ocr)."""
    names = [t.name for t in tasks]
    extra = [TASKS[TILE_TASK[n]] for n in names if settings.enabled and n in TILE_TASK and TILE_TASK[n] not in names]
    return list(tasks) + list({t.name: t for t in extra}.values())


def tileable(tasks: list[Task], sources: dict[str, str]) -> frozenset[str]:
    """Tasks whose rows can merge tile answers: those in TILE_TASK that read no other task's output
    (grounding on the image's own caption would need a caption per tile)."""
    return frozenset(t.name for t in tasks if t.name in TILE_TASK and t.name not in sources)


# --------------------------------------------------------------------------- decode stage
class TilingDataset(ImageDataset):
    """Each sample is the whole image followed by its tiles (crops, processed like images)."""

    def __init__(self, work: list[WorkItem], image_processor, max_pixels: int, settings: TileSettings,
                 tileable_tasks: frozenset[str]):
        super().__init__(work, image_processor, max_pixels)
        self.settings = settings
        self.tileable = tileable_tasks
        self.side = input_side(image_processor)
        self._index: dict[str, int] | None = None

    def __getitem__(self, i: int) -> list:
        image, whole = self.load(i)
        if image is None:
            return [whole]
        return [whole] + self.tiles(image, whole, whole.tasks)

    def tiles(self, image: Image.Image, whole: ImageItem, tasks: tuple[str, ...], force: bool = False) -> list[TileItem]:
        tile_tasks = tuple(dict.fromkeys(TILE_TASK[t] for t in tasks if t in self.tileable))
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


# --------------------------------------------------------------------------- rows <-> instances
def cut_tolerance(tile: TileBox) -> float:
    """How near a tile border an instance edge counts as cut: a few location bins (1/1000 of the
    tile each) of the model's imprecision."""
    return max(2.0, 0.015 * max(tile.width, tile.height))


def row_kind(task: str, rows: list[Annotation]) -> str:
    out = TASKS[task].output
    if out is Output.QUADS:
        return "quads"
    if out is Output.POLYGONS or (out is Output.BOXES_OR_POLYGONS and any(r.polygons for r in rows)):
        return "polygons"
    return "bboxes"


def instances(row: Annotation, kind: str, tile: TileBox | None, tile_id: int, width: int, height: int) -> list[Instance]:
    """A row's instances in image pixels; a tile's mark the sides where they touch its inner borders."""
    if kind == "polygons" and row.polygons is None and row.bboxes:  # open-vocabulary: boxes among polygons
        shapes = [[[b[0], b[1], b[2], b[1], b[2], b[3], b[0], b[3]]] for b in row.bboxes]
    else:
        shapes = {"bboxes": row.bboxes, "polygons": row.polygons, "quads": row.quad_boxes}[kind] or []
    labels = row.labels if row.labels is not None and len(row.labels) == len(shapes) else [""] * len(shapes)
    scores = row.scores if row.scores is not None and len(row.scores) == len(shapes) else [None] * len(shapes)
    inner = tile.inner_sides(width, height) if tile else {}
    tol = cut_tolerance(tile) if tile else 0.0
    out = []
    for shape, label, score in zip(shapes, labels, scores):
        if tile:
            shape = [tile.to_image(p) for p in shape] if kind == "polygons" else tile.to_image(shape)
        box = bounds([v for p in shape for v in p]) if kind == "polygons" else bounds(shape)
        edge = {"left": box[0], "top": box[1], "right": box[2], "bottom": box[3]}
        cut = frozenset(s for s, at in inner.items() if abs(edge[s] - at) <= tol)
        out.append(Instance(box, label, score, shape, cut, frozenset({tile_id}) if tile else frozenset()))
    return out


def merge_row(whole: Annotation, parts: list[tuple[TileBox, Annotation]]) -> Annotation:
    """The whole image's row with its tiles' rows (same task, or ocr_with_region for ocr) merged in."""
    if whole.status != OK or not parts:
        return whole
    failed = next((r for _, r in parts if r.status != OK), None)
    if failed is not None:  # an error row, so that --retry-errors redoes the image
        return Annotation.failed(whole.image, whole.task, f"tile failed: {failed.error}", whole.width, whole.height,
                                 whole.prompt)
    w, h = whole.width, whole.height
    tol = max(cut_tolerance(b) for b, _ in parts)
    row = replace(whole, tiles=len(parts), truncated=any(r.truncated for _, r in parts))
    if whole.task == "ocr":  # text from the tiles' lines, in reading order
        lines = merge([i for n, (b, r) in enumerate(parts) for i in instances(r, "quads", b, n, w, h)], "quads", tol)
        if lines:  # tiles that read nothing keep the whole image's reading
            row.text = ocr_text(lines)
            scores = [ln.score for ln in lines]
            row.text_score = sum(scores) / len(scores) if None not in scores else None
        return row
    kind = row_kind(whole.task, [whole] + [r for _, r in parts])
    found = instances(whole, kind, None, -1, w, h)
    found += [i for n, (b, r) in enumerate(parts) for i in instances(r, kind, b, n, w, h)]
    kept = merge(found, kind, tol, by_label=whole.task not in LABEL_FREE)
    row.bboxes = [i.shape for i in kept] if kind == "bboxes" else None
    row.polygons = [i.shape for i in kept] if kind == "polygons" else None
    row.quad_boxes = [i.shape for i in kept] if kind == "quads" else None
    row.labels = [i.label for i in kept]
    scores = [i.score for i in kept]
    row.scores = scores if whole.scores is not None and None not in scores else None
    return row


# --------------------------------------------------------------------------- engine stage
class TiledAnnotator:
    """Engine.annotate for batches that hold tiles: runs whole images and tiles `vision_batch`
    at a time, tiles (auto) the images whose answer was truncated, and merges per image."""

    def __init__(self, engine, dataset: TilingDataset, vision_batch: int):
        self.engine = engine
        self.dataset = dataset
        self.vision_batch = vision_batch

    def annotate(self, batch: Batch) -> list[Annotation]:
        tiles = [it for it in batch.items if isinstance(it, TileItem)]
        rows = self.engine.annotate(Batch([], None, batch.failures)) + self._run(batch.items)
        whole = [r for r in rows if SEP not in r.image]
        tiled = {t.parent for t in tiles}
        if self.dataset.settings.mode == "auto":
            redo: dict[str, tuple[str, ...]] = {}
            for r in whole:
                if r.status == OK and r.truncated and r.task in self.dataset.tileable and r.image not in tiled:
                    redo[r.image] = redo.get(r.image, ()) + (r.task,)
            more = [t for key, tasks in redo.items() for t in self.dataset.retile(key, tasks)]
            self._count("retiled_truncated", len({t.parent for t in more}))
            tiles += more
            rows += self._run(more)
            tiles, rows = self._split_truncated(tiles, rows)
        self._count("tiles", len(tiles))
        return self.merge(whole, tiles, [r for r in rows if SEP in r.image])

    def annotate_stream(self, batches):
        """As Engine.annotate_stream; tiles of one batch share the engine's stream (see _run)."""
        for batch in batches:
            yield self.annotate(batch)

    def _split_truncated(self, tiles: list[TileItem], rows: list[Annotation]) -> tuple[list[TileItem], list[Annotation]]:
        """auto: a tile whose answer was truncated still held more than the model may write (a
        dense page's piece): its pieces are run and replace its row for that task. Once: a piece
        that is truncated again keeps its truncated row."""
        cut: dict[str, tuple[str, ...]] = {}
        for r in rows:
            if SEP in r.image and r.status == OK and r.truncated:
                cut[r.image] = cut.get(r.image, ()) + (r.task,)
        if not cut:
            return tiles, rows
        pieces = [p for t in tiles if t.key in cut for p in self.dataset.split(t, cut[t.key])]
        split = {(p.key.rsplit(".", 1)[0], task) for p in pieces for task in p.tasks}
        self._count("tiles_split_truncated", len({k for k, _ in split}))
        return tiles + pieces, [r for r in rows if (r.image, r.task) not in split] + self._run(pieces)

    def _run(self, items: list[ImageItem]) -> list[Annotation]:
        """`vision_batch` images at a time through one engine stream: the prompts of the next
        tiles join while long answers of earlier ones still run."""
        chunks = (items[s:s + self.vision_batch] for s in range(0, len(items), self.vision_batch))
        batches = (Batch(chunk, torch.stack([it.pixel_values for it in chunk]), []) for chunk in chunks)
        return [row for rows in self.engine.annotate_stream(batches) for row in rows]

    def merge(self, whole: list[Annotation], tiles: list[TileItem], tile_rows: list[Annotation]) -> list[Annotation]:
        box = {t.key: t for t in tiles}
        parts: dict[tuple[str, str], list[tuple[TileBox, Annotation]]] = {}
        for r in tile_rows:
            parts.setdefault((box[r.image].parent, r.task), []).append((box[r.image].box, r))
        out = []
        for r in whole:
            mine = parts.get((r.image, TILE_TASK[r.task]), []) if r.task in self.dataset.tileable else []
            out.append(merge_row(r, mine))
        self._count("tiled_rows", sum(r.tiles > 0 for r in out))
        return out

    def _count(self, name: str, n: int) -> None:
        if n:
            self.engine.stats[name] = self.engine.stats.get(name, 0) + n
