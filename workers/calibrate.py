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
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("dovetail.target")

CALIBRATE_KS = 16        # measure k = 1..16 each ...
LONG_KS = (24, 32, 48, 64)  # ... and these longer chains (a suffix draft copies dozens of tokens);
                         # the curve holds k = 1..64, linear between them; the coordinator extrapolates beyond
CALIBRATE_CONTEXT = 128  # tokens of context in the cache while measuring
CALIBRATE_REPEATS = 3    # quiet passes over k = 1..16; the fastest forward of each k counts
MAX_PASSES = 10          # passes before settling for what a busy machine gave (not cached then)
EXTRA_PASSES_S = 20.0    # and no pass beyond the first `repeats` starts after this many seconds
OTHERS_MAX_CORES = 0.25  # a pass is quiet when other processes kept at most this much of a core busy
MIN_JUDGED_S = 0.5       # shorter passes are not judged: /proc/stat counts CPU time in 10 ms ticks
NOISY_SPREAD = 1.3       # k = 1 this much slower in one quiet pass than in another: not cached
CACHE_MIN_BYTES = 50 << 20  # smaller (test) models are cheaper to measure than to cache
BATCH_REQUESTS = (2, 4, 8)  # batch shapes measured: this many requests ...
BATCH_ROWS = (1, 2, 4)      # ... each verifying a chain of this many rows, in one forward
BATCH_CONTEXT = 32          # tokens of context per request while measuring them (each is prefilled)
BOUND_SLACK = 0.1           # the row bound: the fewest rows costing at most this much more per row than the best


class OtherLoad:
    """Cores that other processes (and other VMs: steal time) kept busy since ``start()``:
    the machine's busy CPU time minus this process's, per second of wall time. A worker
    calibrates while the coordinator and a draft worker are still starting up; a curve
    measured then would be cached slow for good."""

    def __init__(self):
        import psutil
        self._psutil, self._proc = psutil, psutil.Process()
        self.start()

    def start(self) -> None:
        self._t0, self._busy0, self._own0 = time.perf_counter(), self._busy(), self._own()

    def cores(self) -> float:
        wall = time.perf_counter() - self._t0
        if wall < MIN_JUDGED_S:
            return 0.0
        return max(0.0, (self._busy() - self._busy0) - (self._own() - self._own0)) / wall

    def _busy(self) -> float:
        t = self._psutil.cpu_times()
        return t.user + t.nice + t.system + sum(getattr(t, f, 0.0) for f in ("irq", "softirq", "steal"))

    def _own(self) -> float:
        t = self._proc.cpu_times()
        return t.user + t.system


@dataclass
class Pass:
    seconds: list[float]  # one verify of k tokens, k = 1..ks
    others: float         # cores other processes used meanwhile (OtherLoad)

    @property
    def quiet(self) -> bool:
        return self.others <= OTHERS_MAX_CORES


def measure_verify_us(backend, vocab_size: int, ks: int | None = None, context: int | None = None,
                      repeats: int | None = None, passes_out: list | None = None,
                      long_ks: tuple[int, ...] | None = None) -> list[int]:
    """Microseconds of one verify of a k-token chain, for k = 1..ks and then up to the last of
    ``long_ks`` (measured there, linear in between: default LONG_KS beyond CALIBRATE_KS): the fastest of
    ``repeats`` quiet passes over all k (passes, not k after k, so that a burst of load from
    another process slows one pass, not the few k measured during it). Passes that other
    processes disturbed are repeated, up to MAX_PASSES in all and EXTRA_PASSES_S; ``passes_out``
    gets every Pass."""
    import torch
    if long_ks is None:
        long_ks = LONG_KS if ks is None else ()
    ks, context = ks or CALIBRATE_KS, context or CALIBRATE_CONTEXT
    repeats = repeats or CALIBRATE_REPEATS
    long_ks = tuple(k for k in long_ks if k > ks)
    measured = [*range(1, ks + 1), *long_ks]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (context + measured[-1] + 1,), generator=gen).tolist()
    seq = backend.new_sequence()
    load = OtherLoad()
    try:
        backend.prefill(seq, ids[:context], hidden=False)
        backend.verify(seq, ids[context], [], [], hidden=False)  # warm-up
        backend.rollback(seq, context)
        passes: list[Pass] = []
        started = time.perf_counter()
        while len(passes) < repeats or (sum(p.quiet for p in passes) < repeats and len(passes) < MAX_PASSES
                                         and time.perf_counter() - started < EXTRA_PASSES_S):
            times = []
            load.start()
            for k in measured:
                t0 = time.perf_counter()
                backend.verify(seq, ids[context], ids[context + 1:context + k], list(range(-1, k - 2)),
                               hidden=False)
                times.append(time.perf_counter() - t0)
                backend.rollback(seq, context)
            passes.append(Pass(times, load.cores()))
        if passes_out is not None:
            passes_out.extend(passes)
        counted = [p for p in passes if p.quiet] or passes
        fastest = [1e6 * min(p.seconds[i] for p in counted) for i in range(len(measured))]
        return fill_curve(measured, fastest)
    finally:
        backend.release(seq)


