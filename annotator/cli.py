"""The `annotate` command group: turns options into config objects, nothing else."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from . import __version__
from .clikit import EXIT_CANNOT_START, EXIT_INTERRUPTED, Aliased, env_names
from .config import (ConfigError, GenerationSettings, ModelSpec, RunConfig, TaskInputs, TileSettings, DTYPES, ATTENTIONS,
                     AUGMENT_CHOICES, TTA_CHOICES)
from annotator.model import DEMO_NAME, ModelLoadError  # not model.load: it imports torch
from annotator.outdir.folder import RunError
from annotator.inputs.sources import SourceError
from .tasks import DEMO_TASKS, TASKS, PlanError, UnknownTask, parse_task_list, plan_sources

USAGE_ERRORS = (ConfigError, PlanError, UnknownTask, SourceError, RunError)  # exit 2: a refused folder too
START_ERRORS = (ModelLoadError,)


def _fail(message: str, code: int) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "ANNOTATE"})
@click.version_option(__version__, prog_name="annotate")
@click.option("-v", "--verbose", is_flag=True, help="Log more (warnings about skipped files are always shown).")
def cli(verbose: bool) -> None:
    """Annotate image folders with Florence-2 and export training sets."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")


@cli.command("tasks")
def tasks_cmd() -> None:
    """List every task: CLI name, prompt token, input it needs, what it writes."""
    for t in TASKS.values():
        click.echo(f"{t.name:<36}{t.token:<38}input={t.input.value:<8}{t.output.value:<18}{t.description}")
    click.echo(f"\n--model demo (the small model shipped with the package) knows: {', '.join(DEMO_TASKS)}")


def model_options(f):
    for opt in reversed([
        click.option("--model", default="florence-community/Florence-2-large", show_default=True,
                     help="Hub id, local checkpoint dir, demo (the small shipped model, offline), or "
                          "random:tiny|base|large (random weights: meaningless output)."),
        click.option("--revision", default=None, help="Hub branch, tag or commit."),
        click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
                     help="auto: bf16 on GPUs that have it and CPUs with AMX, fp16 on older GPUs, else fp32 "
                          "(FLORENCE_ANNOTATE_AUTO_DTYPE pins it)."),
        click.option("--attention", type=click.Choice(ATTENTIONS), default="auto", show_default=True,
                     help="auto: flash_attention_2 when flash-attn is installed on CUDA, else sdpa."),
        click.option("--allow-pickle", is_flag=True, help="Allow pickle (.bin) weights. Only for checkpoints you trust."),
        click.option("--trust-remote-code", is_flag=True, help="Run a legacy checkpoint's own Python code. Only if you trust it."),
    ]):
        f = opt(f)
    return f


@cli.command("run")
@click.argument("inputs", nargs=-1)
@click.option("--input-list", "input_lists", multiple=True,
              help="A text (one per line), CSV or Parquet file of image paths or URLs (repeatable).")
@click.option("--path-column", default=None, help="The CSV/Parquet column of --input-list that holds them "
              "(default: the only column, else `url`, else `path`).")
@click.option("--tasks", "tasks_spec", default="caption,od", show_default=True,
              help="Comma-separated task names or tokens (`annotate tasks` lists them).")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=Path("annotations"), show_default=True,
              help="Folder for the Parquet parts and manifest.json.")
@model_options
@click.option("--text", default=None, help="Input phrase for grounding / segmentation / open-vocabulary tasks.")
@click.option("--classes", default=None, help="Open-vocabulary detection: comma-separated classes, one prompt each.")
@click.option("--batch-size", default=8, show_default=True, help="Images per batch (and prompts per generate call).")
@click.option("--workers", default=2, show_default=True, help="DataLoader worker processes for decoding.")
@click.option("--num-beams", default=3, show_default=True, help="Beam search width (1 = greedy).")
@click.option("--max-new-tokens", default=1024, show_default=True, help="Generation limit; rows that hit it get truncated=true.")
@click.option("--no-repeat-ngram-size", type=int, default=None,
              help="Override the model's no_repeat_ngram_size (published checkpoints: 3; 0 turns it off).")
