"""The rollout's rollback rules: what each one measures over its window and when it fires.

    error_rate   5xx answers and timeouts of the student, and for label tasks answers that name no label
    agreement    label tasks: the fraction of shadow comparisons whose labels agree
    similarity   free-text tasks: mean ROUGE-L F1 of the student's answer to the teacher's (off by default:
                 two good paraphrases share few words, so a fixed limit is a per-task decision)
    latency_p95  the student's p95 latency at the gateway
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from distill.agreement import agreement_rate, mean_similarity
from distill.metrics import quantile
from distill.tasks import TaskSpec
from serve.config import RolloutConfig

RULES = ("error_rate", "agreement", "similarity", "latency_p95")


def _mean(values) -> Optional[float]:
    return sum(values) / len(values) if values else None


@dataclass(frozen=True)
class RuleReading:
    """One rollback rule over its window right now."""
    rule: str
    value: Optional[float]
    limit: Optional[float]  # None: the rule is off
    samples: int
    min_samples: int
    fires_above: bool       # True: values above the limit fire (errors, latency); False: below (agreement)

    @property
    def fires(self) -> bool:
        if self.limit is None or self.value is None or self.samples < self.min_samples:
            return False
        return self.value > self.limit if self.fires_above else self.value < self.limit

    def reason(self) -> str:
        what = {"error_rate": ("error rate", "routed student requests"),
                "agreement": ("live agreement", "shadow comparisons"),
                "similarity": ("live similarity (ROUGE-L F1)", "shadow comparisons"),
                "latency_p95": ("student p95 latency", "routed student requests")}[self.rule]
        unit = "s" if self.rule == "latency_p95" else ""
        verb = "exceeds" if self.fires_above else "is below"
        return f"{what[0]} {self.value:.3f}{unit} over the last {self.samples} {what[1]} {verb} {self.limit}{unit}"

    def as_dict(self) -> dict:
        return {"value": self.value, "limit": self.limit, "samples": self.samples, "min_samples": self.min_samples}


def rule_readings(cfg: RolloutConfig, task: TaskSpec, outcomes, comparisons, student_latencies
                  ) -> dict[str, RuleReading]:
    """Every rollback rule over its window: the failures of routed student requests (`outcomes`, True: failed),
    the judged shadow `comparisons` and the student's latencies at the gateway."""
    labels = task.answer.type == "labels"
    judged = len(comparisons)
    return {
        "error_rate": RuleReading("error_rate", _mean(outcomes), cfg.max_error_rate, len(outcomes),
                                  cfg.min_error_samples, fires_above=True),
        "agreement": RuleReading("agreement", agreement_rate(comparisons)["rate"],
                                 cfg.min_agreement if labels else None, judged, cfg.min_agreement_samples,
                                 fires_above=False),
        "similarity": RuleReading("similarity", mean_similarity(comparisons),
                                  None if labels else cfg.min_similarity, judged, cfg.min_agreement_samples,
                                  fires_above=False),
        "latency_p95": RuleReading("latency_p95", quantile(student_latencies, 0.95), cfg.max_student_p95_s,
                                   len(student_latencies), cfg.min_latency_samples, fires_above=True),
    }
