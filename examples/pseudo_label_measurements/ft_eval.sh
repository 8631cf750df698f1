#!/bin/bash
# run from the repository root, with the environment active
# usage: ft_eval.sh SEEDDIR PAIRS BASEMODEL TAG [finetune flags...]
set -e
W=$1; P=$2; M=$3; T=$4; shift 4
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
t0=$(date +%s)
[ -f $W/model-$T/finetune.json ] || python -m annotator finetune $P --model $M --out $W/model-$T --workers 0 --overwrite --no-progress "$@" > $W/ft-$T.log 2>&1
t1=$(date +%s)
python - <<PY
import json
from pathlib import Path
from annotator.readback.quality import measure
q = measure("$W/model-$T", Path("$W/test"), Path("$W/test-$T"), tasks="od", num_beams=1)
d = json.load(open("$W/model-$T/finetune.json"))
print(json.dumps({"dir": "$W", "tag": "$T", "AP50": round(q.od["AP50"], 4), "AP": round(q.od["AP"], 4), "ft_s": $t1 - $t0, "eval_s": __import__("time").time() - $t1, "hist": [(h["epoch"], round(h["train_loss"],3), round(h.get("val_loss") or 0,3)) for h in d["history"]]}))
PY
