"""bench.prefill_stall's arithmetic: which gaps overlap the long prompt, and the bar."""
import pytest

from bench.prefill_stall import gap_report

pytestmark = pytest.mark.timeout(30)


def test_gaps_are_split_at_the_long_prompt_and_judged_against_twice_a_chunk_and_a_round():
    # rounds 0.1 s apart, then the long prompt from 1.05 to 3.0 s: rounds 0.6 s apart, one of 1.5 s
    stamps = [0.1 * i for i in range(11)] + [1.6, 2.2, 3.7, 3.8]
    r = gap_report(stamps, t0=1.05, t1=3.0, chunk_s=0.5)
    assert r["gaps_before"] == 10 and r["gap_before_median_s"] == pytest.approx(0.1)
    assert r["gaps_during"] == 3  # 1.0-1.6, 1.6-2.2, 2.2-3.7 (it overlaps the end); 3.7-3.8 does not
    assert r["worst_gap_during_s"] == pytest.approx(1.5) and r["bar_s"] == pytest.approx(1.2)
    assert r["passed"] is False and r["worst_gaps"][0] == (pytest.approx(2.65), pytest.approx(1.5))
    assert gap_report(stamps[:13], t0=1.05, t1=3.0, chunk_s=0.5)["passed"] is True


def test_no_rounds_at_all_is_no_pass():
    r = gap_report([], 0.0, 1.0, 0.5)
    assert r["passed"] is False and r["gaps_during"] == 0
