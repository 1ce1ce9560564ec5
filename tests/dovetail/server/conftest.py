"""A real `dovetail-launch serve` in a subprocess on tiny float64 models with a character-level
tokenizer and a chat template; tests drive it with the official openai client and raw HTTP."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import make_tiny_model, make_tiny_tokenizer

API_KEY = "test-key-0123456789"
START_S = 180.0  # the workers load and the target calibrates on a busy 2-core box
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.fixture(scope="session")
def chat_models(tmp_path_factory):
    """A tiny target and a draft near it, both with the same tokenizer and chat template."""
    from transformers import AutoTokenizer
    root = tmp_path_factory.mktemp("serve-models")
    target = make_tiny_model(root / "target", seed=0, attention_gain=4.0)
    draft = make_tiny_model(root / "draft", seed=1, noise_from=target, noise=0.002)
    for path in (target, draft):
        make_tiny_tokenizer(path)
        tok = AutoTokenizer.from_pretrained(str(path))
        tok.chat_template = CHAT_TEMPLATE
        tok.save_pretrained(str(path))
    return target, draft


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `dovetail-launch serve` process; ``request()`` speaks raw HTTP to it."""

    def __init__(self, args: list[str], log_path: Path, pids):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dovetail.cli", "serve", "--port", str(self.port), *map(str, args)],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        pids.track(self.proc.pid)
        self.pids = pids
        self.health_seen: list[tuple[int, dict]] = []  # /health answers while it started

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server exited {self.proc.returncode}:\n{self.tail()}"
            try:
                status, _, body = self.request("GET", "/health", key=None)
                self.health_seen.append((status, json.loads(body)))
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"not ready within {START_S} s:\n{self.tail()}")

    def request(self, method: str, path: str, body=None, key: str | None = API_KEY, raw: bytes | None = None,
                timeout: float = 60.0, headers: dict | None = None) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            h = {"Content-Type": "application/json", **(headers or {})}
            if key:
                h["Authorization"] = f"Bearer {key}"
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            conn.request(method, path, body=data, headers=h)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def worker_pids(self) -> list[int]:
        import psutil
        return [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]

    def worker(self, role: str):
        """The psutil.Process of this server's one ``role`` worker."""
        import psutil
        found = [p for p in psutil.Process(self.proc.pid).children(recursive=True)
                 if f"dovetail.workers.{role}" in " ".join(p.cmdline())]
        assert len(found) == 1, found
        return found[0]

    def tail(self, n: int = 4000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def serve_factory(tmp_path_factory, pids):
    started: list[Server] = []

    def start(*args) -> Server:
        server = Server(list(args), tmp_path_factory.mktemp("serve") / "server.log", pids)
        started.append(server)
        server.wait_ready()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
