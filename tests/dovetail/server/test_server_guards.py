"""The server against abuse and impatience: body and text limits, content types, Host and CORS
checks, /health's details, a chat template that refuses, streams that start at once and keep
alive, and clients that leave while queued. One server, one active request, a 1 MB body limit,
a target whose template refuses the system role (as Gemma-2's does), passed as a local path."""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from tests.dovetail.server.conftest import API_KEY, CHAT_TEMPLATE
from tests.dovetail.server.test_server import MESSAGES, metric

pytestmark = pytest.mark.timeout(300)

CONTEXT = 1 << 15  # the target's context: text past 8 characters a token of it is refused unread
BODY_MB = 1
KEEPALIVE_S = 0.3
# Gemma-2's refusal, in the tiny template's format.
REFUSING_TEMPLATE = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                     "{% endif %}" + CHAT_TEMPLATE)
CHAT = {"model": "target", "messages": MESSAGES, "temperature": 0, "max_tokens": 2}
HOLD = {"model": "target", "messages": MESSAGES, "temperature": 0, "max_tokens": CONTEXT - 100, "stream": True}


@pytest.fixture(scope="module")
def refusing_target(tmp_path_factory):
    from transformers import AutoTokenizer

    from tests.helpers import make_tiny_model, make_tiny_tokenizer
    path = make_tiny_model(tmp_path_factory.mktemp("guard-models") / "target", seed=0, attention_gain=4.0,
                           max_positions=CONTEXT)
    make_tiny_tokenizer(path)
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.chat_template = REFUSING_TEMPLATE
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def server(serve_factory, refusing_target):
    # no --served-model-name: the local path is served by its file name
    return serve_factory("--target", refusing_target, "--no-draft", "--dtype", "float64", "--max-active", "1",
                         "--max-pending", "4", "--api-key", API_KEY, "--max-body-mb", str(BODY_MB),
                         "--allowed-host", "api.example", "--sse-keepalive", str(KEEPALIVE_S),
                         "--cors-origin", "http://ui.example")


def scrape(server) -> str:
    return server.request("GET", "/metrics")[2].decode()


def wait_metrics(server, running: int, waiting: int, within_s: float = 30) -> float:
    """Until ``running`` requests decode and ``waiting`` wait; the seconds that took."""
    t0 = time.monotonic()
    while True:
        text = scrape(server)
        got = (metric(text, "dovetail:num_requests_running"), metric(text, "dovetail:num_requests_waiting"))
        if got == (running, waiting):
            return time.monotonic() - t0
        assert time.monotonic() - t0 < within_s, f"never {running} running and {waiting} waiting: {got}"
        time.sleep(0.02)


def aborted(server) -> float:
    return metric(scrape(server), 'dovetail:request_success_total{finished_reason="abort"}')


def still_serves(server) -> None:
    status, _, body = server.request("POST", "/v1/chat/completions", CHAT)
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 2, body


# ---- bodies ------------------------------------------------------------------------------------
def raw_post(server, headers: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                  f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n{headers}\r\n").encode())
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict]:
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    return resp.status, json.loads(resp.read())


def test_a_50_mb_body_is_413_from_its_content_length_before_it_is_read(server):
    sock = raw_post(server, f"Content-Length: {50 << 20}\r\n")
    try:
        t0 = time.monotonic()
        sock.sendall(b"{" + b" " * (64 << 10))  # a first piece; the rest never comes
        sock.settimeout(1.0)  # within a second, with 50 MB still unsent
        status, body = read_response(sock)
        assert status == 413 and body["error"]["code"] == "request_too_large", body
        assert "--max-body-mb" in body["error"]["message"] and time.monotonic() - t0 < 1.0
    finally:
        sock.close()
    still_serves(server)


