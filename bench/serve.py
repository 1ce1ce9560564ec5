"""python -m bench.serve: a load generator for OpenAI-compatible servers, ours and llama.cpp's.

Starts `dovetail-launch serve` and llama-cpp-python's own server (`python -m llama_cpp.server`,
its `server` extra: pip install -e ".[bench]") on the same GGUF, the same CPUs and threads,
one after the other, and sends each the same chat prompts (greedy, streamed) at each
concurrency level. Per level: output tokens per second of wall time, and p50/p99 of the time
to first token and of the inter-token latency (each request's (last - first token time) /
(tokens - 1)). Also how many answers are the same text on both servers. Writes JSON, a
Markdown table and plots to bench/results/.

    python -m bench.serve                       # the 1.5B GGUF, ShareGPT chat prompts
    python -m bench.serve --prompts-file chats.jsonl --concurrency 1,4,16 --max-tokens 64
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.plots import save_line_plot
from dovetail.system.cpus import cpu_model, format_cpus, parse_cpus

RESULTS = Path(__file__).parent / "results"
START_S = 1800.0  # the first start fetches, converts and calibrates
SERVED = "bench"
SERVERS = ("dovetail", "llama-cpp-python")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(name: str, args, gguf: Path, cpus: list[int], port: int, log_path: Path) -> subprocess.Popen:
    if name == "dovetail":
        cmd = [sys.executable, "-m", "dovetail.cli", "serve", "--port", str(port), "--target", str(gguf),
               "--served-model-name", SERVED, "--max-active", str(max(args.levels)),
               "--max-pending", str(max(args.levels) * 4), "--target-cpus", format_cpus(cpus),
               *shlex.split(args.dovetail_args)]
    else:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", SERVED,
               "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(len(cpus)),
               "--n_threads_batch", str(len(cpus)), "--n_ctx", str(args.n_ctx),
               # by default a new request interrupts the one streaming (abetlen/llama-cpp-python#897):
               # queue them instead, one at a time, as its docs advise for several clients
               "--interrupt_requests", "False"]
    log = open(log_path, "wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            preexec_fn=lambda: os.sched_setaffinity(0, cpus))


def wait_ready(proc: subprocess.Popen, port: int, log_path: Path) -> None:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"not ready within {START_S:g} s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def one_request(port: int, messages: list[dict], max_tokens: int, count_tokens) -> dict:
    """One streamed chat completion; times of the first and last content, and the text."""
    body = {"model": SERVED, "messages": messages, "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    text, usage = [], None
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return {"error": f"HTTP {resp.status}: {resp.read()[:300]!r}"}
        for line in resp:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    now = time.perf_counter()
                    first = first if first is not None else now
                    last = now
                    text.append(piece)
    finally:
        conn.close()
    out = "".join(text)
    if first is None:
        return {"error": "the stream ended without any text"}
    # Usage when the server sends it (ours does); else the text's own tokens, the same way for both.
    tokens = usage["completion_tokens"] if usage else count_tokens(out)
    return {"text": out, "tokens": tokens, "ttft_s": first - t0,
            "itl_s": (last - first) / (tokens - 1) if tokens > 1 else None,
            "usage_reported": usage is not None}


def run_level(port: int, prompts: list, concurrency: int, n_requests: int, max_tokens: int, count_tokens) -> dict:
    jobs = [prompts[i % len(prompts)] for i in range(n_requests)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda m: one_request(port, m, max_tokens, count_tokens), jobs))
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    ttft = [r["ttft_s"] for r in ok]
    itl = [r["itl_s"] for r in ok if r["itl_s"] is not None]
    return {"concurrency": concurrency, "requests": n_requests, "ok": len(ok), "seconds": wall,
            "tokens": sum(r["tokens"] for r in ok), "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "itl_p50_s": pct(itl, 50),
            "itl_p99_s": pct(itl, 99), "errors": [r["error"] for r in results if "error" in r][:3],
            "texts": [r.get("text") for r in results]}


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[min(98, max(0, round(q) - 1))]


def load_prompts(args) -> list[list[dict]]:
    from dovetail.models.prompts import load_prompts_jsonl, load_sharegpt_chats
    if args.prompts_file:
        raw = load_prompts_jsonl(args.prompts_file)[:args.prompts]
        return [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in raw]
    return load_sharegpt_chats(limit=args.prompts)


def table(rows: dict[str, list[dict]]) -> str:
    lines = ["| server | concurrency | requests | tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |",
             "|---|---|---|---|---|---|---|---|"]
    ms = lambda v: "-" if v is None else f"{1000 * v:.0f} ms"  # noqa: E731
    for name, levels in rows.items():
        for r in levels:
            lines.append(f"| {name} | {r['concurrency']} | {r['ok']}/{r['requests']} | {r['tokens_per_s']:.1f} | "
                         f"{ms(r['ttft_p50_s'])} | {ms(r['ttft_p99_s'])} | {ms(r['itl_p50_s'])} | {ms(r['itl_p99_s'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct", help="a GGUF file or registry name")
    p.add_argument("--cpus", default=None, help="CPUs for both servers, e.g. 0-15 (default: all)")
    p.add_argument("--concurrency", default="1,4,16", help="comma list of concurrency levels")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per level (default: twice the concurrency, at least 4)")
    p.add_argument("--prompts", type=int, default=16, help="distinct prompts, reused round-robin")
    p.add_argument("--prompts-file", default=None, help="JSONL of {'messages': [...]} or {'prompt': ...} "
                                                        "(default: ShareGPT first user turns, held out)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per answer")
    p.add_argument("--n-ctx", type=int, default=8192, help="llama-cpp-python's context (ours: --llama-ctx)")
    p.add_argument("--servers", default=",".join(SERVERS), help=f"comma list of {SERVERS}")
    p.add_argument("--dovetail-args", default="", help="more flags for dovetail-launch serve, one string")
    p.add_argument("--tag", default=None, help="name of the result files (default: serve-<N>core)")
    p.add_argument("--out", default=str(RESULTS), help="folder for the results (default: bench/results)")
    args = p.parse_args(argv)
    args.levels = [int(c) for c in args.concurrency.split(",")]
    from dovetail.models.fetch import resolve_model
    from dovetail.models.loading import load_tokenizer
    gguf = resolve_model(args.target)
    cpus = parse_cpus(args.cpus) or sorted(os.sched_getaffinity(0))
    tok = load_tokenizer(gguf)
    count_tokens = lambda text: len(tok.encode(text, add_special_tokens=False))  # noqa: E731
    prompts = load_prompts(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = args.tag or f"serve-{len(cpus)}core"
    rows: dict[str, list[dict]] = {}
    for name in args.servers.split(","):
        port, log_path = free_port(), out_dir / f"{tag}-{name}.log"
        print(f"{name}: starting on CPUs {format_cpus(cpus)} (log: {log_path})", file=sys.stderr, flush=True)
        proc = start_server(name, args, gguf, cpus, port, log_path)
        try:
            wait_ready(proc, port, log_path)
            one_request(port, prompts[0], 8, count_tokens)  # warm-up
            rows[name] = []
            for c in args.levels:
                n = args.requests or max(4, 2 * c)
                rows[name].append(run_level(port, prompts, c, n, args.max_tokens, count_tokens))
                r = rows[name][-1]
                print(f"{name} c={c}: {r['tokens_per_s']:.1f} tok/s, {r['ok']}/{n} ok", file=sys.stderr, flush=True)
        finally:
            stop_server(proc)
    same = None
    if len(rows) == 2:
        a, b = (rows[n][0]["texts"] for n in rows)
        same = sum(x == y for x, y in zip(a, b) if x is not None and y is not None)
    record = {"machine": f"{cpu_model()}, {len(cpus)} CPUs", "target": str(gguf), "max_tokens": args.max_tokens,
              "dovetail_args": args.dovetail_args, "prompts": len(prompts),
              "same_text_at_concurrency_1": same, "requests_at_concurrency_1": len(next(iter(rows.values()))[0]["texts"]),
              "servers": {n: [{k: v for k, v in r.items() if k != "texts"} for r in levels] for n, levels in rows.items()}}
    (out_dir / f"{tag}.json").write_text(json.dumps(record, indent=1))
    md = table(rows)
    (out_dir / f"{tag}.md").write_text(f"{record['machine']}, {gguf.name}, {args.max_tokens} tokens per answer\n\n{md}\n")
    for metric, label in (("tokens_per_s", "output tokens/s"), ("ttft_p50_s", "TTFT p50 (s)")):
        save_line_plot(out_dir / f"{tag}-{metric}.png",
                       {n: ([r["concurrency"] for r in lv], [r[metric] or 0 for r in lv]) for n, lv in rows.items()},
                       title=f"{label}, {gguf.name}, {len(cpus)} CPUs", xlabel="concurrent requests", ylabel=label,
                       logx=True)
    print(md)
    if same is not None:
        print(f"\nsame text on both servers at concurrency 1: {same}/{record['requests_at_concurrency_1']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
