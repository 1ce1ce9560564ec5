"""python -m bench.suffix: Dovetail's suffix (copy) draft against llama.cpp's own copy-based speculation.

    python -m bench.suffix --quick                  # 2 prompts per workload x 48 tokens: a smoke run
    python -m bench.suffix                          # 6 prompts per workload x 192 tokens
    python -m bench.suffix --systems llama-plain,server-ngram-mod,dovetail-suffix --workloads edits

Workloads (bench/suffix_workloads.py): ``edits`` (return a HumanEval function with a small
change), ``retrieval`` (quote sentences of a document), ``multiturn`` (revise the previous
answer), where most answer tokens are copies of the prompt, and ``chat`` (ShareGPT first
turns), where little is.

Systems, all greedy on the same GGUF with the same threads, on the same token ids (the
target's chat template applied once here), each stopping at the model's end-of-turn or
--max-new-tokens:

- llama-plain / llama-lookup-2 / llama-lookup-10: llama-cpp-python's ``Llama.generate``,
  without a draft and with its prompt-lookup draft (``LlamaPromptLookupDecoding``, 2 or 10
  tokens per round; its README advises 2 on a CPU). One Llama object serves all three.
- server-plain / server-ngram-*: llama.cpp's own ``llama-server`` (bench/build_llama_server.sh)
  without speculation and with each n-gram ``--spec-type`` it supports, at their defaults,
  one server per type, ``cache_prompt`` off so every system pays the prefill alike.
- dovetail-target-only / dovetail-suffix / dovetail-hybrid: ``dovetail.launch`` with no
  draft, with ``"suffix"``, and with ``"suffix+" + --hybrid-draft`` (a model draft on the
  CPU beside it). On a machine without a GPU, ``draft="auto"`` (Dovetail's default) is the
  suffix draft alone, so dovetail-suffix is reported as "Dovetail defaults" too.

Everything is loaded first, then the systems take turns prompt by prompt (the order
rotating), so that a slow spell of a shared machine hits all of them alike. Speeds:

- decode tok/s: tokens after the first over the time after the first (for every system;
  the server's from its own timings: predicted_n - 1 over predicted_ms);
- x llama-plain: the ratio of decode speeds, per workload, each the total of its prompts;
- all-in tok/s: every token over the whole request, prefill included; TTFT: time to first token;
- tau: tokens per target forward after the first token (1 without a draft);
- same output: the share of prompts whose tokens equal dovetail-target-only's;
- copy oracle: from dovetail-target-only's answers, the share of answer tokens a lookup of
  the last 1..8 tokens in prompt + answer proposes correctly, and the speed an oracle
  choosing each round's draft length would reach on the target's measured verify curve
  (bench.lookup's functions, drafts up to 15 tokens).

Writes results.json (every record, the summaries, the machine and versions), results.md
and speedup.png to --out, and prints the tables.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import suffix_workloads

DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_HYBRID_DRAFT = "qwen2.5-coder-0.5b-instruct"
DEFAULT_SERVER = Path.home() / ".cache" / "dovetail" / "llama-server" / "llama-server"
SERVER_SPEC_TYPES = ("ngram-simple", "ngram-mod", "ngram-map-k", "ngram-cache")
LOOKUP_SIZES = (2, 10)
DEFAULT_SYSTEMS = ("llama-plain", *(f"llama-lookup-{k}" for k in LOOKUP_SIZES), "server-plain",
                   *(f"server-{t}" for t in SERVER_SPEC_TYPES), "dovetail-target-only", "dovetail-suffix",
                   "dovetail-hybrid")
BASELINE = "llama-plain"              # the x column divides by its decode speed
REFERENCE = "dovetail-target-only"    # the output every other system should reproduce
DEFAULTS_ALIAS = "dovetail-suffix"    # what draft="auto" runs on a machine without a GPU
MAX_PROMPT_TOKENS = 1500
ORACLE_MATCH, ORACLE_DRAFT = 8, 15
SERVER_START_S = 180.0
WARM_UP = [{"role": "user", "content": "Name three colours."}]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.suffix", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=DEFAULT_TARGET,
                   help=f"the target GGUF: a file or a registry name, fetched once (default: {DEFAULT_TARGET})")
    p.add_argument("--workloads", default=",".join(suffix_workloads.WORKLOADS),
                   help="comma list of workloads: " + ", ".join(suffix_workloads.WORKLOADS) + " (default: all)")
    p.add_argument("--prompts", type=int, default=6, help="prompts per workload (default: 6; --quick: 2)")
    p.add_argument("--max-new-tokens", type=int, default=192,
                   help="most tokens per answer; answers end earlier at end-of-turn (default: 192; --quick: 48)")
    p.add_argument("--threads", type=int, default=2,
                   help="threads for every system's target, pinned to the first N CPUs this process may use "
                        "(default: 2)")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help="comma list of systems (default: all of " + ", ".join(DEFAULT_SYSTEMS) + "; also "
                        "server-ngram-map-k4v where the server has it)")
    p.add_argument("--hybrid-draft", default=DEFAULT_HYBRID_DRAFT,
                   help=f"the model draft beside the suffix draft in dovetail-hybrid, on the CPU "
                        f"(default: {DEFAULT_HYBRID_DRAFT})")
    p.add_argument("--hybrid-force-draft", action=argparse.BooleanOptionalAction, default=True,
                   help="start dovetail-hybrid's model draft even where the target's verify curve says a draft "
                        "cannot pay (force_draft=True; default: on, else on a CPU the launcher usually declines it "
                        "and dovetail-hybrid repeats dovetail-suffix)")
    p.add_argument("--llama-server", default=str(DEFAULT_SERVER),
                   help="llama.cpp's llama-server binary (bash bench/build_llama_server.sh builds it; default: "
                        f"{DEFAULT_SERVER}); the server systems are skipped when it is missing")
    p.add_argument("--server-args", default="",
                   help="extra llama-server flags for every server-ngram-* system, e.g. "
                        "\"--spec-ngram-simple-size-n 3\" (default: none: each n-gram type at llama.cpp's defaults)")
    p.add_argument("--ctx", type=int, default=4096,
                   help="context of the llama-cpp-python and llama-server targets in tokens (default: 4096)")
    p.add_argument("--isolate-prompts", action="store_true",
                   help="give every prompt its own suffix-draft scope, so Dovetail copies nothing from earlier "
                        "answers (default: one scope per workload, as one user's requests on a server)")
    p.add_argument("--quick", action="store_true", help="2 prompts per workload x 48 tokens: a smoke run")
    p.add_argument("--out", default=None,
                   help="folder for results.json, results.md and speedup.png (default: bench/results/suffix-<N>core)")
    return p


# ---- systems ------------------------------------------------------------------------------------

class LlamaShared:
    """One llama-cpp-python Llama for every llama-* system: loaded once, its draft swapped per
    request. It is built with logits for every row (a prompt-lookup draft needs them to verify),
    and a request without a draft switches that off again, so llama-plain computes only the
    last row's logits, as a Llama without a draft does."""

    def __init__(self, gguf: Path, threads: int, ctx: int, extra_buffers: bool):
        self.gguf, self.threads, self.ctx, self.extra_buffers = gguf, threads, ctx, extra_buffers
        self.llm = None

    def open(self):
        if self.llm is None:
            from dovetail.workers.llama_buffers import open_llama
            # flash attention on: what llama.cpp's "auto" (the server's and our workers' default) picks on a CPU
            self.llm = open_llama(self.extra_buffers, model_path=str(self.gguf), n_ctx=self.ctx,
                                  n_threads=self.threads, n_threads_batch=self.threads, logits_all=True,
                                  flash_attn=True, verbose=False)
            if not hasattr(self.llm, "_logits_all") or not hasattr(self.llm, "draft_model"):
                raise RuntimeError("this llama-cpp-python has no Llama._logits_all / draft_model to switch per request")
        return self.llm

    def close(self):
        if self.llm is not None:
            self.llm.close()
            self.llm = None


