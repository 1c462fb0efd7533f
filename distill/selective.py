"""Selective answering: which of the student's answers are safe to serve, judged by its own confidence.

The student keeps a query when its confidence (`confidence`, below) is at least a threshold t and
defers it to the teacher otherwise. Over rows sorted by confidence, highest first:

- coverage(t): the share of judged rows kept (rows without a confidence are never kept);
- agreement(t): the mean score of the kept answers against the teacher (distill.agreement): for label tasks
  1 when the labels agree, else 0, so the share that agrees; for free text the similarity to the teacher's answer.
  Unjudged rows (the teacher's answer is unusable) are left out of both numbers;
- the area under the coverage–agreement curve: the step integral sum over thresholds of
  (coverage gained at t) x agreement(t), from coverage 0 to the largest coverage, so a student whose confident
  answers are the right ones scores near 1 and one whose confidence says nothing scores its plain agreement.

The threshold is chosen on rows the student was not tested on (the training run's validation split): the lowest t
whose kept answers reach the target agreement, i.e. the largest coverage that still meets it, then applied
unchanged to the held-out rows. A threshold tuned on the held-out rows would report an agreement it selected for.
"""

from __future__ import annotations

from typing import Any, Optional

from distill import metrics as M
from distill.tasks import TaskSpec


def confidence(task: TaskSpec, result: dict) -> Optional[float]:
    """The model's confidence in the answer it gave, from the logprobs of its own tokens: for label tasks the
    probability of the whole answer (the product over its tokens; under guided decoding the engine's logprobs are
    already normalised over the allowed labels); for free text the mean log-probability per token."""
    lps = result.get("token_logprobs")
    if not lps or result.get("error"):
        return None
    import math

    if task.answer.type == "labels":
        return math.exp(sum(lps))
    return sum(lps) / len(lps)


def coverage_curve(confidences: list[Optional[float]], scores: list[Optional[float]]) -> list[dict[str, Any]]:
    """One point per distinct confidence, highest first: {threshold, kept, coverage, agreement}. Tied rows are
    kept or deferred together (a threshold cannot split them). scores: per row 1/0 (agrees or not) or a
    similarity; None for unjudged rows."""
    judged = [(c, float(a)) for c, a in zip(confidences, scores) if a is not None]
    n = len(judged)
    ranked = sorted(((c, a) for c, a in judged if c is not None), key=lambda x: -x[0])
    points: list[dict[str, Any]] = []
    kept = agreed = 0
    i = 0
    while i < len(ranked):
        threshold = ranked[i][0]
        while i < len(ranked) and ranked[i][0] == threshold:
            kept, agreed, i = kept + 1, agreed + ranked[i][1], i + 1
        points.append({"threshold": threshold, "kept": kept, "coverage": kept / n, "agreement": agreed / kept})
    return points


def curve_area(points: list[dict[str, Any]]) -> Optional[float]:
    """Sum of (coverage gained) x agreement over the curve's points (None for an empty curve)."""
    if not points:
        return None
    area, covered = 0.0, 0.0
    for p in points:
        area += (p["coverage"] - covered) * p["agreement"]
        covered = p["coverage"]
    return area


def choose_threshold(points: list[dict[str, Any]], target: float) -> Optional[float]:
    """The lowest threshold whose kept answers agree at least `target` of the time (the most coverage that
    meets it); None when no threshold does."""
    meeting = [p for p in points if p["agreement"] >= target]
    return min(p["threshold"] for p in meeting) if meeting else None


def kept_at(confidences: list[Optional[float]], scores: list[Optional[float]],
            threshold: Optional[float]) -> dict[str, Any]:
    """What a threshold keeps of the judged rows: {kept, judged, coverage, agreement, agreement_ci95 (the Wilson
    interval, for 1/0 scores only)}."""
    judged = [(c, float(a)) for c, a in zip(confidences, scores) if a is not None]
    keep = [a for c, a in judged if keeps(c, threshold)]
    binary = all(a in (0.0, 1.0) for _, a in judged)
    return {"kept": len(keep), "judged": len(judged), "coverage": len(keep) / len(judged) if judged else None,
            "agreement": sum(keep) / len(keep) if keep else None,
            "agreement_ci95": M.wilson_interval(int(sum(keep)), len(keep)) if binary else None}


def keeps(confidence: Optional[float], threshold: Optional[float]) -> bool:
    """The cascade's one rule: keep the student's answer when its confidence reaches the threshold."""
    return threshold is not None and confidence is not None and confidence >= threshold


def cascade_figures(student_confidences: list[Optional[float]], threshold: Optional[float],
                    student_latency: list[Optional[float]], teacher_latency: list[Optional[float]],
                    student_cost: Optional[float], teacher_cost: Optional[float]) -> dict[str, Any]:
    """Per 1,000 queries: cost and p50 latency of teacher-only, student-only and the cascade (the student answers
    every query first; the deferred ones are asked of the teacher too, so they cost and wait for both)."""
    deferred = [not keeps(c, threshold) for c in student_confidences]
    rate = sum(deferred) / len(deferred) if deferred else None

    def per_1k(value: Optional[float]) -> Optional[float]:
        return None if value is None else value * 1000

    cascade_cost = None if None in (student_cost, teacher_cost, rate) else student_cost + rate * teacher_cost
    cascade_latency = [s + (t if d else 0.0) for s, t, d in zip(student_latency, teacher_latency, deferred)
                       if s is not None and (t is not None or not d)]
    return {
        "deferral_rate": rate,
        "cost_per_1k_queries_usd": {"teacher_only": per_1k(teacher_cost), "student_only": per_1k(student_cost),
                                    "cascade": per_1k(cascade_cost)},
        "latency_p50_s": {"teacher_only": M.percentile([t for t in teacher_latency if t is not None], 50),
                          "student_only": M.percentile([s for s in student_latency if s is not None], 50),
                          "cascade": M.percentile(cascade_latency, 50)},
    }
