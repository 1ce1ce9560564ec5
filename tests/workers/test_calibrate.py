"""The target's verify-cost curve: measured on the backend, cached per model and machine.

Nothing here may depend on how busy the machine is (another process may keep a core busy
throughout): tests that need quiet passes get them from a fake load source, and what the
real load source is checked for holds under any load (see the last two tests)."""
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import make_tiny_model
from dovetail.workers import calibrate
from dovetail.workers.backend import HFBackend

pytestmark = pytest.mark.timeout(120)


class CountingBackend(HFBackend):
    """A real tiny backend that counts sequences and the verify sizes it was asked for."""

    def __init__(self, path):
        super().__init__(str(path), dtype=torch.float32)
        self.open, self.sizes = 0, []

    def new_sequence(self):
        self.open += 1
        return super().new_sequence()

    def release(self, seq):
        self.open -= 1

    def verify(self, seq, root, tokens, parents, hidden=True):
        self.sizes.append(len(tokens) + 1)
        assert self.length(seq) == calibrate.CALIBRATE_CONTEXT  # rolled back after each forward
        return super().verify(seq, root, tokens, parents, hidden)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("cal") / "tiny", dtype=torch.float32)


@pytest.fixture
def quiet(monkeypatch):
    """Every pass looks quiet, however busy the machine really is."""
    monkeypatch.setattr(calibrate.OtherLoad, "cores", lambda self: 0.0)


def test_measures_every_k_on_a_clean_sequence(tiny):
    # The real load source: a busy machine may add passes (up to MAX_PASSES), never change
    # what one pass is.
    b, passes = CountingBackend(tiny), []
    curve = calibrate.measure_verify_us(b, b.identity.vocab_size, ks=6, repeats=2, passes_out=passes)
    assert len(curve) == 6 and all(t > 0 for t in curve)
    assert 2 <= len(passes) <= calibrate.MAX_PASSES and all(len(p.seconds) == 6 for p in passes)
    assert b.sizes == [1] + list(range(1, 7)) * len(passes)  # warm-up, then a pass over every k each time
    assert b.open == 0


def test_quiet_passes_are_exactly_the_repeats(tiny, quiet):
    b, passes = CountingBackend(tiny), []
    calibrate.measure_verify_us(b, b.identity.vocab_size, ks=6, repeats=2, passes_out=passes)
    assert b.sizes == [1] + list(range(1, 7)) * 2  # warm-up, then one pass over every k per repeat
    assert [p.others for p in passes] == [0.0, 0.0]


class SeqLimited(CountingBackend):
    """Holds at most ``limit`` sequences (as llama.cpp holds n_seq_max); records verify_many shapes."""

    def __init__(self, path, limit):
        super().__init__(path)
        self.limit, self.batches = limit, []

    def new_sequence(self):
        if self.open >= self.limit:
            raise RuntimeError("all sequence ids are in use")
        return super().new_sequence()

    def verify_many(self, seqs, roots, trees, hidden):
        assert all(self.length(s) == calibrate.BATCH_CONTEXT for s in seqs)  # rolled back each time
        self.batches.append((len(seqs), len(trees[0][0]) + 1))
        return super().verify_many(seqs, roots, trees, hidden)


def test_batch_shapes_fit_the_row_bound_and_the_sequences_held(tiny):
    b = SeqLimited(tiny, limit=5)
    batch = calibrate.measure_batch_us(b, b.identity.vocab_size, max_rows=8, repeats=2)
    shapes = list(zip(batch[0::3], batch[1::3]))
    assert shapes == [(2, 1), (2, 2), (2, 4), (4, 1), (4, 2)]  # 8 requests: more than held; 4x4: > 8 rows
    assert all(us > 0 for us in batch[2::3])
    assert b.batches == shapes * 2 and b.open == 0


def test_small_models_are_measured_not_cached(tiny):
    assert calibrate.cache_key(str(tiny), "transformers", "float32", 2, 64) is None


