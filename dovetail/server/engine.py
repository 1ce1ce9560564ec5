"""The coordinator behind the server, seen from asyncio.

Each HTTP request is checked for size, then templated and tokenized in a thread (never on
the event loop, which every stream shares), then becomes one Coordinator.submit(): the
coordinator's request thread calls back with every chunk and the one terminal event, and
the callback hands them to the event loop (call_soon_threadsafe). The metrics are taken in
that callback, so a request whose client went away is still counted when it ends. Whoever
stops listening (a disconnect, the time limit) cancels the request: a request waiting for a
slot leaves the queue at once, a running one stops after the round in flight and is closed
on both workers.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator

from dovetail.runtime.client import WorkerError
from dovetail.runtime.kvpool import ContextTooLong
from dovetail.runtime.requests import CoordinatorBusy
from dovetail.runtime.results import Chunk, GenerationResult
from dovetail.server.errors import APIError, bad_request
from dovetail.server.metrics import Metrics
from dovetail.server.schema import Sampling
from dovetail.server.tools import (FAMILIES, MISTRAL, MISTRAL_MARK, detect_family, forced_call_grammar,
                                   template_supports_tools)

log = logging.getLogger("dovetail.server")

DEFAULT_RESERVE_TOKENS = 1024  # output a request without max_tokens reserves KV cells for (runtime/kvpool.py)
RETRY_AFTER_S = 1  # what a 503 for a full queue tells the client to wait
LOADING, READY, FAILED = "loading", "ready", "failed"
# Prompt text longer than this many characters per token of the target's context cannot fit
# (tokenizers average 3-4 characters a token on text and code): refused before the chat
# template and the tokenizer spend seconds on it.
CHARS_PER_TOKEN = 8
MAX_PROMPT_CHARS = 1 << 20  # the same cap where the target reports no context length
# A prompt this short (and without tools) is templated and tokenized on the event loop: about a
# millisecond, what the hop to a worker thread and back costs before every first token.
INLINE_PREPARE_CHARS = 2000


@dataclass
class Finished:
    """The end of a request: its result and the OpenAI finish_reason."""
    result: GenerationResult
    finish_reason: str


class Engine:
    """Owns the coordinator once start() has brought the workers up."""

    def __init__(self, metrics: Metrics, request_timeout_s: float, served_name: str | None = None):
        self.metrics, self.request_timeout_s = metrics, request_timeout_s
        self.coord = None
        self.state, self.failure = LOADING, ""
        self.served_name = served_name
        self._ready = threading.Event()
        self._token_text = None
        self._last_problem = ""  # the health problem logged last (logged again only when it changes)
        metrics.running.set_function(lambda: self.coord.active if self.coord else 0)
        metrics.waiting.set_function(lambda: self.coord.in_flight - self.coord.active if self.coord else 0)

    # ---- start-up and health -----------------------------------------------------------------
    def start(self, make_coordinator, on_failure=None) -> threading.Thread:
        """Bring the workers up in the background; the server answers /health (503) meanwhile."""
        def run():
            try:
                coord = make_coordinator()
                if coord.tokenizer is None:
                    coord.close()
                    raise RuntimeError("the server needs a tokenizer: pass --target (with --role draft, the "
                                       "target's model for its tokenizer)")
                self.coord = coord
                self.served_name = self.served_name or public_model_name(coord.target_info.model)
                self.state = READY
                log.info("ready: serving %s", self.served_name)
            except BaseException as e:  # noqa: BLE001 (reported, and the server stops)
                self.state, self.failure = FAILED, f"{type(e).__name__}: {e}"
                log.error("start-up failed: %s", self.failure)
                if on_failure is not None:
                    on_failure(self.failure)
            finally:
                self._ready.set()

        thread = threading.Thread(target=run, name="dovetail-start", daemon=True)
        thread.start()
        return thread

    def health(self) -> tuple[int, dict]:
        """The status, with its details: the app shows those only with a key (they hold paths
        and a dead worker's last log lines), so they also go to the log, once each."""
        if self.state != READY:
            return 503, {"status": self.state, **({"error": self.failure} if self.failure else {})}
        coord = self.coord
        try:
            coord.target.check_alive()
        except WorkerError as e:
            self._log_health(str(e))
            return 503, {"status": "target worker down", "error": str(e)}
        # A dead draft still serves every request, losslessly, target-only: degraded, not down.
        draft = coord.draft_health if coord.draft_info is not None else "none"
        self._log_health(f"the draft is {draft}: serving target-only" if draft not in ("ok", "none") else "")
        return 200, {"status": "ok" if draft in ("ok", "none") else "degraded", "draft": draft}

    def _log_health(self, problem: str) -> None:
        """Log a health problem when it changes (a load balancer probes every few seconds)."""
        if problem != self._last_problem:
            if problem:
                log.warning("health: %s", problem)
            self._last_problem = problem

    def require_ready(self):
        if self.state != READY:
            raise APIError(503, f"the server is {self.state}" + (f": {self.failure}" if self.failure else ""),
                           "service_unavailable", code="not_ready", headers={"Retry-After": str(RETRY_AFTER_S)})
        return self.coord

    def close(self) -> None:
        if self.coord is not None:
            self.coord.close()

    # ---- requests ----------------------------------------------------------------------------
    def token_text(self):
        """Each token's text and bytes, for logprobs (made once)."""
        if self._token_text is None:
            from dovetail.server.logprobs import TokenText
            self._token_text = TokenText(self.require_ready().tokenizer)
        return self._token_text

    def check_model(self, name: str) -> None:
        if name != self.served_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{self.served_name}'",
                           "invalid_request_error", "model", "model_not_found")

    def check_size(self, s: Sampling) -> None:
        """Refuse, before any model work, prompt text too long to fit the context in any
        tokenization (the body limit alone would still let through seconds of tokenizing)."""
        limit = self.require_ready().target_info.max_context
        cap = limit * CHARS_PER_TOKEN if limit else MAX_PROMPT_CHARS
        param = "messages" if is_chat(s.prompt) else "prompt"
        n = prompt_chars(s.prompt)
        if s.tools is not None and s.tools.template:  # printed into the prompt by the template
            n += len(json.dumps(s.tools.template, ensure_ascii=False))
        if n > cap:
            raise APIError(400, f"the {param} has {n} characters, more than {cap} can fit"
                                + (f" in this model's context of {limit} tokens ({CHARS_PER_TOKEN} characters "
                                   "a token at most)" if limit else " (the server's limit)"),
                           param=param, code="context_length_exceeded")

    async def prepare(self, s: Sampling) -> tuple[list[int], int]:
        """prepare_ids() in a thread: a chat template and a tokenizer on a long prompt take
        long enough to stall every stream if they ran on the event loop (a short one runs here)."""
        if s.tools is None and prompt_size(s.prompt) <= INLINE_PREPARE_CHARS:
            return self.prepare_ids(s)
        return await asyncio.to_thread(self.prepare_ids, s)

    def prepare_ids(self, s: Sampling) -> tuple[list[int], int]:
        """Prompt ids and max_tokens, refused with the numbers when they do not fit the context."""
        coord = self.require_ready()
        self.resolve_tools(s)
        try:
            ids = encode(coord, s)
        except (ValueError, TypeError) as e:
            raise bad_request(str(e), "prompt") from None
        except template_errors() as e:  # the model's template refuses these messages (Gemma: no system role)
            raise bad_request(f"the model's chat template refused the messages: {e}", "messages",
                              "chat_template_error") from None
        limit = coord.target_info.max_context
        max_tokens = s.max_tokens if s.max_tokens is not None else (limit - len(ids) if limit else None)
        if limit and max_tokens < 1:
            raise APIError(400, f"this model's maximum context length is {limit} tokens and the prompt has "
                                f"{len(ids)}: no room for a completion", param="messages",
                           code="context_length_exceeded")
        if limit and len(ids) + max_tokens > limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens; the request needs "
                                f"{len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} for the "
                                "completion): shorten the prompt or lower max_tokens",
                           param="max_tokens", code="context_length_exceeded")
        if max_tokens is None:
            raise bad_request("max_tokens is required: the target does not report its context length", "max_tokens")
        return ids, max_tokens

    def resolve_tools(self, s: Sampling) -> None:
        """Complete a chat request's tools from the model's chat template: refused (400) when
        the template does not render tools or writes calls in a format not parsed here; the
        family found; for tool_choice "required" or a named function, the grammar that forces
        the call, in ``s.processing``."""
        use = s.tools
        if use is None or use.template is None:  # no tools, or tool_choice "none": nothing shown
            return
        tokenizer = self.require_ready().tokenizer
        template = getattr(tokenizer, "chat_template", None)
        if not template_supports_tools(template):
            raise bad_request("this model's chat template does not render tools, so the model would never see "
                              "them: send the request without tools (or with tool_choice 'none')", "tools")
        family = detect_family(template)
        if family is None:
            raise bad_request("this model's chat template renders tools, but its tool-call format is not one this "
                              f"server parses ({', '.join(FAMILIES)}): its calls could not come back as tool_calls",
                              "tools")
        use.family = family
        if not use.forced:
            return
        mark = mark_token_id(tokenizer, MISTRAL_MARK) if family == MISTRAL else None
        grammar = forced_call_grammar(family, use.tools, use.choice, parallel=use.parallel, mark_token_id=mark)
        from dovetail.spec.grammar import grammar_text
        try:
            grammar_text(*grammar)  # a tool's parameters schema that the grammar engine refuses
        except ValueError as e:
            raise bad_request(f"the tools' parameters cannot be enforced for a forced call: {e}", "tools") from None
        s.processing["grammar"] = grammar

    def submit(self, s: Sampling, ids: list[int], max_tokens: int, scope: str = "") -> "Run":
        """Start the request; refusals at admission (a full queue: 503) raise here, before any
        byte of the response. ``scope``: the API key's (Coordinator.submit): the suffix draft's
        cache is per key."""
        coord = self.require_ready()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        on_event = self._observer(loop, events)
        try:
            # Without max_tokens a request may run to the end of the context; reserving all of it
            # in a llama.cpp target's shared cells would run such requests one at a time.
            reserve = None if s.max_tokens is not None else min(max_tokens, DEFAULT_RESERVE_TOKENS)
            handle = coord.submit(ids, max_tokens, s.temperature, s.top_p, s.seed, on_event=on_event,
                                  stop=s.stop or None, scope=scope, reserve=reserve, **s.processing)
        except CoordinatorBusy as e:
            raise busy(e) from None
        except ContextTooLong as e:  # more KV cells than the target has: waiting would never help
            raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
        except (ValueError, TypeError) as e:
            raise bad_request(str(e)) from None
        return Run(handle, events, loop.time() + self.request_timeout_s, self.request_timeout_s)

    def _observer(self, loop: asyncio.AbstractEventLoop, events: asyncio.Queue):
        """The on_event callback (a coordinator thread): metrics, then the event to the loop."""
        m, t_arrival = self.metrics, time.perf_counter()
        last = [None]  # when the previous chunk came

        def on_event(kind, payload):
            now = time.perf_counter()
            if kind == "chunk" and payload.token_ids:
                n = len(payload.token_ids)
                m.generation_tokens.inc(n)
                if last[0] is None:
                    m.ttft.observe(now - t_arrival)
                else:  # a round's tokens arrive together: each counts its share of the gap
                    for _ in range(n):
                        m.itl.observe((now - last[0]) / n)
                last[0] = now
            elif kind in ("done", "cancelled", "error"):
                m.e2e.observe(now - t_arrival)
                if kind == "error":
                    m.finished.labels("error").inc()
                else:
                    m.observe_finished(payload.stats, "abort" if kind == "cancelled"
                                       else payload.stats.finish_reason or "stop")
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, payload))
            except RuntimeError:  # the loop is gone (server shutting down): nobody is listening
                pass

        return on_event


