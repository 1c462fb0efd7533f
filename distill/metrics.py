"""Pure metric functions for evaluation: no models, no I/O, plain Python in and out (unit-tested by hand).

Conventions used throughout:
- A missing answer (the model's output did not parse) is `None`. It never agrees with anything and counts as wrong
  against gold, so a model cannot look better by failing to answer.
- Rates over an empty set are `None` (undefined), not 0: the report then says "n/a" instead of a false zero.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Callable, Iterable, Optional, Sequence

NONE_LABEL = "(none)"  # confusion-matrix column for answers that did not parse to a label


# ----------------------------------------------------------------------------------------------------------------
# Summaries
def mean(values: Iterable[float]) -> Optional[float]:
    values = list(values)
    return sum(values) / len(values) if values else None


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    data = sorted(values)
    if not data:
        return None
    pos = (len(data) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def quantile(values: Iterable[float], q: float) -> Optional[float]:
    """The same with q in 0..1, over any iterable (a window); None for no values."""
    return percentile(list(values), 100 * q)


def latency_summary(values: Sequence[float]) -> dict:
    """n, mean, p50, p95 and max of per-request latencies in seconds (None entries, failed requests, skipped)."""
    data = [float(v) for v in values if v is not None]
    return {"n": len(data), "mean": mean(data), "p50": percentile(data, 50), "p95": percentile(data, 95),
            "max": max(data) if data else None}


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    """numerator / denominator, None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


# ----------------------------------------------------------------------------------------------------------------
# Labels
def parse_rate(answers: Sequence[Optional[str]]) -> Optional[float]:
    """Fraction of answers that parsed (are not None)."""
    return ratio(sum(a is not None for a in answers), len(answers))


def accuracy(predicted: Sequence[Optional[str]], gold: Sequence[Optional[str]]) -> dict:
    """Accuracy against gold labels over the rows that have one (gold not None). An unparsed prediction is wrong.
    Returns {"accuracy", "n"}; accuracy is None when no row has a gold label."""
    if len(predicted) != len(gold):
        raise ValueError(f"length mismatch: {len(predicted)} predictions, {len(gold)} gold labels")
    pairs = [(p, g) for p, g in zip(predicted, gold) if g is not None]
    return {"accuracy": ratio(sum(p == g for p, g in pairs), len(pairs)), "n": len(pairs)}


def confusion_matrix(reference: Sequence[Optional[str]], predicted: Sequence[Optional[str]],
                     labels: Sequence[str]) -> dict:
    """Counts of (reference label, predicted label). Rows: `labels` (the reference); columns: `labels` plus
    NONE_LABEL for predictions that did not parse or fall outside the label set. Rows whose reference is None or
    outside the label set are not placed (there is no true class to put them under); `skipped` counts them."""
    if len(predicted) != len(reference):
        raise ValueError(f"length mismatch: {len(predicted)} predictions, {len(reference)} references")
    labels = list(labels)
    columns = labels + [NONE_LABEL]
    row_of = {label: i for i, label in enumerate(labels)}
    col_of = {label: i for i, label in enumerate(columns)}
    matrix = [[0] * len(columns) for _ in labels]
    skipped = 0
    for r, p in zip(reference, predicted):
        if r not in row_of:
            skipped += 1
            continue
        matrix[row_of[r]][col_of.get(p, col_of[NONE_LABEL])] += 1
    return {"rows": labels, "columns": columns, "matrix": matrix, "skipped": skipped}


def per_label_scores(reference: Sequence[Optional[str]], predicted: Sequence[Optional[str]],
                     labels: Sequence[str]) -> dict:
    """Precision, recall, F1 and support of each label, treating `reference` as the truth.

    Rows with no reference are ignored; an unparsed prediction is a miss for its reference label (it lowers
    recall, and no label's precision). precision is None for a label never predicted, recall None for a label
    with no support, f1 None when either is. `macro` averages each score over the labels where it is defined.
    """
    if len(predicted) != len(reference):
        raise ValueError(f"length mismatch: {len(predicted)} predictions, {len(reference)} references")
    pairs = [(r, p) for r, p in zip(reference, predicted) if r is not None]
    per = {}
    for label in labels:
        tp = sum(r == label and p == label for r, p in pairs)
        predicted_n = sum(p == label for _, p in pairs)
        support = sum(r == label for r, _ in pairs)
        precision = ratio(tp, predicted_n)
        recall = ratio(tp, support)
        if precision is None or recall is None:
            f1 = None
        else:
            f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
        per[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support,
                      "predicted": predicted_n}
    macro = {k: mean(s[k] for s in per.values() if s[k] is not None) for k in ("precision", "recall", "f1")}
    return {"labels": per, "macro": macro}


