"""The sample folder the README points at decodes, upright, in every mode it contains."""

import runpy
import sys
from pathlib import Path

from PIL import Image

from annotator.inputs.images import load_rgb
from annotator.inputs.sources import discover

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_make_samples_writes_decodable_images(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["make_samples.py", str(tmp_path)])
    runpy.run_path(str(EXAMPLES / "make_samples.py"), run_name="__main__")
    refs = discover([tmp_path]).refs
    assert len(refs) == 8 and "scene_1_00000.png" in {r.key for r in refs}
    assert (tmp_path / "ground_truth.json").is_file() and (tmp_path / "documents" / "texts.jsonl").is_file()
    sizes = {r.key: load_rgb(r.path, 10**8).size for r in refs}
    with Image.open(tmp_path / "rotated.jpg") as im:
        stored = im.size
    assert sizes["rotated.jpg"] == stored[::-1] != stored and max(stored) == 640  # stored sideways, EXIF turns it upright
    assert all(load_rgb(r.path, 10**8).mode == "RGB" for r in refs)
