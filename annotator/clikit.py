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


def env_names(group: click.Group, prefix: str = "ANNOTATE") -> None:
    """Every option reads a default from ANNOTATE_<COMMAND>_<OPTION>, spelled as on the command line
    (ANNOTATE_RUN_TASKS, ANNOTATE_EXPORT_MIN_SCORE), so cluster jobs set them once. Click's own
    auto_envvar_prefix would name them after the Python parameter (ANNOTATE_RUN_TASKS_SPEC)."""

    def name(opt: click.Option) -> str:
        return max((o for o in opt.opts if o.startswith("--")), key=len, default=opt.opts[0]).lstrip("-")

    for param in group.params:
        if isinstance(param, click.Option) and param.envvar is None:
            param.envvar = f"{prefix}_{name(param)}".upper().replace("-", "_")
    for cmd_name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):  # `import labelstudio`: ANNOTATE_IMPORT_LABELSTUDIO_<OPTION>
            env_names(cmd, f"{prefix}_{cmd_name}")
            continue
        for param in cmd.params:
            if isinstance(param, click.Option) and param.envvar is None and param.opts[0] not in ("--help", "-h"):
                param.envvar = f"{prefix}_{cmd_name}_{name(param)}".upper().replace("-", "_")
