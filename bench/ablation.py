"""Draft ablation on held-out HumanEval: mean tokens per round (tau) for drafts x tree sizes.

    python -m bench.ablation --target qwen2.5-coder-1.5b-instruct \\
        --draft eagle-1L=drafts/eagle1 --draft dgf-1L=drafts/dgf1 --draft 0.5B=lm:qwen2.5-coder-0.5b-instruct \\
        --nodes 4,8,16 --out bench/results/ablation-1.5b.json

Greedy tau comes from replaying the target's recorded greedy answers to problems 0..39
(``dovetail-train extract --source humaneval --problems 0:40``) through each draft worker's
own handler (dovetail/training/distill.py): for greedy decoding that is what the live pipeline
commits, with no target running, so every draft and tree size is measured on exactly the
same text. ``dovetail-train eval`` and ``python -m bench`` run the live pipeline.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

# (depth, top_k) per tree size: EAGLE-2 growth keeps the max_nodes best paths.
SHAPES = {4: (4, 2), 8: (6, 3), 16: (6, 4), 32: (8, 4)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="the target (.gguf, HF folder or registry name)")
    p.add_argument("--draft", action="append", required=True, metavar="NAME=PATH",
                   help="a feature-draft checkpoint folder (full:FOLDER: with the target's whole vocabulary "
                        "as its head), or lm:MODEL for a standalone draft LM (repeatable)")
    p.add_argument("--nodes", default="4,8,16", help=f"tree sizes, from {sorted(SHAPES)}")
    p.add_argument("--depth", type=int, default=None,
                   help="tree depth for every size (default: per size, "
                        f"{ {n: d for n, (d, _) in SHAPES.items()} })")
    p.add_argument("--top-k", type=int, default=None,
                   help="nodes expanded per level and children per node, for every size (default: per size, "
                        f"{ {n: k for n, (_, k) in SHAPES.items()} }); the tree keeps the best --nodes either way")
    p.add_argument("--problems", default="0:40", metavar="A:B", help="held-out HumanEval problems")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N recorded answers")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer tokens replayed per problem")
    p.add_argument("--answer-len", type=int, default=192, help="--max-new-tokens the answers were recorded with")
    p.add_argument("--cache-dir", default=None, help="cache root (default ~/.cache/dovetail)")
    p.add_argument("--out", default=None, help="also write the results here (JSON)")
    return p


def load_handler(spec: str, pieces):
    """A draft worker's handler, in this process, on the CPU."""
    if spec.startswith("lm:"):
        from dovetail.models.fetch import resolve_model
        from dovetail.workers.draft import DraftConfig, DraftHandler
        from dovetail.models.loading import load_tokenizer, tokenizer_hash
        from dovetail.workers.hf import CausalLM
        path = str(resolve_model(spec.removeprefix("lm:")))
        lm = CausalLM.load(path, dtype=torch.bfloat16)
        cfg = DraftConfig(bind="ipc:///unused", model=path)
        return DraftHandler(lm, cfg, tokenizer_hash(load_tokenizer(path), lm.vocab_size))
    from dovetail.draft.checkpoint import load_feature_draft
    from dovetail.workers.feature_draft import FeatureDraftHandler
    full = spec.startswith("full:")  # the trained draft with the target's whole vocabulary as its head
    spec = spec.removeprefix("full:")
    model = load_feature_draft(spec, pieces)
    if full:
        model.vocab_ids = torch.arange(pieces.identity.vocab_size)
        model.head_weight = pieces.head.float().clone()
    return FeatureDraftHandler(model, pieces.identity.tokenizer_hash, name=Path(spec).name)


def recorded_answers(args, pieces) -> tuple[list, str]:
    """(the target's recorded greedy answers to --problems, first --limit of them; "A:B"), as
    ``dovetail-train extract --source humaneval`` cached them for --answer-len tokens."""
    from dovetail.training.distill import read_answers
    from dovetail.training.cli import answers_dir, problem_range
    a, b = problem_range(args.problems)
    answers = read_answers(answers_dir(pieces.identity, args.cache_dir, a, b, args.answer_len))
    answers = answers[:getattr(args, "limit", None)]
    if not answers:
        raise SystemExit(f"no recorded answers: run `dovetail-train extract --target {args.target} --source humaneval "
                         f"--problems {a}:{b} --max-new-tokens {args.answer_len}` first")
    return answers, f"{a}:{b}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from dovetail.training.distill import offline_tau
    from dovetail.draft.checkpoint import load_target_pieces
    from dovetail.models.fetch import resolve_model
    nodes = [int(n) for n in args.nodes.split(",")]
    if bad := [n for n in nodes if n not in SHAPES]:
        raise SystemExit(f"--nodes {bad}: choose from {sorted(SHAPES)}")
    if (args.top_k is not None and args.top_k < 1) or (args.depth is not None and args.depth < 1):
        raise SystemExit("--depth and --top-k must be at least 1")
    target = resolve_model(args.target)
    pieces = load_target_pieces(target)
    answers, problems = recorded_answers(args, pieces)
    rows = []
    for item in args.draft:
        name, _, spec = item.partition("=")
        handler = load_handler(spec, pieces)
        for n in nodes:
            depth, top_k = args.depth or SHAPES[n][0], args.top_k or SHAPES[n][1]
            t0 = time.perf_counter()
            got = offline_tau(handler, answers, depth, top_k, n, max_new=args.max_new_tokens)
            row = {"draft": name, "spec": spec, "nodes": n, "depth": depth, "top_k": top_k,
                   "tau": round(got["tau"], 3), "rounds": got["rounds"], "committed": got["committed"],
                   "draft_ms_per_round": round(got["draft_ms_per_round"], 1),
                   "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"target": pieces.identity.name, "problems": problems,
                                              "max_new_tokens": args.max_new_tokens, "torch_threads":
                                              torch.get_num_threads(), "rows": rows}, indent=1))
    return 0


def table(rows: list[dict]) -> str:
    nodes = sorted({r["nodes"] for r in rows})
    names = list(dict.fromkeys(r["draft"] for r in rows))
    out = ["| draft | " + " | ".join(f"tau @{n} tokens" for n in nodes) + " |",
           "|---|" + "---|" * len(nodes)]
    for name in names:
        cells = {r["nodes"]: f"{r['tau']:.2f}" for r in rows if r["draft"] == name}
        out.append(f"| {name} | " + " | ".join(cells.get(n, "-") for n in nodes) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
