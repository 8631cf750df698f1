"""`annotate import labelstudio|cvat FILE`: reviewed labels -> ground-truth COCO or Florence-2 pairs."""

from __future__ import annotations

from pathlib import Path

import click

from annotator.clikit import EXIT_USAGE
from exporters.errors import ExportError
from exporters.importers import TARGETS, run_import


def _common(f):
    for opt in reversed([
        click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
                     help="Output folder [default: ./reviewed/<format>]."),
        click.option("--format", "target", type=click.Choice(TARGETS), default="coco", show_default=True,
                     help="coco: ground truth for `annotate eval`; florence: pairs for `annotate finetune`."),
        click.option("--images", "images", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="florence: image root folder(s) holding the keys."),
        click.option("--val-fraction", type=click.FloatRange(0.0, 1.0), default=0.1, show_default=True,
                     help="florence: validation share (the export's key-hash split)."),
        click.option("--copy-images", is_flag=True, help="florence: copy images instead of symlinking them."),
        click.option("--overwrite", is_flag=True, help="Replace an earlier import in --out."),
    ]):
        f = opt(f)
    return f


def _run(source, path, out, target, images, val_fraction, copy_images, overwrite, image_root=None):
    try:
        summary = run_import(source, path, out or Path("reviewed") / target, target, image_root, tuple(images),
                             val_fraction, copy_images, overwrite)
    except ExportError as e:  # a refused --out, an unreadable file: nothing done (README: exit 2)
        click.echo(f"Error: {e}", err=True)
        raise SystemExit(EXIT_USAGE) from None
    for line in summary.lines():
        click.echo(line)


@click.group("import")
def import_group():
    """Bring reviewed labels back: Label Studio or CVAT exports -> COCO ground truth or florence pairs."""


@import_group.command("labelstudio")
@click.argument("export_json", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--image-root", default=None, help="The --image-root of the export, stripped from data.image "
              "when a task has no data.key.")
@_common
def import_labelstudio(export_json, image_root, out, target, images, val_fraction, copy_images, overwrite):
    """Label Studio's JSON export (Export -> JSON) of a reviewed project -> COCO or florence pairs."""
    _run("labelstudio", export_json, out, target, images, val_fraction, copy_images, overwrite, image_root)


@import_group.command("cvat")
@click.argument("annotations_xml", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_common
def import_cvat(annotations_xml, out, target, images, val_fraction, copy_images, overwrite):
    """CVAT's task export in the "CVAT for images 1.1" format (annotations.xml) -> COCO or florence pairs."""
    _run("cvat", annotations_xml, out, target, images, val_fraction, copy_images, overwrite)