def fill_curve(ks: list[int], us: list[float]) -> list[int]:
    """The curve for k = 1..ks[-1] from its values at ``ks`` (ascending, from 1): linear in between."""
    out = []
    for (k0, t0), (k1, t1) in zip(zip(ks, us), zip(ks[1:], us[1:])):
        out.extend(int(t0 + (t1 - t0) * (k - k0) / (k1 - k0)) for k in range(k0, k1))
    out.append(int(us[-1]))
    return out


def measure_batch_us(backend, vocab_size: int, max_rows: int, repeats: int | None = None) -> list[int]:
    """Microseconds of one verify_many() of n requests with r-row chains each, for the
    BATCH_REQUESTS x BATCH_ROWS shapes within ``max_rows`` rows and the sequences the backend
    holds, as flat triples (n, r, us): the fastest of ``repeats`` passes over all shapes.
    What the tree sizer prices a draft token at while other requests share the forward."""
    import torch
    repeats = repeats or CALIBRATE_REPEATS
    gen = torch.Generator().manual_seed(1)
    seqs = []
    try:
        for _ in range(max(BATCH_REQUESTS)):
            try:
                seqs.append(backend.new_sequence())
            except RuntimeError:  # the backend holds fewer sequences: measure what fits
                break
        ids = [torch.randint(0, vocab_size, (BATCH_CONTEXT + max(BATCH_ROWS),), generator=gen).tolist()
               for _ in seqs]
        for seq, row in zip(seqs, ids):
            backend.prefill(seq, row[:BATCH_CONTEXT], hidden=False)
        shapes = [(n, r) for n in BATCH_REQUESTS for r in BATCH_ROWS if n <= len(seqs) and n * r <= max_rows]
        best: dict[tuple[int, int], float] = {}
        for _ in range(repeats):
            for n, r in shapes:
                trees = [(row[BATCH_CONTEXT + 1:BATCH_CONTEXT + r], list(range(-1, r - 2))) for row in ids[:n]]
                t0 = time.perf_counter()
                backend.verify_many(seqs[:n], [row[BATCH_CONTEXT] for row in ids[:n]], trees, [False] * n)
                took = time.perf_counter() - t0
                for seq in seqs[:n]:
                    backend.rollback(seq, BATCH_CONTEXT)
                best[n, r] = min(took, best.get((n, r), took))
        return [x for (n, r) in shapes for x in (n, r, int(1e6 * best[n, r]))]
    finally:
        for seq in seqs:
            backend.release(seq)


def batch_row_bound(verify_us: list[int], batch_us: list[int], cap: int) -> int:
    """The most rows one forward gathers from several requests: the fewest measured rows
    whose cost per row is within BOUND_SLACK of the best measured (a bigger batch adds latency
    to every request in it and saves little; CPU kernels are not monotonic in the rows, so
    the best, not the first dip, decides), at most ``cap``. Without batch costs, ``cap``."""
    if not batch_us or not verify_us:
        return cap
    per_row: dict[int, float] = {1: verify_us[0]}
    for n, r, us in zip(batch_us[0::3], batch_us[1::3], batch_us[2::3]):
        per_row[n * r] = min(us / (n * r), per_row.get(n * r, float("inf")))
    best = min(per_row.values())
    bound = min(rows for rows, cost in per_row.items() if cost <= (1 + BOUND_SLACK) * best)
    return max(1, min(cap, bound))