class CountingDraft:
    """A draft model for Llama.generate that counts its calls: generate asks it once per
    verification, so after the first token the calls are the target forwards."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, input_ids, /, **kwargs):
        self.calls += 1
        return self.inner(input_ids, **kwargs)


class LlamaCppSystem:
    def __init__(self, name: str, shared: LlamaShared, lookup: int | None, stop_ids: set[int]):
        self.name, self.shared, self.lookup, self.stop_ids = name, shared, lookup, stop_ids
        self.info = {"kind": "llama-cpp-python", "prompt_lookup_tokens": lookup, "n_ctx": shared.ctx,
                     "extra_buffers": shared.extra_buffers, "flash_attn": True}

    def start(self):
        self.shared.open()

    def run(self, prompt_ids: list[int], max_new: int, scope: str) -> dict:
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
        llm = self.shared.open()
        draft = CountingDraft(LlamaPromptLookupDecoding(num_pred_tokens=self.lookup)) if self.lookup else None
        llm.draft_model = draft
        llm._logits_all = draft is not None
        llm.reset()  # no prefix reuse from the last request: every system prefills the whole prompt
        ids: list[int] = []
        ttft = None
        t0 = time.perf_counter()
        gen = llm.generate(prompt_ids, reset=True, temp=0.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
        try:
            for tok in gen:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                ids.append(int(tok))
                if int(tok) in self.stop_ids or len(ids) >= max_new:
                    break
        finally:
            gen.close()
        total = time.perf_counter() - t0
        forwards = draft.calls if draft is not None else max(0, len(ids) - 1)
        return record(ids, first=1, ttft=ttft or total, total=total, tau_tokens=max(0, len(ids) - 1),
                      tau_rounds=forwards)

    def close(self):
        self.shared.close()


class ServerSystem:
    """llama.cpp's llama-server on 127.0.0.1, one slot, started once; spec_type None: no speculation."""

    def __init__(self, name: str, binary: str, gguf: Path, threads: int, ctx: int, spec_type: str | None,
                 extra_buffers: bool, log_dir: Path, spec_args: tuple[str, ...] = ()):
        self.name, self.binary, self.gguf, self.threads, self.ctx = name, binary, gguf, threads, ctx
        self.spec_type, self.extra_buffers, self.log_dir = spec_type, extra_buffers, log_dir
        self.spec_args = tuple(spec_args) if spec_type else ()
        self.proc, self.port, self.log = None, None, None
        self.info = {"kind": "llama-server", "spec_type": spec_type, "n_ctx": ctx, "extra_buffers": extra_buffers}

    def command(self) -> list[str]:
        cmd = [self.binary, "-m", str(self.gguf), "-t", str(self.threads), "-tb", str(self.threads),
               "-c", str(self.ctx), "--host", "127.0.0.1", "--port", str(self.port), "-np", "1"]
        if not self.extra_buffers:
            cmd.append("--no-repack")
        if self.spec_type:
            cmd += ["--spec-type", self.spec_type, *self.spec_args]
        return cmd

    def start(self):
        self.port = free_port()
        cmd = self.command()
        self.info["command"] = " ".join(cmd)
        self.log = self.log_dir / f"{self.name}.log"
        with open(self.log, "wb") as out:
            # its own process group: close() ends it and anything it started, and nothing else. It
            # inherits this process's CPU affinity (main() pins it to the benchmark's CPUs).
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {tail(self.log)}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                status, _ = http_json(self.port, "GET", "/health", None, timeout=5)
                if status == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not answer /health within {SERVER_START_S:.0f} s: {tail(self.log)}")

    def run(self, prompt_ids: list[int], max_new: int, scope: str) -> dict:
        body = {"prompt": prompt_ids, "n_predict": max_new, "temperature": 0.0, "cache_prompt": False,
                "return_tokens": True, "stream": False}
        t0 = time.perf_counter()
        status, res = http_json(self.port, "POST", "/completion", body, timeout=1800)
        wall = time.perf_counter() - t0
        if status != 200:
            raise RuntimeError(f"{self.name}: HTTP {status}: {str(res)[:300]}")
        return server_record(res, wall)

    def close(self):
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        self.proc = None


