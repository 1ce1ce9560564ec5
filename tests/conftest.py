"""Shared fixtures for the process-level tests: tiny models, a tracked launcher, pid helpers.

Everything here is opt-in (no autouse fixtures), so unit tests that do not ask for these
fixtures pay nothing for them.

Worker processes pay ~3-4 s each to import torch and transformers, so coordinators are
meant to be shared through module-scoped fixtures. Every pid a test starts through
``launch_tracked`` / ``track_pid`` is SIGKILLed at the end of the session if it is somehow
still alive, so a failing test never leaves workers behind.
"""
from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

# Two worker processes share this machine's cores with the test process. torch's OpenMP
# threads busy-wait by default, and with two processes spinning on the same cores every
# round trip gets ~50x slower (0.3 s per round instead of a few ms for these tiny models).
# launch() now sets this by default; the tests pass it explicitly anyway (also to workers
# they start by hand) so their speed does not hang on that default.
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}

# How long a worker process may take to exit once told to (or once its parent is gone): a torch
# process's teardown takes well under a second on an idle machine, and a 2-core box that other
# processes keep busy can be 3-5x slower. wait_gone() returns as soon as they are gone.
EXIT_S = 15.0


# ---- pid helpers ---------------------------------------------------------------------------
def _proc(pid: int):
    import psutil
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def pid_alive(pid: int | None) -> bool:
    """True while ``pid`` runs (a zombie, exited but not yet reaped, counts as gone)."""
    import psutil
    if pid is None:
        return False
    p = _proc(pid)
    if p is None:
        return False
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pids, timeout: float = EXIT_S) -> list[int]:
    """Wait until none of ``pids`` runs; return those still running after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if p is not None and pid_alive(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def kill_quietly(pid: int | None, sig: int = signal.SIGKILL) -> None:
    if pid is None:
        return
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture(scope="session")
def pids():
    """Helpers around process ids, and a registry of pids to SIGKILL at session end."""
    import psutil
    started: dict[int, float] = {}  # pid -> create_time, so a recycled pid is never killed

    def track(pid: int | None) -> None:
        if pid is None:
            return
        p = _proc(pid)
        if p is not None:
            started[pid] = p.create_time()

    helpers = SimpleNamespace(alive=pid_alive, wait_gone=wait_gone, kill=kill_quietly, track=track)
    yield helpers
    for pid, created in started.items():
        p = _proc(pid)
        try:
            if p is not None and p.create_time() == created and pid_alive(pid):
                # A stopped process must be continued to die of anything but SIGKILL;
                # SIGKILL works either way.
                kill_quietly(pid, signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


# ---- models --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_target(model_dir) -> Path:
    """A tiny random Qwen2 (vocab 64, float64, no tokenizer): prompts are token-id lists."""
    from tests.helpers import make_tiny_model
    return make_tiny_model(model_dir / "tiny-target", seed=0)


@pytest.fixture(scope="session")
def tiny_draft_near(model_dir, tiny_target) -> Path:
    """The target plus noise 0.005: agrees often, not always (mixed accept/reject rounds)."""
    from tests.helpers import make_tiny_model
    return make_tiny_model(model_dir / "tiny-draft-near", seed=1, noise_from=tiny_target, noise=0.005)


@pytest.fixture(scope="session")
def tiny_draft_weak(model_dir) -> Path:
    """An unrelated random model with the same vocabulary: almost every draft is rejected."""
    from tests.helpers import make_tiny_model
    return make_tiny_model(model_dir / "tiny-draft-weak", seed=7)


@pytest.fixture(scope="session")
def tiny_draft_vocab80(model_dir) -> Path:
    """A model whose vocabulary (80) differs from the target's (64): an incompatible draft."""
    from tests.helpers import make_tiny_model
    return make_tiny_model(model_dir / "tiny-draft-vocab80", seed=2, vocab_size=80)


# ---- coordinators --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def launch_tracked(pids):
    """``launch_tracked(target, draft=None, **options)``: dovetail.launch with test defaults.

    Defaults: dtype float64 (exact greedy comparisons), a CPU draft, passive OpenMP waiting.
    Worker pids are registered with ``pids`` so they are killed at session end whatever
    happens; the caller still closes the coordinator (in a fixture's finally).
    """
    import dovetail

    def start(target, draft=None, **options):
        options.setdefault("dtype", "float64")
        if draft is not None:
            options.setdefault("draft_device", "cpu")
            # A tiny model's measured verify curve says nothing about whether drafting pays, and
            # timing noise could make launch() skip the draft (autotree.skip_draft_reason): these
            # tests need it started. tests/dovetail/runtime/test_launch.py tests that decision.
            options.setdefault("force_draft", True)
        options["env"] = {**WORKER_ENV, **options.get("env", {})}
        coord = dovetail.launch(target, draft, **options)
        for pid in coord.worker_pids.values():
            pids.track(pid)
        return coord

    return start


def _close_all(coords) -> list[int]:
    """Close coordinators concurrently (each waits for its workers to exit); return the pids
    of workers still running EXIT_S later (expected: none)."""
    coords = [c for c in coords if c is not None]
    worker_pids = [p for c in coords for p in c.worker_pids.values() if p is not None]
    if coords:
        with ThreadPoolExecutor(len(coords)) as ex:
            for f in [ex.submit(c.close) for c in coords]:
                f.result()
    return wait_gone(worker_pids, EXIT_S)


@pytest.fixture(scope="session")
def launch_all(launch_tracked):
    """``launch_all({name: (target, draft, options)})``: launch coordinators concurrently.

    Worker startup is mostly importing torch and transformers, one core each; launching
    several coordinators at once keeps both cores busy. If any launch fails, the others
    are closed and the first error is raised. Close the result with ``close_all``.
    """

    def start(specs: dict) -> dict:
        with ThreadPoolExecutor(len(specs)) as ex:
            futures = {name: ex.submit(launch_tracked, t, d, **opts) for name, (t, d, opts) in specs.items()}
        coords, error = {}, None
        for name, fut in futures.items():
            try:
                coords[name] = fut.result()
            except BaseException as e:  # noqa: BLE001 - re-raised below, after cleanup
                error = error or e
        if error is not None:
            _close_all(coords.values())
            raise error
        return coords

    return start


@pytest.fixture(scope="session")
def close_all():
    """``close_all(coordinators) -> still_running_pids``: close concurrently, then check."""
    return _close_all
