"""The target's forward time as a function of k, the number of new tokens it verifies.

    python -m bench.verify_curve --target qwen2.5-coder-1.5b-instruct --ctx 256

Speculative decoding pays off only while verifying k tokens costs much less than k single
steps. For each k, after a fixed prefix of --ctx random tokens, one warm-up forward and
then --repeats timed forwards of k new tokens (a root plus a chain of k-1), each rolled
back so the context stays the same. Measured for our target backend (once per --quantize
variant, back to back: "ours" is unquantized, "ours+int8" / "ours+int4" quantized) and,
when llama-cpp-python is installed and the target is a GGUF file, for llama.cpp on the
same file. Prints a table, writes every raw timing as JSON and a PNG plot next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from dovetail.cpus import cpu_model
from bench.systems import llama_skip_reason

DEFAULT_KS = "1,2,3,4,6,8,12,16,24,32,48,64"
OURS, LLAMA = "ours", "llama.cpp"
LLAMA_LABEL = "llama.cpp (the GGUF's own quantization)"  # plot legend


def system_name(quantize: str) -> str:
    """"ours" for the unquantized backend (the name earlier results use), "ours+int8" etc."""
    return OURS if quantize == "none" else f"{OURS}+{quantize}"


def plot_label(name: str, dtype: str) -> str:
    if name == LLAMA:
        return LLAMA_LABEL
    return f"{OURS} ({dtype}{name[len(OURS):]})"  # "ours (bfloat16+int8)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.verify_curve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct", help="target model (path or registry name)")
    p.add_argument("--k", default=DEFAULT_KS, help=f"comma list of new-token counts per forward (default: {DEFAULT_KS})")
    p.add_argument("--ctx", type=int, default=256, help="context length before the new tokens (default: 256)")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per k, after one warm-up (default: 5)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="our backend's dtype; auto = bfloat16 where the CPU has native bf16 (default: auto)")
    p.add_argument("--quantize", default="none",
                   help="comma list of our backend's variants to measure back to back: none, int8, int4 "
                        "(weight-only quantized decoder layers) (default: none)")
    p.add_argument("--target-cpus", default=None, help="CPUs to pin to, e.g. '0-3' (default: all); threads = cores")
    p.add_argument("--seed", type=int, default=0, help="seed of the random context and tokens (default: 0)")
    p.add_argument("--no-llama", action="store_true", help="skip llama.cpp even when it is installed")
    p.add_argument("--out", default="bench/out/verify_curve.json",
                   help="JSON output; the plot goes next to it with a .png suffix")
    return p


def parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"--k must be a comma list of integers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise ValueError(f"--k needs positive integers, got {text!r}")
    return ks


def parse_quantize(text: str) -> list[str]:
    from dovetail.config import QUANTIZE_CHOICES
    modes = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    bad = [m for m in modes if m not in QUANTIZE_CHOICES]
    if not modes or bad:
        raise ValueError(f"--quantize must be a comma list of {', '.join(QUANTIZE_CHOICES)}, got {text!r}")
    return modes


def random_tokens(vocab_size: int, n: int, seed: int) -> list[int]:
    import torch
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n,), generator=gen).tolist()


def _timed_runs(run, undo, repeats: int) -> list[float]:
    """One warm-up call, then ``repeats`` timed ones; ``undo`` (untimed) follows each."""
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        run()
        elapsed = time.perf_counter() - t0
        undo()
        if i:
            times.append(elapsed)
    return times


def measure_curve(backend, ks, ctx, repeats, seed=0, progress=None) -> dict[int, list[float]]:
    """Seconds per verify forward of k new tokens after ``ctx`` prefilled ones, for each k.
    ``progress`` (optional) is called once after each k."""
    from dovetail.tree import chain_parents
    if ctx < 1 or repeats < 1:
        raise ValueError(f"ctx and repeats must be >= 1, got ctx={ctx}, repeats={repeats}")
    ks = list(ks)
    ids = random_tokens(backend.identity.vocab_size, ctx + max(ks), seed)
    prefix, new = ids[:ctx], ids[ctx:]
    seq = backend.new_sequence()
    backend.prefill(seq, prefix)
    if backend.length(seq) != ctx:
        raise RuntimeError(f"prefill left {backend.length(seq)} positions, expected {ctx}")
    curve = {}
    for k in ks:
        root, chain, parents = new[0], new[1:k], chain_parents(k - 1)
        curve[k] = _timed_runs(lambda: backend.verify(seq, root, chain, parents),
                               lambda: backend.rollback(seq, ctx), repeats)
        if backend.length(seq) != ctx:
            raise RuntimeError(f"rollback left {backend.length(seq)} positions, expected {ctx}")
        if progress:
            progress()
    return curve


# ---- llama.cpp -------------------------------------------------------------------------------
def _kv_truncator(lib, llm):
    """``cut(n)``: drop KV cache positions >= n, checked; None where this version has no way."""
    ctx = llm.ctx
    if hasattr(lib, "llama_memory_seq_rm") and hasattr(lib, "llama_get_memory"):
        mem = lib.llama_get_memory(ctx)
        rm = lambda n: lib.llama_memory_seq_rm(mem, -1, n, -1)  # noqa: E731
        pos_max = (lambda: lib.llama_memory_seq_pos_max(mem, 0)) if hasattr(lib, "llama_memory_seq_pos_max") else None
    elif hasattr(lib, "llama_kv_cache_seq_rm"):
        rm = lambda n: lib.llama_kv_cache_seq_rm(ctx, -1, n, -1)  # noqa: E731
        pos_max = (lambda: lib.llama_kv_cache_seq_pos_max(ctx, 0)) if hasattr(lib, "llama_kv_cache_seq_pos_max") else None
    else:
        return None

    def cut(n: int) -> None:
        if rm(n) is False:
            raise RuntimeError(f"llama.cpp refused to remove KV positions >= {n}")
        if pos_max is not None and pos_max() != n - 1:
            raise RuntimeError(f"llama.cpp KV cache ends at {pos_max()} after removal, expected {n - 1}")
        llm.n_tokens = n
    return cut


def measure_llama(path, ks, ctx, repeats, threads, seed=0, progress=None) -> dict[int, list[float]]:
    """Like measure_curve, for llama.cpp's ``Llama.eval`` on a GGUF file."""
    import llama_cpp
    ks = list(ks)
    # logits_all: verification needs the logits of every new row, as our backend computes.
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=ctx + max(ks) + 8, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False)
    cut = _kv_truncator(llama_cpp, llm)
    if cut is None:
        raise RuntimeError("this llama-cpp-python has neither llama_memory_seq_rm nor llama_kv_cache_seq_rm")
    ids = random_tokens(llm.n_vocab(), ctx + max(ks), seed)
    llm.eval(ids[:ctx])
    cut(ctx)  # also checks, once before timing, that removal works
    curve = {}
    for k in ks:
        curve[k] = _timed_runs(lambda: llm.eval(ids[ctx:ctx + k]), lambda: cut(ctx), repeats)
        if progress:
            progress()
    return curve


