"""python -m bench.prefix_cache: what the target's prefix cache saves, over HTTP (issue 30).

Starts `dovetail-launch serve` twice on the same GGUF and CPUs, one after the other: once as
it comes (the prefix cache on) and once with --no-prefix-cache (--no-cache-args), and
optionally llama.cpp's llama-server (--peers; its prompt cache is on by default) as a
reference. Each gets the same streamed greedy chat requests, one at a time:

1. **Multi-turn chats**: ShareGPT conversations held out from draft training with at least
   three user turns, replayed turn by turn. A turn's request is every earlier message, the
   assistant's turns being the replies our server (the first arm, cache on) actually gave,
   then the next user message; the other arms are sent those very same message lists. Bar:
   the median time to first token of turns 2+ with the cache over that without, <= 0.1.
2. **A shared system prompt**: --requests short questions (ShareGPT first user turns) behind
   one system prompt of exactly --system-tokens tokens of the target's tokenizer, built from
   held-out ShareGPT prose answers; sent one after the other, the first warming the cache.
   Bar: the summed time to first token with the cache over that without, <= 0.15 (reported
   over all requests and with the first excluded), and the same ratio of the servers' own
   prefill seconds (ours: the response's dovetail.prefill_seconds; llama-server: timings).

Replies in the chats are --reply-tokens long (default 256): they become the next turn's
history, and TTFT does not depend on their length. With 32-token replies a ShareGPT turn's
new text is ~15% of its prompt (median, Qwen2.5's tokenizer), so no cache could reach 0.1;
the table's "new" column and `ideal_ratio` show that bound for the prompts actually sent.

Prints every request's TTFT and the prompt tokens each response says it reused
(usage.prompt_tokens_details.cached_tokens, our `dovetail.cached_tokens`, llama-server's
timings.cache_n), the medians and ratios; writes results.json and results.md (and each
server's log) to bench/results/<name>/.

    python -m bench.prefix_cache                                    # the 1.5B GGUF, 8 chats x 3 turns, 8 requests
    python -m bench.prefix_cache --peers llama-server --target-cpus 0-15
    python -m bench.prefix_cache --target SmolLM2-135M --conversations 2 --requests 3 --system-tokens 200
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

from bench import serve
from bench.suffix import cpu_name
from dovetail.system.cpus import format_cpus, parse_cpus

RESULTS = Path(__file__).parent / "results"
MIN_USER_TURNS = 3          # conversations with at least this many user turns (and at least --turns)
BAR_TURNS = 0.10            # TTFT of turns 2+, cache over no cache (medians)
BAR_SHARED = 0.15           # summed TTFT behind a shared system prompt, cache over no cache
WARM_UP = serve.WARM_UP  # shares no text with any measured prompt
PREAMBLE = ("You are a helpful assistant. The reference text below is background; answer the user's "
            "question briefly.\n\nReference:\n\n")
CACHE_ARM, NO_CACHE_ARM = "dovetail", "dovetail-no-cache"
PEERS = ("llama-server", "llama-server-no-cache")  # the second: --no-cache-prompt


# ---- prompts (pure: tests pass fake records and a fake token counter) --------------------------

def user_turns(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m.get("role") == "user"]


def pick_conversations(records: Iterable[dict], n: int, turns: int, max_chars: int,
                       heldout: Callable[[str], bool] | None = None) -> list[dict]:
    """The first ``n`` conversations (file order) held out from draft training with at least
    max(MIN_USER_TURNS, turns) user turns, each of the first ``turns`` at most ``max_chars``
    long: ``{"id", "users": [the first turns user messages]}``."""
    from dovetail.models.sharegpt import is_heldout, to_messages
    heldout = heldout or is_heldout
    need = max(MIN_USER_TURNS, turns)
    out = []
    for record in records:
        record_id = str(record.get("id", ""))
        if not heldout(record_id):
            continue
        users = user_turns(to_messages(record))
        if len(users) >= need and all(len(u) <= max_chars for u in users[:turns]):
            out.append({"id": record_id, "users": users[:turns]})
            if len(out) == n:
                break
    return out


def turn_messages(users: list[str], replies: list[str], k: int) -> list[dict]:
    """Turn ``k``'s request (0-based): user 0, reply 0, ..., user k-1, reply k-1, user k."""
    if len(replies) < k or k >= len(users):
        raise ValueError(f"turn {k} needs {k} replies and {k + 1} user turns, got {len(replies)} and {len(users)}")
    messages = []
    for i in range(k):
        messages += [{"role": "user", "content": users[i]}, {"role": "assistant", "content": replies[i]}]
    return messages + [{"role": "user", "content": users[k]}]


