"""The one Engine builder: a run's settings -> the engine (with tiling when --tile), used alike by one device, workers, torchrun and Ray actors."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from PIL import Image

from annotator.config import RunConfig
from annotator.decode.engine import Engine
from annotator.decode.tiled import TiledAnnotator
from annotator.decode.tta import FlipAnnotator
from annotator.inputs.images import Batch, ImageDataset, WorkItem
from annotator.inputs.tiles import TilingDataset
from annotator.model.load import LoadedModel
from annotator.outdir.table import Annotation
from annotator.tasks import engine_tasks, tileable


def build_engine(cfg: RunConfig, lm: LoadedModel) -> Engine:
    """The run's tasks plus those its tiles run; prompts per generate call: every task of a batch
    together (see stream.py, BatchStream._advance)."""
    tasks = engine_tasks(list(cfg.tasks), cfg.tiling.enabled)
    return Engine(lm, tasks, cfg.task_inputs, cfg.generation, max_prompts=cfg.batch_size * len(cfg.tasks))


class RunAnnotator:
    """What a run annotates with: its engine, and with --tile the tiles' decode and merge around it.
    Built once per model (process, worker or Ray actor); `dataset` turns work into images for it."""

    def __init__(self, cfg: RunConfig, lm: LoadedModel):
        self.cfg = cfg
        self.lm = lm
        self.engine = build_engine(cfg, lm)
        self.tileable = tileable(self.engine.tasks, self.engine.sources) if cfg.tiling.enabled else frozenset()

    @property
    def runtime(self) -> dict:
        """What this annotator runs with, as the manifest records it: the model's device, dtype and
        attention, and the decode path ("scheduler" or "generate: <why>")."""
        return dict(self.lm.runtime, decoding=self.engine.decoding)

    def dataset(self, work: list[WorkItem], open_image: Callable[[WorkItem], Image.Image] | None = None) -> ImageDataset:
        """The images of `work` as the engine takes them: whole images, and their tiles with --tile."""
        processor, cfg = self.lm.processor.image_processor, self.cfg
        if cfg.tiling.enabled:
            return TilingDataset(work, processor, cfg.max_image_pixels, cfg.tiling, self.tileable, open_image)
        return ImageDataset(work, processor, cfg.max_image_pixels, open_image)

    def annotate_stream(self, dataset: ImageDataset, batches: Iterable[Batch]) -> Iterator[list[Annotation]]:
        """Each batch's rows (see Engine.annotate_stream); tiles are merged back into their image's rows."""
        if isinstance(dataset, TilingDataset):  # tiles are images to the engine; the annotator merges them back
            return TiledAnnotator(self.engine, dataset, vision_batch=self.cfg.batch_size).annotate_stream(batches)
        if self.cfg.tta == "flip":  # box tasks run twice, plain and mirrored, and are merged per image
            return FlipAnnotator(self.engine).annotate_stream(batches)
        return self.engine.annotate_stream(batches)

    def annotate(self, dataset: ImageDataset) -> list[Annotation]:
        """Every item of a small dataset as one batch (a Ray actor's unit of work)."""
        batch = dataset.collate([dataset[i] for i in range(len(dataset))])
        return [row for rows in self.annotate_stream(dataset, [batch]) for row in rows]

    def take_stats(self) -> dict[str, int]:
        return self.engine.take_stats()