# ----------------------------------------------------------------------------------------------------------------
# Free text
_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: Optional[str]) -> list[str]:
    """Lower-cased word tokens (Unicode \\w runs): the unit of token F1 and ROUGE-L."""
    return _WORD.findall((text or "").lower())


def _overlap_f1(overlap: Callable[[list[str], list[str]], int], predicted: Optional[str],
                reference: Optional[str]) -> float:
    """F1 of an overlap count between the word tokens of two texts. Both empty: 1.0; one empty or missing: 0.0."""
    if predicted is None or reference is None:
        return 0.0
    p, r = words(predicted), words(reference)
    if not p and not r:
        return 1.0
    shared = overlap(p, r) if p and r else 0
    if shared == 0:
        return 0.0
    precision, recall = shared / len(p), shared / len(r)
    return 2 * precision * recall / (precision + recall)


def token_f1(predicted: Optional[str], reference: Optional[str]) -> float:
    """Bag-of-words F1 between two texts (SQuAD style)."""
    return _overlap_f1(lambda p, r: sum((Counter(p) & Counter(r)).values()), predicted, reference)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a) * len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(predicted: Optional[str], reference: Optional[str]) -> float:
    """ROUGE-L F1 over word tokens: LCS-based precision and recall, combined with equal weight."""
    return _overlap_f1(lcs_length, predicted, reference)


# ----------------------------------------------------------------------------------------------------------------
# Prompt absorption
def mean_nll(nll_sums: Sequence[float], token_counts: Sequence[int]) -> Optional[float]:
    """Token-weighted mean negative log-likelihood: total NLL over all answer tokens / number of answer tokens
    (so a long answer weighs by its length, as in a training loss)."""
    total = sum(token_counts)
    return ratio(sum(nll_sums), total)


SMALL_GAP = 0.05  # a - b below this fraction of a: the ratio is dominated by noise in the denominator


def gap_closed(a: Optional[float], b: Optional[float], c: Optional[float]) -> dict:
    """How much of the prompt's effect the distilled student absorbed.

    a: NLL of the teacher's answers under the base student without the prompt; b: base student with the prompt;
    c: distilled student without the prompt. gap_closed = (a - c) / (a - b): 0 = learned nothing the prompt gives,
    1 = as good as having the prompt, >1 = better than the prompted base student (it also learned the teacher's
    own habits). Undefined (None, with a note) when a == b: then the prompt changes nothing to absorb.
    """
    if a is None or b is None or c is None:
        return {"value": None, "note": "NLL missing for at least one of (a), (b), (c)"}
    gap = a - b
    if abs(gap) <= 1e-9 * max(1.0, abs(a)):
        return {"value": None, "note": "undefined: the prompt does not change the base student's NLL (a == b)"}
    value = (a - c) / gap
    if gap < 0:
        return {"value": value, "note": "the prompt makes the teacher's answers LESS likely for the base student "
                                        "(a < b); read the sign with care"}
    if gap < SMALL_GAP * abs(a):
        return {"value": value, "note": f"the prompt changes the base student's NLL by only {gap / abs(a):.1%} "
                                        f"(a - b = {gap:.4f} nats); gap closed divides by that small difference "
                                        f"and is unstable"}
    return {"value": value, "note": None}


# ----------------------------------------------------------------------------------------------------------------
# Agreement against its floor: chance, the commonest label, and the uncertainty of a small sample
def wilson_interval(successes: int, n: int, z: float = 1.96) -> Optional[tuple[float, float]]:
    """95 % Wilson score interval of a proportion (sound at small n and near 0 or 1, unlike p +- z*sqrt(pq/n))."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def cohen_kappa(predicted: Sequence[Optional[str]], reference: Sequence[Optional[str]]) -> Optional[float]:
    """Chance-corrected agreement over the rows whose reference exists: (p_o - p_e) / (1 - p_e), p_e from the two
    label distributions (an unparsed prediction is its own category, so it never agrees). None when undefined
    (no rows, or both raters constant on one label: p_e = 1)."""
    pairs = [(p if p is not None else NONE_LABEL, r) for p, r in zip(predicted, reference) if r is not None]
    if not pairs:
        return None
    n = len(pairs)
    observed = sum(p == r for p, r in pairs) / n
    pred_counts, ref_counts = Counter(p for p, _ in pairs), Counter(r for _, r in pairs)
    expected = sum(pred_counts[k] * ref_counts[k] for k in ref_counts) / (n * n)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1 - expected)


def majority_agreement(reference: Sequence[Optional[str]]) -> dict:
    """The floor: how often always answering the reference's commonest label would agree. {label, rate, n}."""
    labels = [r for r in reference if r is not None]
    if not labels:
        return {"label": None, "rate": None, "n": 0}
    label, count = Counter(labels).most_common(1)[0]
    return {"label": label, "rate": count / len(labels), "n": len(labels)}
