"""Sampling rules of the engine, on hand-made logits."""

import pytest
import torch

from tinychat.engine import Sampler, SamplingParams

LOGITS = torch.tensor([1.0, 3.0, 2.9, -1.0, 0.5, 2.0])


def draws(params, logits=LOGITS, n=300, vocab=None, context=()):
    sampler = Sampler(params, vocab or logits.numel(), torch.device("cpu"), context)
    return [int(sampler(logits)) for _ in range(n)]


def test_greedy_is_argmax():
    assert set(draws(SamplingParams(), n=5)) == {1}


def test_top_k_keeps_only_the_k_best():
    assert set(draws(SamplingParams(temperature=1.0, top_k=2, seed=0))) == {1, 2}


def test_top_p_keeps_the_smallest_set_above_p():
    # softmax mass: token 1 ~0.39, token 2 ~0.35, token 5 ~0.14 -> p=0.5 needs tokens 1 and 2
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.5, seed=0))) == {1, 2}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.01, seed=0))) == {1}


def test_sampling_follows_the_distribution():
    got = torch.bincount(torch.tensor(draws(SamplingParams(temperature=1.0, seed=1), n=4000)), minlength=6) / 4000
    torch.testing.assert_close(got, LOGITS.softmax(-1), atol=0.03, rtol=0)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    # token 1 (3.0) was in the context: 3.0 / 2 = 1.5 < 2.9, so greedy picks token 2
    assert draws(SamplingParams(repetition_penalty=2.0), n=1, context=[1]) == [2]
    # each sampled token becomes "seen": 3.0 -> 1.5 after the first draw, 2.9 -> 1.45 after the second
    seq = draws(SamplingParams(repetition_penalty=2.0), n=3)
    assert seq == [1, 2, 5]


def test_ids_past_the_tokenizer_vocabulary_are_never_sampled():
    logits = torch.tensor([0.0, 1.0, 9.0])  # id 2 exists in the model's embedding but not in the tokenizer
    assert set(draws(SamplingParams(), logits, n=3, vocab=2)) == {1}
    assert set(draws(SamplingParams(temperature=1.0, seed=0), logits, n=100, vocab=2)) <= {0, 1}


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(temperature=float("inf")), dict(temperature=float("nan")),
                                 dict(top_p=0.0), dict(top_p=1.5), dict(top_p=float("nan")), dict(top_k=-1),
                                 dict(repetition_penalty=0.0), dict(repetition_penalty=float("inf")),
                                 dict(repetition_penalty=float("nan")), dict(max_new_tokens=0)])
def test_bad_sampling_params(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)
