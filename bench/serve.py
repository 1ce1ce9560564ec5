"""python -m bench.serve: a load generator for OpenAI-compatible servers, ours and llama.cpp's.

Starts `dovetail-launch serve`, llama-cpp-python's own server (`python -m llama_cpp.server`,
its `server` extra: pip install -e ".[bench]") and llama.cpp's `llama-server` (bash
bench/build_llama_server.sh; skipped with a line where it is missing) on the same GGUF, the
same CPUs and threads, one after the other, and sends each the same chat prompts (greedy,
streamed) at each concurrency level. Per level: output tokens per second of wall time, and
p50/p99 of the time to first token and of the inter-token latency (each request's (last -
first token time) / (tokens - 1)), and the prompt tokens the server says it reused from its
cache. Also how many answers are the same text as the first server's. Writes JSON, a
Markdown table and plots to bench/results/.

    python -m bench.serve                       # the 1.5B GGUF, ShareGPT chat prompts
    python -m bench.serve --prompts-file chats.jsonl --concurrency 1,4,16 --max-tokens 64
    python -m bench.serve --servers dovetail,dovetail-no-cache --concurrency 1,4   # our prefix cache on vs off
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shlex
import signal
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
WARM_UP = [{"role": "user", "content": "Say hello."}]
SERVERS = ("dovetail", "llama-cpp-python", "llama-server")
# Not run by default: our server with its prefix cache off (--no-cache-args), beside the default one.
OPTIONAL_SERVERS = ("dovetail-no-cache",)
LLAMA_SERVER = Path.home() / ".cache" / "dovetail" / "llama-server" / "llama-server"  # bench/build_llama_server.sh


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(name: str, gguf: Path, cpus: list[int], port: int, *, max_active: int, n_ctx: int,
                   dovetail_args: str = "", no_cache_args: str = "--no-prefix-cache",
                   llama_server: str | Path = LLAMA_SERVER, llama_server_args: str = "",
                   extra_buffers: bool = True) -> list[str]:
    """The command line that starts server ``name`` on 127.0.0.1:``port``, ``len(cpus)`` threads."""
    if name in ("dovetail", "dovetail-no-cache"):
        extra = shlex.split(dovetail_args) + (shlex.split(no_cache_args) if name == "dovetail-no-cache" else [])
        return [sys.executable, "-m", "dovetail.cli", "serve", "--port", str(port), "--target", str(gguf),
                "--served-model-name", SERVED, "--max-active", str(max_active),
                "--max-pending", str(max_active * 4), "--target-cpus", format_cpus(cpus), *extra]
    if name == "llama-cpp-python":
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", SERVED,
                "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(len(cpus)),
                "--n_threads_batch", str(len(cpus)), "--n_ctx", str(n_ctx),
                # by default a new request interrupts the one streaming (abetlen/llama-cpp-python#897):
                # queue them instead, one at a time, as its docs advise for several clients
                "--interrupt_requests", "False"]
    if name == "llama-server":
        # as bench.suffix's ServerSystem: one slot (requests queue, like llama-cpp-python's), its
        # prompt cache on (its default), extra buffers as our workers decide them
        cmd = [str(llama_server), "-m", str(gguf), "--alias", SERVED, "-t", str(len(cpus)), "-tb", str(len(cpus)),
               "-c", str(n_ctx), "--host", "127.0.0.1", "--port", str(port), "-np", "1"]
        if not extra_buffers:
            cmd.append("--no-repack")
        return cmd + shlex.split(llama_server_args)
    raise ValueError(f"unknown server {name!r}: one of {SERVERS + OPTIONAL_SERVERS}")


def ready_path(name: str) -> str:
    """What answers 200 once the server can take requests (llama-server answers /health 503 while loading)."""
    return "/health" if name == "llama-server" else "/v1/models"


def missing_server(name: str, llama_server: str | Path) -> str | None:
    """Why ``name`` cannot run here, or None."""
    if name == "llama-server" and not (os.path.isfile(llama_server) and os.access(llama_server, os.X_OK)):
        return f"no llama-server at {llama_server} (bash bench/build_llama_server.sh builds it)"
    if name == "llama-cpp-python":
        import importlib.util
        if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llama_cpp.server") is None:
            return 'no llama_cpp.server (pip install -e ".[bench]")'
    return None


def extra_buffers_for(gguf: Path, threads: int) -> bool:
    """The extra-buffer setting our llama.cpp workers take on this GGUF (their cached probe verdict)."""
    from dovetail.workers.llama_buffers import decide
    return decide("auto", str(gguf), threads).extra_buffers


def launch(cmd: list[str], cpus: list[int], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            preexec_fn=lambda: os.sched_setaffinity(0, cpus))


def start_server(name: str, args, gguf: Path, cpus: list[int], port: int, log_path: Path) -> subprocess.Popen:
    """Server ``name`` started (not yet ready); its command line in ``proc.args``."""
    cmd = server_command(name, gguf, cpus, port, max_active=max(args.levels), n_ctx=args.n_ctx,
                         dovetail_args=args.dovetail_args, no_cache_args=args.no_cache_args,
                         llama_server=args.llama_server, llama_server_args=args.llama_server_args,
                         extra_buffers=extra_buffers_for(gguf, len(cpus)) if name == "llama-server" else True)
    return launch(cmd, cpus, log_path)


def wait_ready(proc: subprocess.Popen, port: int, log_path: Path, path: str = "/v1/models") -> None:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", path)
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
    text, usage, cached, prefill, verify = [], None, None, None, None
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
            reused = cached_tokens_of(event)
            cached = reused if reused is not None else cached
            spent = prefill_seconds_of(event)
            prefill = spent if spent is not None else prefill
            verify = (event.get("dovetail") or {}).get("verify_seconds", verify)
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
            "usage_reported": usage is not None, "prompt_tokens": (usage or {}).get("prompt_tokens"),
            "cached_tokens": cached, "prefill_s": prefill, "verify_s": verify}


def prefill_seconds_of(event: dict) -> float | None:
    """The seconds the server says it spent on the prompt: our ``dovetail`` object's
    prefill_seconds or llama-server's timings.prompt_ms; None where the event says nothing."""
    ours = (event.get("dovetail") or {}).get("prefill_seconds")
    theirs = (event.get("timings") or {}).get("prompt_ms")
    for value, scale in ((ours, 1.0), (theirs, 1e-3)):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value) * scale
    return None


