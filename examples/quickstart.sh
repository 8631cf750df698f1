#!/usr/bin/env bash
# run -> export in every format, on the sample images, with the random model (meaningless
# outputs, no download). Swap --model for florence-community/Florence-2-large for real labels.
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${MODEL:-random:tiny}
python make_samples.py images
annotate run images --tasks caption,od,ocr,ocr_with_region --model "$MODEL" --out out/annotations --num-beams 1 --max-new-tokens 64
annotate info out/annotations
for fmt in coco yolo docvqa florence labelstudio cvat; do
  annotate export out/annotations --format "$fmt" --out "out/$fmt" --overwrite
done
annotate preview out/annotations --out out/preview --limit 20 --overwrite
echo "open examples/out/preview/index.html to look at the annotations"
