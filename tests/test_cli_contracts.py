"""Small promises the README makes (issue 30, item 7): exit codes, environment defaults for nested
commands, a counted drop instead of a traceback, PIL's limit left alone, exports that do not follow
links the run refused, tensors-only torch.load, and eval figures that say they are absent."""

from __future__ import annotations

import ast
import json
import math
from collections import Counter
from pathlib import Path

from click.testing import CliRunner
from PIL import Image

from annotator.cli import cli

ROOT = Path(__file__).resolve().parents[1]
LS_TASK = {"data": {"image": "a.png", "key": "a.png", "width": 40, "height": 30},
           "annotations": [{"result": [{"id": "r1", "type": "rectanglelabels", "from_name": "label", "to_name": "image",
                                        "original_width": 40, "original_height": 30,
                                        "value": {"x": 10, "y": 10, "width": 20, "height": 20,
                                                  "rectanglelabels": ["car"]}}]}]}


def errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error")]


def test_import_into_a_refused_out_exits_2_with_one_line(tmp_path):
    src = tmp_path / "export.json"
    src.write_text(json.dumps([LS_TASK]))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    res = CliRunner().invoke(cli, ["import", "labelstudio", str(src), "--out", str(mine)])
    assert res.exit_code == 2, res.output
    assert len(errors(res.output)) == 1 and "not empty" in res.output and "Traceback" not in res.output


def test_nested_commands_read_their_environment_defaults(tmp_path):
    """ANNOTATE_<COMMAND>_<OPTION> as spelled on the command line: `import labelstudio --format` is
    ANNOTATE_IMPORT_LABELSTUDIO_FORMAT (its Python name is `target`: click's own prefix misses it)."""
    src = tmp_path / "export.json"
    src.write_text(json.dumps([LS_TASK]))
    out = tmp_path / "from-env"
    env = {"ANNOTATE_IMPORT_LABELSTUDIO_OUT": str(out), "ANNOTATE_IMPORT_LABELSTUDIO_FORMAT": "florence"}
    res = CliRunner().invoke(cli, ["import", "labelstudio", str(src)], env=env)
    assert res.exit_code == 2 and "--images" in res.output  # florence was chosen: it needs the images
    res = CliRunner().invoke(cli, ["import", "labelstudio", str(src)], env={"ANNOTATE_IMPORT_LABELSTUDIO_OUT": str(out)})
    assert res.exit_code == 0, res.output
    assert json.loads((out / "annotations.json").read_text())["annotations"]


def test_a_label_studio_task_with_a_word_for_its_width_is_a_counted_drop():
    from exporters.review_read import ls_image

    drops: Counter = Counter()
    task = json.loads(json.dumps(LS_TASK))
    task["data"]["width"] = "wide"
    for r in task["annotations"][0]["result"]:
        r.pop("original_width")
    assert ls_image(task, None, drops) is None
    assert drops == Counter({"no image size": 1})
    task["data"]["width"] = "40"  # a number as text is still a size
    assert ls_image(task, None, Counter()).width == 40


def test_decoding_leaves_pils_pixel_limit_as_it_was(tiny_lm, tmp_path):
    from annotator.inputs.images import ImageDataset, WorkItem
    from annotator.inputs.sources import ImageRef

    path = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(path)
    before = Image.MAX_IMAGE_PIXELS
    assert before is not None
    ds = ImageDataset([WorkItem(ImageRef("a.png", path=path), ("caption",))], tiny_lm.processor.image_processor,
                      max_pixels=10**10)
    image, item = ds.load(0)
    assert image is not None and item.width == 40
    assert Image.MAX_IMAGE_PIXELS == before


def test_exports_do_not_follow_a_link_out_of_the_input_folder(tmp_path):
    from export_fixtures import make_run

    from exporters.read import Run

    ann, root = make_run(tmp_path)
    key = next(p for p in root.rglob("*.jpg")).relative_to(root).as_posix()
    secret = tmp_path / "secret.jpg"
    (root / key).rename(secret)
    (root / key).symlink_to(secret)
    drops: Counter = Counter()
    assert Run(ann).find_image(key, drops) is None
    assert sum(drops.values()) == 1 and "symlink" in next(iter(drops))
    manifest = json.loads((ann / "manifest.json").read_text())
    (ann / "manifest.json").write_text(json.dumps(dict(manifest, follow_symlinks=True)))  # run --follow-symlinks
    assert Run(ann).find_image(key) == root / key


def test_every_torch_load_is_tensors_only():
    unsafe = []
    for path in [*ROOT.glob("annotator/**/*.py"), *ROOT.glob("exporters/**/*.py"), *ROOT.glob("examples/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if kw.get("weights_only") != "True":
                    unsafe.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not unsafe


def test_eval_shows_unmeasured_figures_as_absent():
    from annotator.readback.coco_eval import EvalReport, json_ready

    report = EvalReport(stats={"AP": 0.42, "AP_small": -1.0}, by_threshold={0.0: 0.42},
                        per_class={"car": 0.5, "zebra": math.nan})
    text = "\n".join(report.lines())
    assert "nan" not in text and "-1.000" not in text
    assert "absent from the ground truth" in text and "not computed" in text and "0.420" in text
    data = json.loads(json.dumps(json_ready(report), allow_nan=False))
    assert data["stats"]["AP_small"] is None and data["per_class"]["zebra"] is None