def replay_order(n_conversations: int, turns: int, order: str) -> list[tuple[int, int]]:
    """(conversation, turn) pairs in the order they are sent: each conversation to its end
    ('conversation'), or every conversation's turn 0, then every turn 1, ... ('turn', which
    asks the cache to hold all of them at once)."""
    if order == "conversation":
        return [(c, k) for c in range(n_conversations) for k in range(turns)]
    if order == "turn":
        return [(c, k) for k in range(turns) for c in range(n_conversations)]
    raise ValueError(f"order must be 'conversation' or 'turn', got {order!r}")


def build_system_prompt(docs: Iterable[str], n_tokens: int, count: Callable[[str], int],
                        preamble: str = PREAMBLE) -> tuple[str, int]:
    """A system prompt of ``preamble`` and then whole words of ``docs`` (blank lines between
    them), as many as fit in ``n_tokens`` tokens by ``count``: (text, its tokens). Fewer only
    where no word can be added without passing ``n_tokens``; ValueError where the docs run out
    first."""
    if count(preamble) > n_tokens:
        raise ValueError(f"the preamble alone is {count(preamble)} tokens > {n_tokens}")
    pieces: list[str] = []  # words, each with the whitespace after it
    for doc in docs:
        words = re.findall(r"\S+\s*", doc.strip())
        if not words:
            continue
        if pieces:
            pieces[-1] = pieces[-1].rstrip() + "\n\n"
        pieces += words
        if count(preamble + "".join(pieces).rstrip()) > n_tokens:
            break
    else:
        raise ValueError(f"the documents hold fewer than {n_tokens} tokens")
    text = lambda k: preamble + "".join(pieces[:k]).rstrip()  # noqa: E731
    lo, hi = 0, len(pieces)  # count(text(lo)) <= n_tokens < count(text(hi))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(text(mid)) <= n_tokens:
            lo = mid
        else:
            hi = mid
    return text(lo), count(text(lo))


def short_questions(records: Iterable[dict], n: int, max_chars: int = 200,
                    heldout: Callable[[str], bool] | None = None) -> list[str]:
    """The first user turns of held-out conversations, at most ``max_chars`` long, distinct,
    in file order: ``n`` of them."""
    from dovetail.models.sharegpt import is_heldout, to_messages
    heldout = heldout or is_heldout
    out: list[str] = []
    for record in records:
        if not heldout(str(record.get("id", ""))):
            continue
        users = user_turns(to_messages(record))
        if users and len(users[0].strip()) <= max_chars and users[0].strip() not in out:
            out.append(users[0].strip())
            if len(out) == n:
                break
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ---- arithmetic (pure) ----------------------------------------------------------------------

def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare_turns(cache: list[dict], no_cache: list[dict], first_turn: int = 2) -> dict:
    """Turns ``first_turn``+ (1-based) paired by (conversation, turn), both with a TTFT:
    medians, sums, their ratios (cache over no cache), the median of the per-pair ratios, and
    whether the ratio of the medians meets BAR_TURNS."""
    theirs = {(r["conversation"], r["turn"]): r["ttft_s"] for r in no_cache if r.get("ttft_s") is not None}
    pairs = [(r["ttft_s"], theirs[(r["conversation"], r["turn"])]) for r in cache
             if r["turn"] >= first_turn and r.get("ttft_s") is not None and (r["conversation"], r["turn"]) in theirs]
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    out = {"pairs": len(pairs), "median_s": [median(a), median(b)],
           "sum_s": [sum(a), sum(b)] if pairs else [None, None],
           "ratio_of_medians": ratio(median(a), median(b)), "ratio_of_sums": ratio(sum(a), sum(b)) if pairs else None,
           "median_pair_ratio": median([x / y for x, y in pairs if y > 0]), "bar": BAR_TURNS}
    out["passed"] = out["ratio_of_medians"] is not None and out["ratio_of_medians"] <= BAR_TURNS
    return out


