"""DocVQA-style QA pairs for fine-tuning, as Parquet with the columns and types of
HuggingFaceM4/DocumentVQA (image as the HF datasets Image struct {bytes, path}, with the datasets
feature metadata so `load_dataset("parquet", ...)` decodes it). Files:
<out>/data/train-00000-of-00001.parquet and <out>/data/validation-00000-of-00001.parquet.

Questions come from deterministic templates over the rows (OCR text, OCR lines by region and
position, captions, detection counts and presence); the fine-tuning loop uses
prompt "<DocVQA>" + question and target answers[0]."""

from __future__ import annotations

import io
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from annotator.model.sequence import loc_tokens
from annotator.tasks import TASKS, Labels
from exporters.base import Export, KeyRanks, exportable
from exporters.classes import ClassVocab, normalize_label

from exporters.filtering import BELOW, NO_SCORE, confident
from exporters.geometry import clip_polygon, polygons_extent, row_instances
from exporters.options import ExportOptions, ExportSummary
from exporters.read import ImageRows, Run
from exporters.registry import register
from exporters.safety import OutDir

DEFAULTS = ("ocr", "ocr_with_region", "caption", "detailed_caption", "more_detailed_caption", "od")
# detections labelled with category names: "how many cars?"
COUNT_TASKS = tuple(t.name for t in TASKS.values() if t.is_detection and t.labels is Labels.CATEGORY)
CAPTION_QUESTIONS = {  # Florence-2's own wording of these tasks
    "caption": "What does the image describe?",
    "detailed_caption": "Describe in detail what is shown in the image.",
    "more_detailed_caption": "Describe with a paragraph what is shown in the image.",
}
NEGATIVES_PER_IMAGE = 2
SPLIT_FILES = {"train": "train", "val": "validation"}

SCHEMA = pa.schema(
    [
        pa.field("questionId", pa.int32()),
        pa.field("question", pa.string()),
        pa.field("question_types", pa.list_(pa.string())),
        pa.field("image", pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])),
        pa.field("docId", pa.int32()),
        pa.field("ucsf_document_id", pa.string()),
        pa.field("ucsf_document_page_no", pa.string()),
        pa.field("answers", pa.list_(pa.string())),
    ]
)
_str = {"dtype": "string", "_type": "Value"}
# What `datasets` stores under the b"huggingface" schema key. "Sequence" (not datasets 4's "List")
# so older datasets releases read it too; newer ones map it to List.
HF_FEATURES = {
    "questionId": {"dtype": "int32", "_type": "Value"},
    "question": _str,
    "question_types": {"feature": _str, "_type": "Sequence"},
    "image": {"_type": "Image"},
    "docId": {"dtype": "int32", "_type": "Value"},
    "ucsf_document_id": _str,
    "ucsf_document_page_no": _str,
    "answers": {"feature": _str, "_type": "Sequence"},
}
SCHEMA_WITH_META = SCHEMA.with_metadata({"huggingface": json.dumps({"info": {"features": HF_FEATURES}})})


def plural(noun: str) -> str:
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and len(noun) > 1 and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def article(noun: str) -> str:
    return "an" if noun[:1] in "aeiou" else "a"


def qa_pairs(img: ImageRows, vocab: ClassVocab | None, common: list[str], drops: Counter,
             min_score: float | None = None) -> list[tuple[str, str, list[str]]]:
    """(question, answer, question_types) for one image, from its rows. Pure and deterministic."""
    qa: list[tuple[str, str, list[str]]] = []
    rows = img.rows
    if "ocr" in rows and (rows["ocr"].text or "").strip():
        qa.append(("What is the text in the image?", rows["ocr"].text.strip(), ["ocr"]))
    if "ocr_with_region" in rows:
        r = rows["ocr_with_region"]
        lines = []
        for i, quad in enumerate(r.quad_boxes or []):
            text = ((r.labels or [])[i] if i < len(r.labels or []) else "") or ""
            poly = clip_polygon(quad, img.width, img.height) if img.width and img.height else None
            if poly is None or not text.strip():
                drops["degenerate box" if text.strip() else "empty label"] += 1
                continue
            lines.append((polygons_extent([poly]), text.strip()))
        for box, text in lines:
            qa.append((f"What text is in the region {loc_tokens(box, img.width, img.height)}?", text, ["ocr", "layout"]))
        if lines:
            reading = sorted(lines, key=lambda bt: (bt[0][1], bt[0][0]))
            qa.append(("What is the first line of text in the image?", reading[0][1], ["ocr", "layout"]))
            if len(lines) > 1:
                qa.append(("What is the last line of text in the image?", reading[-1][1], ["ocr", "layout"]))
            qa.append(("How many lines of text are in the image?", str(len(lines)), ["ocr", "count"]))
    for task, question in CAPTION_QUESTIONS.items():
        if task in rows and (rows[task].text or "").strip():
            qa.append((question, rows[task].text.strip(), ["caption"]))
    qa += count_questions(rows, vocab, common, drops, min_score)
    return qa


