#!/usr/bin/env bash
# One command for a person with a GPU: does half precision keep the answers, which decode path and
# attention kernels run, and how fast is it. Exits non-zero, with a FAIL line, on a wrong answer.
#
#   bash examples/gpu_check.sh                 # on the first CUDA GPU
#   DEVICE=cpu bash examples/gpu_check.sh      # the same checks on the CPU (bf16; small sizes)
#
# Sizes (environment): SCENES (60) and PAGES (30) for the demo model's quality, IMAGES (16) per bench,
# BENCH_MODELS ("random:base random:large"; on CPU "random:tiny"). Needs the project installed
# (`pip install -e .`, plus `.[gpu]` for flash-attn). Writes its figures to ${OUT:-gpu_check_out}/.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
fail() { echo "FAIL: $*" >&2; exit 1; }

if [ "$DEVICE" = cpu ]; then
  export CUDA_VISIBLE_DEVICES=""   # every step below then runs on the CPU
  SCENES=${SCENES:-8}; PAGES=${PAGES:-4}; IMAGES=${IMAGES:-2}
  BENCH_MODELS=${BENCH_MODELS:-random:tiny}
else
  SCENES=${SCENES:-60}; PAGES=${PAGES:-30}; IMAGES=${IMAGES:-16}
  BENCH_MODELS=${BENCH_MODELS:-"random:base random:large"}
  $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || fail "no CUDA device visible to torch; DEVICE=cpu runs the checks on the CPU"
fi

echo "== 1. device, --dtype auto, attention, decode path"
HALVES=$($PY - "$DEVICE" <<'EOF'
import sys
import torch
from annotator.config import GenerationSettings, ModelSpec, TaskInputs
from annotator.decode.engine import Engine
from annotator.model.load import load_model
from annotator.model.precision import auto_dtype
from annotator.tasks import parse_task_list

dev = torch.device("cuda" if sys.argv[1] != "cpu" else "cpu")
choice = auto_dtype(dev)
print(f"torch {torch.__version__}  device {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}",
      file=sys.stderr)
print(f"--dtype auto -> {choice.dtype} ({choice.reason})", file=sys.stderr)
lm = load_model(ModelSpec("demo", dtype="auto"), dev)
engine = Engine(lm, parse_task_list("od"), TaskInputs(), GenerationSettings(num_beams=3))
print(f"attention implementation: {lm.attention}; decode path: "
      f"{'scheduler (continuous batching)' if engine.use_scheduler else 'generate'}", file=sys.stderr)
if not engine.use_scheduler:
    sys.exit("FAIL: the demo model's decoding fell back to generate: the scheduler should take it")
if dev.type == "cuda":
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(4, 8, 64, 64, device=dev, dtype=torch.bfloat16 if choice.dtype == torch.bfloat16 else torch.float16)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
            print(f"SDPA backend available for {q.dtype}: {backend.name}", file=sys.stderr)
            break
        except RuntimeError:
            print(f"SDPA backend not available for {q.dtype}: {backend.name}", file=sys.stderr)
    halves = ["bfloat16", "float16"] if torch.cuda.get_device_capability(dev) >= (8, 0) else ["float16"]
else:
    halves = ["bfloat16"]
print(" ".join(halves))
EOF
) || fail "step 1 (see above)"

echo "== 2. demo model: half precision vs float32 on held-out scenes ($SCENES) and pages ($PAGES)"
for half in $HALVES; do
  $PY examples/precision_check.py --half "$half" --scenes "$SCENES" --pages "$PAGES" --json "$OUT/precision_$half.json" \
    || fail "$half gives wrong answers on the demo model (table above)"
done

echo "== 3. annotate bench, realistic lengths, greedy (README's H100 estimate: ~230 images/s base, ~75 large)"
for model in $BENCH_MODELS; do
  for dtype in float32 $HALVES; do
    name="$OUT/bench_${model#random:}_$dtype"
    annotate bench --model "$model" --dtype "$dtype" --images "$IMAGES" --batch-size "$IMAGES" --num-beams 1 \
      --lengths realistic --json "$name.json" > "$name.txt" 2>&1 || { cat "$name.txt"; fail "bench $model $dtype"; }
    grep -E "^(matmul ceiling \(best|engine:|engine decoding:)" "$name.txt" | sed "s/^/  $model $dtype: /"
    grep -q "engine decoding: scheduler" "$name.txt" || fail "bench $model $dtype did not decode through the scheduler"
  done
done
$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
rows = [json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("bench_*.json"))]
for r in rows:
    print(f"  {r['model']:13s} {r['dtype']:9s} {r['engine']['images_per_s']:8.3f} images/s  "
          f"{r['engine']['gflops']:7.0f} GFLOP/s = {r['ceiling']:.0%} of {r['ceiling_gflops']:.0f} "
          f"(fp32 ceiling {r['fp32_ceiling_gflops']:.0f})")
EOF
echo "gpu check: ok (figures in $OUT/)"
