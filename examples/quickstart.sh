#!/usr/bin/env bash
# samples -> run -> info -> every export -> preview. Uses Florence-2-base from the hub when the hub
# answers, else the small demo model that ships with the package (offline, real boxes and text on
# the drawn samples). MODEL=... overrides (random:tiny: a dry run with meaningless outputs).
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v annotate >/dev/null; then  # a fresh clone: set up a venv first (CPU torch, as .ci/run does)
  python3 -m venv ../.venv && . ../.venv/bin/activate
  python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0" \
    || python -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu
  python -m pip install --quiet -e ..
fi
if [ -z "${MODEL:-}" ]; then
  if [ "${HF_HUB_OFFLINE:-0}" = "0" ] && python -c "import urllib.request; urllib.request.urlopen('https://huggingface.co', timeout=5)" 2>/dev/null; then
    MODEL=florence-community/Florence-2-base
  else
    MODEL=demo
    echo "the hub is not reachable: using the demo model (knows shapes and printed words only)"
  fi
fi
python make_samples.py images
annotate run images --tasks caption,od,ocr,ocr_with_region --model "$MODEL" --out out/annotations --overwrite
annotate info out/annotations
for fmt in coco yolo docvqa florence labelstudio cvat; do
  annotate export out/annotations --format "$fmt" --out "out/$fmt" --overwrite
done
annotate eval out/coco --gt images/ground_truth.json --iou 0.5   # against the drawn scenes' truth
annotate preview out/annotations --out out/preview --limit 20 --overwrite
echo "open examples/out/preview/index.html to look at the annotations"