def test_a_chunked_body_is_read_no_further_than_the_limit(server):
    sock = raw_post(server, "Transfer-Encoding: chunked\r\n")
    sent, answered = [0], threading.Event()

    def send():
        piece = b"10000\r\n" + b" " * 0x10000 + b"\r\n"  # 64 KB chunks, up to 50 MB
        try:
            while sent[0] < (50 << 20) and not answered.is_set():
                sock.sendall(piece)
                sent[0] += 0x10000
        except OSError:
            pass

    sender = threading.Thread(target=send, daemon=True)
    try:
        t0 = time.monotonic()
        sender.start()
        status, body = read_response(sock)
        answered.set()
        assert status == 413 and body["error"]["code"] == "request_too_large", body
        # the limit plus what the sockets' buffers took in meanwhile, not the 50 MB
        assert sent[0] < (20 << 20) and time.monotonic() - t0 < 5, (sent[0], time.monotonic() - t0)
    finally:
        answered.set()
        sock.close()
        sender.join(10)
    still_serves(server)


# ---- fields ------------------------------------------------------------------------------------
TOO_LONG = CONTEXT * 8 + 1
LIMITS = [
    # (path, body, param, words in the message)
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "a" * TOO_LONG}]}, "messages",
     f"{TOO_LONG} characters"),
    ("/v1/completions", {"model": "target", "prompt": "a" * TOO_LONG, "max_tokens": 2}, "prompt",
     f"{TOO_LONG} characters"),
    ("/v1/chat/completions", {**CHAT, "messages": MESSAGES * 1025}, "messages", "at most 1024"),
    ("/v1/chat/completions", {**CHAT, "stop": ["x" * 257]}, "stop", "at most 256 characters"),
    ("/v1/chat/completions", {**CHAT, "stop": [str(i) for i in range(17)]}, "stop", "at most 16 stop strings"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "system", "content": "be brief"}, *MESSAGES]},
     "messages", "System role not supported"),
]


@pytest.mark.parametrize("path, body, param, words", LIMITS, ids=["chat-text", "prompt-text", "messages",
                                                                  "stop-length", "stop-count", "template"])
def test_oversize_text_and_a_refusing_template_are_400_at_once(server, path, body, param, words):
    t0 = time.monotonic()
    status, _, payload = server.request("POST", path, body)
    err = json.loads(payload)["error"]
    assert status == 400 and err["param"] == param and words in err["message"], payload
    assert time.monotonic() - t0 < 5


def test_json_routes_take_json_only(server):
    for content_type in ("text/plain", "application/x-www-form-urlencoded", ""):
        status, _, payload = server.request("POST", "/v1/chat/completions", CHAT,
                                            headers={"Content-Type": content_type})
        assert status == 415 and json.loads(payload)["error"]["code"] == "unsupported_media_type", payload
    status, _, _ = server.request("POST", "/v1/chat/completions", CHAT,
                                  headers={"Content-Type": "application/json; charset=utf-8"})
    assert status == 200


