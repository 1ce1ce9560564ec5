"""CurveZMQ on a real worker ROUTER: only allowlisted clients that know the worker's key get in.

serve() runs in a thread of this process on tcp://127.0.0.1 with CURVE keys and its ZAP
authenticator; the clients live on their own context, as another machine's would. A
client "delivers nothing" when neither a Heartbeat (answered by serve itself) nor a Close
(answered by the handler, which records it) gets a reply within SILENCE_S, and the
handler saw nothing. The control runs the same worker with the authenticator stubbed out
and shows that an unknown key then does get through: the refusal test would notice.
"""
from __future__ import annotations

import itertools
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest

zmq = pytest.importorskip("zmq")

import dovetail.workers.serve as serve_mod  # noqa: E402
from dovetail.cli import main  # noqa: E402
from dovetail.runtime.client import WorkerClient, WorkerTimeout  # noqa: E402
from dovetail.protocol import Close, Closed, Handshake, Heartbeat, Shutdown  # noqa: E402
from dovetail.system.security import (  # noqa: E402
    KEYS_COMMAND, ClientKeys, ServerKeys, check_bind, load_secret, server_keys, write_keys,
)
from dovetail.workers.serve import serve  # noqa: E402

pytestmark = pytest.mark.timeout(30)

if not zmq.has("curve"):
    pytest.skip("libzmq without CURVE", allow_module_level=True)

SILENCE_S = 1.0     # how long a refused client waits to be sure nothing came back
REPLY_S = 15.0      # how long an allowed client may wait for its replies (ms idle; a busy box is slower)
JOIN_S = 10.0       # how long the worker thread may take to stop after Shutdown
VOCAB = 64
_req = itertools.count(1)