# ---- report ----------------------------------------------------------------------------------
def machine(cpus: list[int]) -> dict:
    import torch
    return {"cpu_model": cpu_model(), "cpus": cpus, "cpu_count": len(cpus), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform()}


def summarize(curve: dict[int, list[float]]) -> dict:
    base = min(curve)  # k=1 unless the k list leaves it out
    med = {k: 1000 * statistics.median(t) for k, t in curve.items()}
    return {"seconds": {str(k): t for k, t in curve.items()},
            "median_ms": {str(k): m for k, m in med.items()},
            "min_ms": {str(k): 1000 * min(t) for k, t in curve.items()},
            "ms_per_token": {str(k): m / k for k, m in med.items()},
            "ratio_to_base": {str(k): m / med[base] for k, m in med.items()}, "base_k": base}


def print_table(ks, systems: dict) -> None:
    """One row per k; per system its median and min ms (min: the least disturbed by other
    load on a shared machine), median ms per token and ratio to its own smallest k."""
    base = next(iter(systems.values()))["base_k"]
    head = "| k |" + "".join(f" {name} median ms | {name} min ms | {name} ms/token | {name} ratio to k={base} |"
                             for name in systems)
    print(head + "\n" + "|---" * (head.count("|") - 1) + "|")
    for k in map(str, ks):
        print(f"| {k} |" + "".join(f" {s['median_ms'][k]:.1f} | {s['min_ms'][k]:.1f} | {s['ms_per_token'][k]:.2f} | "
                                   f"{s['ratio_to_base'][k]:.2f} |" for s in systems.values()))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ks = parse_ks(args.k)
        quantizes = parse_quantize(args.quantize)
        if args.ctx < 1 or args.repeats < 1:
            raise ValueError("--ctx and --repeats must be >= 1")
    except ValueError as e:
        build_parser().error(str(e))
    from tqdm.auto import tqdm
    from dovetail.cpus import format_cpus, parse_cpus, pin_process
    from dovetail.fetch import resolve_model
    from dovetail.workers.backend import HFBackend
    from dovetail.workers.hf import choose_dtype

    cpus = pin_process(parse_cpus(args.target_cpus))
    target = resolve_model(args.target)
    dtype = choose_dtype(args.dtype, "cpu")
    skip = "--no-llama was given" if args.no_llama else llama_skip_reason(target)
    if skip:
        print(f"llama.cpp skipped: {skip}")
    started, load_before = time.strftime("%Y-%m-%d %H:%M:%S %Z"), os.getloadavg()
    curves = {}
    with tqdm(total=(len(quantizes) + (0 if skip else 1)) * len(ks), desc="verify curve", unit="k") as bar:
        for quantize in quantizes:  # one backend in memory at a time
            name = system_name(quantize)
            bar.set_postfix_str(f"{name}: loading")
            backend = HFBackend(str(target), dtype=dtype, quantize=quantize)
            bar.set_postfix_str(name)
            curves[name] = measure_curve(backend, ks, args.ctx, args.repeats, args.seed,
                                         progress=lambda: bar.update(1))
            del backend
        if not skip:
            bar.set_postfix_str(LLAMA)
            try:
                curves[LLAMA] = measure_llama(target, ks, args.ctx, args.repeats, len(cpus), args.seed,
                                              progress=lambda: bar.update(1))
            except Exception as e:  # an old or odd llama-cpp-python: report, keep our figures
                skip = f"{type(e).__name__}: {e}"
                tqdm.write(f"llama.cpp skipped: {skip}")
    systems = {name: summarize(curve) for name, curve in curves.items()}
    desc = {**machine(cpus), "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    report = {"date": started, "machine": desc, "args": vars(args), "target": str(target),
              "dtype": str(dtype).removeprefix("torch."), "quantize": quantizes, "ctx": args.ctx, "ks": ks, "repeats": args.repeats,
              "llama_cpp_skipped": skip, "systems": systems}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from bench.plots import save_line_plot
    plot = save_line_plot(out.with_suffix(".png"),
                          {plot_label(name, report["dtype"]): (ks, [s["median_ms"][str(k)] for k in ks])
                           for name, s in systems.items()},
                          title=f"{Path(target).name}\nverify forward after {args.ctx} tokens, "
                                f"{report['dtype']}, {len(cpus)} CPUs",
                          xlabel="k (new tokens per forward)", ylabel="median ms per forward", logx=True)
    report["plot"] = str(plot) if plot else None
    out.write_text(json.dumps(report, indent=1))
    print(f"\n{desc['cpu_model']}, CPUs {format_cpus(cpus)} ({len(cpus)} threads); torch {desc['torch']}; "
          f"{report['dtype']}; ctx {args.ctx}; {args.repeats} repeats; load average "
          f"{load_before[0]:.2f} before, {desc['loadavg_after'][0]:.2f} after; {started}\n")
    print_table(ks, systems)
    print(f"\nraw timings in {out}" + (f", plot in {plot}" if plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
