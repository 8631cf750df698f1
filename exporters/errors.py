"""The one error type of the exporters: the CLI prints its message on one line and exits 1."""

from __future__ import annotations


class ExportError(Exception):
    """A problem with the user's input or options (not a bug): shown as a one-line message."""


class UnsafePath(ExportError):
    """A key or name that would place a file outside the output folder."""
