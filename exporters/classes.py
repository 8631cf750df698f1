"""Class vocabulary for the box formats: normalize free-text labels, map them (with synonyms) to
class ids, or build the vocabulary from the labels seen. Nothing is dropped silently: every label
that maps to no class is counted by the caller."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from exporters.errors import ExportError

_WS = re.compile(r"\s+")
# words whose trailing s is not a plural marker ("bus", "glass", "analysis", "news")
_KEEP_S = ("ss", "us", "is", "news", "series", "species")


# irregular plurals common among detection labels
_IRREGULAR = {"people": "person", "men": "man", "women": "woman", "children": "child", "mice": "mouse",
              "geese": "goose", "feet": "foot", "teeth": "tooth", "knives": "knife", "leaves": "leaf",
              "wolves": "wolf", "shelves": "shelf", "buses": "bus", "oxen": "ox", "sheep": "sheep"}


def singular(word: str) -> str:
    """Simple English plural -> singular on one word (plus a few common irregulars)."""
    w = word
    if w in _IRREGULAR:
        return _IRREGULAR[w]
    if len(w) <= 3 or not w.endswith("s") or w.endswith(_KEEP_S):
        return w
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"  # puppies -> puppy
    if w.endswith(("sses", "xes", "zes", "ches", "shes")):
        return w[:-2]  # glasses -> glass, boxes -> box, benches -> bench
    return w[:-1]  # cars -> car, bicycles -> bicycle


def normalize_label(label: str) -> str:
    """'  Traffic   LIGHTS ' -> 'traffic light': unicode NFKC, lower-cased, whitespace collapsed,
    the last word made singular."""
    s = _WS.sub(" ", unicodedata.normalize("NFKC", label or "")).strip().lower()
    if not s:
        return ""
    head, _, last = s.rpartition(" ")
    last = singular(last)
    return f"{head} {last}" if head else last


@dataclass(frozen=True)
class ClassSpec:
    """Classes as the user gave them: (name, synonyms) in order; ids follow this order."""

    entries: tuple[tuple[str, tuple[str, ...]], ...]


def parse_classes_arg(spec: str) -> ClassSpec:
    """`person,car` -> two classes."""
    names = [p.strip() for p in spec.split(",") if p.strip()]
    if not names:
        raise ExportError("--classes is empty; e.g. --classes person,car")
    return ClassSpec(tuple((n, ()) for n in names))


def parse_classes_file(text: str) -> ClassSpec:
    """One class per line, `#` comments, optional synonyms: `person: man, woman, child`."""
    entries = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, syns = line.partition(":")
        name = name.strip()
        if not name:
            raise ExportError(f"classes file line {lineno}: no class name before ':'")
        entries.append((name, tuple(s.strip() for s in syns.split(",") if s.strip())))
    if not entries:
        raise ExportError("the classes file names no class")
    return ClassSpec(tuple(entries))


@dataclass
class ClassVocab:
    names: list[str]
    lookup: dict[str, int] = field(default_factory=dict)  # normalized label -> class index
    rare: set[str] = field(default_factory=set)  # normalized labels left out by --min-count

    def index(self, label: str) -> int | None:
        return self.lookup.get(normalize_label(label))

    @classmethod
    def from_spec(cls, spec: ClassSpec) -> "ClassVocab":
        names: list[str] = []
        lookup: dict[str, int] = {}
        for name, syns in spec.entries:
            idx = len(names)
            names.append(name)
            for alias in (name, *syns):
                key = normalize_label(alias)
                if key in lookup and lookup[key] != idx:
                    raise ExportError(f"class label {alias!r} maps to both {names[lookup[key]]!r} and {name!r}")
                lookup[key] = idx
        return cls(names, lookup)

    @classmethod
    def from_counts(cls, counts: Counter, min_count: int = 1) -> tuple["ClassVocab", Counter]:
        """Classes = normalized labels seen at least `min_count` times, most frequent first (ties by
        name, so the order is deterministic). Returns the vocabulary and the labels left out."""
        merged: Counter = Counter()
        for label, n in counts.items():
            key = normalize_label(label)
            if key:
                merged[key] += n
        ordered = sorted(merged.items(), key=lambda kv: (-kv[1], kv[0]))
        names = [k for k, n in ordered if n >= min_count]
        rare = Counter({k: n for k, n in ordered if n < min_count})
        return cls(names, {k: i for i, k in enumerate(names)}, set(rare)), rare
