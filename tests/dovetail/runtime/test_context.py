"""A request that cannot fit in the target's context is refused before any work, naming both
numbers and the knob; one that fits runs to the last position."""
import pytest

from tests.helpers import make_tiny_model

pytestmark = pytest.mark.timeout(300)

CONTEXT = 48


@pytest.fixture(scope="module")
def coord(launch_tracked, tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("ctx") / "tiny-48", seed=4, max_positions=CONTEXT)
    c = launch_tracked(path)
    try:
        yield c
    finally:
        c.close()


def test_the_handshake_reports_the_context(coord):
    assert coord.target_info.max_context == CONTEXT


def test_prompt_plus_output_past_the_context_is_refused_before_any_work(coord):
    prompt = list(range(2, 12))  # 10 tokens
    with pytest.raises(ValueError, match=r"prompt \(10 tokens\) plus max_new_tokens \(39\) needs 49 positions, "
                                         r"more than the target's 48 \(the model's max_position_embeddings\)"):
        coord.generate(prompt, max_new_tokens=CONTEXT - 9)
    with pytest.raises(ValueError, match="max_new_tokens"):
        coord.submit(prompt, max_new_tokens=100)
    assert coord.in_flight == 0
    out = coord.generate(prompt, max_new_tokens=CONTEXT - 10)  # exactly full
    assert out.stats.new_tokens == CONTEXT - 10 or out.stats.finish_reason == "stop"
