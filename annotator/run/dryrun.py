"""`annotate run --dry-run`: what a run would do, without loading a model or writing anything."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from annotator.config import RunConfig
from annotator.inputs.sources import discover
from annotator.outdir.folder import OutputFolder
from annotator.run.device import no_images_error


@dataclass
class DryRun:
    out: str
    folder: str  # absent | empty | resumable | refused: why
    images: int  # every image found
    pending_images: int
    pending_pairs: int  # (image, task) rows the run would write
    already_done: int  # rows already in the folder for these files
    skipped: dict = field(default_factory=dict)  # reason -> files
    unsupported: dict = field(default_factory=dict)  # extension -> files that are not images
    new_inputs: list = field(default_factory=list)  # "root (keys prefixed b/)" for inputs new to the folder

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        out = [f"would annotate {self.pending_images} of {self.images} images: {self.pending_pairs} rows "
               f"({self.already_done} already done)", f"output folder {self.out}: {self.folder}"]
        out += [f"new input: {s}" for s in self.new_inputs]
        out += [f"skipped {n}: {reason}" for reason, n in self.skipped.items()]
        out += [f"ignored {n} {ext} file(s): not an image type" for ext, n in sorted(self.unsupported.items())]
        return out


def dry_run(cfg: RunConfig) -> DryRun:
    found = discover(list(cfg.inputs), cfg.follow_symlinks)
    if not found.refs:
        raise no_images_error(found)
    folder = OutputFolder(cfg.out)
    would = folder.preview(cfg, found)
    pairs = sum(len(w.tasks) for w in would.work)
    new = [f"{s.root}" + (f" (keys prefixed {s.prefix})" if s.prefix else "") for s in would.new_sources]
    return DryRun(str(cfg.out), folder.state(cfg), would.n_images, len(would.work), pairs, would.already_done,
                  dict(found.skipped), dict(found.unsupported), new)
