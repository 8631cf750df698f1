"""Scripted token probabilities give known scores, aligned with the parsed instances."""

import math

import pytest

from annotator.answers.parse import parse_generation
from annotator.answers.confidence import instance_scores, text_score, token_text
from annotator.tasks import TASKS
from conftest import model_inputs


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
    """Greedy decoding without logits rules (random:tiny carries the published n-gram rule: turned off)
    picks the argmax of the raw model at every step after the forced <s>, so the log p the engine
    reports must be that step's maximum log-softmax."""
    import torch
    from PIL import Image

    from annotator.config import GenerationSettings, TaskInputs
    from annotator.decode.engine import Engine, Request

    generation = GenerationSettings(num_beams=1, max_new_tokens=12, no_repeat_ngram_size=0)
    engine = Engine(tiny_lm, [TASKS["caption"]], TaskInputs(), generation)
    im = Image.new("RGB", (50, 40), (200, 30, 90))
    inputs = model_inputs(tiny_lm, text="<CAPTION>", images=im)
    with torch.inference_mode():
        feats = engine.image_features(inputs["pixel_values"])
        (gen,) = engine._generate_chunk([Request(0, "caption", "<CAPTION>")], feats)
        seq = torch.tensor([[2, *gen.ids]])
        logits = tiny_lm.model(**inputs, decoder_input_ids=seq[:, :-1]).logits[0]
    best = torch.log_softmax(logits.float(), -1).max(-1).values.tolist()
    assert len(gen.logprobs) == len(gen.ids) >= 2
    forced_last = int(len(gen.ids) == 12)  # at the limit the published forced_eos writes </s>, not the argmax
    for step in range(1, len(gen.ids) - forced_last):  # step 0 is the forced <s>
        assert gen.logprobs[step] == pytest.approx(best[step], abs=1e-4)


def test_scores_fill_the_table_for_every_instance_kind(tiny_lm):
    from annotator.config import GenerationSettings, TaskInputs
    from annotator.decode.engine import Engine, Generation

    tok = tiny_lm.processor.tokenizer
    engine = Engine(tiny_lm, [TASKS["od"], TASKS["ocr_with_region"], TASKS["caption"]], TaskInputs(),
                    GenerationSettings(num_beams=1))
    quad = "".join(f"<loc_{i}>" for i in (1, 2, 9, 2, 9, 5, 1, 5))
    for task, text in [("od", "car<loc_1><loc_2><loc_3><loc_4>bus<loc_5><loc_6><loc_7><loc_8>"),
                       ("ocr_with_region", "STOP" + quad + "GO" + quad.replace("<loc_1>", "<loc_3>")),
                       ("caption", "a red car")]:
        ids = tuple(tok("<s>" + text + "</s>", add_special_tokens=False)["input_ids"])
        gen = Generation("</s><s>" + text + "</s>", False, ids, tuple([math.log(0.8)] * len(ids)))
        parsed = engine.assembler.parse_one(TASKS[task], gen, (1000, 1000))
        if task == "caption":
            assert parsed.text_score == pytest.approx(0.8)
        else:
            n = len(parsed.bboxes or parsed.quad_boxes)
            assert n == 2 and parsed.scores == [pytest.approx(0.8)] * 2


def _lp(p):
    return math.log(p)


def _gmean(*probs):
    return math.exp(sum(map(math.log, probs)) / len(probs))


def test_quads_and_polygons_get_their_own_instances_probabilities(tiny_lm):
    """Each instance is scored from its own tokens: instances with different probabilities get different scores."""
    locs = lambda r: "".join(f"<loc_{i}>" for i in r)  # noqa: E731
    quads = "<s>STOP" + locs(range(8)) + "GO" + locs(range(10, 18)) + "</s>"
    tok = tiny_lm.processor.tokenizer
    ids = script(tok, quads)
    split = tok.convert_ids_to_tokens(ids).index("<loc_7>")  # the first quad's last token
    tt = token_text(tok, ids, [_lp(0.9 if i <= split else 0.3) for i in range(len(ids))])
    assert instance_scores(TASKS["ocr_with_region"], tt) == [pytest.approx(0.9), pytest.approx(0.3)]

    polys = "<s>cat<poly>" + locs(range(1, 7)) + "</poly><poly>" + locs((7, 8, 9, 9, 7, 9)) + "</poly></s>"
    low = {"<loc_7>", "<loc_8>", "<loc_9>"}
    tt, _ = tt_for(tiny_lm, polys, lambda t: 0.2 if t in low else 0.5 if t in ("<poly>", "</poly>") else 0.8)
    parsed = parse_generation(tiny_lm.processor, TASKS["open_vocabulary_detection"], polys, (100, 100))
    scores = instance_scores(TASKS["open_vocabulary_detection"], tt)
    assert len(parsed.polygons) == 2
    assert scores == [pytest.approx(_gmean(0.5, 0.5, *[0.8] * 6)), pytest.approx(_gmean(0.5, 0.5, *[0.2] * 6))]


