"""Selective serving: the cascade (the student answers when it is confident, the teacher when it is not), what
it saves, and the drift signal (is live traffic still the traffic the student was distilled on?).

Plain Python with no Ray or vLLM in it, like serve/rollout.py, which owns one `Cascade`, one `Savings` and one
`Drift`, records into them and persists their state with the rest of the rollout.

- Confidence is `distill.evaluate.scores.confidence`, the number the evaluation report's selective section is computed
  from: for label tasks the probability of the label the student gave (the product over its tokens; under guided
  decoding vLLM's logprobs are taken after the grammar mask, so normalised over the allowed labels), for free text
  the mean log-probability per answer token. A label task's threshold is a probability in [0, 1]; a free-text
  task's a mean log-probability (<= 0).
- Drift is a population stability index, PSI = sum over bins of (p - q) ln(p / q), of the live distribution p
  against the reference q: of the labels served (label tasks) against the labels of the training data, and of
  the deferral rate (two bins) against the rate the report measured on held-out queries at the threshold. The
  usual reading: < 0.1 stable, 0.1-0.25 a shift worth watching, > 0.25 a shift the student was not trained on.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, deque
from typing import Optional

from pydantic import Field, model_validator

from distill.agreement import Comparison
from distill.config import ConfigError, StrictModel
from distill.cost import CostConfig, request_cost
from distill.tasks import TaskSpec
from serve.arm_messages import TokenCounts

log = logging.getLogger("distill.serve.selective")

SPLIT, CASCADE = "split", "cascade"
MODES = (SPLIT, CASCADE)
# Why the cascade sent a request on to the teacher.
DEFER_REASONS = ("low_confidence", "no_label", "no_confidence", "student_error")
COMPARISON_OUTCOMES = ("agree", "disagree", "unjudged")
DRIFT_SIGNALS = ("labels", "deferral")
NO_LABEL = "(none)"  # the bin of live answers that name no label
PSI_FLOOR = 1e-4     # proportions below this count as this much: an empty bin would make the PSI infinite


class CascadeConfig(StrictModel):
    threshold: Optional[float] = Field(
        None, description="Confidence below which the cascade sends the request on to the teacher: for label tasks "
        "the probability of the student's label (0..1), for free text its mean log-probability per token (<= 0). "
        "Give this or threshold_from; changeable at runtime (POST /admin/cascade).")
    threshold_from: Optional[str] = Field(
        None, description="report.json of `distill eval` (path or URI): the threshold is its selective.threshold, "
        "the lowest confidence at which the held-out answers kept reach the report's target agreement. A null "
        "there (no threshold reaches it) is a start-up error.")

    @model_validator(mode="after")
    def _one_source(self) -> "CascadeConfig":
        if self.threshold is not None and self.threshold_from is not None:
            raise ValueError("give cascade.threshold or cascade.threshold_from, not both")
        return self


class DriftConfig(StrictModel):
    reference_data: Optional[str] = Field(
        None, description="The generation output the student was trained on (folder or URI; its data/*.parquet "
        "label column is read at start-up): the reference label distribution. null: no label drift signal "
        "(shown as off in /stats).")
    reference_deferral_rate: Optional[float] = Field(
        None, ge=0.0, le=1.0, description="The deferral rate expected at the threshold. Default: the report's "
        "selective.deferral_rate when the threshold comes from a report (threshold_from); else no deferral drift "
        "signal (shown as off in /stats).")
    window: int = Field(1000, ge=10, description="Latest routed answers (and cascade decisions) the live "
                        "distributions are computed over.")
    min_samples: int = Field(200, ge=1, description="Samples in the window before drift is judged.")
    max_psi: float = Field(0.25, gt=0, description="A PSI above this records a drift event (\"re-distill "
                           "recommended\") once, until it falls back below.")


def check_threshold(task: TaskSpec, threshold: float) -> None:
    """A threshold that cannot be a confidence of this task's answers is an error (ValueError)."""
    if not math.isfinite(threshold):
        raise ValueError(f"the cascade threshold must be a finite number, got {threshold}")
    if task.answer.type == "labels" and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"task {task.name!r} has labels: its confidence is a probability, so the cascade threshold "
                         f"must be within [0, 1], got {threshold}")
    if task.answer.type != "labels" and threshold > 0.0:
        raise ValueError(f"task {task.name!r} answers in free text: its confidence is a mean log-probability per "
                         f"token (<= 0), so the cascade threshold must be <= 0, got {threshold}")