def compare_shared(cache: list[float | None], no_cache: list[float | None]) -> dict:
    """Summed TTFT of the shared-system-prompt requests, cache over no cache: over all of them
    and without the first (which warms the cache); requests that failed on either side are
    left out of both sums."""
    pairs = [(a, b) for a, b in zip(cache, no_cache) if a is not None and b is not None]
    rest = [(a, b) for i, (a, b) in enumerate(zip(cache, no_cache)) if i > 0 and a is not None and b is not None]

    def block(ps):
        s = [sum(p[0] for p in ps), sum(p[1] for p in ps)] if ps else [None, None]
        r = ratio(*s)
        return {"requests": len(ps), "sum_s": s, "ratio": r, "passed": r is not None and r <= BAR_SHARED}
    return {"all": block(pairs), "first_excluded": block(rest), "bar": BAR_SHARED}


# ---- servers and requests ---------------------------------------------------------------------

def arm_command(name: str, gguf: Path, cpus: list[int], port: int, args) -> list[str]:
    if name == CACHE_ARM:
        return serve.server_command("dovetail", gguf, cpus, port, max_active=args.max_active, n_ctx=args.n_ctx,
                                    dovetail_args=f"{args.dovetail_args} {args.cache_args}")
    if name == NO_CACHE_ARM:
        return serve.server_command("dovetail-no-cache", gguf, cpus, port, max_active=args.max_active,
                                    n_ctx=args.n_ctx, dovetail_args=args.dovetail_args,
                                    no_cache_args=args.no_cache_args)
    if name in PEERS:
        extra = args.llama_server_args + (" --no-cache-prompt" if name == "llama-server-no-cache" else "")
        return serve.server_command("llama-server", gguf, cpus, port, max_active=1, n_ctx=args.n_ctx,
                                    llama_server=args.llama_server, llama_server_args=extra,
                                    extra_buffers=serve.extra_buffers_for(gguf, len(cpus)))
    raise ValueError(f"unknown arm {name!r}")


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of chat messages through the target's chat template (as bench.suffix.encode)."""
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(enc["input_ids"] if hasattr(enc, "keys") else enc)


def request(port: int, messages: list[dict], max_tokens: int, count_tokens) -> dict:
    try:
        r = serve.one_request(port, messages, max_tokens, count_tokens)
    except (OSError, ValueError) as e:  # a dropped connection, a broken event
        r = {"error": f"{type(e).__name__}: {e}"}
    return {"ttft_s": r.get("ttft_s"), "cached_tokens": r.get("cached_tokens"), "prefill_s": r.get("prefill_s"),
            "server_prompt_tokens": r.get("prompt_tokens"), "completion_tokens": r.get("tokens"),
            "text": r.get("text"), **({"error": r["error"]} if "error" in r else {})}


def ms(v: float | None) -> str:
    return "-" if v is None else f"{1000 * v:.0f} ms"


