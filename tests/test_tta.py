"""`annotate run --tta flip`: box tasks also run on the mirrored image and the two passes' boxes are
merged per row (decode/tta.py). On the striped shift the union doubled the true boxes kept at
--min-score 0.7 at about the same precision (README, "The pseudo-label loop, on a shift")."""

from __future__ import annotations

import pytest
import torch

from annotator.config import ConfigError, RunConfig, TileSettings
from annotator.decode.tta import FlipAnnotator, merge_flipped
from annotator.inputs.images import Batch, ImageItem
from annotator.outdir.table import ERROR, OK, Annotation
from annotator.tasks import TASKS, parse_task_list


def row(boxes, labels, scores, width=100, task="od", status=OK):
    return Annotation(image="a.png", task=task, status=status, width=width, height=50, bboxes=boxes, labels=labels,
                      scores=scores)


def test_union_keeps_both_passes_and_scores_agreement_by_the_better_pass():
    plain = row([[10, 20, 30, 40], [50, 5, 60, 15]], ["car", "dog"], [0.6, 0.9])
    # in the mirror's coordinates (width 100): the car again (x 70..90), and a cat the plain pass missed
    mirrored = row([[70, 20, 90, 40], [0, 0, 20, 4]], ["car", "cat"], [0.8, 0.75])
    merged, added = merge_flipped(plain, mirrored)
    assert added == 1
    assert merged.bboxes == [[80, 0, 100, 4], [50, 5, 60, 15], [10, 20, 30, 40]]  # reading order: top first
    assert merged.labels == ["cat", "dog", "car"]
    assert merged.scores == [0.75, 0.9, 0.8]  # the car: the better of 0.6 and 0.8


def test_a_box_of_another_label_is_not_agreement():
    merged, added = merge_flipped(row([[10, 20, 30, 40]], ["car"], [0.6]), row([[70, 20, 90, 40]], ["bus"], [0.8]))
    assert added == 1 and sorted(merged.labels) == ["bus", "car"] and sorted(merged.scores) == [0.6, 0.8]


def test_unscored_or_failed_passes():
    plain = row([[10, 20, 30, 40]], ["car"], None)
    merged, added = merge_flipped(plain, row([[0, 0, 20, 4]], ["cat"], [0.75]))
    assert added == 1 and merged.scores is None and len(merged.bboxes) == 2  # unscored: --min-score drops the row
    assert merge_flipped(plain, row(None, None, None, status=ERROR)) == (plain, 0)
    failed = row(None, None, None, status=ERROR)
    assert merge_flipped(failed, row([[0, 0, 20, 4]], ["cat"], [0.75])) == (failed, 0)


class BrightColumnEngine:
    """Answers od with a box around the brightest pixel column, but only when it lies in the right
    half of the image it is shown (a model that misses what is on the left), score 0.9; caption:
    'seen', never mirrored. Records what it was asked."""

    def __init__(self):
        self.calls, self.stats = [], {}

    def annotate(self, batch):
        rows = []
        for it in batch.items:
            self.calls.append((it.key, it.tasks))
            width_px = it.pixel_values.shape[-1]
            col = int(it.pixel_values.sum(dim=(0, 1)).argmax())
            x = (col + 0.5) * it.width / width_px
            for task in it.tasks:
                if task == "od":
                    found = col >= width_px // 2
                    rows.append(Annotation(it.key, "od", width=it.width, height=it.height,
                                           bboxes=[[x - 5, 0, x + 5, 10]] if found else [],
                                           labels=["bar"] if found else [], scores=[0.9] if found else []))
                else:
                    rows.append(Annotation(it.key, task, width=it.width, height=it.height, text="seen"))
        return rows

    def count(self, name, n):
        self.stats[name] = self.stats.get(name, 0) + n

    def annotate_stream(self, batches):  # in order (Engine's may not be: OutOfOrderStream)
        for batch in batches:
            yield self.annotate(batch)


