"""Faults during concurrent requests: a killed or hung draft costs nothing but speed; a dead
target ends every in-flight request with one clear error, fast, and leaves no process.

Each test starts its own coordinator (tiny float64 models), because each breaks a worker.
"""
import os
import signal
import threading
import time

import pytest

import dovetail

N = 8
MAX_NEW = 40
# A target fault ends every request within this many seconds: the heartbeats' window (3 x 1 s)
# plus one interval for a hung one, and slack for a 2-core box that other processes keep busy
# (3-5x slower); still far below verify_timeout_s (120 s), which must not be what ends them.
FAULT_END_S = 10.0


def prompts():
    return [[2 + (7 * i + j) % 60 for j in range(3 + i)] for i in range(N)]


def submit_all(coord, on_first_chunk, max_new=MAX_NEW):
    """Submit N requests; call on_first_chunk() once, when the first chunk of any arrives."""
    fired, lock, events = [False], threading.Lock(), [[] for _ in range(N)]

    def recorder(i):
        def on_event(kind, payload):
            events[i].append((kind, time.monotonic()))
            if kind == "chunk":
                with lock:
                    if not fired[0]:
                        fired[0] = True
                        on_first_chunk()
        return on_event

    handles = [coord.submit(p, max_new_tokens=max_new, on_event=recorder(i)) for i, p in enumerate(prompts())]
    return handles, events


def terminal_kinds(events):
    return [[k for k, _ in ev if k != "chunk"] for ev in events]


def assert_each_ended_with_one_error(handles, events, fault_times: list[float], error: type) -> None:
    """A target fault: every request raises ``error`` naming the target, has exactly one
    terminal event, an error, and the last of them came within FAULT_END_S of the fault (its
    time is in ``fault_times`` once the first chunk has triggered it)."""
    for h in handles:
        with pytest.raises(error, match="target"):
            h.result(timeout=30)
    assert terminal_kinds(events) == [["error"]] * N
    fault_at = fault_times[0]
    ended = max(t for ev in events for k, t in ev if k == "error")
    assert ended - fault_at < FAULT_END_S, f"last request ended {ended - fault_at:.1f} s after the fault"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_draft_fault_mid_run_every_request_completes_identically(launch_tracked, tiny_target, tiny_draft_near,
                                                                   pids, fault):
    coord = launch_tracked(tiny_target, tiny_draft_near, depth=3, top_k=2, max_nodes=6, max_active=N,
                           draft_timeout_s=1.0)
    draft = coord.worker_pids["draft"]
    try:
        reference = [coord.generate(p, max_new_tokens=MAX_NEW).token_ids for p in prompts()]
        handles, events = submit_all(coord, lambda: os.kill(draft, getattr(signal, fault)))
        results = [h.result(timeout=120) for h in handles]
        assert [r.token_ids for r in results] == reference
        assert terminal_kinds(events) == [["done"]] * N
        assert any(r.stats.draft_fallback for r in results)
        assert pids.alive(coord.worker_pids["target"])
    finally:
        if fault == "SIGSTOP":
            os.kill(draft, signal.SIGCONT)
        coord.close()
    assert not pids.wait_gone(list(coord.worker_pids.values()))


@pytest.mark.timeout(180)
def test_target_killed_mid_run_every_request_ends_with_one_error_fast(launch_tracked, tiny_target,
                                                                      tiny_draft_near, pids):
    coord = launch_tracked(tiny_target, tiny_draft_near, depth=3, top_k=2, max_nodes=6, max_active=4)
    target = coord.worker_pids["target"]
    killed = []
    try:
        handles, events = submit_all(coord, lambda: (os.kill(target, signal.SIGKILL),
                                                     killed.append(time.monotonic())), max_new=400)
        assert_each_ended_with_one_error(handles, events, killed, dovetail.WorkerDied)
        for h in handles:  # each names the signal and its usual cause (describe_exit)
            with pytest.raises(dovetail.WorkerDied, match="killed by SIGKILL .*out-of-memory killer"):
                h.result(timeout=1)
        t0 = time.monotonic()
        with pytest.raises(dovetail.WorkerDied, match="killed by SIGKILL"):
            coord.generate([1, 2, 3], max_new_tokens=4)  # new requests fail fast
        assert time.monotonic() - t0 < 3.0  # known dead: no heartbeat window, no timeout
        assert coord.in_flight == 0
    finally:
        coord.close()
    assert not pids.wait_gone(list(coord.worker_pids.values()))  # no orphan draft


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_remote_target_fault_ends_every_request_and_frees_the_port(launch_tracked, tiny_target,
                                                                   tiny_draft_near, pids, fault):
    """A target worker on tcp:// (as on another host): killed or hung mid-run, every request
    ends with one error within FAULT_END_S, nothing is left running, and its port binds again."""
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    worker = subprocess.Popen([sys.executable, "-m", "dovetail.workers.target", "--bind", address,
                               "--model", str(tiny_target), "--dtype", "float64", "--no-calibrate",
                               "--log-level", "warning"],
                              stdin=subprocess.DEVNULL, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    pids.track(worker.pid)
    faulted = []
    try:
        coord = launch_tracked(None, tiny_draft_near, target_address=address, depth=3, top_k=2, max_nodes=6,
                               max_active=4)
        try:
            handles, events = submit_all(coord, lambda: (os.kill(worker.pid, getattr(signal, fault)),
                                                         faulted.append(time.monotonic())), max_new=400)
            assert_each_ended_with_one_error(handles, events, faulted, dovetail.WorkerError)
        finally:
            coord.close()
        assert not pids.wait_gone([coord.worker_pids["draft"]])
    finally:
        worker.kill()
        worker.wait(10)
    import zmq  # a new target worker can serve on the same port (as zmq binds: SO_REUSEADDR)
    ctx = zmq.Context()
    try:
        router = ctx.socket(zmq.ROUTER)
        router.bind(address)
        router.close(linger=0)
    finally:
        ctx.term()
