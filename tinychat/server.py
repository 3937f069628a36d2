"""`tinychat serve`: an OpenAI-compatible HTTP API over one model (FastAPI + uvicorn).

Endpoints: POST /v1/chat/completions and /v1/completions (JSON or SSE streaming), GET /v1/models, GET /health.
One generation runs at a time; other requests wait in arrival order. A client that disconnects stops its
generation at the next token. Errors use OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool

from tinychat.api import Completion, Model, TextStream
from tinychat.engine import SERVER_SAMPLING, SamplingParams
from tinychat.errors import TinychatError

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_MAX_REQUEST_BYTES = 8 << 20  # a request body beyond this is refused (413) before it is read
IDLE_TIMEOUT_S = 5  # a keep-alive connection with no request for this long is closed


def _text(value: str) -> str:
    """A string the tokenizer can encode: JSON may carry a lone UTF-16 surrogate ("\\ud800"), which no UTF-8 holds."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"holds a lone UTF-16 surrogate at character {e.start} (not valid Unicode text)") from None
    return value


Text = Annotated[str, AfterValidator(_text)]


class TextPart(BaseModel):
    type: str
    text: Text | None = None

    @model_validator(mode="after")
    def _text_only(self) -> TextPart:
        if self.type != "text":
            raise ValueError(f"content parts of type {self.type!r} are not supported: this server reads text only")
        if self.text is None:
            raise ValueError("a text part needs its text")
        return self


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text or "" for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by both endpoints. Unknown fields are ignored (as OpenAI-compatible servers do); known ones
    are type-checked."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None  # extension (llama.cpp, vLLM)
    repetition_penalty: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None  # extension (vLLM)
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None  # what torch's generator takes
    stop: Text | list[Text] | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # OpenAI's newer name for max_tokens


class CompletionRequest(SamplingFields):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)]


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error_response(status: int, message: str, param: str | None = None,
                    kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": kind, "param": param, "code": None}})


def _validation_message(exc: RequestValidationError) -> tuple[int, str, str | None]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "the request body is not valid JSON", None
    # our own checks (lone surrogates, non-text parts) say more than a union's other branch ("should be a string")
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    # the field's path, without pydantic's names of union branches ("function-after[...]", "list[TextPart]")
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not (isinstance(p, str) and "[" in p)]
    param = ".".join(loc) or None
    return 422, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param


