"""The target's verify-cost curve: measured on the backend, cached per model and machine."""
import json

import pytest
import torch

from dovetail.testing import make_tiny_model
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


def test_measures_every_k_on_a_clean_sequence(tiny):
    b = CountingBackend(tiny)
    curve = calibrate.measure_verify_us(b, b.identity.vocab_size, ks=6, repeats=2)
    assert len(curve) == 6 and all(t > 0 for t in curve)
    assert b.sizes == [1] + list(range(1, 7)) * 2  # warm-up, then a pass over every k per repeat
    assert b.open == 0


def test_small_models_are_measured_not_cached(tiny):
    assert calibrate.cache_key(str(tiny), "transformers", "float32", 2) is None


def test_the_curve_is_cached_per_model_backend_and_threads(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("DOVETAIL_CACHE", str(tmp_path))
    monkeypatch.setattr(calibrate, "CACHE_MIN_BYTES", 0)
    monkeypatch.setattr(calibrate, "CALIBRATE_KS", 3)
    monkeypatch.setattr(calibrate, "NOISY_SPREAD", 1e9)  # this box may be busy: cache regardless
    b = CountingBackend(tiny)
    first = calibrate.load_or_measure(b, str(tiny), "transformers", "float32", 2)
    files = list((tmp_path / "verify_cost").glob("*.json"))
    assert len(first) == 3 and len(files) == 1
    assert json.loads(files[0].read_text())["verify_us"] == first
    measured = len(b.sizes)
    assert calibrate.load_or_measure(b, str(tiny), "transformers", "float32", 2) == first
    assert len(b.sizes) == measured  # read back, not measured again
    calibrate.load_or_measure(b, str(tiny), "transformers", "float32", 4)  # other threads: new entry
    assert len(list((tmp_path / "verify_cost").glob("*.json"))) == 2
    files[0].write_text("not json")
    assert len(calibrate.load_or_measure(b, str(tiny), "transformers", "float32", 2)) == 3  # re-measured


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
        assert calibrate.load_or_measure(CountingBackend(tiny), str(tiny), "transformers", "float32", 2) == [10_000, 20_000]
        assert not list(tmp_path.glob("verify_cost/*.json")), fake.__name__


def test_disturbed_passes_are_repeated_and_left_out(tiny, monkeypatch):
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


@pytest.mark.timeout(60)
def test_other_processes_load_is_measured_and_ours_is_not():
    import subprocess
    import sys
    import time
    load = calibrate.OtherLoad()
    end = time.perf_counter() + 0.8
    while time.perf_counter() < end:  # this process's own work does not count
        pass
    ours = load.cores()
    load.start()
    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 1.2\nwhile time.time() < end: pass"])
    child.wait(timeout=30)
    assert load.cores() > 0.6 > ours, (ours, load.cores())
