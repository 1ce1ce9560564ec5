"""The transformers backend's batched verification: one padded forward against one per request.

    python -m bench.batch_layout --target qwen2.5-coder-0.5b-instruct --requests 1,2,4,8 --rows 1,4

For each shape (requests x rows each), the requests are prefilled with --ctx random tokens
(or, with --mixed, contexts spread from ctx/4 to ctx, so the padding to the longest costs
what it costs), then --repeats times, back to back: n verifications one after another
(HFBackend.verify) and one HFBackend.verify_many (CausalLM.forward_batch: the caches side
by side, padded to the longest, the trees padded to the biggest), each rolled back. Prints
the fastest time of each and the speed-up of the padded forward.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from dovetail.system.cpus import cpu_model


def measure(backend, vocab: int, n: int, rows: int, contexts: list[int], repeats: int) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(n * 100 + rows)
    seqs = [backend.new_sequence() for _ in range(n)]
    ids = [torch.randint(0, vocab, (c + rows,), generator=gen).tolist() for c in contexts]
    for seq, row, c in zip(seqs, ids, contexts):
        backend.prefill(seq, row[:c], hidden=False)
    trees = [(row[c + 1:c + rows], list(range(-1, rows - 2))) for row, c in zip(ids, contexts)]
    roots = [row[c] for row, c in zip(ids, contexts)]

    def rollback():
        for seq, c in zip(seqs, contexts):
            backend.rollback(seq, c)
    one_by_one, batched = [], []
    for _ in range(repeats + 1):  # the first of each is a warm-up
        t0 = time.perf_counter()
        for seq, root, (tokens, parents) in zip(seqs, roots, trees):
            backend.verify(seq, root, tokens, parents, hidden=False)
        one_by_one.append(time.perf_counter() - t0)
        rollback()
        t0 = time.perf_counter()
        backend.verify_many(seqs, roots, trees, [False] * n)
        batched.append(time.perf_counter() - t0)
        rollback()
    for seq in seqs:
        backend.release(seq)
    return min(one_by_one[1:]), min(batched[1:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.batch_layout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="qwen2.5-coder-0.5b-instruct", help="HF folder, GGUF or registry name")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the target's weights")
    p.add_argument("--requests", default="1,2,4,8", help="comma list: requests verified together")
    p.add_argument("--rows", default="1,4", help="comma list: rows per request (a root and a chain)")
    p.add_argument("--ctx", type=int, default=128, help="tokens of context per request")
    p.add_argument("--mixed", action="store_true", help="contexts spread from ctx/4 to ctx instead of all ctx")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per shape (the fastest counts)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    from dovetail.models.fetch import resolve_model
    from dovetail.workers.backend import HFBackend
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = HFBackend(str(resolve_model(args.target)), dtype=getattr(torch, args.dtype))
    vocab = backend.identity.vocab_size
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, {backend.identity.model} {args.dtype}, "
          f"context {'ctx/4..' if args.mixed else ''}{args.ctx}\n")
    print("| requests | rows each | one by one | one padded forward | speed-up |\n|---|---|---|---|---|")
    for n in (int(x) for x in args.requests.split(",")):
        contexts = ([args.ctx // 4 + (args.ctx - args.ctx // 4) * i // max(1, n - 1) for i in range(n)]
                    if args.mixed else [args.ctx] * n)
        for rows in (int(x) for x in args.rows.split(",")):
            alone, batched = measure(backend, vocab, n, rows, contexts, args.repeats)
            print(f"| {n} | {rows} | {1000 * alone:.1f} ms | {1000 * batched:.1f} ms | {alone / batched:.2f}x |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
