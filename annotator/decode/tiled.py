"""The engine over tiles: whole images and their tiles through one stream, truncated answers re-tiled (auto), rows merged per image."""

from __future__ import annotations

import torch

from annotator.answers.tile_merge import merge_row
from annotator.inputs.images import Batch, ImageItem
from annotator.inputs.tiles import SEP, TileBox, TileItem, TilingDataset
from annotator.outdir.table import OK, Annotation
from annotator.tasks import TASKS


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
            self.engine.count("retiled_truncated", len({t.parent for t in more}))
            tiles += more
            rows += self._run(more)
            tiles, rows = self._split_truncated(tiles, rows)
        self.engine.count("tiles", len(tiles))
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
        self.engine.count("tiles_split_truncated", len({k for k, _ in split}))
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
            mine = parts.get((r.image, TASKS[r.task].tile_task), []) if r.task in self.dataset.tileable else []
            out.append(merge_row(r, mine))
        self.engine.count("tiled_rows", sum(r.tiles > 0 for r in out))
        return out
