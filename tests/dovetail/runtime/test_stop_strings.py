"""Stop strings through the whole pipeline: a tiny target with a character-level tokenizer,
drafting for itself so that rounds commit several tokens (a stop string spans rounds)."""
import pytest

from tests.helpers import make_tiny_model, make_tiny_tokenizer

pytestmark = pytest.mark.timeout(300)

PROMPT = "def f(x):"
MAX_NEW = 60


@pytest.fixture(scope="module")
def coord(launch_tracked, tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("stop") / "tiny-text", seed=3)
    make_tiny_tokenizer(path)
    c = launch_tracked(path, path, overlap=False, auto_tree=False, stop_token_ids=[])
    try:
        yield c
    finally:
        c.close()


def test_the_text_ends_before_the_stop_string_and_no_token_follows_it(coord):
    full = coord.generate(PROMPT, max_new_tokens=MAX_NEW)
    assert full.stats.mean_accepted > 1.5 and len(full.text) == MAX_NEW  # one character per token
    stop = full.text[20:23]
    cut = full.text.find(stop)
    out = coord.generate(PROMPT, max_new_tokens=MAX_NEW, stop=["never appears ~~", stop])
    assert out.text == full.text[:cut]
    assert out.token_ids == full.token_ids[:cut + len(stop)]  # up to the token that completed it
    assert out.stats.finish_reason == "stop" and out.stats.new_tokens == len(out.token_ids)
    chunks = list(coord.stream(PROMPT, max_new_tokens=MAX_NEW, stop=stop))
    assert "".join(c.text for c in chunks) == out.text
    assert [t for c in chunks for t in c.token_ids] == out.token_ids
    handle = coord.submit(PROMPT, max_new_tokens=MAX_NEW, stop=stop)
    assert handle.result(timeout=60).text == out.text and handle.terminal == "done"
    assert coord.in_flight == 0 and coord.target.open_mailboxes == [] and coord.draft.open_mailboxes == []


def test_stop_strings_need_a_tokenizer(launch_tracked, tiny_target):
    c = launch_tracked(tiny_target)
    try:
        with pytest.raises(TypeError, match="stop strings need a tokenizer"):
            c.generate([1, 2, 3], max_new_tokens=4, stop=["x"])
    finally:
        c.close()