def run_arm(name: str, gguf: Path, cpus: list[int], args, plan: dict, count_tokens, log_dir: Path) -> dict:
    """One server: started, warmed up, the chats (replayed live when ``plan['transcript']`` is
    empty, which it then fills; else the transcript's message lists), the shared-prompt
    requests, stopped."""
    port, log_path = serve.free_port(), log_dir / f"{name}.log"
    cmd = arm_command(name, gguf, cpus, port, args)
    print(f"{name}: starting on CPUs {format_cpus(cpus)}: {shlex.join(cmd)} (log: {log_path})", flush=True)
    proc = serve.launch(cmd, cpus, log_path)
    live = not plan["transcript"]
    out = {"command": shlex.join(cmd), "live_replay": live, "turns": [], "shared": []}
    try:
        t0 = time.monotonic()
        serve.wait_ready(proc, port, log_path, serve.ready_path("llama-server" if name in PEERS else "dovetail"))
        out["start_s"] = time.monotonic() - t0
        request(port, WARM_UP, 8, count_tokens)
        replies: dict[int, list[str]] = {c: [] for c in range(len(plan["conversations"]))}
        for c, k in plan["order"]:
            conv = plan["conversations"][c]
            if live:
                messages = turn_messages(conv["users"], replies[c], k)
                plan["transcript"][(c, k)] = messages
            else:
                messages = plan["transcript"][(c, k)]
            r = request(port, messages, args.reply_tokens, count_tokens)
            if live:
                replies[c].append(r["text"] or "")
            rec = {"conversation": conv["id"], "turn": k + 1, **r}
            out["turns"].append(rec)
            print(f"{name} chat {c} ({conv['id']}) turn {k + 1}: TTFT {ms(r['ttft_s'])}, "
                  f"cached {r['cached_tokens'] if r['cached_tokens'] is not None else '-'}"
                  f"/{r['server_prompt_tokens'] or '?'}{'  ERROR ' + r['error'] if 'error' in r else ''}", flush=True)
        for i, q in enumerate(plan["questions"]):
            r = request(port, [{"role": "system", "content": plan["system_prompt"]}, {"role": "user", "content": q}],
                        args.max_tokens, count_tokens)
            out["shared"].append({"request": i + 1, **r})
            print(f"{name} shared prompt request {i + 1}: TTFT {ms(r['ttft_s'])}, "
                  f"cached {r['cached_tokens'] if r['cached_tokens'] is not None else '-'}"
                  f"/{r['server_prompt_tokens'] or '?'}{'  ERROR ' + r['error'] if 'error' in r else ''}", flush=True)
    finally:
        serve.stop_server(proc)
    return out


# ---- report ------------------------------------------------------------------------------------

def summarize(arms: dict[str, dict], prompt_info: dict) -> dict:
    """Bar 1 and bar 2 for the cache arm against the no-cache arm and against each peer."""
    summary: dict = {}
    ref = arms.get(CACHE_ARM)
    if ref is None:
        return summary
    for name, arm in arms.items():
        if name == CACHE_ARM:
            continue
        summary[f"{CACHE_ARM} / {name}"] = {
            "turns": compare_turns(ref["turns"], arm["turns"]),
            "shared": compare_shared([r["ttft_s"] for r in ref["shared"]], [r["ttft_s"] for r in arm["shared"]]),
            # the servers' own prefill seconds (ours: the dovetail object; llama-server: its timings)
            "shared_prefill": compare_shared([r.get("prefill_s") for r in ref["shared"]],
                                             [r.get("prefill_s") for r in arm["shared"]])}
    later = [v for (c, k), v in prompt_info.items() if k > 0]
    summary["ideal_ratio_turns"] = median([v["new_tokens"] / v["prompt_tokens"] for v in later if v["prompt_tokens"]])
    return summary