class Run:
    """A submitted request seen from the event loop: its events, its deadline, cancel()."""

    def __init__(self, handle, events: asyncio.Queue, deadline: float, timeout_s: float):
        self.handle, self._events, self._deadline, self._timeout_s = handle, events, deadline, timeout_s

    async def events(self, idle_s: float | None = None) -> AsyncIterator[Chunk | Finished | None]:
        """Yield the request's chunks, then one Finished; raise APIError for its failure.
        With ``idle_s``, also yield None after each idle_s without an event: the caller's
        moment to look at its client or keep the connection alive."""
        loop = asyncio.get_running_loop()
        while True:
            left = self._deadline - loop.time()
            if left <= 0:
                raise APIError(504, f"the request ran past --request-timeout ({self._timeout_s:g} s)",
                               "timeout", code="request_timeout")
            try:
                kind, payload = await asyncio.wait_for(self._events.get(), min(left, idle_s or left))
            except asyncio.TimeoutError:
                if idle_s is not None and loop.time() < self._deadline:
                    yield None
                continue
            if kind == "chunk":
                yield payload
            elif kind == "error":
                raise failure(payload)
            else:
                yield Finished(payload, payload.stats.finish_reason or "stop")
                return

    def cancel(self) -> None:
        """The client left or the time ran out: a waiting request leaves the queue, a running
        one stops after this round. Nothing once the request has ended."""
        if self.handle.terminal is None:
            self.handle.cancel()


