"""Pseudo-label quality against the unlabelled set's truth (which the loop never uses): per score
threshold, precision and recall of boxes (IoU >= 0.5, same label), boxes per image, images with any box."""
import glob, json, sys
import numpy as np, pandas as pd

def iou(a, b):
    x1, y1 = max(a[0], b[0]), max(a[1], b[1]); x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    i = max(0, x2 - x1) * max(0, y2 - y1)
    return i / ((a[2]-a[0])*(a[3]-a[1]) + (b[2]-b[0])*(b[3]-b[1]) - i + 1e-9)

def load(labels, truth):
    g = json.load(open(truth)); cats = {c["id"]: c["name"] for c in g["categories"]}
    names = {i["id"]: i["file_name"] for i in g["images"]}
    gt = {n: [] for n in names.values()}
    for a in g["annotations"]:
        x, y, w, h = a["bbox"]; gt[names[a["image_id"]]].append((cats[a["category_id"]], (x, y, x+w, y+h)))
    df = pd.concat([pd.read_parquet(f) for f in glob.glob(f"{labels}/*.parquet")])
    df = df[df.task == "od"]
    preds = {}
    for _, r in df.iterrows():
        if r.bboxes is None or r.labels is None:
            preds[r.image] = []; continue
        bb = r.bboxes
        preds[r.image] = [(l, tuple(b), float(s)) for l, b, s in zip(r.labels, bb, r.scores if r.scores is not None else [1.0] * len(bb))]
    return gt, preds

def match(gt, preds):
    """-> list of (score, is_tp) over all predictions, and #gt"""
    out = []
    for img, ps in preds.items():
        used = set()
        for l, b, s in sorted(ps, key=lambda p: -p[2]):
            hit = False
            for j, (gl, gb) in enumerate(gt[img]):
                if j not in used and gl == l and iou(b, gb) >= 0.5:
                    used.add(j); hit = True; break
            out.append((img, s, hit))
    return out, sum(len(v) for v in gt.values())

if __name__ == "__main__":
    labels, truth = sys.argv[1], sys.argv[2]
    gt, preds = load(labels, truth)
    m, ngt = match(gt, preds)
    print(f"{labels}: {len(gt)} images, {ngt} true objects ({ngt/len(gt):.1f}/img), {len(m)} predicted boxes")
    for t in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        kept = [x for x in m if x[1] >= t]
        tp = sum(x[2] for x in kept)
        imgs = len({x[0] for x in kept})
        print(f"  >= {t:.1f}: {len(kept):4d} boxes, precision {tp/max(1,len(kept)):.2f}, recall {tp/ngt:.2f}, images with a box {imgs}")
