"""The HTTP routes: OpenAI's completions and chat completions, models, health and metrics.

Streaming is SSE: ``data: {json}`` events; for chat a first chunk with the role; exactly one
chunk with a finish_reason, which also carries the ``dovetail`` statistics; a usage chunk
when stream_options.include_usage; then ``data: [DONE]``. An error after the stream has
started goes out as an error event, then ``[DONE]``: its status line is already sent.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.concurrency import run_in_threadpool

from dovetail.runtime.results import Chunk, Stats
from dovetail.server.engine import Engine, Finished
from dovetail.server.errors import APIError, bad_request
from dovetail.server.metrics import CONTENT_TYPE
from dovetail.server.schema import ChatRequest, CompletionRequest, parse, sampling

log = logging.getLogger("dovetail.server")

DISCONNECT_POLL_S = 0.1  # how often a non-streamed request checks that its client is still there


def build_app(engine: Engine, api_keys: list[str], cors_origins: list[str] | None = None) -> Starlette:
    keys = [k.encode() for k in api_keys]

    def authorize(request: Request) -> str:
        """Refuse a request without a valid key; return its scope: whose earlier outputs the suffix
        draft may copy from (one per key: speed is a timing side channel between tenants)."""
        if not keys:
            return ""
        given = request.headers.get("authorization", "")
        token = given[7:].strip().encode() if given.lower().startswith("bearer ") else b""
        ok = False
        for key in keys:  # every key compared, in constant time: no early exit to time
            ok |= hmac.compare_digest(token, key)
        if not ok:
            raise APIError(401, "a valid API key is required (Authorization: Bearer KEY)" if token
                           else "missing API key (Authorization: Bearer KEY)",
                           "authentication_error", code="invalid_api_key")
        return hashlib.sha256(token).hexdigest()[:16]

    def guarded(handler, needs_key=True):
        async def endpoint(request: Request) -> Response:
            try:
                if needs_key:
                    request.state.scope = authorize(request)
                return await handler(request)
            except APIError as e:
                return error_response(e)
            except Exception as e:  # a fault: 500, in the envelope
                log.exception("unhandled error on %s", request.url.path)
                return error_response(APIError(500, f"{type(e).__name__}: {e}", "server_error",
                                               code="internal_error"))
        return endpoint

    async def chat(request: Request) -> Response:
        return await complete(request, ChatRequest, chat=True)

    async def completions(request: Request) -> Response:
        return await complete(request, CompletionRequest, chat=False)

    async def complete(request: Request, model, chat: bool) -> Response:
        req = parse(model, await read_json(request))
        engine.require_ready()
        engine.check_model(req.model)
        s = sampling(req)
        events = engine.run(s, scope=request.state.scope)
        first = await anext_or_error(events)  # refusals (400, 503) before any byte is sent
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
                "model": engine.served_name}
        if s.stream:
            return StreamingResponse(stream(events, first, meta, chat, s.include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await collect(request, events, first, meta, chat))

    async def models(request: Request) -> Response:
        coord = engine.require_ready()
        t, d = coord.target_info, coord.draft_info
        return JSONResponse({"object": "list", "data": [{
            "id": engine.served_name, "object": "model", "created": int(time.time()), "owned_by": "dovetail",
            "max_model_len": t.max_context or None,
            "meta": {"target": {"model": t.model, "dtype": t.dtype, "device": t.device},
                     "draft": {"model": d.model, "dtype": d.dtype, "device": d.device} if d else None}}]})

    async def health(request: Request) -> Response:
        status, body = engine.health()
        return JSONResponse(body, status_code=status)

    async def metrics(request: Request) -> Response:
        if engine.coord is not None:  # a blocking round trip to each worker: off the event loop
            for worker, n in (await run_in_threadpool(engine.coord.worker_requests)).items():
                engine.metrics.worker_requests.labels(worker).set(n)
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       "invalid_request_error", code="not_found" if exc.status_code == 404 else None))

    middleware = []
    if cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"]))
    routes = [
        Route("/v1/chat/completions", guarded(chat), methods=["POST"]),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/metrics", guarded(metrics), methods=["GET"]),
        Route("/health", guarded(health, needs_key=False), methods=["GET"]),
    ]
    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: not_found})


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def read_json(request: Request):
    body = await request.body()
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the body is not valid JSON: {e}") from None


async def anext_or_error(events):
    try:
        return await anext(events)
    except StopAsyncIteration:
        raise APIError(500, "the request ended without a result", "server_error") from None


# ---- responses ---------------------------------------------------------------------------------
def usage(stats: Stats, completion_tokens: int) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": stats.prompt_tokens + completion_tokens}


def dovetail_stats(stats: Stats) -> dict:
    return {"rounds": stats.rounds, "drafted": stats.drafted, "accepted": stats.accepted_drafts,
            "mean_accepted_length": round(stats.mean_accepted, 4), "draft_seconds": round(stats.draft_s, 6),
            "verify_seconds": round(stats.verify_s, 6), "wire_seconds": round(stats.wire_s, 6),
            "draft_fallback": stats.draft_fallback}


async def collect(request: Request, events, first, meta: dict, chat: bool) -> dict:
    """The whole completion; a client that disconnects meanwhile cancels it."""
    async def drain():
        out = [first]
        async for item in events:
            out.append(item)
        return out

    task = asyncio.ensure_future(drain())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                break
            if await request.is_disconnected():
                task.cancel()  # closes the generator: Engine.run cancels the request
                raise APIError(499, "the client disconnected", "client_closed_request")
        items = task.result()
    finally:
        if not task.done():
            task.cancel()
    text = "".join(i.text for i in items if isinstance(i, Chunk))
    n_tokens = sum(len(i.token_ids) for i in items if isinstance(i, Chunk))
    end: Finished = items[-1]
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
               "finish_reason": end.finish_reason} if chat else
              {"index": 0, "text": text, "logprobs": None, "finish_reason": end.finish_reason})
    return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
            "usage": usage(end.result.stats, n_tokens), "dovetail": dovetail_stats(end.result.stats)}


async def stream(events, first, meta: dict, chat: bool, include_usage: bool):
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list, **extra) -> bytes:
        return f"data: {json.dumps({**meta, 'object': obj, 'choices': choices, **extra})}\n\n".encode()

    def piece(text: str | None, finish: str | None, role: bool = False) -> dict:
        if chat:
            delta = ({"role": "assistant", "content": ""} if role else {"content": text} if text is not None else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    n_tokens = 0
    try:
        if chat:
            yield event([piece(None, None, role=True)])
        item = first
        while True:
            if isinstance(item, Finished):
                stats = item.result.stats
                yield event([piece(None if chat else "", item.finish_reason)], dovetail=dovetail_stats(stats))
                if include_usage:
                    yield event([], usage=usage(stats, n_tokens))
                break
            n_tokens += len(item.token_ids)
            if item.text:
                yield event([piece(item.text, None)])
            item = await anext(events)
    except APIError as e:
        yield e.sse()
    except Exception as e:  # noqa: BLE001 (a fault mid-stream still ends the stream properly)
        log.exception("stream failed")
        yield APIError(500, f"{type(e).__name__}: {e}", "server_error", code="internal_error").sse()
    finally:
        await events.aclose()  # a client gone mid-stream cancels the request here
    yield b"data: [DONE]\n\n"
