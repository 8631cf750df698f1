"""Write a small, license-clean sample folder (every image is drawn here, nothing downloaded).

    python examples/make_samples.py examples/images

The images come from the synthetic world that the demo model knows (`annotate samples`: scenes of
coloured shapes and pages of text, with ground_truth.json and texts.jsonl beside them), plus the
files real folders contain that decode differently: an EXIF-rotated JPEG, grayscale, 16-bit,
palette, CMYK and a nested subfolder."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotator.demo import world as samples  # noqa: E402


def main(out: Path) -> None:
    samples.write(out, n=2, seed=1, kind="scenes")  # with ground_truth.json: annotate eval scores the run
    samples.write(out / "documents", n=1, seed=2, kind="documents")
    rng = np.random.default_rng(3)
    scene = lambda: samples.scene(rng).image  # noqa: E731
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways; viewers (and we) rotate it upright
    upright = scene()
    upright.thumbnail((640, 640))  # smaller, shapes undistorted
    upright.rotate(90, expand=True).save(out / "rotated.jpg", exif=exif.tobytes())
    scene().convert("L").save(out / "gray.png")
    scene().convert("CMYK").save(out / "print.tif")
    Image.fromarray(np.asarray(scene().convert("L"), dtype=np.uint16) * 257).save(out / "sixteen_bit.png")
    scene().convert("RGBA").convert("P", palette=Image.ADAPTIVE).save(out / "palette.gif")
    print(f"wrote {len(list(out.rglob('*.*')))} files to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/images"))
