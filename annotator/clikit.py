"""Small Click helpers shared by every command (one spelling per option, one table of exit codes)."""

from __future__ import annotations

import click

# What every command's exit status means (README, "Exit codes", lists the same table).
EXIT_OK = 0
EXIT_ROW_ERRORS = 1  # finished, but some rows failed (status=error); rerun with --retry-errors
EXIT_USAGE = 2  # nothing done: a bad option or input, a refused output folder, nothing to do
EXIT_CANNOT_START = 3  # the model could not be loaded
EXIT_WORKER_FAILED = 4  # a worker process died; rerun the same command to finish its share
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM; finished rows are saved


class Aliased(click.Option):
    """An option whose later names are old spellings: they still parse, --help shows only the first."""

    def get_help_record(self, ctx):
        opts, self.opts = self.opts, self.opts[:1]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = opts
