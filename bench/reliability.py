"""python -m bench.reliability: break things on purpose and count what it cost.

Runs N concurrent greedy requests on tiny float64 models (exact comparisons), injects one
fault per scenario a moment after the first tokens stream, and reports per fault: requests
affected, tokens lost (streamed tokens that differ from the same request run alone; must
be 0: committed tokens are never retracted), and the time from the fault until decoding
recovered (draft faults: until every request committed again) or every request had ended
(target faults), or the workers had exited (coordinator killed).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import dovetail
from tests.helpers import make_tiny_model

N_REQUESTS = 8
MAX_NEW = 48
OPTIONS = dict(dtype="float64", draft_device="cpu", depth=3, top_k=2, max_nodes=6, max_active=N_REQUESTS,
               draft_timeout_s=1.0, env={"OMP_WAIT_POLICY": "PASSIVE"})


def prompts() -> list[list[int]]:
    return [[2 + (5 * i + j) % 60 for j in range(2 + i)] for i in range(N_REQUESTS)]


def run_with_fault(target, draft, role: str, sig: int, options: dict) -> dict:
    """N concurrent requests; send ``sig`` to the ``role`` worker after the first chunk."""
    with dovetail.launch(target, draft, **{**OPTIONS, **options}) as coord:
        reference = [coord.generate(p, max_new_tokens=MAX_NEW).token_ids for p in prompts()]
        pid = coord.worker_pids[role]
        fault_at, lock = [], threading.Lock()
        streamed = [[] for _ in prompts()]
        resumed: dict[int, float] = {}  # request -> its first chunk after the fault

        def watcher(i):
            def on_event(kind, payload):
                if kind != "chunk":
                    return
                with lock:
                    streamed[i].extend(payload.token_ids)
                    if fault_at and i not in resumed:
                        resumed[i] = time.monotonic()
                    if not fault_at:
                        os.kill(pid, sig)
                        fault_at.append(time.monotonic())
            return on_event

        handles = [coord.submit(p, max_new_tokens=MAX_NEW, on_event=watcher(i)) for i, p in enumerate(prompts())]
        outcomes = []
        for h in handles:
            try:
                h.result(timeout=120)
            except Exception:
                pass
            outcomes.append(h.terminal)
        ended = time.monotonic()
        if sig == signal.SIGSTOP:
            os.kill(pid, signal.SIGCONT)
    lost = sum(sum(a != b for a, b in zip(s, ref)) + max(0, len(s) - len(ref))
               for s, ref in zip(streamed, reference))
    if role == "draft":  # the longest any request went without a new token after the fault
        recovery = max(resumed.values(), default=float("nan")) - fault_at[0]
    else:  # until every request had ended
        recovery = ended - fault_at[0]
    done_same = sum(o == "done" and s == ref for o, s, ref in zip(outcomes, streamed, reference))
    return {"requests": len(handles), "completed_identical": done_same, "errors": outcomes.count("error"),
            "tokens_lost": lost, "recovery_s": recovery}


def coordinator_killed(target, draft) -> dict:
    """A coordinator process SIGKILLed mid-request: how long its workers outlive it."""
    code = (f"import dovetail, json, sys\n"
            f"c = dovetail.launch({str(target)!r}, {str(draft)!r}, dtype='float64', draft_device='cpu', "
            f"env={{'OMP_WAIT_POLICY': 'PASSIVE'}})\n"
            f"print(json.dumps(c.worker_pids), flush=True)\n"
            f"for _ in c.stream([3, 4, 5], max_new_tokens=100000): pass\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pids = list(json.loads(proc.stdout.readline()).values())
    time.sleep(1.0)  # mid-request
    proc.kill()
    t0 = time.monotonic()
    while any(_alive(p) for p in pids) and time.monotonic() - t0 < 30:
        time.sleep(0.02)
    proc.wait()
    return {"requests": 1, "completed_identical": 0, "errors": 1, "tokens_lost": 0,
            "recovery_s": time.monotonic() - t0, "workers_left": sum(_alive(p) for p in pids)}


def malformed_flood(target, draft, n: int = 1000) -> dict:
    """n malformed frames straight at the target worker's socket, then a normal request."""
    import random

    import psutil
    import zmq

    from dovetail.protocol import HEADER, PROTOCOL_TAG, PROTOCOL_VERSION, Error, decode
    rng = random.Random(0)
    with dovetail.launch(target, draft, **OPTIONS) as coord:
        before = coord.generate([3, 4, 5], max_new_tokens=16).token_ids
        proc = psutil.Process(coord.worker_pids["target"])
        rss0 = proc.memory_info().rss
        sock = coord._ctx.socket(zmq.DEALER)
        sock.connect(coord.target.address)
        t0, rejected = time.monotonic(), 0
        for i in range(n):
            head = HEADER.pack(PROTOCOL_TAG, PROTOCOL_VERSION if i % 4 else 99, rng.randrange(1, 12))
            sock.send_multipart([head, bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 300)))])
            if sock.poll(5000) and isinstance(decode(sock.recv_multipart()), Error):
                rejected += 1
        sock.close(linger=0)
        after = coord.generate([3, 4, 5], max_new_tokens=16).token_ids
        grown = (proc.memory_info().rss - rss0) >> 20
    return {"requests": 1, "completed_identical": int(after == before), "errors": 0, "tokens_lost": 0,
            "recovery_s": 0.0, "rejected": rejected, "rss_growth_mib": grown, "seconds": time.monotonic() - t0}


def _alive(pid: int) -> bool:
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


SCENARIOS = {
    "draft SIGKILL": ("draft", signal.SIGKILL, {}),
    "draft SIGSTOP (hung)": ("draft", signal.SIGSTOP, {}),
    "target SIGKILL": ("target", signal.SIGKILL, {}),
    "target SIGSTOP (hung)": ("target", signal.SIGSTOP, {}),  # caught by missed heartbeats
}


def markdown(rows: dict[str, dict]) -> str:
    lines = ["| fault injected | requests | completed, identical to running alone | ended with an error "
             "| tokens lost | recovery |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['requests']} | {r['completed_identical']} | {r['errors']} | "
                     f"{r['tokens_lost']} | {r['recovery_s']:.2f} s |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reliability", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        target = make_tiny_model(Path(tmp) / "target", seed=0, attention_gain=4.0)
        draft = make_tiny_model(Path(tmp) / "draft", seed=1, noise_from=target, noise=0.005)
        rows = {name: run_with_fault(target, draft, role, sig, opts)
                for name, (role, sig, opts) in SCENARIOS.items()}
        rows["coordinator SIGKILL"] = coordinator_killed(target, draft)
        flood = malformed_flood(target, draft)
        rows[f"1000 malformed frames ({flood['rejected']} rejected, RSS +{flood['rss_growth_mib']} MiB)"] = flood
    table = markdown(rows)
    print(table)
    if args.out:
        Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
