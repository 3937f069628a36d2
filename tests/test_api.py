"""The Python embedding API (tinychat.load / Model.generate / Model.chat) on the real default model."""

import threading
import time

import pytest

import tinychat
from tinychat.api import BusyError, Completion, TextStream

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    return tinychat.load(smollm2_gguf, max_seq_len=512)


def test_chat_answers_with_counts_and_timings(llm):
    r = llm.chat(FRANCE, max_new_tokens=24)
    assert isinstance(r, Completion)
    assert "Paris" in r.text and r.finish_reason == "stop"
    assert r.prompt_tokens == len(llm.chat_prompt_ids(FRANCE)) and 0 < r.completion_tokens <= 24
    assert 0 < r.ttft_s <= r.total_s and r.decode_tok_s > 0


def test_stream_pieces_join_to_the_full_answer(llm):
    whole = llm.generate("The capital of Germany is", max_new_tokens=12)
    stream = llm.generate("The capital of Germany is", stream=True, max_new_tokens=12)
    assert isinstance(stream, TextStream)
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == whole.text == stream.completion.text
    assert stream.completion.finish_reason == whole.finish_reason == "length"


def test_stop_strings_end_the_answer_and_are_left_out(llm):
    full = llm.generate("The capital of Germany is", max_new_tokens=12).text
    assert "." in full
    cut = llm.generate("The capital of Germany is", max_new_tokens=12, stop=["."])
    assert cut.text == full[: full.index(".")] and cut.finish_reason == "stop"
    pieces = list(llm.generate("The capital of Germany is", stream=True, max_new_tokens=12, stop=["."]))
    assert "".join(pieces) == cut.text  # the held-back prefix of a stop string is never streamed


def test_a_continued_conversation_prefills_only_its_new_tokens(llm):
    first = llm.chat(FRANCE, max_new_tokens=24)
    turn2 = FRANCE + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And Germany?"}]
    second = llm.chat(turn2, max_new_tokens=24)
    assert second.reused_tokens >= first.prompt_tokens
    assert "Berlin" in second.text


def test_one_generation_at_a_time_across_threads(llm):
    stream = llm.generate("Once upon a time", stream=True, max_new_tokens=200)
    next(stream)  # the model is now busy
    with pytest.raises(BusyError, match="busy"):
        llm.generate("Hello", timeout=0)
    results = []
    waiter = threading.Thread(target=lambda: results.append(llm.generate("Hello", max_new_tokens=3)))
    waiter.start()
    time.sleep(0.5)
    assert not results  # it waits for the stream
    stream.close()
    waiter.join(timeout=60)
    assert results and results[0].completion_tokens == 3
    assert stream.completion.finish_reason == "cancelled"


def test_concurrent_callers_get_the_answers_they_would_get_alone(llm):
    prompts = ["The capital of Italy is", "Water boils at", "The largest planet is"]
    alone = [llm.generate(p, max_new_tokens=8).text for p in prompts]
    got = [None] * len(prompts)

    def ask(i):
        got[i] = llm.generate(prompts[i], max_new_tokens=8).text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == alone


def test_a_stream_dropped_unread_frees_the_model(llm):
    llm.generate("Hi", stream=True)  # never iterated, never closed: garbage-collected at once
    assert llm.generate("Hi", timeout=0, max_new_tokens=2).completion_tokens == 2


@pytest.mark.parametrize("call, error", [
    (lambda m: m.chat([]), "messages is empty"),
    (lambda m: m.chat([{"role": "user"}]), "'role' and 'content'"),
    (lambda m: m.generate(42), "prompt must be a str"),
    (lambda m: m.generate("x", temprature=0.5), "unknown sampling argument"),
    (lambda m: m.generate("x", temperature=-1), "temperature must be finite and >= 0"),
    (lambda m: m.generate("word " * 600), "context holds 512"),
])
def test_bad_input(llm, call, error):
    with pytest.raises((tinychat.TinychatError, TypeError, ValueError), match=error):
        call(llm)
    assert llm.generate("Hi", timeout=0, max_new_tokens=1).completion_tokens == 1  # the model is not left busy


