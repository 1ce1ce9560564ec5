"""python -m bench.concurrency: throughput with one vs several requests at once.

Tiny models (default): with one request at a time the draft idles while the target verifies
and the other way round; with several, one request's draft runs while another's
verification does. Runs the same requests (tiny random float32 models, greedy, a chain
draft) at each --active setting and prints tokens/s and how busy each worker was.

A real GGUF (--model qwen2.5-coder-1.5b-instruct): the llama.cpp backend on --cpus, ShareGPT
chat prompts, the same requests at every level in waves of N submitted at once for each
--concurrency N (so x1 is them one at a time): aggregate tokens/s and mean per-request latency for target-only and Dovetail (--draft, on the CPU),
against llama.cpp's own batched decoding of N sequences (llama-cpp-python's low-level API,
one sequence id per request, the same threads), systems taking turns level by level.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import dovetail
from tests.helpers import make_tiny_model


def run(target, draft, active: int, prompts: list[list[int]], max_new: int) -> dict:
    with dovetail.launch(target, draft, dtype="float32", draft_device="cpu", depth=3, top_k=1, max_nodes=3,
                         max_active=active) as coord:
        coord.generate(prompts[0], max_new_tokens=8)  # warm-up
        t0 = time.perf_counter()
        results = [h.result(600) for h in [coord.submit(p, max_new_tokens=max_new) for p in prompts]]
        wall = time.perf_counter() - t0
    tokens = sum(len(r.token_ids) for r in results)
    return {"active": active, "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "draft_busy": sum(r.stats.draft_s for r in results) / wall,
            "target_busy": sum(r.stats.verify_s + r.stats.prefill_s for r in results) / wall}


def llama_batched(llm_ctx, lib, prompts: list[list[int]], max_new: int, stop_ids) -> dict:
    """llama.cpp decoding len(prompts) sequences side by side: each prompt prefilled under its
    own sequence id, then one decode of one row per unfinished sequence per step, greedy. A
    sequence ends at a stop token, as our requests do: both systems do the same work."""
    import numpy as np
    ctx, vocab, batch = llm_ctx
    mem = lib.llama_get_memory(ctx)
    lib.llama_memory_clear(mem, True)
    t0 = time.perf_counter()

    def decode(rows):  # rows: (token, position, seq id, want logits)
        batch.n_tokens = len(rows)
        for i, (tok, pos, sid, want) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, want
            batch.seq_id[i][0] = sid
        if lib.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    nxt, done_s = [], {}
    for sid, p in enumerate(prompts):
        for a in range(0, len(p), 512):  # n_batch rows per decode
            decode([(t, i, sid, i == len(p) - 1) for i, t in enumerate(p) if a <= i < a + 512])
        logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, -1), shape=(vocab,))
        nxt.append(int(logits.argmax()))
    pos, made = [len(p) for p in prompts], [1] * len(prompts)
    live = [s for s in range(len(prompts)) if nxt[s] not in stop_ids and max_new > 1]
    done_s.update({s: time.perf_counter() - t0 for s in range(len(prompts)) if s not in live})
    while live:
        decode([(nxt[s], pos[s], s, True) for s in live])
        for i, s in enumerate(live):
            logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, i), shape=(vocab,))
            nxt[s] = int(logits.argmax())
            pos[s] += 1
            made[s] += 1
        live = [s for s in live if nxt[s] not in stop_ids and made[s] < max_new]
        done_s.update({s: time.perf_counter() - t0 for s in range(len(prompts)) if s not in live and s not in done_s})
    wall = time.perf_counter() - t0
    return {"tokens": sum(made), "seconds": wall, "latency_s": sum(done_s.values()) / len(prompts)}


def ours_wave(coord, prompts: list[list[int]], max_new: int) -> dict:
    t0 = time.perf_counter()
    results = [h.result(900) for h in [coord.submit(p, max_new_tokens=max_new) for p in prompts]]
    wall = time.perf_counter() - t0
    return {"tokens": sum(len(r.token_ids) for r in results), "seconds": wall,
            "latency_s": sum(r.stats.seconds for r in results) / len(results)}


def real_main(args) -> int:
    import json

    import llama_cpp

    from dovetail.models.fetch import resolve_model
    from dovetail.models.prompts import load_sharegpt_chats
    from dovetail.system.cpus import cpu_model, parse_cpus
    levels = [int(c) for c in args.concurrency.split(",")]
    cpus = parse_cpus(args.cpus) or sorted(os.sched_getaffinity(0))
    gguf = resolve_model(args.model)
    stops = {"stop_token_ids": []} if args.ignore_eos else {}
    systems = {"target-only": dovetail.launch(gguf, None, backend="llama.cpp", target_cpus=cpus,
                                              max_active=max(levels), **stops)}
    if args.draft != "none":
        systems["dovetail"] = dovetail.launch(gguf, args.draft, backend="llama.cpp", target_cpus=cpus,
                                              draft_device="cpu", force_draft=True, max_active=max(levels), **stops)
    lib = llama_cpp.llama_cpp
    lib.llama_backend_init()
    mparams = lib.llama_model_default_params()
    model = lib.llama_model_load_from_file(str(gguf).encode(), mparams)
    cparams = lib.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_seq_max, cparams.kv_unified = 8192, 512, max(levels), True
    cparams.n_threads = cparams.n_threads_batch = len(cpus)
    os.sched_setaffinity(0, cpus)
    ctx = lib.llama_init_from_model(model, cparams)
    batch = lib.llama_batch_init(512, 0, max(levels))
    vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model)))
    try:
        coord = next(iter(systems.values()))
        # Every level runs the same requests, in waves of its size: x1 is them one at a time.
        chats = load_sharegpt_chats(limit=max(levels) * args.waves)
        prompts = [coord.encode_prompt(c) for c in chats]
        stop_ids = set(coord.config.stop_token_ids or ())  # empty with --ignore-eos
        rows = []
        for c in levels:
            for name in [*systems, "llama.cpp batched"]:
                runs = []
                for w in range(0, len(prompts), c):
                    wave = prompts[w:w + c]
                    runs.append(llama_batched((ctx, vocab, batch), lib, wave, args.max_new_tokens, stop_ids)
                                if name == "llama.cpp batched" else ours_wave(systems[name], wave, args.max_new_tokens))
                tokens, seconds = sum(r["tokens"] for r in runs), sum(r["seconds"] for r in runs)
                rows.append({"system": name, "concurrency": c, "tokens": tokens, "seconds": seconds,
                             "tokens_per_s": tokens / seconds,
                             "latency_s": sum(r["latency_s"] for r in runs) / len(runs)})
                print(f"{name} x{c}: {tokens / seconds:.1f} tok/s", file=sys.stderr, flush=True)
    finally:
        for coord in systems.values():
            coord.close()
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)
        lib.llama_model_free(model)
    print(f"{cpu_model()}, {len(cpus)} CPUs, {gguf.name}, {args.max_new_tokens} tokens per request"
          f"{' (end-of-text ignored)' if args.ignore_eos else ' at most'}, "
          f"the same {len(prompts)} requests at every level\n")
    print("| system | concurrent | tokens | seconds | tok/s | mean latency |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['system']} | {r['concurrency']} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.1f} | "
              f"{r['latency_s']:.2f} s |")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": cpu_model(), "cpus": len(cpus), "model": gguf.name,
                                              "max_new_tokens": args.max_new_tokens, "ignore_eos": args.ignore_eos,
                                              "rows": rows}, indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.concurrency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a GGUF (file or registry name): the real-model measurement")
    p.add_argument("--draft", default="auto", help="with --model: Dovetail's draft, or none (default: auto)")
    p.add_argument("--concurrency", default="1,2,4,8", help="with --model: requests submitted at once")
    p.add_argument("--waves", type=int, default=1, help="with --model: the requests are max(--concurrency) x this, run "
                   "in waves of each level's size")
    p.add_argument("--ignore-eos", action="store_true",
                   help="with --model: every request makes --max-new-tokens tokens (decoding, not prompts, dominates)")
    p.add_argument("--cpus", default=None, help="with --model: CPUs for every system (default: all)")
    p.add_argument("--out", default=None, help="with --model: write the rows as JSON here")
    p.add_argument("--active", default="1,4", help="comma list of max_active settings to compare")
    p.add_argument("--requests", type=int, default=16, help="requests submitted at once")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per request")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the tiny models")
    args = p.parse_args(argv)
    if args.model:
        return real_main(args)
    prompts = [[2 + (5 * i + j) % 60 for j in range(4 + i)] for i in range(args.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        target = make_tiny_model(Path(tmp) / "t", seed=0, attention_gain=4.0, hidden_size=args.hidden, layers=4)
        draft = make_tiny_model(Path(tmp) / "d", seed=1, noise_from=target, noise=0.002, hidden_size=args.hidden,
                                layers=4)
        rows = [run(target, draft, int(a), prompts, args.max_new_tokens) for a in args.active.split(",")]
    print("| max_active | tokens | seconds | tok/s | draft busy | target busy |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['active']} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{r['draft_busy']:.0%} | {r['target_busy']:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
