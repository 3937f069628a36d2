"""`tinychat serve` as clients use it: a live server on 127.0.0.1, the official `openai` client, raw HTTP."""

import json
import threading
import time

import httpx
import openai
import pytest

KEY = "test-key"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
CTX = 1024


MAX_BODY = 1 << 20  # the test server's request size limit


@pytest.fixture(scope="module")
def server(smollm2_gguf, tmp_path_factory, start_server):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with start_server(smollm2_gguf, log, "--quant", "none", "--ctx", str(CTX), "--api-key", KEY,
                      "--max-request-bytes", str(MAX_BODY)) as (base, _):
        yield base


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=300)


def post(server, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(f"{server}{path}", content=content, headers=headers, timeout=300, **kw)


def wait_idle(server, seconds=20.0) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not httpx.get(f"{server}/health", timeout=5).json()["generating"]:
            return True
        time.sleep(0.1)
    return False


def test_models_and_health(client, server):
    models = client.models.list().data
    assert len(models) == 1 and models[0].id.endswith(".gguf")
    assert httpx.get(f"{server}/health").json() == {"status": "ok", "model": models[0].id, "generating": False}


def test_chat_completion(client):
    r = client.chat.completions.create(model="any", messages=FRANCE, temperature=0, max_tokens=24)
    assert "Paris" in r.choices[0].message.content and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion"
    assert r.usage.prompt_tokens > 10 and 0 < r.usage.completion_tokens <= 24


def test_chat_completion_streams(client):
    whole = client.chat.completions.create(model="any", messages=FRANCE, temperature=0, max_tokens=24)
    chunks = list(client.chat.completions.create(model="any", messages=FRANCE, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 3 and text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completion_with_stop_and_length(client):
    r = client.completions.create(model="any", prompt="The capital of Germany is", temperature=0, max_tokens=12,
                                  stop=["."])
    assert r.choices[0].text.strip() == "Berlin" and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="any", prompt="Once upon a time", temperature=0, max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    streamed = client.completions.create(model="any", prompt="Once upon a time", temperature=0, max_tokens=5,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


@pytest.mark.parametrize("body, status, words", [
    ('{"messages": [{"role": "user", "content": "hi"}', 400, "not valid JSON"),
    ({"messages": FRANCE, "temperature": "hot"}, 422, "temperature"),
    ({"messages": FRANCE, "max_tokens": "many"}, 422, "max_tokens"),
    ({"messages": []}, 422, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 422, "role"),
    ({"messages": FRANCE, "max_tokens": CTX}, 400, "does not fit"),
    ({"messages": FRANCE, "n": 2}, 422, "n"),
    ({"messages": [{"role": "user", "content": "word " * CTX}]}, 400, "context"),
    ({"messages": [{"role": "user", "content": "word " * CTX}], "stream": True}, 400, "context"),  # before any 200
    ('{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 422, "lone UTF-16 surrogate"),
    ('{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}', 422, "surrogate"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     422, "'image_url' are not supported: this server reads text only"),
    ({"messages": FRANCE, "seed": 2**70}, 422, "seed"),
    ({"messages": FRANCE, "seed": 2**70, "stream": True}, 422, "seed"),
    ({"messages": FRANCE, "stop": ["\ud800"]}, 422, "surrogate"),
])
def test_malformed_chat_requests(server, body, status, words):
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"


def test_malformed_completion_requests(server):
    assert post(server, "/v1/completions", {"prompt": ""}).status_code == 400
    assert post(server, "/v1/completions", {"prompt": 7}).status_code == 422
    assert post(server, "/v1/completions", {}).status_code == 422
    assert post(server, "/v1/completions", '{"prompt": "x\\ud800"}').status_code == 422
    for stream in (False, True):  # too long: named `prompt`, and refused before a streamed 200 starts
        r = post(server, "/v1/completions", {"prompt": "word " * CTX, "stream": stream})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


def test_api_key_required(server):
    r = post(server, "/v1/chat/completions", {"messages": FRANCE}, key="wrong")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server}/v1/models").status_code == 401
    assert httpx.get(f"{server}/health").status_code == 200  # health needs no key
    # the schema is behind the key too; the interactive docs (a browser sends no key) are off
    assert httpx.get(f"{server}/openapi.json").status_code == 401
    schema = httpx.get(f"{server}/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
    assert schema.status_code == 200 and "/v1/chat/completions" in schema.json()["paths"]
    assert httpx.get(f"{server}/docs").status_code == 404 and httpx.get(f"{server}/redoc").status_code == 404


@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty"])
@pytest.mark.parametrize("value", ["Infinity", "NaN"])
def test_non_finite_sampling_values_are_refused(server, field, value):
    body = f'{{"messages": [{{"role": "user", "content": "hi"}}], "{field}": {value}}}'
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code in (400, 422) and field in r.json()["error"]["message"]


def test_concurrent_requests_are_queued_and_not_mixed(client):
    prompts = ["The capital of Italy is", "Water boils at", "The largest planet is", "My favourite colour is"]
    alone = [client.completions.create(model="m", prompt=p, temperature=0, max_tokens=10).choices[0].text
             for p in prompts]
    got = [None] * len(prompts)

    def ask(i):
        stream = i % 2 == 1
        r = client.completions.create(model="m", prompt=prompts[i], temperature=0, max_tokens=10, stream=stream)
        got[i] = "".join(c.choices[0].text for c in r) if stream else r.choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert got == alone


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_the_generation(server, stream):
    body = {"messages": [{"role": "user", "content": "Write a very long story about a dragon."}], "temperature": 0,
            "max_tokens": CTX - 100, "stream": stream}  # minutes of work if it ran to the end
    seen = []  # /health's "generating" while the request is open
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.append(httpx.get(f"{server}/health", timeout=5).json()["generating"])
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        # non-streaming, the client gives up (times out) while the answer is generated; streaming, it hangs up
        with pytest.raises(httpx.ReadTimeout), httpx.stream("POST", f"{server}/v1/chat/completions", json=body,
                                                            timeout=3, headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200
            for i, _ in enumerate(r.iter_lines()):
                if i == 4:  # a few streamed chunks, then hang up
                    raise httpx.ReadTimeout("hang up")
    finally:
        done.set()
        watcher.join()
    assert True in seen, "the generation never started"
    assert wait_idle(server), "the generation went on after the client left"


def test_unset_sampling_takes_the_server_defaults(client):
    """A request that sets no sampling samples as tinychat.engine.SERVER_SAMPLING says (one place for defaults)."""
    from tinychat.engine import SERVER_SAMPLING as d

    def ask(**sampling):
        return client.completions.create(model="m", prompt="Once upon a time", max_tokens=12, seed=3,
                                         **sampling).choices[0].text

    explicit = ask(temperature=d.temperature, top_p=d.top_p, extra_body={"top_k": d.top_k})
    assert d.temperature > 0 and ask() == explicit != ask(temperature=0)


def test_a_huge_body_is_refused_while_health_stays_quick(server):
    """Bodies over --max-request-bytes get 413 before they are parsed: with Content-Length at once, without it
    (chunked) as soon as the limit is passed; /health keeps answering meanwhile."""
    url = f"{server}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    big = b'{"messages": [{"role": "user", "content": "' + b"x" * (2 * MAX_BODY) + b'"}]}'
    results = {}

    def send():
        results["declared"] = httpx.post(url, content=big, headers=headers, timeout=60)
        results["chunked"] = httpx.post(url, content=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]),
                                        headers=headers, timeout=60)

    thread = threading.Thread(target=send)
    thread.start()
    waits = []
    while thread.is_alive() or not waits:
        t0 = time.perf_counter()
        assert httpx.get(f"{server}/health", timeout=5).status_code == 200
        waits.append(time.perf_counter() - t0)
    thread.join()
    for kind in ("declared", "chunked"):
        r = results[kind]
        assert r.status_code == 413, (kind, r.text)
        assert "larger than this server's limit" in r.json()["error"]["message"]
    assert max(waits) < 0.5, waits
    ok = post(server, "/v1/chat/completions", {"messages": FRANCE, "max_tokens": 2})  # still serving
    assert ok.status_code == 200
