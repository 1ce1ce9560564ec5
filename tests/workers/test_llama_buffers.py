"""llama.cpp's extra buffer types: the per-machine probe in a child process, its cache, the setting.

The probe's child is injectable: the functions of llama_probe_children.py really die by
SIGSEGV, exit non-zero or hang in a child process, so the verdict, the fallback to plain buffers and the cache are
checked as they run, with no mock of the decision. The tests that load weights use the
SmolLM2-135M GGUF (fetched once, 90 MB); CI installs llama-cpp-python and sets
DOVETAIL_REQUIRE_LLAMA=1, so a missing library fails there instead of skipping.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from dovetail.workers import llama_buffers
from dovetail.models.options import check_llama_extra_buffers
from dovetail.workers.llama_buffers import CRASH, HANG, KILLED, OK, decide

pytestmark = pytest.mark.timeout(300)

SMALL_GGUF = "smollm2-135m-instruct"


# ---- children: really die by SIGSEGV, exit 3, pass or hang, in the probe's child process --------
def _children():
    path = Path(__file__).with_name("llama_probe_children.py")
    spec = importlib.util.spec_from_file_location("llama_probe_children", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the probe finds the file of a function's module here
    spec.loader.exec_module(module)
    return module


_kids = _children()
segfault_probe, exit_probe, clean_probe, hang_probe, raising_probe, killed_probe = (
    _kids.segfault_probe, _kids.exit_probe, _kids.clean_probe, _kids.hang_probe, _kids.raising_probe,
    _kids.killed_probe)


# ---- fixtures ----------------------------------------------------------------------------
@pytest.fixture
def model(tmp_path):
    """A stand-in model file: the injected children never read it."""
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    return str(path)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty per-test cache (DOVETAIL_CACHE), so no verdict of this machine leaks in."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("DOVETAIL_CACHE", str(folder))
    return folder / "llama_extra_buffers"


def need_llama() -> None:
    if os.environ.get("DOVETAIL_REQUIRE_LLAMA") != "1":
        pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llama]')")


@pytest.fixture(scope="module")
def small_gguf():
    need_llama()
    from dovetail.models.fetch import fetch_model
    return str(fetch_model(SMALL_GGUF))


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "dovetail.llama"]


# ---- verdicts ------------------------------------------------------------------------------
def test_a_probe_killed_by_sigsegv_turns_extra_buffers_off_and_is_cached(model, cache, caplog):
    caplog.set_level(logging.INFO, "dovetail.llama")
    d = decide("auto", model, 2, child=segfault_probe)
    assert d.extra_buffers is False and d.setting == "auto"
    assert (d.verdict.verdict, d.verdict.signal, d.verdict.probed) == (CRASH, "SIGSEGV", True)
    assert "died with SIGSEGV" in d.verdict.reason
    [line] = warnings_of(caplog)  # one line: why, what it costs, how to force
    assert "SIGSEGV" in line and "on this CPU" in line
    assert f"~{llama_buffers.PLAIN_COST_K1:.0%} at k=1" in line and f"~{llama_buffers.PLAIN_COST_K4:.0%} at k=4" in line
    assert "12%" in line and "35%" in line and "--llama-extra-buffers on" in line
    [file] = cache.glob("*.json")
    saved = json.loads(file.read_text())
    assert (saved["verdict"], saved["signal"], saved["model"]) == (CRASH, "SIGSEGV", model)
    assert saved["key"]["cpu"] and saved["key"]["cpu_flags"] is not None

    # The next start reads the verdict: a child that would pass is never run.
    caplog.clear()
    again = decide("auto", model, 2, child=clean_probe)
    assert again.extra_buffers is False and again.verdict.probed is False
    assert again.verdict.signal == "SIGSEGV" and again.verdict.cache_path == str(file)
    assert len(warnings_of(caplog)) == 1


def test_a_non_zero_exit_is_a_crash(model, cache):
    v = decide("auto", model, 1, child=exit_probe).verdict
    assert (v.verdict, v.returncode, v.signal) == (CRASH, 3, None) and "exited with code 3" in v.reason


def test_a_clean_exit_keeps_extra_buffers_and_logs_no_warning(model, cache, caplog):
    d = decide("auto", model, 1, child=clean_probe)
    assert d.extra_buffers is True and d.verdict.verdict == OK and not warnings_of(caplog)
    assert json.loads(next(cache.glob("*.json")).read_text())["verdict"] == OK


def test_a_hanging_probe_hits_the_time_limit_and_is_killed(model, cache, caplog):
    t0 = time.monotonic()
    d = decide("auto", model, 1, child=hang_probe, timeout_s=3.0)
    assert time.monotonic() - t0 < 30
    assert d.extra_buffers is False and d.verdict.verdict == HANG
    assert "3 s time limit" in d.verdict.reason and "time limit" in warnings_of(caplog)[0]
    pid = int(open(model + ".pid").read())
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(pid, 0)


def test_a_hang_or_a_kill_is_kept_until_its_retry_time_then_probed_again(model, cache, monkeypatch, caplog):
    """A probe that timed out, or that the OOM killer ended (SIGKILL), says more about the
    machine then than about the buffers: its verdict is not a crash cached forever."""
    caplog.set_level(logging.INFO, "dovetail.llama")
    d = decide("auto", model, 1, child=killed_probe)
    assert d.extra_buffers is False and (d.verdict.verdict, d.verdict.signal) == (KILLED, "SIGKILL")
    assert "then probed again" in warnings_of(caplog)[-1]
    [file] = cache.glob("*.json")
    retry_after = json.loads(file.read_text())["retry_after"]
    assert retry_after >= time.time() + llama_buffers.RETRY_S - 60
    assert decide("auto", model, 1, child=clean_probe).verdict.probed is False  # within the window: cached
    monkeypatch.setattr(llama_buffers, "RETRY_S", 0.0)
    file.write_text(json.dumps({**json.loads(file.read_text()), "retry_after": time.time() - 1}))  # window over
    again = decide("auto", model, 1, child=hang_probe, timeout_s=2.0)  # probed again: now it hangs
    assert again.verdict.probed and again.verdict.verdict == HANG and again.extra_buffers is False
    ok = decide("auto", model, 1, child=clean_probe)  # the hang's window (0 s) is over as well
    assert ok.verdict.probed and ok.extra_buffers is True
    assert json.loads(file.read_text())["verdict"] == OK and decide("auto", model, 1, child=segfault_probe).verdict.ok


def test_a_real_crash_stays_cached_and_an_old_cached_kill_is_probed_again(model, cache, monkeypatch):
    monkeypatch.setattr(llama_buffers, "RETRY_S", 0.0)
    assert decide("auto", model, 1, child=segfault_probe).verdict.signal == "SIGSEGV"
    assert decide("auto", model, 1, child=clean_probe).verdict.probed is False  # no retry for a crash
    [file] = cache.glob("*.json")
    old = json.loads(file.read_text())  # as an older version cached a SIGKILL: a crash, no retry time
    old.update(signal="SIGKILL", reason="died with SIGKILL", returncode=-9)
    old.pop("retry_after", None)
    file.write_text(json.dumps(old))
    d = decide("auto", model, 1, child=clean_probe)
    assert d.verdict.probed and d.extra_buffers is True


@pytest.mark.parametrize("setting,extra", [("on", True), ("off", False)])
def test_forced_settings_skip_the_probe(model, cache, setting, extra, caplog):
    d = decide(setting, model, 1, child=segfault_probe)
    assert (d.extra_buffers, d.verdict) == (extra, None) and d.describe() == f"{'on' if extra else 'off'} (forced)"
    assert not cache.exists() and not warnings_of(caplog)


def test_the_cache_key_follows_the_cpu_build_and_model_file(model, tmp_path):
    key, parts = llama_buffers.cache_key(model)
    assert set(parts) == {"cpu", "cpu_flags", "llama_cpp", "model", "probe"}
    assert parts["model"][0] == os.path.realpath(model)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF")
    assert llama_buffers.cache_key(str(other))[0] != key


def test_a_python_error_in_the_probe_is_no_verdict(model, cache, tmp_path, caplog):
    """A fault of the probe's own code (here: the entry point's file is broken by the time
    the child loads it) says nothing about llama.cpp: extra buffers stay on, nothing cached."""
    src = tmp_path / "broken_child.py"
    src.write_text("def probe(model, threads):\n    pass\n")
    spec = importlib.util.spec_from_file_location("broken_child", src)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        src.write_text("raise RuntimeError('broken on purpose')\n")
        d = decide("auto", model, 1, child=module.probe)
    finally:
        del sys.modules[spec.name]
    assert d.extra_buffers is True and d.verdict.verdict == llama_buffers.ERROR
    assert "broken on purpose" in d.verdict.reason and not cache.exists()
    assert "stay on" in warnings_of(caplog)[0]
    d = decide("auto", model, 1, child=raising_probe)  # an exception inside the probe: the same
    assert d.extra_buffers is True and "AttributeError" in d.verdict.reason and not cache.exists()


def test_the_child_must_be_a_module_level_function(model):
    with pytest.raises(ValueError, match="module-level"):
        llama_buffers.run_probe(model, 1, child=lambda m, t: None)


# ---- the setting: validated before anything starts, passed to the workers ----------------------
def test_bad_settings_are_refused_with_the_choices(model):
    with pytest.raises(ValueError, match="auto, on, off"):
        check_llama_extra_buffers("yes")
    import psutil

    import dovetail
    before = {p.pid for p in psutil.Process().children()}
    with pytest.raises(ValueError, match="llama_extra_buffers must be one of auto, on, off"):
        dovetail.launch(model, None, backend="llama.cpp", llama_extra_buffers="maybe")
    assert {p.pid for p in psutil.Process().children()} <= before  # refused before any worker started
    from dovetail.workers.draft import DraftConfig
    from dovetail.workers.target import TargetConfig
    for config, kw in ((TargetConfig, {"model": model}), (DraftConfig, {"model": model})):
        with pytest.raises(ValueError, match="--llama-extra-buffers"):
            config(bind="ipc:///tmp/x", llama_extra_buffers="1", **kw)


def test_the_setting_reaches_the_workers_command_lines(model, monkeypatch):
    """dovetail-launch -> launch() -> each llama.cpp worker's --llama-extra-buffers."""
    need_llama()  # launch() refuses the llama.cpp backend without it
    import dovetail
    from dovetail import cli
    launch_mod = sys.modules["dovetail.runtime.launch"]  # the module; dovetail.launch is the function
    spawned = []

    class Stop(Exception):
        pass

    def spawn(ctx, role, run_dir, args, config):
        spawned.append((role, args))
        if role != "target":
            raise Stop
        return SimpleNamespace(close=lambda: None)

    monkeypatch.setattr(launch_mod, "_spawn", spawn)
    with pytest.raises(Stop):
        dovetail.launch(model, model, backend="llama.cpp", draft_device="cpu", depth=2, llama_extra_buffers="off")
    (_, target_args), (_, draft_args) = spawned
    for args in (target_args, draft_args):
        assert args[args.index("--llama-extra-buffers") + 1] == "off"

    seen = {}
    monkeypatch.setattr(dovetail, "launch", lambda *a, **kw: seen.update(kw))
    cli.start_coordinator(cli.build_parser().parse_args(["--llama-extra-buffers", "on"]))
    assert seen["llama_extra_buffers"] == "on"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--llama-extra-buffers", "maybe"])


