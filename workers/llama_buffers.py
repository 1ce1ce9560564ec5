"""Whether llama.cpp's extra buffer types decode correctly on this machine, decided once.

llama.cpp puts quantized weights in "extra" CPU buffer types (repacked layouts for AVX2 /
AVX512 kernels, AMX tiles on Intel Xeons with AMX) unless ``use_extra_bufts`` is off. On a
virtualised Sapphire Rapids Xeon the AMX buffer segfaults in the first matmul of
llama_decode (ggml-org/llama.cpp#20824), taking the whole worker with it; with plain
buffers the same decode works. A crash cannot be caught in-process, so the decision is a
probe in a CHILD process: load the model with extra buffers, decode a short prompt, a few
single tokens and a 4-row batch. A clean exit means "ok"; death by a signal of its own
(SIGSEGV, SIGILL, ...) or a non-zero exit means "crash"; a kill from outside (SIGKILL: the
OOM killer; SIGTERM) means "killed", and no exit within the time limit "hang" (both also
failures). The verdict is cached per machine and model file under
``<cache>/llama_extra_buffers/<key>.json`` (see ``cache_key``), like the verify-cost curve in
calibrate.py, so the probe (one extra model load, seconds) runs once. A hang or a kill says
more about the machine at that moment (memory, a cold disk, load) than about the buffers:
that verdict is kept for RETRY_S only, then the probe runs again.

The setting (``--llama-extra-buffers``, ``launch(llama_extra_buffers=...)``): "auto" uses
the cached verdict, probing when there is none; "on" / "off" force it, without a probe.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger("dovetail.llama")

OK, CRASH, HANG = "ok", "crash", "hang"
KILLED = "killed"        # killed from outside (OUTSIDE_SIGNALS), not by a fault of the decode
ERROR = "error"          # the probe's own Python code failed: no verdict, nothing cached
HARNESS_EXIT = 86        # the child's exit code for that

# What plain buffers cost where extra buffers had to go: measured on the 2-core Intel Xeon
# (Sapphire Rapids, AMX) on 2026-11-29 (llama-cpp-python
# 0.3.36 built with AMX off so that extra buffers could run at all), 1.5B Q4_K_M, decode
# after 256 tokens: extra buffers 91 / 133 ms for k = 1 / 4 rows, plain 104 / 206 ms.
PLAIN_COST_K1 = 0.12
PLAIN_COST_K4 = 0.35
PLAIN_COST_MODEL = "1.5B Q4_K_M on an Intel Xeon"

# The probe loads the model once: allow for a cold disk (~33 MB/s) on top of a fixed margin.
PROBE_TIMEOUT_S = 60.0
PROBE_TIMEOUT_S_PER_GB = 30.0
PROBE_PROMPT = 8         # tokens of the first decode
PROBE_SINGLE_STEPS = 3   # then this many one-token decodes
PROBE_BATCH_ROWS = 4     # then one decode of this many rows (a verification's shape)
STDERR_TAIL = 2000       # characters of the child's stderr kept with a failed verdict
CACHE_VERSION = 1        # bump when the probe changes what it checks
# Signals a process gets from outside rather than from its own fault: the OOM killer's
# SIGKILL, a stop asked for. A probe dead by one of these, or hung, is not known to crash with
# extra buffers: its verdict is kept this long (not to pay a hung probe's time limit at every
# start), then the probe runs again.
OUTSIDE_SIGNALS = ("SIGKILL", "SIGTERM", "SIGINT", "SIGHUP")
RETRY_S = 3600.0


@dataclass
class Verdict:
    verdict: str                 # OK, CRASH, HANG, KILLED (or ERROR: no verdict)
    reason: str                  # "exited cleanly", "died with SIGSEGV", "exit code 1", ...
    signal: str | None = None    # the signal's name when the child died by one
    returncode: int | None = None
    seconds: float = 0.0         # how long the probe ran
    stderr_tail: str = ""        # the end of the child's stderr (failures only)
    cache_path: str | None = None
    probed: bool = True          # False: read from the cache
    retry_after: float | None = None  # a transient verdict: the time.time() after which it is probed again

    @property
    def ok(self) -> bool:
        return self.verdict == OK

    @property
    def transient(self) -> bool:
        """A hang or a kill from outside: the machine's state then, not known to be the buffers'
        fault (a SIGKILL cached as a crash by an older version included)."""
        return self.verdict in (HANG, KILLED) or self.signal in OUTSIDE_SIGNALS

    def expired(self, now: float) -> bool:
        """Whether a cached verdict no longer holds: a transient one past its retry time."""
        return self.transient and (self.retry_after is None or now >= self.retry_after)


def set_extra_buffers(lib, mparams, on: bool) -> bool:
    """Set ``use_extra_bufts`` on llama_model_params; returns what the params now hold. A
    ctypes structure takes any attribute silently, so a llama-cpp-python without the field
    (llama.cpp then always uses extra buffers) is refused where they should be off."""
    if "use_extra_bufts" not in dict(lib.llama_model_params._fields_):
        if not on:
            raise RuntimeError("this llama-cpp-python cannot turn llama.cpp's extra buffer types off "
                               "(llama_model_params has no use_extra_bufts): upgrade it")
        return True
    mparams.use_extra_bufts = on
    return bool(mparams.use_extra_bufts)


# ---- the probe's child ---------------------------------------------------------------------
def decode_probe(model: str, threads: int) -> None:
    """The default child: load ``model`` with extra buffers on and decode as a target does.

    Runs in its own process; it may die by a signal (the point of running it there). Exits
    non-zero when llama.cpp refuses the model or the logits are not finite."""
    import llama_cpp
    import numpy as np
    lib = llama_cpp.llama_cpp
    lib.llama_backend_init()
    mparams = lib.llama_model_default_params()
    mparams.n_gpu_layers = 0
    set_extra_buffers(lib, mparams, True)
    mdl = lib.llama_model_load_from_file(os.fsencode(model), mparams)
    if not mdl:
        sys.exit(f"probe: llama.cpp could not load {model}")
    n_vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(mdl)))
    cparams = lib.llama_context_default_params()
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = 64
    cparams.n_seq_max, cparams.kv_unified = 1, True
    cparams.n_threads = cparams.n_threads_batch = threads
    ctx = lib.llama_init_from_model(mdl, cparams)
    if not ctx:
        sys.exit("probe: llama.cpp could not create a context")
    batch = lib.llama_batch_init(64, 0, 1)
    pos = 0

    def decode(tokens: list[int]) -> None:
        nonlocal pos
        batch.n_tokens = len(tokens)
        for i, tok in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok % n_vocab, pos + i, 1, True
            batch.seq_id[i][0] = 0
        rc = lib.llama_decode(ctx, batch)
        if rc != 0:
            sys.exit(f"probe: llama_decode returned {rc}")
        logits = np.ctypeslib.as_array(lib.llama_get_logits(ctx), shape=(len(tokens) * n_vocab,))
        if not np.isfinite(logits).all():
            sys.exit(f"probe: non-finite logits after a {len(tokens)}-row decode")
        pos += len(tokens)

    decode([100 + 7 * i for i in range(PROBE_PROMPT)])
    for i in range(PROBE_SINGLE_STEPS):
        decode([300 + i])
    decode([400 + i for i in range(PROBE_BATCH_ROWS)])
    lib.llama_batch_free(batch)
    lib.llama_free(ctx)
    lib.llama_model_free(mdl)


# The child loads the entry point's module from its FILE, not by its dotted name: importing
# dovetail.workers.llama_buffers would import the dovetail package, i.e. torch (seconds), where
# the probe needs llama_cpp alone. So an entry point's module must import only what the probe
# needs at its top (this one: the standard library). A Python exception (not SystemExit) in
# the entry point is a fault of the probe's code, not of llama.cpp: it exits HARNESS_EXIT.
# The child also asks the kernel to kill it when the process that started it goes, so a
# worker killed mid-probe leaves nothing behind.
_CHILD = """
import ctypes, importlib.util, json, os, sys
path, func, parent, args = sys.argv[1:5]
try:
    ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL (Linux; best effort)
