"""Target-only vs Dovetail, back to back in one run, on HumanEval prompts.

    python -m bench.pipeline --prompts 5 --max-new-tokens 128

Both runs go through the same target worker code on the same CPUs; a warm-up prompt
is run and discarded first in each configuration. Prints a table and writes every raw
figure as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from bench.report import machine


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct", help="target model (path or registry name)")
    p.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct", help="draft model (path or registry name)")
    p.add_argument("--draft-layers", type=int, default=None, help="use only the first N draft layers")
    p.add_argument("--draft-device", default="cpu", help="'cpu' or 'cuda:N' (default: cpu)")
    p.add_argument("--target-cpus", default=None, help="CPUs for the target (default: all)")
    p.add_argument("--dtype", default="auto", help="auto | bfloat16 | float32 | float64")
    p.add_argument("--prompts", type=int, default=5, help="number of HumanEval prompts (default: 5)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens per prompt (default: 128)")
    p.add_argument("--depth", type=int, default=None, help="draft depth (default: by draft device)")
    p.add_argument("--top-k", type=int, default=None, help="tree width; 1 = chain (default: by draft device)")
    p.add_argument("--max-nodes", type=int, default=None, help="most tree tokens (default: by draft device)")
    p.add_argument("--no-stop", action="store_true",
                   help="ignore end-of-text tokens so every prompt generates exactly --max-new-tokens")
    p.add_argument("--out", default="bench/out/pipeline.json", help="where to write the raw figures")
    return p


def run_config(name, launch_kwargs, prompts, max_new, bar) -> dict:
    import dovetail
    rows = []
    with dovetail.launch(**launch_kwargs) as coord:
        coord.generate(prompts[0], max_new_tokens=8)  # warm-up, discarded
        for i, prompt in enumerate(prompts):
            r = coord.generate(prompt, max_new_tokens=max_new)
            st = asdict(r.stats)
            st.update(prompt_index=i, token_ids=r.token_ids, mean_accepted=r.stats.mean_accepted,
                      tokens_per_s=r.stats.tokens_per_s, decode_tokens_per_s=r.stats.decode_tokens_per_s)
            rows.append(st)
            bar.update(1)
    tokens = sum(r["new_tokens"] for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    rounds = sum(r["rounds"] for r in rows)
    decode_s = sum(r["seconds"] - r["prefill_s"] for r in rows)
    return {"name": name, "per_prompt": rows, "tokens": tokens, "seconds": seconds, "decode_seconds": decode_s,
            "tokens_per_s": tokens / seconds, "decode_tokens_per_s": tokens / decode_s,
            "mean_accepted": sum(r["accepted"] for r in rows) / rounds,
            "draft_s": sum(r["draft_s"] for r in rows), "verify_s": sum(r["verify_s"] for r in rows),
            "wire_s": sum(r["wire_s"] for r in rows), "rounds": rounds}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from dovetail.models.prompts import load_humaneval
    prompts = [p["prompt"] for p in load_humaneval(limit=args.prompts)]
    common = dict(target=args.target, target_cpus=args.target_cpus, dtype=args.dtype)
    if args.no_stop:
        common["stop_token_ids"] = []
    configs = [("target-only", dict(common, draft=None)),
               ("dovetail", dict(common, draft=args.draft, draft_device=args.draft_device,
                                 draft_layers=args.draft_layers, depth=args.depth, top_k=args.top_k,
                                 max_nodes=args.max_nodes))]
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    with tqdm(total=len(configs) * len(prompts), desc="bench", unit="prompt") as bar:
        results = [run_config(name, kw, prompts, args.max_new_tokens, bar) for name, kw in configs]
    base, spec = results
    same = [a["token_ids"] == b["token_ids"] for a, b in zip(base["per_prompt"], spec["per_prompt"])]
    report = {"date": started, "machine": machine(None), "args": vars(args), "results": results,
              "greedy_match": sum(same) / len(same),
              "speedup": spec["tokens_per_s"] / base["tokens_per_s"],
              "decode_speedup": spec["decode_tokens_per_s"] / base["decode_tokens_per_s"]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\n{report['machine']}; {report['date']}\n")
    print("| system | new tokens | seconds | tok/s | decode tok/s | mean accepted / round | draft ms / round | verify ms / round |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.2f} | "
              f"{r['decode_tokens_per_s']:.2f} | {r['mean_accepted']:.2f} | {1000 * r['draft_s'] / r['rounds']:.0f} | "
              f"{1000 * r['verify_s'] / r['rounds']:.0f} |")
    print(f"\nspeedup {report['speedup']:.2f}x (decode only {report['decode_speedup']:.2f}x); greedy outputs "
          f"identical on {sum(same)}/{len(same)} prompts; raw figures in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
