"""The one task table: CLI name <-> Florence-2 prompt token, what input it takes, what it
answers, and the facts about its answers that the engine, scorer, preview and exporters act on.

Everything else (CLI validation, the engine, the parser, the exporters) looks tasks up here,
so adding a task is one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Input(str, Enum):
    NONE = "none"  # the token alone is the prompt
    TEXT = "text"  # free text: --text, or the image's own caption (grounding)
    CLASSES = "classes"  # open-vocabulary detection: --classes or --text
    REGION = "region"  # a box from an earlier detection task, as four <loc_> tokens


class Output(str, Enum):
    """What one generation answers. Region tasks answer per source box; their rows keep the
    boxes in `bboxes` and put each answer in `labels` (text) or `polygons`."""

    TEXT = "text"  # -> text
    BOXES = "boxes"  # -> bboxes + labels
    POLYGONS = "polygons"  # -> polygons + labels
    QUADS = "quads"  # -> quad_boxes + labels
    BOXES_OR_POLYGONS = "boxes_or_polygons"  # open-vocabulary detection can answer either


class Labels(str, Enum):
    """What the `labels` column holds for a task."""

    NONE = "none"  # no labels: text answers, or class-agnostic boxes (region_proposal)
    CATEGORY = "category"  # category names: --classes filters and maps them, label histograms count them
    PHRASE = "phrase"  # a phrase or short caption per instance (grounding, dense captions, masks)
    TEXT = "text"  # free text read or written about a region: kept out of label histograms


@dataclass(frozen=True)
class Task:
    name: str
    token: str
    input: Input
    output: Output
    description: str
    labels: Labels = Labels.NONE
    is_caption: bool = False  # a whole-image caption: grounding without --text reads it
    empty_phrase: bool = False  # instances may come without a phrase (the parser's allow_empty_phrase)
    answer_repeats_box: bool = False  # region task whose native answer repeats the region's box after the text
    box_export: int = 0  # coco/yolo/review formats export it when --task is not given: 1 first, 2 next, ...; 0 never
    # --tile: the task its tiles run ("" = not tiled). `ocr` tiles run ocr_with_region, because pieces
    # of text can only be put back together in reading order when each comes with its place.
    tile_task: str = ""
    merge_across_labels: bool = False  # tiles' duplicates are found across labels (free-text labels, or none)

    @property
    def is_detection(self) -> bool:
        """Does this task produce boxes that region_* tasks can consume?"""
        return self.output in (Output.BOXES, Output.BOXES_OR_POLYGONS)

    @property
    def mirrorable(self) -> bool:
        """Do its answers, mirrored left to right, answer the mirrored image? Boxes of the whole image
        (od, dense region captions, region proposals): yes. Not OCR (words would read backwards),
        grounding or open vocabulary (a phrase may say "left"), or region tasks (their prompt holds a box)."""
        return self.input is Input.NONE and self.output is Output.BOXES


N, T, C, R = Input.NONE, Input.TEXT, Input.CLASSES, Input.REGION
_TASKS = [
    Task("caption", "<CAPTION>", N, Output.TEXT, "one-sentence caption", is_caption=True),
    Task("detailed_caption", "<DETAILED_CAPTION>", N, Output.TEXT, "a few sentences", is_caption=True),
    Task("more_detailed_caption", "<MORE_DETAILED_CAPTION>", N, Output.TEXT, "a paragraph", is_caption=True),
    Task("od", "<OD>", N, Output.BOXES, "object detection: boxes + category names", Labels.CATEGORY, box_export=1,
         tile_task="od"),
    Task("dense_region_caption", "<DENSE_REGION_CAPTION>", N, Output.BOXES, "boxes + a short caption each",
         Labels.PHRASE, box_export=4, tile_task="dense_region_caption", merge_across_labels=True),
    Task("region_proposal", "<REGION_PROPOSAL>", N, Output.BOXES, "class-agnostic boxes", empty_phrase=True,
         tile_task="region_proposal", merge_across_labels=True),
    Task("ocr", "<OCR>", N, Output.TEXT, "all text in the image", tile_task="ocr_with_region"),
    Task("ocr_with_region", "<OCR_WITH_REGION>", N, Output.QUADS, "text lines with quadrilaterals", Labels.TEXT,
         tile_task="ocr_with_region"),
    Task("caption_to_phrase_grounding", "<CAPTION_TO_PHRASE_GROUNDING>", T, Output.BOXES,
         "boxes for the phrases of --text, or of the image's own caption", Labels.PHRASE, box_export=3,
         tile_task="caption_to_phrase_grounding"),
    Task("open_vocabulary_detection", "<OPEN_VOCABULARY_DETECTION>", C, Output.BOXES_OR_POLYGONS,
         "boxes for each of --classes (or --text)", Labels.CATEGORY, box_export=2,
         tile_task="open_vocabulary_detection"),
    Task("referring_expression_segmentation", "<REFERRING_EXPRESSION_SEGMENTATION>", T, Output.POLYGONS,
         "polygon mask of the object --text describes", Labels.PHRASE, empty_phrase=True),
    Task("region_to_segmentation", "<REGION_TO_SEGMENTATION>", R, Output.POLYGONS,
         "polygon mask for each box of an earlier detection task", Labels.PHRASE, empty_phrase=True, box_export=5),
    Task("region_to_category", "<REGION_TO_CATEGORY>", R, Output.TEXT,
         "category name for each box of an earlier detection task", Labels.CATEGORY, answer_repeats_box=True),
    Task("region_to_description", "<REGION_TO_DESCRIPTION>", R, Output.TEXT,
         "description for each box of an earlier detection task", Labels.TEXT, answer_repeats_box=True),
    Task("region_to_ocr", "<REGION_TO_OCR>", R, Output.TEXT,
         "text inside each box of an earlier detection task", Labels.TEXT),
]

TASKS: dict[str, Task] = {t.name: t for t in _TASKS}
# What `--model demo` (annotator/demo_model) was trained on; other tasks give it meaningless answers.
DEMO_TASKS = ("caption", "od", "caption_to_phrase_grounding", "ocr", "ocr_with_region")
BOX_EXPORT_DEFAULTS: tuple[str, ...] = tuple(t.name for t in sorted((t for t in _TASKS if t.box_export),
                                                                    key=lambda t: t.box_export))
_BY_TOKEN: dict[str, Task] = {t.token: t for t in _TASKS}


class UnknownTask(ValueError):
    pass


def get_task(name_or_token: str) -> Task:
    """Look a task up by CLI name (`od`) or literal token (`<OD>`), case-insensitively."""
    key = name_or_token.strip()
    if key.startswith("<"):
        task = _BY_TOKEN.get(key.upper())
    else:
        task = TASKS.get(key.lower().replace("-", "_"))
    if task is None:
        raise UnknownTask(f"unknown task {name_or_token!r}; `annotate tasks` lists them: {', '.join(TASKS)}")
    return task


def parse_task_list(spec: str) -> list[Task]:
    """`od,ocr` -> [Task(od), Task(ocr)], duplicates removed, order kept."""
    seen: dict[str, Task] = {}
    for part in spec.split(","):
        if part.strip():
            task = get_task(part)
            seen.setdefault(task.name, task)
    if not seen:
        raise UnknownTask("no task given; e.g. --tasks caption,od")
    return list(seen.values())


class PlanError(ValueError):
    """A task lacks the input it needs; raised before any work starts, with the fix."""


def plan_sources(tasks: list[Task], has_text: bool, has_classes: bool) -> dict[str, str]:
    """Which earlier task feeds each task that takes its input from the run itself.

    region_* tasks take the boxes of the first detection task before them; grounding without
    --text takes the image's own caption. Returns {consumer: producer}."""
    sources: dict[str, str] = {}
    for i, task in enumerate(tasks):
        before = tasks[:i]
        if task.input is Input.REGION:
            producer = next((t for t in before if t.is_detection and t.input is not Input.REGION), None)
            if producer is None:
                raise PlanError(f"{task.name} needs boxes from a detection task earlier in --tasks, "
                                f"e.g. --tasks od,{task.name}")
            sources[task.name] = producer.name
        elif task.input is Input.CLASSES and not (has_classes or has_text):
            raise PlanError(f"{task.name} needs what to look for: --classes car,person (or --text 'a red car')")
        elif task.input is Input.TEXT and not has_text:
            producer = next((t for t in before if t.is_caption), None)
            if task.name != "caption_to_phrase_grounding" or producer is None:
                hint = "or put caption before it in --tasks, e.g. --tasks caption,caption_to_phrase_grounding" \
                    if task.name == "caption_to_phrase_grounding" else ""
                raise PlanError(f"{task.name} needs a phrase: --text 'a red car' {hint}".strip())
            sources[task.name] = producer.name
    return sources


def task_waves(tasks: list[Task], sources: dict[str, str]) -> list[list[Task]]:
    """Group tasks that can be generated together: a task joins the wave after its producer's."""
    level: dict[str, int] = {}
    for task in tasks:  # producers come earlier in the list (plan_sources checked it)
        level[task.name] = level[sources[task.name]] + 1 if task.name in sources else 0
    return [[t for t in tasks if level[t.name] == n] for n in range(max(level.values(), default=-1) + 1)]


def engine_tasks(tasks: list[Task], tiling: bool) -> list[Task]:
    """The run's tasks plus, with --tile, the ones its tiles run for them (ocr_with_region for ocr)."""
    names = [t.name for t in tasks]
    extra = [TASKS[t.tile_task] for t in tasks if tiling and t.tile_task and t.tile_task not in names]
    return list(tasks) + list({t.name: t for t in extra}.values())


def tileable(tasks: list[Task], sources: dict[str, str]) -> frozenset[str]:
    """Tasks whose rows can merge tile answers: those with a tile task that read no other task's
    output (grounding on the image's own caption would need a caption per tile)."""
    return frozenset(t.name for t in tasks if t.tile_task and t.name not in sources)