@click.option("--repetition-penalty", type=float, default=None,
              help="Override the model's repetition_penalty (1.0: off; e.g. 1.2 discourages repeats).")
@click.option("--no-scores", is_flag=True, help="Skip the per-instance confidence scores (one extra decoder pass).")
@click.option("--devices", default="auto", show_default=True,
              help="auto (every GPU, else cpu), cpu, cuda, cuda:0,1, or cpu:0,cpu:1 (one worker process each).")
@click.option("--limit", type=int, default=None, help="Only the first N pending images (a quick look).")
@click.option("--flush-every", default=1000, show_default=True, help="Write a part file every N rows ...")
@click.option("--flush-seconds", default=60.0, show_default=True, help="... or every N seconds, whichever comes first.")
@click.option("--max-image-pixels", default=178_956_970, show_default=True,
              help="Refuse larger images before decoding (decompression bombs).")
@click.option("--follow-symlinks", is_flag=True, help="Follow symlinks that point outside the input folder.")
@click.option("--retry-errors", is_flag=True, help="Redo the rows that failed in earlier runs.")
@click.option("--overwrite", is_flag=True, help="Delete the earlier parts in --out and start fresh.")
@click.option("--force", is_flag=True, help="Resume even if the model or settings differ from the manifest.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--tile", "tile_spec", default="off", show_default=True,
              help="Tiled inference for large images and dense pages: auto, off, or a tile size WxH in pixels.")
@click.option("--tile-overlap", default=0.2, show_default=True, help="Fraction of a tile shared with its neighbours.")
@click.option("--tta", type=click.Choice(TTA_CHOICES), default="none", show_default=True,
              help="flip: box tasks (od, dense_region_caption, region_proposal) also run on the mirrored image; "
                   "the boxes of both passes are merged (each scored by the better pass). Twice the decoding.")
@click.option("--dry-run", is_flag=True, help="Say what would be done (images, pending rows, skipped files, the "
              "folder's state) without loading a model or writing anything.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="auto", default=None, metavar="[auto|ADDRESS]",
              help="Run on a Ray cluster with Ray Data (auto: the running one, else a local Ray). Needs the [ray] extra.")
def run_cmd(inputs, input_lists, path_column, tasks_spec, out, model, revision, dtype, attention, allow_pickle,
            trust_remote_code, text, classes, batch_size, workers, num_beams, max_new_tokens, no_repeat_ngram_size,
            repetition_penalty, no_scores, devices, limit,
            flush_every, flush_seconds, max_image_pixels, follow_symlinks, retry_errors, overwrite, force, no_progress,
            tile_spec, tile_overlap, tta, dry_run, as_json, ray_address) -> None:
    """Annotate images: one Parquet row per image and task.

    INPUTS are folders (searched recursively), image files, globs, tar shards (`shard-{00000..00099}.tar`),
    or any of these as fsspec URLs (s3://, gs://, https://, ...)."""
    try:
        tasks = parse_task_list(tasks_spec)
        plan_sources(tasks, bool(text), bool(classes))
        unknown = [t.name for t in tasks if t.name not in DEMO_TASKS]
        if model == DEMO_NAME and unknown:
            click.echo(f"warning: the demo model was not trained on {', '.join(unknown)}: expect meaningless answers "
                       f"(it knows {', '.join(DEMO_TASKS)})", err=True)
        cfg = RunConfig(
            inputs=tuple(inputs), tasks=tuple(tasks), out=out,
            model=ModelSpec(model, revision, dtype, attention, allow_pickle, trust_remote_code),
            generation=GenerationSettings(num_beams=num_beams, max_new_tokens=max_new_tokens, scores=not no_scores,
                                          no_repeat_ngram_size=no_repeat_ngram_size,
                                          repetition_penalty=repetition_penalty),
            task_inputs=TaskInputs(text=text, classes=_csv(classes)),
            batch_size=batch_size, workers=workers, limit=limit, devices=devices,
            flush_every_rows=flush_every, flush_every_seconds=flush_seconds, max_image_pixels=max_image_pixels,
            follow_symlinks=follow_symlinks, retry_errors=retry_errors, overwrite=overwrite, force=force,
            progress=not no_progress and not as_json, tiling=TileSettings.parse(tile_spec, tile_overlap),
            input_lists=input_lists, path_column=path_column, ray=ray_address, tta=tta,
        )
        if dry_run:
            from annotator.run.dryrun import dry_run as plan_only

            _report(plan_only(cfg), as_json)
            return
    except USAGE_ERRORS as exc:
        _fail(str(exc), 2)
    from annotator.run.launch import launch  # heavy imports (torch, transformers) only once the flags are sound
    from annotator.run.signals import exit_now, stop_on_signals

    try:
        with stop_on_signals(EXIT_INTERRUPTED):  # SIGTERM stops as cleanly as Ctrl-C; a second one at once
            summary = launch(cfg)
    except USAGE_ERRORS as exc:
        _fail(str(exc), 2)
    except START_ERRORS as exc:
        _fail(str(exc), EXIT_CANNOT_START)
    except KeyboardInterrupt:
        click.echo("interrupted: finished rows are saved; run the same command again to resume", err=True)
        exit_now(EXIT_INTERRUPTED)
    _report(summary, as_json)
    sys.exit(summary.exit_code())


