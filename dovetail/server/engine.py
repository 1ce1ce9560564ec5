"""The coordinator behind the server, seen from asyncio.

Each HTTP request becomes one Coordinator.submit(): the coordinator's request thread calls
back with every chunk and the one terminal event, and the callback hands them to the event
loop (call_soon_threadsafe). The metrics are taken in that callback, so a request whose
client went away is still counted when it ends. Whoever stops listening (a disconnect, the
time limit) cancels the request: the coordinator stops after the round in flight and closes
it on both workers.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator

from dovetail.runtime.client import WorkerError
from dovetail.runtime.requests import CoordinatorBusy
from dovetail.runtime.results import Chunk, GenerationResult
from dovetail.server.errors import APIError, bad_request
from dovetail.server.metrics import Metrics
from dovetail.server.schema import Sampling

log = logging.getLogger("dovetail.server")

RETRY_AFTER_S = 1  # what a 503 for a full queue tells the client to wait
LOADING, READY, FAILED = "loading", "ready", "failed"


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
                self.served_name = self.served_name or coord.target_info.model
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
        if self.state != READY:
            return 503, {"status": self.state, **({"error": self.failure} if self.failure else {})}
        coord = self.coord
        try:
            coord.target.check_alive()
        except WorkerError as e:
            return 503, {"status": "target worker down", "error": str(e)}
        # A dead draft still serves every request, losslessly, target-only: degraded, not down.
        draft = coord.draft_health if coord.draft_info is not None else "none"
        return 200, {"status": "ok" if draft in ("ok", "none") else "degraded", "draft": draft}

    def require_ready(self):
        if self.state != READY:
            raise APIError(503, f"the server is {self.state}" + (f": {self.failure}" if self.failure else ""),
                           "service_unavailable", code="not_ready", headers={"Retry-After": str(RETRY_AFTER_S)})
        return self.coord

    def close(self) -> None:
        if self.coord is not None:
            self.coord.close()

    # ---- requests ----------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name != self.served_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{self.served_name}'",
                           "invalid_request_error", "model", "model_not_found")

    def prepare(self, s: Sampling) -> tuple[list[int], int]:
        """Prompt ids and max_tokens, refused with the numbers when they do not fit the context."""
        coord = self.require_ready()
        try:
            ids = coord.encode_prompt(s.prompt)
        except (ValueError, TypeError) as e:
            raise bad_request(str(e), "prompt") from None
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

    async def run(self, s: Sampling, scope: str = "") -> AsyncIterator[Chunk | Finished]:
        """Yield the request's chunks, then one Finished; raise APIError for its failure.
        ``scope``: the API key's (Coordinator.submit): the suffix draft's cache is per key."""
        coord = self.require_ready()
        ids, max_tokens = self.prepare(s)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        on_event = self._observer(loop, events)
        try:
            handle = coord.submit(ids, max_tokens, s.temperature, s.top_p, s.seed, on_event=on_event,
                                  stop=s.stop or None, scope=scope)
        except CoordinatorBusy as e:
            raise busy(e) from None
        except (ValueError, TypeError) as e:
            raise bad_request(str(e)) from None
        deadline = loop.time() + self.request_timeout_s
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(events.get(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    raise APIError(504, f"the request ran past --request-timeout ({self.request_timeout_s:g} s)",
                                   "timeout", code="request_timeout") from None
                if kind == "chunk":
                    yield payload
                elif kind == "error":
                    raise failure(payload)
                else:
                    yield Finished(payload, payload.stats.finish_reason or "stop")
                    return
        finally:
            if handle.terminal is None:
                handle.cancel()  # the client left or the time ran out: stop after this round

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
