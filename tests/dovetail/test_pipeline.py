"""End to end through real worker processes: speculative output equals target-only output.

Tiny float64 models (vocab 64) keep every comparison exact. Coordinators are shared per
module (each launch costs two python processes importing torch); the draft *shape* (depth,
top_k, max_nodes) and ``overlap`` are per-request settings the coordinator re-reads on
every request, so one launched coordinator per draft model serves all shapes. Each shape
test checks, from the stats, that the shape really took effect.

Draft models: ``near`` (target + noise 0.005: mixed accept/reject), ``strong`` (the target
itself: every draft token must be accepted) and ``weak`` (an unrelated random model:
almost everything is rejected). The failure tests (SIGSTOP / SIGKILL of the draft) run
last, on the ``weak`` coordinator, and leave its draft dead.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import time
from contextlib import contextmanager

import pytest

import dovetail
from dovetail import Stats

pytestmark = pytest.mark.timeout(120)

MAX_NEW = 40
PROMPTS = {
    "one-token": [7],
    "short": [1, 5, 9, 13],
    "long": [(7 * i + 3) % 64 for i in range(29)],
}
STOP_PROMPT = [50, 2, 33]  # its reference output supplies a stop token (see stop_token)
STRONG_DEPTH = 4
WEAK_DRAFT_TIMEOUT_S = 2.0
SAMPLED_NEW = 16  # sampled runs reject more drafts: keep them short

SHAPES = {
    "chain-d1": dict(depth=1, top_k=1),
    "chain-d3": dict(depth=3, top_k=1),
    "chain-d6": dict(depth=6, top_k=1),
    "tree-k3-d3-n8": dict(top_k=3, depth=3, max_nodes=8),
    "tree-k2-d5-n12": dict(top_k=2, depth=5, max_nodes=12),
}


# ---- helpers -------------------------------------------------------------------------------
def check_stats(s: Stats, prompt: list[int], n_new: int, *, finish: str = "length") -> None:
    """Invariants every finished request's stats must satisfy."""
    assert s.prompt_tokens == len(prompt)
    assert s.new_tokens == n_new
    assert s.finish_reason == finish
    # The first token comes from the prefill's last forward (no verification) wherever the
    # target put the prompt's last token in it: every request here, none drafts on features.
    assert s.prefill_first == 1
    assert s.rounds == len(s.accept_lengths) and s.rounds + s.prefill_first >= 1
    assert all(n >= 1 for n in s.accept_lengths), s.accept_lengths
    assert sum(s.accept_lengths) == s.accepted
    assert s.accepted == s.accepted_drafts + s.rounds  # each round: accepted drafts + 1
    assert 0 <= s.accepted_drafts <= s.drafted
    assert s.mean_accepted == (pytest.approx(s.accepted / s.rounds) if s.rounds else 0.0)
    if finish == "length":
        # Drafts are trimmed to the budget: no round verifies tokens past max_new_tokens.
        assert s.prefill_first + s.accepted == s.new_tokens, s.accept_lengths
    elif s.rounds:
        # The round holding the stop token may have verified more; earlier rounds are whole.
        assert s.prefill_first + sum(s.accept_lengths[:-1]) < s.new_tokens <= s.prefill_first + s.accepted, \
            s.accept_lengths
    else:
        assert s.new_tokens == 1  # the prefill's token was the stop
    assert s.seconds > 0 and s.tokens_per_s > 0
    assert s.prefill_s >= 0 and (s.verify_s > 0 or not s.rounds) and s.draft_s >= 0 and s.wire_s >= 0
    # Worker compute happens inside the coordinator's wall time of the request.
    assert s.prefill_s + s.verify_s <= s.seconds * 1.05 + 1e-3


def nodes_per_round(shape: dict) -> int:
    """Tree size the draft sends when the budget does not trim it: top_k nodes per level."""
    return min(shape.get("max_nodes", 16), shape["top_k"] * shape["depth"])


