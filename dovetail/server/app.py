"""The HTTP routes: OpenAI's completions and chat completions, models, health and metrics.

A request is checked before any model work: its Host (DNS rebinding), its key, its
Content-Type, its body size (read no further than the limit), its fields and its text's
length. Then the chat template and the tokenizer run in a thread, and the coordinator admits
the request or refuses it (503, 400): all of these are plain HTTP errors.

Streaming is SSE, and starts at once: the status and headers go out as soon as the request
is admitted, then ``: keep-alive`` comments while it waits for a slot or prefills;
``data: {json}`` events; for chat a first chunk with the role; exactly one chunk with a
finish_reason, which also carries the ``dovetail`` statistics; a usage chunk when
stream_options.include_usage; then ``data: [DONE]``. An error after the stream has started
goes out as an error event, then ``[DONE]``: its status line is already sent.

A client that leaves cancels its request at any stage: while it is tokenized, queued,
prefilled or streamed.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import time
import uuid

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dovetail.runtime.results import Stats
from dovetail.server.engine import Engine, Finished, Run, public_model_name
from dovetail.server.errors import (APIError, bad_request, client_gone, host_not_allowed, too_large,
                                    unsupported_media_type)
from dovetail.server.logprobs import TokenText, chat_logprobs, completion_logprobs
from dovetail.server.metrics import CONTENT_TYPE
from dovetail.server.openapi import openapi_route
from dovetail.server.schema import ChatRequest, CompletionRequest, parse, sampling
from dovetail.server.tools import ToolCallParser

log = logging.getLogger("dovetail.server")

DISCONNECT_POLL_S = 0.1  # how often a request that is not streaming yet checks that its client is still there
# Seconds between ': keep-alive' SSE comments while a stream waits for a slot or its prefill:
# proxies drop a connection that is silent for 60 s (nginx's proxy_read_timeout).
KEEPALIVE_S = 5.0
MAX_BODY_BYTES = 4 << 20  # the request body limit unless --max-body-mb says otherwise
# Host names always answered: a browser page can only send these from a loopback origin.
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
JSON_TYPE = "application/json"
KEEPALIVE = b": keep-alive\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering either


def build_app(engine: Engine, api_keys: list[str], cors_origins: list[str] | None = None,
              allowed_hosts: list[str] | None = None, max_body_bytes: int = MAX_BODY_BYTES,
              keepalive_s: float | None = None) -> Starlette:
    """``allowed_hosts``: Host names answered besides loopback names and IP addresses ('*': any).
    ``keepalive_s``: seconds between keep-alive comments (default KEEPALIVE_S)."""
    keys = [k.encode() for k in api_keys]

    def authorize(request: Request) -> str:
        """Refuse a request without a valid key; return its scope: whose earlier outputs the suffix
        draft may copy from and whose cached prompt prefixes the target may start from (one per
        key: speed is a timing side channel between tenants)."""
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
            except ClientDisconnect:  # gone while its body came: nobody reads the answer
                return error_response(client_gone())
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
        req = parse(model, await read_json(request, max_body_bytes))
        engine.require_ready()
        engine.check_model(req.model)
        s = sampling(req)
        engine.check_size(s)
        ids, max_tokens = await unless_gone(request, engine.prepare(s))
        run = engine.submit(s, ids, max_tokens, scope=request.state.scope)  # admission refusals: 503, 400
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
                "model": engine.served_name}
        tokens = engine.token_text() if "logprobs" in s.processing else None  # None: no logprobs asked
        # The model was shown tools: its calls come back as tool_calls (engine.resolve_tools found the format).
        calls = ToolCallParser(s.tools.family) if chat and s.tools is not None and s.tools.parses else None
        if s.stream:  # the headers go now, not at the first token (which a long prefill delays)
            return EventStream(stream(run, meta, chat, s.include_usage, keepalive_s or KEEPALIVE_S, tokens, calls),
                               run)
        return JSONResponse(await collect(request, run, meta, chat, tokens, calls))

    async def models(request: Request) -> Response:
        coord = engine.require_ready()
        t, d = coord.target_info, coord.draft_info
        return JSONResponse({"object": "list", "data": [{
            "id": engine.served_name, "object": "model", "created": int(time.time()), "owned_by": "dovetail",
            "max_model_len": t.max_context or None,
            "meta": {"target": {"model": public_model_name(t.model), "dtype": t.dtype, "device": t.device},
                     "draft": {"model": public_model_name(d.model), "dtype": d.dtype, "device": d.device}
                     if d else None}}]})

    async def health(request: Request) -> Response:
        """The status alone; ``?detail=1`` adds the details (a failure's paths, a dead worker's
        last log lines), behind the key like every other route that shows them."""
        status, body = engine.health()
        if request.query_params.get("detail", "0").lower() not in ("", "0", "false", "no"):
            authorize(request)
            return JSONResponse(body, status_code=status)
        return JSONResponse({"status": body["status"]}, status_code=status)

    async def metrics(request: Request) -> Response:
        if engine.coord is not None:  # a blocking round trip to each worker: off the event loop
            for worker, n in (await run_in_threadpool(engine.coord.worker_requests)).items():
                engine.metrics.worker_requests.labels(worker).set(n)
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       "invalid_request_error", code="not_found" if exc.status_code == 404 else None))

    # First: a request from a rebinding page is refused before CORS or a route sees it.
    middleware = [Middleware(HostAllowlist, allowed=allowed_hosts or [])]
    if cors_origins:
        # Any request header: the SDKs send their own (X-Stainless-*, OpenAI-Organization, ...),
        # and with bearer keys, not cookies, a header lets nothing through that a key does not.
        middleware.append(Middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                                     allow_headers=["*"], expose_headers=["Retry-After"]))
    routes = [
        Route("/v1/chat/completions", guarded(chat), methods=["POST"]),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/metrics", guarded(metrics), methods=["GET"]),
        Route("/health", guarded(health, needs_key=False), methods=["GET"]),
        Route("/openapi.json", guarded(openapi_route, needs_key=False), methods=["GET"]),
    ]
    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: not_found})


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


# ---- what comes in -----------------------------------------------------------------------------
class HostAllowlist:
    """Answer only a Host that is a loopback name, an IP address or an allowed name; 421 otherwise.

    A DNS-rebinding page (its own domain re-pointed at 127.0.0.1) reaches a loopback server
    under that domain's name, which this refuses. An IP address cannot be rebound, so any is
    answered: a server on 0.0.0.0 is reached by its addresses without naming each one.
    """

    def __init__(self, app, allowed: list[str]):
        self.app = app
        self.allowed = LOOPBACK_HOSTS | {host_name(name) for name in allowed}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
            if not self.allows(host):
                # info, not a warning: a page can repeat it endlessly
                log.info("refused a request for host %r (not in --allowed-host)", host)
                await error_response(host_not_allowed(host))(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def allows(self, host: str | None) -> bool:
        if host is None or "*" in self.allowed:  # no Host: HTTP/1.0, never a browser
            return True
        name = host_name(host)
        if name in self.allowed:
            return True
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False


def host_name(host: str) -> str:
    """The name in a Host header, lower case, without its port or IPv6 brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":")[0]
    return host.rstrip(".")