def test_the_curve_is_cached_per_model_backend_and_threads(tiny, tmp_path, monkeypatch, quiet):
    monkeypatch.setenv("DOVETAIL_CACHE", str(tmp_path))
    monkeypatch.setattr(calibrate, "CACHE_MIN_BYTES", 0)
    monkeypatch.setattr(calibrate, "CALIBRATE_KS", 3)
    monkeypatch.setattr(calibrate, "LONG_KS", (6,))  # k = 1, 2, 3 and 6 measured, 4 and 5 between
    monkeypatch.setattr(calibrate, "NOISY_SPREAD", 1e9)  # this box may be busy: cache regardless
    b = CountingBackend(tiny)
    first = calibrate.load_or_measure(b, str(tiny), "transformers", "float32", 2, 8)
    files = list((tmp_path / "verify_cost").glob("*.json"))
    assert len(first[0]) == 6 and len(files) == 1
    assert b.sizes[:5] == [1, 1, 2, 3, 6]  # warm-up, then the first pass
    assert len(first[1]) == 3 * 6  # (n, r, us) for 2x1 2x2 2x4 4x1 4x2 8x1: at most 8 rows
    cached = json.loads(files[0].read_text())
    assert (cached["verify_us"], cached["batch_verify_us"]) == first
    measured = len(b.sizes)
    assert calibrate.load_or_measure(b, str(tiny), "transformers", "float32", 2, 8) == first
    assert len(b.sizes) == measured  # read back, not measured again
    calibrate.load_or_measure(b, str(tiny), "transformers", "float32", 4, 8)  # other threads: new entry
    calibrate.load_or_measure(b, str(tiny), "transformers", "float32", 2, 1)  # no batches: new entry
    assert len(list((tmp_path / "verify_cost").glob("*.json"))) == 3
    files[0].write_text("not json")
    assert len(calibrate.load_or_measure(b, str(tiny), "transformers", "float32", 2, 8)[0]) == 6  # re-measured


def test_long_chains_fill_the_curve_linearly():
    assert calibrate.fill_curve([1, 2, 4, 8], [10.0, 12.0, 16.0, 32.0]) == [10, 12, 14, 16, 20, 24, 28, 32]
    assert calibrate.fill_curve([1], [7.5]) == [7]


