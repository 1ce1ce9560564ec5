"""How a worker notices that its coordinator is gone, and leaves.

Locally (started by launch() with --parent-pid) two mechanisms, for different gaps:

* ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` (Linux, --parent-death-signal): the kernel signals
  us the moment our parent goes, with no polling delay. But the kernel ties it to the
  parent *thread* that spawned us, not the process: a coordinator launched from a worker
  thread (a thread pool) would kill its workers when that thread ends. So launch() asks for
  it only when it spawns from the main thread, and it is not available off Linux.
* a thread polling ``getppid()`` every PARENT_POLL_S: works everywhere, whatever thread
  spawned us, and also covers a parent that died before prctl ran.

Remotely there is no parent to watch: ``--heartbeat-timeout S`` makes the worker exit when
no coordinator has sent it anything (the coordinator heartbeats every
heartbeat_interval_s, dovetail/runtime/liveness.py) for S seconds. The clock starts at the first
message, so a worker waits for its first coordinator as long as that takes.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

PARENT_POLL_S = 0.5       # how often a worker checks that its coordinator still lives
PR_SET_PDEATHSIG = 1      # <linux/prctl.h>
DEATH_SIGNAL = signal.SIGTERM  # caught (exit_on_sigterm): the worker removes its ipc socket file


def check_heartbeat_timeout(seconds: float) -> None:
    if seconds < 0:
        raise ValueError(f"--heartbeat-timeout must be >= 0 (0: never), got {seconds}")


def set_parent_death_signal(sig: int = DEATH_SIGNAL) -> bool:
    """Ask the kernel to send ``sig`` when our parent (thread) exits; False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
            return False
    except (OSError, AttributeError) as e:
        log.warning("prctl unavailable (%s); relying on the parent-pid watch", e)
        return False
    return True


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so serve()'s cleanup runs (only the main thread may)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        log.warning("terminated (signal %d); exiting", signum)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def stop_on_signals(stopping: threading.Event) -> None:
    """SIGTERM and SIGINT set ``stopping``: a server (serve(sessions=True)) leaves its loop and
    cleans up, exit status 0, as a service manager expects. Only the main thread may."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        log.warning("%s received; stopping", signal.Signals(signum).name)
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def watch_parent(parent_pid: int, on_orphaned, death_signal: bool = False) -> None:
    """Exit when the coordinator that started us is gone (we get re-parented)."""
    if parent_pid <= 0:
        return
    if death_signal:
        set_parent_death_signal()  # the watch below still runs: it covers what this misses

    def loop():
        while True:
            if os.getppid() != parent_pid:
                log.warning("coordinator (pid %d) is gone; exiting", parent_pid)
                on_orphaned()
                os._exit(0)
            time.sleep(PARENT_POLL_S)

    threading.Thread(target=loop, name="parent-watch", daemon=True).start()


class SilenceClock:
    """Time since a coordinator last sent anything; ``expired()`` after ``timeout_s`` of it."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.last: float | None = None  # None until the first message: not armed yet

    def heard(self) -> None:
        self.last = time.monotonic()

    def expired(self) -> bool:
        return bool(self.timeout_s) and self.last is not None and time.monotonic() - self.last > self.timeout_s
