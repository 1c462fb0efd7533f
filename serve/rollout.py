"""A/B rollout of the student against the teacher: arm choice, shadow comparison, automatic rollback and stats.

Plain Python with no Ray or vLLM in it, so every rule here is unit-tested on its own; the Serve gateway
(`serve/gateway.py`) owns one `Rollout`, calls it for every request and persists its state (`serve/state.py`).

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
- Rollback: when one rule (serve/rollout_rules.py) breaks its limit over its window, the share goes to 0 and the
  event is logged, kept, counted per rule and exposed in /stats and /metrics (serve/metrics.py).
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Optional

from distill.agreement import Comparison, compare
from distill.cost import CostConfig
from distill.inputs import unit_hash
from distill.metrics import quantile
from distill.selective import keeps
from distill.tasks import TaskSpec
from serve.config import RolloutConfig
from serve.arm_messages import ArmAnswer, TokenCounts
from serve.metrics import ArmStats
from serve.rollout_rules import RULES, RuleReading, rule_readings
from serve.selective import CASCADE, MODES, Cascade, Drift, Savings, check_threshold

log = logging.getLogger("distill.serve.rollout")

TEACHER, STUDENT = "teacher", "student"
ARMS = (TEACHER, STUDENT)
SHADOW_OUTCOMES = ("agree", "disagree", "unjudged", "skipped", "failed")
STALE_KINDS = ("answer", "error", "shadow")


def user_fraction(user: str) -> float:
    """A stable number in [0, 1) for a user id: the same on every replica and every restart (no Python hash
    randomisation), and uniform enough that a share of s puts about s of the users on the student."""
    return unit_hash(user)


@dataclass(frozen=True)
class Route:
    """The arm that serves a request and, for the routed model, the stage it was routed in (None: a direct
    request to a model by name, which never feeds the rollback windows); `cascade`: the student answers only if
    it is confident enough, else the teacher does."""
    arm: str
    stage: Optional[int] = None
    cascade: bool = False


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
        tokens = TokenCounts(prompt_tokens, completion_tokens, cached_tokens)
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
    def cascade_decision(self, student: ArmAnswer) -> tuple[bool, str]:
        """(keep the student's answer, why) for a cascaded request the student answered."""
        if self.names_no_label(student.text):
            return False, "no_label"
        if student.confidence is None:
            return False, "no_confidence"
        if not keeps(student.confidence, self.threshold):  # the report's rule (distill.selective)
            return False, "low_confidence"
        return True, "confident"

    def record_cascade(self, route: Route, student: Optional[ArmAnswer], student_status: Optional[int],
                       student_latency_s: float, kept: bool, reason: str, teacher: Optional[ArmAnswer] = None,
                       teacher_status: Optional[int] = None, teacher_latency_s: Optional[float] = None
                       ) -> Optional[dict]:
        """One cascaded request, once it is over: the student's result (None: it failed with `student_status`, a
        5xx), the decision, and for a deferred request the teacher's result (None: it failed with
        `teacher_status`, and the client got that error). Returns the rollback event if it caused one."""
        if student is not None:
            self.arms[STUDENT].record(student_latency_s, student.prompt_tokens, student.completion_tokens)
        else:
            self.arms[STUDENT].errors[student_status] += 1
        teacher_usd = None
        if teacher is not None:
            self.arms[TEACHER].record(teacher_latency_s, teacher.prompt_tokens, teacher.completion_tokens)
            teacher_usd = self.savings.teacher_answer(teacher.tokens)
        elif teacher_status is not None:
            self.arms[TEACHER].errors[teacher_status] += 1
        self.cascade.record(kept, reason, teacher_failed=not kept and teacher is None)
        answered_by = STUDENT if kept else TEACHER if teacher is not None else None
        self.savings.routed(answered_by, student and student.tokens, teacher_usd)
        if answered_by is not None:
            self.routed[answered_by] += 1
            self.drift.observe_label((student if kept else teacher).text)
        self.drift.observe_deferral(not kept)
        if not kept and student is not None and teacher is not None:
            Cascade.count(self.cascade.deferred_comparisons, compare(self.task, teacher.text, student.text))
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
                      teacher_tokens: Optional[ArmAnswer] = None) -> Optional[dict]:
        """The teacher's shadow answer to a request routed in `stage` arrived (None: the shadow call failed;
        `teacher_tokens`: its token counts, which the shadow cost). Returns a rollback event if any."""
        self.shadow_in_flight -= 1
        if teacher_tokens is not None:
            self.savings.teacher_answer(teacher_tokens.tokens, shadow=True)
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
        return rule_readings(self.config, self.task, self.outcomes, self.comparisons, self.student_latencies)

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
