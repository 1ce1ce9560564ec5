"""The tree sizer: depth from the verify-cost curve, the draft's speed and observed acceptance."""
import pytest

from dovetail.runtime.autotree import PROBE_EVERY, TreeSizer
from dovetail.spec.tree import chain_parents

pytestmark = pytest.mark.timeout(30)

FLAT = [int(1000 * (250 + 3 * k)) for k in range(1, 17)]    # 16-core server: k is nearly free
STEEP = [int(1000 * (37 + 25 * (k - 1))) for k in range(1, 17)]  # 2 cores, llama.cpp Q4_K


def feed(sizer, rounds, depth, accept_rate, draft_ms_per_level, wire_ms=0.5):
    """Rounds of a chain draft whose levels are each accepted with accept_rate (deterministic)."""
    credit = 0.0
    for _ in range(rounds):
        accepted = 0
        for _level in range(depth):
            credit += accept_rate
            if credit < 1:
                break
            credit -= 1
            accepted += 1
        sizer.observe(chain_parents(depth), accepted, depth * draft_ms_per_level / 1000, wire_ms / 1000)


def test_a_fast_verifier_and_a_good_draft_go_deep():
    s = TreeSizer(FLAT, max_depth=6, top_k=1, max_nodes=16, overlap=True)
    feed(s, 50, 6, 0.9, 2.0)
    assert s.choose() == 6


def test_a_steep_verifier_and_a_weak_draft_stop_drafting():
    s = TreeSizer(STEEP, max_depth=4, top_k=1, max_nodes=16, overlap=False)
    feed(s, 50, 4, 0.4, 13.0)
    assert s.choose() == 0
    assert s.tokens_per_ms(0) == pytest.approx(1 / (37 + s.wire_ms))


def test_the_choice_follows_the_cost_of_verification():
    """Same acceptance and draft speed: a steeper curve must never choose a deeper draft."""
    depths = []
    for slope in (1, 5, 15, 40):
        s = TreeSizer([int(1000 * (40 + slope * (k - 1))) for k in range(1, 17)], 6, 1, 16, overlap=False)
        feed(s, 100, 6, 0.8, 3.0)
        depths.append(s.choose())
    assert depths == sorted(depths, reverse=True) and depths[0] > depths[-1], depths


def test_while_not_drafting_it_probes_now_and_then():
    s = TreeSizer(STEEP, max_depth=4, top_k=1, max_nodes=16, overlap=False)
    feed(s, 50, 4, 0.2, 13.0)
    choices = []
    for _ in range(3 * PROBE_EVERY):
        d = s.choose()
        choices.append(d)
        s.observe(chain_parents(d), 0, 0.013 * d if d else None, 0.0005)
    assert choices.count(0) >= 3 * PROBE_EVERY - 4 and 2 <= sum(c > 0 for c in choices) <= 4, choices


def test_acceptance_is_counted_per_level_given_the_levels_before():
    s = TreeSizer(FLAT, max_depth=3, top_k=1, max_nodes=16, overlap=True)
    s.observe(chain_parents(3), 1, 0.01, 0.0)  # level 1 accepted, level 2 rejected, 3 not reached
    s.observe(chain_parents(3), 3, 0.01, 0.0)
    assert s.tries[1:] == [2, 2, 1] and s.hits[1:] == [2, 1, 1]


def test_an_unknown_draft_speed_is_measured_first():
    s = TreeSizer(STEEP, max_depth=5, top_k=2, max_nodes=6, overlap=False)
    assert s.choose() == 5
    assert s.nodes(5) == 6 and s.nodes(2) == 4


def test_verify_cost_is_extrapolated_past_the_curve():
    s = TreeSizer([10_000, 20_000, 30_000], max_depth=8, top_k=4, max_nodes=64, overlap=False)
    assert s.verify_ms(3) == 30 and s.verify_ms(5) == 50


def test_it_needs_a_curve():
    with pytest.raises(ValueError, match="verify-cost curve"):
        TreeSizer([], 3, 1, 3, overlap=False)


def test_probes_back_off_while_drafting_keeps_losing():
    s = TreeSizer(STEEP, max_depth=4, top_k=1, max_nodes=16, overlap=False)
    feed(s, 50, 4, 0.2, 13.0)
    probes = []
    for r in range(200):
        d = s.choose()
        if d:
            probes.append(r)
        s.observe(chain_parents(d), 0, 0.013 * d if d else None, 0.0005)
    assert len(probes) == 4 and probes[1] - probes[0] < probes[3] - probes[2], probes


def test_a_catch_up_round_does_not_set_the_draft_speed():
    s = TreeSizer(FLAT, max_depth=3, top_k=1, max_nodes=16, overlap=False)
    s.observe(chain_parents(3), 3, 1.5, 0.0, synced=300)  # the draft read a 300-token prompt first
    assert s.draft_ms_per_level is None and s.tries[1:] == [1, 1, 1]
    s.observe(chain_parents(3), 3, 0.006, 0.0, synced=2)
    assert s.draft_ms_per_level == pytest.approx(2.0)