def markdown(result: dict) -> str:
    arms, plan, summary = result["arms"], result["prompts"], result["summary"]
    names = list(arms)
    cached = lambda r: "-" if r.get("cached_tokens") is None else str(r["cached_tokens"])  # noqa: E731
    lines = [f"{result['machine']['cpu']}, {len(result['machine']['cpus'])} CPUs, {result['target']}; "
             f"{len(plan['conversations'])} chats x {result['args']['turns']} turns ({result['args']['order']} order, "
             f"replies of {result['args']['reply_tokens']} tokens), {len(plan['questions'])} requests behind a "
             f"{plan['system_prompt_tokens']}-token system prompt ({result['args']['max_tokens']} tokens each)", "",
             "### Multi-turn chats: time to first token per turn (cached: prompt tokens the server says it reused)", "",
             "| chat | turn | prompt tokens | new | " + " | ".join(f"{n} TTFT | cached" for n in names) + " |",
             "|---|---|---|---|" + "---|---|" * len(names)]
    by_arm = {n: {(r["conversation"], r["turn"]): r for r in arms[n]["turns"]} for n in names}
    for row in plan["turn_prompts"]:
        key = (row["conversation"], row["turn"])
        cells = " | ".join(f"{ms(by_arm[n].get(key, {}).get('ttft_s'))} | {cached(by_arm[n].get(key, {}))}"
                           for n in names)
        lines.append(f"| {row['conversation']} | {row['turn']} | {row['prompt_tokens']} | {row['new_tokens']} | "
                     f"{cells} |")
    lines += ["", "| arm | turn 1 TTFT median | turns 2+ TTFT median | turns 2+ TTFT sum |", "|---|---|---|---|"]
    for n in names:
        t1 = [r["ttft_s"] for r in arms[n]["turns"] if r["turn"] == 1 and r.get("ttft_s") is not None]
        t2 = [r["ttft_s"] for r in arms[n]["turns"] if r["turn"] >= 2 and r.get("ttft_s") is not None]
        lines.append(f"| {n} | {ms(median(t1))} | {ms(median(t2))} | {ms(sum(t2) if t2 else None)} |")
    lines += ["", "### Shared system prompt: time to first token per request", "",
              "| request | prompt tokens | " + " | ".join(f"{n} TTFT | cached" for n in names) + " |",
              "|---|---|" + "---|---|" * len(names)]
    for i, tokens in enumerate(plan["shared_prompt_tokens"]):
        cells = " | ".join(f"{ms(arms[n]['shared'][i].get('ttft_s'))} | {cached(arms[n]['shared'][i])}"
                           if i < len(arms[n]["shared"]) else "- | -" for n in names)
        lines.append(f"| {i + 1} | {tokens} | {cells} |")
    lines += ["", "### Ratios (dovetail with its prefix cache over each other arm)", "",
              "| over | chats: turns 2+ median ratio | sum ratio | median pair ratio | shared prompt: sum ratio, all "
              "| first excluded |", "|---|---|---|---|---|---|"]
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for key, s in summary.items():
        if not isinstance(s, dict):
            continue
        t, sh = s["turns"], s["shared"]
        lines.append(f"| {key.split(' / ')[1]} | {f(t['ratio_of_medians'])} ({t['pairs']} pairs) | "
                     f"{f(t['ratio_of_sums'])} | {f(t['median_pair_ratio'])} | {f(sh['all']['ratio'])} | "
                     f"{f(sh['first_excluded']['ratio'])} |")
    lines += ["", f"Bars against {NO_CACHE_ARM}: chats' turns 2+ ratio of medians <= {BAR_TURNS}, shared prompt's "
              f"sum ratio <= {BAR_SHARED}. 'new': prompt tokens past the longest prefix shared with the previous "
              f"turn's prompt and reply (the tokenizer's count); their median share of the prompt, "
              f"{f(summary.get('ideal_ratio_turns'))}, is about the best ratio a cache can reach on these chats."]
    return "\n".join(lines) + "\n"


def verdict_lines(summary: dict) -> list[str]:
    s = summary.get(f"{CACHE_ARM} / {NO_CACHE_ARM}")
    if not s:
        return []
    t, sh = s["turns"], s["shared"]
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    return [f"bar 1 (chats, turns 2+, TTFT median with/without cache): {f(t['ratio_of_medians'])} "
            f"<= {BAR_TURNS}: {'PASS' if t['passed'] else 'FAIL'}",
            f"bar 2 (shared system prompt, summed TTFT with/without cache): all {f(sh['all']['ratio'])} "
            f"({'PASS' if sh['all']['passed'] else 'FAIL'}), first excluded {f(sh['first_excluded']['ratio'])} "
            f"({'PASS' if sh['first_excluded']['passed'] else 'FAIL'}) <= {BAR_SHARED}"] + (
        [f"bar 2 by the servers' own prefill seconds: all {f(s['shared_prefill']['all']['ratio'])} "
         f"({'PASS' if s['shared_prefill']['all']['passed'] else 'FAIL'}), first excluded "
         f"{f(s['shared_prefill']['first_excluded']['ratio'])}"] if s.get("shared_prefill") else [])


def git_state() -> dict:
    """The checkout measured: its commit and whether it had local changes (read only)."""
    root = Path(__file__).resolve().parent.parent
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return {"commit": commit, "local_changes": bool(dirty)}
    return {}


