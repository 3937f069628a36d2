"""CUDA-graph decoding (tinychat/engine.py): graph replay against eager decoding, captures, fallbacks.

The CUDA cases skip without a GPU; the CPU cases check that a CPU engine never captures, the capture key and the
sampler's two-part draw.
"""

from dataclasses import dataclass

import pytest
import torch

from tinychat.bench import random_model
from tinychat.config import ModelConfig
from tinychat.engine import Engine, Sampler, SamplingParams, graph_key

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SMALL = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=64, max_position_embeddings=256)
SAMPLED = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.2, seed=7, max_new_tokens=24)
GREEDY = SamplingParams(max_new_tokens=24)


@dataclass(frozen=True)
class NoTokenizer:
    """What the engine asks of a tokenizer, for random token ids."""

    vocab_size: int
    stop_token_ids: frozenset = frozenset()


def prompt(n: int, vocab: int = SMALL.vocab_size, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def tokens(engine: Engine, ids, params=GREEDY) -> list[int]:
    return list(engine.generate(ids, params, stop_ids=()))


# ---- CPU ----


def test_cpu_engine_never_captures(monkeypatch):
    def no_graphs(*args, **kwargs):
        raise AssertionError("a CPU engine built a CUDA graph")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", no_graphs)
    monkeypatch.setattr(torch.cuda, "graph", no_graphs)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", no_graphs)
    model = random_model(SMALL, "float32")
    engine = Engine(model, NoTokenizer(SMALL.vocab_size), 64, cuda_graphs=True)
    assert not engine.cuda_graphs
    greedy = tokens(engine, prompt(8))
    sampled = tokens(engine, prompt(8), SAMPLED)
    assert len(greedy) == len(sampled) == 24
    assert engine.graph_captures == 0 and engine.graph_error is None
    assert tokens(Engine(model, NoTokenizer(SMALL.vocab_size), 64, cuda_graphs=False), prompt(8)) == greedy


def test_graph_key_holds_the_sampling_settings_only():
    base = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.1, seed=1, max_new_tokens=5)
    same = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.1, seed=2, max_new_tokens=9)
    assert graph_key(base) == graph_key(same)
    for changed in ({"temperature": 0.8}, {"top_k": 0}, {"top_p": 1.0}, {"repetition_penalty": 1.0}):
        assert graph_key(SamplingParams(**{**base.__dict__, **changed})) != graph_key(base), changed
    # greedy ignores top-k and top-p, but not the penalty
    assert graph_key(SamplingParams(top_k=50, top_p=0.5)) == graph_key(SamplingParams())
    assert graph_key(SamplingParams(repetition_penalty=1.3)) != graph_key(SamplingParams())


def test_sampler_draws_as_multinomial_and_restarts():
    """argmax(probs / Exp(1) noise) is torch.multinomial's one-sample algorithm: same seed, same tokens."""
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    params = SamplingParams(temperature=1.0, seed=3)
    sampler = Sampler(params, 1000, torch.device("cpu"), ())
    ours = [int(sampler(logits)) for _ in range(50)]
    g = torch.Generator().manual_seed(3)
    assert ours == [int(torch.multinomial(logits.softmax(-1), 1, generator=g)[0]) for _ in range(50)]
    sampler.restart(3, ())
    assert [int(sampler(logits)) for _ in range(50)] == ours


def test_sampler_restart_resets_the_seen_tokens():
    logits = torch.tensor([1.0, 3.0, 2.9, -1.0, 0.5, 2.0])
    sampler = Sampler(SamplingParams(repetition_penalty=2.0), 6, torch.device("cpu"), [])
    assert [int(sampler(logits)) for _ in range(3)] == [1, 2, 5]
    sampler.restart(None, [1])
    assert int(sampler(logits)) == 2


def test_env_turns_graphs_off(monkeypatch):
    model = random_model(SMALL, "float32")
    monkeypatch.setenv("TINYCHAT_CUDA_GRAPHS", "0")
    assert not Engine(model, NoTokenizer(SMALL.vocab_size), 32).cuda_graphs


# ---- CUDA ----


def _int4_cuda_kernel() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("tinychat::int4_linear", "CUDA")


@pytest.fixture(scope="module")
def smollm2_cuda(smollm2_gguf):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from tinychat.io.loader import load_model

    return load_model(smollm2_gguf, device="cuda", dtype="float16")


@pytest.mark.parametrize("dtype", ["float16", "int4"])
@pytest.mark.parametrize("ctx", [1, 7, 100])
@pytest.mark.cuda
@needs_cuda
def test_random_model_graph_matches_eager(dtype, ctx):
    if dtype == "int4" and not _int4_cuda_kernel():
        pytest.skip("tinychat._C has no CUDA int4_linear kernel")
    model = random_model(SMALL, dtype, "cuda", act_dtype="float16")
    ids, params = prompt(ctx), SamplingParams(max_new_tokens=40)
    g = Engine(model, NoTokenizer(SMALL.vocab_size), 256, cuda_graphs=True)  # each engine sets up the model's
    got = tokens(g, ids, params)  # caches: use one before making the next
    assert g.graph_captures == 1 and g.cuda_graphs and g.graph_error is None
    assert got == tokens(Engine(model, NoTokenizer(SMALL.vocab_size), 256, cuda_graphs=False), ids, params)


