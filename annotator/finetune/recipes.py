"""Training schedules that fit the data: `annotate finetune` picks one from what it is given.

The published recipe (shared/seeds/004: lr 1e-6, frozen vision tower, 7 epochs) is for tens of
thousands of DocVQA pairs on a real checkpoint. On a few dozen pseudo-labelled detection images
it changes nothing (README, "The pseudo-label loop": AP50 0.217 -> 0.219), while lr 1e-4 with the
vision tower training moves the model to the shift. So pairs whose targets are mostly locations
(boxes, polygons, OCR quads) get the `localisation` schedule, everything else the published one.
A flag given on the command line always wins over the recipe's value."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from annotator.config import FinetuneConfig
from annotator.model.sequence import LOC_PREFIX

SCHEDULE_FIELDS = ("epochs", "lr", "batch_size", "warmup", "freeze_vision", "augment", "open_end")
# The learning rate summed over the schedule's steps, below which the weights barely move: the DocVQA
# rate over a handful of pseudo-labelled batches (1e-6 x 10 steps, 1e-5) changed nothing (issue 31), and
# so did 2 steps inside a 10-step warmup at 1e-4 (0 + 1e-5: the band policy keeping 8 pairs, README);
# 8 steps inside that warmup (2.8e-4) adapted the model.
MIN_UPDATE = 1e-4


@dataclass(frozen=True)
class Recipe:
    name: str
    epochs: int
    lr: float
    batch_size: int
    warmup: int
    freeze_vision: bool
    augment: str  # finetune/data.py's PairDataset: "flip" mirrors box pairs, image and target together
    open_end: bool  # PairDataset: the final </s> out of the loss (pseudo-labels name some objects, not all)
    why: str


RECIPES = {
    "localisation": Recipe("localisation", epochs=2, lr=1e-4, batch_size=8, warmup=10, freeze_vision=False,
                           augment="flip", open_end=False,
                           why="most targets are locations (pseudo-labelled boxes, masks, OCR regions)"),
    "text": Recipe("text", epochs=7, lr=1e-6, batch_size=6, warmup=0, freeze_vision=True, augment="none", open_end=False,
                   why="text answers (DocVQA-style): the published recipe"),
}
RECIPE_CHOICES = ("auto", *RECIPES)


def choose(targets: list[str], name: str = "auto") -> Recipe:
    """The named recipe, or for 'auto' the one that fits the targets (the majority kind)."""
    if name != "auto":
        return RECIPES[name]
    located = sum(LOC_PREFIX in t for t in targets)
    return RECIPES["localisation" if targets and located * 2 >= len(targets) else "text"]


def apply(cfg: FinetuneConfig, targets: list[str]) -> tuple[FinetuneConfig, Recipe]:
    """The config with every schedule field left unset (None) taken from the recipe."""
    recipe = choose(targets, cfg.recipe)
    filled = {f: getattr(recipe, f) for f in SCHEDULE_FIELDS if getattr(cfg, f) is None}
    return dataclasses.replace(cfg, **filled), recipe


def lr_sum(lr: float, warmup: int, steps: int) -> float:
    """Sum of the learning rate over the run's optimizer steps under the linear warmup-then-decay
    schedule (transformers' get_linear_schedule_with_warmup, which starts at 0): how far AdamW,
    whose step is about lr per weight, can move the weights at most."""
    return sum(lr * (t / warmup if t < warmup else max(0.0, (steps - t) / max(1, steps - warmup)))
               for t in range(steps))


def too_short(cfg: FinetuneConfig, steps: int) -> str | None:
    """A warning when the schedule's summed learning rate is too small to move the model, else None."""
    budget = lr_sum(cfg.lr, cfg.warmup, steps)
    if budget >= MIN_UPDATE:
        return None
    return (f"warning: {steps} optimizer steps at --lr {cfg.lr:g} with --warmup {cfg.warmup} sum to a learning "
            f"rate of {budget:.1e} (< {MIN_UPDATE:g}): this run will barely move the model; give more pairs or "
            f"--epochs, a shorter --warmup or a larger --lr (pseudo-labelled boxes: --recipe localisation)")


def describe(recipe: Recipe, cfg: FinetuneConfig) -> str:
    return (f"recipe {recipe.name} ({recipe.why}): --epochs {cfg.epochs} --lr {cfg.lr:g} --batch-size "
            f"{cfg.batch_size} --warmup {cfg.warmup} --{'' if cfg.freeze_vision else 'no-'}freeze-vision "
            f"--augment {cfg.augment} --{'open' if cfg.open_end else 'closed'}-end")
