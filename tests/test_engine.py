"""Sampling rules of the engine, on hand-made logits."""

import os
import subprocess
import sys

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


class _Ids:
    """What the engine asks of a tokenizer, for random token ids."""

    def __init__(self, vocab_size):
        self.vocab_size, self.stop_token_ids = vocab_size, frozenset()


def _chunk_model():
    from tinychat.bench import random_model
    from tinychat.config import ModelConfig

    cfg = ModelConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=32, max_position_embeddings=1024)
    return random_model(cfg, "int4")


def test_a_long_prompt_is_prefilled_in_chunks_with_progress():
    """A prompt of 2.3 chunks runs as 3 forwards (progress after each, in tokens of the part not reused) and gives the
    greedy tokens of one whole forward (the int4 kernels and attention are batch-invariant on the fp32 paths)."""
    from tinychat.engine import PREFILL_CHUNK, Engine

    model = _chunk_model()
    prompt = torch.randint(0, 96, (PREFILL_CHUNK * 2 + 80,), generator=torch.Generator().manual_seed(0)).tolist()
    engine = Engine(model, _Ids(96), 1024)
    calls = []
    got = list(engine.generate(prompt, SamplingParams(max_new_tokens=6), stop_ids=(),
                               progress=lambda *a: calls.append(a)))
    total = len(prompt)
    assert calls == [(PREFILL_CHUNK, total), (2 * PREFILL_CHUNK, total), (total, total)]
    model.setup_kv_cache(1024)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):  # greedy by whole forwards of the growing sequence
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[total:]
    calls.clear()  # a longer prompt: only its new tokens run, and progress counts them
    list(engine.generate(prompt + got + [5, 6], SamplingParams(max_new_tokens=1), stop_ids=(),
                         progress=lambda *a: calls.append(a)))
    assert engine.last_stats.reused_tokens == total + 5 and calls == [(3, 3)]


def test_an_interrupted_prefill_keeps_its_finished_chunks():
    """Ctrl-C during a long prefill (here: raised by the progress callback after the first chunk) leaves the cache
    holding that chunk; the next call reuses it and answers as an uninterrupted one."""
    from tinychat.engine import PREFILL_CHUNK, Engine

    model = _chunk_model()
    prompt = torch.randint(0, 96, (PREFILL_CHUNK + 100,), generator=torch.Generator().manual_seed(1)).tolist()
    engine = Engine(model, _Ids(96), 1024)
    expected = list(engine.generate(prompt, SamplingParams(max_new_tokens=5), stop_ids=()))
    engine.reset()

    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        list(engine.generate(prompt, SamplingParams(max_new_tokens=5), stop_ids=(), progress=interrupt))
    assert engine.cached == prompt[:PREFILL_CHUNK]
    assert list(engine.generate(prompt, SamplingParams(max_new_tokens=5), stop_ids=())) == expected
    assert engine.last_stats.reused_tokens == PREFILL_CHUNK


def _run_tuner(tuner, step_time, steps):
    """Run `steps` decode steps whose time is step_time(count); returns the counts used."""
    used = []
    for _ in range(steps):
        count = tuner.next_count()
        used.append(count)
        tuner.record(count, step_time(count))
    return used


def test_thread_tuner_keeps_the_faster_count():
    from tinychat.engine import ThreadTuner

    tuner = ThreadTuner(4)
    assert tuner.counts == [4, 2, 1]
    tuner.start()  # each count for 3 steps, fewest threads first, then the fastest
    used = _run_tuner(tuner, {4: 0.010, 2: 0.012, 1: 0.020}.get, 9 + 5)
    assert used == [1, 1, 1, 2, 2, 2, 4, 4, 4] + [4] * 5
    tuner.start()  # the next generation does not try again by itself
    assert tuner.next_count() == 4
    tuner.record(4, 0.100)  # a core taken by another process: 4 threads now wait at every barrier
    used = _run_tuner(tuner, {4: 0.100, 2: 0.012, 1: 0.020}.get, 7 + 5)
    assert used == [1, 1, 1, 2, 2, 2, 4] + [2] * 5  # 4 dropped after one step: over twice 2's median