def _gen(tok, text, p):
    from annotator.decode.engine import Generation

    ids = tuple(tok("<s>" + text + "</s>", add_special_tokens=False)["input_ids"])
    return Generation("</s><s>" + text + "</s>", False, ids, tuple([_lp(p)] * len(ids)))


def test_region_tasks_score_each_box_by_its_own_answer(tiny_lm):
    from annotator.config import GenerationSettings, TaskInputs
    from annotator.decode.engine import Engine, Request

    tok = tiny_lm.processor.tokenizer
    engine = Engine(tiny_lm, [TASKS["od"], TASKS["region_to_category"], TASKS["region_to_segmentation"]],
                    TaskInputs(), GenerationSettings(num_beams=1))
    boxes = [(10.0, 10.0, 50.0, 50.0), (60.0, 20.0, 90.0, 80.0)]
    cat = [(Request(0, "region_to_category", "<R>", b), _gen(tok, text, p))
           for b, text, p in zip(boxes, ["car", "dog"], [0.8, 0.3])]
    row = engine.assembler.assemble(TASKS["region_to_category"], "a.png", 100, 100, cat)
    assert row.labels == ["car", "dog"] and row.scores == [pytest.approx(0.8), pytest.approx(0.3)]
    seg = [(Request(0, "region_to_segmentation", "<R>", b, "x"), _gen(tok, "<loc_100><loc_100><loc_400><loc_100><loc_400><loc_400>", p))
           for b, p in zip(boxes, [0.6, 0.1])]
    row = engine.assembler.assemble(TASKS["region_to_segmentation"], "a.png", 100, 100, seg)
    assert len(row.polygons) == 2 and row.scores == [pytest.approx(0.6), pytest.approx(0.1)]
    # one answer without log p (scoring off for it): no partial column
    seg[1] = (seg[1][0], seg[1][1].__class__(seg[1][1].text, False))
    assert engine.assembler.assemble(TASKS["region_to_segmentation"], "a.png", 100, 100, seg).scores is None


def test_per_class_prompts_keep_each_class_answers_scores(tiny_lm):
    from annotator.config import GenerationSettings, TaskInputs
    from annotator.decode.engine import Engine, Request

    tok = tiny_lm.processor.tokenizer
    engine = Engine(tiny_lm, [TASKS["open_vocabulary_detection"]], TaskInputs(classes=("car", "bus")),
                    GenerationSettings(num_beams=1))
    results = [(Request(0, "open_vocabulary_detection", "<OVD>car", label="car"),
                _gen(tok, "car<loc_100><loc_100><loc_300><loc_300>", 0.8)),
               (Request(0, "open_vocabulary_detection", "<OVD>bus", label="bus"),
                _gen(tok, "bus<loc_500><loc_500><loc_700><loc_700>bus<loc_10><loc_600><loc_200><loc_900>", 0.3))]
    row = engine.assembler.assemble(TASKS["open_vocabulary_detection"], "a.png", 1000, 1000, results)
    assert row.labels == ["car", "bus", "bus"]
    assert row.scores == [pytest.approx(0.8), pytest.approx(0.3), pytest.approx(0.3)]


