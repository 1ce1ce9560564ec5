"""Text on its own: prompts to ids, committed ids to streamed text, default stop tokens."""
import pytest

from dovetail.runtime.text import Text, default_stop_ids

pytestmark = pytest.mark.timeout(30)


class ByteTokenizer:
    """Token i is byte i (UTF-8); a character split across tokens decodes to U+FFFD until complete."""
    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return list(text.encode())

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if i or not skip_special_tokens).decode(errors="replace")

    def get_vocab(self):
        return {"<|endoftext|>": 0, "<|im_end|>": 1, "a": 97}


def test_streamed_text_holds_back_a_partial_character():
    text = Text(ByteTokenizer(), 256)
    rounds = [[72, 0xC3], [0xA9, 33]]  # "H", half of "é", its second byte and "!"
    chunks = list(text.chunks(iter(rounds)))
    assert [c.token_ids for c in chunks] == rounds
    # The first round ends mid-character: nothing is shown until the next completes it.
    assert [c.text for c in chunks] == ["", "Hé!"]
    assert [c.text for c in text.chunks(iter([[72], [33]]))] == ["H", "!"]


def test_prompts_become_ids_or_clear_errors():
    text = Text(ByteTokenizer(), 256)
    assert text.encode_prompt("hi") == [104, 105]
    assert text.encode_prompt([5, 6]) == [5, 6]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        text.encode_prompt([5, 256])
    with pytest.raises(TypeError, match="token ids"):
        text.encode_prompt([])
    no_tokenizer = Text(None, 256)
    with pytest.raises(TypeError, match="needs a tokenizer"):
        no_tokenizer.encode_prompt("hi")
    assert no_tokenizer.encode_prompt([1, 2]) == [1, 2] and no_tokenizer.decode([1, 2]) is None


def test_default_stop_ids_are_eos_and_known_end_of_turn_tokens():
    assert default_stop_ids(ByteTokenizer()) == [0, 1]
    assert default_stop_ids(None) == []