def threshold_from_report(uri: str) -> tuple[float, Optional[float], dict]:
    """(threshold, expected deferral rate or None, the report's selective section) from a report.json."""
    from distill.storage import read_json

    try:
        report = read_json(uri)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cascade.threshold_from {uri}: cannot read the report ({type(err).__name__}: {err})") \
            from None
    if report is None:
        raise ConfigError(f"cascade.threshold_from {uri}: no such file (the report.json of `distill eval`)")
    selective = report.get("selective") if isinstance(report, dict) else None
    if not isinstance(selective, dict) or "threshold" not in selective:
        raise ConfigError(f"cascade.threshold_from {uri}: the report has no selective.threshold (a report of an "
                          f"older `distill eval`?); rerun the evaluation or set cascade.threshold")
    threshold = selective["threshold"]
    if threshold is None:
        raise ConfigError(
            f"cascade.threshold_from {uri}: selective.threshold is null: no confidence threshold lets the kept "
            f"answers reach the target agreement {selective.get('target_agreement')} on the held-out queries, so "
            f"a cascade would keep answers the report does not vouch for. Set cascade.threshold yourself, lower "
            f"the evaluation's target, or distill a better student")
    rate = selective.get("deferral_rate")
    return float(threshold), (float(rate) if rate is not None else None), selective


def psi(counts: dict[str, int], reference: dict[str, float]) -> Optional[float]:
    """Population stability index of live counts against reference proportions (None without live samples)."""
    n = sum(counts.values())
    if n == 0:
        return None
    total = 0.0
    for key in set(counts) | set(reference):
        p = max(counts.get(key, 0) / n, PSI_FLOOR)
        q = max(reference.get(key, 0.0), PSI_FLOOR)
        total += (p - q) * math.log(p / q)
    return total


def proportions(counts: dict[str, int]) -> dict[str, float]:
    n = sum(counts.values())
    return {k: v / n for k, v in counts.items()} if n else {}


class Cascade:
    """The cascade's counters (cumulative over stages, persisted: a restart keeps them). Every cascaded request
    ends in exactly one of kept, deferred (by reason) or failed (deferred, and the teacher failed too)."""

    def __init__(self):
        self.requests = 0
        self.kept = 0
        self.deferred: Counter[str] = Counter()
        self.failed = 0
        self.kept_comparisons: Counter[str] = Counter()      # shadow comparisons of kept answers
        self.deferred_comparisons: Counter[str] = Counter()  # the teacher's fallback against the student's answer

    def record(self, kept: bool, reason: str, teacher_failed: bool) -> None:
        self.requests += 1
        if kept:
            self.kept += 1
        elif teacher_failed:
            self.failed += 1
        else:
            self.deferred[reason] += 1

    @staticmethod
    def count(counter: Counter, comparison: Comparison) -> None:
        counter["unjudged" if comparison.agree is None else "agree" if comparison.agree else "disagree"] += 1

    def snapshot(self) -> dict:
        deferred = sum(self.deferred.values())
        answered = self.kept + deferred

        def rate(c: Counter) -> Optional[float]:
            judged = c["agree"] + c["disagree"]
            return c["agree"] / judged if judged else None

        return {
            "requests": self.requests, "kept": self.kept, "deferred": deferred, "failed": self.failed,
            "deferred_by_reason": {r: self.deferred[r] for r in DEFER_REASONS},
            "deferral_rate": (deferred + self.failed) / self.requests if self.requests else None,
            "kept_share": self.kept / answered if answered else None,
            "kept_agreement": rate(self.kept_comparisons),
            "kept_comparisons": {k: self.kept_comparisons[k] for k in COMPARISON_OUTCOMES},
            # Would the student have agreed with the teacher on what it deferred? Lower than kept_agreement when
            # confidence separates good answers from bad ones.
            "deferred_agreement": rate(self.deferred_comparisons),
            "deferred_comparisons": {k: self.deferred_comparisons[k] for k in COMPARISON_OUTCOMES},
        }

    def to_state(self) -> dict:
        return {"requests": self.requests, "kept": self.kept, "deferred": dict(self.deferred), "failed": self.failed,
                "kept_comparisons": dict(self.kept_comparisons),
                "deferred_comparisons": dict(self.deferred_comparisons)}

    def load_state(self, state: dict) -> None:
        self.requests, self.kept, self.failed = state["requests"], state["kept"], state["failed"]
        self.deferred = Counter(state["deferred"])
        self.kept_comparisons = Counter(state["kept_comparisons"])
        self.deferred_comparisons = Counter(state["deferred_comparisons"])


