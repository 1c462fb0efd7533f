"""Per-arm counters and latency windows (`ArmStats`), and the one writer of GET /metrics (`prometheus_text`): the
rollout (arms, rules, stages, shadow), the cascade, cost, drift, the gateway's own time, its state saves and the
capture, in the Prometheus text exposition format. GET /stats is `Rollout.snapshot()`: the same numbers as JSON.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from typing import TYPE_CHECKING, Optional

from distill.metrics import quantile
from serve.rollout_rules import RULES
from serve.selective import DEFER_REASONS, DRIFT_SIGNALS, MODES

if TYPE_CHECKING:  # the Rollout keeps an ArmStats per arm; the writer reads the Rollout it is given
    from serve.rollout import Rollout


class ArmStats:
    """Counters and a latency window for one arm (this gateway replica's, since it started)."""

    def __init__(self, window: int):
        self.requests = 0
        self.errors: Counter[int] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.latency_sum = 0.0
        self.latencies: deque[float] = deque(maxlen=window)

    def record(self, latency_s: float, prompt_tokens: int, completion_tokens: int) -> None:
        self.requests += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.latency_sum += latency_s
        self.latencies.append(latency_s)

    def snapshot(self) -> dict:
        return {
            "requests": self.requests,
            "errors": {str(k): v for k, v in sorted(self.errors.items())},
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latency_p50_s": quantile(self.latencies, 0.5),
            "latency_p95_s": quantile(self.latencies, 0.95),
            "latency_mean_s": self.latency_sum / self.requests if self.requests else None,
        }


def prometheus_text(rollout: Rollout, state_save_failures: Optional[int] = None, capture: Optional[dict] = None,
                prefix: str = "distill") -> str:
    """The rollout's numbers (and the gateway's state saves and capture, when given) in the Prometheus text
    exposition format (GET /metrics)."""
    from serve.rollout import ARMS, SHADOW_OUTCOMES, STALE_KINDS

    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> None:
        lines.append(f"# HELP {prefix}_{name} {help_text}")
        lines.append(f"# TYPE {prefix}_{name} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"{prefix}_{name}{{{label_text}}} {_number(value)}" if label_text
                         else f"{prefix}_{name} {_number(value)}")

    metric("requests_total", "counter", "Answered requests per arm.",
           [({"arm": a}, s.requests) for a, s in rollout.arms.items()])
    metric("routed_requests_total", "counter", "Requests to the routed model, per arm that served them.",
           [({"arm": a}, rollout.routed[a]) for a in ARMS])
    metric("errors_total", "counter", "Failed requests per arm and HTTP status.",
           [({"arm": a, "status": str(code)}, n) for a, s in rollout.arms.items() for code, n in
            sorted(s.errors.items())])
    metric("tokens_total", "counter", "Prompt and completion tokens per arm.",
           [({"arm": a, "kind": kind}, getattr(s, f"{kind}_tokens")) for a, s in rollout.arms.items()
            for kind in ("prompt", "completion")])
    samples = []
    for a, s in rollout.arms.items():
        for q in (0.5, 0.95):
            value = quantile(s.latencies, q)
            samples.append(({"arm": a, "quantile": str(q)}, _or_nan(value)))
    lines.append(f"# HELP {prefix}_latency_seconds End-to-end request latency at the gateway per arm.")
    lines.append(f"# TYPE {prefix}_latency_seconds summary")
    for labels, value in samples:
        label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
        lines.append(f"{prefix}_latency_seconds{{{label_text}}} {_number(value)}")
    for a, s in rollout.arms.items():
        lines.append(f'{prefix}_latency_seconds_sum{{arm="{a}"}} {_number(s.latency_sum)}')
        lines.append(f'{prefix}_latency_seconds_count{{arm="{a}"}} {s.requests}')
    metric("student_share", "gauge", "Current fraction of routed traffic served by the student.",
           [({}, rollout.share)])
    metric("rollout_stage", "gauge", "Rollout stage: grows with every share change and rollback.",
           [({}, rollout.stage)])
    readings = rollout.readings()
    metric("shadow_agreement", "gauge", "Live teacher/student agreement over the shadow window (NaN: none).",
           [({}, _or_nan(readings["agreement"].value))])
    metric("shadow_comparisons_total", "counter", "Shadow requests by outcome.",
           [({"result": k}, rollout.shadow[k]) for k in SHADOW_OUTCOMES])
    metric("rollout_rule_value", "gauge", "Each rollback rule's value over its window (NaN: no samples).",
           [({"rule": name}, _or_nan(r.value)) for name, r in readings.items()])
    metric("rollout_rule_limit", "gauge", "Each rollback rule's limit (NaN: the rule is off).",
           [({"rule": name}, _or_nan(r.limit)) for name, r in readings.items()])
    metric("rollout_rule_samples", "gauge", "Samples in each rollback rule's window.",
           [({"rule": name}, r.samples) for name, r in readings.items()])
    metric("student_unparsable_total", "counter", "Routed student answers of a label task that name no label.",
           [({}, rollout.unparsable)])
    metric("stale_results_total", "counter", "Results kept out of the windows: they arrived after their stage.",
           [({"kind": k}, rollout.stale[k]) for k in STALE_KINDS])
    metric("rollbacks_total", "counter", "Automatic rollbacks of the student share to 0.", [({}, rollout.rollbacks)])
    metric("rollback_firings_total", "counter", "Automatic rollbacks per rule that fired.",
           [({"rule": rule}, rollout.firings[rule]) for rule in RULES])
    metric("cascade_mode", "gauge", "1 for the routed model's current mode.",
           [({"mode": m}, int(m == rollout.mode)) for m in MODES])
    metric("cascade_threshold", "gauge", "The cascade's confidence threshold (NaN: none).",
           [({}, _or_nan(rollout.threshold))])
    cascade = rollout.cascade.snapshot()
    metric("cascade_requests_total", "counter", "Cascaded requests by outcome.",
           [({"outcome": "kept"}, cascade["kept"])]
           + [({"outcome": f"deferred_{r}"}, cascade["deferred_by_reason"][r]) for r in DEFER_REASONS]
           + [({"outcome": "failed"}, cascade["failed"])])
    metric("cascade_deferral_rate", "gauge", "Fraction of cascaded requests sent on to the teacher (NaN: none).",
           [({}, _or_nan(cascade["deferral_rate"]))])
    metric("cascade_kept_agreement", "gauge", "Agreement of the kept answers with the teacher, from shadow "
           "comparisons (NaN: none judged).", [({}, _or_nan(cascade["kept_agreement"]))])
    cost = rollout.savings.snapshot()
    metric("cost_usd", "counter", "Dollars spent on the routed model, per part, at the configured prices.",
           [({"part": p}, cost[f"{p}_usd"]) for p in ("student", "teacher", "shadow")])
    metric("cost_teacher_only_usd", "gauge", "What the routed traffic would have cost on the teacher alone "
           "(NaN: unknown yet).", [({}, _or_nan(cost["teacher_only_usd"]))])
    metric("cost_saved_usd", "gauge", "Teacher-only cost minus what was spent (NaN: unknown yet).",
           [({}, _or_nan(cost["saved_usd"]))])
    drift = rollout.drift.readings()
    metric("drift_psi", "gauge", "Population stability index of the live distribution against its reference "
           "(NaN: off or no samples).", [({"signal": s}, _or_nan(drift[s]["psi"])) for s in DRIFT_SIGNALS])
    metric("drift_samples", "gauge", "Samples in each drift window.",
           [({"signal": s}, drift[s]["samples"]) for s in DRIFT_SIGNALS])
    metric("drift_limit", "gauge", "The PSI above which drift is recorded.", [({}, rollout.config.drift.max_psi)])
    metric("drift_events_total", "counter", "Drift events (\"re-distill recommended\") per signal.",
           [({"signal": s}, drift[s]["events"]) for s in DRIFT_SIGNALS])
    metric("gateway_overhead_seconds", "gauge", "The gateway's own time per request (its handler minus the "
           "arms' time), over its recent requests (NaN: none).",
           [({"quantile": str(q)}, _or_nan(quantile(rollout.overhead, q))) for q in (0.5, 0.95)])
    if state_save_failures is not None:
        metric("state_save_failures_total", "counter", "Failed saves of the rollout state.",
               [({}, state_save_failures)])
    if capture is not None:
        metric("capture_rows_total", "counter", "Captured teacher answers: written to shards, buffered, and turned "
               "down by reason.", [({"result": "written"}, capture["written"]), ({"result": "pending"}, capture["pending"])]
               + [({"result": reason}, n) for reason, n in capture["skipped"].items()])
    return "\n".join(lines) + "\n"

def _or_nan(value: Optional[float]) -> float:
    return float("nan") if value is None else value


def _number(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return repr(float(value)) if isinstance(value, float) else str(value)
