"""Selective answering: the coverage-agreement curve, its area and the threshold, against hand computations."""

from __future__ import annotations

import pytest

from distill import selective as S
from distill.evaluate.scores import selective_section

# Six judged rows and one unjudged (teacher answer unusable: score None), one row without a confidence.
CONFIDENCE = [0.95, 0.90, 0.90, 0.70, 0.40, None, 0.99]
SCORE = [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, None]


def test_the_curve_keeps_ties_together_and_skips_unjudged_rows():
    # Judged: 6 rows (the last is unjudged). Sorted by confidence: 0.95 (1), 0.90 (1, 0), 0.70 (1), 0.40 (0);
    # the row without a confidence is never kept but counts in the coverage's denominator.
    assert S.coverage_curve(CONFIDENCE, SCORE) == [
        {"threshold": 0.95, "kept": 1, "coverage": 1 / 6, "agreement": 1.0},
        {"threshold": 0.90, "kept": 3, "coverage": 3 / 6, "agreement": 2 / 3},
        {"threshold": 0.70, "kept": 4, "coverage": 4 / 6, "agreement": 3 / 4},
        {"threshold": 0.40, "kept": 5, "coverage": 5 / 6, "agreement": 3 / 5},
    ]


def test_area_is_the_step_integral_and_the_threshold_the_most_coverage_at_the_target():
    curve = S.coverage_curve(CONFIDENCE, SCORE)
    assert S.curve_area(curve) == pytest.approx(1 / 6 * 1 + 2 / 6 * 2 / 3 + 1 / 6 * 3 / 4 + 1 / 6 * 3 / 5)
    assert S.choose_threshold(curve, 0.75) == 0.70    # 3/4 at 0.70 beats the 2/3 at 0.90 above it
    assert S.choose_threshold(curve, 0.8) == 0.95
    assert S.choose_threshold(curve, 1.01) is None
    assert S.curve_area([]) is None


def test_kept_at_counts_and_interval():
    at = S.kept_at(CONFIDENCE, SCORE, 0.70)
    assert (at["kept"], at["judged"], at["coverage"], at["agreement"]) == (4, 6, 4 / 6, 0.75)
    lo, hi = at["agreement_ci95"]
    assert lo < 0.75 < hi
    assert S.kept_at(CONFIDENCE, SCORE, None)["kept"] == 0
    # Similarities (free text) have a mean but no Wilson interval.
    assert S.kept_at([0.5, -0.2], [0.4, 0.8], -1.0)["agreement_ci95"] is None


def test_the_held_out_figures_use_the_threshold_chosen_on_the_selection_rows():
    # On the selection rows 0.8 is the lowest threshold reaching 100 %; on the held-out rows 0.5 would be, but
    # the report must apply 0.8 and grade it there.
    selection = {"confidence": [0.9, 0.8, 0.6], "score": [1.0, 1.0, 0.0]}
    held = {"confidence": [0.85, 0.7, 0.5, 0.3], "score": [1.0, 1.0, 1.0, 0.0]}
    costs = {"student_latency": [0.1, 0.1, 0.1, 0.1], "teacher_latency": [1.0, 2.0, 3.0, 4.0],
             "student_cost": 0.001, "teacher_cost": 0.01}
    section = selective_section(1.0, held, selection, "validation split", costs)
    assert section["threshold"] == 0.8
    assert section["at_threshold"]["kept"] == 1 and section["at_threshold"]["coverage"] == 0.25
    assert section["deferral_rate"] == 0.75
    c = section["cascade"]
    # Cascade: the student on every query, the teacher on 3 of 4 too.
    assert c["cost_per_1k_queries_usd"]["cascade"] == pytest.approx(1000 * (0.001 + 0.75 * 0.01))
    assert c["cost_per_1k_queries_usd"]["teacher_only"] == pytest.approx(10.0)
    # Per-query cascade latency: 0.1 (kept), 2.1, 3.1, 4.1 -> p50 2.6.
    assert c["latency_p50_s"]["cascade"] == pytest.approx(2.6)
    assert "keeps 25.0%" in section["text"]


def test_without_selection_rows_no_threshold_is_chosen_and_the_report_says_why():
    held = {"confidence": [0.9, 0.2], "score": [1.0, 0.0]}
    section = selective_section(0.9, held, None, "no selection split", {
        "student_latency": [0.1, 0.1], "teacher_latency": [1.0, 1.0], "student_cost": 0.0, "teacher_cost": 0.01})
    assert section["threshold"] is None and section["deferral_rate"] == 1.0
    assert "not used for it" in section["no_threshold_reason"]
    assert section["text"].startswith("No threshold reaches the target")
