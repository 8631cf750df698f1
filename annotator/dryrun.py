"""`annotate run --dry-run`: what a run would do, without loading a model or writing anything."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .config import RunConfig
from .images import WorkItem
from .keys import assign_keys, folder_owners, manifest_sources
from .runner import Summary, no_images_error, pending_work, previous_manifest, settings_refusal
from .sources import discover
from .store import MANIFEST, part_files


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


def folder_state(cfg: RunConfig) -> str:
    if not cfg.out.exists():
        return "absent (would be created)"
    if cfg.overwrite:
        return f"would be emptied (--overwrite): {len(part_files(cfg.out))} part files"
    old = previous_manifest(cfg.out)
    if old is None:
        return "holds no rows" + (" (parts without a manifest: refused)" if part_files(cfg.out) else "")
    refusal = settings_refusal(cfg, old)
    return f"refused: {refusal}" if refusal else f"resumable ({len(part_files(cfg.out))} part files, {MANIFEST} matches)"


def dry_run(cfg: RunConfig) -> DryRun:
    found = discover(list(cfg.inputs), cfg.follow_symlinks)
    if not found.refs:
        raise no_images_error(found)
    gone = cfg.overwrite or not cfg.out.is_dir()
    old = None if gone else previous_manifest(cfg.out)
    known = manifest_sources(old)
    refs, sources = assign_keys(found, known, {} if gone else folder_owners(cfg.out),
                                out=None if gone else cfg.out)
    summary = Summary(skipped=dict(found.skipped))
    if gone:  # nothing is done yet: every image and task
        work = [WorkItem(r, tuple(t.name for t in cfg.tasks)) for r in refs]
        work = work[: cfg.limit] if cfg.limit is not None else work
    else:
        work = pending_work(cfg, refs, summary, write=False)
    pairs = sum(len(w.tasks) for w in work)
    new = [f"{s.root}" + (f" (keys prefixed {s.prefix})" if s.prefix else "") for s in sources[len(known):]]
    return DryRun(str(cfg.out), folder_state(cfg), len(refs), len(work), pairs, summary.already_done,
                  dict(found.skipped), dict(found.unsupported), new)
