"""A worker process's end, told plainly: describe_exit() names the signal that killed it and
what that usually means, and shows the last lines of its log; WorkerLog keeps that log (a
local worker's stderr, shown live and copied to the run dir, where it survives a terminal or
notebook that lost it)."""
from __future__ import annotations

import codecs
import logging
import os
import queue
import re
import signal
import sys
import threading
from pathlib import Path

log = logging.getLogger("dovetail")

LOG_TAIL_LINES = 20       # lines of a dead worker's log its error shows
LOG_EOF_WAIT_S = 1.0      # how long a dead worker's last log lines may take to arrive
LOG_ECHO_BACKLOG = 1024   # chunks of a worker's stderr waiting to be shown; more are dropped, never waited for
LOG_LINE_CHARS = 300      # a longer log line is cut (faulthandler's "Extension modules: ..." line)
LLAMA_KNOB = '--llama-extra-buffers off (dovetail-launch) or llama_extra_buffers="off" (launch())'
CRASH_SIGNALS = ("SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT")
SIGNAL_HINTS = {
    "SIGSEGV": "it crashed in native code",
    "SIGBUS": "it crashed in native code: a bad memory access, e.g. to a memory-mapped file that shrank",
    "SIGILL": "it crashed in native code: an instruction this CPU lacks (a library built for another CPU?)",
    "SIGFPE": "it crashed in native code: an arithmetic fault",
    "SIGABRT": "it aborted: a failed check or fatal error in native code",
    "SIGKILL": "a common cause is the kernel's out-of-memory killer, when the machine runs out of memory "
               "(`dmesg` shows its report); or another process killed it",
    "SIGTERM": "another process asked it to stop",
    "SIGINT": "interrupted (Ctrl-C)",
}


def describe_exit(returncode: int, log_path: str | Path | None = None, backend: str | None = None,
                  pid: int | None = None) -> str:
    """What to tell the user about a worker process that ended: how (the signal's name, not
    "code -11", and what it usually means), a hint for a crash inside llama.cpp (``backend``
    "llama.cpp", or its log mentions llama/ggml), and the last lines of its log. The one
    description of a dead worker: WorkerClient (at start-up and after) and the heartbeats use it."""
    who = f"process {pid}" if pid is not None else "the process"
    name = None
    if returncode < 0:
        name = signal_name(-returncode)
        text = f"{who} was killed by {name}"
        if name in SIGNAL_HINTS:
            text += f" ({SIGNAL_HINTS[name]})"
    else:
        text = f"{who} exited with code {returncode}"
    tail = log_tail(log_path) if log_path is not None else None
    if name in CRASH_SIGNALS and (backend == "llama.cpp" or (tail and re.search(r"llama|ggml", tail, re.I))):
        text += f". A crash inside llama.cpp may be avoided with {LLAMA_KNOB}"
    if tail:
        return f"{text}. The end of its log:\n{tail}"
    if log_path is not None and os.path.isfile(log_path):
        return f"{text}; it wrote nothing to its log"
    return f"{text} (see its log above)"


def signal_name(number: int) -> str:
    """"SIGSEGV" for 11; "signal N" for a number with no name here."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def log_tail(path: str | Path, lines: int = LOG_TAIL_LINES, max_bytes: int = 256 * 1024) -> str | None:
    """The last ``lines`` lines of a worker's log as a terminal showed them (a progress bar's
    carriage returns keep only its last state), indented; None when there is no such file or
    it is empty. A Python fatal-error dump (faulthandler: the stack of a crash) near the end
    is shown from its first line, innermost frames first, in up to ``lines`` + 10 lines."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return None
    text = data.decode("utf-8", "replace")
    if size > max_bytes:
        text = text.split("\n", 1)[-1]  # a partial first line
    shown = []
    for line in text.split("\n"):
        parts = [p for p in line.split("\r") if p.strip()]
        line = (parts[-1] if parts else "").rstrip()
        shown.append(line if len(line) <= LOG_LINE_CHARS else line[:LOG_LINE_CHARS] + " ...")
    while shown and not shown[-1]:
        shown.pop()
    if not any(shown):
        return None
    fatal = next((i for i in range(len(shown) - 1, -1, -1) if shown[i].startswith("Fatal Python error")), None)
    if fatal is not None and fatal < len(shown) - lines:
        start = max(0, fatal - 3)  # what native code printed just before it crashed
        end = min(len(shown), start + lines + 10)
        picked = shown[start:end] + ([f"... ({len(shown) - end} more lines)"] if end < len(shown) else [])
    else:
        picked = shown[-lines:]
    return "\n".join(f"    | {line}" for line in picked)


class WorkerLog:
    """A local worker's stderr (a pipe), copied as it comes to ``path`` and to this process's
    sys.stderr (live, as when the worker inherited it: raw bytes, so a progress bar's
    carriage returns still redraw it).

    One thread reads the pipe and appends to the file without ever waiting on anything else,
    so the worker never blocks on its stderr; another shows the chunks on sys.stderr, which
    may block (a full pipe, a slow notebook): what it falls behind by more than
    LOG_ECHO_BACKLOG chunks is dropped from the live copy only. The file is closed at the
    worker's EOF (it exited).
    """

    def __init__(self, pipe, path: str | Path, role: str):
        self.path = Path(path)
        self._pipe = pipe
        try:
            self._file = open(self.path, "wb", buffering=0)
        except OSError as e:
            log.warning("%s worker: cannot write its log to %s (%s); showing it only", role, self.path, e)
            self._file = None
        self._echo: queue.Queue = queue.Queue(LOG_ECHO_BACKLOG)
        self._eof = threading.Event()
        self.dropped = 0  # bytes not shown live (the echo fell behind); the file has them
        self._reader = threading.Thread(target=self._read, name=f"dovetail-{role}-log", daemon=True)
        self._shower = threading.Thread(target=self._show, name=f"dovetail-{role}-stderr", daemon=True)
        self._reader.start()
        self._shower.start()

    def wait(self, timeout_s: float) -> bool:
        """Wait until the worker's stderr reached EOF and the file is complete; False on timeout
        (a process the worker started may still hold its stderr open)."""
        return self._eof.wait(timeout_s)

    def finish(self, timeout_s: float = LOG_EOF_WAIT_S) -> None:
        """After the worker exited: let the copies end (the live one shown to its last line)."""
        if self._eof.wait(timeout_s):
            self._shower.join(timeout_s)

    def _read(self) -> None:
        fd = self._pipe.fileno()
        try:
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except InterruptedError:
                    continue
                if not chunk:
                    break
                if self._file is not None:
                    try:
                        self._file.write(chunk)
                    except OSError:  # a full disk: keep draining, keep showing
                        self._close_file()
                try:
                    self._echo.put_nowait(chunk)
                except queue.Full:
                    self.dropped += len(chunk)
        except OSError:
            pass
        finally:
            self._close_file()
            try:
                self._pipe.close()
            except OSError:
                pass
            self._eof.set()

    def _close_file(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass

    def _show(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")  # for a text-only sys.stderr
        while True:
            try:
                chunk = self._echo.get(timeout=0.1)
            except queue.Empty:
                if self._eof.is_set() and self._echo.empty():
                    return
                continue
            err = sys.stderr  # looked up each time: it may be replaced (pytest, a notebook)
            if err is None:
                continue
            try:
                buf = getattr(err, "buffer", None)
                if buf is not None:
                    buf.write(chunk)
                    buf.flush()
                else:
                    err.write(decoder.decode(chunk))
                    err.flush()
            except (OSError, ValueError, AttributeError):  # closed or gone: the file has it
                pass