# ---- main ----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.prefix_cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct",
                   help="a GGUF file or registry name (default: qwen2.5-coder-1.5b-instruct)")
    p.add_argument("--target-cpus", default=None, help="CPUs for every server, e.g. 0-15 (default: all this "
                                                       "process may use); threads = their number")
    p.add_argument("--conversations", type=int, default=8, help="ShareGPT chats to replay (default: 8)")
    p.add_argument("--turns", type=int, default=3, help="user turns replayed per chat, >= 2 (default: 3); chats "
                                                        f"have at least max({MIN_USER_TURNS}, this) user turns")
    p.add_argument("--order", choices=("conversation", "turn"), default="conversation",
                   help="each chat to its end, or every chat's turn 1, then every turn 2, ... (asks the cache to "
                        "hold all chats at once) (default: conversation)")
    p.add_argument("--max-turn-chars", type=int, default=2000,
                   help="skip chats with a replayed user turn longer than this (default: 2000)")
    p.add_argument("--reply-tokens", type=int, default=256,
                   help="tokens per chat reply: the next turn's history; TTFT does not depend on it (default: 256)")
    p.add_argument("--system-tokens", type=int, default=1000,
                   help="the shared system prompt's length in the target's tokens (default: 1000)")
    p.add_argument("--requests", type=int, default=8, help="requests behind the shared system prompt (default: 8)")
    p.add_argument("--question-chars", type=int, default=200,
                   help="their questions: ShareGPT first user turns at most this long (default: 200)")
    p.add_argument("--max-tokens", type=int, default=32,
                   help="tokens per answer behind the shared system prompt (default: 32)")
    p.add_argument("--dovetail-args", default="",
                   help="more flags for dovetail-launch serve in both of its arms, one string (a single flag "
                        "needs '=': --dovetail-args=--no-draft)")
    p.add_argument("--cache-args", default="", help="flags for the cache-on arm only (default: none, the cache is "
                                                    "on by default; e.g. '--prefix-cache-tokens 16384')")
    p.add_argument("--no-cache-args", default="--no-prefix-cache",
                   help="flags for the cache-off arm (default: --no-prefix-cache; '' before that flag exists)")
    p.add_argument("--max-active", type=int, default=4, help="our server's --max-active (default: 4, its default)")
    p.add_argument("--n-ctx", type=int, default=8192,
                   help="llama-server's context (ours: --llama-ctx in --dovetail-args, default 8192) (default: 8192)")
    p.add_argument("--peers", default="", help=f"comma list of reference servers from {PEERS} (default: none); "
                                               "llama-server-no-cache adds --no-cache-prompt")
    p.add_argument("--llama-server", default=str(serve.LLAMA_SERVER),
                   help="llama.cpp's llama-server binary (bash bench/build_llama_server.sh)")
    p.add_argument("--llama-server-args", default="", help="more flags for llama-server, one string")
    p.add_argument("--skip-no-cache", action="store_true", help="run only the cache-on arm (and --peers)")
    p.add_argument("--name", default=None, help="results folder under --out (default: prefix-cache-<N>core)")
    p.add_argument("--out", default=str(RESULTS), help="parent folder of the results (default: bench/results)")
    return p


def prepare(args, tokenizer) -> dict:
    """The chats, the system prompt and the questions: deterministic, from held-out ShareGPT."""
    from bench.suffix_workloads import documents
    from dovetail.models.sharegpt import read_sharegpt, sharegpt_path
    records = read_sharegpt(sharegpt_path())
    conversations = pick_conversations(records, args.conversations, args.turns, args.max_turn_chars)
    if len(conversations) < args.conversations:
        print(f"only {len(conversations)} held-out chats have {max(MIN_USER_TURNS, args.turns)}+ user turns of "
              f"<= {args.max_turn_chars} characters", flush=True)
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    chats = {c["id"] for c in conversations}  # the other parts draw on other conversations
    used: list[str] = []  # the documents' conversation ids, as build_system_prompt reads them

    def texts():
        for record_id, text in documents(records):
            if record_id not in chats:
                used.append(record_id)
                yield text
    system_prompt, system_tokens = build_system_prompt(texts(), args.system_tokens, count)
    questions = short_questions((r for r in records if str(r.get("id", "")) not in chats | set(used)),
                                args.requests, args.question_chars)
    return {"conversations": conversations, "system_prompt": system_prompt, "system_prompt_tokens": system_tokens,
            "system_prompt_sources": used, "questions": questions,
            "order": replay_order(len(conversations), args.turns, args.order), "transcript": {}}


