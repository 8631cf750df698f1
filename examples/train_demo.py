"""Train the demo model (`--model demo`) from scratch on the synthetic world, on a CPU.

    python examples/train_demo.py --out annotator/demo_model            # the shipped run
    python examples/train_demo.py --out /tmp/probe --steps 300 --tasks od  # a quick probe

Every batch is freshly drawn (annotator/demo/world.py, seeded), so the model never sees an image twice
and the held-out scenes (another seed) measure generalisation. The loss, batches and checkpoint
writing are `annotate finetune`'s own (annotator/finetune/); what is particular to training from
scratch is here: the architecture and its initialisation (annotator/demo/architecture.py), a warm-up + cosine
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
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotator.demo import architecture as demo, world as samples  # noqa: E402
from annotator.finetune import Sample, collate, encode_prompt, encode_target, loss_sum, save_model  # noqa: E402

TASK_WEIGHTS = {"od": 0.45, "caption_to_phrase_grounding": 0.1, "caption": 0.1, "ocr": 0.15, "ocr_with_region": 0.2}
DOC_TASKS = {"ocr", "ocr_with_region"}


def draw_batch(rng: np.random.Generator, processor, batch: int, tasks: dict[str, float], progress: float,
               cache: dict, od_pages: float = 0.0) -> tuple[list[Sample], list[samples.Drawn]]:
    """`batch` fresh images, each with one task drawn by weight. Curriculum: in the first quarter
    scenes hold at most 3 objects of at least 12% of the short side. A share `od_pages` of the `od`
    draws is a page of text, whose answer is empty: no shapes there."""
    names = list(tasks)
    p = np.array([tasks[n] for n in names]) / sum(tasks.values())
    out, drawn = [], []
    for i in range(batch):
        task = str(rng.choice(names, p=p))
        if task in DOC_TASKS or (task == "caption" and rng.random() < 0.3) or (task == "od" and rng.random() < od_pages):
            d = samples.document(rng)
        elif progress < 0.25:
            d = samples.scene(rng, size_range=(0.12, 0.5), max_objects=3)
        else:
            d = samples.scene(rng)
        pairs = samples.truth_pairs(d)
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
# images). A dense target on the projected image features fixes that from the first step: each of
# the 144 image tokens learns what covers it (a class) and that thing's box, read out through the
# same location-token embeddings the decoder writes with (so a token's features already hold its
# box "in the decoder's words", and the decoder only has to find the right tokens and copy).
# Without the box part, labels were read from the image by step 500 but locations were not, even at
# step 1000 (location loss 6.47 with the right images, 6.48 with shuffled ones; uniform is 6.91).
# The head is used in training only and is not part of the saved model.

TEXT_CLASS = len(samples.CATEGORIES) + 1  # 0: background, 1..20: categories, 21: printed text


class CellHead(torch.nn.Module):
    def __init__(self, dim: int, loc_ids: list[int], tokens: Callable[[str], list[int]]):
        super().__init__()
        self.classes = torch.nn.Linear(dim, TEXT_CLASS + 1)
        self.coords = torch.nn.Linear(dim, 4 * dim)  # x1, y1, x2, y2, each as a query over <loc_i> embeddings
        self.words = torch.nn.Linear(dim, 2 * dim)  # the words naming what covers the cell, as queries over words
        self.register_buffer("loc_ids", torch.tensor(loc_ids), persistent=False)
        self.tokens = tokens  # text -> token ids, as the answers spell it

    def loss(self, features: torch.Tensor, embeddings: torch.Tensor, drawn: list[samples.Drawn], grid: int) -> torch.Tensor:
        classes, bins, words = cell_targets(drawn, grid, self.tokens)
        f = features[:, 1:]  # the projector puts the mean of all cells first, then the cells row by row
        ce = torch.nn.functional.cross_entropy(self.classes(f).flatten(0, 1), classes.flatten())
        fg = classes > 0
        if not fg.any():
            return ce
        queries = self.coords(f[fg]).view(-1, 4, f.shape[-1])  # [cells, 4, d]
        logits = queries @ embeddings[self.loc_ids].T  # [cells, 4, 1000]: the tied output layer's loc rows
        loss = ce + torch.nn.functional.cross_entropy(logits.flatten(0, 1), bins[fg].flatten())
        named = words[..., 0] >= 0
        if named.any():  # the label or the printed word, in the words the decoder writes (else labels collapsed to one)
            guess = self.words(f[named]).view(-1, 2, f.shape[-1]) @ embeddings.T  # [cells, 2, vocab]
            loss = loss + torch.nn.functional.cross_entropy(guess.flatten(0, 1), words[named].flatten(), ignore_index=-100)
        return loss


def cell_targets(drawn: list[samples.Drawn], grid: int, tokens: Callable[[str], list[int]] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, grid*grid] class of what covers each cell's centre (the last drawn wins; an object smaller
    than a cell still claims the cell of its centre), [B, grid*grid, 4] that thing's box as
    location bins, quantized as the answers quantize them, and [B, grid*grid, 2] the token ids of
    the words that name it: a shape's colour and shape, or the printed word at that cell of a text
    line (words placed by their share of the line's characters); -100 where none (or no `tokens`)."""
    from annotator.model.sequence import quantize

    classes = torch.zeros(len(drawn), grid, grid, dtype=torch.long)
    bins = torch.zeros(len(drawn), grid, grid, 4, dtype=torch.long)
    words = torch.full((len(drawn), grid, grid, 2), -100, dtype=torch.long)
    centres = (torch.arange(grid) + 0.5) / grid
    for b, d in enumerate(drawn):
        w, h = d.image.size
        things = [(samples.CATEGORIES.index(c) + 1, box, box, c) for c, box in d.objects]
        things += [(TEXT_CLASS, [q[0], q[1], q[4], q[5]], part, word) for text, q in d.lines
                   for part, word in _word_boxes(text, [q[0], q[1], q[4], q[5]])]
        for cls, (x1, y1, x2, y2), (px1, py1, px2, py2), name in things:
            inside = ((centres[:, None] >= py1 / h) & (centres[:, None] <= py2 / h)) & \
                     ((centres[None] >= px1 / w) & (centres[None] <= px2 / w))
            inside[min(grid - 1, int((py1 + py2) / 2 / h * grid)), min(grid - 1, int((px1 + px2) / 2 / w * grid))] = True
            classes[b][inside] = cls
            bins[b][inside] = torch.tensor([quantize(x1, w), quantize(y1, h), quantize(x2, w), quantize(y2, h)])
            if tokens is not None:
                ids = tokens(name)[:2] if cls < TEXT_CLASS else tokens(" " + name)[:1]
                words[b][inside] = torch.tensor(ids + [-100] * (2 - len(ids)))
    return classes.flatten(1), bins.flatten(1, 2), words.flatten(1, 2)


