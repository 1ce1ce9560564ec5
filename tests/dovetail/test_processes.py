"""The worker processes' lives: who they are, where they run, and that they always go away.

Every test that starts workers either closes them or kills them; the session fixture in
conftest SIGKILLs any tracked worker still alive at the end.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

import dovetail
from dovetail.runtime.client import WorkerUnresponsive
from dovetail.system.worker_log import LLAMA_KNOB, describe_exit
from dovetail.protocol import HandshakeMismatch

pytestmark = pytest.mark.timeout(90)

CPUS = sorted(os.sched_getaffinity(0))
PROMPT = [1, 5, 9, 13]
# Wall-clock bounds below are several times what an idle 2-core machine needs (a busy one can be
# 3-5x slower), and each stays far below the timeout it proves was not waited for.
SLACK_S = 8.0


def live_children() -> set[int]:
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def affinity(pid: int) -> list[int]:
    return sorted(psutil.Process(pid).cpu_affinity())


TWO = len(CPUS) >= 2
TARGET_CPUS = CPUS[:2] if TWO else CPUS[:1]   # given as a list
DRAFT_CPUS = CPUS[1:2] if TWO else CPUS[:1]


@pytest.fixture(scope="module")
def pinned(launch_tracked, tiny_target, tiny_draft_near):
    """Target and draft pinned to CPU lists. The last two tests kill its target, then close it."""
    coord = launch_tracked(tiny_target, tiny_draft_near, target_cpus=TARGET_CPUS, draft_cpus=DRAFT_CPUS)
    try:
        yield coord
    finally:
        coord.close()


def test_two_distinct_live_worker_processes(pinned, pids):
    wp = pinned.worker_pids
    target, draft = wp["target"], wp["draft"]
    assert None not in (target, draft)
    assert len({target, draft, os.getpid()}) == 3
    for role, pid in wp.items():
        assert pids.alive(pid), role
        proc = psutil.Process(pid)
        assert proc.ppid() == os.getpid()  # started by this (the coordinator's) process
        assert f"dovetail.workers.{role}" in proc.cmdline()
    # Each worker reported its own pid in the handshake.
    assert pinned.target_info.pid == target and pinned.draft_info.pid == draft
    assert pinned.target_info.role == "target" and pinned.draft_info.role == "draft"
    assert pinned.generate(PROMPT, max_new_tokens=8).stats.new_tokens == 8


def test_target_and_draft_cpu_lists_pin_the_workers(pinned):
    assert affinity(pinned.worker_pids["target"]) == TARGET_CPUS
    assert affinity(pinned.worker_pids["draft"]) == DRAFT_CPUS


KILLED_COORDINATOR = textwrap.dedent("""
    import json, sys, time
    import dovetail
    coord = dovetail.launch(sys.argv[1], sys.argv[2], dtype="float64", draft_device="cpu", force_draft=True,
                            target_cpus=sys.argv[3], env={"OMP_WAIT_POLICY": "PASSIVE"})
    coord.generate([1, 2, 3], max_new_tokens=4)
    print(json.dumps({"pids": coord.worker_pids, "run_dir": str(coord._run_dir)}), flush=True)
    time.sleep(300)
