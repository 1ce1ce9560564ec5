"""The target's forward time as a function of k, the number of new tokens it verifies.

    python -m bench.verify_curve --target qwen2.5-coder-1.5b-instruct --ctx 256
    python -m bench.verify_curve --backend llama.cpp --llama-extra-buffers on,off --rounds 8 \
        --k 1,2,4,8,16 --repeats 3 --no-llama     # llama.cpp's extra buffers against plain ones

Speculative decoding pays off only while verifying k tokens costs much less than k single
steps. For each k, after a fixed prefix of --ctx random tokens, one warm-up forward and
then --repeats timed forwards of k new tokens (a root plus a chain of k-1), each rolled
back so the context stays the same. Measured for our target backend (once per --quantize
variant, back to back: "ours" is unquantized, "ours+int8" / "ours+int4" quantized) and,
when llama-cpp-python is installed and the target is a GGUF file, for llama.cpp on the
same file. Prints a table, writes every raw timing as JSON and a PNG plot next to it.

``--backend llama.cpp`` measures our llama.cpp target backend instead (workers/llama.py),
once per ``--llama-extra-buffers`` setting; the llama.cpp peer uses the first setting.
``--rounds N`` measures our variants in turn, all loaded at once: N rounds, in each for every
k each variant's --repeats forwards back to back, so that a slow spell of a shared machine
falls on all alike; every round's timings are pooled.
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

from dovetail.system.cpus import cpu_model
from bench.systems import llama_skip_reason

DEFAULT_KS = "1,2,3,4,6,8,12,16,24,32,48,64"
OURS, LLAMA = "ours", "llama.cpp"
LLAMA_LABEL = "llama.cpp (the GGUF's own quantization)"  # plot legend


def system_name(quantize: str) -> str:
    """"ours" for the unquantized backend (the name earlier results use), "ours+int8" etc."""
    return OURS if quantize == "none" else f"{OURS}+{quantize}"


def llama_system_name(setting: str) -> str:
    """Our llama.cpp backend under one --llama-extra-buffers setting."""
    return f"{OURS}@llama.cpp[extra-buffers={setting}]"


def plot_label(name: str, dtype: str) -> str:
    if name == LLAMA:
        return LLAMA_LABEL
    if name.startswith(f"{OURS}@"):
        return name
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
    p.add_argument("--backend", default="transformers", choices=("transformers", "llama.cpp"),
                   help="our backend: transformers (--dtype, --quantize) or llama.cpp (a GGUF target, once per "
                        "--llama-extra-buffers setting) (default: transformers)")
    p.add_argument("--llama-extra-buffers", default="auto",
                   help="comma list of auto, on, off: llama.cpp's extra (repacked / AMX) weight buffers for our "
                        "llama.cpp backend, one variant each; the llama.cpp peer uses the first (default: auto)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure our variants in turn this many times, all loaded at once, pooling the timings "
                        "(default: 1, one variant after another)")
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


def parse_choices(text: str, choices, flag: str) -> list[str]:
    """A comma list of distinct ``choices``, in the order given."""
    picked = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    bad = [c for c in picked if c not in choices]
    if not picked or bad:
        raise ValueError(f"{flag} must be a comma list of {', '.join(choices)}, got {text!r}")
    return picked


def parse_quantize(text: str) -> list[str]:
    from dovetail.models.options import QUANTIZE_CHOICES
    return parse_choices(text, QUANTIZE_CHOICES, "--quantize")


def parse_settings(text: str) -> list[str]:
    from dovetail.models.options import LLAMA_EXTRA_BUFFERS
    return parse_choices(text, LLAMA_EXTRA_BUFFERS, "--llama-extra-buffers")


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
    from dovetail.spec.tree import chain_parents
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
    try:
        for k in ks:
            root, chain, parents = new[0], new[1:k], chain_parents(k - 1)
            curve[k] = _timed_runs(lambda: backend.verify(seq, root, chain, parents),
                                   lambda: backend.rollback(seq, ctx), repeats)
            if backend.length(seq) != ctx:
                raise RuntimeError(f"rollback left {backend.length(seq)} positions, expected {ctx}")
            if progress:
                progress()
    finally:
        backend.release(seq)  # llama.cpp: its cells would stay in the shared KV cache
    return curve


def measure_interleaved(backends: dict, ks, ctx, repeats, rounds, seed=0, progress=None) -> dict[str, dict]:
    """measure_curve for several backends at once, in turn: each round, for each k, every
    backend's ``repeats`` forwards back to back (the order flips every round), so a slow
    spell of a shared machine falls on all alike. {name: {k: every round's seconds}}."""
    from dovetail.spec.tree import chain_parents
    ks = list(ks)
    ids = {}
    seqs = {}
    try:
        for name, backend in backends.items():
            ids[name] = random_tokens(backend.identity.vocab_size, ctx + max(ks), seed)
            seqs[name] = backend.new_sequence()
            backend.prefill(seqs[name], ids[name][:ctx])
        curves = {name: {k: [] for k in ks} for name in backends}
        names = list(backends)
        for r in range(rounds):
            for k in ks:
                for name in (names if r % 2 == 0 else names[::-1]):
                    backend, seq, new = backends[name], seqs[name], ids[name][ctx:]
                    curves[name][k] += _timed_runs(
                        lambda: backend.verify(seq, new[0], new[1:k], chain_parents(k - 1)),
                        lambda: backend.rollback(seq, ctx), repeats)
                    if backend.length(seq) != ctx:
                        raise RuntimeError(f"rollback left {backend.length(seq)} positions, expected {ctx}")
                if progress:
                    progress()
        return curves
    finally:
        for name, seq in seqs.items():
            backends[name].release(seq)


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


def measure_llama(path, ks, ctx, repeats, threads, seed=0, progress=None,
                  extra_buffers: bool | None = None) -> dict[int, list[float]]:
    """Like measure_curve, for llama.cpp's ``Llama.eval`` on a GGUF file; ``extra_buffers``:
    llama.cpp's extra buffer types on or off (None: its default)."""
    import llama_cpp

    from dovetail.workers.llama_buffers import open_llama
    ks = list(ks)
    # logits_all: verification needs the logits of every new row, as our backend computes.
    kwargs = dict(model_path=str(path), n_ctx=ctx + max(ks) + 8, n_threads=threads,
                  n_threads_batch=threads, logits_all=True, verbose=False)
    llm = llama_cpp.Llama(**kwargs) if extra_buffers is None else open_llama(extra_buffers, **kwargs)
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


def paired_ratios(curves: dict[str, dict[int, list[float]]], repeats: int) -> dict[str, dict[str, float]]:
    """For interleaved rounds (measure_interleaved): each variant's time over the first
    variant's, per k, as the median over rounds of the ratio of the two rounds' medians.
    Both halves of a ratio were measured seconds apart, so drift of a shared machine cancels
    out of it better than out of the pooled medians."""
    first, *others = curves
    out = {}
    for name in others:
        out[name] = {}
        for k, times in curves[name].items():
            base = curves[first][k]
            rounds = range(0, min(len(times), len(base)), repeats)
            out[name][str(k)] = statistics.median(
                statistics.median(times[i:i + repeats]) / statistics.median(base[i:i + repeats]) for i in rounds)
    return out


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
        settings = parse_settings(args.llama_extra_buffers)
        if args.ctx < 1 or args.repeats < 1 or args.rounds < 1:
            raise ValueError("--ctx, --repeats and --rounds must be >= 1")
        if args.backend == "llama.cpp" and quantizes != ["none"]:
            raise ValueError("--quantize is for the transformers backend; a GGUF keeps its own quantization")
    except ValueError as e:
        build_parser().error(str(e))
    from tqdm.auto import tqdm
    from dovetail.system.cpus import format_cpus, parse_cpus, pin_process
    from dovetail.models.fetch import resolve_model
    from dovetail.workers.backend import HFBackend
    from dovetail.models.loading import choose_dtype
    from dovetail.workers.llama_buffers import decide

    cpus = pin_process(parse_cpus(args.target_cpus))
    target = resolve_model(args.target)
    dtype = choose_dtype(args.dtype, "cpu")
    skip = "--no-llama was given" if args.no_llama else llama_skip_reason(target)
    if skip:
        print(f"llama.cpp skipped: {skip}")
    if args.backend == "llama.cpp" and llama_skip_reason(target):
        build_parser().error(f"--backend llama.cpp: {llama_skip_reason(target)}")
    decisions = {}  # system -> how llama.cpp loaded its weights (llama_buffers.Decision)
    if args.backend == "llama.cpp":
        from dovetail.workers.llama import LlamaBackend
        for setting in settings:
            decisions[llama_system_name(setting)] = decide(setting, str(target), len(cpus))
        loaders = {name: (lambda d=d: LlamaBackend(str(target), threads=len(cpus), extra_buffers=d.extra_buffers))
                   for name, d in decisions.items()}
    else:
        loaders = {system_name(q): (lambda q=q: HFBackend(str(target), dtype=dtype, quantize=q)) for q in quantizes}
    if not skip:
        decisions[LLAMA] = decide(settings[0], str(target), len(cpus))
    started, load_before = time.strftime("%Y-%m-%d %H:%M:%S %Z"), os.getloadavg()
    curves = {}
    total = (len(loaders) * args.rounds + (0 if skip else 1)) * len(ks)
    with tqdm(total=total, desc="verify curve", unit="k") as bar:
        if args.rounds == 1:
            for name, load in loaders.items():  # one backend in memory at a time
                bar.set_postfix_str(f"{name}: loading")
                backend = load()
                bar.set_postfix_str(name)
                curves[name] = measure_curve(backend, ks, args.ctx, args.repeats, args.seed,
                                             progress=lambda: bar.update(1))
                del backend
        else:  # every variant loaded, measured in turn: drift of a shared machine hits all alike
            bar.set_postfix_str("loading")
            backends = {name: load() for name, load in loaders.items()}
            bar.set_postfix_str(f"{len(backends)} variants in turn")
            curves = measure_interleaved(backends, ks, args.ctx, args.repeats, args.rounds, args.seed,
                                         progress=lambda: bar.update(len(backends)))
            del backends
        if not skip:
            bar.set_postfix_str(LLAMA)
            try:
                curves[LLAMA] = measure_llama(target, ks, args.ctx, args.repeats, len(cpus), args.seed,
                                              progress=lambda: bar.update(1),
                                              extra_buffers=decisions[LLAMA].extra_buffers)
            except Exception as e:  # an old or odd llama-cpp-python: report, keep our figures
                skip = f"{type(e).__name__}: {e}"
                tqdm.write(f"llama.cpp skipped: {skip}")
    systems = {name: summarize(curve) for name, curve in curves.items()}
    desc = {**machine(cpus), "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    report = {"date": started, "machine": desc, "args": vars(args), "target": str(target),
              "dtype": "gguf" if args.backend == "llama.cpp" else str(dtype).removeprefix("torch."),
              "quantize": quantizes, "ctx": args.ctx, "ks": ks, "repeats": args.repeats, "rounds": args.rounds,
              "llama_cpp_skipped": skip, "systems": systems,
              "llama_extra_buffers": {name: d.record() for name, d in decisions.items()}}
    ours = {name: curve for name, curve in curves.items() if name != LLAMA}
    if args.rounds > 1 and len(ours) > 1:
        report["paired_ratio_to"] = {"base": next(iter(ours)), "ratios": paired_ratios(ours, args.repeats)}
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
          f"{report['dtype']}; ctx {args.ctx}; {args.repeats} repeats x {args.rounds} round(s); load average "
          f"{load_before[0]:.2f} before, {desc['loadavg_after'][0]:.2f} after; {started}\n")
    print_table(ks, systems)
    for name, d in decisions.items():
        print(f"{name}: llama.cpp extra buffers {d.describe()}")
    if "paired_ratio_to" in report:
        base = report["paired_ratio_to"]["base"]
        for name, ratios in report["paired_ratio_to"]["ratios"].items():
            print(f"{name} / {base}, median over {args.rounds} rounds of the round's ratio: "
                  + ", ".join(f"k={k} {ratios[str(k)]:.2f}" for k in ks))
    print(f"\nraw timings in {out}" + (f", plot in {plot}" if plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