# ---- real weights --------------------------------------------------------------------------
@pytest.mark.real_model
def test_the_real_probe_gives_a_verdict_and_caches_it(small_gguf, cache):
    d = decide("auto", small_gguf, 2)
    v = d.verdict
    assert v.verdict in (OK, CRASH, HANG) and v.probed and d.extra_buffers == v.ok
    # A failing verdict of a real probe is a signal or a hang, never a Python error of ours.
    assert v.ok or v.signal is not None or v.verdict == HANG, v.stderr_tail
    assert json.loads(next(cache.glob("*.json")).read_text())["verdict"] == v.verdict
    # The second call reads the cache: a child that would crash is never started.
    again = decide("auto", small_gguf, 2, child=segfault_probe)
    assert (again.verdict.verdict, again.verdict.probed, again.extra_buffers) == (v.verdict, False, d.extra_buffers)


@pytest.mark.real_model
def test_after_a_crash_verdict_the_target_loads_plain_buffers_and_decodes(small_gguf, cache):
    import torch

    from dovetail.workers.target import TargetConfig, load_backend
    cfg = TargetConfig(bind="ipc:///tmp/unused", model=small_gguf, backend="llama.cpp", ctx=512, max_requests=2)
    threads = torch.get_num_threads()
    backend = load_backend(cfg, [0, 1], "cpu", probe_child=segfault_probe)
    torch.set_num_threads(threads)  # load_backend leaves torch one thread, as a worker wants
    try:
        assert backend.extra_buffers is False  # read back from the llama_model_params it loaded with
        assert backend.identity.device.endswith("llama.cpp, plain buffers")
        seq = backend.new_sequence()
        backend.prefill(seq, [1, 2, 3, 4, 5], hidden=False)
        out = backend.verify(seq, 6, [7, 8, 9], [-1, 0, 1], hidden=False)
        assert out.logits.shape == (4, backend.vocab_size) and bool(out.logits.isfinite().all())
    finally:
        backend.close()
    assert json.loads(next(cache.glob("*.json")).read_text())["signal"] == "SIGSEGV"


@pytest.mark.real_model
def test_the_llama_cpp_peer_loads_as_asked(small_gguf):
    for extra in (False, True):
        llm = llama_buffers.open_llama(extra, model_path=small_gguf, n_ctx=64, verbose=False)
        assert bool(llm.model_params.use_extra_bufts) is extra
        llm.eval([1, 2, 3])
        llm.close()
    import llama_cpp
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts  # the default is restored
