"""How often a seeded request gives the same text with a draft as without one, on llama.cpp.

    python -m bench.seed_match --target qwen2.5-coder-0.5b-instruct --seeds 20 --prompts 3

A seed keys the target's draw at each absolute position (dovetail/spec/sampling.py), so a
seeded request's text does not depend on the draft tree: exactly so on the transformers
backend (tests), and on llama.cpp up to its batch-dependent near ties (a row's logits differ
slightly with the rows beside it in a forward; bench/batch_drift.py measures how much). This
counts the seeded texts that equal target-only decoding's, for one request at a time and for
--concurrency requests at once (several requests' trees share the target's forwards), and for
greedy decoding under a JSON schema (structured output, same rule). For each difference it
gives the first differing position.

Each configuration runs in its own coordinator (target-only: no draft; drafted: --draft, the
suffix draft by default), one after the other on the same CPUs.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "language": {"enum": ["python", "c", "rust", "go"]},
    "lines": {"type": "integer", "minimum": 1, "maximum": 500},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4}},
    "required": ["name", "language", "lines", "tags"], "additionalProperties": False}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.seed_match", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="qwen2.5-coder-0.5b-instruct", help="GGUF target (path or registry name)")
    p.add_argument("--draft", default="suffix", help="the drafted configuration's draft (default: suffix)")
    p.add_argument("--seeds", type=int, default=20, help="seeds per prompt (default: 20)")
    p.add_argument("--prompts", type=int, default=3, help="first N HumanEval prompts (default: 3)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per request (default: 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default: 0.8)")
    p.add_argument("--concurrency", type=int, default=4, help="requests at once in the loaded run (default: 4)")
    p.add_argument("--target-cpus", default=None, help="CPUs for the target, e.g. '0-1' (default: all)")
    p.add_argument("--out", default="bench/out/seed_match.json", help="JSON output")
    return p


def first_difference(a: list[int], b: list[int]) -> int | None:
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return None if a == b else n


def run_all(coord, jobs: list[dict], concurrency: int) -> list[list[int]]:
    """Each job's token ids, ``concurrency`` requests in flight at a time."""
    out: list = [None] * len(jobs)
    it = iter(enumerate(jobs))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                nxt = next(it, None)
            if nxt is None:
                return
            i, job = nxt
            out[i] = coord.generate(**job).token_ids

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import dovetail
    from dovetail.models.fetch import resolve_model
    from dovetail.models.prompts import load_humaneval

    target = resolve_model(args.target)
    prompts = [p["prompt"] for p in load_humaneval(limit=args.prompts)]
    sampled = [dict(prompt=[{"role": "user", "content": "Complete this function:\n" + p}], seed=seed,
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature)
               for p in prompts for seed in range(args.seeds)]
    schema_jobs = [dict(prompt=[{"role": "user", "content": "Describe this code as JSON:\n" + p}],
                        max_new_tokens=160, temperature=0.0, grammar=("json_schema", SCHEMA)) for p in prompts]
    kw = dict(backend="llama.cpp", target_cpus=args.target_cpus)
    results = {}
    t0 = time.perf_counter()
    with dovetail.launch(str(target), None, **kw) as coord:
        results["target_only"] = run_all(coord, sampled, 1)
        results["target_only_schema"] = run_all(coord, schema_jobs, 1)
    with dovetail.launch(str(target), args.draft, **kw) as coord:
        draft = (coord.draft_info.model if coord.draft_info else "") + (" suffix" if coord.suffix else "")
        results["drafted"] = run_all(coord, sampled, 1)
        results["drafted_loaded"] = run_all(coord, sampled, args.concurrency)
        results["drafted_schema"] = run_all(coord, schema_jobs, 1)
        tok = coord.tokenizer
    report = {"target": str(target), "draft": draft.strip(), "seeds": args.seeds, "prompts": len(prompts),
              "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
              "concurrency": args.concurrency, "seconds": round(time.perf_counter() - t0, 1), "runs": {}}
    for name, ref_name in (("drafted", "target_only"), ("drafted_loaded", "target_only"),
                           ("drafted_schema", "target_only_schema")):
        ref, got = results[ref_name], results[name]
        diffs = [first_difference(a, b) for a, b in zip(ref, got)]
        report["runs"][name] = {"requests": len(ref), "equal": sum(d is None for d in diffs),
                                "first_difference_at": [d for d in diffs if d is not None]}
    valid = 0
    for ids in results["target_only_schema"] + results["drafted_schema"]:
        try:
            json.loads(tok.decode(ids, skip_special_tokens=True))
            valid += 1
        except ValueError:
            pass
    report["schema_outputs_that_parse"] = f"{valid}/{2 * len(schema_jobs)}"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    for name, r in report["runs"].items():
        print(f"{name:16s} {r['equal']}/{r['requests']} equal to target-only"
              + (f"; first differences at {r['first_difference_at']}" if r["first_difference_at"] else ""))
    print(f"schema outputs that parse: {report['schema_outputs_that_parse']}; {report['seconds']} s; "
          f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
