"""`annotate convert` as a click command. Apart from convert.py, which imports torch: every
`annotate` command registers it, and `annotate export` must start without torch."""

from __future__ import annotations

from pathlib import Path

from annotator.config import ModelSpec
from annotator.model import ModelLoadError


def convert_command():
    """`annotate convert`, built on demand so that click is imported only by the CLI."""
    import click

    from annotator.clikit import EXIT_CANNOT_START, EXIT_USAGE

    @click.command("convert")
    @click.argument("src")
    @click.argument("out", type=click.Path(path_type=Path, file_okay=False))
    @click.option("--revision", default=None, help="Hub branch, tag or commit of SRC.")
    @click.option("--allow-pickle", is_flag=True, help="Allow pickle (.bin) weights. Only for checkpoints you trust.")
    @click.option("--overwrite", is_flag=True, help="Replace OUT if an earlier `annotate convert` wrote it.")
    def convert(src, out, revision, allow_pickle, overwrite) -> None:
        """Write the native checkpoint of an original-format Florence-2 one (SRC: hub id or folder).

        `--model SRC` converts on the fly (and caches); this keeps or shares the result. No code from
        SRC runs."""
        from annotator.model.convert import OutputRefused, convert_checkpoint  # torch: only when it runs

        try:
            orig = convert_checkpoint(ModelSpec(src, revision, allow_pickle=allow_pickle), out, overwrite)
        except OutputRefused as exc:
            click.echo(f"Error: {exc}", err=True)
            raise SystemExit(EXIT_USAGE)
        except ModelLoadError as exc:  # the source cannot be read or converted
            click.echo(f"Error: {exc}", err=True)
            raise SystemExit(EXIT_CANNOT_START)
        click.echo(f"{src} (revision {orig.revision}) -> {out}: native Florence2ForConditionalGeneration + "
                   f"Florence2Processor; load it with --model {out}")

    return convert
