"""Two hosts, emulated: network namespaces A and B joined by a veth pair, 2 ms netem delay
on each end (a 4 ms round trip). Where the kernel has no netem (sch_netem missing, as in
some containers) a forwarder in B holds every chunk 2 ms in each direction instead, and the
coordinator connects through it. The target worker serves in A on tcp:// with CurveZMQ
(`dovetail-launch --role target`); the coordinator and its draft run in B
(dovetail.launch(target_address=...)), as a script that prints JSON. Greedy output must
equal the single-host ipc run; the per-round wire overhead is reported against the RTT;
a SIGKILLed coordinator's session must be closed by the remote target within the liveness
window, the target serving on until SIGTERM.

Needs root and iproute2 (`ip netns`, `tc`); skipped with the reason otherwise. Every
namespace (and with it the veth pair) and process is removed even when a test fails.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from dovetail.system.security import write_keys

pytestmark = pytest.mark.timeout(180)

TAG = os.getpid() % 10000
NS_A, NS_B = f"dvt-a-{TAG}", f"dvt-b-{TAG}"
VETH_A, VETH_B = f"dvta{TAG}", f"dvtb{TAG}"
SUBNET = f"10.213.{TAG % 250}"
ADDR_A, ADDR_B = f"{SUBNET}.1", f"{SUBNET}.2"
PORT = 5555
ECHO_PORT = 5556              # a TCP echo server in A: the round trip the test measures
DELAY_S = 0.002               # on each end (netem) or each direction (forwarder): RTT about 4 ms
HEARTBEAT_INTERVAL_S = 0.25
LIVENESS = 4                  # window: 1 s
WINDOW_S = HEARTBEAT_INTERVAL_S * LIVENESS
EXIT_SLACK_S = 10.0           # noticing (one POLL_MS) plus tearing down torch on a busy 2-core box
PROMPTS = [[1, 5, 9, 13], [3, 3, 7, 20, 41, 2, 8], [60]]
MAX_NEW = 32
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}

COORDINATOR = textwrap.dedent("""
    import json, socket, statistics, sys, time
    import dovetail
    from dovetail.system.security import ClientKeys
    address, draft, secret, server_public, host, echo_port, interval, liveness, prompts, max_new = sys.argv[1:]
    coord = dovetail.launch(None, draft, target_address=address, client_keys=ClientKeys(secret, server_public),
                            dtype="float64", draft_device="cpu", force_draft=True, env={"OMP_WAIT_POLICY": "PASSIVE"},
                            heartbeat_interval_s=float(interval), heartbeat_liveness=int(liveness))

    echo = socket.create_connection((host, int(echo_port)))
    echo.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def rtt():  # one byte there and back: what a ping measures, over the same path
        t0 = time.perf_counter()
        echo.sendall(b"x")
        echo.recv(1)
        return time.perf_counter() - t0

    rtts = [rtt() for _ in range(30)]
    runs = []
    for prompt in json.loads(prompts):
        r = coord.generate(prompt, max_new_tokens=int(max_new))
        s = r.stats
        runs.append({"ids": r.token_ids, "rounds": s.rounds, "wire_s": s.wire_s, "seconds": s.seconds,
                     "verify_s": s.verify_s, "draft_s": s.draft_s, "fallback": s.draft_fallback})
    print(json.dumps({"runs": runs, "rtt_s": statistics.median(rtts), "draft_pid": coord.worker_pids["draft"]}),
          flush=True)
    time.sleep(300)  # until the test SIGKILLs us
""")


ECHO = textwrap.dedent("""
    import socket, sys
    ls = socket.create_server((sys.argv[1], int(sys.argv[2])))
    while True:
        c, _ = ls.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := c.recv(4096):
            c.sendall(data)
        c.close()
