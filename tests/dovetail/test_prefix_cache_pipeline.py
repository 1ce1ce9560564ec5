"""The target's prefix cache through the coordinator and both workers, on tiny float64 models:
a chat's next turn starts from the previous turn's KV, reports the reused tokens in Stats, and
gives exactly the text a cold start gives, greedy and seeded, with and without a draft."""
import pytest

pytestmark = pytest.mark.timeout(600)

SYSTEM = [5, 9, 3, 7, 11, 2, 4, 6, 8, 10, 12, 14, 40, 41, 17, 23]
N = 16


@pytest.fixture(scope="module")
def coords(launch_tracked, tiny_target, tiny_draft_near):
    tree = dict(auto_tree=False, depth=3, top_k=2, max_nodes=6)
    started = {}
    try:
        started["cold"] = launch_tracked(tiny_target, None, prefix_cache_tokens=0)
        started["warm"] = launch_tracked(tiny_target, None)
        started["warm_drafted"] = launch_tracked(tiny_target, tiny_draft_near, **tree)
        yield started
    finally:
        for c in started.values():
            c.close()


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.8, seed=11)], ids=["greedy", "seeded"])
def test_each_turn_reuses_the_last_and_gives_a_cold_starts_text(coords, sampling):
    for name in ("warm", "warm_drafted"):
        coord, cold = coords[name], coords["cold"]
        history = SYSTEM + [20 + len(name)]
        for turn in range(3):
            got = coord.generate(history, max_new_tokens=N, **sampling)
            want = cold.generate(history, max_new_tokens=N, **sampling)
            assert got.token_ids == want.token_ids, (name, turn)
            assert want.stats.cached_tokens == 0
            if turn:
                # the last turn's cache: its prompt and output, all but the pending last token
                assert got.stats.cached_tokens == len(history) - 4 - 1, (name, turn)
            history = history + got.token_ids + [30 + turn, 31, 32, 33]
        if name == "warm_drafted":
            assert got.stats.accepted_drafts > 0  # the draft is in step with the cached target


def test_a_shared_system_prompt_is_prefilled_once_per_scope(coords):
    coord = coords["warm"]
    coord.generate(SYSTEM + [50], max_new_tokens=2, scope="alice")
    again = coord.generate(SYSTEM + [51, 52], max_new_tokens=2, scope="alice")
    assert again.stats.cached_tokens == len(SYSTEM)
    other = coord.generate(SYSTEM + [51, 52], max_new_tokens=2, scope="bob")
    assert other.stats.cached_tokens == 0