class _BodyLimit:
    """ASGI wrapper: a request body over `limit` bytes gets 413 in OpenAI's error shape before the app parses it: at
    once when Content-Length says so (the server's HTTP layer holds the body to it), else (chunked) once the bytes
    read pass the limit; such a body is read here, up to the limit, and handed on as read."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return await _error_response(400, "invalid Content-Length header")(scope, receive, send)
            if size > self.limit:
                return await self._refuse(scope, receive, send)
            return await self.app(scope, receive, send)
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.limit:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        response = _error_response(413, f"the request body is larger than this server's limit of {self.limit} "
                                        "bytes (tinychat serve --max-request-bytes)")
        await response(scope, receive, send)


def create_app(llm: Model, api_key: str | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
    """The FastAPI app serving `llm`; with api_key, /v1/* and the OpenAPI schema require `Authorization: Bearer
    <api_key>`, and the interactive docs pages are off (a browser would not send the key)."""
    open_docs = {} if api_key is None else dict(docs_url=None, redoc_url=None, openapi_url=None)
    app = FastAPI(title="tinychat", version="1", **open_docs)
    app.add_middleware(_BodyLimit, limit=max_request_bytes)  # a pure ASGI wrapper: disconnects still reach us
    queue = asyncio.Lock()  # one generation at a time; waiters are served in arrival order
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _on_validation_error(request: Request, exc: RequestValidationError):
        return _error_response(*_validation_message(exc))

    @app.exception_handler(TinychatError)
    async def _on_tinychat_error(request: Request, exc: TinychatError):
        return _error_response(400, str(exc))

    @app.exception_handler(APIError)
    async def _on_api_error(request: Request, exc: APIError):
        return _error_response(exc.status, exc.message, exc.param, exc.kind)

    async def check_key(request: Request) -> None:
        # a dependency, not a middleware: Starlette's HTTP middleware would hide client disconnects from us
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(401, "invalid or missing API key (Authorization: Bearer ...)", kind="authentication_error")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    if api_key is not None:
        @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(check_key)])
        async def openapi_schema():
            return app.openapi()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": llm.name, "generating": queue.locked()}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": llm.name, "object": "model", "created": created,
                                            "owned_by": "tinychat", "max_model_len": llm.context_length}]}

    def sampling(req: SamplingFields, prompt_tokens: int, max_tokens: int | None, prompt_param: str) -> dict:
        """The generation settings, checked here, before a streamed response has started."""
        room = llm.context_length - prompt_tokens
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_tokens} tokens; this model's context is "
                                f"{llm.context_length}", prompt_param)
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"max_tokens={max_tokens} does not fit: the prompt has {prompt_tokens} tokens and "
                                f"the context is {llm.context_length} (at most {room} new tokens)", "max_tokens")
        given = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
                 "repetition_penalty": req.repetition_penalty}  # where a request sets none: SERVER_SAMPLING's
        params = {**{k: getattr(SERVER_SAMPLING, k) if v is None else v for k, v in given.items()}, "seed": req.seed,
                  "max_new_tokens": max_tokens or room}
        try:
            SamplingParams(**params)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return params

    async def run(request: Request, start, req: SamplingFields, chunk, final) -> StreamingResponse | dict:
        """Queue, then generate. start(stops): a TextStream (called in a worker thread); chunk(piece, finish_reason)
        and final(completion) build the response objects."""
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def pieces() -> AsyncIterator[str | Completion]:
            async with queue:
                stream: TextStream = await run_in_threadpool(start, stops)
                try:
                    while True:
                        piece = await run_in_threadpool(next, stream, None)  # the thread always finishes its token
                        if piece is None:
                            break
                        yield piece
                        if await request.is_disconnected():
                            break
                finally:
                    stream.close()
                yield stream.completion

        if not req.stream:
            text = []
            async for item in pieces():
                if isinstance(item, str):
                    text.append(item)
                else:
                    return final(item)
            raise AssertionError("unreachable: pieces() always ends with a Completion")

        async def events() -> AsyncIterator[str]:
            async for item in pieces():
                if isinstance(item, str):
                    yield f"data: {json.dumps(chunk(item, None))}\n\n"
                else:
                    yield f"data: {json.dumps(chunk('', reason(item)))}\n\n"
                    if include_usage:
                        yield f"data: {json.dumps(dict(chunk('', None), choices=[], usage=usage(item)))}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def usage(c: Completion) -> dict:
        return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                "total_tokens": c.prompt_tokens + c.completion_tokens}

    def reason(c: Completion) -> str:
        return "length" if c.finish_reason == "length" else "stop"

    @v1.post("/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:  # rendering and tokenizing a long conversation take time: off the event loop (/health stays quick)
            ids = await run_in_threadpool(llm.chat_prompt_ids, messages)
        except TinychatError as e:
            raise APIError(400, str(e), "messages") from None
        params = sampling(req, len(ids), req.max_completion_tokens or req.max_tokens, "messages")
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        first = [True]

        def chunk(piece: str, finish: str | None) -> dict:
            delta = {"content": piece} if piece or finish is None else {}
            if first[0]:
                delta, first[0] = {"role": "assistant", **delta}, False
            return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": llm.name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        def final(c: Completion) -> dict:
            return {"id": rid, "object": "chat.completion", "created": now, "model": llm.name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                                 "finish_reason": reason(c)}],
                    "usage": usage(c)}

        return await run(request, lambda stops: llm.chat(messages, stream=True, stop=stops, **params), req, chunk,
                         final)

    @v1.post("/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        if not prompt:
            raise APIError(400, "prompt is empty", "prompt")
        n_prompt = await run_in_threadpool(llm.count_tokens, prompt)
        params = sampling(req, n_prompt, req.max_tokens or min(DEFAULT_COMPLETION_MAX_TOKENS,
                                                               llm.context_length - n_prompt) or None, "prompt")
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(piece: str, finish: str | None) -> dict:
            return {"id": rid, "object": "text_completion", "created": now, "model": llm.name,
                    "choices": [{"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}]}

        def final(c: Completion) -> dict:
            return {"id": rid, "object": "text_completion", "created": now, "model": llm.name,
                    "choices": [{"index": 0, "text": c.text, "logprobs": None, "finish_reason": reason(c)}],
                    "usage": usage(c)}

        return await run(request, lambda stops: llm.generate(prompt, stream=True, stop=stops, **params), req, chunk,
                         final)

    app.include_router(v1)
    return app


def listen(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening socket on host:port, or TinychatError in one line (a port in use, an address not permitted):
    `tinychat serve` calls this before it loads the model, and says it is serving only once the port is its own."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise TinychatError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise TinychatError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def serve(llm: Model, sock: socket.socket, api_key: str | None = None,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
    """Serve `llm` on a socket from listen() until interrupted."""
    import uvicorn

    app = create_app(llm, api_key, max_request_bytes)
    uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_keep_alive=IDLE_TIMEOUT_S)).run(sockets=[sock])