async def read_json(request: Request, limit: int):
    given = request.headers.get("content-type", "")
    # A page may post text/plain cross-origin without a preflight: only JSON is taken as JSON.
    if given.split(";")[0].strip().lower() != JSON_TYPE:
        raise unsupported_media_type(given)
    body = await read_body(request, limit)
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the body is not valid JSON: {e}") from None


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) by its Content-Length before a byte is read, or as soon as a
    chunked body passes the limit; what is left unread is not buffered."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large(limit)
    return bytes(body)


async def unless_gone(request: Request, awaitable):
    """Await ``awaitable``, cancelled (499) if the client leaves meanwhile."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise client_gone()
    finally:
        task.cancel()  # a no-op once it is done


# ---- responses ---------------------------------------------------------------------------------
def usage(stats: Stats, completion_tokens: int) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": stats.prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}


def dovetail_stats(stats: Stats) -> dict:
    return {"rounds": stats.rounds, "drafted": stats.drafted, "accepted": stats.accepted_drafts,
            "mean_accepted_length": round(stats.mean_accepted, 4), "draft_seconds": round(stats.draft_s, 6),
            "verify_seconds": round(stats.verify_s, 6), "wire_seconds": round(stats.wire_s, 6),
            "draft_fallback": stats.draft_fallback, "cached_tokens": stats.cached_tokens,
            "prefill_seconds": round(stats.prefill_s, 6)}


async def collect(request: Request, run: Run, meta: dict, chat: bool, tokens: TokenText | None = None,
                  calls: ToolCallParser | None = None) -> dict:
    """The whole completion; a client that disconnects meanwhile (queued, prefilling or
    decoding) cancels it within DISCONNECT_POLL_S. With ``calls``, the model's tool calls
    come back as the message's tool_calls (its content: the text around them, or null)."""
    loop = asyncio.get_running_loop()
    items = []
    next_poll = loop.time() + DISCONNECT_POLL_S
    try:
        async for item in run.events(idle_s=DISCONNECT_POLL_S):
            if loop.time() >= next_poll:  # also between chunks: a long completion streams them steadily
                if await request.is_disconnected():
                    raise client_gone()
                next_poll = loop.time() + DISCONNECT_POLL_S
            if item is not None:
                items.append(item)
    finally:
        run.cancel()
    if not items or not isinstance(items[-1], Finished):
        raise APIError(500, "the request ended without a result", "server_error")
    chunks = items[:-1]
    text = "".join(i.text for i in chunks)
    n_tokens = sum(len(i.token_ids) for i in chunks)
    end: Finished = items[-1]
    logprobs = None
    if tokens is not None:
        ids = [t for c in chunks for t in c.token_ids]
        entries = [e for c in chunks for e in c.logprobs or []]
        logprobs = chat_logprobs(entries, ids, tokens) if chat else completion_logprobs(entries, ids, tokens)
    if chat:
        message, finish_reason = {"role": "assistant", "content": text}, end.finish_reason
        if calls is not None:
            calls.feed(text)  # as a stream would be: the same parse, whatever the chunking
            calls.finish()
            content, found = calls.result()
            if found:
                message = {"role": "assistant", "content": content, "tool_calls": found}
            finish_reason = calls.finish_reason(finish_reason)
        choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": end.finish_reason}
    return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
            "usage": usage(end.result.stats, n_tokens), "dovetail": dovetail_stats(end.result.stats)}


