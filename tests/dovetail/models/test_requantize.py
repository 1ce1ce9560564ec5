"""dovetail-launch quantize: a Q8_0 / BF16 GGUF made from a quantized one with llama.cpp's
quantize API, labelled with its source, and served as a target that says so."""
from __future__ import annotations

import pytest

from dovetail.cli import main
from dovetail.models.requantize import file_type, requantize, requantized_from

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def small():
    pytest.importorskip("llama_cpp")
    from dovetail.models.fetch import resolve_model
    return resolve_model("smollm2-135m-instruct")  # Q4_1, 98 MB


def test_the_cli_writes_a_labelled_q8_0_once(small, tmp_path, capsys):
    out = tmp_path / "smol-q8_0.gguf"
    assert main(["quantize", "--target", small, "--to", "q8_0", "--out", out]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert file_type(out) == "Q8_0" and file_type(small) == "Q4_1"
    assert requantized_from(out) == f"Q4_1 ({small.name})" and requantized_from(small) is None
    made = out.stat().st_mtime_ns
    assert requantize(small, "q8_0", out) == out and out.stat().st_mtime_ns == made  # done already
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary files left


def test_a_requantized_target_decodes_and_says_where_it_came_from(small, tmp_path):
    import dovetail
    out = requantize(small, "bf16", tmp_path / "smol-bf16.gguf")
    assert file_type(out) == "BF16"
    with dovetail.launch(out, None, backend="llama.cpp", target_cpus=[0]) as coord:
        assert "re-quantized from Q4_1" in coord.target_info.dtype
        assert len(coord.generate("Name a color.", max_new_tokens=8).token_ids) > 0


def test_bad_requests_are_refused(small, tmp_path, capsys):
    assert main(["quantize", "--target", small, "--to", "q8_0", "--out", tmp_path / "x.gguf", "--threads", "1"]) == 0
    with pytest.raises(SystemExit):
        main(["quantize", "--target", small, "--to", "q3_k"])  # not a kind we write
    capsys.readouterr()
    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"x")
    assert main(["quantize", "--target", not_gguf, "--to", "q8_0"]) == 1
    assert "needs a .gguf file" in capsys.readouterr().err


def test_the_feature_draft_shipped_for_a_model_serves_its_other_quantizations(tmp_path, monkeypatch):
    """The 0.5B's Q4_K_M re-quantized to Q8_0 under another name: the shipped 0.5B draft is
    picked by its identity (embedding fingerprint included), not by the file name; the 1.5B
    is not another quantization of the 0.5B."""
    pytest.importorskip("llama_cpp")
    from dovetail.draft.checkpoint import check_target, gguf_identity, read_config, shipped_draft
    from dovetail.models.fetch import resolve_model
    small, big_path = resolve_model("qwen2.5-coder-0.5b-instruct"), resolve_model("qwen2.5-coder-1.5b-instruct")
    monkeypatch.setenv("DOVETAIL_CACHE", str(tmp_path / "cache"))  # identities are cached: read them here
    q8 = requantize(small, "q8_0", tmp_path / "renamed-q8.gguf")
    folder = shipped_draft(q8, "cpu")
    assert folder is not None and folder.name == "qwen2.5-coder-0.5b-dgf1"
    check_target(read_config(folder).target, gguf_identity(q8))  # what loading it checks
    assert list((tmp_path / "cache" / "identity").glob("*.json"))  # the identity was cached
    big = gguf_identity(big_path)
    assert read_config(folder).target.mismatches(big)