class DovetailSystem:
    def __init__(self, name: str, gguf: Path, draft, cpus: list[int], **launch_kwargs):
        self.name, self.gguf, self.draft, self.cpus, self.kwargs = name, gguf, draft, cpus, launch_kwargs
        self.coord = None
        self.info = {"kind": "dovetail", "draft": draft, **{k: str(v) for k, v in launch_kwargs.items()}}

    def start(self):
        import dovetail
        self.coord = dovetail.launch(str(self.gguf), self.draft, backend="llama.cpp", target_cpus=self.cpus,
                                     **self.kwargs)
        self.info["model_draft_running"] = self.coord.draft is not None
        self.info["suffix_draft"] = bool(self.coord.suffix)

    def run(self, prompt_ids: list[int], max_new: int, scope: str) -> dict:
        from dovetail import Stats
        stats = Stats()
        ids: list[int] = []
        ttft, first = None, 0
        t0 = time.perf_counter()
        for chunk in self.coord.stream(prompt_ids, max_new_tokens=max_new, temperature=0.0, stats=stats,
                                       scope=scope):
            if ttft is None and chunk.token_ids:
                ttft, first = time.perf_counter() - t0, len(chunk.token_ids)
            ids.extend(chunk.token_ids)
        total = time.perf_counter() - t0
        extra = {k: getattr(stats, k, 0) for k in ("prefill_s", "rounds", "accepted", "drafted", "accepted_drafts",
                                                   "suffix_rounds", "suffix_drafted", "suffix_accepted",
                                                   "draft_fallback")}
        return record(ids, first=first, ttft=ttft or total, total=total, tau_tokens=stats.accepted,
                      tau_rounds=stats.rounds, **extra)

    def close(self):
        if self.coord is not None:
            self.coord.close()
            self.coord = None


