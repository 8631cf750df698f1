import pytest

from annotator.tasks import TASKS, PlanError, UnknownTask, get_task, parse_task_list, plan_sources

ALL = ["caption", "detailed_caption", "more_detailed_caption", "od", "dense_region_caption", "region_proposal",
       "ocr", "ocr_with_region", "caption_to_phrase_grounding", "open_vocabulary_detection",
       "referring_expression_segmentation", "region_to_segmentation", "region_to_category",
       "region_to_description", "region_to_ocr"]


def test_every_florence2_prompt_is_a_task():
    assert sorted(TASKS) == sorted(ALL)
    for name in ALL:
        assert TASKS[name].token == "<" + name.upper() + ">"


@pytest.mark.parametrize("spec,expected", [
    ("od,ocr", ["od", "ocr"]),
    ("<OD>, <OCR>", ["od", "ocr"]),
    ("OD,od,<od>", ["od"]),
    ("dense-region-caption", ["dense_region_caption"]),
])
def test_parse_task_list(spec, expected):
    assert [t.name for t in parse_task_list(spec)] == expected


@pytest.mark.parametrize("spec", ["", "odd", "<NOPE>"])
def test_unknown_task_names_the_list(spec):
    with pytest.raises(UnknownTask, match="tasks"):
        parse_task_list(spec)


def test_region_tasks_read_the_first_detection_task_before_them():
    tasks = parse_task_list("caption,od,dense_region_caption,region_to_segmentation,region_to_category")
    assert plan_sources(tasks, False, False) == {"region_to_segmentation": "od", "region_to_category": "od"}


def test_grounding_reads_the_caption_unless_text_is_given():
    tasks = parse_task_list("detailed_caption,caption_to_phrase_grounding")
    assert plan_sources(tasks, False, False) == {"caption_to_phrase_grounding": "detailed_caption"}
    assert plan_sources(tasks, True, False) == {}


@pytest.mark.parametrize("spec,has_text,has_classes,fix", [
    ("region_to_segmentation", False, False, "--tasks od,region_to_segmentation"),
    ("region_to_ocr,od", False, False, "earlier"),
    ("caption_to_phrase_grounding", False, False, "--text"),
    ("open_vocabulary_detection", False, False, "--classes"),
    ("referring_expression_segmentation", False, False, "--text"),
])
def test_missing_inputs_are_refused_with_the_fix(spec, has_text, has_classes, fix):
    with pytest.raises(PlanError, match=fix.replace("-", r"\-")):
        plan_sources(parse_task_list(spec), has_text, has_classes)


def test_get_task_accepts_tokens_case_insensitively():
    assert get_task("<ocr_with_region>").name == "ocr_with_region"


def test_task_facts_are_the_sets_the_exporters_and_scorer_used_to_spell_out():
    """Facts moved onto Task (issue 15): the same tasks as the name sets they replaced."""
    from annotator.tasks import BOX_EXPORT_DEFAULTS, TASKS, Labels

    def having(pred):
        return {t.name for t in TASKS.values() if pred(t)}

    assert having(lambda t: t.labels is Labels.CATEGORY) == {"od", "open_vocabulary_detection", "region_to_category"}
    assert having(lambda t: t.labels is Labels.TEXT) == {"ocr_with_region", "region_to_ocr", "region_to_description"}
    assert having(lambda t: t.answer_repeats_box) == {"region_to_category", "region_to_description"}
    assert having(lambda t: t.empty_phrase) == {"region_proposal", "referring_expression_segmentation",
                                                "region_to_segmentation"}
    assert having(lambda t: t.is_caption) == {"caption", "detailed_caption", "more_detailed_caption"}
    assert BOX_EXPORT_DEFAULTS == ("od", "open_vocabulary_detection", "caption_to_phrase_grounding",
                                   "dense_region_caption", "region_to_segmentation")