def _word_boxes(text: str, box: list[float]) -> list[tuple[list[float], str]]:
    """Each word of a line with its share of the line's box, by character count."""
    x1, y1, x2, y2 = box
    per_char = (x2 - x1) / max(1, len(text))
    out, start = [], 0
    for word in text.split(" "):
        out.append(([x1 + start * per_char, y1, x1 + (start + len(word)) * per_char, y2], word))
        start += len(word) + 1
    return out


def token_weights(labels: torch.Tensor, loc_ids: torch.Tensor, text_weight: float) -> torch.Tensor:
    """Words (labels, captions, text) weigh `text_weight` times a location token, padding 0. Four
    location tokens per box, each far less certain than a label, otherwise outweigh the label:
    measured, a model that placed boxes well (mean bin error 45) named every object with the most
    frequent label."""
    return torch.where(torch.isin(labels, loc_ids), 1.0, text_weight) * (labels != -100)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def ship(checkpoint: Path, dest: Path) -> None:
    """`checkpoint` (a stage's float32 output) as float16 into `dest`, with its training log and
    `dest`'s own model card (which holds every stage's command and the measured quality)."""
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    card = dest / "README.md"
    files = {"training_log.json": (checkpoint / "training_log.json").read_text()}
    if card.is_file():
        files["README.md"] = card.read_text()
    model = Florence2ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    save_model(demo.half(model).eval(), AutoProcessor.from_pretrained(checkpoint), dest, files)
    print(f"shipped {checkpoint} -> {dest} (float16)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--tasks", default=",".join(TASK_WEIGHTS), help="comma-separated subset of " + ",".join(TASK_WEIGHTS))
    ap.add_argument("--weights", default="", help="task=weight,... to override the default mix, e.g. ocr=0.3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", type=Path, default=None, help="start from this checkpoint of the script")
    ap.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (the schedule keeps --steps)")
    ap.add_argument("--text-weight", type=float, default=1.0, help="weight of word tokens against location tokens")
    ap.add_argument("--float16", action="store_true", help="save float16 weights (the shipped model: 30 MB budget)")
    ap.add_argument("--image-lr-scale", type=float, default=3.0, help="learning rate of the image path, relative")
    ap.add_argument("--aux", type=float, default=1.0, help="weight of the per-cell auxiliary loss (0: off)")
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--head", type=Path, default=None,
                    help="keep the dense head in this file: loaded if it exists, saved with each checkpoint "
                         "(so that a run going on with --init does not re-learn it from zero)")
    ap.add_argument("--od-pages", type=float, default=0.0,
                    help="share of od examples drawn as pages of text with an empty answer (stage 10 on)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--ship", type=Path, default=None, metavar="CHECKPOINT",
                    help="train nothing: write this checkpoint of the script into --out as float16, keeping --out's "
                         "model card (how a stage becomes annotator/demo_model)")
    args = ap.parse_args(argv)
    if args.ship:
        return ship(args.ship, args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = {t: TASK_WEIGHTS[t] for t in args.tasks.split(",")}
    for item in filter(None, args.weights.split(",")):
        name, weight = item.split("=")
        if name not in tasks:
            ap.error(f"--weights: {name!r} is not one of the --tasks ({args.tasks})")
        tasks[name] = float(weight)

    if args.init:  # go on from a checkpoint of this script (a new schedule; the dense head is re-learned)
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        processor = AutoProcessor.from_pretrained(args.init)
        model = Florence2ForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
        model.generation_config = demo.build_model(processor, seed=args.seed).generation_config
    else:
        processor = demo.build_processor()
        model = demo.build_model(processor, seed=args.seed)
    text_config = model.config.text_config
    loc_ids = processor.tokenizer.convert_tokens_to_ids([f"<loc_{i}>" for i in range(1000)])
    head = CellHead(model.config.vision_config.projection_dim, loc_ids,
                    lambda text: processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    if args.head and args.head.exists():
        head.load_state_dict(torch.load(args.head, weights_only=True))  # tensors only, never code
    captured = {}
    model.model.multi_modal_projector.register_forward_hook(lambda mod, inp, out: captured.__setitem__("f", out))
    # The image path (pre-norm DaViT, projector, the dense head) trains stably at a higher rate than
    # the post-LN BART, which diverged at 1e-3.
    image_path = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    image_ids = {id(p) for p in image_path}
    groups = [{"params": image_path + list(head.parameters()), "scale": args.image_lr_scale},
              {"params": [p for p in model.parameters() if id(p) not in image_ids], "scale": 1.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    rng = np.random.default_rng(args.seed)
    cache: dict = {}
    log = []
    start = time.time()
    print(f"demo model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
          f"tokenizer {len(processor.tokenizer)}", flush=True)
    model.train()
    running = None
    last = min(args.steps, args.stop_after or args.steps)
    for step in range(last):
        progress = 1.0 if args.init else step / args.steps  # the curriculum is for a model from scratch
        drawn_samples, drawn = draw_batch(rng, processor, args.batch, tasks, progress, cache, args.od_pages)
        batch = collate(drawn_samples, processor.tokenizer.pad_token_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup) * group["scale"]
        weights = token_weights(batch.labels, head.loc_ids, args.text_weight)
        loss = loss_sum(model, batch, text_config, weights) / weights.sum()
        aux = head.loss(captured.pop("f"), model.get_input_embeddings().weight, drawn, demo.GRID) if args.aux else 0.0
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
        if (step + 1) % args.save_every == 0 or step + 1 == last:
            card = demo.model_card(args={k: str(v) for k, v in vars(args).items()}, log=log)
            saved = demo.half(model) if args.float16 else model
            save_model(saved.eval(), processor, args.out, {"training_log.json": json.dumps(log, indent=1),
                                                          "README.md": card})
            if args.head:
                torch.save(head.state_dict(), args.head)
            model.train()
    print(f"done: {last} steps in {(time.time() - start) / 60:.1f} min -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