# ---- records -------------------------------------------------------------------------------------

def record(ids: list[int], *, first: int, ttft: float, total: float, tau_tokens: float, tau_rounds: float,
           text: str | None = None, **extra) -> dict:
    """One request's figures, the same fields for every system."""
    return {"token_ids": ids, "text": text, "new_tokens": len(ids), "first_tokens": first, "ttft_s": ttft,
            "total_s": total, "tau_tokens": tau_tokens, "tau_rounds": tau_rounds, **extra}


def server_record(res: dict, wall: float) -> dict:
    """A /completion answer as a record, timed by the server's own clock: the prompt ends at
    the first token (prompt_ms), and predicted_ms covers the predicted_n - 1 tokens after it."""
    t = res.get("timings", {})
    n = int(t.get("predicted_n", 0))
    prompt_s, gen_s = t.get("prompt_ms", 0.0) / 1000, t.get("predicted_ms", 0.0) / 1000
    accepted = int(t.get("draft_n_accepted", 0))
    ids = [int(x) for x in res.get("tokens", []) or []]
    rec = record(ids, first=1, ttft=prompt_s, total=prompt_s + gen_s, tau_tokens=max(0, n - 1),
                 tau_rounds=max(0, n - 1 - accepted), text=res.get("content", ""), client_wall_s=wall,
                 drafted=int(t.get("draft_n", 0)), accepted_drafts=accepted, prompt_n=t.get("prompt_n"),
                 stop_type=res.get("stop_type"))
    rec["new_tokens"] = n  # the server's count (the end-of-turn token included, as the others count it)
    return rec


def decode_speed(recs: list[dict]) -> float:
    """Tokens after the first chunk over the time after it, all the records together."""
    tokens = sum(r["new_tokens"] - r["first_tokens"] for r in recs)
    seconds = sum(r["total_s"] - r["ttft_s"] for r in recs)
    return tokens / seconds if seconds > 0 else 0.0


def all_in_speed(recs: list[dict]) -> float:
    seconds = sum(r["total_s"] for r in recs)
    return sum(r["new_tokens"] for r in recs) / seconds if seconds > 0 else 0.0


def tau(recs: list[dict]) -> float | None:
    rounds = sum(r["tau_rounds"] for r in recs)
    return sum(r["tau_tokens"] for r in recs) / rounds if rounds > 0 else None


def without_stop(ids: list[int], stop_ids: set[int]) -> list[int]:
    """The ids up to the first stop token: systems differ in whether they report it."""
    for i, t in enumerate(ids):
        if t in stop_ids:
            return ids[:i]
    return ids


def same_output(rec: dict, ref: dict, stop_ids: set[int]) -> bool:
    """Whether a record's answer equals the reference's: by token ids where it has them, else by text."""
    if rec.get("token_ids"):
        return without_stop(rec["token_ids"], stop_ids) == without_stop(ref["token_ids"], stop_ids)
    return (rec.get("text") or "").strip() == (ref.get("text") or "").strip()