def test_a_curve_measured_on_a_busy_machine_is_not_cached(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("DOVETAIL_CACHE", str(tmp_path))
    monkeypatch.setattr(calibrate, "CACHE_MIN_BYTES", 0)

    def spread(backend, vocab, passes_out=None, **kw):  # quiet passes, but the second ran 3x slower
        passes_out.extend([calibrate.Pass([0.010, 0.020], 0.0), calibrate.Pass([0.030, 0.060], 0.0)] * 2)
        return [10_000, 20_000]

    def others(backend, vocab, passes_out=None, **kw):  # another process kept a core busy throughout
        passes_out.extend([calibrate.Pass([0.010, 0.020], 1.0)] * 3)
        return [10_000, 20_000]
    for fake in (spread, others):
        monkeypatch.setattr(calibrate, "measure_verify_us", fake)
        assert calibrate.load_or_measure(CountingBackend(tiny), str(tiny), "transformers", "float32", 2) == (
            [10_000, 20_000], [])
        assert not list(tmp_path.glob("verify_cost/*.json")), fake.__name__


def test_disturbed_passes_are_repeated_and_left_out(tiny, monkeypatch):
    monkeypatch.setattr(calibrate, "EXTRA_PASSES_S", 1e9)  # the pass count, not this box's speed, decides
    loads = iter([1.5, 0.0, 2.0, 0.0, 0.0])  # other processes' cores during each pass
    monkeypatch.setattr(calibrate.OtherLoad, "cores", lambda self: next(loads))
    b, passes = CountingBackend(tiny), []
    calibrate.measure_verify_us(b, b.identity.vocab_size, ks=2, repeats=3, passes_out=passes)
    assert [p.others for p in passes] == [1.5, 0.0, 2.0, 0.0, 0.0]  # until 3 quiet passes
    assert b.sizes == [1] + [1, 2] * 5

    monkeypatch.setattr(calibrate.OtherLoad, "cores", lambda self: 1.0)  # never quiet: MAX_PASSES
    passes.clear()
    calibrate.measure_verify_us(b, b.identity.vocab_size, ks=2, repeats=3, passes_out=passes)
    assert len(passes) == calibrate.MAX_PASSES


class FakeMachine:
    """psutil's CPU counters and the wall clock, advanced by hand: what OtherLoad reads."""

    def __init__(self):
        self.wall = 100.0
        self.machine = dict(user=50.0, nice=1.0, system=20.0, idle=500.0, iowait=3.0, irq=0.5, softirq=0.5,
                            steal=0.0)
        self.own = dict(user=2.0, system=1.0)

    def run(self, seconds, *, ours=0.0, others=0.0, steal=0.0, iowait=0.0):
        """``seconds`` of wall time with these many cores busy (ours and others' as user time)."""
        self.wall += seconds
        self.own["user"] += ours * seconds
        self.machine["user"] += (ours + others) * seconds
        self.machine["steal"] += steal * seconds
        self.machine["iowait"] += iowait * seconds

    # the psutil surface OtherLoad uses
    def cpu_times(self):
        return SimpleNamespace(**self.machine)

    def perf_counter(self):
        return self.wall


def fake_load(monkeypatch) -> tuple[calibrate.OtherLoad, FakeMachine]:
    m = FakeMachine()
    monkeypatch.setattr(calibrate, "time", SimpleNamespace(perf_counter=m.perf_counter))
    load = calibrate.OtherLoad()
    load._psutil, load._proc = m, SimpleNamespace(cpu_times=lambda: SimpleNamespace(**m.own))
    load.start()
    return load, m


def test_other_load_counts_other_processes_and_steal_not_ours(monkeypatch):
    load, m = fake_load(monkeypatch)
    m.run(2.0, ours=1.0)
    assert load.cores() == pytest.approx(0.0)  # this process's own work does not count
    load.start()
    m.run(2.0, ours=1.0, others=1.5, steal=0.25, iowait=1.0)  # waiting for I/O is no load
    assert load.cores() == pytest.approx(1.75)
    load.start()  # start() forgets what came before
    m.run(1.0, ours=2.0)
    assert load.cores() == pytest.approx(0.0)
    load.start()
    m.run(calibrate.MIN_JUDGED_S / 2, others=2.0)  # too short to judge at /proc/stat's 10 ms ticks
    assert load.cores() == 0.0


@pytest.mark.timeout(60)
def test_other_load_reads_this_process_and_the_machine():
    """The real counters, checked in ways that hold however busy the machine is: what is
    subtracted as ours is this process's CPU time, and a child's CPU time shows up as
    other processes' load (at least that much: others may run too)."""
    load = calibrate.OtherLoad()
    own0, cpu0 = load._own(), time.process_time()
    end = time.perf_counter() + 0.8
    while time.perf_counter() < end:  # our own work
        pass
    own, cpu = load._own() - own0, time.process_time() - cpu0
    assert cpu > 0.05 and abs(own - cpu) < 0.03 + 0.05 * cpu, (own, cpu)

    t0 = time.perf_counter()
    load.start()
    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 1.2\nwhile time.time() < end: pass"])
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    others_s = load.cores() * (time.perf_counter() - t0)
    child_s = usage.ru_utime + usage.ru_stime
    assert child.returncode == 0 and child_s > 0.1, child_s
    assert others_s > 0.8 * child_s - 0.05, (others_s, child_s)


def test_the_row_bound_is_the_fewest_rows_near_the_best_cost_per_row():
    # the 1.5B Q4_K on 2 cores: 35 ms a row alone, 24 at 4 rows, 27 at 8 (a slower kernel), 16 at 16, 13.5 at 32
    verify = [35_000, 60_000]
    batch = [2, 1, 56_000, 4, 1, 95_000, 8, 1, 218_000, 4, 4, 253_000, 8, 4, 431_000]
    assert calibrate.batch_row_bound(verify, batch, cap=64) == 32  # the dip at 4 rows does not stop it
    assert calibrate.batch_row_bound(verify, batch, cap=8) == 8    # --batch-rows is the cap
    flat_end = [2, 1, 40_000, 4, 1, 60_000, 8, 1, 100_000, 4, 4, 185_000, 8, 4, 360_000]  # 11.6 a row at 16
    assert calibrate.batch_row_bound(verify, flat_end, cap=64) == 16  # 32 rows save under 10% a row
    assert calibrate.batch_row_bound(verify, [], cap=64) == 64  # not measured: the cap


def test_plain_and_extra_llama_buffers_keep_separate_curves():
    ident = SimpleNamespace(dtype="gguf:qwen2 1.5B Q8_0")
    extra, plain = SimpleNamespace(identity=ident, extra_buffers=True), SimpleNamespace(identity=ident, extra_buffers=False)
    assert calibrate.curve_kind(extra) == "gguf:qwen2 1.5B Q8_0"
    assert calibrate.curve_kind(plain) == "gguf:qwen2 1.5B Q8_0, plain buffers"
    assert calibrate.curve_kind(SimpleNamespace(identity=SimpleNamespace(dtype="float32"))) == "float32"  # transformers
