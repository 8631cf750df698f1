"""`run_export`: the whole export as one call (the CLI is a thin wrapper around it)."""

from __future__ import annotations

import shutil
from pathlib import Path

from exporters.errors import ExportError
from exporters.options import ExportOptions, ExportSummary
from exporters.read import Run
from exporters.registry import get_exporter
from exporters.safety import OutDir


def run_export(annotations: Path, fmt: str, out: Path, opts: ExportOptions | None = None,
               overwrite: bool = False) -> ExportSummary:
    opts = opts or ExportOptions()
    exporter = get_exporter(fmt)
    run = Run(Path(annotations), list(opts.image_roots) or None)  # bad input fails before --out is touched
    out_dir = OutDir.prepare(Path(out), overwrite)
    try:
        summary = exporter(run, out_dir, opts)
        if not (summary.images or summary.records):  # an empty training set is a mistake, not a success
            why = ", ".join(f"{reason} {n}" for reason, n in sorted(summary.dropped.items()))
            raise ExportError(f"{fmt} export wrote 0 records from {annotations}"
                              + (f" (dropped: {why})" if why else " (no ok rows of its tasks)")
                              + "; check --tasks, --classes, --min-score and --skip-empty")
        return summary
    except BaseException:
        # a failed export leaves no half-written dataset behind (the folder was empty or ours)
        shutil.rmtree(out_dir.root, ignore_errors=True)
        raise
