"""The server's guards without a server: the slot wait a cancel ends, the Host allowlist, the
public model name, templating off the event loop and a template's refusal as 400."""
from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from dovetail.runtime.requests import SLOT_POLL_S, Admission, CoordinatorBusy
from dovetail.server.app import HostAllowlist, host_name
from dovetail.server.engine import INLINE_PREPARE_CHARS, READY, Engine, public_model_name
from dovetail.server.errors import APIError
from dovetail.server.metrics import Metrics
from dovetail.server.schema import Sampling

pytestmark = pytest.mark.timeout(60)


# ---- the slot wait -----------------------------------------------------------------------------
def wait_in_queue(admission: Admission, cancel: threading.Event, out: dict) -> threading.Thread:
    """A request thread as the coordinator runs one: registered, then waiting for a slot."""
    def run():
        with admission.cancellable(cancel), admission.slot(cancel) as held:
            out["held"], out["left_at"] = held, time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_request_cancelled_while_it_waits_for_a_slot_leaves_at_once():
    admission = Admission(max_active=1, max_pending=4, queue_timeout_s=60)
    with admission.slot():  # the one slot is taken for the whole test
        cancel, out = threading.Event(), {}
        thread = wait_in_queue(admission, cancel, out)
        time.sleep(0.2)
        assert not out, "it got past a taken slot"
        t0 = time.monotonic()
        cancel.set()
        thread.join(5)
        assert out["held"] is False and out["left_at"] - t0 < 5 * SLOT_POLL_S + 0.2
        assert admission.active == 1  # the waiter never counted as decoding


def test_close_ends_the_slot_wait_and_a_free_slot_is_still_taken():
    admission = Admission(max_active=1, max_pending=4, queue_timeout_s=60)
    out: dict = {}
    with admission.slot() as held:
        assert held is True
        admission.admit()
        thread = wait_in_queue(admission, threading.Event(), out)
        time.sleep(0.1)
        closing = threading.Thread(target=admission.cancel_all, args=(5,), daemon=True)
        closing.start()
        thread.join(5)
        admission.leave()
        closing.join(5)
    assert out["held"] is False and admission.active == 0


def test_the_slot_wait_still_ends_at_queue_timeout():
    admission = Admission(max_active=1, max_pending=4, queue_timeout_s=0.3)
    with admission.slot():
        t0 = time.monotonic()
        with pytest.raises(CoordinatorBusy, match="no free slot within 0.3 s"):
            with admission.slot(threading.Event()):
                pass
        assert 0.25 < time.monotonic() - t0 < 2


# ---- the Host allowlist ------------------------------------------------------------------------
@pytest.mark.parametrize("header, name", [("localhost:8000", "localhost"), ("[::1]:8000", "::1"), ("::1", "::1"),
                                          ("Example.COM.", "example.com"), ("10.0.0.5:80", "10.0.0.5")])
def test_host_names_lose_their_port_brackets_and_case(header, name):
    assert host_name(header) == name


def test_the_host_allowlist_answers_loopback_addresses_and_named_hosts_only():
    guard = HostAllowlist(app=None, allowed=["0.0.0.0", "api.example"])
    for host in ("localhost", "LOCALHOST:8000", "127.0.0.1:1", "[::1]:8000", "192.168.1.9:8000",
                 "[fe80::1]", "api.example:443", None):
        assert guard.allows(host), host
    for host in ("evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io"):
        assert not guard.allows(host), host
    assert HostAllowlist(app=None, allowed=["*"]).allows("anything.example")


# ---- the model name ----------------------------------------------------------------------------
def test_a_local_path_is_served_by_its_last_component(tmp_path):
    model = tmp_path / "models" / "coder-Q4_K_M.gguf"
    model.parent.mkdir()
    model.write_bytes(b"")
    assert public_model_name(str(model)) == "coder-Q4_K_M.gguf"
    assert public_model_name(str(tmp_path / "a-folder") + "/") == "a-folder"
    assert public_model_name("/on/the/remote/host/model") == "model"  # absolute, even if not here
    assert public_model_name("Qwen/Qwen2.5-Coder-1.5B-Instruct") == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    assert public_model_name("qwen2.5-coder-1.5b-instruct") == "qwen2.5-coder-1.5b-instruct"


# ---- templating and tokenizing -----------------------------------------------------------------
def engine_with(encode_prompt, max_context: int = 4096) -> Engine:
    engine = Engine(Metrics(), request_timeout_s=10)
    engine.coord = SimpleNamespace(encode_prompt=encode_prompt, target_info=SimpleNamespace(max_context=max_context))
    engine.state = READY
    return engine


def chat(text: str, role: str = "user") -> Sampling:
    return Sampling([{"role": role, "content": text}], 8, 1.0, 1.0, None, [], False, False)


def test_templating_a_long_prompt_runs_off_the_event_loop():
    def slow_encode(prompt):
        time.sleep(0.5)  # a long prompt through a chat template and a tokenizer
        return [1, 2, 3]

    engine = engine_with(slow_encode)

    async def main():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.02)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        ids, max_tokens = await engine.prepare(chat("x" * (INLINE_PREPARE_CHARS + 1)))
        ticker.cancel()
        return ids, max_tokens, ticks

    ids, max_tokens, ticks = asyncio.run(main())
    assert (ids, max_tokens) == ([1, 2, 3], 8)
    assert ticks >= 10, f"the event loop ran {ticks} times in 0.5 s of templating"


def test_a_short_prompt_is_templated_on_the_event_loop_without_a_thread_hop():
    threads = []
    engine = engine_with(lambda prompt: threads.append(threading.current_thread()) or [1, 2])
    assert asyncio.run(engine.prepare(chat("x" * INLINE_PREPARE_CHARS))) == ([1, 2], 8)
    assert asyncio.run(engine.prepare(chat([{"type": "text", "text": "x" * INLINE_PREPARE_CHARS}]))) == ([1, 2], 8)
    assert threads[0] is threading.main_thread() and threads[1] is not threading.main_thread()


def test_a_template_that_refuses_the_messages_is_a_400():
    from jinja2.exceptions import TemplateError

    def gemma_like(prompt):
        if prompt[0]["role"] == "system":
            raise TemplateError("System role not supported")
        return [1]

    with pytest.raises(APIError) as e:
        asyncio.run(engine_with(gemma_like).prepare(chat("be brief", role="system")))
    assert e.value.status == 400 and e.value.code == "chat_template_error" and e.value.param == "messages"
    assert "System role not supported" in e.value.message


def test_text_that_cannot_fit_the_context_is_refused_before_the_template():
    calls = []
    engine = engine_with(lambda prompt: calls.append(prompt) or [1], max_context=100)
    engine.check_size(chat("x" * 800))  # 8 characters a token: still possible
    with pytest.raises(APIError) as e:
        engine.check_size(chat("x" * 801))
    assert e.value.status == 400 and e.value.code == "context_length_exceeded" and e.value.param == "messages"
    assert "801 characters" in e.value.message and not calls