class EventStream(StreamingResponse):
    """An SSE response that cancels its request however it ends: also when the client left
    before the first byte, when the body iterator never starts (and its finally never runs)."""

    def __init__(self, content, run: Run):
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self.run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.cancel()


async def stream(run: Run, meta: dict, chat: bool, include_usage: bool, keepalive_s: float,
                 tokens: TokenText | None = None, calls: ToolCallParser | None = None):
    """The SSE body. A client that leaves cancels it at its next await (Starlette listens for
    the disconnect), and the request with it: queued, prefilling or decoding. With ``calls``,
    the text goes through the tool-call parser: content deltas, and each call as OpenAI
    streams one (its index, id, type and name, then its arguments) once it is complete."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list, **extra) -> bytes:
        return f"data: {json.dumps({**meta, 'object': obj, 'choices': choices, **extra})}\n\n".encode()

    def piece(text: str | None, finish: str | None, role: bool = False, logprobs: dict | None = None) -> dict:
        if chat:
            delta = ({"role": "assistant", "content": ""} if role else {"content": text} if text is not None else {})
            return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}

    def delta_piece(delta: dict, logprobs: dict | None = None) -> dict:
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": None}

    def chunk_logprobs(item) -> dict | None:
        if tokens is None or not item.token_ids:
            return None
        entries = item.logprobs or []
        if chat:
            return chat_logprobs(entries, item.token_ids, tokens)
        out = completion_logprobs(entries, item.token_ids, tokens, offset[0])
        offset[0] += len(item.text)
        return out

    n_tokens, offset = 0, [0]
    try:
        if chat:
            yield event([piece(None, None, role=True)])
        async for item in run.events(idle_s=keepalive_s):
            if item is None:  # waiting for a slot or a prefill: a comment keeps proxies from cutting it
                yield KEEPALIVE
            elif isinstance(item, Finished):
                stats, finish_reason = item.result.stats, item.finish_reason
                if calls is not None:
                    for delta in calls.finish():  # what the parser held back: text, or a call the end closed
                        yield event([delta_piece(delta)])
                    finish_reason = calls.finish_reason(finish_reason)
                yield event([piece(None if chat else "", finish_reason)], dovetail=dovetail_stats(stats))
                if include_usage:
                    yield event([], usage=usage(stats, n_tokens))
                break
            else:
                n_tokens += len(item.token_ids)
                lps = chunk_logprobs(item)
                if calls is not None:
                    deltas = calls.feed(item.text) if item.text else []
                    if not deltas and lps is not None:  # text the parser holds back still has its logprobs
                        deltas = [{"content": ""}]
                    for i, delta in enumerate(deltas):  # the chunk's logprobs go with its first delta
                        yield event([delta_piece(delta, lps if i == 0 else None)])
                elif item.text or lps is not None:  # a token that completes no text yet still has its logprob
                    yield event([piece(item.text, None, logprobs=lps)])
    except APIError as e:
        yield e.sse()
    except Exception as e:  # noqa: BLE001 (a fault mid-stream still ends the stream properly)
        log.exception("stream failed")
        yield APIError(500, f"{type(e).__name__}: {e}", "server_error", code="internal_error").sse()
    finally:
        run.cancel()  # a client gone mid-stream cancels the request here
    yield b"data: [DONE]\n\n"
