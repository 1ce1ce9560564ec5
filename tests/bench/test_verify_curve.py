"""bench.verify_curve and bench.plots on a tiny float32 model: fast, no real weights."""
from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from bench import plots, verify_curve
from tests.helpers import make_tiny_model

PNG = b"\x89PNG"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("vc") / "tiny", dtype=torch.float32)


def test_measure_curve_keeps_the_context(tiny):
    from dovetail.workers.backend import HFBackend
    backend = HFBackend(str(tiny), dtype=torch.float32)
    seqs = []
    new_sequence = backend.new_sequence
    backend.new_sequence = lambda: seqs.append(new_sequence()) or seqs[-1]
    ticks = []
    curve = verify_curve.measure_curve(backend, [1, 2, 4], ctx=12, repeats=3, progress=lambda: ticks.append(1))
    assert list(curve) == [1, 2, 4]
    assert all(len(t) == 3 and all(s > 0 for s in t) for t in curve.values())
    assert backend.length(seqs[0]) == 12 and len(ticks) == 3


def test_cli_writes_json_and_png(tiny, tmp_path, capsys):
    out = tmp_path / "res" / "curve.json"
    assert verify_curve.main(["--target", str(tiny), "--k", "1,2", "--ctx", "16", "--repeats", "2", "--dtype", "float32",
                              "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["ks"] == [1, 2] and report["ctx"] == 16 and report["dtype"] == "float32"
    assert {"cpu_model", "cpu_count", "torch", "cpus"} <= set(report["machine"]) and report["date"]
    ours = report["systems"]["ours"]
    assert [len(ours["seconds"][k]) for k in ("1", "2")] == [2, 2]
    assert set(ours["median_ms"]) == set(ours["min_ms"]) == {"1", "2"} and ours["ratio_to_base"]["1"] == 1
    assert "llama.cpp" not in report["systems"] and report["llama_cpp_skipped"]
    assert out.with_suffix(".png").read_bytes().startswith(PNG) and report["plot"]
    text = capsys.readouterr().out
    assert "llama.cpp skipped:" in text and "| 2 |" in text


def test_llama_missing_prints_the_skip_line(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert "not installed" in verify_curve.llama_skip_reason(gguf)
    verify_curve.main(["--target", str(tiny), "--k", "1", "--ctx", "4", "--repeats", "1",
                       "--out", str(tmp_path / "x.json")])
    lines = [line for line in capsys.readouterr().out.splitlines() if "llama.cpp skipped" in line]
    assert len(lines) == 1 and "llama-cpp-python is not installed" in lines[0]


class FakeLlama:
    """Just enough of llama_cpp.Llama: eval appends to a KV list, n_tokens follows it."""

    def __init__(self, model_path, n_ctx, **kw):
        self.ctx, self.kv, self.n_tokens, self.evals = "ctx", [], 0, []

    def n_vocab(self):
        return 100

    def eval(self, tokens):
        assert self.n_tokens == len(self.kv)
        self.kv += tokens
        self.n_tokens += len(tokens)
        self.evals.append(len(tokens))


@pytest.mark.parametrize("new_api", [True, False])
def test_measure_llama_rolls_back_with_either_api(monkeypatch, new_api):
    made = []
    lib = types.SimpleNamespace(Llama=lambda **kw: made.append(FakeLlama(**kw)) or made[-1])

    def seq_rm(handle, seq, p0, p1):
        del made[0].kv[p0:]
        return True
    if new_api:
        lib.llama_get_memory = lambda ctx: "mem"
        lib.llama_memory_seq_rm = seq_rm
        lib.llama_memory_seq_pos_max = lambda mem, seq: len(made[0].kv) - 1
    else:
        lib.llama_kv_cache_seq_rm = seq_rm
    monkeypatch.setitem(sys.modules, "llama_cpp", lib)
    curve = verify_curve.measure_llama("m.gguf", [1, 3], ctx=5, repeats=2, threads=1)
    assert {k: len(t) for k, t in curve.items()} == {1: 2, 3: 2}
    assert made[0].evals == [5, 1, 1, 1, 3, 3, 3] and made[0].n_tokens == len(made[0].kv) == 5


def test_measure_llama_without_removal_refuses(monkeypatch):
    lib = types.SimpleNamespace(Llama=FakeLlama)
    monkeypatch.setitem(sys.modules, "llama_cpp", lib)
    with pytest.raises(RuntimeError, match="llama_memory_seq_rm"):
        verify_curve.measure_llama("m.gguf", [1], ctx=2, repeats=1, threads=1)


def test_other_plots_write_pngs(tmp_path):
    paths = [plots.save_bar_plot(tmp_path / "bar.png", ["a", "b"], [1.0, 2.5], title="t", ylabel="y"),
             plots.save_histogram(tmp_path / "h.png", {"x": [1, 2, 2, 5], "y": [0, 3]}, title="t", xlabel="n"),
             plots.save_stacked_bars(tmp_path / "s.png", ["a", "b"], {"p": [1, 2], "q": [3, 0.5]},
                                     title="t", ylabel="s"),
             plots.save_line_plot(tmp_path / "l.png", {"a": ([1, 2, 4], [3, 2, 1])}, title="t", xlabel="x",
                                  ylabel="y", logx=True)]
    assert all(p.read_bytes().startswith(PNG) for p in paths)


def test_plots_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert plots.save_line_plot(tmp_path / "l.png", {"a": ([1], [1])}, title="t", xlabel="x", ylabel="y") is None
    assert plots.save_bar_plot(tmp_path / "b.png", ["a"], [1], title="t", ylabel="y") is None
    assert "matplotlib is not installed" in capsys.readouterr().out and not list(tmp_path.iterdir())


def test_quantize_variants_are_measured_back_to_back(tiny, tmp_path, capsys):
    out = tmp_path / "q.json"
    assert verify_curve.main(["--target", str(tiny), "--k", "1,4", "--ctx", "8", "--repeats", "1", "--dtype", "float32",
                              "--quantize", "none,int8", "--no-llama", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["quantize"] == ["none", "int8"] and list(report["systems"]) == ["ours", "ours+int8"]
    assert all(set(s["median_ms"]) == {"1", "4"} for s in report["systems"].values())
    head = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| k |"))
    assert "| ours median ms |" in head and "| ours+int8 median ms |" in head
    assert verify_curve.plot_label("ours+int8", "float32") == "ours (float32+int8)"


def test_unknown_quantize_variant_is_a_usage_error():
    assert verify_curve.parse_quantize(" int8,none,int8") == ["int8", "none"]
    with pytest.raises(SystemExit):
        verify_curve.main(["--quantize", "none,fp8"])


def test_extra_buffer_settings_are_a_comma_list_of_auto_on_off():
    assert verify_curve.parse_settings("on, off,on") == ["on", "off"]
    with pytest.raises(ValueError, match="auto, on, off"):
        verify_curve.parse_settings("on,maybe")
    with pytest.raises(SystemExit):
        verify_curve.main(["--llama-extra-buffers", "yes"])
    with pytest.raises(SystemExit):
        verify_curve.main(["--backend", "llama.cpp", "--quantize", "int8"])


@pytest.mark.real_model
@pytest.mark.timeout(600)
def test_llama_backend_extra_buffers_on_and_off_in_rounds(tmp_path, capsys):
    """docs/performance.md's extra-buffer measurement, small: our llama.cpp backend with extra buffers
    forced on and off, loaded together, measured in turn for 2 rounds."""
    import os
    if os.environ.get("DOVETAIL_REQUIRE_LLAMA") != "1":
        pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llama]')")
    out = tmp_path / "eb.json"
    assert verify_curve.main(["--target", "smollm2-135m-instruct", "--backend", "llama.cpp", "--k", "1,4",
                              "--ctx", "16", "--repeats", "2", "--rounds", "2", "--llama-extra-buffers", "on,off",
                              "--no-llama", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    on, off = (verify_curve.llama_system_name(s) for s in ("on", "off"))
    assert list(report["systems"]) == [on, off] and report["rounds"] == 2 and report["dtype"] == "gguf"
    assert all(len(report["systems"][n]["seconds"][k]) == 4 for n in (on, off) for k in ("1", "4"))  # 2 x 2
    assert report["llama_extra_buffers"][on]["extra_buffers"] is True
    assert report["llama_extra_buffers"][off] == {"setting": "off", "extra_buffers": False, "verdict": None}
    assert report["paired_ratio_to"]["base"] == on and set(report["paired_ratio_to"]["ratios"][off]) == {"1", "4"}
    text = capsys.readouterr().out
    assert f"{off}: llama.cpp extra buffers off (forced)" in text and f"{off} / {on}, median over 2 rounds" in text


def test_paired_ratios_take_the_median_of_each_rounds_ratio():
    curves = {"a": {1: [1.0, 1.0, 2.0, 2.0, 1.0, 1.0]}, "b": {1: [1.5, 1.5, 2.0, 2.0, 1.2, 1.2]}}
    assert verify_curve.paired_ratios(curves, repeats=2) == {"b": {"1": 1.2}}  # rounds: 1.5, 1.0, 1.2
