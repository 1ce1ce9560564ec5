"""python -m bench.soak: mixed load and abuse on `dovetail-launch serve` for a long while.

Starts `dovetail-launch serve` (with a random --api-key) and drives it for --duration seconds
(default 20 minutes) from asyncio + httpx2 (the HTTP client the openai SDK uses):

- --concurrency short-prompt clients (ShareGPT first turns, or --prompts-file), each sending
  one request after another: streamed and not; a --disconnect-share of them (10%) leave
  early: before the first token (after a random short wait), mid-stream (after 1-8 tokens),
  or, not streamed, before the answer;
- one long-prompt client: a prompt of --long-tokens tokens (HumanEval problems pasted one
  after another, or --long-text-file), streamed or not, 10% abandoned mid-prefill, then a
  --long-pause;
- one abuse client, every --abuse-interval seconds the next of: an --oversize-mb body
  (expected 413), bad JSON (400), a wrong key and no key (401), JSON sent as text/plain (415).

Every status that comes back is counted, expected or not. While it runs, the server's RSS
and open file descriptors (the server process and its workers, psutil) are sampled every
--sample-interval seconds. It reports:

- requests served, refused, disconnected and failed, by result (HTTP status) and by kind;
  errors sent inside a started stream (a 200 whose events end in an error) by type;
- 500s: HTTP 500 answers plus `server_error` events inside streams;
- the worst inter-token gap of short streams while a long prompt prefills (the time between
  two SSE chunks with text, timed as they arrive; `: keep-alive` comments are counted but are
  not tokens; a stream that dies counts its silence up to its end), and their worst time to
  first token then;
- RSS and file descriptors over time (soak.png), and RSS growth: the median of the last
  --rss-window seconds under load against the median of the --rss-window seconds after
  --warmup (default: the first minute);
- `dovetail:worker_open_requests` from /metrics once the load has stopped (polled for up to
  --settle seconds): it must reach 0.

Writes soak.json, soak.png and server.log to bench/results/<--name>/ and prints a table.
Exits 1 if there was any 500, open requests at the end are not 0, RSS grew by
--max-rss-growth (5) % or more, or the server died (--warn-only: report, exit 0).

    python -m bench.soak                                   # 20 minutes on the 1.5B GGUF
    python -m bench.soak --duration 60 --cpus 1 --concurrency 2 --name soak-smoke
    python -m bench.soak --serve-args "--max-active 8" --no-draft --warn-only
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import secrets
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx

RESULTS = Path(__file__).parent / "results"
DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
SERVED = "soak"
START_S = 1800.0  # the first start fetches, converts and calibrates

SHORT_KINDS = ("short_stream", "short_nonstream", "short_disconnect_early", "short_disconnect_mid",
               "short_disconnect_nonstream")
LONG_KINDS = ("long_disconnect_early", "long_stream", "long_nonstream")  # the first three long requests, in order
ABUSE_EXPECTED = {"oversize": 413, "bad_json": 400, "bad_key": 401, "no_key": 401, "wrong_content_type": 415}
KINDS = (*SHORT_KINDS, *LONG_KINDS, *ABUSE_EXPECTED)
STREAMED = {"short_stream", "short_disconnect_early", "short_disconnect_mid", "long_stream", "long_disconnect_early"}
OPEN_GAUGE = "dovetail:worker_open_requests"
LONG_INTRO = ("Below are the opening lines of many Python functions. Say in one sentence what the last one "
              "does.\n\n")
FILLER = "The quick brown fox jumps over the lazy dog while the server keeps every stream moving. "


# ---- one request -------------------------------------------------------------------------------
@dataclass
class Rec:
    """One request as the client saw it; times are seconds from the start of the load."""
    kind: str
    lane: str
    t0: float
    t_end: float = 0.0
    status: int | None = None      # the HTTP status, where headers came
    result: str = ""               # "200", "413", ..., "disconnected", "cut_at_end", "error:<Exception>"
    tokens: list[float] = field(default_factory=list)  # arrival of each SSE chunk with text
    keepalives: int = 0            # SSE comment lines (": keep-alive")
    done: bool = False             # a stream reached "data: [DONE]"
    stream_error: str | None = None  # "type/code" of an error event inside a started stream
    error_code: str | None = None  # the error envelope's code (or type) of a refusal
    prompt_tokens: int | None = None

    @property
    def latency(self) -> float:
        return self.t_end - self.t0

    @property
    def category(self) -> str:
        """served | refused | disconnected | failed | cut_at_end."""
        if self.result in ("disconnected", "cut_at_end"):
            return self.result
        if self.result.startswith("error:") or self.stream_error:
            return "failed"
        if self.result.isdigit() and int(self.result) >= 400:
            return "refused"
        if self.kind in STREAMED and not self.done:
            return "failed"  # a 200 stream that ended without [DONE]
        return "served"


class Soak:
    """The load: lanes of clients sending requests until the deadline; every request a Rec."""

    def __init__(self, base_url: str, api_key: str, args, short_prompts: list, long_prompts: list[str],
                 server_pid: int | None = None):
        self.base, self.key, self.args = base_url, api_key, args
        self.short_prompts, self.long_prompts = short_prompts, long_prompts
        self.server_pid = server_pid
        self.recs: list[Rec] = []
        self.samples: list[dict] = []
        self.pids_seen: dict[int, str] = {}
        self.t_start = time.monotonic()  # again when the load starts (run)
        self.deadline = self.t_start + args.duration
        self.cover = deque(SHORT_KINDS)  # each short kind once, early, whatever the draw
        self.long_n = 0
        self.oversize = oversize_body(args.oversize_mb)
        self.sampling = True
        self.server_gone_at: float | None = None

    def now(self) -> float:
        return time.monotonic() - self.t_start

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    @property
    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"}

    def body(self, messages: list[dict], max_tokens: int, stream: bool, rng: random.Random) -> dict:
        greedy = rng.random() < 0.5
        b = {"model": SERVED, "messages": messages, "max_tokens": max_tokens,
             "temperature": 0.0 if greedy else 0.8, "stream": stream}
        if not greedy:
            b["seed"] = rng.randrange(1 << 30)
        if stream:
            b["stream_options"] = {"include_usage": True}
        return b

    # ---- the lanes ----------------------------------------------------------------------------
    async def short_lane(self, client: httpx.AsyncClient, lane: int) -> None:
        rng = random.Random(self.args.seed * 1000 + lane)
        while self.running():
            if self.cover:
                kind = self.cover.popleft()
            elif rng.random() < self.args.disconnect_share:
                kind = rng.choice(("short_disconnect_early", "short_disconnect_mid", "short_disconnect_nonstream"))
            else:
                kind = "short_stream" if rng.random() < self.args.stream_share else "short_nonstream"
            messages = rng.choice(self.short_prompts)
            await self.backoff(await self.chat(client, kind, f"short{lane}", messages, self.args.max_tokens, rng))

    async def long_lane(self, client: httpx.AsyncClient) -> None:
        rng = random.Random(self.args.seed * 1000 + 999)
        while self.running():
            if self.long_n < len(LONG_KINDS):
                kind = LONG_KINDS[self.long_n]
            elif rng.random() < self.args.disconnect_share:
                kind = "long_disconnect_early"
            else:
                kind = "long_stream" if rng.random() < self.args.stream_share else "long_nonstream"
            text = self.long_prompts[self.long_n % len(self.long_prompts)]  # they take turns: no prefix repeats soon
            self.long_n += 1
            await self.backoff(await self.chat(client, kind, "long", [{"role": "user", "content": text}],
                                               self.args.long_max_tokens, rng))
            await self.sleep(self.args.long_pause)

    async def abuse_lane(self, client: httpx.AsyncClient) -> None:
        rng = random.Random(self.args.seed * 1000 + 998)
        kinds = list(ABUSE_EXPECTED)
        rng.shuffle(kinds)
        i = 0
        while self.running():
            await self.abuse(client, kinds[i % len(kinds)], rng)
            i += 1
            await self.sleep(self.args.abuse_interval)

    async def backoff(self, rec: Rec) -> None:
        """As a real client would: wait a little after a 503/429 or a failed connection, rather
        than hammer a server that is full or down."""
        if rec.result in ("503", "429") or rec.result.startswith("error:"):
            await self.sleep(1.0)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, min(seconds, self.deadline - time.monotonic())))

    async def sampler(self) -> None:
        while self.sampling:
            if self.server_pid is not None:
                s = await asyncio.to_thread(sample_tree, self.server_pid)
                if s is None and self.server_gone_at is None:  # it died: stop the load now
                    self.server_gone_at = round(self.now(), 3)
                    self.deadline = min(self.deadline, time.monotonic())
                if s is not None:
                    s["t"] = round(self.now(), 3)
                    self.pids_seen.update({int(k): v for k, v in s.pop("pids").items()})
                    self.samples.append(s)
            await asyncio.sleep(self.args.sample_interval)

    # ---- requests -----------------------------------------------------------------------------
    async def chat(self, client, kind: str, lane: str, messages: list[dict], max_tokens: int,
                   rng: random.Random) -> Rec:
        rec = Rec(kind, lane, self.now())
        self.recs.append(rec)
        stream = kind in STREAMED
        body = self.body(messages, max_tokens, stream, rng)
        long = kind.startswith("long")
        try:
            if kind.endswith("disconnect_early"):  # leave at a random moment before the first token
                cutoff = rng.uniform(*((1.0, 10.0) if long else (0.05, 1.0)))
                try:
                    async with asyncio.timeout(cutoff):
                        await self.read_stream(client, body, rec, leave_after_tokens=1)
                except TimeoutError:
                    rec.result = "disconnected"
            elif kind == "short_disconnect_mid":
                await self.read_stream(client, body, rec, leave_after_tokens=rng.randint(1, 8))
            elif kind == "short_disconnect_nonstream":
                try:
                    async with asyncio.timeout(rng.uniform(0.2, 2.0)):
                        await self.post(client, rec, json=body, headers=self.auth)
                except TimeoutError:
                    rec.result = "disconnected"
            elif stream:
                await self.read_stream(client, body, rec)
            else:
                await self.post(client, rec, json=body, headers=self.auth)
        except asyncio.CancelledError:
            rec.result, rec.t_end = "cut_at_end", self.now()
            raise
        except httpx.HTTPError as e:
            rec.result = f"error:{type(e).__name__}"
        except (ValueError, KeyError) as e:  # a malformed answer
            rec.result = f"error:{type(e).__name__}"
        rec.t_end = rec.t_end or self.now()
        return rec

    async def read_stream(self, client, body: dict, rec: Rec, leave_after_tokens: int | None = None) -> None:
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=self.auth) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                refused(rec, resp.status_code, await resp.aread())
                rec.t_end = self.now()
                return
            async for line in resp.aiter_lines():
                t = self.now()
                if not line:
                    continue
                if line.startswith(":"):
                    rec.keepalives += 1
                    continue
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    rec.done = True
                    break
                event = json.loads(data)
                if event.get("error"):
                    err = event["error"]
                    rec.stream_error = f"{err.get('type')}/{err.get('code')}"
                    continue
                if event.get("usage"):
                    rec.prompt_tokens = event["usage"].get("prompt_tokens")
                if any((c.get("delta") or {}).get("content") or c.get("text") for c in event.get("choices") or []):
                    rec.tokens.append(t)
                    if leave_after_tokens is not None and len(rec.tokens) >= leave_after_tokens:
                        rec.result, rec.t_end = "disconnected", self.now()
                        return  # leaving the block closes the connection mid-stream
            rec.result, rec.t_end = str(resp.status_code), self.now()

    async def post(self, client, rec: Rec, **kw) -> None:
        resp = await client.post("/v1/chat/completions", **kw)
        rec.status, rec.t_end = resp.status_code, self.now()
        if resp.status_code != 200:
            refused(rec, resp.status_code, resp.content)
            return
        answer = resp.json()
        rec.result = "200"
        rec.prompt_tokens = (answer.get("usage") or {}).get("prompt_tokens")
        if not answer.get("choices"):
            raise ValueError("no choices")

    async def abuse(self, client, kind: str, rng: random.Random) -> Rec:
        rec = Rec(kind, "abuse", self.now())
        self.recs.append(rec)
        small = self.body(rng.choice(self.short_prompts), 8, False, rng)  # the body a server that lets it in runs
        json_h = {"Content-Type": "application/json"}
        try:
            if kind == "oversize":
                await self.post(client, rec, content=self.oversize, headers={**self.auth, **json_h})
            elif kind == "bad_json":
                raw = json.dumps(small).encode()
                await self.post(client, rec, content=raw[: len(raw) // 2], headers={**self.auth, **json_h})
            elif kind == "bad_key":
                await self.post(client, rec, json=small, headers={"Authorization": "Bearer wrong-" + secrets.token_hex(8)})
            elif kind == "no_key":
                await self.post(client, rec, json=small)
            elif kind == "wrong_content_type":
                await self.post(client, rec, content=json.dumps(small).encode(),
                                headers={**self.auth, "Content-Type": "text/plain"})
            else:
                raise ValueError(f"unknown abuse kind {kind!r}")
        except asyncio.CancelledError:
            rec.result, rec.t_end = "cut_at_end", self.now()
            raise
        except httpx.HTTPError as e:
            rec.result = f"error:{type(e).__name__}"
        except ValueError as e:
            rec.result = f"error:{type(e).__name__}"
        rec.t_end = rec.t_end or self.now()
        return rec

    # ---- the whole run ------------------------------------------------------------------------
    async def run(self) -> dict:
        a = self.args
        timeout = httpx.Timeout(connect=30.0, read=a.client_timeout, write=a.client_timeout, pool=None)
        limits = httpx.Limits(max_connections=a.concurrency + 8, max_keepalive_connections=a.concurrency + 8)
        async with httpx.AsyncClient(base_url=self.base, timeout=timeout, limits=limits, trust_env=False) as client:
            self.t_start = time.monotonic()
            self.deadline = self.t_start + a.duration
            sampler = asyncio.create_task(self.sampler())
            lanes = [asyncio.create_task(self.short_lane(client, i)) for i in range(a.concurrency)]
            if a.long_tokens > 0:
                lanes.append(asyncio.create_task(self.long_lane(client)))
            if a.abuse_interval > 0:
                lanes.append(asyncio.create_task(self.abuse_lane(client)))
            await asyncio.wait(lanes, timeout=a.duration + a.drain)  # in-flight requests may finish
            t_load_end = min(self.now(), self.deadline - self.t_start)  # no new request after the deadline
            t_drained = self.now()
            for task in lanes:
                task.cancel()  # still running after the drain: cut (the client leaves)
            await asyncio.gather(*lanes, return_exceptions=True)
            t_stopped = self.now()
            metrics_end = await self.settle(client)
            await asyncio.sleep(a.sample_interval)  # one sample with no load
            self.sampling = False
            await sampler
        for task in lanes:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()
        return {"t_load_end": t_load_end, "t_drained": t_drained, "t_stopped": t_stopped, "metrics_end": metrics_end,
                "server_gone_at": self.server_gone_at}

    async def settle(self, client) -> dict:
        """/metrics after the load, polled until the workers hold no request (or --settle s)."""
        t0 = self.now()
        out = {"gauge": None, "open_requests": None, "by_worker": {}, "settle_s": None, "scrapes": 0,
               "num_requests_running": None, "num_requests_waiting": None, "error": None}
        while self.server_gone_at is None:
            try:
                resp = await client.get("/metrics", headers=self.auth, timeout=30.0)
                out["scrapes"] += 1
                if resp.status_code != 200:
                    out["error"] = f"HTTP {resp.status_code}"
                else:
                    out["error"] = None
                    text = resp.text
                    gauge, values = open_requests(text)
                    out.update(gauge=gauge, by_worker=values, open_requests=sum(values.values()) if values else None,
                               num_requests_running=metric_value(text, "dovetail:num_requests_running"),
                               num_requests_waiting=metric_value(text, "dovetail:num_requests_waiting"))
                    if out["open_requests"] == 0:
                        out["settle_s"] = round(self.now() - t0, 3)
                        return out
            except httpx.HTTPError as e:
                out["error"] = f"{type(e).__name__}: {e}"
            if self.now() - t0 >= self.args.settle:
                return out
            await asyncio.sleep(0.5)
        out["error"] = f"the server died at {self.server_gone_at} s"
        return out


def refused(rec: Rec, status: int, body: bytes) -> None:
    rec.result = str(status)
    try:
        err = json.loads(body).get("error") or {}
        rec.error_code = err.get("code") or err.get("type")
    except (ValueError, AttributeError):
        rec.error_code = None


def oversize_body(mb: float) -> bytes:
    """A well-formed chat request of ``mb`` MB: one huge user message."""
    head = json.dumps({"model": SERVED, "max_tokens": 8, "messages": [{"role": "user", "content": "@"}]}).encode()
    pre, post = head.split(b"@")
    n = max(0, int(mb * 1e6) - len(pre) - len(post))
    filler = FILLER.encode()
    return pre + (filler * (n // len(filler) + 1))[:n] + post


# ---- the server --------------------------------------------------------------------------------
def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(args, port: int, key: str, cpus: list[int] | None) -> list[str]:
    from dovetail.system.cpus import format_cpus
    cmd = [sys.executable, "-m", "dovetail.cli", "serve", "--port", str(port), "--target", str(args.target),
           "--api-key", key, "--served-model-name", SERVED]
    if args.no_draft:
        cmd.append("--no-draft")
    elif args.draft:
        cmd += ["--draft", args.draft]
    if cpus:
        cmd += ["--target-cpus", format_cpus(cpus)]
    return cmd + shlex.split(args.serve_args)


def start_server(cmd: list[str], cpus: list[int] | None, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "wb")
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    finally:
        log.close()  # the child has its own copy


def wait_ready(proc: subprocess.Popen, base: str, log_path: Path, start_s: float = START_S) -> None:
    deadline = time.monotonic() + start_s
    with httpx.Client(base_url=base, timeout=5.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited {proc.returncode}:\n{tail(log_path)}")
            try:
                if client.get("/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    raise RuntimeError(f"not ready within {start_s:g} s:\n{tail(log_path)}")


def warm_up(base: str, key: str, messages: list[dict]) -> None:
    """One small request before the clock starts: the first one pays for lazy set-up."""
    with httpx.Client(base_url=base, timeout=600.0, trust_env=False) as client:
        resp = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                           json={"model": SERVED, "messages": messages, "max_tokens": 4, "temperature": 0})
        if resp.status_code != 200:
            raise RuntimeError(f"the warm-up request got HTTP {resp.status_code}: {resp.text[:500]}")


def stop_server(proc: subprocess.Popen, grace_s: float = 60.0) -> int | None:
    """SIGTERM (the server closes its workers), then SIGKILL for it and any worker left."""
    import psutil
    if proc.poll() is None:
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        _, alive = psutil.wait_procs(children, timeout=15)
        for child in alive:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
    return proc.returncode


def tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def sample_tree(pid: int) -> dict | None:
    """RSS and open fds of the server process and its descendants (the workers)."""
    import psutil
    try:
        root = psutil.Process(pid)
        if root.status() == psutil.STATUS_ZOMBIE:  # exited, not yet reaped
            return None
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    per, pids = {}, {}
    for p in procs:
        try:
            with p.oneshot():
                rss, fds, cmd = p.memory_info().rss, p.num_fds(), " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        m = re.search(r"dovetail\.workers\.(\w+)", cmd)
        label = "server" if p.pid == pid else (m.group(1) if m else f"{p.name()}-{p.pid}")
        if label in per:
            label = f"{label}-{p.pid}"
        per[label] = {"rss_mb": round(rss / 2**20, 2), "fds": fds}
        pids[p.pid] = label
    return {"rss_mb": round(sum(v["rss_mb"] for v in per.values()), 2), "fds": sum(v["fds"] for v in per.values()),
            "procs": per, "pids": pids}


# ---- /metrics ----------------------------------------------------------------------------------
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str) -> list[tuple[str, str, float]]:
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            try:
                v = float(m.group(3))
                out.append((m.group(1), m.group(2) or "", int(v) if v.is_integer() else v))
            except ValueError:
                pass
    return out


def open_requests(text: str) -> tuple[str | None, dict[str, float]]:
    """The worker open-requests gauge: (its name, {worker label: value}); the name
    dovetail:worker_open_requests, else any gauge named *open_requests."""
    samples = parse_metrics(text)
    names = [n for n, _, _ in samples]
    name = OPEN_GAUGE if OPEN_GAUGE in names else next((n for n in names if n.endswith("open_requests")), None)
    values = {}
    for n, labels, v in samples:
        if n == name:
            m = re.search(r'worker="([^"]*)"', labels)
            values[m.group(1) if m else labels or "all"] = v
    return name, values


def metric_value(text: str, name: str) -> float | None:
    return next((v for n, labels, v in parse_metrics(text) if n == name and not labels), None)


# ---- the report --------------------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def r3(x):
    return None if x is None else round(x, 3)


def prefill_windows(recs: list[Rec]) -> list[tuple[float, float]]:
    """When a long prompt was (or may have been) prefilling: from its send to its first token;
    not streamed, or left before any token: to its end."""
    out = []
    for r in recs:
        if r.kind.startswith("long") and r.t_end > r.t0:
            out.append((r.t0, r.tokens[0] if r.tokens else r.t_end))
    return out


def gaps_report(recs: list[Rec]) -> dict:
    windows = prefill_windows(recs)

    def during(a: float, b: float) -> bool:
        return any(w0 < b and a < w1 for w0, w1 in windows)

    gaps, during_gaps, ttft, during_ttft = [], [], [], []
    worst = None
    for r in recs:
        if not (r.kind.startswith("short") and r.kind in STREAMED) or r.status != 200:
            continue
        ticks = list(r.tokens)
        if ticks and (r.stream_error or r.result.startswith("error:") or (r.result == "200" and not r.done)):
            ticks.append(r.t_end)  # it died: the silence up to its end is a gap too
        for a, b in zip(ticks, ticks[1:]):
            gaps.append(b - a)
            if during(a, b):
                during_gaps.append(b - a)
                if worst is None or b - a > worst["gap_s"]:
                    worst = {"gap_s": round(b - a, 3), "at_s": round(a, 3), "kind": r.kind, "lane": r.lane}
        if r.tokens:
            ttft.append(r.tokens[0] - r.t0)
            if during(r.t0, r.tokens[0]):
                during_ttft.append(r.tokens[0] - r.t0)
    lengths = [w1 - w0 for w0, w1 in windows]
    return {"short_streams": sum(1 for r in recs if r.kind.startswith("short") and r.kind in STREAMED),
            "gaps": len(gaps), "gap_p50_s": r3(pct(gaps, 50)), "gap_p99_s": r3(pct(gaps, 99)),
            "worst_gap_s": r3(max(gaps, default=None)),
            "gaps_during_prefill": len(during_gaps), "gap_p99_during_prefill_s": r3(pct(during_gaps, 99)),
            "worst_gap_during_prefill_s": r3(max(during_gaps, default=None)), "worst_gap_during_prefill": worst,
            "ttft_p50_s": r3(pct(ttft, 50)), "worst_ttft_s": r3(max(ttft, default=None)),
            "worst_ttft_during_prefill_s": r3(max(during_ttft, default=None)),
            "prefill_windows": len(windows), "prefill_p50_s": r3(pct(lengths, 50)),
            "prefill_max_s": r3(max(lengths, default=None)),
            "keepalive_comments": sum(r.keepalives for r in recs)}


def requests_report(recs: list[Rec]) -> dict:
    by_kind = {}
    for kind in KINDS:
        rs = [r for r in recs if r.kind == kind]
        lat = [r.latency for r in rs if r.result not in ("cut_at_end",)]
        cats = Counter(r.category for r in rs)
        by_kind[kind] = {
            "sent": len(rs), "by_result": dict(sorted(Counter(r.result for r in rs).items())),
            **{c: cats.get(c, 0) for c in ("served", "refused", "disconnected", "failed", "cut_at_end")},
            "expected_status": ABUSE_EXPECTED.get(kind),
            "as_expected": (sum(r.result == str(ABUSE_EXPECTED[kind]) for r in rs) if kind in ABUSE_EXPECTED
                            else None),
            "error_codes": dict(Counter(r.error_code for r in rs if r.error_code)),
            "stream_errors": dict(Counter(r.stream_error for r in rs if r.stream_error)),
            "left_before_first_token": (sum(r.result == "disconnected" and not r.tokens for r in rs)
                                        if "disconnect" in kind else None),
            "prompt_tokens_max": max((r.prompt_tokens for r in rs if r.prompt_tokens), default=None),
            "latency_p50_s": r3(pct(lat, 50)), "latency_max_s": r3(max(lat, default=None))}
    cats = Counter(r.category for r in recs)
    stream_errors = Counter(r.stream_error for r in recs if r.stream_error)
    http_500 = sum(r.result == "500" for r in recs)
    in_stream_500 = sum(n for e, n in stream_errors.items() if e.startswith("server_error"))
    return {"total": len(recs), **{c: cats.get(c, 0) for c in ("served", "refused", "disconnected", "failed",
                                                             "cut_at_end")},
            "by_result": dict(sorted(Counter(r.result for r in recs).items())),
            "by_http_status": dict(sorted(Counter(str(r.status) for r in recs if r.status is not None).items())),
            "stream_errors": dict(stream_errors), "http_500": http_500, "in_stream_500": in_stream_500,
            "errors_500": http_500 + in_stream_500, "by_kind": by_kind}


def resources_report(samples: list[dict], warmup: float, window: float, t_load_end: float) -> dict:
    """RSS/fds: the median of the ``window`` s after ``warmup`` against that of the last
    ``window`` s under load."""
    load = [s for s in samples if s["t"] <= t_load_end]
    if not load:
        return {"samples": len(samples), "baseline_rss_mb": None, "final_rss_mb": None, "rss_growth_pct": None}
    base = [s for s in load if warmup <= s["t"] <= warmup + window] or [min(load, key=lambda s: abs(s["t"] - warmup))]
    last = [s for s in load if s["t"] >= t_load_end - window] or load[-1:]
    b_rss = statistics.median(s["rss_mb"] for s in base)
    f_rss = statistics.median(s["rss_mb"] for s in last)
    procs = sorted({p for s in samples for p in s["procs"]})
    return {"samples": len(samples), "warmup_s": warmup, "window_s": window,
            "baseline_rss_mb": round(b_rss, 1), "final_rss_mb": round(f_rss, 1),
            "rss_growth_pct": round(100 * (f_rss - b_rss) / b_rss, 2) if b_rss else None,
            "peak_rss_mb": round(max(s["rss_mb"] for s in samples), 1),
            "idle_rss_mb": samples[-1]["rss_mb"],
            "baseline_fds": statistics.median(s["fds"] for s in base),
            "final_fds": statistics.median(s["fds"] for s in last), "peak_fds": max(s["fds"] for s in samples),
            "idle_fds": samples[-1]["fds"],
            "by_process": {p: {"baseline_rss_mb": _median(base, p, "rss_mb"), "final_rss_mb": _median(last, p, "rss_mb"),
                               "baseline_fds": _median(base, p, "fds"), "final_fds": _median(last, p, "fds")}
                           for p in procs}}


def _median(samples: list[dict], proc: str, key: str):
    xs = [s["procs"][proc][key] for s in samples if proc in s["procs"]]
    return round(statistics.median(xs), 1) if xs else None


def checks(report: dict, max_growth: float) -> dict[str, tuple[bool, str]]:
    req, res, end = report["requests"], report["resources"], report["metrics_end"]
    growth = res.get("rss_growth_pct")
    open_n = end.get("open_requests")
    return {
        "no_500s": (req["errors_500"] == 0, f"{req['http_500']} HTTP 500 and {req['in_stream_500']} server_error "
                                            "events in streams"),
        "no_open_requests_at_end": (open_n == 0, f"{end.get('gauge') or OPEN_GAUGE} = {open_n} "
                                                 f"{end.get('by_worker') or ''} after {report['args']['settle']:g} s"
                                    + (f" ({end['error']})" if end.get("error") else "")),
        "rss_growth_below_limit": (growth is not None and growth < max_growth,
                                   f"RSS growth {growth} % (limit {max_growth:g} %)"),
        "server_alive": (report["server"]["alive_after_load"],
                         "the server process ran through the load" if report["server"]["alive_after_load"] else
                         f"the server died (at {report['server']['gone_at_s']} s, exit code "
                         f"{report['server']['exit_code']}): see server.log"),
    }


def plot(path: Path, samples: list[dict], windows: list[tuple[float, float]], warmup: float, t_load_end: float,
         title: str) -> Path | None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install matplotlib for PNG plots)")
        return None
    fig = Figure(figsize=(9.0, 6.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax_rss, ax_fds = fig.subplots(2, 1, sharex=True)
    ts = [s["t"] for s in samples]
    procs = sorted({p for s in samples for p in s["procs"]})
    ax_rss.plot(ts, [s["rss_mb"] for s in samples], label="all", color="black", linewidth=1.5)
    ax_fds.plot(ts, [s["fds"] for s in samples], label="all", color="black", linewidth=1.5)
    for p in procs:
        xs = [s["t"] for s in samples if p in s["procs"]]
        ax_rss.plot(xs, [s["procs"][p]["rss_mb"] for s in samples if p in s["procs"]], label=p, linewidth=1)
        ax_fds.plot(xs, [s["procs"][p]["fds"] for s in samples if p in s["procs"]], label=p, linewidth=1)
    for ax, label in ((ax_rss, "RSS (MB)"), (ax_fds, "open file descriptors")):
        for i, (w0, w1) in enumerate(windows):
            ax.axvspan(w0, w1, color="tab:orange", alpha=0.15, label="long prompt prefilling" if i == 0 else None)
        ax.axvline(warmup, color="gray", linestyle="--", linewidth=1, label="end of warm-up")
        ax.axvline(t_load_end, color="gray", linestyle=":", linewidth=1, label="load stops")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    ax_rss.set_title(title, fontsize="medium")
    ax_rss.legend(fontsize="small", loc="best")
    ax_fds.set_xlabel("seconds")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def table(report: dict) -> str:
    req, gaps, res, end = report["requests"], report["gaps"], report["resources"], report["metrics_end"]
    lines = [f"{'kind':27} {'sent':>5} {'served':>6} {'refused':>7} {'left':>5} {'failed':>6}  "
             f"{'p50 s':>7} {'max s':>7}  results"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for kind, k in req["by_kind"].items():
        results = ", ".join(f"{r} x{n}" for r, n in k["by_result"].items())
        if k["stream_errors"]:
            results += "; in stream: " + ", ".join(f"{e} x{n}" for e, n in k["stream_errors"].items())
        exp = f" (expect {k['expected_status']})" if k["expected_status"] else ""
        lines.append(f"{kind:27} {k['sent']:5d} {k['served']:6d} {k['refused']:7d} {k['disconnected']:5d} "
                     f"{k['failed']:6d}  {fmt(k['latency_p50_s']):>7} {fmt(k['latency_max_s']):>7}  {results}{exp}")
    lines.append(f"all: {req['total']} requests, {req['served']} served, {req['refused']} refused, "
                 f"{req['disconnected']} left by the client, {req['failed']} failed, {req['cut_at_end']} cut at the end")
    lines.append("HTTP statuses: " + ", ".join(f"{s} x{n}" for s, n in req["by_http_status"].items()))
    lines.append(f"500s: {req['errors_500']} ({req['http_500']} HTTP 500, {req['in_stream_500']} in streams)")
    lines.append(f"short streams: worst inter-token gap {fmt(gaps['worst_gap_s'])} s (p99 {fmt(gaps['gap_p99_s'])}); "
                 f"while a long prompt prefills ({gaps['prefill_windows']} prefills, up to "
                 f"{fmt(gaps['prefill_max_s'])} s): worst gap {fmt(gaps['worst_gap_during_prefill_s'])} s over "
                 f"{gaps['gaps_during_prefill']} gaps, worst TTFT {fmt(gaps['worst_ttft_during_prefill_s'])} s; "
                 f"keep-alive comments: {gaps['keepalive_comments']}")
    lines.append(f"RSS {fmt(res.get('baseline_rss_mb'))} -> {fmt(res.get('final_rss_mb'))} MB "
                 f"({res.get('rss_growth_pct')} %, peak {fmt(res.get('peak_rss_mb'))}); open fds "
                 f"{res.get('baseline_fds')} -> {res.get('final_fds')} (peak {res.get('peak_fds')})")
    lines.append(f"worker open requests after the load: {end.get('open_requests')} {end.get('by_worker') or ''}"
                 + (f" (0 after {end['settle_s']} s)" if end.get("settle_s") is not None else ""))
    for name, (ok, why) in report["checks"].items():
        lines.append(f"{'PASS' if ok else 'FAIL'} {name}: {why}")
    return "\n".join(lines)


# ---- prompts -----------------------------------------------------------------------------------
def short_prompts(args) -> list[list[dict]]:
    from dovetail.models.prompts import load_prompts_jsonl, load_sharegpt_chats
    if args.prompts_file:
        raw = load_prompts_jsonl(args.prompts_file)
        return [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in raw]
    return load_sharegpt_chats(limit=64, max_chars=600)


def long_prompts(args, n: int = 16) -> tuple[list[str], int | None]:
    """``n`` texts of about --long-tokens tokens each (each starting at a different place), and
    the first one's length in tokens where the target's tokenizer could be loaded."""
    if args.long_text_file:
        pieces = [p for p in Path(args.long_text_file).read_text().split("\n\n") if p.strip()]
    else:
        from dovetail.models.prompts import load_humaneval
        pieces = [p["prompt"] for p in load_humaneval()]
    count = chars_per_token = None
    try:
        from dovetail.models.fetch import resolve_model
        from dovetail.models.loading import load_tokenizer
        tok = load_tokenizer(resolve_model(args.target))
        count = lambda s: len(tok.encode(s, add_special_tokens=False))  # noqa: E731
    except Exception as e:  # noqa: BLE001 - a remote or odd target: estimate from characters
        print(f"soak: no tokenizer ({type(e).__name__}: {e}); long prompts sized at 3.4 characters a token",
              file=sys.stderr)
        chars_per_token = 3.4
    size = (lambda s: count(s)) if count else (lambda s: len(s) / chars_per_token)  # noqa: E731
    sizes = [size(p + "\n\n") for p in pieces]
    texts = []
    for i in range(n):
        start = (i * len(pieces)) // n
        parts, total, j = [], size(LONG_INTRO), 0
        while total < args.long_tokens:
            parts.append(pieces[(start + j) % len(pieces)])
            total += sizes[(start + j) % len(pieces)]
            j += 1
        texts.append(LONG_INTRO + "\n\n".join(parts))
    return texts, (count(texts[0]) if count else None)


# ---- main --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=DEFAULT_TARGET, help=f"the target: GGUF, HF folder or registry name "
                                                            f"(default: {DEFAULT_TARGET})")
    p.add_argument("--draft", default=None, help="the draft (default: serve's own default)")
    p.add_argument("--no-draft", action="store_true", help="serve with the target alone")
    p.add_argument("--cpus", default=None, help="CPUs for the server and its target, e.g. 0-1 (default: all)")
    p.add_argument("--serve-args", default="", help="more flags for dovetail-launch serve, one string")
    p.add_argument("--duration", type=float, default=1200.0, help="seconds of load (default: 1200)")
    p.add_argument("--concurrency", type=int, default=3,
                   help="short-prompt clients at once, beside one long-prompt and one abuse client (default: 3: "
                        "with the long one, serve's 4 active requests)")
    p.add_argument("--seed", type=int, default=0, help="seed of every client's choices (default: 0)")
    p.add_argument("--max-tokens", type=int, default=48, help="max_tokens of a short request (default: 48)")
    p.add_argument("--stream-share", type=float, default=0.6, help="share of requests streamed (default: 0.6)")
    p.add_argument("--disconnect-share", type=float, default=0.1,
                   help="share of requests the client leaves early (default: 0.1)")
    p.add_argument("--prompts-file", default=None, help="JSONL of short prompts, {'messages': [...]} or "
                                                        "{'prompt': ...} (default: ShareGPT first turns)")
    p.add_argument("--long-tokens", type=int, default=3000,
                   help="tokens of a long prompt (default: 3000; 0: no long prompts)")
    p.add_argument("--long-text-file", default=None,
                   help="text for the long prompts, pieces split at blank lines (default: HumanEval prompts)")
    p.add_argument("--long-max-tokens", type=int, default=16, help="max_tokens of a long request (default: 16)")
    p.add_argument("--long-pause", type=float, default=20.0,
                   help="seconds between one long request's end and the next one (default: 20)")
    p.add_argument("--abuse-interval", type=float, default=3.0,
                   help="seconds between abusive requests (default: 3; 0: none)")
    p.add_argument("--oversize-mb", type=float, default=50.0, help="size of the oversize body (default: 50 MB)")
    p.add_argument("--warmup", type=float, default=60.0,
                   help="seconds before the RSS baseline (default: 60; at most a third of --duration)")
    p.add_argument("--rss-window", type=float, default=30.0,
                   help="seconds of samples averaged (median) for the baseline and the final RSS (default: 30)")
    p.add_argument("--sample-interval", type=float, default=1.0, help="seconds between RSS/fd samples (default: 1)")
    p.add_argument("--drain", type=float, default=120.0,
                   help="seconds requests in flight at the end may take before they are cut (default: 120)")
    p.add_argument("--settle", type=float, default=120.0,
                   help="seconds to wait for 0 open requests after the load (default: 120)")
    p.add_argument("--client-timeout", type=float, default=900.0,
                   help="seconds a client waits for bytes before it gives up (default: 900)")
    p.add_argument("--max-rss-growth", type=float, default=5.0, help="RSS growth that fails the run, in %% (default: 5)")
    p.add_argument("--warn-only", action="store_true", help="report failed checks but exit 0")
    p.add_argument("--name", default=None, help="results folder name (default: soak-<N>core)")
    p.add_argument("--out", default=str(RESULTS), help="parent folder of the results (default: bench/results)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from dovetail.system.cpus import cpu_model, format_cpus, parse_cpus
    if args.concurrency < 1 or args.duration <= 0:
        raise SystemExit("need --concurrency >= 1 and --duration > 0")
    warmup = min(args.warmup, args.duration / 3)
    window = min(args.rss_window, max(args.duration / 10, args.sample_interval))
    cpus = parse_cpus(args.cpus)
    n_cpus = len(cpus or os.sched_getaffinity(0))
    out_dir = Path(args.out) / (args.name or f"soak-{n_cpus}core")
    out_dir.mkdir(parents=True, exist_ok=True)
    shorts = short_prompts(args)
    longs, long_len = long_prompts(args) if args.long_tokens > 0 else ([], None)
    key = "soak-" + secrets.token_hex(16)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = out_dir / "server.log"
    cmd = server_command(args, port, key, cpus)
    print(f"soak: starting the server (log: {log_path})", file=sys.stderr, flush=True)
    proc = start_server(cmd, cpus, log_path)
    soak = None
    try:
        wait_ready(proc, base, log_path)
        warm_up(base, key, shorts[0])
        print(f"soak: {args.duration:g} s of load: {args.concurrency} short clients"
              + (f", long prompts of {long_len or args.long_tokens} tokens" if longs else "")
              + (f", abuse every {args.abuse_interval:g} s" if args.abuse_interval > 0 else ""),
              file=sys.stderr, flush=True)
        soak = Soak(base, key, args, shorts, longs, server_pid=proc.pid)
        timing = asyncio.run(soak.run())
        alive = proc.poll() is None
    finally:
        exit_code = stop_server(proc)
    recs = soak.recs
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": f"{cpu_model()}, {n_cpus} CPUs",
        "args": {**vars(args), "warmup_used": warmup}, "target": str(args.target),
        "server": {"command": [c if c != key else "<key>" for c in cmd], "pid": proc.pid,
                   "pids_seen": {str(k): v for k, v in soak.pids_seen.items()},
                   "alive_after_load": alive, "gone_at_s": timing["server_gone_at"], "exit_code": exit_code,
                   "cpus": format_cpus(cpus) if cpus else "all"},
        "long_prompt_tokens": long_len, "load_s": round(timing["t_load_end"], 3),
        "drained_s": round(timing["t_drained"], 3), "stopped_s": round(timing["t_stopped"], 3),
        "requests": requests_report(recs), "gaps": gaps_report(recs),
        "resources": resources_report(soak.samples, warmup, window, timing["t_load_end"]),
        "metrics_end": timing["metrics_end"],
    }
    report["checks"] = {k: {"ok": ok, "detail": why} for k, (ok, why) in checks(report, args.max_rss_growth).items()}
    report["passed"] = all(c["ok"] for c in report["checks"].values())
    report["samples"] = soak.samples
    (out_dir / "soak.json").write_text(json.dumps(report, indent=1))
    plot(out_dir / "soak.png", soak.samples, prefill_windows(recs), warmup, timing["t_load_end"],
         f"soak: {Path(str(args.target)).name}, {n_cpus} CPUs, {args.duration:g} s")
    print(table({**report, "checks": {k: (c["ok"], c["detail"]) for k, c in report["checks"].items()}}))
    print(f"JSON, plot and server log in {out_dir}/")
    if report["passed"]:
        return 0
    if args.warn_only:
        print("soak: checks failed (--warn-only: exit 0)", file=sys.stderr)
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
