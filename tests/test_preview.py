"""`annotate preview`: drawing puts pixels where the geometry is, the gallery escapes everything
from the table, shows error rows, samples as asked, and writes only inside --out."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
from click.testing import CliRunner
from PIL import Image

from annotator.cli import cli
from annotator.readback.drawing import Style, draw_annotations
from exporters.colors import label_color
from annotator.readback.preview import PreviewError, preview
from annotator.outdir.table import Annotation
from export_fixtures import make_run, ok, standard_rows

BG = (255, 255, 255)


def _close(a, b, tol=40) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


# --- drawing ------------------------------------------------------------------------------------
def test_box_edges_are_drawn_at_the_box_and_nowhere_else():
    im = Image.new("RGB", (200, 100), BG)
    row = {"task": "od", "status": "ok", "bboxes": [[40, 30, 160, 80]], "labels": ["cat"]}
    out = draw_annotations(im, [row])
    rgb = label_color("cat")
    line = Style.for_size(200, 100).line
    # each of the four edges, away from the label tag at the top-left corner
    for xy in [(100, 80), (40, 60), (160, 60), (100, 30)]:
        assert _close(out.getpixel(xy), rgb, 5), xy
    inside, outside = (100, 55), (10, 90)
    assert out.getpixel(inside) == BG  # boxes are outlined, not filled
    assert out.getpixel(outside) == BG
    assert out.getpixel((100, 80 + line + 2)) == BG  # the line is thin
    assert im.getpixel((100, 80)) == BG  # the input image is not modified


def test_label_tag_with_score_is_drawn_in_the_label_colour():
    im = Image.new("RGB", (400, 200), BG)
    row = {"task": "od", "status": "ok", "bboxes": [[100, 100, 300, 190]], "labels": ["car"], "scores": [0.5]}
    out = draw_annotations(im, [row])
    # the tag sits above the box's top-left corner
    tag = out.crop((100, 70, 160, 99))
    assert label_color("car") in {c for _, c in tag.getcolors(10000)}


def test_polygon_fills_inside_translucently_and_not_outside():
    im = Image.new("RGB", (200, 200), (0, 0, 0))
    row = {"task": "referring_expression_segmentation", "status": "ok",
           "polygons": [[[50, 50, 150, 50, 150, 150, 50, 150]]], "labels": ["thing"]}
    out = draw_annotations(im, [row])
    rgb = label_color("thing")
    inside = out.getpixel((100, 120))
    assert inside != (0, 0, 0)
    # translucent: a mix of the label colour and the black image, darker than the pure colour
    assert all(i <= c for i, c in zip(inside, rgb)) and inside != rgb
    assert out.getpixel((20, 20)) == (0, 0, 0) and out.getpixel((180, 180)) == (0, 0, 0)
    assert _close(out.getpixel((150, 120)), rgb, 5)  # outlined


def test_coordinates_are_scaled_to_a_downscaled_image():
    im = Image.new("RGB", (100, 50), BG)  # the row says 200x100
    row = {"task": "od", "status": "ok", "bboxes": [[40, 30, 160, 80]], "labels": ["cat"]}
    out = draw_annotations(im, [row], 0.5, 0.5)
    assert _close(out.getpixel((50, 40)), label_color("cat"), 5)
    assert out.getpixel((50, 30)) == BG


def test_ocr_quads_are_outlined_and_error_rows_draw_nothing():
    im = Image.new("RGB", (300, 200), BG)
    rows = [{"task": "ocr_with_region", "status": "ok", "quad_boxes": [[20, 100, 280, 100, 280, 150, 20, 150]],
             "labels": ["HELLO"]},
            {"task": "od", "status": "error", "bboxes": [[0, 0, 299, 199]], "labels": ["x"]}]
    out = draw_annotations(im, rows)
    assert _close(out.getpixel((150, 150)), label_color("HELLO"), 5)
    assert out.getpixel((0, 199)) == BG


def test_label_colours_are_stable_and_differ():
    assert label_color("car") == label_color("car")
    assert label_color("car") != label_color("cat")


def test_line_width_and_font_grow_with_the_image():
    small, big = Style.for_size(64, 48), Style.for_size(4000, 3000)
    assert big.line > small.line >= 1 and big.font_size > small.font_size >= 10


# --- the gallery ----------------------------------------------------------------------------------
class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.scripts, self.in_script, self.script_text = [], 0, False, []

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.scripts += 1
            self.in_script = True
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.refs.append(value)

    def handle_endtag(self, tag):
        self.in_script = False

    def handle_data(self, data):
        if self.in_script:
            self.script_text.append(data)


def _parse(path: Path) -> _Refs:
    p = _Refs()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def _rows_with_nasty_text():
    rows = standard_rows()
    rows[0] += [
        ok("a/cat.jpg", "dense_region_caption", prompt="<DENSE_REGION_CAPTION>", bboxes=[[20, 60, 180, 95]],
           labels=["<script>alert(1)</script>"]),
        ok("doc.png", "caption", prompt="<CAPTION>", text='a "quoted" <img src=x onerror=alert(2)> & more'),
    ]
    return rows


@pytest.fixture
def run_dir(tmp_path):
    return make_run(tmp_path, _rows_with_nasty_text())


def test_gallery_escapes_labels_and_text(run_dir, tmp_path):
    ann, _ = run_dir
    out = tmp_path / "out"
    preview(ann, out, sample="first")
    index = (out / "index.html").read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in index
    assert "&lt;img src=x onerror=alert(2)&gt; &amp; more" in index
    assert "<img src=x" not in index
    for page in [out / "index.html", *sorted((out / "pages").glob("*.html"))]:
        p = _parse(page)
        # the only script is the gallery's own filter code, and it holds no data
        assert p.scripts == (1 if page.name == "index.html" else 0), page
        assert "alert" not in "".join(p.script_text)
        assert "<script>alert" not in page.read_text(encoding="utf-8")


def test_gallery_references_only_files_inside_out_that_exist(run_dir, tmp_path):
    ann, _ = run_dir
    out = tmp_path / "out"
    preview(ann, out, sample="first")
    root = out.resolve()
    pages = [out / "index.html", *sorted((out / "pages").glob("*.html"))]
    n_img = 0
    for page in pages:
        for ref in _parse(page).refs:
            assert not re.match(r"^[a-z]+:", ref) and not ref.startswith("/"), ref  # no scheme, no absolute path
            target = (page.parent / unquote(ref)).resolve()
            assert target.is_file(), (page, ref)
            assert root in target.parents
            n_img += ref.endswith(".jpg")
    assert n_img >= 10  # thumbnails in the index, full drawings on the pages
    # thumbnails are small, full drawings are bigger
    thumb = Image.open(next((out / "thumbs").glob("*.jpg")))
    assert max(thumb.size) == 320


def test_error_row_appears_with_its_message(run_dir, tmp_path):
    ann, _ = run_dir
    out = tmp_path / "out"
    result = preview(ann, out, sample="errors")
    assert result.images == 1 and result.errors == 1  # b/cat.jpg's od error was retried ok
    index = (out / "index.html").read_text(encoding="utf-8")
    assert "bad.jpg" in index and "cannot identify image file" in index
    assert "CUDA out of memory" not in index  # superseded by the ok row
    page = (out / "pages" / "000001.html").read_text(encoding="utf-8")
    assert "cannot identify image file" in page


def test_drawn_file_has_boxes_at_the_scaled_coordinates(tmp_path):
    rows = [[ok("a/cat.jpg", "od", bboxes=[[20, 20, 180, 80]], labels=["cat"])]]  # image is 200x100
    ann, root = make_run(tmp_path, rows)
    Image.new("RGB", (200, 100), (0, 0, 0)).save(root / "a" / "cat.jpg", quality=100)
    out = tmp_path / "out"
    preview(ann, out, sample="first", max_size=800)
    full = Image.open(out / "full" / "000001.jpg").convert("RGB")
    assert full.width == 512  # small images are enlarged for readable labels
    s = 512 / 200
    assert _close(full.getpixel((int(100 * s), int(80 * s))), label_color("cat"), 60)
    assert _close(full.getpixel((int(100 * s), int(50 * s))), (0, 0, 0), 30)


def test_low_score_sampling_puts_the_weakest_first(tmp_path):
    rows = [[
        ok("a/cat.jpg", "od", bboxes=[[0, 0, 5, 5], [1, 1, 6, 6]], labels=["a", "b"], scores=[0.9, 0.6]),
        ok("b/cat.jpg", "od", bboxes=[[0, 0, 5, 5]], labels=["a"], scores=[0.1]),
        ok("doc.png", "od", bboxes=[[0, 0, 5, 5]], labels=["a"], scores=[0.3]),
        ok("b/CAT.png", "od", bboxes=[[0, 0, 5, 5]], labels=["a"]),  # no scores: not in this sample
    ]]
    ann, _ = make_run(tmp_path, rows)
    out = tmp_path / "out"
    result = preview(ann, out, sample="low-score", limit=2)
    assert result.images == 2
    index = (out / "index.html").read_text(encoding="utf-8")
    assert index.index("b/cat.jpg") < index.index("doc.png")
    assert "a/cat.jpg</a>" not in index
    preview(ann, out, sample="low-score", limit=10, overwrite=True)
    index = (out / "index.html").read_text(encoding="utf-8")
    order = [k for k in re.findall(r'<div class="key"><a href="[^"]+">([^<]+)</a>', index)]
    assert order == ["b/cat.jpg", "doc.png", "a/cat.jpg"]


def test_random_sample_is_seeded_and_task_filter_applies(run_dir, tmp_path):
    ann, _ = run_dir
    a = preview(ann, tmp_path / "a", sample="random", limit=3, seed=1)
    b = preview(ann, tmp_path / "b", sample="random", limit=3, seed=1)
    assert a.images == b.images == 3
    assert (tmp_path / "a" / "index.html").read_text() == (tmp_path / "b" / "index.html").read_text()
    preview(ann, tmp_path / "c", tasks=["ocr_with_region"], sample="first")
    index = (tmp_path / "c" / "index.html").read_text(encoding="utf-8")
    assert "doc.png" in index and "a/cat.jpg" not in index


def test_missing_image_file_is_drawn_on_grey(tmp_path):
    ann, root = make_run(tmp_path, [[ok("a/cat.jpg", "od", bboxes=[[20, 20, 180, 80]], labels=["cat"])]])
    (root / "a" / "cat.jpg").unlink()
    result = preview(ann, tmp_path / "out", sample="first")
    assert result.missing == 1 and result.drawn == 1
    assert "image file not found" in (tmp_path / "out" / "pages" / "000001.html").read_text()


def test_outputs_stay_inside_out_and_nothing_is_overwritten_unasked(tmp_path):
    evil = [[
        ok("../../escape.jpg", "od", bboxes=[[0, 0, 5, 5]], labels=["../../x"]),
        ok("/etc/passwd", "od", bboxes=[[0, 0, 5, 5]], labels=["a/b"]),
        Annotation.failed("../up/../x.png", "od", "<b>bad</b>"),
    ]]
    ann, root = make_run(tmp_path, evil)
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "deep" / "out"
    result = preview(ann, out, sample="first")
    assert result.images == 3 and result.drawn == 2 and result.missing == 3
    new = {p for p in tmp_path.rglob("*")} - before
    for p in new:
        assert p == tmp_path / "deep" or out in [p, *p.parents], p
    assert "&lt;b&gt;bad&lt;/b&gt;" in (out / "index.html").read_text()
    with pytest.raises(PreviewError, match="not empty"):
        preview(ann, out, sample="first")
    preview(ann, out, sample="first", overwrite=True)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(PreviewError, match="not made by"):
        preview(ann, other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep"
    with pytest.raises(PreviewError, match="annotations folder"):
        preview(ann, ann, overwrite=True)


def test_preview_reads_only_finished_parts(run_dir, tmp_path):
    ann, _ = run_dir
    (ann / ".tmp-0123-part-r0000-x-000009.parquet").write_bytes(b"half a file")  # a part being written
    assert preview(ann, tmp_path / "out", sample="first").images == 6


def test_cli(run_dir, tmp_path):
    ann, _ = run_dir
    out = tmp_path / "gallery"
    r = CliRunner().invoke(cli, ["preview", str(ann), "--out", str(out), "--task", "od", "--limit", "2",
                                 "--sample", "first"])
    assert r.exit_code == 0, r.output
    assert "preview of 2 images" in r.output and (out / "index.html").is_file()
    r = CliRunner().invoke(cli, ["preview", str(ann), "--out", str(tmp_path / "x"), "--task", "nope"])
    assert r.exit_code == 2 and "unknown task" in r.output
    r = CliRunner().invoke(cli, ["preview", str(ann), "--out", str(tmp_path / "y"), "--task", "ocr"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["preview", str(ann), "--out", str(tmp_path / "z"), "--task", "region_to_ocr"])
    assert r.exit_code == 2 and "no rows for task region_to_ocr" in r.output
    r = CliRunner().invoke(cli, ["preview", str(tmp_path / "nothing"), "--out", str(tmp_path / "w")])
    assert r.exit_code == 2 and "does not exist" in r.output


# --- a real browser -------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine")
def test_headless_browser_renders_the_gallery(run_dir, tmp_path):
    ann, _ = run_dir
    out = tmp_path / "out"
    preview(ann, out, sample="first")
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run",
           f"--user-data-dir={tmp_path / 'chrome-profile'}", "--window-size=1200,1600",
           f"--screenshot={shot}", (out / "index.html").resolve().as_uri()]
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    if os.environ.get("PREVIEW_SHOT_DIR"):  # to look at it: PREVIEW_SHOT_DIR=/tmp/x pytest ...
        shutil.copy(shot, Path(os.environ["PREVIEW_SHOT_DIR"]) / "gallery.png")
    im = Image.open(shot).convert("RGB")
    assert im.size == (1200, 1600)
    colors = im.getcolors(1 << 24)
    assert colors is not None and len(colors) > 50  # text, tables, drawn thumbnails: not a blank page
    # the thumbnails were loaded: the colour of a drawn label appears on screen
    cat = label_color("cat")
    assert any(_close(c, cat, 12) for _, c in colors)
    # the error card's red border and message colour are on screen
    assert any(_close(c, (0xdd, 0x33, 0x33), 20) or _close(c, (0xbb, 0, 0), 20) for _, c in colors)
    # the inline filter script ran without an error: it fills in the image count
    dom = subprocess.run([c for c in cmd if not c.startswith("--screenshot")][:-1] + ["--dump-dom", cmd[-1]],
                         check=True, timeout=120, capture_output=True, text=True).stdout
    assert "6 of 6 images" in dom


class _Attrs(HTMLParser):
    """Every (tag, attribute, value) and the <title> text, as a browser would read them (entities decoded)."""

    def __init__(self):
        super().__init__()
        self.attrs, self.title, self._in_title = [], "", False

    def handle_starttag(self, tag, attrs):
        self.attrs += [(tag, name, value) for name, value in attrs]
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data


def test_quotes_and_ampersands_in_keys_and_labels_survive_attributes(tmp_path):
    """A key and a label holding ", ' and & reach attribute values (alt, data-labels, option value)
    and come back unchanged when the page is read: escaped, not cut short or re-opened."""
    import json

    key, label = "q\"u'o&te.png", "say \"hi\" & 'bye'"
    rows = [[ok(key, "od", prompt="<OD>", bboxes=[[2, 2, 50, 50]], labels=[label], width=100, height=100)]]
    ann, _ = make_run(tmp_path, rows, images={key: (100, 100)})
    out = tmp_path / "out"
    preview(ann, out, sample="first")
    index = out / "index.html"
    p = _Attrs()
    p.feed(index.read_text(encoding="utf-8"))
    values = {(tag, name): [v for t, n, v in p.attrs if (t, n) == (tag, name)] for tag, name in
              [("img", "alt"), ("div", "data-labels"), ("option", "value")]}
    assert values[("img", "alt")] == [key]
    assert [json.loads(v) for v in values[("div", "data-labels")]] == [[label]]
    assert label in values[("option", "value")]
    # no attribute was opened by the data: every attribute name is one the gallery writes
    assert {n for _, n, _ in p.attrs} <= {"lang", "charset", "name", "content", "class", "id", "href", "src", "alt",
                                         "loading", "style", "value", "data-tasks", "data-labels"}
    raw = index.read_text(encoding="utf-8")
    assert "q&quot;u&#x27;o&amp;te.png" in raw and key not in raw
    page = next((out / "pages").glob("*.html"))
    pp = _Attrs()
    pp.feed(page.read_text(encoding="utf-8"))
    assert pp.title == key and [v for t, n, v in pp.attrs if (t, n) == ("img", "alt")] == [key]
