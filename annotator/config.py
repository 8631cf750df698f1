"""Frozen, validated settings that travel from the CLI to the engine and into the manifest."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .tasks import Task

DTYPES = ("auto", "float32", "float16", "bfloat16")
ATTENTIONS = ("auto", "sdpa", "flash_attention_2", "eager")
TTA_CHOICES = ("none", "flip")  # run --tta (decode/tta.py)
AUGMENT_CHOICES = ("none", "flip")  # finetune --augment (finetune/data.py)


class ConfigError(ValueError):
    """A bad option: the CLI prints it as a one-line usage error."""


RANDOM_SIZES = ("tiny", "base", "large")  # model.RANDOM_ARCHS; listed here so a typo fails before anything starts


def looks_like_path(name: str) -> bool:
    """./x, ../x, /x, ~/x, C:\\x: a local directory, never a hub id (`org/name`)."""
    return name.startswith((".", "/", "~", "\\")) or (len(name) > 1 and name[1] == ":") or name.count("/") > 1


def check_model_name(name: str) -> None:
    """Reject a --model that cannot load, before any folder is made or model code runs."""
    if not name.strip():
        raise ConfigError("--model is empty")
    if name.startswith("random:"):
        if name.removeprefix("random:") not in RANDOM_SIZES:
            raise ConfigError(f"--model {name}: unknown random model; use one of "
                              + ", ".join("random:" + s for s in RANDOM_SIZES))
    elif looks_like_path(name) and not Path(name).expanduser().is_dir():
        raise ConfigError(f"--model {name}: the directory {Path(name).expanduser().absolute()} does not exist")


@dataclass(frozen=True)
class ModelSpec:
    name: str = "florence-community/Florence-2-large"  # hub id, local dir, or random:<size>
    revision: str | None = None
    dtype: str = "auto"
    attention: str = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def __post_init__(self):
        check_model_name(self.name)
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"--attention must be one of {', '.join(ATTENTIONS)}, not {self.attention!r}")


# Rules of the model's generation config a run may override from the command line (None: the
# checkpoint's own value). Both decode paths read them from the model's config (Engine applies them).
GENERATION_OVERRIDES = ("no_repeat_ngram_size", "repetition_penalty")


@dataclass(frozen=True)
class GenerationSettings:
    num_beams: int = 3
    max_new_tokens: int = 1024
    scores: bool = True  # per-instance confidence from token probabilities (confidence.py)
    # Forced output length per task (bench: equal work on both sides). Empty in real runs.
    min_new_tokens: dict = field(default_factory=dict)
    no_repeat_ngram_size: int | None = None  # --no-repeat-ngram-size (0: off); None: the model's
    repetition_penalty: float | None = None  # --repetition-penalty (1.0: off); None: the model's

    def __post_init__(self):
        if self.num_beams < 1:
            raise ConfigError("--num-beams must be >= 1")
        if self.max_new_tokens < 1:
            raise ConfigError("--max-new-tokens must be >= 1")
        n, p = self.no_repeat_ngram_size, self.repetition_penalty
        if n is not None and n < 0:
            raise ConfigError(f"--no-repeat-ngram-size must be >= 0 (0 turns the rule off), not {n}")
        if p is not None and not (0 < p < math.inf):
            raise ConfigError(f"--repetition-penalty must be a number > 0 (1.0 turns it off, 1.2-1.5 discourage "
                              f"repeats), not {p}")

    def overrides(self) -> dict:
        """The generation-config rules this run sets itself."""
        return {k: getattr(self, k) for k in GENERATION_OVERRIDES if getattr(self, k) is not None}

    def apply(self, generation_config):
        """A copy of a model's generation config with this run's overrides (the config itself when none)."""
        if not self.overrides():
            return generation_config
        config = copy.deepcopy(generation_config)
        for key, value in self.overrides().items():
            setattr(config, key, value)
        return config

    def identity(self) -> dict:
        """For the manifest: an override left unset is left out, so folders written before the
        overrides existed (whose identity lacks them) still resume, and setting one is a change."""
        ident = asdict(self)
        for key in GENERATION_OVERRIDES:
            if ident[key] is None:
                del ident[key]
        return ident


@dataclass(frozen=True)
class TaskInputs:
    """Where the tasks that need text get it from."""

    text: str | None = None
    classes: tuple[str, ...] = ()
    group_classes: bool = False  # one prompt with all classes instead of one prompt per class


@dataclass(frozen=True)
class TileSettings:
    """--tile auto|off|WxH and --tile-overlap (inputs/tiles.py cuts, decode/tiled.py runs, answers/tile_merge.py merges)."""

    mode: str = "off"  # off | auto | fixed
    size: tuple[int, int] | None = None  # fixed: tile width, height in pixels
    overlap: float = 0.2  # fraction of a tile shared with its neighbour

    def __post_init__(self):
        if self.mode not in ("off", "auto", "fixed"):
            raise ConfigError(f"--tile must be auto, off or WxH, not {self.mode!r}")
        if self.mode == "fixed" and (self.size is None or min(self.size) < 16):
            raise ConfigError("--tile WxH needs a tile of at least 16x16 pixels, e.g. --tile 1024x1024")
        if not 0.0 <= self.overlap < 0.5:
            raise ConfigError("--tile-overlap must be in [0, 0.5)")

    @classmethod
    def parse(cls, spec: str, overlap: float = 0.2) -> "TileSettings":
        spec = spec.strip().lower()
        if spec in ("off", "auto"):
            return cls(spec, None, overlap)
        w, sep, h = spec.partition("x")
        if not (sep and w.isdigit() and h.isdigit()):
            raise ConfigError(f"--tile must be auto, off or WxH in pixels (e.g. 1024x1024), not {spec!r}")
        return cls("fixed", (int(w), int(h)), overlap)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


@dataclass(frozen=True)
class RunConfig:
    inputs: tuple[str | Path, ...]  # folders, files, globs, brace patterns, fsspec URLs (sources.py)
    tasks: tuple[Task, ...]
    out: Path = Path("annotations")
    model: ModelSpec = field(default_factory=ModelSpec)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    task_inputs: TaskInputs = field(default_factory=TaskInputs)
    batch_size: int = 8
    workers: int = 2
    limit: int | None = None
    devices: str = "auto"  # auto | cpu | cuda | cuda:0,1 | cpu:0,cpu:1 (see launch.parse_devices)
    flush_every_rows: int = 1000
    flush_every_seconds: float = 60.0
    max_image_pixels: int = 178_956_970  # PIL's own default bomb limit, made explicit and configurable
    follow_symlinks: bool = False
    retry_errors: bool = False
    overwrite: bool = False
    force: bool = False
    progress: bool = True
    tiling: TileSettings = field(default_factory=TileSettings)
    input_lists: tuple[str, ...] = ()  # text/CSV/Parquet files of paths or URLs
    path_column: str | None = None  # the column of a CSV/Parquet list that holds them
    ray: str | None = None  # --ray: `auto` or a cluster address (raydata.py); None: no Ray
    tta: str = "none"  # none | flip: box tasks also run on the mirrored image, answers merged (decode/tta.py)

    def __post_init__(self):
        if self.ray and self.ray != "auto" and Path(self.ray).exists():  # `--ray ./imgs`: click took the folder
            raise ConfigError(f"--ray took {self.ray!r} as the cluster address; write `--ray auto` before INPUTS, "
                              "or put --ray after them")
        if not self.inputs and not self.input_lists:
            raise ConfigError("nothing to annotate: give INPUTS or --input-list")
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be >= 1")
        if self.workers < 0:
            raise ConfigError("--workers must be >= 0")
        if self.limit is not None and self.limit < 0:
            raise ConfigError("--limit must be >= 0")
        if self.tta not in TTA_CHOICES:
            raise ConfigError(f"--tta must be one of {', '.join(TTA_CHOICES)}")
        if self.tta != "none" and self.tiling.enabled:
            raise ConfigError("--tta flip and --tile cannot be combined (yet): give one of them")

    def identity(self) -> dict:
        """What must not change between a run and its resume: same model, same prompts, same decoding."""
        ident = {
            "model": self.model.name,
            "revision": self.model.revision,
            "dtype": self.model.dtype,
            "text": self.task_inputs.text,
            "classes": list(self.task_inputs.classes),
            "group_classes": self.task_inputs.group_classes,
            "generation": self.generation.identity(),
        }
        # None when off: a manifest written before tiling existed lacks the key, which reads as None,
        # so old folders still resume. JSON-shaped (a list, not a tuple) to compare equal after loading.
        t = self.tiling
        ident["tiling"] = {"mode": t.mode, "size": list(t.size) if t.size else None, "overlap": t.overlap} \
            if t.enabled else None
        # None when off, as tiling: a manifest written before --tta lacks the key, which reads as None
        ident["tta"] = self.tta if self.tta != "none" else None
        return ident


PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # annotate finetune --precision


@dataclass(frozen=True)
class FinetuneConfig:
    data: Path
    out: Path
    model: str = "florence-community/Florence-2-large"
    revision: str | None = None
    allow_pickle: bool = False
    # None: from the recipe that fits the data (finetune/recipes.py): localisation or text (DocVQA)
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None  # per process
    grad_accum: int = 1
    warmup: int | None = None  # optimizer steps of linear warmup
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    freeze_vision: bool | None = None
    recipe: str = "auto"  # auto | localisation | text
    augment: str | None = None  # none | flip (mirror box pairs); None: the recipe's
    open_end: bool | None = None  # the final </s> out of the loss (targets that may miss objects); None: the recipe's
    val_fraction: float = 0.1  # only when DATA has no validation split of its own
    devices: str = "auto"
    gradient_checkpointing: bool = False
    precision: str = "auto"  # auto: bf16 (fp16 on GPUs without bf16) autocast on GPU; CPU: bf16 with AMX, else fp32
    resume: Path | None = None
    seed: int = 0
    workers: int = 2
    max_target_tokens: int = 1024  # Florence-2's decoder has 1024 positions
    eval_max_new_tokens: int = 128  # DocVQA similarity: generation limit per answer
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        checks = [
            (self.epochs is None or self.epochs >= 1, "--epochs must be >= 1"),
            (self.lr is None or self.lr > 0, "--lr must be > 0"),
            (self.batch_size is None or self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.grad_accum >= 1, "--grad-accum must be >= 1"),
            (self.warmup is None or self.warmup >= 0, "--warmup must be >= 0"),
            (self.recipe in ("auto", "localisation", "text"), "--recipe must be auto, localisation or text"),
            (self.augment is None or self.augment in AUGMENT_CHOICES, f"--augment must be one of {', '.join(AUGMENT_CHOICES)}"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.max_grad_norm >= 0, "--max-grad-norm must be >= 0"),
            (0 <= self.val_fraction < 1, "--val-fraction must be in [0, 1)"),
            (self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}"),
            (self.workers >= 0, "--workers must be >= 0"),
            (self.max_target_tokens >= 2, "--max-target-tokens must be >= 2"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def settings(self) -> dict:
        """What the model card and finetune.json record."""
        d = asdict(self)
        for k in ("out", "resume", "overwrite", "progress", "workers"):
            d.pop(k)
        d["data"] = str(self.data)
        return d
