"""The server's limits and failures: loading, a full queue, the time limit (also mid-stream),
CORS, binding off loopback, and a dead target. One tight server: one active request, one
admitted, two seconds each."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from dovetail.cli import main
from tests.dovetail.server.test_server import MESSAGES, metric, sse_events

pytestmark = pytest.mark.timeout(300)

TIMEOUT_S = 2.0
LONG = {"model": "target", "messages": MESSAGES, "temperature": 0, "max_tokens": 100_000}


@pytest.fixture(scope="module")
def tight(serve_factory, chat_models):
    return serve_factory("--target", chat_models[0], "--no-draft", "--dtype", "float64", "--max-active", "1",
                         "--max-pending", "1", "--request-timeout", str(TIMEOUT_S), "--cors-origin", "http://ui.example",
                         "--served-model-name", "target")


def wait_running(server, n: int) -> None:
    """Until ``n`` requests decode and none waits (a cancelled one leaves after its round)."""
    deadline = time.monotonic() + 30
    while True:
        text = server.request("GET", "/metrics")[2].decode()
        if (metric(text, "dovetail:num_requests_running"), metric(text, "dovetail:num_requests_waiting")) == (n, 0):
            return
        assert time.monotonic() < deadline, f"never {n} running and none waiting:\n{text}"
        time.sleep(0.05)


def test_health_is_503_while_loading_then_200(tight):
    first_status, first_body = tight.health_seen[0]
    assert first_status == 503 and first_body["status"] == "loading", tight.health_seen[:3]
    assert tight.health_seen[-1] == (200, {"status": "ok"})  # the details only with ?detail=1


def test_a_full_queue_is_503_and_the_time_limit_ends_a_stream_with_an_error_event(tight):
    out = {}
    streaming = threading.Thread(target=lambda: out.update(
        a=tight.request("POST", "/v1/chat/completions", {**LONG, "stream": True})))
    streaming.start()
    wait_running(tight, 1)
    for stream in (False, True):  # a stream refused at admission too: an HTTP status, not an event
        status, headers, body = tight.request("POST", "/v1/chat/completions", {**LONG, "stream": stream})
        assert status == 503 and int(headers["retry-after"]) >= 1, body
        assert json.loads(body)["error"]["code"] == "queue_full"
    streaming.join(60)
    status, _, body = out["a"]
    events = sse_events(body)
    assert status == 200 and events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "request_timeout" and "--request-timeout" in events[-2]["error"]["message"]
    assert not any(e["choices"][0]["finish_reason"] for e in events[1:-2]), "a finish before the error"
    assert len(events) > 10  # it streamed for a while before the limit


def test_the_time_limit_is_504_without_streaming_and_the_server_goes_on(tight):
    wait_running(tight, 0)  # the stream cut by the time limit above has left
    t0 = time.monotonic()
    status, _, body = tight.request("POST", "/v1/chat/completions", LONG)
    assert status == 504 and json.loads(body)["error"]["code"] == "request_timeout", body
    assert TIMEOUT_S <= time.monotonic() - t0 < TIMEOUT_S + 10
    wait_running(tight, 0)  # cancelled, not left running
    status, _, body = tight.request("POST", "/v1/chat/completions", {**LONG, "max_tokens": 3})
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 3


def test_cors_lets_in_the_configured_origin_only(tight):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    status, headers, _ = tight.request("OPTIONS", "/v1/chat/completions",
                                       headers={"Origin": "http://ui.example", **preflight})
    assert status == 200 and headers.get("access-control-allow-origin") == "http://ui.example"
    status, headers, _ = tight.request("OPTIONS", "/v1/chat/completions",
                                       headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in headers


def test_listening_off_loopback_needs_a_key(capsys):
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--api-key" in err and "--allow-unauthenticated" in err
    assert main(["serve", "--host", "0.0.0.0", "--api-key", "short"]) == 2
    assert "at least 8 characters" in capsys.readouterr().err


def test_a_dead_target_is_a_500_for_requests_and_a_503_for_health(tight):
    target = tight.worker("target")
    os.kill(target.pid, signal.SIGKILL)
    target.wait(10)
    status, _, body = tight.request("POST", "/v1/chat/completions", {**LONG, "max_tokens": 3})
    err = json.loads(body)["error"]
    assert status == 500 and err["type"] == "server_error" and "SIGKILL" in err["message"], body
    status, _, body = tight.request("GET", "/health")
    assert status == 503 and json.loads(body) == {"status": "target worker down"}  # no worker log lines
    status, _, body = tight.request("GET", "/health?detail=1")  # this server has no keys: open
    assert status == 503 and "SIGKILL" in json.loads(body)["error"]
    assert "health: target worker" in tight.tail(20_000)  # the details went to the log


def test_a_start_up_that_fails_ends_the_server_with_the_reason(tmp_path):
    import subprocess
    import sys

    from tests.dovetail.server.conftest import free_port
    done = subprocess.run([sys.executable, "-m", "dovetail.cli", "serve", "--port", str(free_port()),
                           "--target", str(tmp_path / "no-such-model"), "--no-draft"],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 1, done.stderr
    assert "no-such-model" in done.stderr.splitlines()[-1]
