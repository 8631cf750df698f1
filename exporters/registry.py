"""One registry of export formats: a format module registers its exporter with `@register("coco")`;
the CLI's --format choices and the dispatch both come from here, so they cannot drift apart."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

from exporters.errors import ExportError

if TYPE_CHECKING:  # pragma: no cover
    from exporters.options import ExportOptions, ExportSummary
    from exporters.read import Run
    from exporters.safety import OutDir


class Exporter(Protocol):
    def __call__(self, run: "Run", out: "OutDir", opts: "ExportOptions") -> "ExportSummary": ...


EXPORTERS: dict[str, Exporter] = {}


def register(name: str) -> Callable[[Exporter], Exporter]:
    def deco(fn: Exporter) -> Exporter:
        if name in EXPORTERS and EXPORTERS[name] is not fn:
            raise ValueError(f"export format {name!r} registered twice")
        EXPORTERS[name] = fn
        return fn

    return deco


def get_exporter(name: str) -> Exporter:
    try:
        return EXPORTERS[name.lower()]
    except KeyError:
        raise ExportError(f"unknown export format {name!r}; known: {', '.join(sorted(EXPORTERS))}") from None
