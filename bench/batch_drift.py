"""How much a row's logits move with the size of the verify it is part of.

    python -m bench.batch_drift                                  # the 1.5B GGUF on llama.cpp
    python -m bench.batch_drift --backend transformers --target DIR --dtype float64

Greedy speculative decoding reproduces target-only decoding exactly only if row 0 of a
k-row verify gets the logits a 1-row decode gets. Per context length this prints
max |logit(row 0 of k rows) - logit(1 row)| over the vocabulary, on a synthetic prompt:
0 means bitwise equal; llama.cpp's CPU kernels switch code paths with the batch size.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.batch_drift", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct", help="GGUF, HF folder or registry name")
    p.add_argument("--backend", default="llama.cpp", choices=("llama.cpp", "transformers"), help="target backend")
    p.add_argument("--dtype", default="auto", help="transformers backend only: auto | bfloat16 | float32 | float64")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: the CPUs this process has)")
    p.add_argument("--contexts", default="100,300", help="prompt lengths, comma separated")
    p.add_argument("--k", default="1,2,3,4,8,16", help="verify sizes, comma separated (1 is the reference)")
    return p


def drift(backend, context: int, ks: list[int], vocab: int) -> dict[int, float]:
    """{k: max |logit(row 0 of a k-token chain) - logit(the root alone)|} at ``context``."""
    ids = [(1000 + 7 * i) % vocab for i in range(context)]
    seq = backend.new_sequence()
    try:
        backend.prefill(seq, ids[:-1], hidden=False)
        ref, out = None, {}
        for k in [1] + [k for k in ks if k != 1]:
            chain = [(2000 + j) % vocab for j in range(k - 1)]
            row0 = backend.verify(seq, ids[-1], chain, list(range(-1, k - 2)), hidden=False).logits[0].double()
            backend.rollback(seq, context - 1)  # drops the verify's rows (and scratch sequences) itself
            ref = row0 if ref is None else ref
            out[k] = float((row0 - ref).abs().max())
        return out
    finally:
        backend.release(seq)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import os

    from dovetail.models.fetch import resolve_model
    target = str(resolve_model(args.target))
    if args.backend == "llama.cpp":
        from dovetail.workers.llama import LlamaBackend
        backend = LlamaBackend(target, threads=args.threads or len(os.sched_getaffinity(0)))
    else:
        from dovetail.workers.backend import HFBackend
        from dovetail.models.loading import choose_dtype
        backend = HFBackend(target, dtype=choose_dtype(args.dtype, "cpu"))
    ks = [int(k) for k in args.k.split(",")]
    for context in (int(c) for c in args.contexts.split(",")):
        d = drift(backend, context, ks, backend.identity.vocab_size)
        print(f"context {context}: " + ", ".join(f"k={k}: {v:.3f}" for k, v in sorted(d.items())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
