"""Text on its own: prompts to ids, committed ids to streamed text (incremental, cut at stop
strings), default stop tokens."""
import pytest

from dovetail.runtime.results import Stats
from dovetail.models.loading import default_stop_ids
from dovetail.runtime.text import Text, check_stop

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
    # The first round ends mid-character: "H" is shown, the half "é" waits for its second byte.
    assert [c.text for c in chunks] == ["H", "é!"]
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


# ---- stop strings ------------------------------------------------------------------------------
def run_text(rounds, stop=(), tokenizer=None):
    """(chunks, stats) of Text.chunks over byte rounds, and whether the rounds were closed."""
    closed = []

    def gen():
        try:
            yield from ([list(r.encode()) if isinstance(r, str) else r for r in rounds])
        finally:
            closed.append(True)

    stats = Stats()
    chunks = list(Text(tokenizer or ByteTokenizer(), 256).chunks(gen(), stop, stats))
    return chunks, stats, bool(closed)


def test_a_stop_string_split_across_rounds_ends_the_text_and_the_request():
    chunks, stats, closed = run_text(["say abcE", "NDxyz", "more"], stop=["END"])
    assert "".join(c.text for c in chunks) == "say abc"
    assert [bytes(c.token_ids).decode() for c in chunks] == ["say abcE", "ND"]  # nothing past the stop string
    assert stats.finish_reason == "stop" and stats.new_tokens == 10 and closed


def test_text_that_only_looks_like_a_stop_string_is_held_then_shown():
    chunks, stats, _ = run_text(["abE", "Nd", "!"], stop=["END", "\n\n"])
    assert [c.text for c in chunks] == ["ab", "ENd", "!"]
    assert stats.finish_reason == ""  # the rounds' own finish reason stands


def test_the_held_back_tail_is_flushed_at_the_end():
    chunks, _, closed = run_text(["abE"], stop=["END"])
    assert [c.text for c in chunks] == ["ab", "E"] and chunks[-1].token_ids == [] and closed
    chunks, _, _ = run_text([[72, 0xC3]])  # ends mid-character: the replacement char is shown at last
    assert "".join(c.text for c in chunks) == "H\ufffd"


def test_stop_must_be_strings():
    assert check_stop(None) == () and check_stop("x") == ("x",) and check_stop(["a", "b"]) == ("a", "b")
    for bad in ([""], [3], ["a", None]):
        with pytest.raises(TypeError, match="stop"):
            check_stop(bad)


# ---- incremental detokenization ----------------------------------------------------------------
CORPUS = ["The quick brown fox jumps over the lazy dog.", "  Indented code: def f(x):\n    return x * 2",
          "Café, naïve, 東京 and emoji 🙂 in one line.", "Spaces   between   words and\ttabs."] * 4


def trained_tokenizer(kind: str):
    """A small BPE tokenizer trained here: "metaspace" (SentencePiece style: drops the leading space
    of a decode) or "bytelevel" (GPT-2 style: characters split across tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if kind == "metaspace":
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        alphabet = sorted(set("".join(CORPUS)))
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"],
                                                        initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.mark.parametrize("kind", ["metaspace", "bytelevel"])
def test_streamed_text_is_the_full_decode_in_linear_work(kind):
    import random
    tok = trained_tokenizer(kind)
    ids = tok.encode("\n".join(CORPUS), add_special_tokens=False)
    decoded = []

    class Counting:  # counts the ids each decode call reads
        def __getattr__(self, name):
            return getattr(tok, name)

        def decode(self, window, skip_special_tokens=True):
            decoded.append(len(window))
            return tok.decode(window, skip_special_tokens=skip_special_tokens)

    rng = random.Random(0)
    rounds, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 4)
        rounds.append(ids[i:i + n])
        i += n
    chunks, _, _ = run_text(rounds, tokenizer=Counting())
    assert "".join(c.text for c in chunks) == tok.decode(ids)
    # Each token is decoded within a window of a few pieces, not with everything before it.
    assert sum(decoded) < 12 * len(ids), (sum(decoded), len(ids))


def test_a_text_prompt_gets_bos_where_the_tokenizer_adds_it():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])  # Llama's way
    llama_like = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    assert Text(llama_like, 4).encode_prompt("ab") == [0, 2, 3]
    assert Text(ByteTokenizer(), 256).encode_prompt("ab") == [97, 98]  # no BOS where none is added
