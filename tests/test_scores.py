"""Scripted token probabilities give known scores, aligned with the parsed instances."""

import math

import pytest

from annotator.parse import parse_generation
from annotator.scores import instance_scores, text_score, token_text
from annotator.tasks import TASKS


def script(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def tt_for(tiny_lm, text, prob_of=lambda tok: 0.9):
    tok = tiny_lm.processor.tokenizer
    ids = script(tok, text)
    toks = tok.convert_ids_to_tokens(ids)
    return token_text(tok, ids, [math.log(prob_of(t)) for t in toks]), toks


def test_box_scores_are_geometric_means_of_label_and_box_tokens(tiny_lm):
    text = "<s>car<loc_1><loc_2><loc_3><loc_4>car<loc_5><loc_6><loc_7><loc_8>dog<loc_0><loc_0><loc_9><loc_9></s>"
    # every token 0.9, except <loc_6> (0.1) and the label 'dog' tokens (0.5)
    probs = {"<loc_6>": 0.1}
    tt, toks = tt_for(tiny_lm, text, lambda t: probs.get(t, 0.5 if t in ("d", "og", "dog") else 0.9))
    scores = instance_scores(TASKS["od"], tt)
    parsed = parse_generation(tiny_lm.processor, TASKS["od"], text, (1000, 1000))
    assert len(scores) == len(parsed.bboxes) == 3
    n_car = len(script(tiny_lm.processor.tokenizer, "car"))
    assert scores[0] == pytest.approx(0.9)
    assert scores[1] == pytest.approx(math.exp((n_car + 3) / (n_car + 4) * math.log(0.9) + math.log(0.1) / (n_car + 4)))
    assert scores[2] == pytest.approx(math.exp((math.log(0.5) * len([t for t in toks if t in ("d", "og", "dog")])
                                                + 4 * math.log(0.9)) / (4 + len([t for t in toks if t in ("d", "og", "dog")]))))


def test_region_proposal_and_quads_and_polygons_align(tiny_lm):
    rp = "<s><loc_1><loc_2><loc_3><loc_4><loc_5><loc_6><loc_7><loc_8></s>"
    tt, _ = tt_for(tiny_lm, rp, lambda t: 0.2 if t == "<loc_8>" else 0.8)
    s = instance_scores(TASKS["region_proposal"], tt)
    assert s[0] == pytest.approx(0.8) and s[1] == pytest.approx(math.exp((3 * math.log(0.8) + math.log(0.2)) / 4))

    quads = "<s>STOP" + "".join(f"<loc_{i}>" for i in range(8)) + "GO" + "".join(f"<loc_{i}>" for i in range(8)) + "</s>"
    tt, _ = tt_for(tiny_lm, quads)
    assert instance_scores(TASKS["ocr_with_region"], tt) == [pytest.approx(0.9)] * 2

    polys = "<s>cat<poly><loc_1><loc_2><loc_3><loc_4><loc_5><loc_6></poly><poly><loc_7><loc_8><loc_9><loc_9><loc_7><loc_9></poly></s>"
    tt, _ = tt_for(tiny_lm, polys)
    parsed = parse_generation(tiny_lm.processor, TASKS["open_vocabulary_detection"], polys, (100, 100))
    assert len(instance_scores(TASKS["open_vocabulary_detection"], tt)) == len(parsed.polygons)


def test_text_score_ignores_special_tokens(tiny_lm):
    tt, _ = tt_for(tiny_lm, "<s>a red car</s>", lambda t: 0.01 if t in ("<s>", "</s>") else 0.7)
    assert text_score(tt) == pytest.approx(0.7)


def test_engine_logprobs_are_the_models_own(tiny_lm):
    """Greedy decoding picks the argmax of the raw model at every step after the forced <s>,
    so the log p the engine reports must be that step's maximum log-softmax."""
    import torch
    from PIL import Image

    from annotator.config import GenerationSettings, TaskInputs
    from annotator.engine import Engine, Request

    engine = Engine(tiny_lm, [TASKS["caption"]], TaskInputs(), GenerationSettings(num_beams=1, max_new_tokens=12))
    im = Image.new("RGB", (50, 40), (200, 30, 90))
    inputs = tiny_lm.processor(text="<CAPTION>", images=im, return_tensors="pt")
    with torch.inference_mode():
        feats = engine.image_features(inputs["pixel_values"])
        (gen,) = engine._generate_chunk([Request(0, "caption", "<CAPTION>")], feats)
        seq = torch.tensor([[2, *gen.ids]])
        logits = tiny_lm.model(**inputs, decoder_input_ids=seq[:, :-1]).logits[0]
    best = torch.log_softmax(logits.float(), -1).max(-1).values.tolist()
    assert len(gen.logprobs) == len(gen.ids) >= 2
    for step in range(1, len(gen.ids)):  # step 0 is the forced <s>
        assert gen.logprobs[step] == pytest.approx(best[step], abs=1e-4)


def test_scores_fill_the_table_for_every_instance_kind(tiny_lm):
    from annotator.config import GenerationSettings, TaskInputs
    from annotator.engine import Engine, Generation

    tok = tiny_lm.processor.tokenizer
    engine = Engine(tiny_lm, [TASKS["od"], TASKS["ocr_with_region"], TASKS["caption"]], TaskInputs(),
                    GenerationSettings(num_beams=1))
    quad = "".join(f"<loc_{i}>" for i in (1, 2, 9, 2, 9, 5, 1, 5))
    for task, text in [("od", "car<loc_1><loc_2><loc_3><loc_4>bus<loc_5><loc_6><loc_7><loc_8>"),
                       ("ocr_with_region", "STOP" + quad + "GO" + quad.replace("<loc_1>", "<loc_3>")),
                       ("caption", "a red car")]:
        ids = tuple(tok("<s>" + text + "</s>", add_special_tokens=False)["input_ids"])
        gen = Generation("</s><s>" + text + "</s>", False, ids, tuple([math.log(0.8)] * len(ids)))
        parsed = engine.parse_one(TASKS[task], gen, (100, 100))
        if task == "caption":
            assert parsed.text_score == pytest.approx(0.8)
        else:
            n = len(parsed.bboxes or parsed.quad_boxes)
            assert n == 2 and parsed.scores == [pytest.approx(0.8)] * 2