def test_thread_tuner_needs_a_clear_win_and_reacts_to_a_slow_step():
    from tinychat.engine import ThreadTuner

    tuner = ThreadTuner(2)
    tuner.start()
    assert _run_tuner(tuner, {2: 0.010, 1: 0.0095}.get, 6 + 3) == [1, 1, 1, 2, 2, 2, 2, 2, 2]  # 5% is no win
    tuner.record(2, 0.050)  # a step 5x slower than the kept count's median: a round at once
    assert tuner.next_count() == 1
    assert _run_tuner(tuner, {2: 0.050, 1: 0.015}.get, 4 + 4) == [1, 1, 1, 2, 1, 1, 1, 1]  # 2 dropped at once
    kept = ThreadTuner.PROBE_EVERY - 4  # steps left until the next round (4 ran after it)
    used = _run_tuner(tuner, {2: 0.010, 1: 0.015}.get, kept + 7)  # the core is free again
    assert used[:kept] == [1] * kept  # tried again only after PROBE_EVERY steps
    assert used[kept:] == [1, 1, 1, 2, 2, 2, 2]


def test_thread_tuner_drops_only_a_count_far_slower_than_one_measured():
    """A count is dropped within a round only for a step over SLOW times the best median measured before it; a
    count near that bar runs all its steps and is judged by its median."""
    from tinychat.engine import ThreadTuner

    tuner = ThreadTuner(2)
    tuner.start()
    # 2 threads at 1.9x 1 thread's median (under SLOW): measured in full, and 1 thread kept
    assert _run_tuner(tuner, {2: 0.019, 1: 0.010}.get, 6 + 2) == [1, 1, 1, 2, 2, 2, 1, 1]
    assert tuner.current == 1


def test_engine_tunes_threads_only_when_asked(monkeypatch):
    """The engine runs its decode steps with the count the tuner picks (same greedy tokens whatever the count: each
    output row is computed by one thread); tune_threads=False, or a single thread, leaves torch's count alone."""
    from tinychat.engine import Engine

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n, real=torch.set_num_threads: (seen.append(n), real(n)))
    try:
        model = _chunk_model()
        prompt = list(range(1, 20))
        fixed = list(Engine(model, _Ids(96), 64, tune_threads=False).generate(prompt, SamplingParams(max_new_tokens=12),
                                                                             stop_ids=()))
        assert seen == []
        engine = Engine(model, _Ids(96), 64)
        assert list(engine.generate(prompt, SamplingParams(max_new_tokens=12), stop_ids=())) == fixed
        assert 1 in seen and engine.threads.current in (1, 2)
        torch.set_num_threads(1)
        assert Engine(model, _Ids(96), 64).threads is None
    finally:
        torch.set_num_threads(before)


def test_a_prefill_runs_at_the_kept_thread_count():
    """A generation that ended while the tuner was trying another count leaves torch at that count; the next prompt's
    prefill runs at the count the tuner keeps, and the decode steps go on trying."""
    from tinychat.engine import Engine

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine = Engine(_chunk_model(), _Ids(96), 64)
        # a round ended mid-way, after one of its steps at 1 thread
        engine.threads.current, engine.threads.times, engine.threads.queue = 2, {1: [0.01]}, [1, 1, 2, 2, 2]
        torch.set_num_threads(1)
        seen = []
        list(engine.generate(list(range(1, 20)), SamplingParams(max_new_tokens=2), stop_ids=(),
                             progress=lambda *a: seen.append(torch.get_num_threads())))
        assert seen == [2]
        assert torch.get_num_threads() == 1  # the decode step: the round trying 1 thread goes on
    finally:
        torch.set_num_threads(before)


def test_keep_freed_memory_reuses_the_pages_of_freed_activations():
    """After keep_freed_memory (a CPU engine calls it), forwards that make and drop megabytes-sized tensors op by op
    reuse the same pages: almost no page faults once warm, where glibc's default trims the heap and maps such tensors
    anew (measured 0 to 76800 faults over the same 10 forwards, run to run). In a fresh process: malloc's settings are
    process-wide and the default's thresholds move with what the process freed before."""
    code = """
import resource, sys, torch
from tinychat.engine import keep_freed_memory
if not keep_freed_memory():
    sys.exit(3)
def forward():  # activations of 3 and 6 MB
    x = torch.ones(3 << 18)
    for _ in range(8):
        h = torch.ones(3 << 19)
        x = h[: 3 << 18] + 1
        del h
for _ in range(5):
    forward()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    forward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    if run.returncode == 3:
        pytest.skip("the C library has no mallopt (not glibc)")
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) < 5000  # the forwards touch ~130000 pages of fresh tensors