class Savings:
    """What the routed model cost against sending all of it to the teacher, at the configured prices
    (distill.cost, the evaluation's cost model). A routed request answered by the teacher has its exact teacher
    cost; one answered by the student is priced at the mean cost of the teacher answers seen (routed, shadow and
    cascade fallbacks). Shadow requests are cost the teacher-only baseline would not have had: counted as spent."""

    def __init__(self, prices: CostConfig):
        self.prices = prices
        self.usd = Counter()  # student, teacher (routed), shadow, teacher_known (routed answers by the teacher)
        self.student_answered = 0
        self.teacher_answers = 0  # every teacher answer seen, for the mean
        self.teacher_answers_usd = 0.0

    def price(self, arm: str, tokens: TokenCounts) -> float:
        price = self.prices.teacher if arm == "teacher" else self.prices.student
        return request_cost(price, tokens.prompt_tokens, tokens.cached_tokens, tokens.completion_tokens)

    def teacher_answer(self, tokens: TokenCounts, shadow: bool = False) -> float:
        """Any teacher answer: feeds the mean; a shadow one is also spent."""
        usd = self.price("teacher", tokens)
        self.teacher_answers += 1
        self.teacher_answers_usd += usd
        if shadow:
            self.usd["shadow"] += usd
        return usd

    def routed(self, answered_by: Optional[str], student: Optional[TokenCounts], teacher_usd: Optional[float]
               ) -> None:
        """One routed request: the student's call (if it answered), the teacher's cost (if it answered), and who
        answered the client (None: nobody, the request failed; what was spent on it still counts)."""
        if student is not None:
            self.usd["student"] += self.price("student", student)
        if teacher_usd is not None:
            self.usd["teacher"] += teacher_usd
        if answered_by == "teacher":
            self.usd["teacher_known"] += teacher_usd
        elif answered_by == "student":
            self.student_answered += 1

    def snapshot(self) -> dict:
        mean = self.teacher_answers_usd / self.teacher_answers if self.teacher_answers else None
        usd = {k: float(self.usd[k]) for k in ("student", "teacher", "shadow", "teacher_known")}
        spent = usd["student"] + usd["teacher"] + usd["shadow"]
        teacher_only = usd["teacher_known"] + self.student_answered * mean if mean is not None else None
        saved = teacher_only - spent if teacher_only is not None else None
        return {
            "spent_usd": spent, "student_usd": usd["student"], "teacher_usd": usd["teacher"],
            "shadow_usd": usd["shadow"], "teacher_only_usd": teacher_only, "saved_usd": saved,
            "saved_fraction": saved / teacher_only if saved is not None and teacher_only else None,
            "teacher_mean_usd": mean, "student_answered": self.student_answered,
            "note": None if mean is not None else "no teacher answer seen yet: the teacher-only cost is unknown",
        }

    def to_state(self) -> dict:
        return {"usd": dict(self.usd), "student_answered": self.student_answered,
                "teacher_answers": self.teacher_answers, "teacher_answers_usd": self.teacher_answers_usd}

    def load_state(self, state: dict) -> None:
        self.usd = Counter(state["usd"])
        self.student_answered = state["student_answered"]
        self.teacher_answers = state["teacher_answers"]
        self.teacher_answers_usd = state["teacher_answers_usd"]


