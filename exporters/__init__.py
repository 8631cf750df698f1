"""Export formats for the annotation table. Each format module registers itself with
`@register(name)`; importing this package imports them all."""

from exporters.errors import ExportError
from exporters.registry import EXPORTERS, get_exporter, register
from exporters import coco, cvat, docvqa, florence, labelstudio, yolo  # noqa: F401,E402  (they register themselves)
from exporters.api import run_export  # noqa: E402

__all__ = ["EXPORTERS", "ExportError", "get_exporter", "register", "run_export"]
