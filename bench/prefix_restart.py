"""python -m bench.prefix_restart: a long system prompt's first token after a restart, with and
without ``--prefix-cache-dir`` (llama.cpp target, the library API).

One request behind the system prompt, the workers stopped (the target saves its prefix cache
to a temporary folder); launched again with the folder, a request with another question
behind the same system prompt; then the same once more without the folder. Prints each
request's seconds (one token, prefill included) and the tokens it took from the cache.
"""
from __future__ import annotations

import argparse
import tempfile
import time


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.prefix_restart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct", help="a GGUF file or registry name")
    p.add_argument("--target-cpus", default=None, help="CPUs for the target, e.g. 0-15 (default: all)")
    p.add_argument("--system-repeats", type=int, default=150,
                   help="times the system prompt's sentence is repeated (default: 150, ~1,200 tokens)")
    args = p.parse_args(argv)
    import dovetail
    from dovetail.models.fetch import resolve_model
    from dovetail.models.loading import load_tokenizer
    gguf = str(resolve_model(args.target))
    tok = load_tokenizer(gguf)
    system = "You are a meticulous senior Python reviewer. " * args.system_repeats

    def prompt(question: str) -> list[int]:
        enc = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": question}],
                                      add_generation_prompt=True, tokenize=True)
        return list(enc["input_ids"] if hasattr(enc, "keys") else enc)

    def run(label: str, question: str, folder: str | None) -> dict:
        t0 = time.perf_counter()
        with dovetail.launch(gguf, None, prefix_cache_dir=folder, target_cpus=args.target_cpus) as coord:
            started = time.perf_counter() - t0
            r = coord.generate(prompt(question), max_new_tokens=1)
        out = {"start_s": started, "seconds": r.stats.seconds, "prompt_tokens": r.stats.prompt_tokens,
               "cached_tokens": r.stats.cached_tokens}
        print(f"{label}: started in {started:.1f} s; {out['prompt_tokens']} prompt tokens, "
              f"{out['cached_tokens']} cached, first token in {out['seconds']:.2f} s", flush=True)
        return out

    with tempfile.TemporaryDirectory() as folder:
        result = {"cold": run("first start, cold", "Review: def f(x): return x + 1", folder),
                  "kept": run("restart with the folder", "Review: def g(y): return y * 2", folder),
                  "not_kept": run("restart without it", "Review: def g(y): return y * 2", None)}
    print(f"after a restart: {result['kept']['seconds'] / result['not_kept']['seconds']:.3f}x the time without "
          "the folder", flush=True)
    return result


if __name__ == "__main__":
    main()
