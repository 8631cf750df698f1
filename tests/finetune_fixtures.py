"""Synthetic fine-tuning data with known answers: one coloured rectangle per image, its box as
the <OD> target (florence JSONL) and questions about it (docvqa Parquet)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image, ImageDraw

# (label, box in <loc_> bins x1 y1 x2 y2, background colour)
OBJECTS = [
    ("car", (100, 200, 300, 400), (200, 30, 30)),
    ("person", (500, 100, 900, 600), (30, 200, 30)),
    ("dog", (10, 20, 800, 700), (30, 30, 200)),
    ("cat", (600, 600, 950, 950), (230, 230, 230)),
]
SIZE = 500  # >= 1000/2 px: the parser's integer pixels still give the boxes back within one bin


def draw(box, colour) -> Image.Image:
    im = Image.new("RGB", (SIZE, SIZE), colour)
    ImageDraw.Draw(im).rectangle([v * SIZE / 1000 for v in box], fill=tuple(255 - c for c in colour))
    return im


def od_target(label: str, box) -> str:
    return label + "".join(f"<loc_{v}>" for v in box)


def write_images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (_, box, colour) in enumerate(OBJECTS):
        p = folder / f"img{i}.png"
        draw(box, colour).save(p)
        paths.append(p)
    return paths


def write_florence(root: Path, repeat: int = 1) -> dict[str, str]:
    """root/train (each pair `repeat` times: more steps per epoch) and root/valid (each once), laid
    out as `annotate export --format florence` writes them. Returns {image name: target}."""
    targets = {}
    for split, n in (("train", repeat), ("valid", 1)):
        paths = write_images(root / split)
        with open(root / split / "annotations.jsonl", "w") as fh:
            for _ in range(n):
                for p, (label, box, _) in zip(paths, OBJECTS):
                    fh.write(json.dumps({"image": p.name, "prefix": "<OD>", "suffix": od_target(label, box)}) + "\n")
                    targets[p.name] = od_target(label, box)
    return targets


def write_docvqa(root: Path, repeat: int = 1) -> list[tuple[str, str]]:
    """root/data/train-*.parquet (rows `repeat` times) and validation-*.parquet (the same rows once),
    with the exporter's schema. Answers differ per image, the question is the same."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from exporters.docvqa import SCHEMA_WITH_META

    qa = []
    rows = []
    for i, (label, box, colour) in enumerate(OBJECTS):
        buf = io.BytesIO()
        draw(box, colour).save(buf, format="PNG")
        question = "What is in the image?"
        qa.append((question, label))
        rows.append({"questionId": i, "question": question, "question_types": ["presence"],
                     "image": {"bytes": buf.getvalue(), "path": f"img{i}.png"}, "docId": i,
                     "ucsf_document_id": f"img{i}.png", "ucsf_document_page_no": "1", "answers": [label]})
    (root / "data").mkdir(parents=True, exist_ok=True)
    for name, n in (("train", repeat), ("validation", 1)):
        table = pa.Table.from_pylist(rows * n, schema=SCHEMA_WITH_META)
        pq.write_table(table, root / "data" / f"{name}-00000-of-00001.parquet")
    return qa
