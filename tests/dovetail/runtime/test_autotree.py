"""The tree sizer: depth from the verify-cost curve, the draft's speed and observed acceptance."""
import pytest

from dovetail.runtime.autotree import PROBE_EVERY, RECHECK_EVERY, TreeSizer
from dovetail.spec.tree import chain_parents

pytestmark = pytest.mark.timeout(30)

FLAT = [int(1000 * (250 + 3 * k)) for k in range(1, 17)]    # 16-core server: k is nearly free
STEEP = [int(1000 * (37 + 25 * (k - 1))) for k in range(1, 17)]  # 2 cores, llama.cpp Q4_K


def accept(credit, depth, accept_rate):
    """(levels accepted, credit left): each level accepted at accept_rate, deterministically."""
    accepted = 0
    for _level in range(depth):
        credit += accept_rate
        if credit < 1:
            break
        credit -= 1
        accepted += 1
    return accepted, credit


def feed(sizer, rounds, depth, accept_rate, draft_ms_per_level, wire_ms=0.5):
    """Rounds of a chain draft whose levels are each accepted with accept_rate (deterministic)."""
    credit = 0.0
    for _ in range(rounds):
        accepted, credit = accept(credit, depth, accept_rate)
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


# ---- the curve as the rounds see it -------------------------------------------------------
# A bf16 1.5B on two shared cores (llama.cpp, 2026-11-30): measured at start-up in a slow
# spell (k = 1 at 107 ms), then decoding at 88 ms per token (bench/results/sweep-2core-bf16-*).
SLOW_SPELL_BF16 = [107000, 134000, 149000, 155000, 153000, 163000, 183000, 182000]
NOW_BF16 = [88, 118, 137, 145, 152, 160, 172, 180]


def run_rounds(s, rounds, accept_rate, draft_ms_per_level, report_verify=True):
    """Rounds chosen by the sizer, verified at NOW_BF16's cost, each level accepted at
    accept_rate (deterministically); returns the depths chosen."""
    credit, chosen = 0.0, []
    for _ in range(rounds):
        d = s.choose(req=1)
        accepted, credit = accept(credit, d, accept_rate)
        rows = s.nodes(d) + 1
        s.observe(chain_parents(d), accepted, d * draft_ms_per_level / 1000 if d else None, 0.001,
                  verify_s=NOW_BF16[rows - 1] / 1000 if report_verify else None, req=1)
        chosen.append(d)
    return chosen


def test_a_rounds_own_verification_time_moves_its_rows_cost():
    s = TreeSizer(SLOW_SPELL_BF16, max_depth=3, top_k=1, max_nodes=3, overlap=False)
    for _ in range(30):
        s.observe(chain_parents(2), 2, 0.02, 0.001, verify_s=0.137, req=1)
    assert s.verify_ms(3) == pytest.approx(137, abs=1)
    # rows it did not see keep their start-up cost, times the drift the rows it saw showed
    assert s.drift == pytest.approx(137 / (SLOW_SPELL_BF16[2] / 1000), rel=0.01)
    assert s.verify_ms(1) == pytest.approx(107 * s.drift) and s.verify_ms(4) == pytest.approx(155 * s.drift)
    s.in_flight[2] = (3, 1.5)  # another request shares the forwards: its times are not one request's
    s.observe(chain_parents(2), 2, 0.02, 0.001, verify_s=0.5, req=1)
    assert s.verify_ms(3) == pytest.approx(137, abs=1)


def test_a_curve_measured_in_a_slow_spell_stops_misleading_the_sizer():
    """At the start-up curve a draft accepted at 0.36 per level looks worth it (rows look cheap
    next to a slow k = 1); at what verifying costs now, it is not. The sizer must find out."""
    def sizer():
        s = TreeSizer(SLOW_SPELL_BF16, max_depth=3, top_k=1, max_nodes=3, overlap=False)
        s.draft_ms_per_level = 7.0
        return s
    blind = run_rounds(sizer(), 300, 0.36, 7.0, report_verify=False)
    seeing = run_rounds(sizer(), 300, 0.36, 7.0)
    assert sum(d > 0 for d in blind[-100:]) > 90  # the start-up curve alone keeps it drafting
    assert sum(d > 0 for d in seeing[-100:]) < 15  # probes only


def test_while_drafting_wins_plain_decoding_is_rechecked_now_and_then():
    s = TreeSizer(FLAT, max_depth=6, top_k=1, max_nodes=16, overlap=True)
    feed(s, 50, 6, 0.9, 2.0)
    plain = [r for r in range(300) if s.choose(req=1) == 0]
    assert plain[0] == RECHECK_EVERY - 1 and 3 <= len(plain) <= 5, plain
    gaps = [b - a for a, b in zip(plain, plain[1:])]
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0], plain  # backing off


def test_a_probe_waits_while_reading_what_its_draft_missed_costs_more_than_it_can_tell():
    def probes(behind):
        s = TreeSizer(STEEP, max_depth=4, top_k=1, max_nodes=16, overlap=False)
        feed(s, 50, 4, 0.2, 13.0)
        s.observe(chain_parents(4), 0, 0.6, 0.0005, synced=150)  # a probe that first read 150 tokens: 4 ms each
        assert s.catch_up_ms_per_token == pytest.approx(4.0) and s.draft_ms_per_level == pytest.approx(13.0)
        made = 0
        for r in range(200):
            d = s.choose(req=1, behind=behind(r))
            made += d > 0
            s.observe(chain_parents(d), 0, 0.013 * d if d else None, 0.0005)
        return made
    assert probes(lambda r: 150 + r) == 0  # 600 ms and more to read, against 5% of 37 ms a round
    assert probes(lambda r: 2) >= 3         # a draft in step: probes as usual
    assert probes(lambda r: 40) >= 1        # 160 ms: affordable once ~90 plain rounds have passed


def test_row_counts_not_yet_verified_follow_the_drift_of_those_that_were():
    """Rounds of one row that cost 1.5x the start-up curve make an unverified 8-row round
    cost 1.5x its start-up price too, while a verified row count keeps what its rounds took."""
    sizer = TreeSizer([10_000, 20_000, 30_000, 40_000, 50_000, 60_000, 70_000, 80_000], 3, 1, 3, overlap=False)
    for _ in range(60):
        sizer.observe_verify(1, 0.015, 0.0)
    assert sizer.verify_ms(1) == pytest.approx(15.0, rel=0.01)
    assert sizer.verify_ms(8) == pytest.approx(120.0, rel=0.01)
    assert sizer.verify_ms(9) == pytest.approx(135.0, rel=0.01)  # extrapolated the same way
    for _ in range(60):
        sizer.observe_verify(8, 0.080, 0.0)  # 8 rows now seen at their start-up price
    assert sizer.verify_ms(8) == pytest.approx(80.0, rel=0.01)
    assert 1.0 < sizer.drift < 1.1 and sizer.verify_ms(1) == pytest.approx(15.0, rel=0.01)