except Exception:
    pass
if os.getppid() != int(parent):
    sys.exit("probe: the caller is gone")
try:
    spec = importlib.util.spec_from_file_location("dovetail_probe_child", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    entry = getattr(mod, func)
    entry(*json.loads(args))
except Exception:
    import traceback
    traceback.print_exc()
    sys.exit(%d)
""" % HARNESS_EXIT


def _child_command(child: Callable, args: list) -> list[str]:
    module = sys.modules.get(child.__module__)
    path = getattr(module, "__file__", None)
    if "." in child.__qualname__ or "<" in child.__qualname__ or path is None:
        raise ValueError(f"the probe's child must be a module-level function, got {child!r}")
    return [sys.executable, "-c", _CHILD, path, child.__qualname__, str(os.getpid()), json.dumps(args)]


def probe_timeout(model: str) -> float:
    try:
        size = Path(model).stat().st_size
    except OSError:
        size = 0
    return PROBE_TIMEOUT_S + PROBE_TIMEOUT_S_PER_GB * size / 1e9


def run_probe(model: str, threads: int, *, child: Callable = decode_probe,
              timeout_s: float | None = None) -> Verdict:
    """Run ``child(model, threads)`` in a fresh Python process and judge how it ended."""
    timeout_s = probe_timeout(model) if timeout_s is None else timeout_s
    cmd = _child_command(child, [str(model), int(threads)])
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:  # subprocess.run has killed it (SIGKILL)
        return Verdict(HANG, f"did not finish within its {timeout_s:.0f} s time limit",
                       seconds=time.perf_counter() - t0, stderr_tail=_tail(e.stderr))
    seconds = time.perf_counter() - t0
    rc = done.returncode
    if rc == 0:
        return Verdict(OK, "exited cleanly", returncode=0, seconds=seconds)
    if rc == HARNESS_EXIT:  # a fault of ours, not of llama.cpp's buffers
        last = _tail(done.stderr).strip().splitlines()[-1:] or ["?"]
        return Verdict(ERROR, f"failed in Python ({last[0]})", returncode=rc, seconds=seconds,
                       stderr_tail=_tail(done.stderr))
    if rc < 0:
        from dovetail.system.worker_log import signal_name  # here: this module's top stays stdlib-only (the child)
        name = signal_name(-rc)
        if name in OUTSIDE_SIGNALS:
            return Verdict(KILLED, f"was killed with {name} (out of memory, or stopped from outside)", signal=name,
                           returncode=rc, seconds=seconds, stderr_tail=_tail(done.stderr))
        return Verdict(CRASH, f"died with {name}", signal=name, returncode=rc, seconds=seconds,
                       stderr_tail=_tail(done.stderr))
    return Verdict(CRASH, f"exited with code {rc}", returncode=rc, seconds=seconds, stderr_tail=_tail(done.stderr))


def _tail(raw) -> str:
    if not raw:
        return ""
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    return text[-STDERR_TAIL:]


# ---- the per-machine cache -----------------------------------------------------------------
def cpu_flags() -> str:
    """The CPU's feature flags as /proc/cpuinfo lists them ("" where it does not)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return ""


def llama_build() -> list:
    """llama-cpp-python's version and its native libraries (name, size, mtime): a rebuild
    with other CPU options (e.g. GGML_AMX off) changes what the probe would see."""
    import importlib.metadata
    import importlib.util
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        version = "not installed"
    spec = importlib.util.find_spec("llama_cpp")
    libs = []
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for lib in sorted(Path(folder).glob("lib/*.so*")) + sorted(Path(folder).glob("lib/*.dylib")):
            if lib.is_symlink():
                continue
            st = lib.stat()
            libs.append([lib.name, st.st_size, int(st.st_mtime)])
    return [version, libs]


def model_file(model: str) -> list:
    """The model file as the key sees it: resolved path, size, mtime.

    Why the file and not only the CPU: llama.cpp picks a buffer type per weight tensor from
    its type and shape (the AMX buffer takes Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K/IQ4_XS matmuls
    whose rows fit its tiles, the repack buffer other types), so another quantization or
    architecture can meet other kernels, and other crashes. Keying on the quantization
    type alone would hand a verdict to weights never tested; keying on the file costs one
    probe (a model load, seconds) per model file and machine. (Reading the tensor types
    from the GGUF instead would let copies share a verdict, but gguf's reader takes ~15 s
    on the 1.5B's 150k-token vocabulary on two cores: more than the probe.)"""
    p = Path(model)
    st = p.stat() if p.exists() else None
    return [str(p.resolve()), st.st_size if st else 0, int(st.st_mtime) if st else 0]


def cache_key(model: str) -> tuple[str, dict]:
    """The cache file's name and what it was derived from: the CPU (model name and
    flags), the llama.cpp build and the model file (``model_file``)."""
    from dovetail.system.cpus import cpu_model
    parts = {"cpu": cpu_model(), "cpu_flags": hashlib.sha256(cpu_flags().encode()).hexdigest()[:16],
             "llama_cpp": llama_build(), "model": model_file(model), "probe": CACHE_VERSION}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20], parts