def count_questions(rows: dict, vocab: ClassVocab | None, common: list[str], drops: Counter,
                    min_score: float | None) -> list[tuple[str, str, list[str]]]:
    """How many / is there questions from the detection rows. Under --min-score an instance below it,
    or without a score (a garbled row: filtering.py), is uncertain: it is not counted, and its class
    gets neither a count nor a "no" answer, which it could make wrong (the same reason `--filter`
    exists for boxes: an uncertain object must not be taught as absent); "yes" still comes from a
    confident instance of the class."""
    counts: Counter = Counter()
    unsure: set[str] = set()
    detections = [t for t in COUNT_TASKS if t in rows]
    for task in detections:
        for inst in row_instances(rows[task], drops):
            name = normalize_label(inst.label)
            if vocab is not None:
                idx = vocab.index(inst.label)
                if idx is None:
                    drops["label not in classes"] += 1
                    continue
                name = vocab.names[idx]
            if confident(inst.score, min_score):  # a training format: an unscored instance is not
                counts[name] += 1
                continue
            unsure.add(name)
            drops[NO_SCORE if inst.score is None else BELOW] += 1
    qa = []
    for name, n in sorted(counts.items()):
        if name not in unsure:
            qa.append((f"How many {plural(name)} are there in the image?", str(n), ["count"]))
        qa.append((f"Is there {article(name)} {name} in the image?", "yes", ["presence"]))
    if detections:
        absent = [c for c in common if c not in counts and c not in unsure][:NEGATIVES_PER_IMAGE]
        qa += [(f"Is there {article(name)} {name} in the image?", "no", ["presence"]) for name in absent]
    if unsure:
        drops["count question left out: uncertain instances of the class"] += len(set(counts) & unsure)
    return qa


def image_struct(path, name: str) -> dict:
    """HF Image struct. The file's own bytes, unless EXIF says to rotate it: table coordinates are
    in the upright image, so then the upright image is stored (PNG) and no reader can disagree."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        if im.getexif().get(0x0112, 1) in (None, 1):
            return {"bytes": data, "path": name}
        up = ImageOps.exif_transpose(im)
        buf = io.BytesIO()
        up.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": name.rsplit(".", 1)[0] + ".png"}


@register("docvqa")
def export_docvqa(run: Run, out: OutDir, opts: ExportOptions) -> ExportSummary:
    ex = Export.start("docvqa", run, out, opts, DEFAULTS)
    summary, tasks = ex.summary, ex.tasks
    det = [t for t in tasks if t in COUNT_TASKS]
    vocab = ClassVocab.from_spec(opts.classes) if opts.classes is not None else None
    if vocab is None and det:
        vocab, _ = ClassVocab.from_counts(run.label_counts(det), opts.min_count)
    common = vocab.names[:20] if vocab else []
    summary.classes = list(vocab.names) if vocab else []
    doc_ids = KeyRanks(run.iter_image_keys())  # the rank among all keys, as COCO's image ids
    layout = ex.layout()
    out.mkdir("data")
    buffers: dict[str, list[dict]] = {s: [] for s in SPLIT_FILES}
    per_split: Counter = Counter()
    qid = 0

    def flush(split: str) -> None:
        if buffers[split]:
            writers[split].write_table(pa.Table.from_pylist(buffers[split], schema=SCHEMA_WITH_META))
            buffers[split] = []

    with ex:
        writers = ex.open_splits(SPLIT_FILES, lambda s: pq.ParquetWriter(
            out.path("data", f"{SPLIT_FILES[s]}-00000-of-00001.parquet"), SCHEMA_WITH_META))
        for img in exportable(run.images(tasks), summary, layout.holds):
            qa = qa_pairs(img, vocab, common, summary.dropped, opts.min_score)
            if not qa:
                continue
            src = run.find_image(img.key, summary.dropped)
            if src is None:
                continue
            split = layout.split(img.key)
            image = image_struct(src, layout.name(img.key))
            for question, answer, types in qa:
                qid += 1
                buffers[split].append({
                    "questionId": qid, "question": question, "question_types": types, "image": image,
                    "docId": doc_ids.rank(img.key), "ucsf_document_id": img.key, "ucsf_document_page_no": "1",
                    "answers": [answer],
                })
            if len(buffers[split]) >= 256:
                flush(split)
            per_split[SPLIT_FILES[split]] += 1
            summary.records += len(qa)
        for s in SPLIT_FILES:
            flush(s)
    ex.finish(per_split)
    return summary