def summarize(records: list[dict], stop_ids: set[int]) -> dict:
    """{workload: {system: figures}}: speeds over the workload's prompts, the ratio to
    llama-plain, and the share of prompts whose output is dovetail-target-only's."""
    ok = [r for r in records if "error" not in r]
    order = list(dict.fromkeys(r["system"] for r in records))  # the first prompt's order: --systems
    out: dict[str, dict] = {}
    for workload in dict.fromkeys(r["workload"] for r in records):
        mine = [r for r in ok if r["workload"] == workload]
        present = {r["system"] for r in records if r["workload"] == workload}
        systems = [name for name in order if name in present]
        refs = {r["prompt_id"]: r for r in mine if r["system"] == REFERENCE}
        base = decode_speed([r for r in mine if r["system"] == BASELINE])
        rows = {}
        for name in systems:
            recs = [r for r in mine if r["system"] == name]
            errors = sum(1 for r in records if r["workload"] == workload and r["system"] == name and "error" in r)
            if not recs:
                rows[name] = {"prompts": 0, "errors": errors}
                continue
            speed = decode_speed(recs)
            compared = [r for r in recs if r["prompt_id"] in refs]
            rows[name] = {
                "prompts": len(recs), "errors": errors, "tokens": sum(r["new_tokens"] for r in recs),
                "decode_tok_s": speed, "x_plain": speed / base if base else None,
                "all_in_tok_s": all_in_speed(recs), "ttft_s": sum(r["ttft_s"] for r in recs) / len(recs),
                "tau": tau(recs),
                "same_output": (sum(same_output(r, refs[r["prompt_id"]], stop_ids) for r in compared) / len(compared)
                                if compared else None),
                "drafted": sum(r.get("drafted", 0) or 0 for r in recs),
                "accepted_drafts": sum(r.get("accepted_drafts", 0) or 0 for r in recs),
                "suffix_drafted": sum(r.get("suffix_drafted", 0) or 0 for r in recs),
                "suffix_accepted": sum(r.get("suffix_accepted", 0) or 0 for r in recs),
            }
        out[workload] = rows
    return out


def copy_oracle(records: list[dict], prompts: dict[str, list[int]], verify_us: list[int]) -> dict:
    """{workload: figures} from dovetail-target-only's answers: how many answer tokens a lookup
    of the last 1..ORACLE_MATCH tokens proposes right, and the oracle-gated speed of that free
    draft on the verify curve (bench.lookup), against target-only decoding."""
    from bench.lookup import answer_proposals, oracle_ms
    verify_ms = [us / 1000 for us in verify_us[:ORACLE_DRAFT + 1]]
    longest = min(ORACLE_DRAFT, len(verify_ms) - 1)
    out = {}
    refs = [r for r in records if r["system"] == REFERENCE and "error" not in r]
    for workload in dict.fromkeys(r["workload"] for r in refs):
        positions = copied = 0
        base_ms = best_ms = 0.0
        for r in (r for r in refs if r["workload"] == workload):
            prompt = prompts[r["prompt_key"]]
            tokens = prompt + r["token_ids"]
            props = answer_proposals(tokens, len(prompt), len(tokens), ORACLE_MATCH, max(1, longest))
            positions += len(props)
            copied += sum(1 for _, _, acc in props if acc > 0)
            if longest >= 1:
                base_ms += len(props) * verify_ms[0]
                best_ms += oracle_ms(props, verify_ms, longest)
        out[workload] = {"answer_tokens": positions, "copy_share": copied / positions if positions else 0.0,
                         "oracle_x_target_only": base_ms / best_ms if best_ms else None,
                         "max_draft": longest, "max_match": ORACLE_MATCH}
    return out


# ---- report --------------------------------------------------------------------------------------