""")


@pytest.mark.timeout(90)
def test_sigkilled_coordinator_takes_its_workers_down(tiny_target, tiny_draft_near, pids, tmp_path):
    """Also: target_cpus as a string pins the target, and a CPU draft inherits it."""
    log = tmp_path / "coordinator.log"
    cpu = str(CPUS[0])
    with open(log, "wb") as err:
        script = subprocess.Popen([sys.executable, "-c", KILLED_COORDINATOR, str(tiny_target), str(tiny_draft_near), cpu],
                                  stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
    pids.track(script.pid)
    workers: dict[str, int] = {}
    run_dir = None
    try:
        ready, _, _ = select.select([script.stdout], [], [], 60)
        line = script.stdout.readline() if ready else b""
        assert line, f"the coordinator script printed nothing (rc={script.poll()}): {log.read_text()[-3000:]}"
        info = json.loads(line)
        workers, run_dir = info["pids"], Path(info["run_dir"])
        for pid in workers.values():
            pids.track(pid)
        assert set(workers) == {"target", "draft"} and all(pids.alive(p) for p in workers.values())
        assert all(psutil.Process(p).ppid() == script.pid for p in workers.values())
        assert affinity(workers["target"]) == [CPUS[0]] and affinity(workers["draft"]) == [CPUS[0]]
        # Spawned from the main thread: the kernel's parent-death signal backs the pid watch.
        assert all("--parent-death-signal" in psutil.Process(p).cmdline() for p in workers.values())

        script.kill()  # SIGKILL: no close(), no atexit, nothing
        script.wait(10)
        t0 = time.monotonic()
        left = pids.wait_gone(list(workers.values()))
        assert not left, f"workers {left} outlived their coordinator by {time.monotonic() - t0:.1f} s"
        # their logs stay (the coordinator that would have removed them is gone); nothing else
        left_files = sorted(f.name for f in run_dir.iterdir() if f.name not in ("target.log", "draft.log"))
        assert not left_files, (f"orphaned workers left {left_files} behind (they remove their ipc socket "
                                f"files); their log: {log.read_text()[-3000:]}")
    finally:
        script.kill()
        script.wait(10)
        script.stdout.close()
        for pid in workers.values():
            pids.kill(pid)
        if run_dir is not None:  # the killed coordinator could not remove it
            shutil.rmtree(run_dir, ignore_errors=True)


def test_missing_model_path_is_refused_before_starting_anything(tiny_target, tmp_path):
    before = live_children()
    missing = tmp_path / "no-such-model"
    for target, draft in ((missing, None), (tiny_target, missing)):
        t0 = time.monotonic()
        with pytest.raises((FileNotFoundError, ValueError)) as caught:
            dovetail.launch(target, draft, dtype="float64", draft_device="cpu")
        assert time.monotonic() - t0 < 15  # no worker started (one costs seconds of imports)
        assert "no-such-model" in str(caught.value)
    assert live_children() <= before


def test_missing_model_path_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        dovetail.launch(tmp_path / "no-such-model", None, dtype="float64")


@pytest.mark.timeout(150)
def test_target_that_fails_to_load_is_reported_and_cleaned_up(tmp_path, pids):
    """An existing folder that is no model: the target exits during startup and launch says
    so at once (not after startup_timeout_s)."""
    before = live_children()
    broken = tmp_path / "broken-model"
    broken.mkdir()
    t0 = time.monotonic()
    with pytest.raises(dovetail.WorkerError) as caught:
        dovetail.launch(broken, None, dtype="float64", env={"OMP_WAIT_POLICY": "PASSIVE"})
    # The worker imports torch and transformers (~5 s idle, 3-5x that on a busy 2-core box) and
    # fails; launch must not sit out startup_timeout_s (30 minutes).
    assert time.monotonic() - t0 < 90
    assert caught.value.role == "target" and "did not start" in str(caught.value)
    assert not pids.wait_gone(list(live_children() - before))


@pytest.mark.timeout(150)
def test_target_crashing_at_start_up_names_the_signal_and_shows_its_log(tiny_target, pids, capfd):
    """A target killed by SIGSEGV while it loads (as by a crash in llama.cpp): the error names
    the signal (not "code -11") and shows the end of its log, where faulthandler wrote the
    Python stack; the same log was shown live on this process's stderr; and the run dir,
    log included, goes with the failed launch."""
    before = live_children()
    crashed: dict = {}
    stop = threading.Event()

    def crash_the_target_once_it_logs():
        while not stop.wait(0.01):
            for child in psutil.Process().children():
                try:
                    cmd = child.cmdline()
                except psutil.Error:
                    continue
                if "dovetail.workers.target" not in cmd:
                    continue
                log = Path(cmd[cmd.index("--bind") + 1][len("ipc://"):]).with_name("target.log")
                # its first line: Python runs (faulthandler on) and it is about to load its model
                if log.is_file() and b"pinned to" in log.read_bytes():
                    os.kill(child.pid, signal.SIGSEGV)
                    crashed.update(pid=child.pid, log=log)
                    return

    killer = threading.Thread(target=crash_the_target_once_it_logs, daemon=True)
    killer.start()
    try:
        with pytest.raises(dovetail.WorkerError) as caught:
            coord = dovetail.launch(tiny_target, None, dtype="float64", log_level="info",
                                    env={"OMP_WAIT_POLICY": "PASSIVE"})
            coord.close()  # the target answered before it was signalled: a failure, cleaned up
    finally:
        stop.set()
        killer.join(10)
    msg = str(caught.value)
    assert crashed, f"the target was never signalled: {msg}"
    assert caught.value.role == "target" and "did not start" in msg, msg
    assert f"process {crashed['pid']} was killed by SIGSEGV" in msg and "code -11" not in msg, msg
    assert "Fatal Python error: Segmentation fault" in msg, msg  # from its log
    assert "most recent call first" in msg and 'File "' in msg, msg  # faulthandler's stack
    assert LLAMA_KNOB not in msg  # a transformers target, and no llama/ggml in its log
    assert "Fatal Python error: Segmentation fault" in capfd.readouterr().err  # shown live too
    assert not crashed["log"].parent.exists()  # the run dir, its log included, is removed
    assert not pids.wait_gone(list(live_children() - before))


def test_describe_exit_names_signals_and_hints(tmp_path):
    """The one description of a dead worker: signal names, the OOM hint for SIGKILL, the
    llama.cpp knob for a crash there, and the end of the log as a terminal showed it."""
    log = tmp_path / "target.log"
    log.write_bytes(b"".join(b"line %d\n" % i for i in range(30)) + b"load  10%\rload  50%\rload 100%\n")
    msg = describe_exit(-11, log, "transformers", pid=7005)
    assert msg.startswith("process 7005 was killed by SIGSEGV") and "code -11" not in msg
    assert "line 29" in msg and "line 11" in msg and "line 10" not in msg  # the last 20 lines
    assert "load 100%" in msg and "load  50%" not in msg  # a progress bar's last state
    assert LLAMA_KNOB not in msg
    assert LLAMA_KNOB in describe_exit(-11, log, "llama.cpp")
    assert LLAMA_KNOB not in describe_exit(-9, log, "llama.cpp")  # not a crash
    log.write_text("ggml_backend_cpu: something\n")
    assert LLAMA_KNOB in describe_exit(-6, log, None) and "SIGABRT" in describe_exit(-6, log, None)
    killed = describe_exit(-9, log)
    assert "SIGKILL" in killed and "out-of-memory" in killed
    # a faulthandler dump longer than the tail is shown from its first line
    log.write_text("before\nFatal Python error: Segmentation fault\n\n"
                   + "".join(f'  File "x.py", line {i} in f\n' for i in range(40)))
    dump = describe_exit(-11, log)
    assert "Fatal Python error: Segmentation fault" in dump and "before" in dump and "more lines" in dump
    log.write_text("")
    assert describe_exit(1, log, pid=3) == "process 3 exited with code 1; it wrote nothing to its log"
    assert describe_exit(1, None, pid=3) == "process 3 exited with code 1 (see its log above)"


@pytest.mark.timeout(60)
def test_draft_with_another_vocabulary_is_refused(tiny_target, tiny_draft_vocab80, pids):
    before = live_children()
    with pytest.raises(HandshakeMismatch) as caught:
        dovetail.launch(tiny_target, tiny_draft_vocab80, dtype="float64", draft_device="cpu", force_draft=True,
                        env={"OMP_WAIT_POLICY": "PASSIVE"})
    msg = str(caught.value)
    assert caught.value.code == "handshake_mismatch"
    assert tiny_target.name in msg and tiny_draft_vocab80.name in msg, msg
    assert "64" in msg and "80" in msg, msg
    assert not pids.wait_gone(list(live_children() - before))
    assert live_children() <= before


def stream_into_stopped_target(coord, target: int, error: type[Exception]):
    """Stream PROMPT, SIGSTOP the target after the first chunk, and expect ``error``;
    the target is resumed before returning (pytest's ExceptionInfo, seconds to the error,
    the tokens streamed)."""
    stream = coord.stream(PROMPT, max_new_tokens=24)
    got = list(next(stream).token_ids)
    os.kill(target, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        with pytest.raises(error) as caught:
            for chunk in stream:
                got.extend(chunk.token_ids)
        return caught, time.monotonic() - t0, got
    finally:
        os.kill(target, signal.SIGCONT)


@pytest.mark.timeout(60)
def test_stalled_target_times_out_and_the_coordinator_recovers(pinned, pids):
    """A target that stops answering (SIGSTOP) gives WorkerTimeout naming the setting to raise;
    resumed, it serves the next request, and the stale replies of the old one are dropped."""
    import dataclasses
    target = pinned.worker_pids["target"]
    expected = pinned.generate(PROMPT, max_new_tokens=24).token_ids
    saved = pinned.config
    pinned.config = dataclasses.replace(saved, verify_timeout_s=1.0)
    try:
        caught, elapsed, got = stream_into_stopped_target(pinned, target, dovetail.WorkerTimeout)
    finally:
        pinned.config = saved
    assert 0.9 < elapsed < 1.0 + SLACK_S
    # The 1 s timeout ended it, not the heartbeats (WorkerUnresponsive, a WorkerTimeout too).
    assert type(caught.value) is dovetail.WorkerTimeout
    assert caught.value.role == "target" and "verify_timeout_s" in str(caught.value)
    assert got == expected[:len(got)]
    assert pids.alive(target)
    r = pinned.generate(PROMPT, max_new_tokens=24)
    assert r.token_ids == expected and not r.stats.draft_fallback


@pytest.mark.timeout(60)
def test_hung_target_is_caught_by_missed_heartbeats(pinned, pids):
    """SIGSTOP with the default verify_timeout_s (120 s): the heartbeats, not the timeout,
    end the request, within heartbeat_interval_s x heartbeat_liveness plus one interval and
    slack, with one error that names both settings. Resumed, the target serves again."""
    cfg = pinned.config
    target = pinned.worker_pids["target"]
    expected = pinned.generate(PROMPT, max_new_tokens=24).token_ids
    assert cfg.verify_timeout_s >= 60
    bound = cfg.liveness_window_s + cfg.heartbeat_interval_s + SLACK_S  # far below verify_timeout_s
    caught, elapsed, got = stream_into_stopped_target(pinned, target, dovetail.WorkerError)
    assert elapsed < bound, f"noticed after {elapsed:.1f} s, bound {bound:.1f} s"
    assert type(caught.value) is WorkerUnresponsive and caught.value.role == "target"
    assert "heartbeat_interval_s" in str(caught.value) and "heartbeat_liveness" in str(caught.value)
    assert got == expected[:len(got)]
    deadline = time.monotonic() + 30  # cleared by its next answered heartbeat
    while pinned.target.unresponsive is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pinned.generate(PROMPT, max_new_tokens=24).token_ids == expected
    assert pids.alive(target)


# The last two tests share ``pinned`` in this order: kill its target, then close it.
@pytest.mark.timeout(60)
def test_target_killed_mid_run_raises_worker_died(pinned, pids):
    target, draft = pinned.worker_pids["target"], pinned.worker_pids["draft"]
    assert pinned.generate(PROMPT, max_new_tokens=8).stats.new_tokens == 8

    stream = pinned.stream(PROMPT, max_new_tokens=64)
    next(stream)
    os.kill(target, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(dovetail.WorkerDied) as caught:
        for _ in stream:
            pass
    assert time.monotonic() - t0 < SLACK_S  # noticed as a death (heartbeats would raise WorkerUnresponsive)
    assert caught.value.role == "target" and caught.value.code == "died"
    assert "target" in str(caught.value) and str(target) in str(caught.value)
    msg = str(caught.value)
    assert f"process {target} was killed by SIGKILL" in msg and "code -9" not in msg, msg
    assert "out-of-memory killer" in msg, msg

    t0 = time.monotonic()
    with pytest.raises(dovetail.WorkerDied, match="target") as again:
        pinned.generate(PROMPT, max_new_tokens=8)
    assert time.monotonic() - t0 < SLACK_S
    assert str(again.value) == msg  # described once, the same every time
    assert pids.alive(draft)  # the draft is fine: close() must still stop it


@pytest.mark.timeout(60)
def test_close_leaves_no_process(pinned, pids):
    """Here after the target was killed (when run alone: with both workers alive)."""
    wp = dict(pinned.worker_pids)
    run_dir = pinned._run_dir
    assert run_dir.is_dir()
    # each worker's stderr is kept there while the coordinator is open (and goes with it)
    assert (run_dir / "target.log").is_file() and (run_dir / "draft.log").is_file()
    t0 = time.monotonic()
    pinned.close()
    assert time.monotonic() - t0 < 30
    assert not pids.wait_gone(list(wp.values()))
    for pid in wp.values():  # reaped too, not left as zombies of this process
        assert not psutil.pid_exists(pid) or psutil.Process(pid).ppid() != os.getpid()
    assert not run_dir.exists()
    pinned.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        pinned.generate(PROMPT, max_new_tokens=2)
