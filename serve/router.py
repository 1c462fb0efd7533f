"""A/B rollout of the student against the teacher: arm choice, shadow agreement, automatic rollback and stats.

Plain Python with no Ray or vLLM in it, so every rule here is unit-tested on its own; the Serve gateway
(`serve/app.py`) owns one `Rollout` and calls it for every request.

- Arm choice: with a user id, a hash of it decides the arm, so a user keeps the same arm at a given share and a
  user who got the student at 1 % keeps it at 10, 50 and 100 % (the hash threshold only grows). Without one,
  each request draws independently.
- Shadow: a sample of the student-served routed requests is also sent to the teacher in the background; the
  two answers are compared (label of each for label tasks, normalised exact match for free text).
- Rollback: when agreement over the last `agreement_window` comparisons, or the student's p95 latency over its
  last `latency_window` requests, breaks its limit, the share goes to 0 and the event is logged and kept.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import re
import time
import unicodedata
from collections import Counter, deque
from typing import Iterable, Optional

from pydantic import Field

from distill.config import StrictModel
from distill.metrics import percentile
from distill.tasks import TaskSpec

log = logging.getLogger("distill.serve.rollout")

TEACHER, STUDENT = "teacher", "student"
ARMS = (TEACHER, STUDENT)


class RolloutConfig(StrictModel):
    student_share: float = Field(
        0.01, ge=0.0, le=1.0, description="Fraction of the routed model's traffic the student serves at start "
        "(staged rollout: 0.01 -> 0.1 -> 0.5 -> 1.0; change it at runtime with POST /admin/share).")
    sticky: bool = Field(True, description="Requests that carry a user id always get the same arm for a share.")
    user_header: str = Field("x-user-id", description="Header read for the user id when the body has no `user`.")
    shadow_sample_rate: float = Field(
        0.1, ge=0.0, le=1.0, description="Fraction of student-served routed requests also sent to the teacher "
        "in the background to measure live agreement (0: shadow off).")
    max_shadow_in_flight: int = Field(
        8, ge=1, description="Shadow requests waiting on the teacher at once; more are skipped (and counted) so "
        "that shadowing never queues up behind production traffic.")
    agreement_window: int = Field(200, ge=1, description="Shadow comparisons that live agreement is computed over.")
    min_agreement_samples: int = Field(
        50, ge=1, description="Comparisons needed in the window before agreement can trigger a rollback.")
    min_agreement: float = Field(
        0.9, ge=0.0, le=1.0, description="Roll back when live agreement over the window falls below this.")
    latency_window: int = Field(200, ge=1, description="Student requests its rollback p95 latency is computed over.")
    min_latency_samples: int = Field(
        20, ge=1, description="Student requests needed in the window before latency can trigger a rollback.")
    max_student_p95_s: Optional[float] = Field(
        10.0, gt=0, description="Roll back when the student's p95 latency (seconds, end to end at the gateway) "
        "exceeds this; null turns the latency rule off.")
    stats_window: int = Field(2048, ge=16, description="Latencies per arm kept for the p50/p95 in /stats.")
    max_events: int = Field(100, ge=1, description="Rollout events (share changes, rollbacks) kept for /stats.")


def user_fraction(user: str) -> float:
    """A stable number in [0, 1) for a user id: the same on every replica and every restart (no Python hash
    randomisation), and uniform enough that a share of s puts about s of the users on the student."""
    digest = hashlib.sha256(user.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def quantile(values: Iterable[float], q: float) -> Optional[float]:
    """Linear-interpolated quantile, q in 0..1 (distill.metrics.percentile), None for no values."""
    return percentile(list(values), 100 * q)


_PUNCT_EDGES = re.compile(r"^[\W_]+|[\W_]+$", re.UNICODE)


def normalise(text: str) -> str:
    """Free-text comparison key: Unicode NFKC, case-folded, whitespace collapsed, edge punctuation dropped."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = " ".join(text.split())
    return _PUNCT_EDGES.sub("", text)


def agreement(task: TaskSpec, teacher_visible: str, student_visible: str) -> Optional[bool]:
    """Do the two visible answers agree? None when the teacher's answer cannot be judged (no parseable label):
    such a sample says nothing about the student and must not move the agreement either way."""
    if task.answer.type == "labels":
        teacher_label = task.label_of(task.parse(teacher_visible).answer)
        if teacher_label is None:
            return None
        return task.label_of(task.parse(student_visible).answer) == teacher_label
    teacher_key = normalise(teacher_visible)
    if not teacher_key:
        return None
    return normalise(student_visible) == teacher_key