def cache_dir() -> Path:
    from dovetail.models.fetch import default_cache_dir
    return default_cache_dir() / "llama_extra_buffers"


def cached_verdict(model: str, threads: int, *, child: Callable = decode_probe, timeout_s: float | None = None,
                   folder: Path | None = None) -> Verdict:
    """The verdict cached for this machine and model layout, probing (and caching) when none
    is, or when the one there was transient and its retry time has come."""
    key, parts = cache_key(model)
    path = (Path(folder) if folder is not None else cache_dir()) / f"{key}.json"
    cached = read_verdict(path)
    if cached is not None and not cached.expired(time.time()):
        return cached
    if cached is not None:
        log.info("llama.cpp extra buffers: the cached test decode %s; probing again", cached.reason)
    log.info("llama.cpp extra buffers: a test decode in a child process, once per machine and model file (%s)",
             parts["cpu"])
    verdict = run_probe(model, threads, child=child, timeout_s=timeout_s)
    verdict.cache_path = str(path)
    log.info("llama.cpp extra buffers: the test decode %s after %.1f s: %s", verdict.reason, verdict.seconds,
             verdict.verdict)
    if verdict.verdict == ERROR:
        return verdict  # says nothing about the buffers: probe again next time
    if verdict.transient:
        verdict.retry_after = time.time() + RETRY_S
    save_verdict(path, verdict, {"model": str(model), "threads": threads, "key": parts})
    return verdict