def test_misaligned_scores_are_null_and_counted(tiny_lm, monkeypatch):
    import annotator.answers.assemble as assemble_module
    from annotator.config import GenerationSettings, TaskInputs
    from annotator.decode.engine import Engine

    tok = tiny_lm.processor.tokenizer
    engine = Engine(tiny_lm, [TASKS["od"]], TaskInputs(), GenerationSettings(num_beams=1))
    gen = _gen(tok, "car<loc_1><loc_2><loc_3><loc_4>bus<loc_5><loc_6><loc_7><loc_8>", 0.8)
    assert engine.assembler.parse_one(TASKS["od"], gen, (1000, 1000)).scores == [pytest.approx(0.8)] * 2
    assert "scores_not_aligned" not in engine.stats
    real = assemble_module.instance_scores
    monkeypatch.setattr(assemble_module, "instance_scores", lambda task, tt: real(task, tt)[:1])  # one short
    parsed = engine.assembler.parse_one(TASKS["od"], gen, (1000, 1000))
    assert len(parsed.bboxes) == 2 and parsed.scores is None
    assert engine.stats["scores_not_aligned"] == 1


def test_a_real_run_scores_match_a_teacher_forced_recomputation(tiny_lm):
    """Through Engine.annotate (encoder reuse, batching, token alignment), the caption's text_score is
    the geometric mean of p(token) that the plain model gives the reference generate's tokens."""
    import torch
    from PIL import Image

    from annotator.config import GenerationSettings, TaskInputs
    from annotator.decode.engine import Engine
    from annotator.inputs.images import Batch, ImageItem

    proc, model = tiny_lm.processor, tiny_lm.model
    images = [Image.new("RGB", (50, 40), (200, 30, 90)), Image.new("RGB", (30, 60), (10, 120, 240))]
    items = [ImageItem(f"{i}.png", im.width, im.height, proc.image_processor(images=im, return_tensors="pt")["pixel_values"][0],
                       ("caption",)) for i, im in enumerate(images)]
    engine = Engine(tiny_lm, [TASKS["caption"]], TaskInputs(), GenerationSettings(num_beams=1, max_new_tokens=8))
    rows = engine.annotate(Batch(items, torch.stack([x.pixel_values for x in items]), []))
    skip = {proc.tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>")}
    got = []
    for row, im in zip(rows, images):
        inputs = model_inputs(tiny_lm, text="<CAPTION>", images=im)
        with torch.inference_mode():
            seq = model.generate(**inputs, max_new_tokens=8, num_beams=1, do_sample=False)
            logits = model(**inputs, decoder_input_ids=seq[:, :-1]).logits[0].float()
        lps = torch.log_softmax(logits, -1).gather(-1, seq[0, 1:, None])[:, 0]
        keep = [lp for t, lp in zip(seq[0, 1:].tolist(), lps.tolist()) if t not in skip]
        assert row.status == "ok" and row.text_score is not None
        assert row.text_score == pytest.approx(math.exp(sum(keep) / len(keep)), rel=1e-3)
        got.append(row.text_score)
    assert got[0] != pytest.approx(got[1], rel=1e-3)  # the two images differ: not a constant


def test_location_tokens_score_with_their_neighbourhood():
    """A coordinate spread over neighbouring bins is still a sure coordinate: a location token's
    log p is the mass within the tolerance; other tokens keep their own; the window stops at the
    first and last bin."""
    import torch

    from annotator.answers.confidence import LocBins, chosen_logprobs

    locs = LocBins(first=10, count=1000)
    probs = torch.full((3, 1010), 1e-9)
    probs[0, 10 + 500:10 + 505] = 0.19  # five neighbouring bins around <loc_502>
    probs[1, 3] = 0.6  # a word
    probs[2, 10 + 0:10 + 3] = 0.3  # the first bins
    logits = probs.log()
    chosen = torch.tensor([10 + 502, 3, 10 + 0])
    lp = chosen_logprobs(logits, chosen, locs, tolerance=2)
    full = torch.log_softmax(logits, -1)
    assert lp[0] == pytest.approx(math.log(5 * 0.19 / probs[0].sum().item()), abs=1e-4)
    assert lp[1] == pytest.approx(full[1, 3].item(), abs=1e-6)
    assert lp[2] == pytest.approx(math.log(0.9 / probs[2].sum().item()), abs=1e-4)
    assert chosen_logprobs(logits, chosen, None)[0] == pytest.approx(full[0, 512].item(), abs=1e-6)
    assert chosen_logprobs(logits, chosen, locs, tolerance=0)[0] == pytest.approx(full[0, 512].item(), abs=1e-5)