def cached_tokens_of(event: dict) -> int | None:
    """The prompt tokens a stream event says the server reused from its cache: OpenAI's
    usage.prompt_tokens_details.cached_tokens, our ``dovetail`` object's cached_tokens, or
    llama-server's timings.cache_n; None where the event says nothing about it."""
    details = (event.get("usage") or {}).get("prompt_tokens_details") or {}
    for value in (details.get("cached_tokens"), (event.get("dovetail") or {}).get("cached_tokens"),
                  (event.get("timings") or {}).get("cache_n")):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return int(value)
    return None


def run_level(port: int, prompts: list, concurrency: int, n_requests: int, max_tokens: int, count_tokens) -> dict:
    jobs = [prompts[i % len(prompts)] for i in range(n_requests)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda m: one_request(port, m, max_tokens, count_tokens), jobs))
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    ttft = [r["ttft_s"] for r in ok]
    itl = [r["itl_s"] for r in ok if r["itl_s"] is not None]
    cached = [r["cached_tokens"] for r in ok if r.get("cached_tokens") is not None]
    prompt = [r["prompt_tokens"] for r in ok if r.get("prompt_tokens") is not None]
    # the time to first token past the server's own prefill seconds: its per-request overhead
    beyond = [r["ttft_s"] - r["prefill_s"] for r in ok if r.get("prefill_s") is not None]
    verified = [r for r in ok if r.get("verify_s") is not None]  # ours: the target's verify seconds
    return {"concurrency": concurrency, "requests": n_requests, "ok": len(ok), "seconds": wall,
            "prompt_tokens": sum(prompt) if prompt else None, "cached_tokens": sum(cached) if cached else None,
            "tokens": sum(r["tokens"] for r in ok), "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "itl_p50_s": pct(itl, 50),
            "itl_p99_s": pct(itl, 99), "ttft_past_prefill_p50_s": pct(beyond, 50),
            "verify_s_per_token": (sum(r["verify_s"] for r in verified) / sum(r["tokens"] for r in verified)
                                   if verified and sum(r["tokens"] for r in verified) else None),
            "errors": [r["error"] for r in results if "error" in r][:3],
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
    lines = ["| server | concurrency | requests | tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 "
             "| cached prompt tokens |",
             "|---|---|---|---|---|---|---|---|---|"]
    ms = lambda v: "-" if v is None else f"{1000 * v:.0f} ms"  # noqa: E731
    for name, levels in rows.items():
        for r in levels:
            cached = "-" if r.get("cached_tokens") is None else f"{r['cached_tokens']}/{r.get('prompt_tokens') or '?'}"
            lines.append(f"| {name} | {r['concurrency']} | {r['ok']}/{r['requests']} | {r['tokens_per_s']:.1f} | "
                         f"{ms(r['ttft_p50_s'])} | {ms(r['ttft_p99_s'])} | {ms(r['itl_p50_s'])} | "
                         f"{ms(r['itl_p99_s'])} | {cached} |")
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
    p.add_argument("--n-ctx", type=int, default=8192,
                   help="llama-cpp-python's and llama-server's context (ours: --llama-ctx, default 8192)")
    p.add_argument("--servers", default=",".join(SERVERS),
                   help=f"comma list of {SERVERS + OPTIONAL_SERVERS} (default: {','.join(SERVERS)}); "
                        "dovetail-no-cache is ours with --no-cache-args added")
    p.add_argument("--dovetail-args", default="", help="more flags for dovetail-launch serve, one string "
                                                       "(both dovetail and dovetail-no-cache)")
    p.add_argument("--no-cache-args", default="--no-prefix-cache",
                   help="flags that turn our prefix cache off, for dovetail-no-cache (default: --no-prefix-cache)")
    p.add_argument("--llama-server", default=str(LLAMA_SERVER),
                   help=f"llama.cpp's llama-server binary (default: {LLAMA_SERVER}, from bash "
                        "bench/build_llama_server.sh)")
    p.add_argument("--llama-server-args", default="",
                   help="more flags for llama-server, one string (e.g. '-np 4' for slots beyond the default one)")
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
    skipped: dict[str, str] = {}
    commands: dict[str, str] = {}
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    for name in names:
        if name not in SERVERS + OPTIONAL_SERVERS:
            raise SystemExit(f"--servers: unknown server {name!r}: one of {SERVERS + OPTIONAL_SERVERS}")
    for name in names:
        why = missing_server(name, args.llama_server)
        if why:
            print(f"{name}: skipped: {why}", file=sys.stderr, flush=True)
            skipped[name] = why
            continue
        port, log_path = free_port(), out_dir / f"{tag}-{name}.log"
        print(f"{name}: starting on CPUs {format_cpus(cpus)} (log: {log_path})", file=sys.stderr, flush=True)
        proc = start_server(name, args, gguf, cpus, port, log_path)
        commands[name] = shlex.join(proc.args)
        try:
            wait_ready(proc, port, log_path, ready_path(name))
            # warm-up: first-call costs out of the figures; a prompt of its own, so that no measured
            # request finds its whole prompt in a server's cache because of it
            one_request(port, WARM_UP, 8, count_tokens)
            rows[name] = []
            for c in args.levels:
                n = args.requests or max(4, 2 * c)
                rows[name].append(run_level(port, prompts, c, n, args.max_tokens, count_tokens))
                r = rows[name][-1]
                past = r["ttft_past_prefill_p50_s"]
                per = r["verify_s_per_token"]
                print(f"{name} c={c}: {r['tokens_per_s']:.1f} tok/s, {r['ok']}/{n} ok"
                      + (f", TTFT past the server's prefill p50 {1000 * past:.1f} ms" if past is not None else "")
                      + (f", target verify {1000 * per:.1f} ms a token" if per is not None else ""),
                      file=sys.stderr, flush=True)
        finally:
            stop_server(proc)
    if not rows:
        raise SystemExit("no server ran")
    first = next(iter(rows))
    same_vs = {n: sum(x == y for x, y in zip(rows[first][0]["texts"], rows[n][0]["texts"])
                      if x is not None and y is not None) for n in rows if n != first}
    same = next(iter(same_vs.values())) if len(rows) == 2 else None
    record = {"machine": f"{cpu_model()}, {len(cpus)} CPUs", "target": str(gguf), "max_tokens": args.max_tokens,
              "dovetail_args": args.dovetail_args, "prompts": len(prompts), "skipped": skipped,
              "commands": commands,
              "same_text_at_concurrency_1": same,
              "same_text_at_concurrency_1_vs": {"reference": first, "same": same_vs},
              "requests_at_concurrency_1": len(next(iter(rows.values()))[0]["texts"]),
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
    if same_vs:
        print(f"\nsame text as {first} at concurrency 1: " + ", ".join(
            f"{name} {count}/{record['requests_at_concurrency_1']}" for name, count in same_vs.items()))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    return 0


if __name__ == "__main__":
    # A SIGTERM unwinds like Ctrl-C, through the `finally` that stops the server being measured.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