def fmt(value, spec: str = ".2f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def label(name: str, alias_holds: bool) -> str:
    return f"{name} (= Dovetail defaults)" if name == DEFAULTS_ALIAS and alias_holds else name


def markdown(results: dict) -> str:
    """One table per workload, then the copy oracle."""
    alias = results["dovetail_defaults_is_suffix"]
    lines = [f"# bench.suffix: {results['machine']['cpu']}, {results['args']['threads']} threads, "
             f"{results['target']}, up to {results['args']['max_new_tokens']} tokens, greedy", ""]
    for workload, rows in results["summary"].items():
        lines += [f"## {workload}", "",
                  "| system | decode tok/s | x llama-plain | all-in tok/s | TTFT s | tau | same output | prompts |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, s in rows.items():
            if not s.get("prompts"):
                lines.append(f"| {label(name, alias)} | failed ({s.get('errors', 0)} errors) | | | | | | 0 |")
                continue
            lines.append(f"| {label(name, alias)} | {s['decode_tok_s']:.1f} | {fmt(s['x_plain'])} | "
                         f"{s['all_in_tok_s']:.1f} | {s['ttft_s']:.2f} | {fmt(s['tau'])} | "
                         f"{fmt(s['same_output'], '.0%')} | {s['prompts']} |")
        o = results["oracle"].get(workload)
        if o:
            lines += ["", f"Copy oracle ({o['answer_tokens']} answer tokens of {REFERENCE}): a lookup of the last "
                          f"1..{o['max_match']} tokens proposes the next token right at {o['copy_share']:.0%} of "
                          f"positions; choosing each round's draft (up to {o['max_draft']}) knowing acceptance "
                          f"reaches x{fmt(o['oracle_x_target_only'])} over target-only decoding on the measured "
                          "verify curve."]
        lines.append("")
    for name, info in results.get("systems", {}).items():
        if info.get("kind") == "dovetail" and "+" in str(info.get("draft")) and not info.get("model_draft_running"):
            lines += [f"{name}: the launcher did not start the model draft ({info['draft']}), so only the suffix "
                      "draft ran.", ""]
    lines += ["decode: tokens after the first over the time after it (llama-server: its own timings); all-in: "
              "prefill included; tau: tokens per target forward after the first token; same output: prompts "
              f"whose tokens (llama-server without them: text) equal {REFERENCE}'s. llama-lookup-* compute "
              "logits for every prompt row (llama-cpp-python's draft needs logits_all), which their TTFT pays.", ""]
    return "\n".join(lines)


def plot_speedups(summary: dict, path: Path) -> Path | None:
    """Grouped bars: decode speed x llama-plain per workload, one bar per system."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no plot written")
        return None
    workloads = list(summary)
    systems = list(dict.fromkeys(n for rows in summary.values() for n in rows))
    fig = Figure(figsize=(max(7.0, 1.6 * len(workloads) + 0.35 * len(systems)), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(systems))
    for j, name in enumerate(systems):
        values = [(summary[w].get(name) or {}).get("x_plain") or 0.0 for w in workloads]
        ax.bar([i + (j - (len(systems) - 1) / 2) * width for i in range(len(workloads))], values, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_ylabel("decode speed x llama-plain")
    ax.set_title("Decode speed against llama-cpp-python without a draft (greedy, same GGUF and threads)",
                 fontsize="medium")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncols=2)
    fig.savefig(path, dpi=120)
    return path


# ---- helpers -------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(port: int, method: str, path: str, body: dict | None, timeout: float) -> tuple[int, object]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=payload, headers={"Content-Type": "application/json"} if payload else {})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except json.JSONDecodeError:
            return resp.status, raw.decode(errors="replace")
    finally:
        conn.close()


def tail(path: Path | None, lines: int = 8) -> str:
    if path is None or not path.exists():
        return "(no log)"
    return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])


def server_spec_types(binary: str) -> tuple[list[str], str]:
    """(the n-gram --spec-type values this llama-server takes, its version line), read from its
    --help; none when it has no --spec-type flag."""
    helptext = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60)
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    version_line = next((line for line in (version.stdout + version.stderr).splitlines() if "version" in line), "")
    return spec_types_in_help(helptext.stdout + helptext.stderr), version_line.strip()


def spec_types_in_help(text: str) -> list[str]:
    """The n-gram types listed in the --spec-type entry of llama-server's --help (the entry
    may wrap over several lines; it ends where the next flag starts)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if "--spec-type" in line), None)
    if start is None:
        return []
    entry = [lines[start]]
    for line in lines[start + 1:]:
        if line.lstrip().startswith("-"):
            break
        entry.append(line)
    words = set(re.split(r"[\s,|\[\]()]+", " ".join(entry)))
    return [t for t in (*SERVER_SPEC_TYPES, "ngram-map-k4v") if t in words]


def cpu_name() -> str:
    """lscpu's Model name (the kernel's /proc/cpuinfo where lscpu is missing)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    from dovetail.system.cpus import cpu_model
    return cpu_model()


def versions(server_version: str | None) -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version(), "llama-server": server_version}
    for pkg in ("dovetail", "llama_cpp_python", "torch", "transformers"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def defaults_are_suffix() -> bool:
    """Whether draft="auto" means the suffix draft alone here (no GPU for a draft)."""
    from dovetail.runtime.launch import _draft_device, split_suffix
    return split_suffix("auto", _draft_device(None)) == (True, None)


def encode(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of chat messages through the target's chat template: the same ids for every system."""
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(enc["input_ids"] if hasattr(enc, "keys") else enc)


def resolve_args(args) -> argparse.Namespace:
    """--quick and the defaults that depend on the machine, applied; refuses unknown names."""
    if args.quick:
        args.prompts, args.max_new_tokens = min(args.prompts, 2), min(args.max_new_tokens, 48)
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.systems = [s for s in args.systems.split(",") if s]
    bad = [w for w in args.workloads if w not in suffix_workloads.WORKLOADS]
    if bad:
        raise SystemExit(f"unknown workload(s) {bad}: choose from {', '.join(suffix_workloads.WORKLOADS)}")
    known = set(DEFAULT_SYSTEMS) | {"server-ngram-map-k4v"}
    bad = [s for s in args.systems if s not in known]
    if bad:
        raise SystemExit(f"unknown system(s) {bad}: choose from {', '.join(sorted(known))}")
    if args.threads < 1 or args.prompts < 1 or args.max_new_tokens < 2:
        raise SystemExit("--threads and --prompts must be >= 1 and --max-new-tokens >= 2")
    if args.out is None:
        args.out = f"bench/results/suffix-{args.threads}core"
    return args


