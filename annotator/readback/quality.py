"""How good a model's annotations are on a folder written by `annotate samples`, measured through the
tool's own path: `annotate run` -> Parquet -> `annotate export --format coco` -> pycocotools.

    python -m annotator.readback.quality --model demo --n 100 --seed 1000

It answers the questions a user of pseudo-labels asks: are the boxes right (COCO AP, AP50, small
objects), do the scores rank right above wrong (AP with the scores vs with every score 1.0, the
precision of what --min-score keeps, a calibration table), and is the text right (OCR character
error rate, caption exact match)."""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from dataclasses import astuple, dataclass, field
from pathlib import Path

import polars as pl

THRESHOLDS = (0.3, 0.5, 0.7)
QUALITY_HEADING = "## Quality on held-out samples"
BINS = (0.0, 0.3, 0.5, 0.7, 0.9, 1.01)


@dataclass
class Quality:
    od: dict[str, float] = field(default_factory=dict)  # AP, AP50, AP_small, ... with the model's scores
    od_scores_one: dict[str, float] = field(default_factory=dict)  # the same with every score set to 1.0
    od_any_class: dict[str, float] = field(default_factory=dict)  # every label the same: are the boxes right?
    precision: dict[float, dict[str, float]] = field(default_factory=dict)  # min score -> precision, recall, kept
    calibration: list[dict] = field(default_factory=list)  # score bin -> boxes, share matched at IoU 0.5
    ocr_cer: float | None = None
    ocr_lines: dict[str, float] = field(default_factory=dict)  # ocr_with_region: lines, share boxed, read exactly, line CER
    caption_exact: float | None = None
    images: int = 0

    def lines(self) -> list[str]:
        out = [f"images: {self.images}"]
        if self.od:
            out.append("od: " + ", ".join(f"{k} {self.od[k]:.3f}" for k in ("AP", "AP50", "AP_small", "AP_medium", "AP_large")))
            out.append("od, every score 1.0: " + ", ".join(f"{k} {self.od_scores_one[k]:.3f}" for k in ("AP", "AP50")))
            out.append("od, labels ignored: " + ", ".join(f"{k} {self.od_any_class[k]:.3f}" for k in ("AP", "AP50")))
            for t, p in self.precision.items():
                out.append(f"--min-score {t}: precision {p['precision']:.3f}, recall {p['recall']:.3f}, boxes kept {p['kept']}")
            out.append("calibration (score bin: boxes, share matching a ground-truth box at IoU 0.5):")
            out += [f"  {c['bin']}: {c['boxes']}, {c['matched']:.3f}" for c in self.calibration]
        if self.ocr_cer is not None:
            out.append(f"ocr: character error rate {self.ocr_cer:.3f} (whitespace runs folded)")
        if self.ocr_lines:
            out.append(f"ocr_with_region: {self.ocr_lines['lines']} lines, boxed at IoU 0.5 {self.ocr_lines['boxed']:.3f}, "
                       f"boxed and read exactly {self.ocr_lines['exact']:.3f}, line CER {self.ocr_lines['cer']:.3f}")
        if self.caption_exact is not None:
            out.append(f"caption: exact match {self.caption_exact:.3f}")
        return out

    def to_json(self) -> dict:
        d = self.__dict__.copy()
        d["precision"] = {str(k): v for k, v in self.precision.items()}
        return d


def box_quality(pred_path: Path, gt_path: Path, q: Quality) -> None:
    from annotator.readback.coco_eval import evaluate_data

    pred, gt = json.loads(pred_path.read_text()), json.loads(gt_path.read_text())
    report = evaluate_data(pred, gt, thresholds=())
    q.od = report.stats
    q.od_scores_one = evaluate_data(dict(pred, annotations=[dict(a, score=1.0) for a in pred["annotations"]]), gt,
                                    thresholds=()).stats
    one = [{"id": 1, "name": "object"}]  # every label the same: are the boxes right?
    q.od_any_class = evaluate_data(*(dict(d, categories=one, annotations=[dict(a, category_id=1) for a in d["annotations"]])
                                     for d in (pred, gt)), thresholds=()).stats
    matched = report.matches  # (score, right) per box at IoU 0.5, as COCOeval matched them
    n_gt = len(gt["annotations"])
    for t in THRESHOLDS:
        kept = [ok for s, ok in matched if s >= t]
        q.precision[t] = {"precision": sum(kept) / max(1, len(kept)), "recall": sum(kept) / max(1, n_gt), "kept": len(kept)}
    for lo, hi in zip(BINS, BINS[1:]):
        inside = [ok for s, ok in matched if lo <= s < hi]
        q.calibration.append({"bin": f"{lo:.1f}-{min(hi, 1.0):.1f}", "boxes": len(inside),
                              "matched": sum(inside) / len(inside) if inside else float("nan")})


def fold(text: str | None) -> str:
    """Text as OCR is scored: whitespace runs folded to one space (line breaks and spacing are layout,
    not reading errors)."""
    return " ".join((text or "").split())


def text_errors(read: str | None, truth: str) -> tuple[int, int]:
    """(edit distance, reference characters) of a reading against the truth: the character error rate's parts."""
    from annotator.finetune import levenshtein

    return levenshtein(fold(read), fold(truth)), len(fold(truth))


@dataclass
class LineScore:
    """`ocr_with_region` against a page's true lines, matched one to one, greedily by IoU >= 0.5."""
    lines: int = 0  # true lines
    boxed: int = 0  # of them, matched by a quad
    exact: int = 0  # of those, read exactly
    errors: int = 0  # edit distance of matched pairs + the characters of missed and of invented lines
    chars: int = 0  # characters of the true lines

    def __add__(self, other: "LineScore") -> "LineScore":
        return LineScore(*(a + b for a, b in zip(astuple(self), astuple(other))))