# ---- hosts, CORS, health, the model's name -----------------------------------------------------
def test_a_foreign_host_is_421_and_loopback_and_allowed_names_are_answered(server):
    for host in ("evil.example", f"evil.example:{server.port}", "localhost.evil.example"):
        status, _, payload = server.request("GET", "/v1/models", headers={"Host": host})
        assert status == 421 and json.loads(payload)["error"]["code"] == "host_not_allowed", (host, payload)
        assert server.request("GET", "/health", headers={"Host": host})[0] == 421
    status, _, _ = server.request("OPTIONS", "/v1/chat/completions", headers={
        "Host": "evil.example", "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert status == 421  # a rebinding page's preflight too
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", f"[::1]:{server.port}",
                 "api.example", "API.example:443"):
        assert server.request("GET", "/v1/models", headers={"Host": host})[0] == 200, host


def test_cors_preflight_allows_the_headers_the_openai_sdks_send(server):
    sdk_headers = ("authorization, content-type, x-stainless-os, x-stainless-lang, x-stainless-package-version, "
                   "x-stainless-retry-count, openai-organization, openai-project")
    status, headers, _ = server.request("OPTIONS", "/v1/chat/completions", headers={
        "Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": sdk_headers})
    assert status == 200 and headers["access-control-allow-origin"] == "http://ui.example"
    allowed = {h.strip() for h in headers["access-control-allow-headers"].lower().split(",")}
    assert {h.strip() for h in sdk_headers.split(",")} <= allowed


def test_health_shows_the_status_only_and_the_details_behind_the_key(server):
    status, _, body = server.request("GET", "/health", key=None)
    assert status == 200 and json.loads(body) == {"status": "ok"}
    assert server.request("GET", "/health?detail=1", key=None)[0] == 401
    status, _, body = server.request("GET", "/health?detail=1")
    assert status == 200 and json.loads(body) == {"status": "ok", "draft": "none"}


def test_a_local_target_is_served_by_its_file_name_not_its_path(server, refusing_target):
    status, _, body = server.request("GET", "/v1/models")
    card = json.loads(body)["data"][0]
    assert status == 200 and card["id"] == "target" and card["meta"]["target"]["model"] == "target", card
    assert str(refusing_target.parent) not in body.decode()


# ---- streams and disconnects -------------------------------------------------------------------
class Client:
    """One raw HTTP request whose response lines a thread collects; close() hangs up."""

    def __init__(self, server, body: dict):
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        self.conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(),
                          {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
        self.status: int | None = None
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            resp = self.conn.getresponse()
            self.status = resp.status
            for line in resp:
                self.lines.append(line.decode().rstrip("\n"))
        except Exception:  # noqa: BLE001 (hung up: close() pulls the socket from under the reader)
            pass

    def wait(self, what, within_s: float, why: str) -> float:
        t0 = time.monotonic()
        while not what():
            assert time.monotonic() - t0 < within_s, f"{why} not within {within_s} s: {self.status} {self.lines[:5]}"
            time.sleep(0.01)
        return time.monotonic() - t0

    def close(self) -> None:
        try:
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        except (OSError, AttributeError):
            pass
        self.conn.close()
        self.thread.join(10)


def test_a_queued_stream_starts_at_once_keeps_alive_and_leaves_the_queue_when_its_client_does(server):
    holder = Client(server, HOLD)  # takes the one slot for minutes
    try:
        holder.wait(lambda: any(line.startswith("data: ") for line in holder.lines), 60, "the holder's stream")
        wait_metrics(server, 1, 0)
        before = aborted(server)
        queued = Client(server, {**HOLD, "max_tokens": 4})
        # headers and the role chunk at once, then keep-alive comments while it waits for the slot
        queued.wait(lambda: queued.status == 200 and queued.lines, 5, "the queued stream's headers")
        queued.wait(lambda: queued.lines.count(": keep-alive") >= 2, 10 * KEEPALIVE_S + 5, "two keep-alives")
        data = [line for line in queued.lines if line.startswith("data: ")]
        assert len(data) == 1, data  # the role chunk, and no token yet
        assert json.loads(data[0][len("data: "):])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        wait_metrics(server, 1, 1)
        queued.close()
        left_s = wait_metrics(server, 1, 0, within_s=10)  # gone from the queue; the holder still decodes
        assert left_s < 2, left_s
        assert aborted(server) == before + 1
    finally:
        holder.close()
    wait_metrics(server, 0, 0)


def test_a_queued_request_without_streaming_leaves_the_queue_when_its_client_does(server):
    holder = Client(server, HOLD)
    try:
        holder.wait(lambda: any(line.startswith("data: ") for line in holder.lines), 60, "the holder's stream")
        wait_metrics(server, 1, 0)
        before = aborted(server)
        queued = Client(server, {**CHAT, "max_tokens": 4})
        wait_metrics(server, 1, 1)
        queued.close()
        assert wait_metrics(server, 1, 0, within_s=10) < 2
        assert aborted(server) == before + 1
    finally:
        holder.close()
    wait_metrics(server, 0, 0)
    still_serves(server)


def test_a_stream_refused_at_admission_is_still_an_http_error(server):
    """Refusals at submit (a full queue) come before the headers: 503, not an event in a 200."""
    clients = [Client(server, HOLD)]
    try:
        clients[0].wait(lambda: clients[0].status == 200, 60, "the holder's stream")
        clients += [Client(server, HOLD) for _ in range(3)]  # the 4 of --max-pending
        wait_metrics(server, 1, 3)
        status, headers, body = server.request("POST", "/v1/chat/completions", HOLD)
        assert status == 503 and int(headers["retry-after"]) >= 1 and headers["content-type"] == "application/json"
        assert json.loads(body)["error"]["code"] == "queue_full"
    finally:
        for client in clients:
            client.close()
    wait_metrics(server, 0, 0)
