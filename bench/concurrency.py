"""python -m bench.concurrency: throughput and device occupancy with one vs several active requests.

With one request at a time the draft idles while the target verifies and the other way
round; with several, one request's draft runs while another's verification does. Runs the
same requests (tiny random float32 models, greedy, a chain draft) at each --active setting
and prints tokens/s and how busy each worker was (its compute seconds / wall time).
"""
from __future__ import annotations

import argparse
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.concurrency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--active", default="1,4", help="comma list of max_active settings to compare")
    p.add_argument("--requests", type=int, default=16, help="requests submitted at once")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per request")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the tiny models")
    args = p.parse_args(argv)
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