def plan(args, gguf: Path, cpus: list[int], stop_ids: set[int], extra_buffers: bool, log_dir: Path
         ) -> tuple[list, dict]:
    """The systems to run, in --systems order, and what was skipped and why."""
    skipped: dict[str, str] = {}
    server_types, server_version = [], None
    if any(s.startswith("server-") for s in args.systems):
        if not (os.path.isfile(args.llama_server) and os.access(args.llama_server, os.X_OK)):
            for s in args.systems:
                if s.startswith("server-"):
                    skipped[s] = f"no llama-server at {args.llama_server} (bash bench/build_llama_server.sh)"
        else:
            server_types, server_version = server_spec_types(args.llama_server)
    shared = LlamaShared(gguf, args.threads, args.ctx, extra_buffers)
    systems = []
    for name in args.systems:
        if name in skipped:
            continue
        if name == "llama-plain":
            systems.append(LlamaCppSystem(name, shared, None, stop_ids))
        elif name.startswith("llama-lookup-"):
            systems.append(LlamaCppSystem(name, shared, int(name.rsplit("-", 1)[1]), stop_ids))
        elif name.startswith("server-"):
            spec = None if name == "server-plain" else name[len("server-"):]
            if spec is not None and spec not in server_types:
                have = ", ".join(server_types) or "none"
                skipped[name] = f"this llama-server has no --spec-type {spec} (it has: {have})"
                continue
            systems.append(ServerSystem(name, args.llama_server, gguf, args.threads, args.ctx, spec, extra_buffers,
                                        log_dir, shlex.split(args.server_args)))
        elif name == "dovetail-target-only":
            systems.append(DovetailSystem(name, gguf, None, cpus))
        elif name == "dovetail-suffix":
            systems.append(DovetailSystem(name, gguf, "suffix", cpus))
        elif name == "dovetail-hybrid":
            systems.append(DovetailSystem(name, gguf, "suffix+" + args.hybrid_draft, cpus, draft_device="cpu",
                                          **({"force_draft": True} if args.hybrid_force_draft else {})))
    return systems, {"skipped": skipped, "server_spec_types": server_types, "server_version": server_version}


def load_prompts(args, tokenizer) -> tuple[list[dict], dict[str, list[int]]]:
    """The workloads' prompts in order, each with its token ids; prompts over MAX_PROMPT_TOKENS dropped."""
    chosen, ids = [], {}
    for workload, prompts in suffix_workloads.build(args.workloads, args.prompts).items():
        for p in prompts:
            key = f"{workload}/{p['id']}"
            tokens = encode(tokenizer, p["messages"])
            if len(tokens) > MAX_PROMPT_TOKENS:
                print(f"bench.suffix: dropping {key}: {len(tokens)} prompt tokens > {MAX_PROMPT_TOKENS}", flush=True)
                continue
            ids[key] = tokens
            chosen.append({**p, "key": key})
        if not any(p["workload"] == workload for p in chosen):
            print(f"bench.suffix: workload {workload} has no prompt", flush=True)
    return chosen, ids


def run_all(systems: list, prompts: list[dict], ids: dict[str, list[int]], args) -> list[dict]:
    """Every system on every prompt, the systems taking turns prompt by prompt (their order
    rotating by one each prompt, so none always runs right after the same neighbour)."""
    records = []
    total = len(prompts) * len(systems)
    done = 0
    for i, p in enumerate(prompts):
        scope = f"bench-{p['key']}" if args.isolate_prompts else f"bench-{p['workload']}"
        order = systems[i % len(systems):] + systems[:i % len(systems)]
        for system in order:
            done += 1
            base = {"system": system.name, "workload": p["workload"], "prompt_id": p["id"], "prompt_key": p["key"],
                    "prompt_tokens": len(ids[p["key"]])}
            try:
                rec = {**base, **system.run(ids[p["key"]], args.max_new_tokens, scope)}
                speed = decode_speed([rec])
                print(f"[{done}/{total}] {p['key']} {system.name}: {rec['new_tokens']} tokens, decode {speed:.1f} "
                      f"tok/s, TTFT {rec['ttft_s']:.2f} s, tau {fmt(tau([rec]))}", flush=True)
            except Exception as e:  # one failure should not lose the other systems' figures
                rec = {**base, "error": f"{type(e).__name__}: {e}"}
                print(f"[{done}/{total}] {p['key']} {system.name}: FAILED {rec['error']}", flush=True)
            records.append(rec)
    return records