def _report(summary, as_json: bool) -> None:
    """A summary as text lines, or with --json as one JSON object (`to_dict`)."""
    import json

    click.echo(json.dumps(summary.to_dict(), indent=2) if as_json else "\n".join(summary.lines()))


@cli.command("info")
@click.argument("annotations", type=click.Path(path_type=Path, file_okay=False), default=Path("annotations"))
@click.option("--top", default=10, show_default=True, help="How many errors and labels to list.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def info_cmd(annotations: Path, top: int, as_json: bool) -> None:
    """Summarize a run folder: images, rows by task and status, errors, labels, completeness."""
    import json

    from annotator.readback.info import InfoError, summarize

    try:
        info = summarize(annotations, top=top)
    except InfoError as exc:
        _fail(str(exc), 2)
    click.echo(json.dumps(info.to_dict(), indent=2) if as_json else "\n".join(info.lines()))


@cli.command("preview")
@click.argument("annotations", type=click.Path(path_type=Path, file_okay=False), default=Path("annotations"))
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=Path("preview"), show_default=True,
              help="Folder for index.html, the drawn images and one page per image.")
@click.option("--tasks", "--task", "task_spec", cls=Aliased, default=None,
              help="Only these tasks (comma-separated), e.g. od.")
@click.option("--limit", default=200, show_default=True, help="How many images to draw.")
@click.option("--sample", type=click.Choice(["random", "first", "errors", "low-score"]), default="random",
              show_default=True, help="Which images: a random sample, the first by key, those with error rows, "
              "or the lowest-scored first.")
@click.option("--seed", default=0, show_default=True, help="Seed of --sample random.")
@click.option("--images", "image_roots", multiple=True, type=click.Path(path_type=Path, file_okay=False),
              help="Where the images are, if not at the manifest's inputs (repeatable).")
@click.option("--max-size", default=1600, show_default=True, help="Longer side of the full-size drawings, in pixels.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier preview in --out.")
def preview_cmd(annotations, out, task_spec, limit, sample, seed, image_roots, max_size, overwrite) -> None:
    """Draw annotations on their images and write a static HTML gallery (OUT/index.html)."""
    from annotator.readback.preview import PreviewError, preview

    try:
        tasks = [t.name for t in parse_task_list(task_spec)] if task_spec else None
        result = preview(annotations, out, tasks=tasks, limit=limit, sample=sample, seed=seed,
                         images=list(image_roots) or None, max_size=max_size, overwrite=overwrite)
    except (PreviewError, UnknownTask) as exc:
        _fail(str(exc), 2)
    for line in result.lines():
        click.echo(line)