def test_the_mirrored_pass_finds_what_the_plain_one_missed_where_it_is():
    pixels = torch.zeros(3, 8, 40)
    pixels[:, :, 6] = 1.0  # a bright bar on the left: the engine misses it unless mirrored
    item = ImageItem("a.png", width=400, height=80, pixel_values=pixels, tasks=("od", "caption"))
    engine = BrightColumnEngine()
    rows = FlipAnnotator(engine).annotate(Batch([item], pixels[None], []))
    assert engine.calls == [("a.png", ("od", "caption")), ("a.png\x00mirrored", ("od",))]  # captions are not mirrored
    od = next(r for r in rows if r.task == "od")
    (x1, _, x2, _), = od.bboxes
    assert (x1 + x2) / 2 == pytest.approx((6 + 0.5) * 400 / 40)  # the bar's place in the original image
    assert od.labels == ["bar"] and od.scores == [0.9]
    assert engine.stats == {"tta_flip_images": 1, "tta_flip_boxes_added": 1}
    assert [r.task for r in rows] == ["od", "caption"]


def test_only_box_tasks_of_the_whole_image_are_mirrored():
    assert {t for t in TASKS if TASKS[t].mirrorable} == {"od", "dense_region_caption", "region_proposal"}


def test_config_checks_and_resume_identity():
    tasks = tuple(parse_task_list("od"))
    assert RunConfig(inputs=("x",), tasks=tasks).identity()["tta"] is None  # old manifests lack it: None
    assert RunConfig(inputs=("x",), tasks=tasks, tta="flip").identity()["tta"] == "flip"
    with pytest.raises(ConfigError):
        RunConfig(inputs=("x",), tasks=tasks, tta="rotate")
    with pytest.raises(ConfigError):
        RunConfig(inputs=("x",), tasks=tasks, tta="flip", tiling=TileSettings.parse("auto", 0.2))


def test_run_cli_with_tta_flip(image_dir, tmp_path):
    """Through `annotate run`: every image's box task runs mirrored too (the summary counts them), the
    manifest records --tta, and a resume with other --tta is refused like any other change of settings."""
    import json

    from click.testing import CliRunner

    from annotator.cli import cli

    out = tmp_path / "ann"
    args = ["run", str(image_dir), "--tasks", "caption,od", "--model", "random:tiny", "--out", str(out),
            "--workers", "0", "--num-beams", "1", "--max-new-tokens", "8", "--no-progress"]
    res = CliRunner().invoke(cli, [*args, "--tta", "flip"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "rows ok: 10" in res.output and "tta flip images: 5" in res.output
    assert json.loads((out / "manifest.json").read_text())["identity"]["tta"] == "flip"
    again = CliRunner().invoke(cli, args)
    assert again.exit_code != 0 and "tta: 'flip' -> None" in again.output


class OutOfOrderStream(BrightColumnEngine):
    """A stream that returns batches as they 'finish': all of them pulled first, then in reverse."""

    def annotate_stream(self, batches):
        pulled = list(batches)
        self.fed = [[it.key for it in b.items] for b in pulled]
        for batch in reversed(pulled):
            yield self.annotate(batch)


def test_the_stream_decodes_both_passes_together_and_merges_batches_finishing_out_of_order():
    """Each mirrored batch goes into the engine's stream right behind its plain one (so the two decode
    beside each other, not one after the other), and whatever order they come back in, each input
    batch comes out once, merged as the one-batch path merges it."""
    def item(key, col):
        pixels = torch.zeros(3, 8, 40)
        pixels[:, :, col] = 1.0
        return ImageItem(key, width=400, height=80, pixel_values=pixels, tasks=("od", "caption"))

    batches = [[item("a.png", 6), item("b.png", 30)], [item("c.png", 2)], [item("d.png", 35)]]
    make = lambda items: Batch(items, torch.stack([i.pixel_values for i in items]), [])  # noqa: E731
    expected = [FlipAnnotator(BrightColumnEngine()).annotate(make(b)) for b in batches]
    engine = OutOfOrderStream()
    got = list(FlipAnnotator(engine).annotate_stream(make(b) for b in batches))
    assert engine.fed == [["a.png", "b.png"], ["a.png\x00mirrored", "b.png\x00mirrored"], ["c.png"],
                          ["c.png\x00mirrored"], ["d.png"], ["d.png\x00mirrored"]]
    assert sorted(got, key=lambda rows: rows[0].image) == expected
    assert all(not r.image.endswith("\x00mirrored") for rows in got for r in rows)
    assert engine.stats == {"tta_flip_images": 4, "tta_flip_boxes_added": 2}