""")

# A TCP forwarder that delays every chunk by DELAY_S in each direction, keeping order: the
# stand-in for netem. Listens on argv[2], forwards to the same ports on argv[3].
FORWARDER = textwrap.dedent("""
    import collections, socket, sys, threading, time
    delay, here, there, ports = float(sys.argv[1]), sys.argv[2], sys.argv[3], map(int, sys.argv[4:])

    def pump(src, dst):
        chunks, ready = collections.deque(), threading.Condition()
        def send():
            while True:
                with ready:
                    while not chunks:
                        ready.wait()
                    due, data = chunks.popleft()
                time.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    break
                try:
                    dst.sendall(data)
                except OSError:
                    break
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        threading.Thread(target=send, daemon=True).start()
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            with ready:
                chunks.append((time.monotonic() + delay, data))
                ready.notify()
            if not data:
                return

    def forward(port):
        ls = socket.create_server((here, port))
        while True:
            near, _ = ls.accept()
            try:
                far = socket.create_connection((there, port))
            except OSError:  # not listening yet: drop the client, it reconnects (ZeroMQ does)
                near.close()
                continue
            for s in (near, far):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=pump, args=(near, far), daemon=True).start()
            threading.Thread(target=pump, args=(far, near), daemon=True).start()

    for port in ports:
        threading.Thread(target=forward, args=(port,), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
""")


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30)


def netns_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc)"
    if sh("ip", "netns", "list", check=False).returncode != 0:
        return "`ip netns` is not available here"
    return None


def tear_down_network() -> None:
    for ns in (NS_A, NS_B):  # deleting a namespace deletes its end of the veth, and so the pair
        sh("ip", "netns", "del", ns, check=False)
    sh("ip", "link", "del", VETH_A, check=False)  # in case it never moved into A


def set_up_network() -> bool:
    """Build A <-veth-> B; True when netem delays the link, False when it is missing."""
    tear_down_network()  # leftovers of an interrupted run with this pid
    for ns in (NS_A, NS_B):
        sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", VETH_A, "type", "veth", "peer", "name", VETH_B)
    netem = True
    for ns, dev, addr in ((NS_A, VETH_A, ADDR_A), (NS_B, VETH_B, ADDR_B)):
        sh("ip", "link", "set", dev, "netns", ns)
        sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        done = sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "netem", "delay",
                  f"{DELAY_S * 1000:g}ms", check=False)
        netem = netem and done.returncode == 0
    return netem


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def remote(tmp_path_factory, tiny_target, tiny_draft_near, pids):
    """The target in A, the coordinator script (and its draft) in B; yields what B printed."""
    reason = netns_missing()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("two-hosts")
    keys = write_keys(root / "keys")
    target = script = echo = forwarder = None
    try:
        try:
            netem = set_up_network()
        except subprocess.CalledProcessError as e:
            pytest.skip(f"could not build the two-namespace network: {e.stderr or e}")
        echo = subprocess.Popen(["ip", "netns", "exec", NS_A, sys.executable, "-c", ECHO, ADDR_A, str(ECHO_PORT)],
                                stdin=subprocess.DEVNULL)
        host = ADDR_A
        if not netem:  # the delay moves into a forwarder in B; B's programs connect to it
            forwarder = subprocess.Popen(
                ["ip", "netns", "exec", NS_B, sys.executable, "-c", FORWARDER, str(DELAY_S), ADDR_B, ADDR_A,
                 str(PORT), str(ECHO_PORT)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
            assert forwarder.stdout.readline() == b"ready\n"
            host = ADDR_B
        target_log = open(root / "target.log", "wb")
        target = subprocess.Popen(
            ["ip", "netns", "exec", NS_A, sys.executable, "-m", "dovetail.cli", "--role", "target",
             "--listen", f"tcp://{ADDR_A}:{PORT}", "--target", str(tiny_target), "--dtype", "float64",
             "--curve-secret", str(keys["worker"]["secret"]), "--curve-allow", str(keys["worker"]["allow"]),
             "--heartbeat-interval", str(HEARTBEAT_INTERVAL_S), "--liveness", str(LIVENESS)],
            stdout=target_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=ENV)
        pids.track(target.pid)  # `ip netns exec` execs the command: same pid
        me = keys["coordinator"]
        script_log = open(root / "coordinator.log", "wb")
        script = subprocess.Popen(
            ["ip", "netns", "exec", NS_B, sys.executable, "-c", COORDINATOR, f"tcp://{host}:{PORT}",
             str(tiny_draft_near), str(me["secret"]), str(me["server_public"]), host, str(ECHO_PORT),
             str(HEARTBEAT_INTERVAL_S), str(LIVENESS), json.dumps(PROMPTS), str(MAX_NEW)],
            stdout=subprocess.PIPE, stderr=script_log, stdin=subprocess.DEVNULL, env=ENV)
        pids.track(script.pid)
        ready, _, _ = select.select([script.stdout], [], [], 120)
        line = script.stdout.readline() if ready else b""
        logs = lambda: ((root / "coordinator.log").read_text(errors="replace")[-3000:] + "\n--- target:\n"
                        + (root / "target.log").read_text(errors="replace")[-3000:])
        assert line, f"the coordinator in {NS_B} printed nothing (rc={script.poll()}):\n{logs()}"
        info = json.loads(line)
        pids.track(info["draft_pid"])
        yield {**info, "target": target, "script": script, "logs": logs,
               "delay": "netem" if netem else "forwarder (no netem in this kernel)"}
    finally:
        for proc in (script, target, forwarder, echo):
            stop(proc)
        tear_down_network()


@pytest.fixture(scope="module")
def single_host(launch_tracked, tiny_target, tiny_draft_near):
    """The same models on one host over ipc://: the reference output."""
    coord = launch_tracked(tiny_target, tiny_draft_near)
    try:
        return [coord.generate(p, max_new_tokens=MAX_NEW).token_ids for p in PROMPTS]
    finally:
        coord.close()


def test_output_over_the_network_equals_the_single_host_run(remote, single_host):
    runs = remote["runs"]
    assert [r["ids"] for r in runs] == single_host
    assert not any(r["fallback"] for r in runs)  # the draft drafted throughout
    rounds = sum(r["rounds"] for r in runs)
    per_round_ms = 1000 * sum(r["wire_s"] for r in runs) / rounds
    rtt_ms = 1000 * remote["rtt_s"]
    print(f"\ntwo hosts, {DELAY_S * 1000:g} ms each way by {remote['delay']}: RTT {rtt_ms:.2f} ms; wire overhead per round "
          f"{per_round_ms:.2f} ms = {per_round_ms / rtt_ms:.2f} x RTT over {rounds} rounds")
    assert 3.0 < rtt_ms < 50, rtt_ms  # the netem delay is really there (2 ms each way)
    # Each round crosses the link once each way; what the wire costs beyond that is our overhead.
    assert 0.8 * rtt_ms < per_round_ms < rtt_ms + 40, (per_round_ms, rtt_ms)


def test_sigkilled_coordinator_loses_its_session_and_the_target_serves_on(remote, pids):
    target, script = remote["target"], remote["script"]
    assert target.poll() is None, remote["logs"]()
    script.kill()  # SIGKILL: no Shutdown, no close(); only the silence tells the target
    script.wait(10)
    t0 = time.monotonic()
    left = pids.wait_gone([remote["draft_pid"]], EXIT_SLACK_S)  # the draft was its child
    assert not left, f"the draft outlived its coordinator:\n{remote['logs']()}"
    closed = f"sent nothing for {WINDOW_S:g} s"
    while closed not in remote["logs"]() and time.monotonic() - t0 < WINDOW_S + EXIT_SLACK_S:
        time.sleep(0.05)
    elapsed = time.monotonic() - t0
    assert closed in remote["logs"](), remote["logs"]()
    assert target.poll() is None, remote["logs"]()  # one client gone is not the server's end
    print(f"\nthe remote target closed the killed coordinator's session {elapsed:.2f} s later (window {WINDOW_S:g} s)")
    target.send_signal(signal.SIGTERM)
    assert target.wait(EXIT_SLACK_S) == 0, remote["logs"]()