def prompt_tokens(plan: dict, tokenizer) -> dict:
    """Per (chat, turn): the prompt's tokens and those past its longest shared prefix with the
    previous turn's prompt and reply (what a cache holding that turn must still prefill)."""
    info = {}
    for (c, k), messages in sorted(plan["transcript"].items()):
        ids = encode_chat(tokenizer, messages)
        shared = 0
        if k > 0:
            prev = plan["transcript"][(c, k - 1)]
            reply = messages[2 * k - 1]["content"]
            before = encode_chat(tokenizer, prev) + tokenizer.encode(reply, add_special_tokens=False)
            shared = common_prefix(ids, before)
        info[(c, k)] = {"prompt_tokens": len(ids), "new_tokens": len(ids) - shared}
    return info


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.turns < 2 or args.conversations < 1 or args.requests < 1 or args.reply_tokens < 1 or args.max_tokens < 1:
        raise SystemExit("--turns must be >= 2; --conversations, --requests, --reply-tokens, --max-tokens >= 1")
    peers = [n.strip() for n in args.peers.split(",") if n.strip()]
    for n in peers:
        if n not in PEERS:
            raise SystemExit(f"--peers: unknown peer {n!r}: one of {PEERS}")
    from dovetail.models.fetch import resolve_model
    from dovetail.models.loading import load_tokenizer
    gguf = resolve_model(args.target)
    cpus = parse_cpus(args.target_cpus) or sorted(os.sched_getaffinity(0))
    tokenizer = load_tokenizer(gguf)
    count_tokens = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    plan = prepare(args, tokenizer)
    if not plan["conversations"] or not plan["questions"]:
        raise SystemExit("no chats or no questions to send")
    name = args.name or f"prefix-cache-{len(cpus)}core"
    out_dir = Path(args.out) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    arms_to_run = [CACHE_ARM] + ([] if args.skip_no_cache else [NO_CACHE_ARM]) + peers
    skipped = {}
    arms: dict[str, dict] = {}
    for arm in arms_to_run:
        why = serve.missing_server("llama-server", args.llama_server) if arm in PEERS else None
        if why:
            print(f"{arm}: skipped: {why}", flush=True)
            skipped[arm] = why
            continue
        arms[arm] = run_arm(arm, gguf, cpus, args, plan, count_tokens, out_dir)
    info = prompt_tokens(plan, tokenizer)
    plan_out = {
        "conversations": plan["conversations"], "order": plan["order"],
        "turn_prompts": [{"conversation": plan["conversations"][c]["id"], "turn": k + 1, **info[(c, k)]}
                         for c, k in plan["order"]],
        "transcript_replies": {plan["conversations"][c]["id"]: [m["content"] for m in plan["transcript"][(c, k)]
                                                                if m["role"] == "assistant"]
                               for c, k in plan["order"] if k == args.turns - 1},
        "system_prompt": plan["system_prompt"], "system_prompt_tokens": plan["system_prompt_tokens"],
        "system_prompt_sources": plan["system_prompt_sources"], "questions": plan["questions"],
        "shared_prompt_tokens": [len(encode_chat(tokenizer, [{"role": "system", "content": plan["system_prompt"]},
                                                             {"role": "user", "content": q}]))
                                 for q in plan["questions"]]}
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "target": str(gguf),
              "machine": {"cpu": cpu_name(), "cpus": cpus}, "git": git_state(), "args": vars(args),
              "skipped": skipped, "prompts": plan_out, "arms": arms, "summary": summarize(arms, info)}
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    verdict = verdict_lines(result["summary"])
    (out_dir / "results.md").write_text(md + ("\n" + "\n".join(verdict) + "\n" if verdict else ""))
    print(md)
    for line in verdict:
        print(line)
    print(f"results in {out_dir}/")
    return 0


if __name__ == "__main__":
    # A SIGTERM unwinds like Ctrl-C, through the `finally` that stops the server being measured.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
