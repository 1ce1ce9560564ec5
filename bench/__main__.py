"""python -m bench: every system back to back, on the same prompts, in one run.

    python -m bench --quick            # 3 HumanEval prompts x 48 tokens, greedy and T=1
    python -m bench --prompts 20 --max-new-tokens 128 --target-cpus 0-31

Systems: target-only decoding through our target worker (the baseline); Dovetail with
each --draft; Hugging Face assisted generation with the same target and draft; llama.cpp
CPU-only decoding of the target GGUF (skipped with a line when llama-cpp-python is
missing). Every system produces exactly --max-new-tokens per prompt (end-of-text is
ignored) with the same thread count, after one discarded warm-up prompt. Writes
results.json (every raw figure), results.md (the table) and PNG plots to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from bench import report, systems
from dovetail.models.options import LLAMA_EXTRA_BUFFERS as EXTRA_BUFFER_SETTINGS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct", help="target: GGUF, HF folder or registry name")
    p.add_argument("--draft", action="append", default=None,
                   help="a draft model for Dovetail and HF assisted generation; repeat for several "
                        "(default: qwen2.5-coder-0.5b-instruct)")
    p.add_argument("--prompts-file", default=None, help="JSONL of {'prompt': ...} or {'messages': [...]} (default: HumanEval)")
    p.add_argument("--prompt-set", default="humaneval", choices=("humaneval", "sharegpt"),
                   help="without --prompts-file: HumanEval problems, or first user turns of ShareGPT chats held "
                        "out from draft training (default: humaneval)")
    p.add_argument("--prompts", type=int, default=10, help="how many prompts (default: 10; --quick: 3)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens per prompt (default: 128; --quick: 48)")
    p.add_argument("--modes", default="greedy,sample", help="comma list of greedy (T=0) and sample (T=1)")
    p.add_argument("--systems", default="target-only,dovetail,hf-assisted,llama.cpp",
                   help="comma list of systems to run (default: all)")
    p.add_argument("--backends", default="transformers",
                   help="comma list of target backends for target-only and Dovetail: transformers, llama.cpp")
    p.add_argument("--depth", type=int, default=None, help="fix Dovetail's draft depth (default: sized automatically)")
    p.add_argument("--top-k", type=int, default=None, help="fix the children per tree node (1: chains)")
    p.add_argument("--max-nodes", type=int, default=None, help="fix the most tree tokens per verification")
    p.add_argument("--auto-tree", action="store_true",
                   help="size Dovetail's drafts automatically even with --depth/--max-nodes (they cap it)")
    p.add_argument("--gate", action=argparse.BooleanOptionalAction, default=None,
                   help="Dovetail proposes only draft tokens whose probability pays for verifying them (needs "
                        "auto sizing; default: as dovetail-launch, on with it)")
    p.add_argument("--force-draft", action="store_true",
                   help="Dovetail starts its draft even where the target's curve says no draft can pay (default: "
                        "it decodes with the target alone there, as dovetail-launch does)")
    p.add_argument("--draft-quantize", default="none", choices=("none", "int8"),
                   help="int8 weights for the feature drafts (--draft feature:DIR) on the CPU; other drafts run as they are")
    p.add_argument("--target-cpus", default=None, help="CPUs for every system's target, e.g. '0-31' (default: all)")
    p.add_argument("--llama-extra-buffers", default="auto", choices=EXTRA_BUFFER_SETTINGS,
                   help="llama.cpp's extra (repacked / AMX) weight buffers, the same for our llama.cpp workers and "
                        "the llama.cpp peer: auto (default) keeps them unless a test decode with them crashed on "
                        "this machine (probed once, cached); results.json records what was used")
    p.add_argument("--draft-device", default=None, help="Dovetail's draft device: 'cpu' or 'cuda:N' (default: GPU if any)")
    p.add_argument("--dtype", default="auto", help="auto | bfloat16 | float32 for the torch systems")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the first prompt (then +1 per prompt)")
    p.add_argument("--interleave", action="store_true",
                   help="run the systems prompt by prompt in turn, all loaded at once, so that a slow spell of a "
                        "shared machine falls on all of them alike (default: one system after another)")
    p.add_argument("--quick", action="store_true", help="3 prompts x 48 tokens: a run of a few minutes on 2 cores")
    p.add_argument("--out", default="bench/out", help="folder for results.json, results.md and plots")
    return p


def load_prompt_ids(args) -> list[list[int]]:
    from dovetail.models.fetch import resolve_model
    from dovetail.models.prompts import load_humaneval, load_prompts_jsonl, load_sharegpt_chats
    from dovetail.models.loading import load_tokenizer
    tok = load_tokenizer(resolve_model(args.target))
    if tok is None:
        raise SystemExit("the target has no tokenizer: give prompts as token ids in code instead")
    if args.prompts_file:
        raw = load_prompts_jsonl(args.prompts_file)
    elif args.prompt_set == "sharegpt":
        raw = load_sharegpt_chats(limit=args.prompts)
    else:
        raw = [p["prompt"] for p in load_humaneval(limit=args.prompts)]
    ids = []
    for p in raw[:args.prompts]:
        if isinstance(p, str):
            ids.append(tok.encode(p, add_special_tokens=False))
        else:
            enc = tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True)
            ids.append(list(enc["input_ids"] if hasattr(enc, "keys") else enc))
    return ids


def llama_buffers(args):
    """How llama.cpp loads the target's weights in this run (a llama_buffers.Decision), or None
    where nothing runs the target on llama.cpp. Our workers, given the same setting, read
    the same cached verdict."""
    from dovetail.models.fetch import resolve_model
    from dovetail.workers.llama_buffers import decide
    if "llama.cpp" not in args.backends.split(",") and "llama.cpp" not in args.systems.split(","):
        return None
    gguf = resolve_model(args.target)
    if systems.llama_skip_reason(gguf):
        return None
    from dovetail.system.cpus import parse_cpus
    threads = len(parse_cpus(args.target_cpus) or os.sched_getaffinity(0))
    return decide(args.llama_extra_buffers, str(gguf), threads)


def plan(args, draft_device: str, buffers=None) -> list[tuple[str, callable, dict]]:
    """(name, runner, kwargs) for every system that will run, in order; ``buffers``: the
    llama.cpp peer's extra-buffer decision (``llama_buffers``; None: llama.cpp's default)."""
    from dovetail.models.fetch import resolve_model
    wanted = set(args.systems.split(","))
    runs = []
    for backend in args.backends.split(","):
        ours = dict(target=args.target, target_cpus=args.target_cpus, dtype=args.dtype, stop_token_ids=[],
                    backend=backend, **{k: getattr(args, k) for k in ("depth", "top_k", "max_nodes")
                                        if getattr(args, k) is not None},
                    **({"auto_tree": True} if args.auto_tree else {}), **({"gate": args.gate} if args.gate is not None else {}),
                    **({"force_draft": True} if args.force_draft else {}),
                    **({"llama_extra_buffers": args.llama_extra_buffers} if args.llama_extra_buffers != "auto" else {}))
        tag = report.backend_tag(backend)
        if "target-only" in wanted:
            runs.append((f"target-only{tag}", systems.dovetail_records, dict(ours, draft=None)))
        if "dovetail" in wanted:
            for d in args.draft:
                feature = str(d).startswith("feature:")  # int8 weights are a feature draft's option
                quant = {"draft_quantize": args.draft_quantize} if args.draft_quantize != "none" and feature else {}
                runs.append((f"dovetail[{Path(str(d)).name}]{tag}", systems.dovetail_records,
                             dict(ours, draft=d, draft_device=draft_device, **quant)))
    for d in args.draft:
        name = Path(str(d)).name
        if "hf-assisted" in wanted:
            runs.append((f"hf-assisted[{name}]", systems.hf_assisted_records,
                         dict(target=args.target, draft=d, dtype=args.dtype, cpus=args.target_cpus)))
    if "llama.cpp" in wanted:
        gguf = resolve_model(args.target)
        why = systems.llama_skip_reason(gguf)
        if why:
            print(f"bench: skipping llama.cpp: {why}", file=sys.stderr)
        else:
            extra = {"extra_buffers": buffers.extra_buffers} if buffers is not None else {}
            runs.append(("llama.cpp", systems.llama_cpp_records, dict(gguf=gguf, cpus=args.target_cpus, **extra)))
    return runs


def run_mode(runs, prompts, max_new: int, temperature: float, seed: int, interleave: bool, bar, mode: str) -> dict:
    """{system: records} for one temperature: each system over every prompt in turn, or with
    ``interleave`` every system on prompt 1, then on prompt 2, ... (all loaded at once)."""
    gens = {name: records(prompts, max_new, temperature, seed, **kwargs) for name, records, kwargs in runs}
    if not interleave:
        out = {}
        for name, gen in gens.items():
            bar.set_postfix_str(f"{mode}: {name}")
            out[name] = systems.collect(gen, lambda: bar.update(1))
        return out
    out = {name: [] for name in gens}
    try:
        for _ in prompts:
            for name, gen in gens.items():
                bar.set_postfix_str(f"{mode}: {name}")
                out[name].append(next(gen))
                bar.update(1)
    finally:
        for gen in gens.values():
            gen.close()  # ends each system's `with`/`finally`: workers stopped, affinity restored
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.prompts, args.max_new_tokens = min(args.prompts, 3), min(args.max_new_tokens, 48)
    args.draft = args.draft or ["qwen2.5-coder-0.5b-instruct"]
    from dovetail.system.cpus import parse_cpus
    from dovetail.runtime.launch import _draft_device
    args.target_cpus = parse_cpus(args.target_cpus)
    draft_device = _draft_device(args.draft_device)
    modes = {"greedy": 0.0, "sample": 1.0}
    chosen = [m for m in args.modes.split(",") if m]
    unknown = set(chosen) - set(modes)
    if unknown:
        raise SystemExit(f"unknown mode(s) {sorted(unknown)}: use greedy and/or sample")
    bad = set(args.backends.split(",")) - {"transformers", "llama.cpp"}
    if bad:
        raise SystemExit(f"unknown backend(s) {sorted(bad)}: use transformers and/or llama.cpp")
    prompts = load_prompt_ids(args)
    buffers = llama_buffers(args)
    runs = plan(args, draft_device, buffers)
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": report.machine(args.target_cpus),
               "args": {k: v for k, v in vars(args).items()}, "draft_device": draft_device,
               "llama_extra_buffers": buffers.record() if buffers is not None else None,
               "prompt_lengths": [len(p) for p in prompts], "modes": {}}
    with tqdm(total=len(chosen) * len(runs) * len(prompts), desc="bench", unit="prompt") as bar:
        for mode in chosen:
            results["modes"][mode] = run_mode(runs, prompts, args.max_new_tokens, modes[mode], args.seed,
                                              args.interleave, bar, mode)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results["summary"] = {mode: report.summarize(recs) for mode, recs in results["modes"].items()}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = report.markdown(results)
    (out / "results.md").write_text(table)
    report.plots(results, out)
    print(table)
    print(f"raw figures, table and plots in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
