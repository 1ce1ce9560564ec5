"""python -m bench.prefill_stall: does one stream keep its tokens while a long prompt goes in?

One streaming chat request decodes on `dovetail-launch serve` (its defaults, the real 1.5B
GGUF); once it has streamed a few tokens, a second client sends a long prompt (6,000 tokens
by default) and a third a 50 MB body. Reported, from one run:

- the stream's gaps between tokens before the long prompt (one round alone) and while it
  prefills (each gap: one round plus at most the prefill chunk that ran before it);
- how long the long prompt's prefill took, and how long the 50 MB body took to get its 413;
- the bar of issue 31: the worst gap during the prefill against 2 x (one chunk + one round),
  one chunk being PREFILL_CHUNK_S (workers/target.py) and one round the median gap before.

JSON in bench/results/<name>/prefill_stall.json.
"""
from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx

from bench.soak import (
    RESULTS, SERVED, free_port, long_prompts, oversize_body, server_command, start_server, stop_server, wait_ready,
    warm_up,
)
from dovetail.flags import DEFAULT_TARGET
from dovetail.workers.target import PREFILL_CHUNK_S

STREAM_PROMPT = "Write a long, detailed explanation of how a hash map works, with Python examples."


def stream_tokens(base: str, key: str, max_tokens: int, stamps: list[float], started: threading.Event) -> None:
    """Stream one chat answer, recording when each round's tokens came."""
    # logprobs: every round's tokens come in an event even when they complete no text yet
    # (a partial character, a space the tokenizer holds): the gaps are the rounds'.
    body = {"model": SERVED, "messages": [{"role": "user", "content": STREAM_PROMPT}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "logprobs": True}
    with httpx.Client(base_url=base, timeout=900.0, trust_env=False) as client:
        try:
            with client.stream("POST", "/v1/chat/completions", json=body,
                               headers={"Authorization": f"Bearer {key}"}) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: {") and '"logprobs": {"content": [{' in line:
                        stamps.append(time.monotonic())
                        if len(stamps) == 8:
                            started.set()
        except httpx.HTTPError:  # the server stopped under it: the bench is over
            pass


def gap_report(stamps: list[float], t0: float, t1: float, chunk_s: float) -> dict:
    """The stream's gaps before [t0, t1] (the long prompt's request) and overlapping it, and
    the bar: 2 x (one chunk + one round), a round being the median gap before."""
    gaps = [(b, b - a) for a, b in zip(stamps, stamps[1:])]
    before = [g for t, g in gaps if t < t0]
    overlapping = [(t, g) for t, g in gaps if t - g < t1 and t > t0]
    during = [g for _, g in overlapping]
    round_s = statistics.median(before) if before else None
    bar = 2 * (chunk_s + round_s) if round_s is not None else None
    return {
        "gap_before_median_s": round(round_s, 3) if before else None, "gaps_before": len(before),
        "gaps_during": len(during), "gap_during_median_s": round(statistics.median(during), 3) if during else None,
        "gap_during_p99_s": round(sorted(during)[int(0.99 * (len(during) - 1))], 3) if during else None,
        "worst_gap_during_s": round(max(during), 3) if during else None,
        "bar_s": round(bar, 3) if bar is not None else None, "prefill_chunk_s": chunk_s,
        "passed": bool(during) and bar is not None and max(during) <= bar,
        # the ten worst: (seconds after the long prompt was sent that the gap ended, its length)
        "worst_gaps": sorted(((round(t - t0, 2), round(g, 3)) for t, g in overlapping), key=lambda x: -x[1])[:10],
        "stream_tokens_seen": len(stamps),
        "stream_ended_s_after_long": round(stamps[-1] - t0, 2) if stamps else None,
    }


def post(base: str, key: str, content: bytes | dict, out: dict, name: str) -> None:
    t0 = time.monotonic()
    with httpx.Client(base_url=base, timeout=900.0, trust_env=False) as client:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        raw = content if isinstance(content, bytes) else json.dumps(content).encode()
        try:
            resp = client.post("/v1/chat/completions", content=raw, headers=headers)
            out[name] = {"status": resp.status_code, "seconds": time.monotonic() - t0, "sent_at": t0,
                         "usage": resp.json().get("usage") if resp.status_code == 200 else None}
        except httpx.HTTPError as e:  # the server may close the connection after its 413
            out[name] = {"status": None, "error": f"{type(e).__name__}: {e}", "seconds": time.monotonic() - t0,
                         "sent_at": t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.prefill_stall", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=DEFAULT_TARGET, help="the target (default: %(default)s)")
    p.add_argument("--long-tokens", type=int, default=6000, help="tokens of the long prompt (default: 6000)")
    p.add_argument("--stream-tokens", type=int, default=2000, help="max_tokens of the stream (default: 2000)")
    p.add_argument("--oversize-mb", type=float, default=50.0, help="the big body (default: 50 MB)")
    p.add_argument("--serve-args", default="", help="more flags for dovetail-launch serve, one string")
    p.add_argument("--name", default="prefill-stall-2core", help="results folder (default: %(default)s)")
    args = p.parse_args(argv)
    args.draft, args.no_draft, args.long_text_file = None, False, None
    out_dir = Path(RESULTS) / args.name
    out_dir.mkdir(parents=True, exist_ok=True)
    key, port = secrets.token_hex(16), free_port()
    base = f"http://127.0.0.1:{port}"
    texts, n_long = long_prompts(args, n=1)
    proc = start_server(server_command(args, port, key, None), None, out_dir / "server.log")
    try:
        wait_ready(proc, base, out_dir / "server.log")
        warm_up(base, key, [{"role": "user", "content": "Hi"}])
        stamps, started, results = [], threading.Event(), {}
        streamer = threading.Thread(target=stream_tokens, args=(base, key, args.stream_tokens, stamps, started))
        streamer.start()
        if not started.wait(600):
            raise RuntimeError("the stream did not start")
        time.sleep(3.0)  # a few rounds alone: the baseline gap
        long_body = {"model": SERVED, "messages": [{"role": "user", "content": texts[0]}], "max_tokens": 1,
                     "temperature": 0}
        senders = [threading.Thread(target=post, args=(base, key, long_body, results, "long")),
                   threading.Thread(target=post, args=(base, key, oversize_body(args.oversize_mb), results, "oversize"))]
        for t in senders:
            t.start()
        for t in senders:
            t.join(900)
        t_long0 = results["long"]["sent_at"]
        t_long1 = t_long0 + results["long"]["seconds"]
        streamer.join(1)  # it goes on to its max_tokens; the server's stop ends it
    finally:
        stop_server(proc)
    report = {
        "target": args.target, "long_prompt_tokens": n_long,
        "long_status": results["long"]["status"], "long_seconds": round(results["long"]["seconds"], 2),
        "long_usage": results["long"].get("usage"),
        "oversize_status": results["oversize"].get("status"), "oversize_seconds": round(results["oversize"]["seconds"], 3),
        **gap_report(stamps, t_long0, t_long1, PREFILL_CHUNK_S),
    }
    (out_dir / "prefill_stall.json").write_text(json.dumps(report, indent=1))
    for k, v in report.items():
        print(f"{k:24} {v}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
