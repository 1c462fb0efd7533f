"""A/B rollout of the student against the teacher: arm choice, shadow comparison, automatic rollback and stats.

Plain Python with no Ray or vLLM in it, so every rule here is unit-tested on its own; the Serve gateway
(`serve/app.py`) owns one `Rollout`, calls it for every request and persists its state (`serve/state.py`).

- Arm choice: with a user id, a hash of it decides the arm, so a user keeps the same arm at a given share and a
  user who got the student at 1 % keeps it at 10, 50 and 100 % (the hash threshold only grows). Without one,
  each request draws independently.
- Stages: every share change and every rollback starts a new stage, and the rollback windows start empty. A
  request carries the stage it was routed in (`Route`); an answer, error or shadow result that arrives after its
  stage ended is counted as stale and kept out of the new stage's windows.
- Windows: only requests to the routed model that the student served feed them (they all use the adapter of the
  task being rolled out); direct requests to `student` or to another task's adapter do not.
- Shadow: a sample of those requests is also sent to the teacher in the background and the two answers are
  compared with `distill.agreement.compare`, the definition the evaluation report uses.
- Modes: `split` routes the student's share to the student; `cascade` sends it to the student first and, when
  the student's confidence is below the threshold, on to the teacher (serve/selective.py). In cascade mode the
  windows hold the kept share: the latency and agreement of the answers the student kept, and the failures of
  the student (a 5xx, a label task's answer that names no label) among the requests it kept or failed.
- Rollback: when one rule breaks its limit over its window, the share goes to 0 and the event is logged, kept,
  counted per rule and exposed in /stats and /metrics:
    error_rate   5xx answers and timeouts of the student, and for label tasks answers that name no label
    agreement    label tasks: the fraction of shadow comparisons whose labels agree
    similarity   free-text tasks: mean ROUGE-L F1 of the student's answer to the teacher's (off by default:
                 two good paraphrases share few words, so a fixed limit is a per-task decision)
    latency_p95  the student's p95 latency at the gateway
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Iterable, Literal, Optional

from pydantic import Field

from distill.agreement import Comparison, agreement_rate, compare, mean_similarity
from distill.config import ConfigError, StrictModel
from distill.cost import CostConfig
from distill.metrics import percentile
from distill.selective import keeps
from distill.tasks import TaskSpec
from serve.selective import (CASCADE, DEFER_REASONS, DRIFT_SIGNALS, MODES, Cascade,
                             CascadeConfig, Drift, DriftConfig, Savings, check_threshold)

log = logging.getLogger("distill.serve.rollout")

TEACHER, STUDENT = "teacher", "student"
ARMS = (TEACHER, STUDENT)
RULES = ("error_rate", "agreement", "similarity", "latency_p95")
SHADOW_OUTCOMES = ("agree", "disagree", "unjudged", "skipped", "failed")
STALE_KINDS = ("answer", "error", "shadow")


class RolloutConfig(StrictModel):
    student_share: float = Field(
        0.01, ge=0.0, le=1.0, description="Fraction of the routed model's traffic the student serves at start "
        "(staged rollout: 0.01 -> 0.1 -> 0.5 -> 1.0; change it at runtime with POST /admin/share). A gateway "
        "that finds persisted state for the same task, teacher, student and adapter resumes from that instead.")
    sticky: bool = Field(True, description="Requests that carry a user id always get the same arm for a share.")
    user_header: str = Field("x-user-id", description="Header read for the user id when the body has no `user`.")
    shadow_sample_rate: float = Field(
        0.1, ge=0.0, le=1.0, description="Fraction of student-served routed requests also sent to the teacher "
        "in the background to measure live agreement (0: shadow off).")
    max_shadow_in_flight: int = Field(
        8, ge=1, description="Shadow requests waiting on the teacher at once; more are skipped (and counted) so "
        "that shadowing never queues up behind production traffic.")
    error_window: int = Field(200, ge=1, description="Routed student requests the error rate is computed over.")
    min_error_samples: int = Field(
        20, ge=1, description="Routed student requests needed in the window before errors can trigger a rollback.")
    max_error_rate: Optional[float] = Field(
        0.05, ge=0.0, le=1.0, description="Roll back when the fraction of failed routed student requests over the "
        "window exceeds this. Failed: a 5xx from the student (engine failure, replica lost, timeout) or, for "
        "label tasks, an answer that names no label. 4xx (the client's fault) and client disconnects do not "
        "count either way. null turns the rule off.")
    agreement_window: int = Field(
        200, ge=1, description="Judged shadow comparisons that live agreement and similarity are computed over.")
    min_agreement_samples: int = Field(
        50, ge=1, description="Comparisons needed in the window before agreement or similarity can trigger a "
        "rollback.")
    min_agreement: Optional[float] = Field(
        0.9, ge=0.0, le=1.0, description="Label tasks: roll back when the fraction of shadow comparisons whose "
        "labels agree falls below this; null turns the rule off. Free-text tasks refuse it: exact agreement of "
        "free text is rare between two good answers (use min_similarity).")
    min_similarity: Optional[float] = Field(
        None, ge=0.0, le=1.0, description="Free-text tasks: roll back when the mean ROUGE-L F1 of the student's "
        "answers to the teacher's (distill.agreement, as in the evaluation report) over the window falls below "
        "this. Default null: no agreement rule for free text, since paraphrases of one answer share few words and "
        "a fair limit depends on the task; set it from the report's similarity of a student you accept. Label "
        "tasks refuse it (use min_agreement).")
    latency_window: int = Field(
        200, ge=1, description="Routed student requests its rollback p95 latency is computed over.")
    min_latency_samples: int = Field(
        20, ge=1, description="Routed student requests needed in the window before latency can trigger a rollback.")
    max_student_p95_s: Optional[float] = Field(
        10.0, gt=0, description="Roll back when the student's p95 latency (seconds, end to end at the gateway) "
        "exceeds this; null turns the latency rule off.")
    stats_window: int = Field(2048, ge=16, description="Latencies per arm kept for the p50/p95 in /stats.")
    max_events: int = Field(100, ge=1, description="Rollout events (share changes, rollbacks) kept for /stats.")
    state_uri: Optional[str] = Field(
        None, description="Where the rollout state (share, stage, windows, events) is persisted so that a "
        "restarted gateway resumes it. null: a detached Ray actor on the head node, named after the application; "
        "it survives gateway restarts and in-place Serve upgrades, not a new cluster. A path or s3:// / gs:// URI "
        "of a JSON file survives those too (a RayService upgrade that replaces the cluster).")
    persist_interval_s: float = Field(
        2.0, gt=0, description="Seconds between saves of window updates; share changes and rollbacks are saved "
        "at once.")
    mode: Literal["split", "cascade"] = Field(
        "split", description="split: the student's share of the routed traffic is answered by the student. "
        "cascade: that share asks the student first and, when its confidence is below cascade.threshold, sends "
        "the same request on to the teacher and returns the teacher's answer. Changeable at runtime (POST "
        "/admin/cascade); a resumed rollout keeps the mode it had.")
    cascade: CascadeConfig = Field(default_factory=CascadeConfig, description="The cascade's threshold.")
    drift: DriftConfig = Field(default_factory=DriftConfig, description="Drift of the live labels and deferral "
                               "rate against the training data and the report.")


def check_rules(config: RolloutConfig, task: TaskSpec) -> None:
    """Refuse agreement limits and cascade thresholds that do not fit the task's answers, and a cascade without
    a threshold (a ConfigError, before any engine starts; run after cascade.threshold_from is read)."""
    if config.cascade.threshold is not None:
        try:
            check_threshold(task, config.cascade.threshold)
        except ValueError as err:
            raise ConfigError(f"rollout.cascade.threshold: {err}") from None
    elif config.mode == CASCADE:
        raise ConfigError("rollout.mode cascade needs a threshold: set rollout.cascade.threshold, or "
                          "rollout.cascade.threshold_from to the report.json of `distill eval`")
    if task.answer.type == "labels" and config.min_similarity is not None:
        raise ConfigError(f"rollout.min_similarity applies to free-text tasks; {task.name!r} has labels: use "
                          f"rollout.min_agreement")
    if task.answer.type != "labels" and "min_agreement" in config.model_fields_set:
        raise ConfigError(f"rollout.min_agreement applies to label tasks; {task.name!r} answers in free text, "
                          f"where exact agreement is rare between two good answers: use rollout.min_similarity")


def user_fraction(user: str) -> float:
    """A stable number in [0, 1) for a user id: the same on every replica and every restart (no Python hash
    randomisation), and uniform enough that a share of s puts about s of the users on the student."""
    digest = hashlib.sha256(user.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def quantile(values: Iterable[float], q: float) -> Optional[float]:
    """Linear-interpolated quantile, q in 0..1 (distill.metrics.percentile), None for no values."""
    return percentile(list(values), 100 * q)


def _mean(values) -> Optional[float]:
    return sum(values) / len(values) if values else None


@dataclass(frozen=True)
class Route:
    """The arm that serves a request and, for the routed model, the stage it was routed in (None: a direct
    request to a model by name, which never feeds the rollback windows); `cascade`: the student answers only if
    it is confident enough, else the teacher does."""
    arm: str
    stage: Optional[int] = None
    cascade: bool = False


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


class Rollout:
    """The live state of one teacher/student rollout. Single-threaded use (one asyncio loop) is assumed.

    `revision` grows with every change to the state `to_state` returns, so the gateway knows when to save it."""

    def __init__(self, config: RolloutConfig, task: TaskSpec, rng: Optional[random.Random] = None,
                 clock=time.time, prices: Optional[CostConfig] = None,
                 reference_labels: Optional[dict[str, float]] = None):
        self.config = config
        self.task = task
        self.rng = rng or random.Random()
        self.clock = clock
        self.share = config.student_share
        self.shadow_rate = config.shadow_sample_rate
        self.mode = config.mode
        self.threshold = config.cascade.threshold
        self.cascade = Cascade()
        self.savings = Savings(prices or CostConfig())
        self.drift = Drift(config.drift, task, reference_labels, config.drift.reference_deferral_rate)
        # The gateway's own time per request (its handler minus the arms' time): this replica's, not persisted.
        self.overhead: deque[float] = deque(maxlen=config.stats_window)
        self.stage = 0
        self.arms = {arm: ArmStats(config.stats_window) for arm in ARMS}
        self.routed = Counter()  # routed-model requests per arm (the A/B split actually served)
        self.outcomes: deque[bool] = deque(maxlen=config.error_window)  # True: the request failed
        self.comparisons: deque[Comparison] = deque(maxlen=config.agreement_window)  # judged ones only
        self.student_latencies: deque[float] = deque(maxlen=config.latency_window)
        self.shadow = Counter()  # SHADOW_OUTCOMES
        self.shadow_in_flight = 0
        self.unparsable = 0  # routed student answers of a label task that name no label
        self.stale = Counter()  # STALE_KINDS: results that arrived after the stage they were routed in
        self.rollbacks = 0
        self.firings = Counter()  # rollbacks per rule
        self.events: deque[dict] = deque(maxlen=config.max_events)
        self.revision = 0

    # -- routing ----------------------------------------------------------------------------------------------
    def choose_arm(self, user: Optional[str]) -> str:
        if self.share <= 0.0:
            return TEACHER
        if self.share >= 1.0:
            return STUDENT
        draw = user_fraction(user) if (user and self.config.sticky) else self.rng.random()
        return STUDENT if draw < self.share else TEACHER

    def route(self, user: Optional[str]) -> Route:
        """The arm for a request to the routed model, stamped with the current stage; in cascade mode the
        student's share is cascaded."""
        arm = self.choose_arm(user)
        return Route(arm, self.stage, cascade=arm == STUDENT and self.mode == CASCADE)

    def _new_stage(self, event: dict) -> None:
        """Evidence gathered at the old share (or before a rollback) must not judge the next stage."""
        self.stage += 1
        event["stage"] = self.stage
        self.outcomes.clear()
        self.comparisons.clear()
        self.student_latencies.clear()
        self.events.append(event)
        self.revision += 1

    def set_share(self, share: float, reason: str, shadow_rate: Optional[float] = None,
                  by: Optional[str] = None) -> dict:
        """Change the student's share (staged rollout or manual rollback); starts a new stage. `by`: who."""
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"student_share must be within [0, 1], got {share}")
        if shadow_rate is not None and not 0.0 <= shadow_rate <= 1.0:
            raise ValueError(f"shadow_sample_rate must be within [0, 1], got {shadow_rate}")
        event = {"time": self.clock(), "kind": "share_change", "from": self.share, "to": share, "reason": reason,
                 "by": by}
        self.share = share
        if shadow_rate is not None:
            event["shadow_sample_rate"] = shadow_rate
            self.shadow_rate = shadow_rate
        self._new_stage(event)
        log.info("student share %.3f -> %.3f (%s, by %s), stage %d", event["from"], share, reason, by, self.stage)
        return event

    def set_cascade(self, mode: Optional[str] = None, threshold: Optional[float] = None, reason: str = "admin",
                    by: Optional[str] = None) -> dict:
        """Change the mode and/or the cascade threshold (None: keep it); starts a new stage, since the kept
        share the windows judge is another one, and a new deferral window. ValueError for a bad change."""
        mode = self.mode if mode is None else mode
        threshold = self.threshold if threshold is None else threshold
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if threshold is not None:
            check_threshold(self.task, threshold)
        if mode == CASCADE and threshold is None:
            raise ValueError("cascade mode needs a threshold: give one (none is configured)")
        event = {"time": self.clock(), "kind": "cascade_change", "from": {"mode": self.mode, "threshold": self.threshold},
                 "to": {"mode": mode, "threshold": threshold}, "reason": reason, "by": by}
        self.mode, self.threshold = mode, threshold
        self.drift.clear_deferrals()
        self._new_stage(event)
        log.info("mode %s, threshold %s (%s, by %s), stage %d", mode, threshold, reason, by, self.stage)
        return event

    # -- recording --------------------------------------------------------------------------------------------
    def _in_window(self, route: Route, kind: str) -> bool:
        """Does this result feed the rollback windows? Only routed student traffic of the current stage does."""
        if route.arm != STUDENT or route.stage is None:
            return False
        if route.stage != self.stage:
            self.stale[kind] += 1
            return False
        return True

    def names_no_label(self, answer: str) -> bool:
        """A label task's answer that does not parse as one of its labels (a failure, like a 5xx)."""
        return self.task.answer.type == "labels" and self.task.label_of(self.task.parse(answer).answer) is None

    def record_request(self, route: Route, latency_s: float, prompt_tokens: int, completion_tokens: int,
                       answer: str, cached_tokens: int = 0) -> Optional[dict]:
        """One answered request (`answer`: its visible text). Returns the rollback event if it caused one."""
        self.arms[route.arm].record(latency_s, prompt_tokens, completion_tokens)
        tokens = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "cached_tokens": cached_tokens}
        teacher_usd = self.savings.teacher_answer(tokens) if route.arm == TEACHER else None
        if route.stage is not None:
            self.routed[route.arm] += 1
            self.savings.routed(route.arm, tokens if route.arm == STUDENT else None, teacher_usd)
            self.drift.observe_label(answer)
            self._check_drift()
        self.revision += 1  # the savings and drift state changed
        if not self._in_window(route, "answer"):
            return None
        failed = self.names_no_label(answer)
        self.unparsable += failed
        self.outcomes.append(failed)
        self.student_latencies.append(latency_s)
        return self.check_rollback()

    def record_error(self, route: Route, status: int) -> Optional[dict]:
        """A request that failed with HTTP `status`. Only 5xx count against the student: a 4xx is the client's."""
        self.arms[route.arm].errors[status] += 1
        if status < 500 or not self._in_window(route, "error"):
            return None
        self.outcomes.append(True)
        self.revision += 1
        return self.check_rollback()

    # -- the cascade ------------------------------------------------------------------------------------------
    def cascade_decision(self, student: dict) -> tuple[bool, str]:
        """(keep the student's answer, why) for a cascaded request the student answered."""
        if self.names_no_label(student["text"]):
            return False, "no_label"
        if student.get("confidence") is None:
            return False, "no_confidence"
        if not keeps(student["confidence"], self.threshold):  # the report's rule (distill.selective)
            return False, "low_confidence"
        return True, "confident"

    def record_cascade(self, route: Route, student: Optional[dict], student_status: Optional[int],
                       student_latency_s: float, kept: bool, reason: str, teacher: Optional[dict] = None,
                       teacher_status: Optional[int] = None, teacher_latency_s: Optional[float] = None
                       ) -> Optional[dict]:
        """One cascaded request, once it is over: the student's result (None: it failed with `student_status`, a
        5xx), the decision, and for a deferred request the teacher's result (None: it failed with
        `teacher_status`, and the client got that error). Returns the rollback event if it caused one."""
        if student is not None:
            self.arms[STUDENT].record(student_latency_s, student["prompt_tokens"], student["completion_tokens"])
        else:
            self.arms[STUDENT].errors[student_status] += 1
        teacher_usd = None
        if teacher is not None:
            self.arms[TEACHER].record(teacher_latency_s, teacher["prompt_tokens"], teacher["completion_tokens"])
            teacher_usd = self.savings.teacher_answer(teacher)
        elif teacher_status is not None:
            self.arms[TEACHER].errors[teacher_status] += 1
        self.cascade.record(kept, reason, teacher_failed=not kept and teacher is None)
        answered_by = STUDENT if kept else TEACHER if teacher is not None else None
        self.savings.routed(answered_by, student, teacher_usd)
        if answered_by is not None:
            self.routed[answered_by] += 1
            self.drift.observe_label((student if kept else teacher)["text"])
        self.drift.observe_deferral(not kept)
        if not kept and student is not None and teacher is not None:
            Cascade.count(self.cascade.deferred_comparisons, compare(self.task, teacher["text"], student["text"]))
        self._check_drift()
        self.revision += 1
        if not self._in_window(route, "answer" if student is not None else "error"):
            return None
        # The windows judge the kept share: its latency, and the student's failures among what it kept or failed.
        # An answer deferred for low confidence is neither kept nor a failure.
        if reason == "no_label":
            self.unparsable += 1
        if student is None or reason == "no_label":
            self.outcomes.append(True)
        elif kept:
            self.outcomes.append(False)
            self.student_latencies.append(student_latency_s)
        return self.check_rollback()

    def record_overhead(self, seconds: float) -> None:
        self.overhead.append(seconds)

    def _check_drift(self) -> None:
        for event in self.drift.check(self.clock):
            self.events.append(event)

    # -- shadow -----------------------------------------------------------------------------------------------
    def should_shadow(self) -> bool:
        """Decide whether a student-served routed request is also sent to the teacher; reserves a slot."""
        if self.shadow_rate <= 0.0 or self.rng.random() >= self.shadow_rate:
            return False
        if self.shadow_in_flight >= self.config.max_shadow_in_flight:
            self.shadow["skipped"] += 1
            return False
        self.shadow_in_flight += 1
        return True

    def record_shadow(self, stage: int, teacher_visible: Optional[str], student_visible: str,
                      teacher_tokens: Optional[dict] = None) -> Optional[dict]:
        """The teacher's shadow answer to a request routed in `stage` arrived (None: the shadow call failed;
        `teacher_tokens`: its token counts, which the shadow cost). Returns a rollback event if any."""
        self.shadow_in_flight -= 1
        if teacher_tokens is not None:
            self.savings.teacher_answer(teacher_tokens, shadow=True)
            self.revision += 1
        if teacher_visible is None:
            self.shadow["failed"] += 1
            return None
        if not self._in_window(Route(STUDENT, stage), "shadow"):
            return None
        comparison = compare(self.task, teacher_visible, student_visible)
        if self.mode == CASCADE:  # in cascade mode only kept answers are shadowed
            Cascade.count(self.cascade.kept_comparisons, comparison)
        if comparison.agree is None:
            self.shadow["unjudged"] += 1
            return None
        self.shadow["agree" if comparison.agree else "disagree"] += 1
        self.comparisons.append(comparison)
        self.revision += 1
        return self.check_rollback()

    # -- rollback ---------------------------------------------------------------------------------------------
    def readings(self) -> dict[str, RuleReading]:
        cfg = self.config
        labels = self.task.answer.type == "labels"
        judged = len(self.comparisons)
        return {
            "error_rate": RuleReading("error_rate", _mean(self.outcomes), cfg.max_error_rate, len(self.outcomes),
                                      cfg.min_error_samples, fires_above=True),
            "agreement": RuleReading("agreement", agreement_rate(self.comparisons)["rate"],
                                     cfg.min_agreement if labels else None, judged, cfg.min_agreement_samples,
                                     fires_above=False),
            "similarity": RuleReading("similarity", mean_similarity(self.comparisons),
                                      None if labels else cfg.min_similarity, judged, cfg.min_agreement_samples,
                                      fires_above=False),
            "latency_p95": RuleReading("latency_p95", quantile(self.student_latencies, 0.95), cfg.max_student_p95_s,
                                       len(self.student_latencies), cfg.min_latency_samples, fires_above=True),
        }

    def check_rollback(self) -> Optional[dict]:
        if self.share <= 0.0:
            return None
        readings = self.readings()
        fired = next((r for r in readings.values() if r.fires), None)
        if fired is None:
            return None
        event = {"time": self.clock(), "kind": "rollback", "rule": fired.rule, "from": self.share, "to": 0.0,
                 "reason": fired.reason(), "value": fired.value, "limit": fired.limit, "samples": fired.samples,
                 "readings": {name: r.as_dict() for name, r in readings.items()}}
        self.share = 0.0
        self.rollbacks += 1
        self.firings[fired.rule] += 1
        self._new_stage(event)
        log.warning("ROLLBACK (%s): student share %.3f -> 0: %s", fired.rule, event["from"], event["reason"])
        return event

    # -- persistence ------------------------------------------------------------------------------------------
    def to_state(self) -> dict:
        """What a restarted gateway needs to carry on: JSON-ready. The per-arm counters and the gateway overhead
        are left out on purpose: they are this replica's, and Prometheus counters restart with the process. The
        mode, the threshold and the cascade's, savings' and drift's counters and windows are the rollout's."""
        return {
            "share": self.share, "shadow_sample_rate": self.shadow_rate, "stage": self.stage,
            "rollbacks": self.rollbacks, "firings": dict(self.firings), "events": list(self.events),
            "outcomes": list(self.outcomes), "student_latencies": list(self.student_latencies),
            "comparisons": [[c.agree, c.similarity] for c in self.comparisons],
            "shadow": dict(self.shadow), "unparsable": self.unparsable, "stale": dict(self.stale),
            "mode": self.mode, "threshold": self.threshold, "cascade": self.cascade.to_state(),
            "savings": self.savings.to_state(), "drift": self.drift.to_state(), "routed": dict(self.routed),
        }

    def load_state(self, state: dict) -> None:
        """Resume from `to_state()` output (windows keep their newest entries if the config shrank them)."""
        self.share = state["share"]
        self.shadow_rate = state["shadow_sample_rate"]
        self.stage = state["stage"]
        self.rollbacks = state["rollbacks"]
        self.firings = Counter(state["firings"])
        self.events.extend(state["events"])
        self.outcomes.extend(state["outcomes"])
        self.student_latencies.extend(state["student_latencies"])
        self.comparisons.extend(Comparison(agree, similarity, None, None)
                                for agree, similarity in state["comparisons"])
        self.shadow = Counter(state["shadow"])
        self.unparsable = state["unparsable"]
        self.stale = Counter(state["stale"])
        # State saved before the cascade existed resumes in this config's mode, with fresh cascade counters.
        if "mode" in state:
            self.mode, self.threshold = state["mode"], state["threshold"]
            self.cascade.load_state(state["cascade"])
            self.savings.load_state(state["savings"])
            self.drift.load_state(state["drift"])
            self.routed = Counter(state["routed"])
        self.revision += 1

    # -- reporting --------------------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        readings = self.readings()
        return {
            "student_share": self.share,
            "shadow_sample_rate": self.shadow_rate,
            "stage": self.stage,
            "arms": {arm: stats.snapshot() for arm, stats in self.arms.items()},
            "routed": {arm: self.routed[arm] for arm in ARMS},
            "agreement": {
                "live": readings["agreement"].value,
                "similarity": readings["similarity"].value,
                "window": len(self.comparisons),
                "window_size": self.config.agreement_window,
                "min_agreement": self.config.min_agreement,
                "min_similarity": self.config.min_similarity,
                "shadow": {k: self.shadow[k] for k in SHADOW_OUTCOMES},
                "shadow_in_flight": self.shadow_in_flight,
            },
            "rules": {name: r.as_dict() for name, r in readings.items()},
            "student_unparsable": self.unparsable,
            "stale": {k: self.stale[k] for k in STALE_KINDS},
            "student_p95_window_s": readings["latency_p95"].value,
            "max_student_p95_s": self.config.max_student_p95_s,
            "rollbacks": self.rollbacks,
            "rollbacks_by_rule": {rule: self.firings[rule] for rule in RULES},
            "mode": self.mode,
            "cascade": {"threshold": self.threshold, **self.cascade.snapshot()},
            "cost": self.savings.snapshot(),
            "drift": self.drift.readings(),
            "gateway_overhead_s": {"p50": quantile(self.overhead, 0.5), "p95": quantile(self.overhead, 0.95),
                                   "samples": len(self.overhead)},
            "events": list(self.events),
        }

    def prometheus(self, prefix: str = "distill") -> str:
        """The same numbers in the Prometheus text exposition format (for GET /metrics)."""
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> None:
            lines.append(f"# HELP {prefix}_{name} {help_text}")
            lines.append(f"# TYPE {prefix}_{name} {kind}")
            for labels, value in samples:
                label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
                lines.append(f"{prefix}_{name}{{{label_text}}} {_number(value)}" if label_text
                             else f"{prefix}_{name} {_number(value)}")

        metric("requests_total", "counter", "Answered requests per arm.",
               [({"arm": a}, s.requests) for a, s in self.arms.items()])
        metric("routed_requests_total", "counter", "Requests to the routed model, per arm that served them.",
               [({"arm": a}, self.routed[a]) for a in ARMS])
        metric("errors_total", "counter", "Failed requests per arm and HTTP status.",
               [({"arm": a, "status": str(code)}, n) for a, s in self.arms.items() for code, n in
                sorted(s.errors.items())])
        metric("tokens_total", "counter", "Prompt and completion tokens per arm.",
               [({"arm": a, "kind": kind}, getattr(s, f"{kind}_tokens")) for a, s in self.arms.items()
                for kind in ("prompt", "completion")])
        samples = []
        for a, s in self.arms.items():
            for q in (0.5, 0.95):
                value = quantile(s.latencies, q)
                samples.append(({"arm": a, "quantile": str(q)}, _or_nan(value)))
        lines.append(f"# HELP {prefix}_latency_seconds End-to-end request latency at the gateway per arm.")
        lines.append(f"# TYPE {prefix}_latency_seconds summary")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"{prefix}_latency_seconds{{{label_text}}} {_number(value)}")
        for a, s in self.arms.items():
            lines.append(f'{prefix}_latency_seconds_sum{{arm="{a}"}} {_number(s.latency_sum)}')
            lines.append(f'{prefix}_latency_seconds_count{{arm="{a}"}} {s.requests}')
        metric("student_share", "gauge", "Current fraction of routed traffic served by the student.",
               [({}, self.share)])
        metric("rollout_stage", "gauge", "Rollout stage: grows with every share change and rollback.",
               [({}, self.stage)])
        readings = self.readings()
        metric("shadow_agreement", "gauge", "Live teacher/student agreement over the shadow window (NaN: none).",
               [({}, _or_nan(readings["agreement"].value))])
        metric("shadow_comparisons_total", "counter", "Shadow requests by outcome.",
               [({"result": k}, self.shadow[k]) for k in SHADOW_OUTCOMES])
        metric("rollout_rule_value", "gauge", "Each rollback rule's value over its window (NaN: no samples).",
               [({"rule": name}, _or_nan(r.value)) for name, r in readings.items()])
        metric("rollout_rule_limit", "gauge", "Each rollback rule's limit (NaN: the rule is off).",
               [({"rule": name}, _or_nan(r.limit)) for name, r in readings.items()])
        metric("rollout_rule_samples", "gauge", "Samples in each rollback rule's window.",
               [({"rule": name}, r.samples) for name, r in readings.items()])
        metric("student_unparsable_total", "counter", "Routed student answers of a label task that name no label.",
               [({}, self.unparsable)])
        metric("stale_results_total", "counter", "Results kept out of the windows: they arrived after their stage.",
               [({"kind": k}, self.stale[k]) for k in STALE_KINDS])
        metric("rollbacks_total", "counter", "Automatic rollbacks of the student share to 0.", [({}, self.rollbacks)])
        metric("rollback_firings_total", "counter", "Automatic rollbacks per rule that fired.",
               [({"rule": rule}, self.firings[rule]) for rule in RULES])
        metric("cascade_mode", "gauge", "1 for the routed model's current mode.",
               [({"mode": m}, int(m == self.mode)) for m in MODES])
        metric("cascade_threshold", "gauge", "The cascade's confidence threshold (NaN: none).",
               [({}, _or_nan(self.threshold))])
        cascade = self.cascade.snapshot()
        metric("cascade_requests_total", "counter", "Cascaded requests by outcome.",
               [({"outcome": "kept"}, cascade["kept"])]
               + [({"outcome": f"deferred_{r}"}, cascade["deferred_by_reason"][r]) for r in DEFER_REASONS]
               + [({"outcome": "failed"}, cascade["failed"])])
        metric("cascade_deferral_rate", "gauge", "Fraction of cascaded requests sent on to the teacher (NaN: none).",
               [({}, _or_nan(cascade["deferral_rate"]))])
        metric("cascade_kept_agreement", "gauge", "Agreement of the kept answers with the teacher, from shadow "
               "comparisons (NaN: none judged).", [({}, _or_nan(cascade["kept_agreement"]))])
        cost = self.savings.snapshot()
        metric("cost_usd", "counter", "Dollars spent on the routed model, per part, at the configured prices.",
               [({"part": p}, cost[f"{p}_usd"]) for p in ("student", "teacher", "shadow")])
        metric("cost_teacher_only_usd", "gauge", "What the routed traffic would have cost on the teacher alone "
               "(NaN: unknown yet).", [({}, _or_nan(cost["teacher_only_usd"]))])
        metric("cost_saved_usd", "gauge", "Teacher-only cost minus what was spent (NaN: unknown yet).",
               [({}, _or_nan(cost["saved_usd"]))])
        drift = self.drift.readings()
        metric("drift_psi", "gauge", "Population stability index of the live distribution against its reference "
               "(NaN: off or no samples).", [({"signal": s}, _or_nan(drift[s]["psi"])) for s in DRIFT_SIGNALS])
        metric("drift_samples", "gauge", "Samples in each drift window.",
               [({"signal": s}, drift[s]["samples"]) for s in DRIFT_SIGNALS])
        metric("drift_limit", "gauge", "The PSI above which drift is recorded.", [({}, self.config.drift.max_psi)])
        metric("drift_events_total", "counter", "Drift events (\"re-distill recommended\") per signal.",
               [({"signal": s}, drift[s]["events"]) for s in DRIFT_SIGNALS])
        metric("gateway_overhead_seconds", "gauge", "The gateway's own time per request (its handler minus the "
               "arms' time), over its recent requests (NaN: none).",
               [({"quantile": str(q)}, _or_nan(quantile(self.overhead, q))) for q in (0.5, 0.95)])
        return "\n".join(lines) + "\n"


def _or_nan(value: Optional[float]) -> float:
    return float("nan") if value is None else value


def _number(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return repr(float(value)) if isinstance(value, float) else str(value)