def check_shape(s: Stats, shape: dict) -> None:
    """The stats show that drafts of this shape were really sent and verified."""
    full, depth = nodes_per_round(shape), shape["depth"]
    assert not s.draft_fallback
    assert max(s.accept_lengths) <= depth + 1
    assert s.drafted <= s.rounds * full
    # Only the last rounds (budget - 1 < depth) may be trimmed: at most `depth` of them.
    assert s.drafted >= (s.rounds - depth) * full, (s.drafted, s.rounds, full)


@contextmanager
def reconfigured(coord, *, overlap: bool, **fields):
    """Run requests with other draft settings (validated by CoordinatorConfig), then restore."""
    saved = coord.config, coord.overlap
    coord.config = dataclasses.replace(coord.config, **fields)
    coord.overlap = overlap
    try:
        yield coord
    finally:
        coord.config, coord.overlap = saved


# ---- coordinators --------------------------------------------------------------------------
# Launched two at a time (worker startup is CPU-bound import work): the baseline with the
# ``near`` coordinator, then ``strong`` (which needs a stop token taken from the baseline's
# output) with ``weak``. Closing them checks that no worker outlives close().
@pytest.fixture(scope="module")
def first_pair(launch_all, close_all, tiny_target, tiny_draft_near):
    coords = launch_all({
        "base": (tiny_target, None, {}),  # target-only, through the same target worker
        "near": (tiny_target, tiny_draft_near, dict(depth=3, top_k=1, overlap=False)),
    })
    try:
        yield coords
    finally:
        assert not close_all(coords.values()), "workers outlived close()"


@pytest.fixture(scope="module")
def second_pair(launch_all, close_all, tiny_target, tiny_draft_weak, stop_token):
    coords = launch_all({
        # The target drafting for itself, overlapped, with a stop token none of PROMPTS emits.
        "strong": (tiny_target, tiny_target, dict(depth=STRONG_DEPTH, top_k=1, overlap=True,
                                                  stop_token_ids=[stop_token[0]])),
        "weak": (tiny_target, tiny_draft_weak, dict(top_k=2, depth=5, max_nodes=12, overlap=True,
                                                    draft_timeout_s=WEAK_DRAFT_TIMEOUT_S)),
    })
    try:
        yield coords
    finally:
        assert not close_all(coords.values()), "workers outlived close()"


@pytest.fixture(scope="module")
def base(first_pair):
    return first_pair["base"]


@pytest.fixture(scope="module")
def near(first_pair):
    return first_pair["near"]


@pytest.fixture(scope="module")
def strong(second_pair):
    return second_pair["strong"]


@pytest.fixture(scope="module")
def weak(second_pair):
    return second_pair["weak"]


@pytest.fixture(scope="module")
def reference(base):
    refs = {}
    for name, prompt in {**PROMPTS, "stop": STOP_PROMPT}.items():
        r = base.generate(prompt, max_new_tokens=MAX_NEW)
        check_stats(r.stats, prompt, MAX_NEW)
        assert r.stats.accept_lengths == [1] * (MAX_NEW - 1) and r.stats.drafted == 0
        assert not r.stats.draft_fallback and r.text is None
        # A reference worth comparing against: not one token repeated.
        assert len(set(r.token_ids)) > 3, r.token_ids
        refs[name] = r.token_ids
    return refs


@pytest.fixture(scope="module")
def stop_token(reference) -> tuple[int, int]:
    """(token, index): a token of the stop prompt's reference that no other reference holds,
    at an index that falls inside a strong-draft round (so the round is cut short)."""
    others = set().union(*(reference[name] for name in PROMPTS))
    ref = reference["stop"]
    for i, tok in enumerate(ref):
        if i >= 2 and tok not in others and tok not in ref[:i] and (i + 1) % (STRONG_DEPTH + 1):
            return tok, i
    pytest.fail(f"no usable stop token in {ref} (others hold {sorted(others)})")


# ---- greedy equality -----------------------------------------------------------------------
@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_greedy_matches_target_only(near, reference, shape, overlap):
    cfg = SHAPES[shape]
    with reconfigured(near, overlap=overlap, **cfg):
        for name, prompt in PROMPTS.items():
            r = near.generate(prompt, max_new_tokens=MAX_NEW)
            assert r.token_ids == reference[name], name
            check_stats(r.stats, prompt, MAX_NEW)
            check_shape(r.stats, cfg)
            if not overlap:
                assert r.stats.speculative_hits == 0