def encode(coord, s: Sampling) -> list[int]:
    """The prompt's ids; a chat request with tools goes through the template with them."""
    if s.tools is None or s.tools.template is None:
        return coord.encode_prompt(s.prompt)
    return coord.text.encode_prompt(s.prompt, tools=s.tools.template)


def mark_token_id(tokenizer, token: str) -> int | None:
    """The id of ``token`` when the tokenizer has it as one token, else None."""
    try:
        tid = tokenizer.convert_tokens_to_ids(token)
    except (KeyError, ValueError, TypeError):
        return None
    return None if tid is None or tid == getattr(tokenizer, "unk_token_id", None) else int(tid)


def is_chat(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)


def prompt_chars(prompt) -> int:
    """The characters of a prompt's text (chat: all messages'); token ids count one each."""
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(m.get("content") or "") if isinstance(m, dict) else 1 for m in prompt or [])


def prompt_size(prompt) -> int:
    """At least the characters a prompt's text has (a message's content parts as their repr)."""
    if isinstance(prompt, str):
        return len(prompt)

    def size(m) -> int:
        if not isinstance(m, dict):
            return 1  # a token id
        return len(m["content"]) if isinstance(m.get("content"), str) else len(repr(m))
    return sum(size(m) for m in prompt or [])


def template_errors() -> tuple[type[BaseException], ...]:
    """What a chat template raises for messages it refuses (raise_exception() is Jinja's TemplateError)."""
    try:
        from jinja2 import TemplateError
    except ImportError:
        return ()
    return (TemplateError,)


def public_model_name(name: str) -> str:
    """A model name that shows no local path: a file or folder here, or an absolute path
    (also a remote target's), by its last component; a Hub id ("org/repo") as it is."""
    expanded = os.path.expanduser(name)
    if os.path.isabs(expanded) or os.path.exists(expanded):
        return os.path.basename(os.path.normpath(expanded)) or name
    return name


def busy(e: Exception) -> APIError:
    return APIError(503, f"the server is at capacity: {e}", "server_busy", code="queue_full",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def failure(e: BaseException) -> APIError:
    """A request's error event as the client sees it: a full queue is 503, the rest faults."""
    if isinstance(e, CoordinatorBusy):
        return busy(e)
    if isinstance(e, (ValueError, TypeError)):
        return bad_request(str(e))
    log.error("request failed: %s", e)
    return APIError(500, f"{type(e).__name__}: {e}", "server_error", code="internal_error")
