"""What a CPU draft could gain on a compute-bound CPU verifier, from its own confidence.

    python -m bench.gating --target qwen2.5-coder-1.5b-instruct --draft dovetail/draft/shipped/qwen2.5-coder-1.5b-dgf1 \\
        --verify-ms 37,60,85,96,118,140,160

Where verifying k tokens costs nearly k single steps (llama.cpp on two cores: every extra
token ~60% of a step), a draft token pays only when it is likely to be accepted. This
replays the target's recorded greedy answers to HumanEval problems 0..39 (as bench.ablation
does): every round the draft proposes a chain of up to --depth tokens with its path
probabilities (DraftProposal.scores), and the round keeps the first l of them, l chosen to
maximise expected tokens per millisecond: (1 + sum of the kept path probabilities) /
(verify_ms(l + 1) + draft cost). The next round starts where this one's commit ends, so
the policy's own rounds are replayed. It prints tokens per round, the draft's calibration
and the speed against target-only decoding (verify_ms(1) per token) twice: with the draft's
measured time per round, and with a free draft (the bound a faster draft could reach).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gating", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="the target (.gguf, HF folder or registry name)")
    p.add_argument("--draft", required=True, help="feature-draft checkpoint folder, or lm:MODEL")
    p.add_argument("--verify-ms", required=True,
                   help="the target's verify cost for k = 1, 2, ... tokens in ms (bench.verify_curve), comma-separated")
    p.add_argument("--depth", type=int, default=6, help="longest chain the draft proposes")
    p.add_argument("--problems", default="0:40", metavar="A:B", help="held-out HumanEval problems")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N recorded answers")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer tokens replayed per problem")
    p.add_argument("--answer-len", type=int, default=192, help="--max-new-tokens the answers were recorded with")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the draft (default: torch's)")
    p.add_argument("--dtype", default="auto",
                   help="feature draft dtype: auto (what the draft worker picks: bf16 where the CPU has it), float32")
    p.add_argument("--draft-quantize", default="none", choices=("none", "int8"),
                   help="int8 weights for the feature draft (as dovetail-launch --draft-quantize int8)")
    p.add_argument("--cache-dir", default=None, help="cache root (default ~/.cache/dovetail)")
    p.add_argument("--out", default=None, help="also write the results here (JSON)")
    return p


def parse_verify_ms(text: str) -> list[float]:
    """--verify-ms: the target's verify cost for k = 1, 2, ... tokens."""
    verify_ms = [float(x) for x in text.split(",")]
    if len(verify_ms) < 2 or any(v <= 0 for v in verify_ms):
        raise SystemExit("--verify-ms needs the positive cost of k = 1, 2, ... tokens (at least two)")
    return verify_ms


def draft_cost(keep: int, depth: int, ms_per_level: float) -> float:
    """A gated draft computes one level past what it keeps (to see that it stops paying)."""
    return ms_per_level * min(keep + 1, depth)


def best_length(probs: list[float], verify_ms: list[float], ms_per_level: float) -> int:
    """Draft tokens to keep (0..len(probs)): the most expected tokens per millisecond."""
    def rate(n: int) -> float:
        return (1 + sum(probs[:n])) / (verify_ms[n] + draft_cost(n, len(probs), ms_per_level))
    return max(range(min(len(probs), len(verify_ms) - 1) + 1), key=rate)


def replay(handler, answers, depth: int, verify_ms: list[float], free: bool, max_new: int) -> dict:
    """Rounds of the gated policy over the recorded answers (see the module docstring).
    Each round is charged the levels it computed at the draft's measured time per level
    (its chain's time / depth; a prompt's first round includes the prompt), or nothing
    when ``free``."""
    from dovetail.training.distill import accepted_length, replay_rounds
    kept = ms = draft_s = 0.0
    calib: dict[int, list[int]] = {}  # probability decile -> [tokens, accepted]

    def commit(prop, truth: list[int]) -> int:
        nonlocal kept, ms, draft_s
        probs = [math.exp(s) for s in prop.scores]
        got = accepted_length(prop.tokens, prop.parents, truth)
        for j, p in enumerate(probs):
            cell = calib.setdefault(min(9, int(10 * p)), [0, 0])
            cell[0] += 1
            cell[1] += got > j
        per_level = 0.0 if free or not probs else 1000 * prop.seconds / len(probs)
        keep = best_length(probs, verify_ms, per_level)
        kept += keep
        ms += verify_ms[keep] + (draft_cost(keep, len(probs), per_level) if probs else 0.0)
        draft_s += prop.seconds
        return min(min(got, keep) + 1, len(truth))

    lengths = replay_rounds(handler, answers, depth, 1, depth, max_new, commit)
    rounds, committed = sum(map(len, lengths)), sum(map(sum, lengths))
    return {"rounds": rounds, "committed": committed, "tau": committed / rounds,
            "kept_per_round": kept / rounds, "draft_ms_per_chain": 1000 * draft_s / rounds,
            "speed_vs_target_only": committed * verify_ms[0] / ms,
            "calibration": {f"{k / 10:.1f}-{(k + 1) / 10:.1f}": {"tokens": v[0], "accepted": round(v[1] / v[0], 3)}
                            for k, v in sorted(calib.items())}}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from bench.ablation import load_handler, recorded_answers
    from dovetail.draft.checkpoint import load_target_pieces
    from dovetail.models.fetch import resolve_model
    if args.threads:
        torch.set_num_threads(args.threads)
    verify_ms = parse_verify_ms(args.verify_ms)
    pieces = load_target_pieces(resolve_model(args.target))
    answers, problems = recorded_answers(args, pieces)
    handler = load_handler(args.draft, pieces)
    if hasattr(handler, "model"):
        from dovetail.models.loading import choose_dtype
        handler.model.to(choose_dtype(args.dtype, "cpu"))
    if args.draft_quantize == "int8":
        from dovetail.workers.feature_draft import quantize_feature_draft
        if not hasattr(handler, "model"):
            raise SystemExit("--draft-quantize int8 is for a feature draft")
        quantize_feature_draft(handler.model)
    out = {"target": pieces.identity.name, "draft": args.draft, "draft_quantize": args.draft_quantize,
           "draft_dtype": str(getattr(getattr(handler, "model", None), "dtype", "n/a")),
           "problems": problems, "verify_ms": verify_ms,
           "depth": args.depth, "torch_threads": torch.get_num_threads(),
           "measured_draft": replay(handler, answers, args.depth, verify_ms, False, args.max_new_tokens),
           "free_draft": replay(handler, answers, args.depth, verify_ms, True, args.max_new_tokens)}
    for name in ("measured_draft", "free_draft"):
        r = out[name]
        print(f"{name}: tau {r['tau']:.3f}, draft tokens kept {r['kept_per_round']:.2f}/round, "
              f"draft {r['draft_ms_per_chain']:.1f} ms per {args.depth}-token chain, speed x{r['speed_vs_target_only']:.3f} vs target-only")
    print("calibration (draft path probability -> share accepted):",
          json.dumps(out["free_draft"]["calibration"]))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