def test_launch_options_reach_the_coordinator(near, strong, weak):
    assert (near.config.depth, near.config.top_k, near.overlap) == (3, 1, False)
    assert (weak.config.top_k, weak.config.depth, weak.config.max_nodes, weak.overlap) == (2, 5, 12, True)
    assert strong.overlap is True and strong.config.draft_timeout_s == 30.0


def test_weak_draft_is_mostly_rejected_but_output_is_exact(weak, reference):
    drafted = accepted = 0
    for name, prompt in PROMPTS.items():
        r = weak.generate(prompt, max_new_tokens=MAX_NEW)
        assert r.token_ids == reference[name], name
        check_stats(r.stats, prompt, MAX_NEW)
        check_shape(r.stats, dict(top_k=2, depth=5, max_nodes=12))
        drafted += r.stats.drafted
        accepted += r.stats.accepted_drafts
    assert drafted > 0
    assert accepted / drafted < 0.25, (accepted, drafted)  # lots of rejection really happened


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "serial"])
def test_strong_draft_is_fully_accepted(strong, reference, overlap):
    with reconfigured(strong, overlap=overlap):
        for name, prompt in PROMPTS.items():
            r = strong.generate(prompt, max_new_tokens=MAX_NEW)
            s = r.stats
            assert r.token_ids == reference[name], name
            check_stats(s, prompt, MAX_NEW)
            check_shape(s, dict(top_k=1, depth=STRONG_DEPTH))
            assert s.mean_accepted > 2  # multi-token rounds really happen
            # A draft identical to the target agrees on every token (float64: no ties).
            assert s.accepted_drafts == s.drafted, s.accept_lengths
            if overlap:  # the bet "whole main path accepted, root = draft's favourite" wins
                assert s.speculative_hits >= s.rounds - 1, (s.speculative_hits, s.rounds)
            else:
                assert s.speculative_hits == 0


@pytest.mark.parametrize("max_new", [1, 2, 5])
def test_tiny_budgets_are_respected(near, reference, max_new):
    with reconfigured(near, overlap=True, depth=6):
        for name, prompt in PROMPTS.items():
            r = near.generate(prompt, max_new_tokens=max_new)
            assert r.token_ids == reference[name][:max_new], name
            check_stats(r.stats, prompt, max_new)
            if max_new == 1:  # the prefill's token alone
                assert r.stats.drafted == 0 and r.stats.rounds == 0


