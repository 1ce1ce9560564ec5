"""What a free draft read from the text itself (prompt lookup) could gain on a CPU verifier.

    python -m bench.lookup --target qwen2.5-coder-1.5b-instruct --verify-ms 36,60,81,98,119,142,162

Prompt-lookup decoding drafts at no cost: it finds the latest earlier occurrence of the last
n tokens of the text (prompt plus answer so far) and proposes the tokens that followed it.
Code repeats names and signatures, so this is the cheapest possible draft. This replays the
target's recorded greedy answers to HumanEval problems 0..39 (as bench.ablation does) and
charges every round the target's verify cost for the tokens it checks (--verify-ms, as
bench.gating), with zero draft time and zero wire time, under two policies:

- gated: propose up to --max-draft tokens only where the match is at least g tokens long,
  for every g and length in the grid (the best is printed);
- oracle: at every position the draft length that minimises the total time, knowing in
  advance how much of each proposal the target accepts (dynamic programming over the
  answer): no gate can do better with this proposer.

Both speeds are against target-only decoding, verify_ms(1) per token.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.lookup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="the target (.gguf, HF folder or registry name)")
    p.add_argument("--verify-ms", required=True,
                   help="the target's verify cost for k = 1, 2, ... tokens in ms (bench.verify_curve), comma-separated")
    p.add_argument("--max-draft", type=int, default=6, help="longest proposal (at most len(--verify-ms) - 1)")
    p.add_argument("--max-match", type=int, default=4, help="longest suffix looked up (tokens)")
    p.add_argument("--problems", default="0:40", metavar="A:B", help="held-out HumanEval problems")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer tokens replayed per problem")
    p.add_argument("--answer-len", type=int, default=192, help="--max-new-tokens the answers were recorded with")
    p.add_argument("--cache-dir", default=None, help="cache root (default ~/.cache/dovetail)")
    p.add_argument("--out", default=None, help="also write the results here (JSON)")
    return p


def lookup(text: list[int], max_match: int, length: int) -> tuple[list[int], int]:
    """(proposal, match length): the ``length`` tokens after the latest earlier occurrence
    of the longest suffix of ``text`` (at most ``max_match`` tokens) seen before."""
    for n in range(min(max_match, len(text) - 1), 0, -1):
        key = text[-n:]
        for s in range(len(text) - n - 1, -1, -1):
            if text[s:s + n] == key:
                return text[s + n:s + n + length], n
    return [], 0


def accepted(proposal: list[int], truth: list[int]) -> int:
    """Leading proposal tokens that equal the target's own continuation."""
    n = 0
    while n < len(proposal) and n < len(truth) and proposal[n] == truth[n]:
        n += 1
    return n


def answer_proposals(tokens: list[int], start: int, end: int, max_match: int, length: int):
    """For every position i in [start, end): (proposal, match length, accepted) from text[:i]."""
    out = []
    for i in range(start, end):
        prop, n = lookup(tokens[:i], max_match, length)
        prop = prop[:max(0, end - i - 1)]  # the answer ends: nothing to draft past it
        out.append((prop, n, accepted(prop, tokens[i:end])))
    return out


def gated_ms(props, verify_ms: list[float], min_match: int, length: int) -> tuple[float, int]:
    """(total ms, rounds) drafting ``length`` tokens wherever the match is >= ``min_match``."""
    i = ms = rounds = 0
    while i < len(props):
        prop, n, acc = props[i]
        keep = min(len(prop), length) if n >= min_match else 0
        ms += verify_ms[keep]
        rounds += 1
        i += min(acc, keep) + 1
    return ms, rounds


def oracle_ms(props, verify_ms: list[float], length: int) -> float:
    """The least total ms over every choice of draft length per round, knowing acceptance."""
    best = [0.0] * (len(props) + 1)
    for i in range(len(props) - 1, -1, -1):
        acc = min(props[i][2], length)
        # keeping more than is accepted only costs more, so a round keeps 0..acc tokens
        best[i] = min(verify_ms[keep] + best[min(i + keep + 1, len(props))] for keep in range(acc + 1))
    return best[0]


def run(answers, verify_ms: list[float], max_draft: int, max_match: int, max_new: int) -> dict:
    props = [answer_proposals(a.tokens.tolist(), a.prompt_len, min(len(a.tokens), a.prompt_len + max_new),
                              max_match, max_draft) for a in answers]
    tokens = sum(map(len, props))
    base = tokens * verify_ms[0]
    grid = []
    for length in range(1, max_draft + 1):
        for g in range(1, max_match + 1):
            ms, rounds = map(sum, zip(*(gated_ms(p, verify_ms, g, length) for p in props)))
            grid.append({"max_draft": length, "min_match": g, "tau": tokens / rounds, "speed": base / ms})
    oracle = sum(oracle_ms(p, verify_ms, max_draft) for p in props)
    hits = [acc for p in props for (_, n, acc) in p if n]
    return {"tokens": tokens, "best_gated": max(grid, key=lambda r: r["speed"]), "oracle_speed": base / oracle,
            "positions_with_a_match": len(hits) / tokens,
            "mean_accepted_where_matched": sum(hits) / len(hits) if hits else 0.0, "grid": grid}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from bench.ablation import recorded_answers
    from bench.gating import parse_verify_ms
    from dovetail.draft.checkpoint import load_target_pieces
    from dovetail.models.fetch import resolve_model
    verify_ms = parse_verify_ms(args.verify_ms)
    if not 1 <= args.max_draft < len(verify_ms):
        raise SystemExit(f"--max-draft must be 1..{len(verify_ms) - 1} (one less than the --verify-ms values)")
    pieces = load_target_pieces(resolve_model(args.target))
    answers, problems = recorded_answers(args, pieces)
    out = {"target": pieces.identity.name, "problems": problems, "verify_ms": verify_ms,
           **run(answers, verify_ms, args.max_draft, args.max_match, args.max_new_tokens)}
    g = out["best_gated"]
    print(f"{out['tokens']} answer tokens; a suffix match at {out['positions_with_a_match']:.0%} of positions, "
          f"{out['mean_accepted_where_matched']:.2f} proposed tokens accepted there on average")
    print(f"best gated (up to {g['max_draft']} tokens where the match is >= {g['min_match']}): "
          f"tau {g['tau']:.3f}, speed x{g['speed']:.3f} vs target-only")
    print(f"oracle gate: speed x{out['oracle_speed']:.3f} vs target-only (a free draft, no wire time)")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