def curve_kind(backend) -> str:
    """What besides the file, threads and CPU decides a backend's curves: its dtype and, for
    llama.cpp, whether the weights sit in extra (repacked) or plain buffers (other kernels)."""
    return backend.identity.dtype + ("" if getattr(backend, "extra_buffers", True) else ", plain buffers")


def cache_key(model: str, backend: str, dtype: str, threads: int, max_rows: int) -> str | None:
    """Same file, backend, dtype, threads, row bound and CPU model -> same curves; None: do not cache."""
    path = Path(model)
    size = path.stat().st_size if path.is_file() else sum(
        p.stat().st_size for p in path.glob("*.safetensors")) if path.is_dir() else 0
    if size < CACHE_MIN_BYTES:
        return None
    from dovetail.system.cpus import cpu_model
    mtime = int(path.stat().st_mtime)
    raw = json.dumps([str(path.resolve()), size, mtime, backend, dtype, threads, cpu_model(),
                      CALIBRATE_KS, LONG_KS, CALIBRATE_CONTEXT, BATCH_REQUESTS, BATCH_ROWS, BATCH_CONTEXT, max_rows,
                      os.environ.get("OMP_WAIT_POLICY", "")])
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def cache_dir() -> Path:
    from dovetail.models.fetch import default_cache_dir
    return default_cache_dir() / "verify_cost"


def load_or_measure(backend, model: str, backend_name: str, dtype: str, threads: int,
                    max_rows: int = 1) -> tuple[list[int], list[int]]:
    """The verify-cost curve (measure_verify_us) and, when forwards may hold several requests
    (``max_rows`` > 1), the batch costs (measure_batch_us): cached, or measured now."""
    key = cache_key(model, backend_name, dtype, threads, max_rows)
    path = cache_dir() / f"{key}.json" if key else None
    if path is not None and path.exists():
        try:
            cached = json.loads(path.read_text())
            return [int(t) for t in cached["verify_us"]], [int(t) for t in cached.get("batch_verify_us", [])]
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable verify-cost cache %s", path)
    t0, passes = time.perf_counter(), []
    curve = measure_verify_us(backend, backend.identity.vocab_size, passes_out=passes)
    quiet = [p for p in passes if p.quiet]
    log.info("verify cost for k=1..%d measured in %.1f s (%d of %d passes quiet): %s ms", len(curve),
             time.perf_counter() - t0, len(quiet), len(passes), " ".join(f"{t / 1000:.0f}" for t in curve))
    batch = []
    if max_rows > 1:
        t0 = time.perf_counter()
        batch = measure_batch_us(backend, backend.identity.vocab_size, max_rows)
        log.info("batched verify cost (requests x rows: ms) measured in %.1f s: %s", time.perf_counter() - t0,
                 ", ".join(f"{n}x{r}: {us / 1000:.0f}" for n, r, us in zip(batch[0::3], batch[1::3], batch[2::3])))
    firsts = [p.seconds[0] for p in quiet]
    if path is not None and len(quiet) < CALIBRATE_REPEATS:
        log.warning("other processes kept up to %.1f cores busy while measuring: not caching the verify-cost "
                    "curve, it is measured again next start", max(p.others for p in passes))
        path = None
    elif path is not None and max(firsts) > NOISY_SPREAD * min(firsts):
        log.warning("the machine was busy while measuring (k=1 took %.0f-%.0f ms): not caching the "
                    "verify-cost curve, it is measured again next start", 1000 * min(firsts), 1000 * max(firsts))
        path = None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"model": model, "backend": backend_name, "dtype": dtype,
                                   "threads": threads, "verify_us": curve, "batch_verify_us": batch}))
        tmp.replace(path)
    return curve, batch
