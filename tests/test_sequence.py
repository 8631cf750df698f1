"""The model's input sequence has one home (annotator/sequence.py): a training example's encoder
input is, token for token and pixel for pixel, what `annotate run` feeds the model for the same
image and prompt; padding is on the right; location bins match the processor's quantizer."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from annotator.model.sequence import PromptCache, dequantize, loc_tokens, pad_right, prompt_ids


def test_pad_right_keeps_every_sequence_at_position_zero():
    ids, mask = pad_right([[5, 6, 7], [8]], value=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_prompt_cache_equals_prompt_ids_and_stays_small(tiny_lm):
    cache = PromptCache(tiny_lm.processor, limit=2)
    for prompt in ("<OD>", "<CAPTION>", "<OPEN_VOCABULARY_DETECTION>car", "<OD>"):
        assert cache(prompt) == prompt_ids(tiny_lm.processor, prompt)
        assert len(cache._ids) <= 2


def test_loc_tokens_match_the_processor_quantizer_at_bin_centres(tiny_lm):
    """Region prompts carry boxes the parser gave back (bin centres, clipped to the image)."""
    quantize = tiny_lm.processor.post_processor.quantize
    g = torch.Generator().manual_seed(0)
    for w, h in ((640, 480), (33, 47), (4000, 1000)):
        bins = torch.randint(0, 1000, (50, 4), generator=g)
        boxes = [[dequantize(b, w if i % 2 == 0 else h) for i, b in enumerate(row)] for row in bins.tolist()]
        boxes.append([0.0, 0.0, float(w), float(h)])  # clipped to the image edges
        want = quantize(torch.tensor(boxes, dtype=torch.float32), (w, h)).tolist()
        got = [[int(t) for t in loc_tokens(box, w, h).replace("<loc_", " ").replace(">", "").split()] for box in boxes]
        assert got == want


@pytest.mark.parametrize("task,prompt", [("od", "<OD>"), ("caption", "<CAPTION>"),
                                         ("region_to_category", "<REGION_TO_CATEGORY><loc_10><loc_20><loc_500><loc_600>")])
def test_training_example_encoder_input_equals_what_the_engine_feeds(tiny_lm, tmp_path, task, prompt):
    from annotator.config import GenerationSettings, TaskInputs
    from annotator.decode.engine import Engine, Request
    from annotator.finetune import Collator, PairDataset, load_data
    from annotator.inputs.images import ImageDataset, WorkItem, collate
    from annotator.inputs.sources import ImageRef
    from annotator.tasks import parse_task_list

    image = tmp_path / "img.png"
    Image.new("RGB", (90, 60), (200, 30, 30)).save(image)
    (tmp_path / "annotations.jsonl").write_text(json.dumps({"image": "img.png", "prefix": prompt, "suffix": "x"}) + "\n")
    proc = tiny_lm.processor

    # training: florence pair -> PairDataset -> collate (what `annotate finetune` feeds the model)
    data = load_data(tmp_path / "annotations.jsonl", val_fraction=0)
    batch = Collator(proc.tokenizer.pad_token_id)([PairDataset(data.train, proc)[0]])

    # annotation: decode -> engine's prompt and padding (what `annotate run` feeds the model)
    tasks = parse_task_list("od,region_to_category" if task == "region_to_category" else task)
    engine = Engine(tiny_lm, tasks, TaskInputs(), GenerationSettings())
    item = ImageDataset([WorkItem(ImageRef("img.png", image), (task,))], proc.image_processor, 10**8)[0]
    run_batch = collate([item])
    features = engine.image_features(run_batch.pixel_values)
    input_ids, mask, _ = engine.encode_requests([Request(0, task, prompt)], features)

    assert torch.equal(batch.input_ids, input_ids.cpu())
    assert torch.equal(batch.attention_mask, mask.cpu())
    assert torch.equal(batch.pixel_values, run_batch.pixel_values)