class Drift:
    """The live label distribution and deferral rate over a window against their references, and the events when
    either passes its limit."""

    def __init__(self, config: DriftConfig, task: TaskSpec, reference_labels: Optional[dict[str, float]],
                 reference_deferral_rate: Optional[float]):
        self.config = config
        self.task = task
        self.reference = {"labels": reference_labels, "deferral": None if reference_deferral_rate is None else
                          {"deferred": reference_deferral_rate, "kept": 1.0 - reference_deferral_rate}}
        self.labels: deque[str] = deque(maxlen=config.window)
        self.deferrals: deque[bool] = deque(maxlen=config.window)
        self.alarmed = {s: False for s in DRIFT_SIGNALS}
        self.events: Counter[str] = Counter()

    def off(self, signal: str) -> Optional[str]:
        """Why a signal is not computed (None: it is)."""
        if signal == "labels" and self.task.answer.type != "labels":
            return "a free-text task has no labels"
        if self.reference[signal] is None:
            return ("no reference: set rollout.drift.reference_data (the generation output the student was "
                    "trained on)" if signal == "labels" else
                    "no reference deferral rate: set rollout.drift.reference_deferral_rate, or take the threshold "
                    "from a report that has selective.deferral_rate (cascade.threshold_from)")
        return None

    def observe_label(self, answer: str) -> None:
        if self.task.answer.type == "labels":
            self.labels.append(self.task.label_of(self.task.parse(answer or "").answer) or NO_LABEL)

    def observe_deferral(self, deferred: bool) -> None:
        self.deferrals.append(deferred)

    def clear_deferrals(self) -> None:
        """The deferral rate depends on the threshold: a new one starts a new window."""
        self.deferrals.clear()

    def _live(self, signal: str) -> Counter:
        if signal == "labels":
            return Counter(self.labels)
        return Counter("deferred" if d else "kept" for d in self.deferrals)

    def readings(self) -> dict[str, dict]:
        out = {}
        for signal in DRIFT_SIGNALS:
            live = self._live(signal)
            off = self.off(signal)
            out[signal] = {
                "psi": None if off else psi(live, self.reference[signal]), "limit": self.config.max_psi,
                "samples": sum(live.values()), "min_samples": self.config.min_samples, "off": off,
                "alarmed": self.alarmed[signal], "events": self.events[signal],
                "live": proportions(live), "reference": self.reference[signal],
            }
        return out

    def check(self, clock) -> list[dict]:
        """Events for signals that crossed their limit since the last check (either way)."""
        events = []
        for signal, r in self.readings().items():
            if r["psi"] is None or r["samples"] < r["min_samples"]:
                continue
            above = r["psi"] > r["limit"]
            if above == self.alarmed[signal]:
                continue
            self.alarmed[signal] = above
            what = ("the live label distribution" if signal == "labels" else "the live deferral rate")
            against = ("the training data's labels" if signal == "labels" else "the rate the report measured")
            if above:
                self.events[signal] += 1
                reason = (f"re-distill recommended: {what} over the last {r['samples']} has PSI {r['psi']:.3f} "
                          f"against {against} (> {r['limit']})")
                log.warning("DRIFT (%s): %s", signal, reason)
            else:
                reason = f"drift cleared: {what} is back within PSI {r['limit']} ({r['psi']:.3f})"
                log.info("DRIFT (%s): %s", signal, reason)
            events.append({"time": clock(), "kind": "drift" if above else "drift_cleared", "signal": signal,
                           "psi": r["psi"], "limit": r["limit"], "samples": r["samples"], "reason": reason,
                           "live": r["live"], "reference": r["reference"]})
        return events

    def to_state(self) -> dict:
        return {"labels": list(self.labels), "deferrals": list(self.deferrals), "alarmed": dict(self.alarmed),
                "events": dict(self.events)}

    def load_state(self, state: dict) -> None:
        self.labels.extend(state["labels"])
        self.deferrals.extend(state["deferrals"])
        self.alarmed.update(state["alarmed"])
        self.events = Counter(state["events"])
