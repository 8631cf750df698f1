"""`annotate preview`: draw the annotations on their images and write a static HTML gallery.

Layout of --out (nothing is ever written elsewhere; every name below is made here, never taken
from the table):

    index.html            grid of thumbnails, task/label filters, run summary, error rows
    thumbs/000001.jpg     drawn at thumbnail size (lines and text scaled for that size)
    full/000001.jpg       drawn at up to --max-size, captions/OCR text in a band under the image
    pages/000001.html     one page per image: the full drawing, every row, every instance

Rows are read with the exporters' shared polars reader (exporters.read.Run): only finished
part files are listed (a running `annotate run` renames parts into place atomically), so a
preview of a folder that is still being written shows what is done so far. All text from the
table goes through html.escape; labels never reach a file name or a URL. The drawing itself is
drawing.py's; the output folder is guarded by the exporters' OutDir."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from PIL import Image

from annotator.readback.drawing import add_text_band, draw_annotations, fit, instances_of, open_scaled, text_lines
from exporters.colors import label_color
from annotator.outdir.table import OK
from annotator.tasks import TASKS, Labels

SAMPLES = ("random", "first", "errors", "low-score")
MARKER = ".annotate-preview"  # --overwrite only clears folders that hold it
THUMB = 320  # thumbnails: longer side in pixels
FULL_MIN = 512  # full drawings of smaller images are enlarged to this
# instance labels of these tasks are texts, not categories: kept out of the label histogram
_TEXT_LABEL_TASKS = {t.name for t in TASKS.values() if t.labels is Labels.TEXT}


class PreviewError(ValueError):
    """Bad arguments or an unusable folder; the message says what to do."""


# --- selection ----------------------------------------------------------------------------------
def select_images(lf: pl.LazyFrame, sample: str, limit: int, seed: int = 0) -> list[str]:
    """Image keys to show, in display order. `lf` holds the (deduplicated) rows to consider.

    random: a seeded hash order (no full key list in memory); first: key order; errors: images
    with an error row, key order; low-score: images by their lowest instance score, lowest first
    (images without scores are left out)."""
    if sample == "first":
        q = lf.select(pl.col("image").unique()).sort("image").head(limit)
    elif sample == "random":
        q = (lf.select(pl.col("image").unique())
             .with_columns(pl.col("image").hash(seed).alias("_h"))
             .sort(["_h", "image"]).head(limit).sort("image"))
    elif sample == "errors":
        q = lf.filter(pl.col("status") != OK).select(pl.col("image").unique()).sort("image").head(limit)
    elif sample == "low-score":
        q = (lf.filter(pl.col("status") == OK)
             .select("image", pl.col("scores").list.min().alias("_s"))
             .drop_nulls("_s")
             .group_by("image").agg(pl.col("_s").min())
             .sort(["_s", "image"]).head(limit))
    else:
        raise PreviewError(f"unknown --sample {sample!r}; one of {', '.join(SAMPLES)}")
    return q.collect()["image"].to_list()


# --- output folder ------------------------------------------------------------------------------
SUBFOLDERS = ("thumbs", "full", "pages")


def out_folder(root: Path, overwrite: bool):
    """--out, guarded as the exporters guard theirs (exporters.safety.OutDir): an empty folder, or
    one an earlier preview made (--overwrite clears its drawings); every path handed out is made of
    names chosen here and checked to resolve inside."""
    from exporters.errors import ExportError
    from exporters.safety import OutDir

    try:
        out = OutDir.prepare(root, overwrite, marker=MARKER, made_by="annotate preview", clear=SUBFOLDERS)
        for sub in SUBFOLDERS:
            out.mkdir(sub)
    except ExportError as exc:
        raise PreviewError(str(exc)) from None
    return out


# --- html -----------------------------------------------------------------------------------------
def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


_CSS = """
body{font-family:system-ui,sans-serif;margin:1rem;background:#f4f4f4;color:#222}
h1{font-size:1.3rem}h2{font-size:1.1rem;margin-top:1.5rem}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(240px,1fr));gap:.8rem}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.5rem;overflow:hidden}
.card.err{border-color:#d33}
.card img{width:100%;height:auto;display:block;background:#eee}
.key{font-family:monospace;font-size:.8rem;word-break:break-all}
.txt{font-size:.8rem;color:#444;max-height:6em;overflow:auto;white-space:pre-wrap}
.errmsg{font-size:.8rem;color:#b00;white-space:pre-wrap;word-break:break-word}
.tasks{font-size:.75rem;color:#666}
table{border-collapse:collapse;font-size:.85rem;background:#fff}
td,th{border:1px solid #ddd;padding:.2rem .4rem;text-align:left;vertical-align:top}
.bar{display:inline-block;height:.7em;background:#69c}
.filters{margin:.5rem 0}.filters select{margin-right:1rem}
.hidden{display:none}
.swatch{display:inline-block;width:.8em;height:.8em;border-radius:2px;vertical-align:middle}
"""

_JS = """
(function(){
  var t=document.getElementById('f-task'), l=document.getElementById('f-label'), n=document.getElementById('f-count');
  function apply(){
    var tv=t.value, lv=l.value, shown=0, cards=document.querySelectorAll('.card');
    for(var i=0;i<cards.length;i++){
      var c=cards[i], tasks=JSON.parse(c.getAttribute('data-tasks')), labels=JSON.parse(c.getAttribute('data-labels'));
      var ok=(!tv||tasks.indexOf(tv)>=0)&&(!lv||labels.indexOf(lv)>=0);
      c.classList.toggle('hidden',!ok); if(ok)shown++;
    }
    n.textContent=shown+' of '+cards.length+' images';
  }
  t.addEventListener('change',apply); l.addEventListener('change',apply); apply();
})();
"""


def _page(title: str, body: str, script: str = "") -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>\n{body}\n"
            + (f"<script>{script}</script>" if script else "") + "</body></html>\n")


def _attr_json(values) -> str:
    return esc(json.dumps(sorted(set(values)), ensure_ascii=True))


# --- the command ----------------------------------------------------------------------------------
@dataclass
class Shown:
    """One image of the gallery."""

    n: int
    key: str
    rows: list[dict]
    thumb: str | None = None  # relative to --out
    full: str | None = None
    note: str | None = None  # why there is no drawing, or what is odd about it
    labels: list[str] = field(default_factory=list)

    @property
    def page(self) -> str:
        return f"pages/{self.n:06d}.html"

    @property
    def errors(self) -> list[dict]:
        return [r for r in self.rows if r["status"] != OK]


@dataclass
class PreviewResult:
    out: Path
    images: int
    drawn: int
    missing: int
    errors: int

    def lines(self) -> list[str]:
        return [f"preview of {self.images} images ({self.drawn} drawn, {self.missing} without their image file, "
                f"{self.errors} with error rows): {self.out / 'index.html'}"]


def _draw_one(shown: Shown, image_path: Path | None, out, max_size: int, max_pixels: int) -> None:
    ok_rows = [r for r in shown.rows if r["status"] == OK]
    sized = [r for r in shown.rows if r.get("width") and r.get("height")]
    if not sized:
        shown.note = "no image size recorded (the image could not be decoded)"
        return
    w, h = int(sized[0]["width"]), int(sized[0]["height"])
    image = None
    if image_path is not None:
        try:
            image = open_scaled(image_path, max_size, max_pixels)
        except Exception as exc:  # a file that changed or broke since the run: still show the rows
            shown.note = f"cannot open the image file: {type(exc).__name__}: {exc}"
    else:
        shown.note = "image file not found under the manifest's inputs (pass --images); drawn on grey"
    if image is None:
        scale = min(1.0, max_size / max(w, h))
        image = Image.new("RGB", (max(1, round(w * scale)), max(1, round(h * scale))), (128, 128, 128))
    lines = text_lines(ok_rows)
    # tiny images are enlarged before drawing: labels stay readable and the browser does not
    # blow a 10 px font up to a blurry 50 px one
    full_img = fit(image, max(image.width, image.height, min(FULL_MIN, max_size)))
    full = draw_annotations(full_img, ok_rows, full_img.width / w, full_img.height / h)
    # subsampling=0 (4:4:4): thin coloured lines keep their colour instead of smearing
    add_text_band(full, lines).save(out.path("full", f"{shown.n:06d}.jpg"), quality=88, subsampling=0)
    thumb_img = fit(image, THUMB)
    thumb = draw_annotations(thumb_img, ok_rows, thumb_img.width / w, thumb_img.height / h)
    thumb.save(out.path("thumbs", f"{shown.n:06d}.jpg"), quality=85, subsampling=0)
    shown.full, shown.thumb = f"full/{shown.n:06d}.jpg", f"thumbs/{shown.n:06d}.jpg"


def _row_html(row: dict) -> str:
    head = f"<h2>{esc(row['task'])} <small>{esc(row['status'])}</small></h2>"
    parts = [head, f"<p class=\"key\">prompt: {esc(row.get('prompt'))}</p>"]
    if row["status"] != OK:
        parts.append(f"<p class=\"errmsg\">{esc(row.get('error'))}</p>")
    if row.get("truncated"):
        parts.append("<p>truncated: generation hit max_new_tokens</p>")
    if row.get("text"):
        parts.append(f"<p class=\"txt\">{esc(row['text'])}</p>")
    geoms = [("box", b) for b in (row.get("bboxes") or [])] if not row.get("polygons") else \
        [("polygon", p) for p in row["polygons"]]
    geoms += [("quad", q) for q in (row.get("quad_boxes") or [])]
    if geoms:
        insts = instances_of(row, len(geoms))
        body = "".join(
            f"<tr><td><span class=\"swatch\" style=\"background:rgb{label_color(i.label)}\"></span> {esc(i.label)}</td>"
            f"<td>{'' if i.score is None else f'{i.score:.3f}'}</td><td>{esc(kind)}</td>"
            f"<td class=\"key\">{esc(json.dumps(g))}</td></tr>"
            for i, (kind, g) in zip(insts, geoms))
        parts.append(f"<table><tr><th>label</th><th>score</th><th>kind</th><th>coordinates</th></tr>{body}</table>")
    return "\n".join(parts)


def _write_page(shown: Shown, out) -> None:
    img = (f"<a href=\"../{esc(shown.full)}\"><img src=\"../{esc(shown.full)}\" alt=\"{esc(shown.key)}\" "
           "style=\"max-width:100%\"></a>") if shown.full else ""
    note = f"<p class=\"errmsg\">{esc(shown.note)}</p>" if shown.note else ""
    body = (f"<p><a href=\"../index.html\">&larr; gallery</a></p><h1 class=\"key\">{esc(shown.key)}</h1>{note}{img}"
            + "".join(_row_html(r) for r in shown.rows))
    out.path(*shown.page.split("/")).write_text(_page(shown.key, body), encoding="utf-8")


def _card(shown: Shown) -> str:
    tasks = [r["task"] for r in shown.rows]
    img = (f"<a href=\"{esc(shown.page)}\"><img loading=\"lazy\" src=\"{esc(shown.thumb)}\" alt=\"{esc(shown.key)}\"></a>"
           if shown.thumb else "")
    texts = "".join(f"<div class=\"txt\"><b>{esc(t)}</b>: {esc(x)}</div>" for t, x in text_lines(shown.rows))
    errs = "".join(f"<div class=\"errmsg\"><b>{esc(r['task'])}</b> error: {esc(r.get('error'))}</div>"
                   for r in shown.errors)
    note = f"<div class=\"errmsg\">{esc(shown.note)}</div>" if shown.note and not shown.errors else ""
    status = " err" if shown.errors else ""
    return (f"<div class=\"card{status}\" data-tasks=\"{_attr_json(tasks)}\" data-labels=\"{_attr_json(shown.labels)}\">"
            f"{img}<div class=\"key\"><a href=\"{esc(shown.page)}\">{esc(shown.key)}</a></div>"
            f"<div class=\"tasks\">{esc(', '.join(sorted(set(tasks))))}</div>{texts}{errs}{note}</div>")


def _summary_html(counts: dict, labels: dict[str, list[tuple[str, int]]], manifest: dict) -> str:
    rows = "".join(
        f"<tr><td>{esc(t)}</td><td>{c.get(OK, 0)}</td><td>{sum(v for s, v in c.items() if s != OK)}</td></tr>"
        for t, c in sorted(counts.items()))
    parts = []
    if manifest:
        model = (manifest.get("identity") or {}).get("model") if isinstance(manifest.get("identity"), dict) else None
        finished = manifest.get("finished")
        parts.append(f"<p>model: {esc(model or '?')} &middot; started {esc(manifest.get('started'))} &middot; "
                     + (f"finished {esc(finished)}" if finished else "not finished (interrupted, or still running)")
                     + "</p>")
    parts.append(f"<table><tr><th>task</th><th>ok</th><th>error</th></tr>{rows}</table>")
    for task, hist in sorted(labels.items()):
        if not hist:
            continue
        top = max(n for _, n in hist)
        body = "".join(
            f"<tr><td><span class=\"swatch\" style=\"background:rgb{label_color(lab)}\"></span> {esc(lab)}</td>"
            f"<td>{n}</td><td><span class=\"bar\" style=\"width:{max(1, round(150 * n / top))}px\"></span></td></tr>"
            for lab, n in hist)
        parts.append(f"<h2>labels: {esc(task)}</h2><table>{body}</table>")
    return "\n".join(parts)


def _errors_html(lf, counts: dict, max_error_rows: int) -> str:
    """Error rows of the whole run (within --task), not only of the sampled images."""
    err_df = (lf.filter(pl.col("status") != OK).select("image", "task", "error")
              .sort(["image", "task"]).head(max_error_rows).collect())
    n_err = sum(sum(v for s, v in c.items() if s != OK) for c in counts.values())
    err_rows = "".join(f"<tr><td class=\"key\">{esc(i)}</td><td>{esc(t)}</td><td class=\"errmsg\">{esc(e)}</td></tr>"
                       for i, t, e in err_df.iter_rows())
    errors_html = f"<h2>error rows ({n_err})</h2>"
    if n_err:
        errors_html += f"<table><tr><th>image</th><th>task</th><th>error</th></tr>{err_rows}</table>"
    if n_err > max_error_rows:
        errors_html += f"<p>first {max_error_rows} shown; `annotate info` groups them by message</p>"
    return errors_html


def preview(annotations: Path, out: Path, tasks: list[str] | None = None, limit: int = 200,
            sample: str = "random", seed: int = 0, images: list[Path] | None = None, max_size: int = 1600,
            overwrite: bool = False, top_labels: int = 30, max_error_rows: int = 200,
            max_pixels: int = 178_956_970) -> PreviewResult:
    """Draw up to `limit` images of the run folder `annotations` and write `out`/index.html."""
    from exporters.errors import ExportError
    from exporters.read import Run

    if sample not in SAMPLES:
        raise PreviewError(f"unknown --sample {sample!r}; one of {', '.join(SAMPLES)}")
    if limit < 1:
        raise PreviewError("--limit must be at least 1")
    if max_size < 32:
        raise PreviewError("--max-size must be at least 32")
    try:
        run = Run(annotations, images)
    except ExportError as exc:
        raise PreviewError(str(exc)) from None
    if Path(out).resolve() == run.folder.resolve():
        raise PreviewError("--out must not be the annotations folder")
    counts = run.task_counts()
    if tasks:
        unknown = [t for t in tasks if t not in counts]
        if unknown:
            raise PreviewError(f"no rows for task {', '.join(unknown)} in {run.folder}; it holds: "
                               f"{', '.join(sorted(counts)) or 'nothing'}")
        counts = {t: c for t, c in counts.items() if t in tasks}
    lf = run.scan()
    if tasks:
        lf = lf.filter(pl.col("task").is_in(tasks))
    keys = select_images(lf, sample, limit, seed)
    folder = out_folder(out, overwrite)

    # every row of the chosen images, ok and error, in one query
    df = lf.filter(pl.col("image").is_in(keys)).sort(["image", "task"]).collect()
    by_key: dict[str, list[dict]] = {}
    for row in df.iter_rows(named=True):
        by_key.setdefault(row["image"], []).append(row)

    label_tasks = [t for t in counts if t not in _TEXT_LABEL_TASKS]
    labels = {t: run.label_counts([t]).most_common(top_labels) for t in label_tasks}
    labels = {t: h for t, h in labels.items() if h}

    shown_all: list[Shown] = []
    drawn = missing = 0
    for n, key in enumerate(keys, 1):
        rows = by_key.get(key, [])
        shown = Shown(n, key, rows)
        shown.labels = [str(lab) for r in rows if r["status"] == OK and r["task"] not in _TEXT_LABEL_TASKS
                        for lab in (r.get("labels") or []) if lab is not None]
        path = run.find_image(key)
        missing += path is None
        _draw_one(shown, path, folder, max_size, max_pixels)
        drawn += shown.full is not None
        _write_page(shown, folder)
        shown_all.append(shown)

    errors_html = _errors_html(lf, counts, max_error_rows)
    all_tasks = sorted({r["task"] for s in shown_all for r in s.rows})
    all_labels = sorted({lab for s in shown_all for lab in s.labels})
    task_opts = "".join(f"<option value=\"{esc(t)}\">{esc(t)}</option>" for t in all_tasks)
    label_opts = "".join(f"<option value=\"{esc(lab)}\">{esc(lab)}</option>" for lab in all_labels[:1000])
    how = {"random": f"a random sample (seed {seed})", "first": "the first images by key",
           "errors": "images with error rows", "low-score": "images with the lowest scores first"}[sample]
    body = (f"<h1>annotate preview: {esc(run.folder.name)}</h1>"
            f"<p>{len(shown_all)} images: {esc(how)}{', tasks ' + esc(', '.join(tasks)) if tasks else ''}.</p>"
            + _summary_html(counts, labels, run.manifest)
            + "<h2>images</h2><div class=\"filters\">task <select id=\"f-task\"><option value=\"\">all</option>"
            f"{task_opts}</select>label <select id=\"f-label\"><option value=\"\">all</option>{label_opts}</select>"
            "<span id=\"f-count\"></span></div>"
            + (f"<div class=\"grid\">{''.join(_card(s) for s in shown_all)}</div>" if shown_all
               else f"<p>nothing to show for --sample {esc(sample)}"
                    + (" (no row has scores)" if sample == "low-score" else "") + "</p>")
            + errors_html)
    folder.path("index.html").write_text(_page(f"preview: {run.folder.name}", body, _JS), encoding="utf-8")
    return PreviewResult(folder.root, len(shown_all), drawn, missing, sum(1 for s in shown_all if s.errors))