def warm_up(systems: list, tokenizer) -> None:
    """One short request per system, not recorded: first-call costs (page faults, lazy
    buffers) stay out of the figures. Dovetail's goes to its own scope, so the suffix draft
    cannot copy from it later."""
    ids = encode(tokenizer, WARM_UP)
    for system in systems:
        system.run(ids, 8, "bench-warm-up")


def run_systems(systems: list, prompts: list[dict], ids: dict[str, list[int]], args, tokenizer, results: dict
                ) -> tuple[list[dict], list[int]]:
    """Start every system, warm each up, run them all; every one stopped on the way out, also
    on an error or Ctrl-C. Returns the records and the target's verify curve (microseconds)."""
    with contextlib.ExitStack() as stack:
        for system in systems:
            print(f"bench.suffix: starting {system.name}", flush=True)
            stack.callback(system.close)
            system.start()
        warm_up(systems, tokenizer)
        results["systems"] = {s.name: s.info for s in systems}
        verify_us = next((list(s.coord.target_info.verify_us) for s in systems
                          if isinstance(s, DovetailSystem) and s.coord.target_info.verify_us), [])
        return run_all(systems, prompts, ids, args), verify_us


def main(argv=None) -> int:
    args = resolve_args(build_parser().parse_args(argv))
    from dovetail.models.fetch import resolve_model
    from dovetail.models.loading import load_tokenizer, stop_token_ids
    from dovetail.workers.llama_buffers import decide

    allowed = sorted(os.sched_getaffinity(0))
    if args.threads > len(allowed):
        raise SystemExit(f"--threads {args.threads}: this process may use only {len(allowed)} CPUs")
    cpus = allowed[:args.threads]
    os.sched_setaffinity(0, cpus)  # the llama-cpp-python target runs in this process; servers inherit it too
    # A SIGTERM unwinds like Ctrl-C, through the `finally`s that stop the servers and workers.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    gguf = resolve_model(args.target)
    if gguf.suffix != ".gguf":
        raise SystemExit(f"--target must be a GGUF (every system runs it on llama.cpp), got {gguf}")
    tokenizer = load_tokenizer(gguf)
    stop_ids = set(stop_token_ids(gguf, tokenizer))
    buffers = decide("auto", str(gguf), args.threads)  # the same extra-buffer setting our workers take
    prompts, ids = load_prompts(args, tokenizer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-suffix-"))  # the servers' logs: kept where a run fails
    systems, planned = plan(args, gguf, cpus, stop_ids, buffers.extra_buffers, log_dir)
    for name, why in planned["skipped"].items():
        print(f"bench.suffix: skipping {name}: {why}", flush=True)
    if not systems or not prompts:
        raise SystemExit("nothing to run")
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "target": gguf.name,
               "machine": {"cpu": cpu_name(), "cpus": cpus, "threads": args.threads},
               "versions": versions(planned["server_version"]), "args": vars(args),
               "llama_extra_buffers": buffers.record(), "skipped": planned["skipped"],
               "server_spec_types": planned["server_spec_types"],
               "dovetail_defaults_is_suffix": defaults_are_suffix(), "stop_token_ids": sorted(stop_ids),
               "prompts": [{"key": p["key"], "workload": p["workload"], "id": p["id"], "tokens": len(ids[p["key"]]),
                            "messages": p["messages"]} for p in prompts]}
    try:
        records, verify_us = run_systems(systems, prompts, ids, args, tokenizer, results)
    except BaseException:
        print(f"bench.suffix: the servers' logs are in {log_dir}", file=sys.stderr)
        raise
    shutil.rmtree(log_dir, ignore_errors=True)
    for rec in records:
        if rec.get("token_ids") and not rec.get("text"):
            rec["text"] = tokenizer.decode(rec["token_ids"], skip_special_tokens=True)
    results["verify_us"] = verify_us
    results["records"] = records
    results["summary"] = summarize(records, stop_ids)
    results["oracle"] = copy_oracle(records, ids, verify_us) if verify_us else {}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (out / "results.md").write_text(table)
    plot_speedups(results["summary"], out / "speedup.png")
    print(table)
    print(f"records, tables and plot in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
