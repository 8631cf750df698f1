"""The probe behind `annotate run --tta flip` (written before it existed): pseudo-labels of the unlabelled
images and of mirrored copies (`annotate run` on flipped PNGs), combined, against the unlabelled truth.

    python examples/pseudo_label_measurements/tta_probe.py WORK MODEL LABELS [agree|union]

WORK: a loop work folder (its unlabelled/); LABELS: the plain pass (`annotate run --tta none` of MODEL).
Writes WORK/unlabelled-mirror/ and WORK/labels-mirror-<LABELS name>/; prints precision and recall
(IoU >= 0.5, same label; unscored rows dropped, as the export drops them) for: plain, mirror, agree
(both passes, score the mean) and union (plain + mirror-only boxes, score the better pass; what
--tta flip does), and with a last argument writes WORK/tta-<mode>.json (tta_pairs.py makes pairs of it)."""
import json, subprocess, sys
from pathlib import Path
from PIL import Image, ImageOps
sys.path.insert(0, str(Path(__file__).resolve().parent))
from label_quality import iou, load, match  # noqa: E402

work, model, labels = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
mode = sys.argv[4] if len(sys.argv) > 4 else None
src, mir = work / "unlabelled", work / "unlabelled-mirror"
mir.mkdir(exist_ok=True)
sizes = {}
for p in sorted(src.glob("*.png")):
    with Image.open(p) as im:
        sizes[p.name] = im.size
        if not (mir / p.name).exists():
            ImageOps.mirror(im).save(mir / p.name)
out_m = work / f"labels-mirror-{labels.name}"
subprocess.run([sys.executable, "-m", "annotator", "run", str(mir), "--model", model, "--tasks", "od", "--out", str(out_m),
                "--workers", "0", "--num-beams", "1", "--no-progress"], check=True, capture_output=True)
truth = str(src / "ground_truth.json")
gt, plain = load(str(labels), truth, unscored=0.0)
_, mirrored = load(str(out_m), truth, unscored=0.0)
back = {}
for name, ps in mirrored.items():
    w = sizes[Path(name).name][0]
    back[name] = [(l, (w - b[2], b[1], w - b[0], b[3]), s) for l, b, s in ps]
agree, union = {}, {}
for name, ps in plain.items():
    qs = back.get(name, [])
    a, used = [], set()
    for l, b, s in sorted(ps, key=lambda p: -p[2]):
        j = max((j for j, q in enumerate(qs) if j not in used and q[0] == l), key=lambda j: iou(b, qs[j][1]), default=None)
        if j is not None and iou(b, qs[j][1]) >= 0.5:
            used.add(j)
            q = qs[j][1]
            a.append((l, tuple((u + v) / 2 for u, v in zip(b, q)), (s + qs[j][2]) / 2))
    agree[name] = a
    extra = [q for q in qs if not any(q[0] == l and iou(q[1], b) >= 0.5 for l, b, _ in ps)]
    union[name] = [(l, b, max([s] + [q[2] for q in qs if q[0] == l and iou(q[1], b) >= 0.5])) for l, b, s in ps] + extra
res = {}
for tag, preds in (("plain", plain), ("mirror", back), ("agree", agree), ("union", union)):
    m, ngt = match(gt, {k: v for k, v in preds.items() if k in gt})
    for t in (0.5, 0.6, 0.7, 0.8):
        kept = [x for x in m if x[1] >= t]
        tp = sum(x[2] for x in kept)
        print(f"{tag:7s} >= {t}: {len(kept):4d} boxes, precision {tp / max(1, len(kept)):.2f}, recall {tp / ngt:.2f}, "
              f"images {len({x[0] for x in kept})}")
if mode:
    json.dump({k: v for k, v in (agree if mode == "agree" else union).items()}, open(work / f"tta-{mode}.json", "w"))