def test_load_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="quant must be"):
        tinychat.load(quant="int8")
    with pytest.raises(ValueError, match="unknown dtype"):
        tinychat.load(tmp_path, dtype="float8")
    with pytest.raises(tinychat.ModelLoadError, match="no such file"):
        tinychat.load(tmp_path / "missing.gguf")


def test_the_terminal_chat_goes_through_the_model(llm):
    """ChatSession streams through Model.chat: it waits for the model's lock, and its /stats come from Completion."""
    from tinychat.chat import ChatSession, format_stats
    from tinychat.engine import SamplingParams

    session = ChatSession(llm, params=SamplingParams(max_new_tokens=8))
    holding = threading.Event()

    def hold():  # another thread holds the model for 0.3 s (this thread's own open stream would be a BusyError)
        busy = llm.generate("Once upon a time", stream=True, max_new_tokens=4)
        next(busy)
        holding.set()
        time.sleep(0.3)
        busy.close()

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(60)
    t0 = time.perf_counter()
    answer = "".join(session.send("What is the capital of France?"))
    assert time.perf_counter() - t0 >= 0.25  # it waited for the stream above to close
    holder.join(60)
    assert "Paris" in answer and session.last.completion_tokens <= 8
    assert f"{session.last.completion_tokens} generated" in format_stats(session)
    session.reset()
    assert llm.engine.cached == []


def test_sampling_defaults_live_in_one_place():
    """The CLI's flags and the server state their defaults from tinychat.engine; the API's is greedy."""
    from tinychat.cli import build_parser
    from tinychat.engine import API_SAMPLING, CLI_SAMPLING, SamplingParams

    assert API_SAMPLING == SamplingParams() and API_SAMPLING.temperature == 0
    for command in ("chat", "generate"):
        args = build_parser().parse_args([command] + (["hi"] if command == "generate" else []))
        assert (args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.max_new_tokens) == (
            CLI_SAMPLING.temperature, CLI_SAMPLING.top_k, CLI_SAMPLING.top_p, CLI_SAMPLING.repetition_penalty,
            CLI_SAMPLING.max_new_tokens)


def test_closing_a_stream_from_another_thread_is_safe(llm):
    """close() from another thread while a reader is mid-token: no 'generator already executing', the model is freed
    only once the token in flight has ended, and the completion says "cancelled". Repeated: it is a race."""
    for trial in range(12):
        stream = llm.generate("Once upon a time", stream=True, temperature=0, max_new_tokens=200)
        pieces, errors, first = [], [], threading.Event()

        def read(stream=stream, pieces=pieces, errors=errors, first=first):
            try:
                for piece in stream:
                    pieces.append(piece)
                    first.set()
            except BaseException as e:  # noqa: BLE001 - any error in the reader fails the test
                errors.append(e)
            first.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert first.wait(60)
        time.sleep(0.001 * trial)  # close at different points of a token
        stream.close()
        assert stream.completion is not None and stream.completion.finish_reason == "cancelled"
        assert llm.generate("Hi", max_new_tokens=2, timeout=0).completion_tokens > 0  # the model is free at once
        reader.join(60)
        assert not reader.is_alive() and errors == [], errors
        assert len(pieces) < 200


def test_a_call_while_this_thread_holds_an_open_stream_raises_instead_of_hanging(llm):
    stream = llm.generate("Once upon a time", stream=True, max_new_tokens=50)
    next(stream)
    t0 = time.perf_counter()
    with pytest.raises(BusyError, match="busy with an open stream of this same thread"):
        llm.generate("Hi", max_new_tokens=2)  # without the check: a wait for ourselves, forever
    assert time.perf_counter() - t0 < 1
    other = []  # another thread still waits its turn, as before
    waiter = threading.Thread(target=lambda: other.append(llm.generate("Hi", max_new_tokens=2)))
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive()
    stream.close()
    waiter.join(60)
    assert other and other[0].completion_tokens > 0


def test_interleaved_engine_generators_raise(llm):
    from tinychat.errors import GenerationError

    engine, ids = llm.engine, llm.tokenizer.encode("Once upon a time")
    first = engine.generate(ids)
    next(first)
    second = engine.generate(ids)
    with pytest.raises(GenerationError, match="in the middle of another generate"):
        next(second)
    first.close()
    assert len(list(engine.generate(ids, tinychat.engine.SamplingParams(max_new_tokens=3), stop_ids=()))) == 3
