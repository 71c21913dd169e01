"""Evaluation intervals: the bootstrap and the paired comparison against cases with a known answer."""

from __future__ import annotations

import math

import pytest

from hpml_ft.eval.stats import add_intervals, bootstrap_interval, half_width, mcnemar_p, paired_difference


def test_bootstrap_interval_matches_the_binomial_interval():
    values = [1.0] * 60 + [0.0] * 240  # 20% of 300
    lo, hi = bootstrap_interval(values, samples=4000)
    expected = half_width(0.2, 300)  # 4.53 points
    assert lo < 0.2 < hi
    assert (hi - lo) / 2 == pytest.approx(expected, abs=0.006)  # within 0.6 points of the normal approximation


def test_constant_scores_have_a_zero_width_interval_and_it_is_reproducible():
    assert bootstrap_interval([1.0] * 50) == (1.0, 1.0)
    values = [1.0, 0.0, 0.0, 1.0, 0.5] * 20
    assert bootstrap_interval(values) == bootstrap_interval(values)
    assert all(math.isnan(x) for x in bootstrap_interval([]))


def test_paired_difference_is_tighter_than_independent_intervals():
    base = [1.0] * 30 + [0.0] * 170
    better = [1.0] * 30 + [1.0] * 20 + [0.0] * 150  # right wherever base is, plus 20 more: +10 points
    d = paired_difference(base, better)
    assert d["diff"] == pytest.approx(0.10)
    assert 0 < d["low"] < 0.10 < d["high"]  # the paired interval excludes 0
    lo_a, hi_a = bootstrap_interval(base)
    lo_b, hi_b = bootstrap_interval(better)
    assert d["high"] - d["low"] < (hi_a - lo_a) + (hi_b - lo_b)
    same = paired_difference(base, base)
    assert same == {"diff": 0.0, "low": 0.0, "high": 0.0}
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 0.0])


def test_mcnemar_exact_p_values():
    assert mcnemar_p([False] * 10, [True] * 10) == pytest.approx(2 * 0.5**10)
    assert mcnemar_p([True, False], [True, False]) == 1.0  # no discordant question
    a = [True] * 5 + [False] * 5
    assert mcnemar_p(a, a[::-1]) == 1.0  # 5 vs 5: no evidence either way


def test_add_intervals_writes_ci_and_a_comparison_against_the_first_model():
    rows_a = [{"em": 0.0, "f1": 0.2}] * 80 + [{"em": 1.0, "f1": 1.0}] * 20
    rows_b = [{"em": 1.0, "f1": 1.0}] * 40 + [{"em": 0.0, "f1": 0.1}] * 60
    results = [{"name": "base", "metrics": {}, "rows": rows_a}, {"name": "tuned", "metrics": {}, "rows": rows_b}]
    add_intervals(results)
    base, tuned = results[0]["metrics"], results[1]["metrics"]
    assert "vs_first" not in base and base["exact_match_ci"][0] < 20 < base["exact_match_ci"][1]
    v = tuned["vs_first"]
    assert v["model"] == "base" and v["em_diff"] == pytest.approx(20.0)
    assert v["em_ci"][0] < 20 < v["em_ci"][1] and 0 <= v["mcnemar_p"] <= 1


def test_a_clear_difference_keeps_its_p_value_and_reads_p_below_0_001():
    from hpml_ft.eval.stats import interval_text

    results = [
        {"name": "base", "metrics": {}, "rows": [{"em": 0.0, "f1": 0.0}] * 60},
        {"name": "tuned", "metrics": {}, "rows": [{"em": 1.0, "f1": 1.0}] * 60},
    ]
    add_intervals(results)
    tuned = results[1]["metrics"]
    assert tuned["vs_first"]["mcnemar_p"] == pytest.approx(2 * 0.5**60, rel=1e-2)  # not rounded to 0
    assert interval_text(tuned).endswith("(McNemar p < 0.001)")
