"""Train the demo model (`--model demo`) from scratch on the synthetic world, on a CPU.

    python examples/train_demo.py --out annotator/demo_model            # the shipped run
    python examples/train_demo.py --out /tmp/probe --steps 300 --tasks od  # a quick probe

Every batch is freshly drawn (annotator/samples.py, seeded), so the model never sees an image twice
and the held-out scenes (another seed) measure generalisation. The loss, batches and checkpoint
writing are `annotate finetune`'s own (annotator/finetune.py); what is particular to training from
scratch is here: the architecture and its initialisation (annotator/demo.py), a warm-up + cosine
schedule at 3e-4 (post-LN BART diverges at 1e-3), and a curriculum from few large objects to the
full world.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotator import demo, samples  # noqa: E402
from annotator.finetune import Sample, collate, encode_prompt, encode_target, loss_sum, save_model  # noqa: E402

TASK_WEIGHTS = {"od": 0.45, "caption_to_phrase_grounding": 0.1, "caption": 0.1, "ocr": 0.15, "ocr_with_region": 0.2}
DOC_TASKS = {"ocr", "ocr_with_region"}


def draw_batch(rng: np.random.Generator, processor, batch: int, tasks: dict[str, float], progress: float,
               cache: dict) -> tuple[list[Sample], list[samples.Drawn]]:
    """`batch` fresh images, each with one task drawn by weight. Curriculum: in the first quarter
    scenes hold at most 3 objects of at least 12% of the short side."""
    names = list(tasks)
    p = np.array([tasks[n] for n in names]) / sum(tasks.values())
    out, drawn = [], []
    for i in range(batch):
        task = str(rng.choice(names, p=p))
        if task in DOC_TASKS or (task == "caption" and rng.random() < 0.3):
            d = samples.document(rng)
        elif progress < 0.25:
            d = samples.scene(rng, size_range=(0.12, 0.5), max_objects=3)
        else:
            d = samples.scene(rng)
        pairs = samples.florence_pairs(d)
        if task not in pairs:
            task = "caption"
        prompt, target = pairs[task]
        ids = cache.get(prompt) or cache.setdefault(prompt, encode_prompt(processor, prompt))
        pixels = processor.image_processor(images=d.image, return_tensors="pt")["pixel_values"][0]
        out.append(Sample(i, pixels, ids, encode_target(processor, target)))
        drawn.append(d)
    return out, drawn


# --------------------------------------------------------------------------- the dense auxiliary loss
# Trained from scratch, the decoder first learns the answers' priors, and the vision path, whose
# gradient then carries little, collapses to image-independent features (measured: after 500 steps
# the loss on shuffled images equalled the loss on the right ones; features varied 1% between
# images). A per-cell target on the projected image features (what covers this cell, and where
# that thing's box edges are) makes every one of the 144 image tokens carry its content from the
# first steps. The head is used in training only and is not part of the saved model.

TEXT_CLASS = len(samples.CATEGORIES) + 1  # 0: background, 1..20: categories, 21: printed text


class CellHead(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(dim, TEXT_CLASS + 1 + 4)

    def loss(self, features: torch.Tensor, drawn: list[samples.Drawn], grid: int) -> torch.Tensor:
        classes, boxes = cell_targets(drawn, grid)
        out = self.proj(features[:, : grid * grid])  # the spatial tokens; the last one is their mean
        ce = torch.nn.functional.cross_entropy(out[..., : TEXT_CLASS + 1].flatten(0, 1), classes.flatten())
        fg = classes > 0
        l1 = (out[..., TEXT_CLASS + 1:][fg] - boxes[fg]).abs().mean() if fg.any() else out.sum() * 0
        return ce + l1


def cell_targets(drawn: list[samples.Drawn], grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, grid*grid] class of what covers each cell's centre (the last drawn wins; an object smaller
    than a cell still claims the cell of its centre) and [B, grid*grid, 4] distances from the
    cell centre to that thing's box edges, in image fractions."""
    classes = torch.zeros(len(drawn), grid, grid, dtype=torch.long)
    boxes = torch.zeros(len(drawn), grid, grid, 4)
    centres = (torch.arange(grid) + 0.5) / grid
    for b, d in enumerate(drawn):
        w, h = d.image.size
        things = [(samples.CATEGORIES.index(c) + 1, box) for c, box in d.objects]
        things += [(TEXT_CLASS, [q[0], q[1], q[4], q[5]]) for _, q in d.lines]
        for cls, (x1, y1, x2, y2) in things:
            x1, x2, y1, y2 = x1 / w, x2 / w, y1 / h, y2 / h
            inside = ((centres[:, None] >= y1) & (centres[:, None] <= y2)) & ((centres[None] >= x1) & (centres[None] <= x2))
            inside[min(grid - 1, int((y1 + y2) / 2 * grid)), min(grid - 1, int((x1 + x2) / 2 * grid))] = True
            classes[b][inside] = cls
            cy, cx = torch.meshgrid(centres, centres, indexing="ij")
            edges = torch.stack([cx - x1, cy - y1, x2 - cx, y2 - cy], dim=-1)
            boxes[b][inside] = edges[inside]
    return classes.flatten(1), boxes.flatten(1, 2)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--tasks", default=",".join(TASK_WEIGHTS), help="comma-separated subset of " + ",".join(TASK_WEIGHTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--aux", type=float, default=1.0, help="weight of the per-cell auxiliary loss (0: off)")
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = {t: TASK_WEIGHTS[t] for t in args.tasks.split(",")}

    processor = demo.build_processor()
    model = demo.build_model(processor, seed=args.seed)
    text_config = model.config.text_config
    head = CellHead(model.config.vision_config.projection_dim)
    captured = {}
    model.model.multi_modal_projector.register_forward_hook(lambda mod, inp, out: captured.__setitem__("f", out))
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=args.lr, weight_decay=0.01,
                            betas=(0.9, 0.98))
    rng = np.random.default_rng(args.seed)
    cache: dict = {}
    log = []
    start = time.time()
    print(f"demo model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
          f"tokenizer {len(processor.tokenizer)}", flush=True)
    model.train()
    running = None
    for step in range(args.steps):
        drawn_samples, drawn = draw_batch(rng, processor, args.batch, tasks, step / args.steps, cache)
        batch = collate(drawn_samples, processor.tokenizer.pad_token_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        loss = loss_sum(model, batch, text_config) / batch.tokens()
        aux = head.loss(captured.pop("f"), drawn, demo.GRID) if args.aux else 0.0
        opt.zero_grad(set_to_none=True)
        (loss + args.aux * aux).backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(head.parameters()), 1.0)
        opt.step()
        now = torch.tensor([loss.item(), float(aux.detach()) if torch.is_tensor(aux) else aux])
        running = now if running is None else 0.98 * running + 0.02 * now
        if (step + 1) % 50 == 0:
            rec = {"step": step + 1, "loss": round(running[0].item(), 4), "cell_loss": round(running[1].item(), 4),
                   "minutes": round((time.time() - start) / 60, 2)}
            log.append(rec)
            print(json.dumps(rec), flush=True)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            card = demo.model_card(args=vars(args), log=log) if hasattr(demo, "model_card") else ""
            save_model(model.eval(), processor, args.out, {"training_log.json": json.dumps(log, indent=1),
                                                          "README.md": card})
            model.train()
    print(f"done: {args.steps} steps in {(time.time() - start) / 60:.1f} min -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