def test_bad_requests_are_refused_before_touching_workers(near, reference):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        near.generate([1, 64], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        near.generate([1], max_new_tokens=0)
    with pytest.raises(ValueError, match="seed"):
        near.generate([1], max_new_tokens=4, seed=-1)
    with pytest.raises(TypeError, match="tokenizer"):
        near.generate("text needs a tokenizer", max_new_tokens=4)
    with pytest.raises(TypeError):
        near.generate([], max_new_tokens=4)
    # ...and the coordinator still works.
    assert near.generate(PROMPTS["short"], max_new_tokens=MAX_NEW).token_ids == reference["short"]


# ---- stop tokens ---------------------------------------------------------------------------
def test_stop_token_ends_generation(strong, reference, stop_token):
    tok, index = stop_token
    assert strong.stop_token_ids == {tok}
    expected = reference["stop"][:index + 1]
    r = strong.generate(STOP_PROMPT, max_new_tokens=MAX_NEW)
    assert r.token_ids == expected
    assert r.token_ids[-1] == tok and tok not in r.token_ids[:-1]
    check_stats(r.stats, STOP_PROMPT, len(expected), finish="stop")
    # The stop token sat inside a fully accepted round: the tokens after it were dropped.
    assert r.stats.accepted > r.stats.new_tokens, r.stats.accept_lengths

    chunks = list(strong.stream(STOP_PROMPT, max_new_tokens=MAX_NEW))
    assert [t for c in chunks for t in c.token_ids] == expected
    assert chunks[-1].token_ids[-1] == tok


def test_stop_token_does_not_fire_past_the_budget(strong, reference, stop_token):
    tok, index = stop_token
    r = strong.generate(STOP_PROMPT, max_new_tokens=index)  # ends one token before the stop
    assert r.token_ids == reference["stop"][:index]
    check_stats(r.stats, STOP_PROMPT, index, finish="length")


# ---- streaming -----------------------------------------------------------------------------
@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_stream_concatenates_to_generate(near, reference, overlap):
    with reconfigured(near, overlap=overlap, **SHAPES["tree-k3-d3-n8"]):
        for name, prompt in PROMPTS.items():
            stats = Stats()
            chunks = list(near.stream(prompt, max_new_tokens=MAX_NEW, stats=stats))
            ids = [t for c in chunks for t in c.token_ids]
            assert ids == near.generate(prompt, max_new_tokens=MAX_NEW).token_ids == reference[name]
            assert all(c.token_ids for c in chunks) and all(c.text == "" for c in chunks)
            assert [len(c.token_ids) for c in chunks] == [1] + stats.accept_lengths  # the prefill's, one a round
            check_stats(stats, prompt, MAX_NEW)


def test_abandoned_stream_releases_the_coordinator(near, reference):
    with reconfigured(near, overlap=True, **SHAPES["chain-d3"]):
        for _ in range(3):
            stream = near.stream(PROMPTS["long"], max_new_tokens=MAX_NEW)
            first = next(stream)
            assert first.token_ids == reference["long"][:len(first.token_ids)]
            stream.close()  # the request is closed on both workers and the lock released
        r = near.generate(PROMPTS["long"], max_new_tokens=MAX_NEW)
        assert r.token_ids == reference["long"] and not r.stats.draft_fallback
        for _ in near.stream(PROMPTS["short"], max_new_tokens=MAX_NEW):
            break  # a for loop left early: the generator is dropped at once
        assert near.generate(PROMPTS["short"], max_new_tokens=MAX_NEW).token_ids == reference["short"]


def test_concurrent_callers_are_served_one_request_at_a_time(near, reference):
    """Threads sharing a coordinator: requests are serialized, each gets its own exact output."""
    from concurrent.futures import ThreadPoolExecutor
    with reconfigured(near, overlap=True, **SHAPES["tree-k2-d5-n12"]):
        with ThreadPoolExecutor(3) as ex:
            futures = {name: ex.submit(near.generate, prompt, MAX_NEW) for name, prompt in PROMPTS.items()}
            results = {name: f.result(timeout=60) for name, f in futures.items()}
    for name, r in results.items():
        assert r.token_ids == reference[name], name
        check_stats(r.stats, PROMPTS[name], MAX_NEW)


# ---- sampling ------------------------------------------------------------------------------
@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_sampling_is_deterministic_per_seed(near, overlap):
    n = SAMPLED_NEW
    with reconfigured(near, overlap=overlap, **SHAPES["tree-k2-d5-n12"]):
        for prompt in (PROMPTS["one-token"], PROMPTS["long"]):
            a = near.generate(prompt, max_new_tokens=n, temperature=1.0, seed=1234)
            b = near.generate(prompt, max_new_tokens=n, temperature=1.0, seed=1234)
            assert a.token_ids == b.token_ids
            assert len(a.token_ids) == n and all(0 <= t < 64 for t in a.token_ids)
            check_stats(a.stats, prompt, n)
        c = near.generate(PROMPTS["short"], max_new_tokens=n, temperature=0.7, top_p=0.9, seed=5)
        d = near.generate(PROMPTS["short"], max_new_tokens=n, temperature=0.7, top_p=0.9, seed=5)
        assert c.token_ids == d.token_ids


def test_different_seeds_give_different_samples(near):
    outs = {tuple(near.generate(PROMPTS["short"], max_new_tokens=SAMPLED_NEW, temperature=1.0, seed=s).token_ids)
            for s in range(1, 5)}
    assert len(outs) >= 3, outs


def test_target_only_sampling_is_deterministic_per_seed(base):
    # The baseline path is deterministic per seed too.
    a = base.generate(PROMPTS["long"], max_new_tokens=20, temperature=1.0, seed=9)
    b = base.generate(PROMPTS["long"], max_new_tokens=20, temperature=1.0, seed=9)
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize("shape", ["chain-d3", "tree-k3-d3-n8"])
def test_point_mass_sampling_equals_greedy(near, reference, shape):
    """top_p -> 0 keeps only the argmax: the sampled acceptance path must then be greedy."""
    with reconfigured(near, overlap=True, **SHAPES[shape]):
        for name, prompt in PROMPTS.items():
            r = near.generate(prompt, max_new_tokens=MAX_NEW, temperature=1.0, top_p=1e-9, seed=3)
            assert r.token_ids == reference[name], name
            assert r.stats.mean_accepted > 1.5  # drafts were accepted through the sampled path


# ---- a failing draft: target-only from then on, same output --------------------------------
# These run last, in this order: two stop and resume the draft, the last one kills it.
@pytest.mark.timeout(60)
def test_draft_stopped_midway_falls_back_to_target(weak, reference, pids):
    draft = weak.worker_pids["draft"]
    assert pids.alive(draft)
    prompt = PROMPTS["long"]
    stats = Stats()
    ids: list[int] = []
    t0 = time.monotonic()
    try:
        for chunk in weak.stream(prompt, max_new_tokens=MAX_NEW, stats=stats):
            if not ids:
                os.kill(draft, signal.SIGSTOP)  # hangs the draft mid-request
            ids.extend(chunk.token_ids)
        elapsed = time.monotonic() - t0
    finally:
        os.kill(draft, signal.SIGCONT)
    assert ids == reference["long"]
    assert stats.draft_fallback
    check_stats(stats, prompt, MAX_NEW)
    assert elapsed < WEAK_DRAFT_TIMEOUT_S + 15, elapsed  # one draft timeout, not a hang

    # Resumed, the draft serves the next request; replies to the abandoned one are dropped.
    r = weak.generate(PROMPTS["short"], max_new_tokens=MAX_NEW)
    assert r.token_ids == reference["short"]
    assert not r.stats.draft_fallback and r.stats.drafted > 0


@pytest.mark.timeout(60)
def test_hung_draft_is_not_waited_for_by_every_request(weak, reference):
    draft = weak.worker_pids["draft"]
    os.kill(draft, signal.SIGSTOP)
    try:
        first = weak.generate(PROMPTS["short"], max_new_tokens=MAX_NEW)  # waits one timeout
        t0 = time.monotonic()
        second = weak.generate(PROMPTS["short"], max_new_tokens=MAX_NEW)
        elapsed = time.monotonic() - t0
    finally:
        os.kill(draft, signal.SIGCONT)
    assert first.token_ids == second.token_ids == reference["short"]
    assert first.stats.draft_fallback and second.stats.draft_fallback
    # Waiting for the hung draft would cost a whole draft timeout on top of the request's own
    # work; the request itself (40 target-only steps of a tiny model and one short probe) takes
    # a fraction of a second, a few times that on a busy 2-core box.
    assert elapsed < WEAK_DRAFT_TIMEOUT_S, f"the second request waited {elapsed:.2f} s for a hung draft"


@pytest.mark.timeout(60)
def test_draft_killed_between_requests_falls_back_to_target(weak, reference, pids):
    draft = weak.worker_pids["draft"]
    r = weak.generate(PROMPTS["short"], max_new_tokens=MAX_NEW)
    assert r.token_ids == reference["short"] and not r.stats.draft_fallback

    os.kill(draft, signal.SIGKILL)
    assert not pids.wait_gone([draft])
    for name in ("short", "long", "one-token"):
        t0 = time.monotonic()
        r = weak.generate(PROMPTS[name], max_new_tokens=MAX_NEW)
        # A dead draft is noticed at once: waiting a draft timeout each round would take MAX_NEW x 2 s.
        assert time.monotonic() - t0 < 15.0
        assert r.token_ids == reference[name]
        assert r.stats.draft_fallback
        assert r.stats.drafted == 0 and r.stats.accept_lengths == [1] * (MAX_NEW - 1)
        check_stats(r.stats, PROMPTS[name], MAX_NEW)
    assert pids.alive(weak.worker_pids["target"])
    with pytest.raises(dovetail.WorkerDied):
        weak.draft.check_alive()
