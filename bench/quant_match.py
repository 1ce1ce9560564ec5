"""How often the int8 target's greedy output matches the unquantized target's, and how fast.

    python -m bench.quant_match --prompts 2 --max-new-tokens 64 --target-cpus 0-1

An int8 target is a different model, so this is a quality figure, not a losslessness
check (speculative decoding is lossless relative to whichever target verifies). For each
of the first --prompts HumanEval prompts, each variant decodes target-only, in process,
through the target handler (one token per verification, as the target-only baseline
does); reports the matching prefix, matching positions and decode tokens/s.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.quant_match", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct", help="target model (path or registry name)")
    p.add_argument("--prompts", type=int, default=2, help="first N HumanEval prompts (default: 2)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="greedy tokens per prompt (default: 64)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="dtype of both variants; auto = bfloat16 where the CPU has native bf16 (default: auto)")
    p.add_argument("--quantize", default="int8", help="the variant compared with 'none' (default: int8)")
    p.add_argument("--target-cpus", default=None, help="CPUs to pin to, e.g. '0-3' (default: all)")
    p.add_argument("--out", default="bench/out/quant_match.json", help="JSON output")
    return p


def decode(backend, prompt: list[int], n: int) -> tuple[list[int], float]:
    """Target-only greedy tokens and decode seconds (after the prefill)."""
    from tests.helpers import HandlerSession
    from dovetail.workers.target import TargetConfig, TargetHandler
    handler = TargetHandler(backend, TargetConfig(bind="inproc://match", model="-"))
    session = HandlerSession(handler, 1, prompt)
    t0 = time.perf_counter()
    tokens = session.decode(n)
    return tokens, time.perf_counter() - t0


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from dovetail.system.cpus import parse_cpus, pin_process
    from dovetail.models.fetch import resolve_model
    from dovetail.models.prompts import load_humaneval
    from dovetail.workers.backend import HFBackend
    from dovetail.models.loading import choose_dtype, load_tokenizer

    cpus = pin_process(parse_cpus(args.target_cpus))
    target = resolve_model(args.target)
    dtype = choose_dtype(args.dtype, "cpu")
    tok = load_tokenizer(target)
    prompts = [tok.encode(p["prompt"]) for p in load_humaneval(limit=args.prompts)]
    runs = {}
    for quantize in ("none", args.quantize):  # one model in memory at a time
        backend = HFBackend(str(target), dtype=dtype, quantize=quantize)
        decode(backend, prompts[0][:16], 4)  # warm-up, discarded
        runs[backend.identity.dtype] = [decode(backend, p, args.max_new_tokens) for p in prompts]
        del backend
    (base, base_runs), (other, other_runs) = runs.items()
    rows = []
    for i, ((a, ta), (b, tb)) in enumerate(zip(base_runs, other_runs)):
        rows.append({"prompt": i, "prefix_match": common_prefix(a, b), "same_position": sum(x == y for x, y in zip(a, b)),
                     "tokens": len(a), f"{base}_tok_s": len(a) / ta, f"{other}_tok_s": len(b) / tb,
                     base: a, other: b})
    report = {"target": str(target), "cpus": cpus, "max_new_tokens": args.max_new_tokens, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"| prompt | identical prefix | same token at position | {base} tok/s | {other} tok/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['prompt']} | {r['prefix_match']}/{r['tokens']} | {r['same_position']}/{r['tokens']} | "
              f"{r[base + '_tok_s']:.2f} | {r[other + '_tok_s']:.2f} |")
    print(f"\nin {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