def read_verdict(path: Path) -> Verdict | None:
    """The verdict cached at ``path``; None when there is none or it cannot be read."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        fields = {k: data[k] for k in Verdict.__dataclass_fields__ if k in data}
        return Verdict(**{**fields, "cache_path": str(path), "probed": False})
    except (OSError, ValueError, TypeError, KeyError):
        log.warning("ignoring an unreadable llama.cpp extra-buffer verdict %s", path)
        return None


def save_verdict(path: Path, verdict: Verdict, about: dict) -> None:
    """Write ``verdict`` to ``path`` atomically, with what it is about."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({**asdict(verdict), **about, "date": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
    tmp.replace(path)


# ---- the setting ---------------------------------------------------------------------------
@dataclass
class Decision:
    setting: str                  # as asked: auto, on, off
    extra_buffers: bool           # what the model is loaded with (llama_model_params.use_extra_bufts)
    verdict: Verdict | None = None  # the probe's (auto only)

    def describe(self) -> str:
        got = "on" if self.extra_buffers else "off"
        if self.verdict is None:
            return f"{got} (forced)"
        return f"{got} (auto: the test decode {self.verdict.reason})"

    def record(self) -> dict:
        """For benchmark results."""
        return {"setting": self.setting, "extra_buffers": self.extra_buffers,
                "verdict": asdict(self.verdict) if self.verdict is not None else None}


def decide(setting: str, model: str, threads: int, *, child: Callable = decode_probe,
           timeout_s: float | None = None, folder: Path | None = None) -> Decision:
    """Resolve ``setting`` for ``model``; where the verdict is a failure, log why extra
    buffers are off, what that costs and how to force them, in one warning line."""
    from dovetail.models.options import check_llama_extra_buffers  # here: the top stays stdlib-only
    check_llama_extra_buffers(setting)
    if setting != "auto":
        return Decision(setting, setting == "on")
    verdict = cached_verdict(model, threads, child=child, timeout_s=timeout_s, folder=folder)
    if verdict.verdict == ERROR:
        log.warning("llama.cpp extra buffers stay on (llama.cpp's default): the test decode %s; "
                    "--llama-extra-buffers on/off skips it", verdict.reason)
        return Decision(setting, True, verdict)
    if not verdict.ok:
        log.warning(warning_text(verdict))
    return Decision(setting, verdict.ok, verdict)


def warning_text(verdict: Verdict) -> str:
    from dovetail.system.cpus import cpu_model
    kept = (f"verdict kept in {verdict.cache_path} until {time.strftime('%H:%M', time.localtime(verdict.retry_after))}, "
            "then probed again" if verdict.transient and verdict.retry_after is not None
            else f"verdict cached in {verdict.cache_path}, delete it to probe again")
    return (f"llama.cpp extra buffer types are off: a test decode with them {verdict.reason} on this CPU "
            f"({cpu_model()}; {kept}). Plain buffers "
            f"cost ~{PLAIN_COST_K1:.0%} at k=1 and ~{PLAIN_COST_K4:.0%} at k=4 ({PLAIN_COST_MODEL}); "
            "to use extra buffers anyway: --llama-extra-buffers on")


# ---- llama_cpp.Llama (the benchmarks' llama.cpp peer) ----------------------------------------
def open_llama(extra_buffers: bool, **kwargs):
    """``llama_cpp.Llama(**kwargs)`` with ``use_extra_bufts`` set as asked, checked on the
    model params it loaded with. llama-cpp-python 0.3.x's Llama takes no such argument:
    its model params start from ``llama_model_default_params()``, which is wrapped for the
    duration of the call (not thread-safe; the benchmarks load one model at a time)."""
    import inspect

    import llama_cpp
    if "use_extra_bufts" in inspect.signature(llama_cpp.Llama.__init__).parameters:
        llm = llama_cpp.Llama(use_extra_bufts=extra_buffers, **kwargs)
    else:
        lib = llama_cpp.llama_cpp
        default = lib.llama_model_default_params

        def params():
            p = default()
            set_extra_buffers(lib, p, extra_buffers)
            return p

        lib.llama_model_default_params = params
        try:
            llm = llama_cpp.Llama(**kwargs)
        finally:
            lib.llama_model_default_params = default
    if bool(llm.model_params.use_extra_bufts) != bool(extra_buffers):
        raise RuntimeError(f"llama_cpp.Llama loaded with use_extra_bufts={llm.model_params.use_extra_bufts}, "
                           f"asked for {extra_buffers}")
    return llm