class Recorder:
    """The lightest handler serve() accepts; it records every message it is handed."""
    role = "test"
    vocab_size = VOCAB

    def __init__(self):
        self.seen: list = []

    def handshake(self):
        self.seen.append("handshake")
        return Handshake(role="target", vocab_size=VOCAB, tokenizer_hash="", hidden_size=0, dtype="")

    def handle(self, msg):
        self.seen.append(msg)
        return Closed(msg.req_id) if isinstance(msg, Close) else None


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Our worker's keys and allowed client, plus a stranger's pair from another key set."""
    root = tmp_path_factory.mktemp("curve")
    ours = write_keys(root / "ours")
    theirs = write_keys(root / "theirs", ["stranger"])
    me = ours["coordinator"]
    return {
        "server": ServerKeys(str(ours["worker"]["secret"]), str(ours["worker"]["allow"])),
        "allowed": ClientKeys(str(me["secret"]), str(me["server_public"])),
        "unknown": ClientKeys(str(theirs["stranger"]["secret"]), str(me["server_public"])),
        "wrong_server": ClientKeys(str(me["secret"]), str(theirs["stranger"]["server_public"])),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def client(address: str, keys: ClientKeys | None):
    ctx = zmq.Context()
    c = WorkerClient(ctx, "test", address, None, keys=keys)
    try:
        yield c
    finally:
        c.discard()  # not c.close(): that would send the worker a Shutdown
        ctx.term()


def replies(c: WorkerClient, wait_s: float) -> list:
    """Send a Heartbeat and a Close; return what comes back within ``wait_s``."""
    req = next(_req)
    c.send(Heartbeat(seq=1, time=0.0))
    c.send(Close(req))
    got, deadline = [], time.monotonic() + wait_s
    for box in (-1, req):  # the Heartbeat's reply is about no request; Closed is about req
        try:
            got.append(c.recv(lambda m: True, max(deadline - time.monotonic(), 0.001), "test", box))
        except WorkerTimeout:
            pass
    return got


@contextmanager
def worker(keys: dict):
    """serve() in a thread on a free loopback port, stopped with a Shutdown from an allowed client."""
    address = f"tcp://127.0.0.1:{free_port()}"
    handler, failure = Recorder(), []

    def run():
        try:
            serve(address, handler, keys=keys["server"])
        except BaseException as e:  # surfaced in the test, not lost in the thread
            failure.append(e)

    thread = threading.Thread(target=run, name="curve-worker", daemon=True)
    thread.start()
    try:
        with client(address, keys["allowed"]) as c:  # waits until the worker is up
            got = replies(c, REPLY_S)
        assert not failure, failure
        assert [type(m) for m in got] == [Heartbeat, Closed], got
        handler.seen.clear()
        yield address, handler
    finally:
        with client(address, keys["allowed"]) as c:
            c.send(Shutdown())
            thread.join(JOIN_S)
        assert not thread.is_alive(), "the worker did not stop after Shutdown"
        assert not failure, failure


def assert_delivers_nothing(address: str, handler: Recorder, keys: ClientKeys | None) -> None:
    with client(address, keys) as c:
        got = replies(c, SILENCE_S)
    assert got == [], got
    assert handler.seen == [], handler.seen


# ---- a worker with CURVE keys and its ZAP allowlist -----------------------------------------
def test_allowlisted_client_with_the_right_server_key_is_answered(keys):
    with worker(keys) as (address, handler):
        with client(address, keys["allowed"]) as c:
            got = replies(c, REPLY_S)
        assert [type(m) for m in got] == [Heartbeat, Closed], got
        assert [type(m) for m in handler.seen] == [Close]


def test_plain_client_delivers_nothing(keys):
    with worker(keys) as (address, handler):
        assert_delivers_nothing(address, handler, None)


def test_client_with_an_unknown_key_delivers_nothing(keys):
    with worker(keys) as (address, handler):
        assert_delivers_nothing(address, handler, keys["unknown"])


def test_client_with_the_wrong_server_key_delivers_nothing(keys):
    with worker(keys) as (address, handler):
        assert_delivers_nothing(address, handler, keys["wrong_server"])


def test_control_without_the_authenticator_an_unknown_key_gets_in(keys, monkeypatch):
    """CURVE alone lets any key in: this is what the unknown-key test guards against."""
    monkeypatch.setattr(serve_mod, "start_authenticator", lambda ctx, keys: None)
    with worker(keys) as (address, handler):
        with client(address, keys["unknown"]) as c:
            got = replies(c, REPLY_S)
        assert [type(m) for m in got] == [Heartbeat, Closed], got
        assert [type(m) for m in handler.seen] == [Close]


@pytest.mark.timeout(90)
def test_worker_process_serves_curve_with_the_flags(keys, tmp_path):
    """The flags reach serve() in a real worker process (replay: no model to load)."""
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"version": 1, "entries": []}))
    address = f"tcp://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dovetail.workers.replay", "--bind", address, "--script", str(script),
         "--vocab-size", str(VOCAB), "--tokenizer-hash", "h", "--log-level", "warning",
         "--curve-secret", keys["server"].secret_file, "--curve-allow", keys["server"].allow_dir,
         "--parent-pid", str(os.getpid())],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    try:
        with client(address, keys["allowed"]) as c:
            hb = c.call(Heartbeat(seq=7, time=0.0), Heartbeat, 60.0, "test startup")  # torch import: slow
            assert hb.seq == 7
        with client(address, keys["unknown"]) as c:
            c.send(Heartbeat(seq=8, time=0.0))
            with pytest.raises(WorkerTimeout):
                c.recv(lambda m: True, SILENCE_S, "test", -1)
        with client(address, keys["allowed"]) as c:
            c.send(Shutdown())
            assert proc.wait(JOIN_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out = proc.stdout.read().decode(errors="replace")
        proc.stdout.close()
    assert "unknown key" in out  # the worker logs whom it refused


# ---- check_bind ---------------------------------------------------------------------------
@pytest.mark.parametrize("bind", ["tcp://0.0.0.0:5555", "tcp://192.168.1.5:5555", "tcp://*:5555",
                                  "tcp://[::]:5555", "tcp://eth0:5555", "tcp://example.com:5555"])
def test_reachable_tcp_bind_without_keys_is_refused(bind):
    with pytest.raises(ValueError) as e:
        check_bind(bind)
    assert KEYS_COMMAND in str(e.value) and "--curve-secret" in str(e.value) and "--curve-allow" in str(e.value)


@pytest.mark.parametrize("bind", ["tcp://127.0.0.1:5555", "tcp://127.1.2.3:5555", "tcp://localhost:5555",
                                  "tcp://[::1]:5555", "ipc:///tmp/dvt.sock", "inproc://x"])
def test_loopback_and_ipc_binds_need_no_keys(bind):
    check_bind(bind)


def test_reachable_tcp_bind_with_keys_is_accepted(keys):
    check_bind("tcp://0.0.0.0:5555", keys["server"])


@pytest.mark.parametrize("role", ["target", "draft", "replay"])
def test_every_worker_role_takes_the_curve_flags(role, tmp_path, capsys):
    import importlib
    mod = importlib.import_module(f"dovetail.workers.{role}")
    config_cls = {"target": "TargetConfig", "draft": "DraftConfig", "replay": "ReplayConfig"}[role]
    paths = write_keys(tmp_path / "k")
    base = ["--model", "m"] if role != "replay" else ["--script", "s.json", "--vocab-size", "64", "--tokenizer-hash", "h"]
    parse = lambda *extra: mod.parse_config(getattr(mod, config_cls), mod.build_parser(), [*base, *extra])  # noqa: E731
    with pytest.raises(SystemExit) as e:  # argparse's error exit: usage and the reason
        parse("--bind", "tcp://0.0.0.0:5555")
    assert e.value.code == 2 and KEYS_COMMAND in capsys.readouterr().err
    cfg = parse("--bind", "tcp://0.0.0.0:5555", "--curve-secret", str(paths["worker"]["secret"]),
                "--curve-allow", str(paths["worker"]["allow"]))
    assert cfg.keys is not None and len(cfg.keys.allowed) == 1


# ---- key files ----------------------------------------------------------------------------
def test_keys_command_writes_each_file_where_it_goes(tmp_path, capsys):
    out = tmp_path / "k"
    assert main(["keys", "--out", str(out), "--name", "alice", "--name", "bob"]) == 0
    printed = capsys.readouterr().out
    worker_dir = out / "worker"
    for path in (worker_dir / "server.key_secret", worker_dir / "allow",
                 out / "alice" / "alice.key_secret", out / "alice" / "server.key", out / "bob" / "bob.key_secret"):
        assert path.exists() and str(path) in printed
    for secret in (worker_dir / "server.key_secret", out / "alice" / "alice.key_secret", out / "bob" / "bob.key_secret"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert sorted(p.name for p in (worker_dir / "allow").iterdir()) == ["alice.key", "bob.key"]  # no secrets
    server = ServerKeys(str(worker_dir / "server.key_secret"), str(worker_dir / "allow"))
    alice = ClientKeys(str(out / "alice" / "alice.key_secret"), str(out / "alice" / "server.key"))
    assert alice.server_public == server.public and alice.public in server.allowed
    # Keys in use are never overwritten.
    assert main(["keys", "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert ServerKeys(str(worker_dir / "server.key_secret"), str(worker_dir / "allow")).public == server.public


def test_bad_key_files_are_refused_with_the_file_named(tmp_path):
    paths = write_keys(tmp_path / "k")
    secret, allow = str(paths["worker"]["secret"]), str(paths["worker"]["allow"])
    garbage = tmp_path / "garbage.key_secret"
    garbage.write_text('curve\n    public-key = "short"\n    secret-key = "short"\n')
    with pytest.raises(ValueError, match="garbage"):
        load_secret(garbage)
    with pytest.raises(ValueError, match="no valid CURVE secret"):  # a public key is not a secret
        ServerKeys(str(paths["worker"]["public"]), allow)
    with pytest.raises(ValueError, match="no such key file"):
        ServerKeys(str(tmp_path / "missing"), allow)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no client public keys"):
        ServerKeys(secret, str(empty))
    with pytest.raises(ValueError, match="go together"):  # a secret without an allowlist lets anyone in
        server_keys(secret, None)
    assert server_keys(None, None) is None
