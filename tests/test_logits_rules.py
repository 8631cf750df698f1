"""The decode scheduler's batched logits rules (annotator/logits_rules.py) against transformers'
own processors, applied row by row to each row's own sequence as batch-1 `generate` does."""

import pytest
import torch
from transformers.generation.logits_process import (ForcedBOSTokenLogitsProcessor, ForcedEOSTokenLogitsProcessor,
                                                    MinNewTokensLengthLogitsProcessor, NoRepeatNGramLogitsProcessor,
                                                    RepetitionPenaltyLogitsProcessor)

from annotator.decode.logits_rules import Known, LogitsRules

VOCAB, EOS, BOS, START = 9, 2, 0, 2


def rows(seed=0, n=12, width=20):
    """n sequences of different lengths (1 = the decoder start token alone) over a small vocabulary,
    so n-grams repeat; past each row's length, stale ids (a slot's previous occupant)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 4, (n, width), generator=g)  # 4 tokens only: n-grams repeat
    ids[:, 0] = START
    length = torch.tensor([1, 2, 3, 4, 5, 7, 9, 12, 15, 18, 20, 20][:n])
    return ids, length, torch.randn((n, VOCAB), generator=g) * 3


@pytest.mark.parametrize("penalty,ngram", [(1.5, 0), (0.7, 0), (1.0, 3), (1.0, 2), (1.0, 1), (1.5, 3)])
def test_rules_equal_transformers_processors_row_by_row(penalty, ngram):
    ids, length, x = rows()
    min_new = torch.tensor([3, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0])
    max_new = torch.tensor([30, 30, 3, 30, 5, 30, 30, 30, 15, 30, 30, 30])
    rules = LogitsRules(EOS, BOS, EOS, penalty, ngram)
    got = x.clone()
    rules.apply(got, ids, length, min_new, max_new, Known.read(length, max_new))
    for r in range(len(ids)):
        seq, want = ids[r:r + 1, :length[r]], x[r:r + 1].clone()
        processors = ([RepetitionPenaltyLogitsProcessor(penalty)] if penalty != 1.0 else []) + \
            ([NoRepeatNGramLogitsProcessor(ngram)] if ngram else []) + \
            [MinNewTokensLengthLogitsProcessor(1, int(min_new[r]), torch.tensor([EOS])),
             ForcedBOSTokenLogitsProcessor(BOS), ForcedEOSTokenLogitsProcessor(1 + int(max_new[r]), EOS)]
        for p in processors:
            want = p(seq, want)
        assert torch.equal(got[r], want[0]), r
    plain = x.clone()  # the length rules alone: the penalty / n-gram rule must bite on several rows
    LogitsRules(EOS, BOS, EOS).apply(plain, ids, length, min_new, max_new, Known.read(length, max_new))
    assert int((got != plain).any(1).sum()) >= 2


def test_rules_of_a_generation_config():
    from transformers import GenerationConfig

    gc = GenerationConfig(eos_token_id=2, forced_bos_token_id=0, forced_eos_token_id=2, no_repeat_ngram_size=3,
                          repetition_penalty=1.5)
    assert LogitsRules.of(gc) == LogitsRules(2, 0, 2, 1.5, 3)
    assert LogitsRules.of(GenerationConfig(eos_token_id=2)) == LogitsRules(2, None, None, 1.0, 0)
