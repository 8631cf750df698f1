"""`annotate export`: turns options into ExportOptions, runs the registered exporter, prints a summary."""

from __future__ import annotations

import json
from pathlib import Path

import click

from annotator.clikit import EXIT_USAGE, Aliased
from exporters import EXPORTERS, ExportError, run_export
from exporters.classes import parse_classes_arg, parse_classes_file
from exporters.filtering import FORMAT_DEFAULTS, OTHER_DEFAULT, POLICIES, TRAINING_DEFAULT, ScoreFilter
from exporters.options import ExportOptions

FILTER_HELP = ("How --min-score filters pseudo-labels: " + "; ".join(f"{n}: {p.help}" for n, p in POLICIES.items())
               + f" [default: {TRAINING_DEFAULT} for {' and '.join(sorted(FORMAT_DEFAULTS))} (the measured best, "
               f"README), {OTHER_DEFAULT} for the others].")


@click.command("export")
@click.argument("annotations", default="annotations", type=click.Path(path_type=Path))
@click.option("--format", "fmt", required=True, type=click.Choice(sorted(EXPORTERS), case_sensitive=False),
              help="Output format.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output folder [default: ./export/<format>].")
@click.option("--tasks", "--task", "tasks", cls=Aliased, multiple=True,
              help="Task(s) to export, repeated or comma-separated [default: the format's tasks the run holds].")
@click.option("--classes", help="Class list, e.g. person,car; other labels are dropped and counted.")
@click.option("--classes-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="One class per line, optional synonyms: `person: man, woman, child`.")
@click.option("--min-count", type=click.IntRange(min=1), default=1, show_default=True,
              help="Without --classes: keep labels seen at least this often.")
@click.option("--min-score", type=click.FloatRange(0.0, 1.0), default=None,
              help="Confidence threshold: instances scored below it are uncertain (see --filter).")
@click.option("--filter", "policy", type=click.Choice(sorted(POLICIES)), default=None, help=FILTER_HELP)
@click.option("--low-score", type=click.FloatRange(0.0, 1.0), default=None,
              help="--filter band: below this an instance is noise and dropped alone [default: 0.3, or --min-score if lower].")
@click.option("--max-uncertain", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              help="--filter image: share of an image's instances that may be uncertain before it is dropped.")
@click.option("--val-fraction", type=click.FloatRange(0.0, 1.0), default=0.1, show_default=True,
              help="Share of images in the validation split (by key hash: deterministic).")
@click.option("--copy-images", is_flag=True, help="Copy images instead of symlinking them.")
@click.option("--segments", is_flag=True, help="yolo: write polygons as segmentation lines.")
@click.option("--skip-empty", is_flag=True, help="Leave out images with no instances (default: keep as negatives).")
@click.option("--include-ocr", is_flag=True, help="coco/yolo: add OCR_WITH_REGION lines as class `text`.")
@click.option("--images", "image_roots", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Image root folder(s), if not the run's input folders.")
@click.option("--image-root", default=None,
              help="labelstudio: prefix of each task's data.image, e.g. /data/local-files/?d=photos/ [default: the key].")
@click.option("--config-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="labelstudio: also write the labeling config here (it is always in --out/labeling.xml).")
@click.option("--order", type=click.Choice(["key", "score"]), default="key", show_default=True,
              help="labelstudio: task order; score puts the images with the least confident instance first.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier export in --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def export(annotations, fmt, out, tasks, classes, classes_file, min_count, min_score, policy, low_score, max_uncertain,
           val_fraction, copy_images, segments, skip_empty, include_ocr, image_roots, image_root, config_out, order, overwrite, as_json):
    """Turn the annotation table in ANNOTATIONS [default: ./annotations] into a training set."""
    try:
        if classes and classes_file:
            raise ExportError("give --classes or --classes-file, not both")
        spec = None
        if classes:
            spec = parse_classes_arg(classes)
        elif classes_file:
            spec = parse_classes_file(classes_file.read_text(encoding="utf-8"))
        opts = ExportOptions(
            tasks=tuple(t.strip() for spec_ in tasks for t in spec_.split(",") if t.strip()),
            classes=spec, min_count=min_count, min_score=min_score, val_fraction=val_fraction,
            score_filter=score_filter(policy, min_score, low_score, max_uncertain),
            copy_images=copy_images, segments=segments, skip_empty=skip_empty, include_ocr=include_ocr,
            image_roots=tuple(image_roots), image_root=image_root, config_out=config_out, order=order,
        )
        summary = run_export(annotations, fmt.lower(), out or Path("export") / fmt.lower(), opts, overwrite)
    except ExportError as e:
        click.echo(f"Error: {e}", err=True)
        raise SystemExit(EXIT_USAGE) from None
    if as_json:
        click.echo(json.dumps(summary_dict(summary), indent=2))
        return
    for line in summary.lines():
        click.echo(line)


def score_filter(policy, min_score, low_score, max_uncertain) -> ScoreFilter | None:
    """The CLI's filter flags -> a ScoreFilter (None: the format's default policy)."""
    if policy is None:
        if low_score is not None or max_uncertain:
            raise ExportError("--low-score and --max-uncertain need --filter (band, image)")
        return None
    if low_score is not None and policy != "band":
        raise ExportError("--low-score is for --filter band")
    if max_uncertain and policy != "image":
        raise ExportError("--max-uncertain is for --filter image")
    return ScoreFilter(policy, min_score, low_score, max_uncertain)


def summary_dict(summary) -> dict:
    """The summary as plain JSON types (Counters become objects, the folder a string)."""
    from dataclasses import asdict

    d = asdict(summary)
    d["out"] = str(summary.out)
    def keys(v: dict) -> dict:  # Counters may be keyed by tuples, e.g. (task, label)
        return {"/".join(map(str, k)) if isinstance(k, tuple) else str(k): n for k, n in v.items()}

    return {k: keys(v) if isinstance(v, dict) else v for k, v in d.items()}