def score_lines(row: dict, regions: list) -> LineScore:
    """`row`'s quads and labels against `regions` ([[8 coords], text] per true line, as texts.jsonl has them)."""
    from annotator.answers.parse import bounds, iou

    read = [(bounds(q), fold(t)) for q, t in zip(row.get("quad_boxes") or [], row.get("labels") or [])]
    truth = [(bounds(q), fold(t)) for q, t in regions]
    pairs = sorted(((iou(g[0], r[0]), i, j) for i, g in enumerate(truth) for j, r in enumerate(read)), reverse=True)
    used_t, used_r, score = set(), set(), LineScore(lines=len(truth), chars=sum(len(t) for _, t in truth))
    for overlap, i, j in pairs:
        if overlap >= 0.5 and i not in used_t and j not in used_r:
            used_t.add(i), used_r.add(j)
            score.errors += text_errors(read[j][1], truth[i][1])[0]
            score.exact += read[j][1] == truth[i][1]
    score.boxed = len(used_t)
    score.errors += sum(len(t) for i, (_, t) in enumerate(truth) if i not in used_t)
    score.errors += sum(len(t) for j, (_, t) in enumerate(read) if j not in used_r)
    return score


def text_quality(annotations: Path, texts_path: Path, q: Quality) -> None:
    from annotator.outdir.table import part_files

    truth = {t["image"]: t for t in map(json.loads, texts_path.read_text().splitlines())}
    rows = pl.read_parquet([str(p) for p in part_files(annotations)])  # an error row reads nothing: all its text missed
    errors = chars = exact = captions = 0
    lines = LineScore()
    for r in rows.select("image", "task", "text", "labels", "quad_boxes").iter_rows(named=True):
        t = truth.get(Path(r["image"]).name)
        if t is None:
            continue
        if r["task"] == "ocr_with_region":
            lines += score_lines(r, t["ocr_regions"])
        elif r["task"] == "ocr" and t["ocr"]:
            errors, chars = (a + b for a, b in zip((errors, chars), text_errors(r["text"], t["ocr"])))
        elif r["task"] == "caption":
            captions += 1
            exact += (r["text"] or "").strip() == t["caption"]
    q.ocr_cer = errors / chars if chars else None
    q.caption_exact = exact / captions if captions else None
    if lines.lines:
        q.ocr_lines = {"lines": lines.lines, "boxed": lines.boxed / lines.lines, "exact": lines.exact / lines.lines,
                       "cer": lines.errors / max(1, lines.chars)}


def measure(model: str, folder: Path, work: Path, tasks: str = "od,ocr,caption", batch_size: int = 8,
            num_beams: int = 3, workers: int = 0, dtype: str = "auto") -> Quality:
    """Annotate `folder` (made by `annotate samples`) with `model`, export, and score against its truth."""
    from exporters.options import ExportOptions
    from exporters.read import Run
    from exporters.registry import get_exporter
    from exporters.safety import OutDir

    from annotator.config import GenerationSettings, ModelSpec, RunConfig
    from annotator.run.device import run
    from annotator.tasks import parse_task_list

    out = work / "annotations"
    cfg = RunConfig(inputs=(folder,), tasks=tuple(parse_task_list(tasks)), out=out, model=ModelSpec(model, dtype=dtype),
                    generation=GenerationSettings(num_beams=num_beams), batch_size=batch_size, workers=workers,
                    progress=False)
    run(cfg)
    q = Quality(images=len(json.loads((folder / "ground_truth.json").read_text())["images"]))
    if "od" in tasks.split(","):
        coco_dir = work / "coco"
        get_exporter("coco")(Run(out), OutDir.prepare(coco_dir, overwrite=True), ExportOptions(tasks=("od",), val_fraction=0.0))
        box_quality(coco_dir / "annotations.json", folder / "ground_truth.json", q)
    text_quality(out, folder / "texts.jsonl", q)
    return q


def main(argv=None) -> None:
    from annotator.demo import world as samples

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1000, help="held out: the demo model trains on seed 0's stream")
    ap.add_argument("--kind", default="mixed", choices=samples.KINDS)
    ap.add_argument("--tasks", default="od,ocr,caption")
    ap.add_argument("--num-beams", type=int, default=3)
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--card", type=Path, help="also put the figures into this checkpoint folder's README.md (model card)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "samples"
        samples.write(folder, n=args.n, seed=args.seed, kind=args.kind)
        q = measure(args.model, folder, Path(tmp), tasks=args.tasks, num_beams=args.num_beams, dtype=args.dtype)
    print("\n".join(q.lines()))
    if args.json:
        args.json.write_text(json.dumps(q.to_json(), indent=1))
    if args.card:
        command = " ".join(["python -m annotator.readback.quality", *(argv if argv is not None else __import__("sys").argv[1:])])
        write_card(args.card / "README.md", command, q.lines())


def write_card(card: Path, command: str, lines: list[str]) -> None:
    """Put one command's figures under the card's quality heading: a block per command (scenes,
    documents, ...), so that measuring one kind again replaces its block and keeps the others."""
    text = card.read_text() if card.exists() else ""
    head, _, tail = text.partition(QUALITY_HEADING)
    blocks = [b.strip() for b in re.split(r"\n(?=`[^`])", tail)[1:]]  # each block opens with `its command`
    kept = [b for b in blocks if not b.startswith(f"`{command}`")]
    new = f"`{command}`\n\n```\n" + "\n".join(lines) + "\n```"
    card.write_text(head.rstrip() + f"\n\n{QUALITY_HEADING}\n\n" + "\n\n".join(kept + [new]) + "\n")


if __name__ == "__main__":
    main()
