"""dovetail-launch quantize reuses a finished output only for the very source it was made from:
two different files that share a name (model-Q4_K_M.gguf in two folders) get two outputs.

llama.cpp's quantize call is replaced by a copy, so this runs in milliseconds on tiny GGUF
files written with gguf; the labelling, the keys and the reuse are the real ones."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from dovetail.models import requantize as rq

pytestmark = pytest.mark.timeout(60)

NAME = "model-Q4_K_M.gguf"


def tiny_gguf(path, fill: float, rows: int = 4):
    """A GGUF of one rows x 4 tensor filled with ``fill``, typed Q4_K_M in its metadata."""
    import gguf
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    writer.add_tensor("w", np.full((rows, 4), fill, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def weights(path) -> float:
    import gguf
    return float(gguf.GGUFReader(str(path)).get_tensor(0).data.flat[0])


@pytest.fixture
def quantized(monkeypatch, tmp_path):
    """The sources each llama.cpp quantize call was given (it copies them instead)."""
    monkeypatch.setenv("DOVETAIL_CACHE", str(tmp_path / "cache"))
    calls = []

    def copy(src, dst, to, threads):
        calls.append(src)
        shutil.copyfile(src, dst)

    monkeypatch.setattr(rq, "_quantize", copy)
    return calls


def test_two_sources_with_one_name_get_two_outputs(tmp_path, quantized):
    a, b = tiny_gguf(tmp_path / "a" / NAME, 1.0), tiny_gguf(tmp_path / "b" / NAME, 2.0)
    out_a, out_b = rq.requantize(a, "q8_0"), rq.requantize(b, "q8_0")
    assert out_a != out_b and quantized == [a, b]
    assert (weights(out_a), weights(out_b)) == (1.0, 2.0)  # each serves its own model's weights
    assert out_a.parent == out_b.parent == tmp_path / "cache" / "models"
    assert rq.requantize(a, "q8_0") == out_a and rq.requantize(b, "q8_0") == out_b
    assert len(quantized) == 2  # both reused: made once each
    assert rq.requantized_from(out_a) == f"Q4_K_M ({NAME})"


def test_a_source_replaced_in_place_is_quantized_again(tmp_path, quantized):
    src = tiny_gguf(tmp_path / NAME, 1.0)
    first = rq.requantize(src, "q8_0")
    tiny_gguf(tmp_path / "new" / NAME, 3.0, rows=8).replace(src)  # another model under the same path
    second = rq.requantize(src, "q8_0")
    assert second != first and weights(second) == 3.0 and len(quantized) == 2


def test_an_explicit_out_made_from_another_source_is_made_again(tmp_path, quantized):
    a, b = tiny_gguf(tmp_path / "a" / NAME, 1.0), tiny_gguf(tmp_path / "b" / NAME, 2.0)
    out = tmp_path / "out.gguf"
    assert rq.requantize(a, "q8_0", out) == out and weights(out) == 1.0
    assert rq.requantize(b, "q8_0", out) == out and weights(out) == 2.0
    assert rq.requantize(b, "q8_0", out) == out and quantized == [a, b]  # the same source: reused
