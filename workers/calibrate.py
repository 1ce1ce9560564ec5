"""Measure what it costs the target to verify k tokens at once, and cache it per machine.

The curve decides how many draft tokens are worth sending: on a 2-core CPU a 4-token
verification costs ~2.5x a 1-token step with llama.cpp, while a 16-core server verifies 16
tokens for ~1.2x. The target worker measures it at start-up (a few seconds), or reads the
figures cached for the same model file, backend, dtype, thread count and CPU model.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("dovetail.target")

CALIBRATE_KS = 16        # measure k = 1..16; the coordinator extrapolates beyond
CALIBRATE_CONTEXT = 128  # tokens of context in the cache while measuring
CALIBRATE_REPEATS = 3    # passes over k = 1..16; the fastest forward of each k counts
NOISY_SPREAD = 1.3       # k = 1 this much slower in one pass than in another: not cached
CACHE_MIN_BYTES = 50 << 20  # smaller (test) models are cheaper to measure than to cache


def measure_verify_us(backend, vocab_size: int, ks: int | None = None, context: int | None = None,
                      repeats: int | None = None, passes_out: list | None = None) -> list[int]:
    """Microseconds of one verify of a k-token chain, for k = 1..ks: the fastest of
    ``repeats`` passes over all k (passes, not k after k, so that a burst of load from
    another process slows one pass, not the few k measured during it)."""
    import torch
    ks, context = ks or CALIBRATE_KS, context or CALIBRATE_CONTEXT
    repeats = repeats or CALIBRATE_REPEATS
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (context + ks + 1,), generator=gen).tolist()
    seq = backend.new_sequence()
    try:
        backend.prefill(seq, ids[:context], hidden=False)
        backend.verify(seq, ids[context], [], [], hidden=False)  # warm-up
        backend.rollback(seq, context)
        passes = []
        for _ in range(repeats):
            times = []
            for k in range(1, ks + 1):
                t0 = time.perf_counter()
                backend.verify(seq, ids[context], ids[context + 1:context + k], list(range(-1, k - 2)),
                               hidden=False)
                times.append(time.perf_counter() - t0)
                backend.rollback(seq, context)
            passes.append(times)
        if passes_out is not None:
            passes_out.extend(passes)
        return [int(1e6 * min(p[k] for p in passes)) for k in range(ks)]
    finally:
        backend.release(seq)


def cache_key(model: str, backend: str, dtype: str, threads: int) -> str | None:
    """Same file, backend, dtype, threads and CPU model -> same curve; None: do not cache."""
    path = Path(model)
    size = path.stat().st_size if path.is_file() else sum(
        p.stat().st_size for p in path.glob("*.safetensors")) if path.is_dir() else 0
    if size < CACHE_MIN_BYTES:
        return None
    from dovetail.cpus import cpu_model
    mtime = int(path.stat().st_mtime)
    raw = json.dumps([str(path.resolve()), size, mtime, backend, dtype, threads, cpu_model(),
                      CALIBRATE_KS, CALIBRATE_CONTEXT, os.environ.get("OMP_WAIT_POLICY", "")])
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def cache_dir() -> Path:
    from dovetail.fetch import default_cache_dir
    return default_cache_dir() / "verify_cost"


def load_or_measure(backend, model: str, backend_name: str, dtype: str, threads: int) -> list[int]:
    key = cache_key(model, backend_name, dtype, threads)
    path = cache_dir() / f"{key}.json" if key else None
    if path is not None and path.exists():
        try:
            return [int(t) for t in json.loads(path.read_text())["verify_us"]]
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable verify-cost cache %s", path)
    t0, passes = time.perf_counter(), []
    curve = measure_verify_us(backend, backend.identity.vocab_size, passes_out=passes)
    log.info("verify cost for k=1..%d measured in %.1f s: %s ms", len(curve), time.perf_counter() - t0,
             " ".join(f"{t / 1000:.0f}" for t in curve))
    firsts = [p[0] for p in passes]
    if path is not None and max(firsts) > NOISY_SPREAD * min(firsts):
        log.warning("the machine was busy while measuring (k=1 took %.0f-%.0f ms): not caching the "
                    "verify-cost curve, it is measured again next start", 1000 * min(firsts), 1000 * max(firsts))
        path = None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"model": model, "backend": backend_name, "dtype": dtype,
                                   "threads": threads, "verify_us": curve}))
        tmp.replace(path)
    return curve
