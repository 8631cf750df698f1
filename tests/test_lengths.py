"""Realistic bench lengths: seeded, in their documented ranges, independent of the task list."""

from annotator.bench.lengths import REALISTIC, draw_lengths


def test_draws_are_seeded_in_range_and_stable_across_task_lists():
    tasks = ["caption", "od", "dense_region_caption", "ocr", "region_proposal"]
    a = draw_lengths("realistic", tasks, 50, {}, seed=1)
    assert a == draw_lengths("realistic", tasks, 50, {}, seed=1)
    assert a != draw_lengths("realistic", tasks, 50, {}, seed=2)
    assert [r["ocr"] for r in a] == [r["ocr"] for r in draw_lengths("realistic", ["ocr"], 50, {}, seed=1)]
    for t in tasks:
        d = REALISTIC[t]
        lo, hi = min(d.low, d.doc_low or d.low), max(d.high, d.doc_high)
        assert all(lo <= r[t] <= hi for r in a), t
    ocr = [r["ocr"] for r in a]
    assert min(ocr) < 100 and max(ocr) >= 300  # photos and the document tail


def test_fixed_is_the_per_task_table():
    assert draw_lengths("fixed", ["od"], 2, {"od": 7}) == [{"od": 7}, {"od": 7}]
