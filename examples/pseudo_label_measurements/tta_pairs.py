"""Florence pairs (train/ and valid/, as `annotate export --format florence --skip-empty` lays them out)
from tta_probe.py's WORK/tta-<MODE>.json, boxes scored >= T, in reading order:

    python examples/pseudo_label_measurements/tta_pairs.py WORK MODE T OUT"""
import json, shutil, sys
from pathlib import Path
from PIL import Image
from annotator.model.sequence import loc_tokens
from exporters.files import assign_splits

work, mode, t, out = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), Path(sys.argv[4])
boxes = json.load(open(work / f"tta-{mode}.json"))
kept = {k: sorted([b for b in v if b[2] >= t], key=lambda b: (b[1][1], b[1][0])) for k, v in boxes.items()}
kept = {k: v for k, v in kept.items() if v}
splits = assign_splits(sorted(boxes), 0.1)
n = {"train": 0, "val": 0, "instances": 0}
for split, d in (("train", "train"), ("val", "valid")):
    (out / d).mkdir(parents=True, exist_ok=True)
    with open(out / d / "annotations.jsonl", "w") as fh:
        for k, v in sorted(kept.items()):
            if splits[k] != split:
                continue
            src = work / "unlabelled" / k
            w, h = Image.open(src).size
            shutil.copy(src, out / d / k)
            fh.write(json.dumps({"image": k, "prefix": "<OD>", "suffix": "".join(l + loc_tokens(b, w, h) for l, b, _ in v)}) + "\n")
            n[split] += 1; n["instances"] += len(v)
print(json.dumps(n))