@cli.command("finetune")
@click.argument("data", type=click.Path(path_type=Path, exists=True))
@click.option("--model", default="florence-community/Florence-2-large", show_default=True,
              help="Starting weights: hub id, local checkpoint dir, or random:tiny|base|large.")
@click.option("--revision", default=None, help="Hub branch, tag or commit.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickle (.bin) weights. Only for checkpoints you trust.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Checkpoint folder: the best epoch at the top (annotate run --model OUT), epoch-<n>/ inside.")
@click.option("--recipe", type=click.Choice(["auto", "localisation", "text"]), default="auto", show_default=True,
              help="Schedule defaults: localisation (pseudo-labelled boxes, masks, OCR regions: --epochs 2 --lr 1e-4 "
                   "--batch-size 8 --warmup 10 --no-freeze-vision), text (DocVQA-style answers: --epochs 7 "
                   "--lr 1e-6 --batch-size 6 --warmup 0 --freeze-vision); auto: the one most targets fit. "
                   "A flag given below wins over the recipe.")
@click.option("--epochs", type=int, default=None, help="[default: the recipe's]")
@click.option("--lr", type=float, default=None, help="AdamW learning rate (linear decay to 0) [default: the recipe's].")
@click.option("--batch-size", type=int, default=None, help="Pairs per batch and process [default: the recipe's].")
@click.option("--grad-accum", default=1, show_default=True, help="Batches per optimizer step.")
@click.option("--warmup", type=int, default=None, help="Optimizer steps of linear warmup [default: the recipe's].")
@click.option("--weight-decay", default=0.0, show_default=True)
@click.option("--max-grad-norm", default=1.0, show_default=True, help="Gradient clipping (0: off).")
@click.option("--freeze-vision/--no-freeze-vision", default=None,
              help="Freeze the DaViT vision tower (the projector and language model train) [default: the recipe's].")
@click.option("--augment", type=click.Choice(AUGMENT_CHOICES), default=None,
              help="flip: each epoch, mirror about half the box pairs left to right, image and boxes together "
                   "(repeatable under --seed) [default: the recipe's: flip for localisation, none for text].")
@click.option("--open-end/--closed-end", default=None,
              help="open: the target's final </s> is not in the loss, for targets that may miss objects "
                   "(pseudo-labels) [default: the recipe's].")
@click.option("--val-fraction", default=0.1, show_default=True,
              help="Images held out for validation when DATA has no validation split.")
@click.option("--devices", default="auto", show_default=True,
              help="auto, cpu, cuda, cuda:0,1 (one DDP process each), or cpu:0,cpu:1. Under torchrun: its ranks.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in backward: less memory, slower.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto: bf16 autocast on GPUs that have it, else fp16; on CPU bf16 where --dtype auto picks it (AMX), else fp32.")