@pytest.mark.cuda
@needs_cuda
def test_smollm2_greedy_graph_matches_eager_and_captures_once(smollm2_cuda):
    model, tokenizer = smollm2_cuda
    prompts = [tokenizer.encode_chat([{"role": "user", "content": text}])
               for text in ("Write a short poem about the sea.", "What is the capital of France?")]
    g = Engine(model, tokenizer, 256)  # graphs are the default on CUDA
    assert g.cuda_graphs
    ours = [tokens(g, ids, SamplingParams(max_new_tokens=32)) for ids in prompts]
    assert g.graph_captures == 1  # one capture serves every position and both generations
    e = Engine(model, tokenizer, 256, cuda_graphs=False)
    assert [tokens(e, ids, SamplingParams(max_new_tokens=32)) for ids in prompts] == ours
    assert e.graph_captures == 0


@pytest.mark.cuda
@needs_cuda
def test_smollm2_seeded_sampling_reproducible_with_graphs(smollm2_cuda):
    model, tokenizer = smollm2_cuda
    ids = tokenizer.encode_chat([{"role": "user", "content": "Tell me a story."}])
    g = Engine(model, tokenizer, 256, cuda_graphs=True)
    a, b = tokens(g, ids, SAMPLED), tokens(g, ids, SAMPLED)
    c = tokens(g, ids, SamplingParams(**{**SAMPLED.__dict__, "seed": 8}))
    assert a == b and len(a) == SAMPLED.max_new_tokens and a != c
    assert g.graph_captures == 1  # the seed is not part of the graph
    tokens(g, ids, SamplingParams(**{**SAMPLED.__dict__, "temperature": 0.5}))
    assert g.graph_captures == 2  # a new setting is
    # the noise comes from the same generator in the same order: eager decoding draws the same tokens
    assert tokens(Engine(model, tokenizer, 256, cuda_graphs=False), ids, SAMPLED) == a


@pytest.mark.cuda
@needs_cuda
def test_smollm2_multi_turn_reuses_the_cache_with_graphs(smollm2_cuda):
    model, tokenizer = smollm2_cuda
    answers = {}
    for graphs in (True, False):
        engine = Engine(model, tokenizer, 512, cuda_graphs=graphs)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        def answer():
            ids = engine.generate(tokenizer.encode_chat(messages), SamplingParams(max_new_tokens=48))
            return tokenizer.decode(list(ids), skip_special_tokens=True)

        first = answer()
        messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And of Germany?"}]
        second = answer()
        assert engine.last_stats.reused_tokens >= len(tokenizer.encode_chat(messages[:1]))
        answers[graphs] = (first, second)
        assert engine.graph_captures == (1 if graphs else 0)
    assert answers[True] == answers[False]


@pytest.mark.cuda
@needs_cuda
def test_env_and_argument_turn_graphs_off_on_cuda(monkeypatch):
    model = random_model(SMALL, "float16", "cuda")
    monkeypatch.setenv("TINYCHAT_CUDA_GRAPHS", "0")
    off = Engine(model, NoTokenizer(SMALL.vocab_size), 64)
    assert not off.cuda_graphs
    ids = prompt(8)
    eager = tokens(off, ids)
    assert off.graph_captures == 0
    on = Engine(model, NoTokenizer(SMALL.vocab_size), 64, cuda_graphs=True)  # the argument wins over the variable
    assert on.cuda_graphs and tokens(on, ids) == eager and on.graph_captures == 1


@pytest.mark.cuda
@needs_cuda
def test_failed_capture_falls_back_to_eager_once(monkeypatch):
    from tinychat import engine as engine_module

    model = random_model(SMALL, "float16", "cuda")
    ids = prompt(8)
    eager = tokens(Engine(model, NoTokenizer(SMALL.vocab_size), 64, cuda_graphs=False), ids)
    tries = []

    def fail(self, pool):
        tries.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(engine_module._GraphStep, "capture", fail)
    engine = Engine(model, NoTokenizer(SMALL.vocab_size), 64, cuda_graphs=True)
    with pytest.warns(UserWarning, match="without CUDA graphs"):
        assert tokens(engine, ids) == eager
    assert tokens(engine, ids) == eager  # remembered: no second try
    assert len(tries) == 1 and not engine.cuda_graphs and "stream is capturing" in engine.graph_error
    assert engine.graph_captures == 0


@pytest.mark.cuda
@needs_cuda
def test_caches_set_up_again_are_recaptured():
    model = random_model(SMALL, "float16", "cuda")
    ids = prompt(8)
    first = Engine(model, NoTokenizer(SMALL.vocab_size), 64, cuda_graphs=True)
    expected = tokens(first, ids)
    kept = next(iter(first._graphs.values())).out  # a tensor of the first capture's pool outlives its graph
    Engine(model, NoTokenizer(SMALL.vocab_size), 64)  # a second engine replaces the model's caches
    first.reset()  # what the first engine had cached is gone with them
    assert tokens(first, ids) == expected and first.graph_captures == 2  # not replayed into the replaced caches
    assert kept.device.type == "cuda"  # (the recapture went to a fresh pool: torch never reopens a released one)