class ArmStats:
    """Counters and a latency window for one arm."""

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
    """The live state of one teacher/student rollout. Single-threaded use (one asyncio loop) is assumed."""

    def __init__(self, config: RolloutConfig, task: TaskSpec, rng: Optional[random.Random] = None,
                 clock=time.time):
        self.config = config
        self.task = task
        self.rng = rng or random.Random()
        self.clock = clock
        self.share = config.student_share
        self.shadow_rate = config.shadow_sample_rate
        self.arms = {arm: ArmStats(config.stats_window) for arm in ARMS}
        self.routed = Counter()  # routed-model requests per arm (the A/B split actually served)
        self.agreements: deque[bool] = deque(maxlen=config.agreement_window)
        self.student_latencies: deque[float] = deque(maxlen=config.latency_window)
        self.shadow = Counter()  # agree / disagree / unjudged / skipped / failed
        self.shadow_in_flight = 0
        self.rollbacks = 0
        self.events: deque[dict] = deque(maxlen=config.max_events)

    # -- routing ----------------------------------------------------------------------------------------------
    def choose_arm(self, user: Optional[str]) -> str:
        if self.share <= 0.0:
            return TEACHER
        if self.share >= 1.0:
            return STUDENT
        draw = user_fraction(user) if (user and self.config.sticky) else self.rng.random()
        return STUDENT if draw < self.share else TEACHER

    def set_share(self, share: float, reason: str, shadow_rate: Optional[float] = None) -> dict:
        """Change the student's share (staged rollout or manual rollback). The agreement and latency windows
        start over: evidence gathered at the old share (or before a rollback) must not judge the new stage."""
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"student_share must be within [0, 1], got {share}")
        if shadow_rate is not None and not 0.0 <= shadow_rate <= 1.0:
            raise ValueError(f"shadow_sample_rate must be within [0, 1], got {shadow_rate}")
        event = {"time": self.clock(), "kind": "share_change", "from": self.share, "to": share, "reason": reason}
        self.share = share
        if shadow_rate is not None:
            event["shadow_sample_rate"] = shadow_rate
            self.shadow_rate = shadow_rate
        self.agreements.clear()
        self.student_latencies.clear()
        self.events.append(event)
        log.info("student share %.3f -> %.3f (%s)", event["from"], share, reason)
        return event

    # -- recording --------------------------------------------------------------------------------------------
    def record_request(self, arm: str, latency_s: float, prompt_tokens: int, completion_tokens: int,
                       routed: bool) -> Optional[dict]:
        """One answered request. Returns the rollback event if this request's latency caused one."""
        self.arms[arm].record(latency_s, prompt_tokens, completion_tokens)
        if routed:
            self.routed[arm] += 1
        if arm == STUDENT:
            self.student_latencies.append(latency_s)
            return self.check_rollback()
        return None

    def record_error(self, arm: Optional[str], status: int) -> None:
        if arm in self.arms:
            self.arms[arm].errors[status] += 1

    def should_shadow(self) -> bool:
        """Decide whether a student-served routed request is also sent to the teacher; reserves a slot."""
        if self.shadow_rate <= 0.0 or self.rng.random() >= self.shadow_rate:
            return False
        if self.shadow_in_flight >= self.config.max_shadow_in_flight:
            self.shadow["skipped"] += 1
            return False
        self.shadow_in_flight += 1
        return True

    def record_shadow(self, teacher_visible: Optional[str], student_visible: str) -> Optional[dict]:
        """The teacher's shadow answer arrived (None: the shadow call failed). Returns a rollback event if any."""
        self.shadow_in_flight -= 1
        if teacher_visible is None:
            self.shadow["failed"] += 1
            return None
        agree = agreement(self.task, teacher_visible, student_visible)
        if agree is None:
            self.shadow["unjudged"] += 1
            return None
        self.shadow["agree" if agree else "disagree"] += 1
        self.agreements.append(agree)
        return self.check_rollback()

    # -- rollback ---------------------------------------------------------------------------------------------
    def live_agreement(self) -> Optional[float]:
        return sum(self.agreements) / len(self.agreements) if self.agreements else None

    def student_p95(self) -> Optional[float]:
        return quantile(self.student_latencies, 0.95)

    def check_rollback(self) -> Optional[dict]:
        if self.share <= 0.0:
            return None
        cfg = self.config
        reason = None
        if len(self.agreements) >= cfg.min_agreement_samples:
            live = self.live_agreement()
            if live < cfg.min_agreement:
                reason = (f"live agreement {live:.3f} over the last {len(self.agreements)} shadow comparisons "
                          f"is below {cfg.min_agreement}")
        if reason is None and cfg.max_student_p95_s is not None \
                and len(self.student_latencies) >= cfg.min_latency_samples:
            p95 = self.student_p95()
            if p95 > cfg.max_student_p95_s:
                reason = (f"student p95 latency {p95:.3f}s over its last {len(self.student_latencies)} requests "
                          f"exceeds {cfg.max_student_p95_s}s")
        if reason is None:
            return None
        event = {"time": self.clock(), "kind": "rollback", "from": self.share, "to": 0.0, "reason": reason,
                 "agreement": self.live_agreement(), "student_p95_s": self.student_p95()}
        self.share = 0.0
        self.rollbacks += 1
        self.agreements.clear()
        self.student_latencies.clear()
        self.events.append(event)
        log.warning("ROLLBACK: student share %.3f -> 0: %s", event["from"], reason)
        return event

    # -- reporting --------------------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        return {
            "student_share": self.share,
            "shadow_sample_rate": self.shadow_rate,
            "arms": {arm: stats.snapshot() for arm, stats in self.arms.items()},
            "routed": {arm: self.routed[arm] for arm in ARMS},
            "agreement": {
                "live": self.live_agreement(),
                "window": len(self.agreements),
                "window_size": self.config.agreement_window,
                "min_agreement": self.config.min_agreement,
                "shadow": {k: self.shadow[k] for k in ("agree", "disagree", "unjudged", "skipped", "failed")},
                "shadow_in_flight": self.shadow_in_flight,
            },
            "student_p95_window_s": self.student_p95(),
            "max_student_p95_s": self.config.max_student_p95_s,
            "rollbacks": self.rollbacks,
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
                samples.append(({"arm": a, "quantile": str(q)}, value if value is not None else float("nan")))
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
        live = self.live_agreement()
        metric("shadow_agreement", "gauge", "Live teacher/student agreement over the shadow window (NaN: none).",
               [({}, live if live is not None else float("nan"))])
        metric("shadow_comparisons_total", "counter", "Shadow requests by outcome.",
               [({"result": k}, self.shadow[k]) for k in ("agree", "disagree", "unjudged", "skipped", "failed")])
        metric("rollbacks_total", "counter", "Automatic rollbacks of the student share to 0.", [({}, self.rollbacks)])
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return repr(float(value)) if isinstance(value, float) else str(value)
