"""README rows from the loop's per-round records (stderr lines of examples/pseudo_label_loop.py).
usage: python examples/pseudo_label_measurements/table.py LABEL=LOG [LABEL=LOG ...]   (one log per seed and variant)"""
import json, statistics as st, sys

recs, befores = {}, {}
for arg in sys.argv[1:]:
    label, path = arg.split("=", 1)
    for line in open(path):
        if line.startswith("{") and '"round"' in line:
            r = json.loads(line)
            recs[(label, r["seed"], r["round"])] = r
            befores[r["seed"]] = r["before"]["AP50"]
seeds = sorted(befores)
labels = list(dict.fromkeys(k[0] for k in recs))
def mean_sd(v): return f"{st.mean(v):.3f} ± {st.stdev(v):.3f} (n={len(v)})" if len(v) > 1 else f"{v[0]:.3f} (n=1)"
print("| | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd (AP50) |")
print("|---|" + "---|" * (len(seeds) + 1))
print("| demo model, before | " + " | ".join(f"{befores[s]:.3f}" for s in seeds) + f" | {mean_sd([befores[s] for s in seeds])} |")
for label in labels:
    for k in sorted({k[2] for k in recs if k[0] == label}):
        cells, vals = [], []
        for s in seeds:
            r = recs.get((label, s, k))
            if r is None:
                cells.append("-"); continue
            v = r["after"]["AP50"]; vals.append(v)
            cells.append(f"{v:.3f} ({r['pairs']} pairs)")
        print(f"| {label}, round {k} | " + " | ".join(cells) + f" | {mean_sd(vals)} |")
