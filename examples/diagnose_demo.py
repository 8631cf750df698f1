"""Does a checkpoint read the image? Teacher-forced loss on held-out `<OD>` targets with the right
images vs the same images shuffled within the batch, split into location tokens and the rest, and
the mean |bin error| of the argmax location token. The check used while training the demo model:

    python examples/diagnose_demo.py annotator/demo_model [--big]

(`--big`: the curriculum's scenes of at most 3 objects of >= 12% of the image)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotator.demo import world as samples  # noqa: E402
from annotator.finetune import Sample, collate, encode_prompt, encode_target  # noqa: E402


def main(path: str, big: bool) -> None:
    from transformers import AutoProcessor, Florence2ForConditionalGeneration
    from transformers.models.florence2.modeling_florence2 import shift_tokens_right

    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    rng = np.random.default_rng(99)
    batch = []
    for i in range(16):
        d = samples.scene(rng, size_range=(0.12, 0.5), max_objects=3) if big else samples.scene(rng)
        prompt, target = samples.truth_pairs(d)["od"]
        pixels = processor.image_processor(images=d.image, return_tensors="pt")["pixel_values"][0]
        batch.append(Sample(i, pixels, encode_prompt(processor, prompt), encode_target(processor, target)))
    b = collate(batch, processor.tokenizer.pad_token_id)
    loc_ids = processor.tokenizer.convert_tokens_to_ids([f"<loc_{i}>" for i in range(1000)])
    is_loc = torch.isin(b.labels, torch.tensor(loc_ids))
    valid = b.labels != -100
    cfg = model.config.text_config

    def losses(pixels):
        dec = shift_tokens_right(b.labels, cfg.pad_token_id, cfg.decoder_start_token_id)
        with torch.no_grad():
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=pixels,
                           decoder_input_ids=dec).logits
        ce = F.cross_entropy(logits.flatten(0, 1), b.labels.flatten(), ignore_index=-100, reduction="none")
        ce = ce.view(b.labels.shape)
        return ce[is_loc & valid].mean().item(), ce[~is_loc & valid].mean().item(), logits.argmax(-1)

    right, other, pred = losses(b.pixel_values)
    right_s, other_s, _ = losses(b.pixel_values[torch.randperm(len(batch))])
    bin_of = {t: i for i, t in enumerate(loc_ids)}
    errors = [abs(bin_of.get(int(p), -999) - bin_of[int(t)]) for p, t in zip(pred[is_loc & valid], b.labels[is_loc & valid])]
    print(f"location CE: right images {right:.3f}, shuffled {right_s:.3f} (uniform {np.log(1000):.2f}) | "
          f"other tokens CE: right {other:.3f}, shuffled {other_s:.3f} | mean |bin error| {np.mean(errors):.1f}")


if __name__ == "__main__":
    main(sys.argv[1], "--big" in sys.argv[2:])