@click.option("--resume", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Go on from a checkpoint folder (its newest epoch) or an epoch-<n> folder.")
@click.option("--seed", default=0, show_default=True)
@click.option("--workers", default=2, show_default=True, help="DataLoader worker processes.")
@click.option("--max-target-tokens", default=1024, show_default=True,
              help="Longest target; longer ones lose their last whole instances (counted, never half a box).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier `annotate finetune` checkpoint in --out.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def finetune_cmd(data, model, revision, allow_pickle, out, recipe, epochs, lr, batch_size, grad_accum, warmup, weight_decay,
                 max_grad_norm, freeze_vision, augment, open_end, val_fraction, devices, gradient_checkpointing, precision,
                 resume, seed, workers, max_target_tokens, overwrite, no_progress) -> None:
    """Fine-tune Florence-2 on an `annotate export` (florence JSONL or docvqa Parquet) folder."""
    try:
        from .finetune import FinetuneConfig

        cfg = FinetuneConfig(
            data=data, out=out, model=model, revision=revision, allow_pickle=allow_pickle, recipe=recipe,
            epochs=epochs, lr=lr,
            batch_size=batch_size, grad_accum=grad_accum, warmup=warmup, weight_decay=weight_decay,
            max_grad_norm=max_grad_norm, freeze_vision=freeze_vision, augment=augment, open_end=open_end,
            val_fraction=val_fraction, devices=devices,
            gradient_checkpointing=gradient_checkpointing, precision=precision, resume=resume, seed=seed,
            workers=workers, max_target_tokens=max_target_tokens, overwrite=overwrite, progress=not no_progress,
        )
    except ConfigError as exc:
        _fail(str(exc), 2)
    from .finetune import FinetuneError, finetune

    try:
        result = finetune(cfg)
    except (ConfigError, FinetuneError) as exc:
        _fail(str(exc), 2)
    except ModelLoadError as exc:
        _fail(str(exc), EXIT_CANNOT_START)
    except KeyboardInterrupt:
        click.echo("interrupted: finished epochs are saved; go on with --resume", err=True)
        sys.exit(EXIT_INTERRUPTED)
    for line in result.lines() if result.owner else []:  # under torchrun, rank 0 reports
        click.echo(line)


@cli.command("eval")
@click.argument("prediction", type=click.Path(path_type=Path, exists=True), default=Path("export/coco"))
@click.option("--gt", "gt", type=click.Path(path_type=Path, exists=True, dir_okay=False), required=True,
              help="Ground-truth COCO JSON.")
@click.option("--iou", type=click.FloatRange(0.05, 0.95), default=None,
              help="Evaluate at this IoU only (default: COCO's 0.50:0.95).")
@click.option("--segm", is_flag=True, help="Evaluate masks instead of boxes.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def eval_cmd(prediction: Path, gt: Path, iou: float | None, segm: bool, as_json: bool) -> None:
    """mAP of a COCO export (PREDICTION: its folder or annotations.json) against ground truth."""
    import json

    from annotator.readback.coco_eval import EvalError, evaluate, json_ready

    try:
        report = evaluate(prediction, gt, iou=iou, iou_type="segm" if segm else "bbox")
    except EvalError as exc:
        _fail(str(exc), 2)
    click.echo(json.dumps(json_ready(report), indent=2) if as_json else "\n".join(report.lines()))


@cli.command("samples")
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.option("--n", default=50, show_default=True, type=click.IntRange(1), help="How many images.")
@click.option("--seed", default=0, show_default=True, help="Same seed, same files.")
@click.option("--kind", type=click.Choice(["scenes", "documents", "mixed", "pages"]), default="mixed", show_default=True,
              help="Coloured shapes, pages of text, or both; pages: long dense pages (for tiling).")
def samples_cmd(out: Path, n: int, seed: int, kind: str) -> None:
    """Draw synthetic images with their ground truth (the demo model's world): OUT/*.png,
    OUT/ground_truth.json (COCO) and OUT/texts.jsonl (caption, ocr, ocr_regions)."""
    from annotator.demo.world import write

    counts = write(out, n=n, seed=seed, kind=kind)
    click.echo(f"samples: wrote {counts['images']} images, {counts['objects']} objects, "
               f"{counts['text_lines']} text lines -> {out}")


def _register_optional() -> None:
    """Commands that live in other packages join the group here."""
    from annotator.bench.run import bench  # light: torch is imported when it runs

    cli.add_command(bench)
    from annotator.model.convert_cli import convert_command

    cli.add_command(convert_command())
    try:
        from exporters.cli import export
    except ImportError:  # exporters not built yet
        return
    cli.add_command(export)
    from exporters.import_cli import import_group

    cli.add_command(import_group)


_register_optional()
env_names(cli)


def main() -> None:
    cli()  # ANNOTATE_<COMMAND>_<OPTION> environment defaults: the group's auto_envvar_prefix
