"""Where generation stops, read from a model's own files (HF folders and GGUF metadata)."""
import json

import pytest

from dovetail.models.loading import declared_stop_ids, stop_token_ids

pytestmark = pytest.mark.timeout(60)


class Vocab:
    eos_token_id = 9

    def get_vocab(self):
        return {"<|im_end|>": 4, "hello": 5}


def test_a_hf_folder_declares_its_stop_ids_in_its_configs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 128001}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))
    assert sorted(set(declared_stop_ids(tmp_path))) == [128001, 128008, 128009]  # Llama-3.1: eom and eot too
    assert stop_token_ids(tmp_path, Vocab()) == [4, 9, 128001, 128008, 128009]


def test_a_folder_without_configs_falls_back_to_the_tokenizer(tmp_path):
    assert declared_stop_ids(tmp_path) == []
    assert stop_token_ids(tmp_path, Vocab()) == [4, 9] and stop_token_ids(tmp_path, None) == []


def test_a_gguf_declares_eos_eot_and_eom(tmp_path):
    import gguf
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_eos_token_id(128009)
    writer.add_uint32("tokenizer.ggml.eom_token_id", 128008)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert sorted(declared_stop_ids(path)) == [128008, 128009]
