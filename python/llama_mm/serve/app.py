"""The FastAPI app: OpenAI-compatible routes over a Service, the chat page, health and metrics; every error as
OpenAI's error JSON (errors.py)."""
from __future__ import annotations

import logging
import re
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from . import MAX_BODY_BYTES
from .errors import APIError
from .responses import Envelope, TokenText, chat_logprobs, completion_logprobs, sse, usage
from .schemas import ChatCompletionRequest, CompletionRequest
from .service import Run, Service

STATIC = Path(__file__).parent / "static"
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still connected


def create_app(service: Service, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    text_of = TokenText(service.processor.tokenizer)

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.engine.close(cancel_running=True)  # after uvicorn's graceful shutdown: cancel what is left
        logging.getLogger("uvicorn.error").info("llama-mm serve: engine closed")

    app = FastAPI(title="llama_mm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    _error_handlers(app)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key: send `Authorization: Bearer <key>`",
                           code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != service.model_id:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {service.model_id!r}",
                           param="model", code="model_not_found")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": service.model_id, "object": "model", "created": 0,
                                            "owned_by": "llama_mm"}]}

    @v1.post("/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        received = time.perf_counter()
        check_model(req.model)
        prepared = await service.prepare_chat(req)
        run = await service.start([prepared], req.n, received)
        return await _respond(run, request, Envelope(True, service.model_id), req, [prepared.prompt_tokens],
                              lambda entries, choice: chat_logprobs(entries, text_of))

    @v1.post("/completions")
    async def completions(req: CompletionRequest, request: Request):
        received = time.perf_counter()
        check_model(req.model)
        prepared = await service.prepare_completion(req)
        run = await service.start(prepared, req.n, received)
        offsets = {}

        def logprobs(entries, choice):
            offset = offsets.get(choice.index, 0)
            offsets[choice.index] = offset + sum(len(text_of(e.token_id)[0]) for e in entries)
            return completion_logprobs(entries, text_of, offset)

        return await _respond(run, request, Envelope(False, service.model_id), req,
                              [p.prompt_tokens for p in prepared],
                              logprobs)

    app.include_router(v1)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.model_id}

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def _respond(run: Run, request: Request, env: Envelope, req, prompt_tokens: list[int], format_logprobs):
    """The whole answer as one JSON, or (stream: true) as server-sent events; the run is cancelled if the client
    goes away (a stream: its generator is closed; one JSON: the connection is watched while the answer is made)."""
    def fmt(choice, entries):
        return None if choice.prepared.logprobs is None else format_logprobs(entries, choice)

    def totals() -> dict:
        return usage(sum(prompt_tokens), sum(c.finish.completion_tokens for c in run.choices))

    if not req.stream:
        async def cancel_on_disconnect():
            while not await request.is_disconnected():
                await anyio.sleep(DISCONNECT_POLL_S)
            run.cancel()

        async with anyio.create_task_group() as watcher:
            watcher.start_soon(cancel_on_disconnect)
            try:
                async for _ in run.events():
                    pass
            finally:
                run.cancel()
                watcher.cancel_scope.cancel()
        for c in run.choices:
            if c.finish_reason == "error":
                raise APIError(500, f"generation failed: {c.finish.error}")
        choices = [env.choice(c.index, c.text, fmt(c, c.logprobs), c.finish_reason, stream=False)
                   for c in run.choices]
        return JSONResponse(env.wrap(choices, stream=False, usage=totals()))

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    extra = {"usage": None} if include_usage else {}

    async def events():
        try:
            if env.chat:
                for c in run.choices:
                    yield sse(env.wrap([env.choice(c.index, None, None, None, True, first=True)], True, **extra))
            async for c in run.events():
                final = c.finish is not None
                piece = c.pending_text(final)
                entries = c.pending_logprobs() if piece or final else []
                if piece or entries:
                    yield sse(env.wrap([env.choice(c.index, piece, fmt(c, entries), None, True)], True, **extra))
                if final:
                    if c.finish_reason == "error":
                        yield sse(APIError(500, f"generation failed: {c.finish.error}").body())
                    yield sse(env.wrap([env.choice(c.index, None, None, c.finish_reason, True)], True, **extra))
            if include_usage:
                yield sse(env.wrap([], True, usage=totals()))
            yield sse("[DONE]")
        finally:
            run.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        err = exc.errors()[0]
        if err["type"] == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            return APIError(400, f"malformed JSON in the request body: {detail} (at character {err['loc'][-1]})",
                            code="invalid_json").response()
        errors = exc.errors()
        deepest = max(errors, key=lambda e: len(e["loc"]))  # the most specific of a union's alternatives
        param = _field_path(deepest["loc"])
        msgs = list(dict.fromkeys(e["msg"] for e in errors if _field_path(e["loc"]) == param))
        where = f"{param}: " if param else "request body: "
        return APIError(400, where + " or ".join(msgs), param=param, code="invalid_value").response()

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None,
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def crash(request, exc: Exception):
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()


_UNION_MEMBER = re.compile(r"^(str|int|float|bool|.*\[.*\])$")  # pydantic's names for a union's alternatives


def _field_path(loc) -> str | None:
    """pydantic's error location -> the request field as a dotted path: messages.0.content.1.image_url.url."""
    parts = []
    for x in loc:
        x = str(x)
        if x == "body" and not parts or _UNION_MEMBER.match(x) or (parts and parts[-1] == x):
            continue  # the body itself, a union alternative, a tagged union's tag
        parts.append(x)
    return ".".join(parts) or None


class BodyLimit:
    """Pure ASGI middleware: request bodies over max_bytes get a 413 (checked on Content-Length, and on the bytes
    as they arrive); smaller bodies are buffered and replayed to the app."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(int(declared), scope, receive, send)
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self.max_bytes:
                return await self._too_large(total, scope, receive, send)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, size, scope, receive, send):
        err = APIError(413, f"request body of {size}+ bytes exceeds the limit of {self.max_bytes} bytes "
                            "(--max-body-bytes)", code="body_too_large")
        await err.response()(scope, receive, send)