def test_the_gate_prices_a_token_by_the_curves_slope():
    flat = TreeSizer(FLAT, max_depth=6, top_k=1, max_nodes=16, overlap=True)
    assert flat.min_prob() == pytest.approx(3 / 253, rel=0.01)  # 3 ms per row against a 253 ms step
    steep = TreeSizer(STEEP, max_depth=6, top_k=1, max_nodes=16, overlap=False)
    assert steep.min_prob() == pytest.approx(25 / 37, rel=0.01)
    feed(steep, 20, 3, 0.8, draft_ms_per_level=5.0, wire_ms=3.0)  # the draft's level and the wire count too
    assert steep.min_prob() == pytest.approx((25 + 5) / (37 + 3), rel=0.02)
    assert TreeSizer([1000, 900_000], max_depth=2, top_k=1, max_nodes=2, overlap=True).min_prob() == 0.9
    assert TreeSizer([1000], max_depth=2, top_k=1, max_nodes=2, overlap=True).min_prob() == 0.0


# ---- before the draft starts: can any draft pay on this curve? ------------------------------
# Curves measured on 2-core machines (docs/performance.md and a Xeon on 2026-11-29): the AMD EPYC's Q4_K_M 1.5B on llama.cpp
# and the Intel Xeon's Q8_0 and BF16 files.
EPYC_Q4K = [36000, 60000, 81000, 98000, 119000, 142000, 162000]
XEON_Q8_0 = [122000, 124000, 143000, 162000, 200000, 238000]
XEON_BF16 = [163000, 165000, 188000, 212000, 246000, 281000]


@pytest.mark.parametrize("shape", [(3, 2, 6), (3, 1, 3), (8, 12, 16)])  # CPU and GPU defaults, a chain
def test_no_draft_where_verifying_one_more_token_costs_more_than_it_can_bring(shape):
    depth, top_k, nodes = shape
    from dovetail.runtime.autotree import skip_draft_reason
    reason = skip_draft_reason(EPYC_Q4K, depth, top_k, nodes, overlap=False)
    assert reason is not None and "no draft" in reason and "--force-draft" in reason
    assert "36 ms for one" in reason  # it quotes the curve it judged by


@pytest.mark.parametrize("curve", [XEON_Q8_0, XEON_BF16, FLAT])
def test_drafting_may_pay_where_verifying_two_costs_about_one(curve):
    from dovetail.runtime.autotree import skip_draft_reason
    assert skip_draft_reason(curve, 3, 2, 6, overlap=False) is None
    assert skip_draft_reason(curve, 3, 1, 3, overlap=False) is None


def test_the_decision_is_the_sizers_own_at_the_prior():
    """Skipped exactly when the sizer, with a free draft at the prior acceptance, picks depth 0."""
    from dovetail.runtime.autotree import skip_draft_reason
    for slope in range(0, 40, 2):
        curve = [int(1000 * (37 + slope * (k - 1))) for k in range(1, 17)]
        s = TreeSizer(curve, max_depth=3, top_k=1, max_nodes=3, overlap=False)
        s.draft_ms_per_level, s.wire_ms = 0.0, 0.0
        assert (skip_draft_reason(curve, 3, 1, 3, overlap=False) is None) == (s.choose() > 0), slope


# A lone request's extra rows cost little (the curve is flat at 1-4 rows), but 4 requests'
# forwards are where the cost per row is steep: what llama.cpp on few cores looks like.
FLAT_ALONE = [int(1000 * (40 + 2 * (k - 1))) for k in range(1, 17)]
STEEP_BATCH = [n_r_us for n in (2, 4) for r in (1, 2, 4) for n_r_us in (n, r, int(1000 * (40 + 40 * (n * r - 1))))]


def test_other_requests_in_the_forward_price_a_draft_token_at_the_batchs_marginal_row():
    s = TreeSizer(FLAT_ALONE, max_depth=4, top_k=1, max_nodes=16, overlap=True, batch_us=STEEP_BATCH)
    feed(s, 50, 4, 0.9, 2.0)
    assert s.choose(req=1) == 4  # alone: extra rows are nearly free
    for req in (2, 3, 4):
        s.in_flight[req] = (1, 1.0)  # three target-only requests share the forward
    assert s.choose(req=1) == 0  # now a row costs 40 ms, more than the batch's 160 ms / 4 tokens
    for req in (2, 3, 4):
        s.forget(req)
    assert s.choose(req=1) == 4 and list(s.in_flight) == [1]


def test_without_batch_costs_several_requests_are_priced_as_one_forward_of_their_rows():
    s = TreeSizer(FLAT_ALONE, 4, 1, 16, overlap=True)
    assert s.batch_ms(4, 8) == s.verify_ms(8)


def test_batch_costs_interpolate_between_measured_shapes():
    s = TreeSizer(FLAT_ALONE, 4, 1, 16, overlap=True, batch_us=STEEP_BATCH)
    assert s.batch_ms(2, 4) == pytest.approx(40 + 40 * 3)    # measured: 2 requests x 2 rows
    assert s.batch_ms(4, 6) == pytest.approx(40 + 40 * 5)    # between 4x1 and 4x2
    assert s.batch_ms(4, 32) == pytest.approx(40 + 40 * 31)  # extrapolated along 4x2 .. 4x4
    # With a cost per request too: 3 requests of 3 rows cost halfway between 2 and 4
    # requests' costs of 3 rows (4 requests: extrapolated below their smallest shape, 4x1)
    per_request = [x for n in (2, 4) for r in (1, 2) for x in (n, r, 1000 * (40 + 40 * (n * r - 1) + 10 * n))]
    s = TreeSizer(FLAT_ALONE, 4, 1, 16, overlap=True, batch_us=per_request)
    assert s.batch_ms(3, 3) == pytest.approx(((40 + 80 + 20) + (40 + 80 + 40)) / 2)
    assert s.batch_ms(1, 3) == s.verify_ms(3)
