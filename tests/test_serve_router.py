"""Fast unit tests of the rollout rules, the wire format and the serve config (no Ray, no vLLM)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random

import pytest
from pydantic import ValidationError

from distill.agreement import agreement_rate, compare, mean_similarity, normalize
from distill.config import ConfigError
from distill.tasks import load_task, split_reasoning
from serve.arm_messages import ArmAnswer
from serve.arms import teacher_conversation
from distill.engine import adapter_rank, vllm_max_lora_rank
from serve.config import ServeConfig
from serve.protocol import ChatRequest, ThinkSplitter, validation_message
from distill.metrics import quantile
from serve.config import RolloutConfig, check_rules
from serve.metrics import prometheus_text
from serve.rollout import STUDENT, TEACHER, Rollout, Route, user_fraction
from serve.state import UriStateStore

LANGID = load_task("language-id")
PERSONA = load_task("persona")


def rollout(**overrides) -> Rollout:
    return Rollout(RolloutConfig(**overrides), LANGID, rng=random.Random(0), clock=lambda: 1000.0)


# -- arm choice --------------------------------------------------------------------------------------------------
def test_user_fraction_is_stable_and_uniform():
    assert user_fraction("alice") == user_fraction("alice")
    fractions = [user_fraction(f"user-{i}") for i in range(20_000)]
    assert all(0.0 <= f < 1.0 for f in fractions)
    for share in (0.01, 0.1, 0.5):
        assert abs(sum(f < share for f in fractions) / len(fractions) - share) < 0.01


def test_sticky_users_keep_their_arm_and_staged_rollout_only_adds_students():
    r = rollout(student_share=0.01)
    users = [f"u{i}" for i in range(5000)]
    on_student = set()
    for share in (0.01, 0.1, 0.5, 1.0):
        r.set_share(share, "stage")
        now = {u for u in users if r.choose_arm(u) == STUDENT}
        assert now == {u for u in users if r.choose_arm(u) == STUDENT}  # deterministic per user
        assert on_student <= now  # nobody who had the student goes back at a higher stage
        assert abs(len(now) / len(users) - share) < 0.03
        on_student = now


def test_requests_without_user_are_split_at_random():
    r = rollout(student_share=0.3)
    arms = [r.choose_arm(None) for _ in range(10_000)]
    assert abs(arms.count(STUDENT) / len(arms) - 0.3) < 0.02
    assert rollout(student_share=0.0).choose_arm("x") == TEACHER
    assert rollout(student_share=1.0).choose_arm("x") == STUDENT
    assert rollout(student_share=0.5, sticky=False).choose_arm("x") in (TEACHER, STUDENT)


# -- agreement ---------------------------------------------------------------------------------------------------
def test_shadow_answers_are_judged_by_the_shared_definition_of_agreement():
    """distill.agreement is the one definition (the report uses it too): labels for label tasks, normalised
    text for free text, unjudged when the teacher's own answer is unusable."""
    assert compare(LANGID, "Final Answer: en", "Final Answer: en").agree is True
    assert compare(LANGID, "Final Answer: en", "  Final Answer:   en  ").agree is True
    assert compare(LANGID, "<think>hmm</think>Final Answer: fr", "Final Answer: fr").agree is True
    assert compare(LANGID, "Final Answer: en", "Final Answer: fr").agree is False
    assert compare(LANGID, "Final Answer: en", "no idea").agree is False
    assert compare(LANGID, "garbage", "Final Answer: en").agree is None  # teacher unparseable: not judged
    assert compare(PERSONA, "Ahoy, matey!", "ahoy,   MATEY").agree is True
    assert compare(PERSONA, "Ahoy, matey!", "Hello friend").agree is False
    assert compare(PERSONA, "   ", "anything").agree is None
    assert normalize("  Ｈｅｌｌｏ,\n World!! ") == "hello, world"


def test_the_router_reports_the_numbers_the_shared_definition_gives():
    pairs = [(t, s) for t, s in PARAPHRASES + UNRELATED] + [("", "unjudged: the teacher said nothing")]
    r = Rollout(RolloutConfig(student_share=0.5, shadow_sample_rate=1.0, max_student_p95_s=None), PERSONA,
                rng=random.Random(0))
    for teacher, student in pairs:
        assert r.should_shadow()
        r.record_shadow(r.stage, teacher, student)
    comparisons = [compare(PERSONA, t, s) for t, s in pairs]
    snap = r.snapshot()["agreement"]
    assert snap["live"] == agreement_rate(comparisons)["rate"]
    assert snap["similarity"] == pytest.approx(mean_similarity(comparisons))
    assert snap["window"] == agreement_rate(comparisons)["judged"] and snap["shadow"]["unjudged"] == 1


def test_quantile_interpolates_like_numpy():
    assert quantile([], 0.5) is None
    assert quantile([3.0], 0.95) == 3.0
    assert quantile([1, 2, 3, 4], 0.5) == 2.5
    assert quantile(range(101), 0.95) == pytest.approx(95.0)


# -- shadow and rollback -----------------------------------------------------------------------------------------
# Answers in the Beethoven persona: the student's paraphrases of the teacher (ROUGE-L F1 0.36-0.83, mean 0.67),
# and answers that have nothing to do with the teacher's (mean 0.08). None is an exact match.
PARAPHRASES = [
    ("Ah, my deafness! It is a cruel companion, yet I hear the music within me louder than ever.",
     "My deafness is a cruel companion, Freunde, but the music within me I hear louder than ever."),
    ("The Ninth ends with Schiller's ode sung by a choir, and some in Vienna think it madness.",
     "Yes, the Ninth ends with Schiller's ode sung by a full choir; half of Vienna thinks it madness!"),
    ("I walk every day in the woods around Vienna, for nature speaks to me more than men do.",
     "Every day I walk in the woods around Vienna; nature speaks to me more than men ever do."),
    ("Haydn was an inattentive teacher, though I respect him as a great master.",
     "Haydn? A great master whom I respect, though he was an inattentive teacher to me."),
]
UNRELATED = [(teacher, student) for (teacher, _), student in zip(PARAPHRASES, [
    "I am an AI assistant and cannot help with that request today.",
    "The weather tomorrow will be sunny with a light breeze from the west.",
    "Please restart your router and try connecting to the network again.",
    "Stock prices rose sharply after the quarterly earnings were announced."])]


def routed(r: Rollout, arm: str = STUDENT) -> Route:
    return Route(arm, r.stage)


def shadow(r: Rollout, teacher: str, student: str):
    assert r.should_shadow()
    return r.record_shadow(r.stage, teacher, student)


def test_rollback_when_agreement_falls_below_threshold_after_enough_samples():
    r = rollout(student_share=0.5, shadow_sample_rate=1.0, agreement_window=10, min_agreement_samples=10,
                min_agreement=0.8, max_student_p95_s=None)
    for i in range(9):
        assert shadow(r, "Final Answer: en", "Final Answer: fr") is None  # too few samples yet
    assert r.share == 0.5
    event = shadow(r, "Final Answer: en", "Final Answer: fr")
    assert event["kind"] == "rollback" and event["from"] == 0.5 and event["to"] == 0.0
    assert "agreement 0.000" in event["reason"]
    assert (event["rule"], event["value"], event["limit"], event["samples"]) == ("agreement", 0.0, 0.8, 10)
    assert r.share == 0.0 and r.rollbacks == 1 and r.events[-1] is event
    assert r.choose_arm("anyone") == TEACHER
    snap = r.snapshot()
    assert snap["rollbacks"] == 1 and snap["student_share"] == 0.0 and snap["agreement"]["shadow"]["disagree"] == 10
    assert snap["rollbacks_by_rule"] == {"error_rate": 0, "agreement": 1, "similarity": 0, "latency_p95": 0}
    assert json.dumps(snap)  # JSON-ready


def test_high_agreement_does_not_roll_back_and_unjudged_samples_do_not_count():
    r = rollout(student_share=0.5, shadow_sample_rate=1.0, agreement_window=10, min_agreement_samples=5,
                min_agreement=0.8, max_student_p95_s=None)
    for i in range(50):
        shadow(r, "Final Answer: en", "Final Answer: en" if i % 10 else "Final Answer: fr")
        shadow(r, "unparseable", "Final Answer: en")
    assert r.share == 0.5 and r.rollbacks == 0
    assert r.shadow["unjudged"] == 50 and r.readings()["agreement"].value >= 0.8


def test_error_rate_rolls_back_on_5xx_and_timeouts_but_never_on_4xx():
    r = rollout(student_share=0.5, error_window=20, min_error_samples=20, max_error_rate=0.1,
                max_student_p95_s=None)
    for _ in range(100):  # the client's mistakes are not the student's
        assert r.record_error(routed(r), 400) is None and r.record_error(routed(r), 413) is None
    assert len(r.outcomes) == 0
    for _ in range(18):
        assert r.record_request(routed(r), 0.1, 10, 2, "Final Answer: en") is None
    assert r.record_error(routed(r), 503) is None  # an engine failure or a lost replica
    assert r.record_error(routed(r), 504) is None  # a timeout: 2 of 20 is 0.1, not above the limit
    assert r.share == 0.5
    event = r.record_error(routed(r), 503)  # 3 of the last 20
    assert event is not None and r.share == 0.0
    assert (event["rule"], event["value"], event["limit"], event["samples"]) == ("error_rate", 0.15, 0.1, 20)
    assert event["reason"] == "error rate 0.150 over the last 20 routed student requests exceeds 0.1"
    assert event["readings"]["error_rate"] == {"value": 0.15, "limit": 0.1, "samples": 20, "min_samples": 20}
    assert r.snapshot()["rollbacks_by_rule"]["error_rate"] == 1
    metrics = prometheus_text(r).splitlines()
    assert 'distill_rollback_firings_total{rule="error_rate"} 1' in metrics
    # The new stage starts with an empty window: its numbers are shown as none yet.
    assert 'distill_rollout_rule_samples{rule="error_rate"} 0' in metrics
    assert 'distill_rollout_rule_value{rule="error_rate"} NaN' in metrics


def test_label_answers_that_name_no_label_count_as_errors():
    r = rollout(student_share=1.0, error_window=10, min_error_samples=10, max_error_rate=0.2,
                max_student_p95_s=None)
    event = None
    for i in range(10):
        event = r.record_request(routed(r), 0.1, 10, 5, "Final Answer: en" if i % 2 else "I think it is French")
    assert event is not None and event["rule"] == "error_rate" and event["value"] == 0.5
    assert r.unparsable == 5 and r.snapshot()["student_unparsable"] == 5
    # Free text has no label to miss: any answer is a success as far as errors go.
    free = Rollout(RolloutConfig(student_share=1.0, max_student_p95_s=None), PERSONA)
    for _ in range(30):
        assert free.record_request(routed(free), 0.1, 10, 5, "I think it is French") is None
    assert free.unparsable == 0 and free.share == 1.0


def test_a_free_text_student_that_paraphrases_its_teacher_does_not_roll_back():
    """Today's free-text agreement is exact match: paraphrases disagree every time. By default free text has no
    agreement rule at all; with min_similarity the mean ROUGE-L F1 judges, so paraphrases pass and unrelated
    answers roll back."""
    by_default = Rollout(RolloutConfig(student_share=0.5, shadow_sample_rate=1.0, max_student_p95_s=None), PERSONA,
                         rng=random.Random(0))
    for i in range(200):
        assert shadow(by_default, *PARAPHRASES[i % len(PARAPHRASES)]) is None
    assert by_default.share == 0.5 and by_default.rollbacks == 0
    assert by_default.shadow["disagree"] == 200  # not one exact match, and still no rollback
    assert by_default.readings()["similarity"].limit is None

    judged = Rollout(RolloutConfig(student_share=0.5, shadow_sample_rate=1.0, min_similarity=0.4,
                                   agreement_window=20, min_agreement_samples=20, max_student_p95_s=None),
                     PERSONA, rng=random.Random(0))
    for i in range(200):
        assert shadow(judged, *PARAPHRASES[i % len(PARAPHRASES)]) is None
    assert judged.share == 0.5 and judged.readings()["similarity"].value == pytest.approx(0.672, abs=0.01)
    event = None
    for i in range(20):
        event = shadow(judged, *UNRELATED[i % len(UNRELATED)]) or event
    assert event is not None and event["rule"] == "similarity" and judged.share == 0.0
    assert event["reason"].startswith("live similarity (ROUGE-L F1) 0.") and event["limit"] == 0.4


def test_agreement_limits_must_fit_the_task():
    check_rules(RolloutConfig(), LANGID)
    check_rules(RolloutConfig(), PERSONA)  # the default min_agreement is for label tasks: not an error here
    check_rules(RolloutConfig(min_similarity=0.3), PERSONA)
    with pytest.raises(ConfigError, match="min_similarity applies to free-text tasks"):
        check_rules(RolloutConfig(min_similarity=0.3), LANGID)
    with pytest.raises(ConfigError, match="min_agreement applies to label tasks"):
        check_rules(RolloutConfig(min_agreement=0.5), PERSONA)
    from serve.app import resolve_config

    with pytest.raises(ConfigError, match="min_agreement applies to label tasks"):
        resolve_config(ServeConfig.model_validate({"task": "persona", "rollout": {"min_agreement": 0.5}}))


def test_rollback_when_student_p95_latency_exceeds_the_limit():
    r = rollout(student_share=0.1, max_student_p95_s=1.0, latency_window=20, min_latency_samples=20)
    for _ in range(19):
        assert r.record_request(routed(r), 0.2, 10, 2, "Final Answer: en") is None
    for _ in range(100):  # the teacher's latency never counts against the student
        assert r.record_request(routed(r, TEACHER), 50.0, 10, 2, "Final Answer: en") is None
    assert r.record_request(routed(r), 0.2, 10, 2, "Final Answer: en") is None  # 20 fast requests: fine
    event = None
    for _ in range(2):
        event = r.record_request(routed(r), 5.0, 10, 2, "Final Answer: en") or event
    assert event is not None and "p95 latency" in event["reason"] and r.share == 0.0
    assert event["rule"] == "latency_p95" and event["limit"] == 1.0 and event["value"] > 1.0


def test_windows_count_only_routed_student_traffic():
    """Direct requests to `student` or to another task's adapter, and routed requests the teacher served, share
    the engines but not the rollout: they must not move its windows."""
    r = rollout(student_share=0.5, shadow_sample_rate=1.0, max_student_p95_s=1.0, latency_window=20,
                min_latency_samples=20, error_window=20, min_error_samples=20, max_error_rate=0.1)
    for _ in range(100):
        assert r.record_request(Route(STUDENT), 30.0, 10, 2, "not a label") is None  # slow and unparsable
        assert r.record_error(Route(STUDENT), 503) is None
        assert r.record_request(routed(r, TEACHER), 30.0, 10, 2, "Final Answer: en") is None
        assert r.record_error(routed(r, TEACHER), 503) is None
    assert r.share == 0.5 and len(r.outcomes) == len(r.student_latencies) == 0
    assert r.arms[STUDENT].requests == 100 and r.arms[STUDENT].errors[503] == 100  # still in the arm's stats
    assert r.routed == {TEACHER: 100}
    for _ in range(20):
        r.record_request(routed(r), 30.0, 10, 2, "Final Answer: en")
    assert r.share == 0.0 and r.events[-1]["rule"] == "latency_p95"


def test_results_of_an_earlier_stage_stay_out_of_the_new_stage_windows():
    r = rollout(student_share=0.5, shadow_sample_rate=1.0, agreement_window=10, min_agreement_samples=10,
                max_student_p95_s=1.0, latency_window=10, min_latency_samples=10, error_window=10,
                min_error_samples=10)
    old = routed(r)
    shadows = [r.should_shadow() for _ in range(8)]  # shadow calls of stage 0 still waiting on the teacher
    r.set_share(1.0, "stage 2")
    assert r.stage == old.stage + 1 and r.events[-1]["stage"] == r.stage
    for _ in shadows:
        assert r.record_shadow(old.stage, "Final Answer: en", "Final Answer: fr") is None
    for _ in range(20):
        assert r.record_request(old, 9.0, 10, 2, "no label here") is None
        assert r.record_error(old, 504) is None
    assert r.share == 1.0 and not r.comparisons and not r.outcomes and not r.student_latencies
    assert r.stale == {"shadow": 8, "answer": 20, "error": 20} and r.shadow_in_flight == 0
    assert r.snapshot()["stale"] == {"answer": 20, "error": 20, "shadow": 8}
    assert 'distill_stale_results_total{kind="shadow"} 8' in prometheus_text(r).splitlines()


def test_share_change_resets_the_windows_and_is_logged():
    r = rollout(student_share=0.1, shadow_sample_rate=1.0, agreement_window=10, min_agreement_samples=10,
                min_agreement=0.9, max_student_p95_s=None)
    for _ in range(9):
        shadow(r, "Final Answer: en", "Final Answer: fr")
    event = r.set_share(0.5, "stage 3", shadow_rate=0.25, by="admin key 'ops'")
    assert event == {"time": 1000.0, "kind": "share_change", "from": 0.1, "to": 0.5, "reason": "stage 3",
                     "shadow_sample_rate": 0.25, "stage": 1, "by": "admin key 'ops'"}
    assert len(r.comparisons) == 0 and r.shadow_rate == 0.25
    with pytest.raises(ValueError):
        r.set_share(1.5, "bad")
    with pytest.raises(ValueError):
        r.set_share(0.5, "bad", shadow_rate=-1)


def test_shadow_requests_in_flight_are_capped():
    r = rollout(shadow_sample_rate=1.0, max_shadow_in_flight=2)
    assert r.should_shadow() and r.should_shadow()
    assert not r.should_shadow()
    assert r.shadow["skipped"] == 1
    r.record_shadow(r.stage, None, "x")  # a failed shadow call frees its slot too
    assert r.shadow["failed"] == 1 and r.should_shadow()
    assert not rollout(shadow_sample_rate=0.0).should_shadow()


# -- persistence -------------------------------------------------------------------------------------------------
def test_a_resumed_rollout_carries_on_exactly_where_the_saved_one_was(tmp_path):
    """What a restarted gateway reloads (through a real state file): share, stage, events, rollbacks and the
    windows, so that the next result fires a rollback exactly when it would have fired without the restart."""
    config = RolloutConfig(student_share=0.2, shadow_sample_rate=1.0, agreement_window=10, min_agreement_samples=10,
                           error_window=10, min_error_samples=10, max_error_rate=0.3, max_student_p95_s=None)
    first = Rollout(config, LANGID, rng=random.Random(0), clock=lambda: 1000.0)
    for _ in range(10):
        first.record_error(routed(first), 503)
    assert first.share == 0.0 and first.rollbacks == 1
    first.set_share(0.3, "stage 2")
    for i in range(9):
        shadow(first, "Final Answer: en", "Final Answer: fr")  # one short of an agreement rollback
    for i in range(9):
        first.record_request(routed(first), 0.1, 10, 2, "Final Answer: en" if i % 3 else "nonsense")
    store = UriStateStore(str(tmp_path / "state" / "rollout.json"))
    asyncio.run(store.save({"rollout": first.to_state()}))

    resumed = Rollout(config, LANGID, rng=random.Random(0), clock=lambda: 1000.0)
    resumed.load_state(asyncio.run(store.load())["rollout"])
    keys = ("student_share", "stage", "rules", "rollbacks", "rollbacks_by_rule", "events", "student_unparsable")
    assert {k: resumed.snapshot()[k] for k in keys} == {k: first.snapshot()[k] for k in keys}
    assert resumed.share == 0.3 and resumed.stage == 2 and [e["kind"] for e in resumed.events] == \
        ["rollback", "share_change"]
    assert resumed.route("someone").stage == first.stage
    event = shadow(resumed, "Final Answer: en", "Final Answer: fr")  # the tenth comparison
    assert event is not None and event["rule"] == "agreement" and resumed.rollbacks == 2
    assert asyncio.run(UriStateStore(str(tmp_path / "missing.json")).load()) is None


def test_prometheus_text_has_every_metric():
    r = rollout(student_share=0.25)
    r.record_request(routed(r, TEACHER), 0.5, 100, 3, "Final Answer: en")
    r.record_request(Route(STUDENT), 0.1, 10, 3, "Final Answer: en")
    r.record_error(Route(STUDENT), 400)
    text = prometheus_text(r)
    for line in ('distill_requests_total{arm="teacher"} 1', 'distill_routed_requests_total{arm="teacher"} 1',
                 'distill_routed_requests_total{arm="student"} 0', 'distill_errors_total{arm="student",status="400"} 1',
                 'distill_tokens_total{arm="teacher",kind="prompt"} 100',
                 'distill_latency_seconds{arm="student",quantile="0.5"} 0.1',
                 'distill_latency_seconds_count{arm="teacher"} 1', "distill_student_share 0.25",
                 "distill_shadow_agreement NaN", "distill_rollbacks_total 0", "distill_rollout_stage 0",
                 'distill_rollout_rule_limit{rule="error_rate"} 0.05', 'distill_rollout_rule_limit{rule="agreement"} 0.9',
                 'distill_rollout_rule_limit{rule="similarity"} NaN', 'distill_rollout_rule_limit{rule="latency_p95"} 10.0',
                 'distill_rollback_firings_total{rule="agreement"} 0', "distill_student_unparsable_total 0",
                 'distill_cascade_mode{mode="split"} 1', 'distill_cascade_mode{mode="cascade"} 0',
                 "distill_cascade_threshold NaN", 'distill_cascade_requests_total{outcome="kept"} 0',
                 'distill_drift_psi{signal="labels"} NaN', 'distill_drift_events_total{signal="deferral"} 0',
                 "distill_drift_limit 0.25", 'distill_cost_usd{part="shadow"} 0.0'):
        assert line in text.splitlines(), line
    # The official parser reads it back: every family, with the right types.
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families == {
        "distill_requests": "counter", "distill_routed_requests": "counter", "distill_errors": "counter",
        "distill_tokens": "counter", "distill_latency_seconds": "summary", "distill_student_share": "gauge",
        "distill_rollout_stage": "gauge", "distill_shadow_agreement": "gauge", "distill_shadow_comparisons": "counter",
        "distill_rollout_rule_value": "gauge", "distill_rollout_rule_limit": "gauge",
        "distill_rollout_rule_samples": "gauge", "distill_student_unparsable": "counter",
        "distill_stale_results": "counter", "distill_rollbacks": "counter", "distill_rollback_firings": "counter",
        "distill_cascade_mode": "gauge", "distill_cascade_threshold": "gauge", "distill_cascade_requests": "counter",
        "distill_cascade_deferral_rate": "gauge", "distill_cascade_kept_agreement": "gauge",
        "distill_cost_usd": "counter", "distill_cost_teacher_only_usd": "gauge", "distill_cost_saved_usd": "gauge",
        "distill_drift_psi": "gauge", "distill_drift_samples": "gauge", "distill_drift_limit": "gauge",
        "distill_drift_events": "counter", "distill_gateway_overhead_seconds": "gauge"}


# -- wire format -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw", [
    "Final Answer: en",
    "<think>the script is Latin</think>\n\nFinal Answer: en",
    "  <think>a < b and </thin k> are not tags</think>Final Answer: fr  ",
    "<think>never closed",
    "<thi",
    "",
])
def test_streamed_reasoning_split_matches_the_whole_answer_split(raw):
    reasoning, visible, finished = split_reasoning(raw)
    for size in (1, 2, 3, 7, 100):
        splitter = ThinkSplitter()
        parts = [splitter.feed(raw[i:i + size]) for i in range(0, len(raw), size)] + [splitter.flush()]
        streamed_reasoning = "".join(p[0] for p in parts)
        streamed_content = "".join(p[1] for p in parts)
        assert streamed_content.strip() == visible
        if finished and reasoning is not None:
            assert streamed_reasoning.strip() == reasoning


def test_think_splitter_for_templates_that_open_the_think_block():
    splitter = ThinkSplitter(opened=True)
    parts = [splitter.feed(p) for p in ("reasoning her", "e</th", "ink>\nFinal Answer: de")] + [splitter.flush()]
    assert "".join(p[0] for p in parts) == "reasoning here"
    assert "".join(p[1] for p in parts) == "Final Answer: de"


def test_chat_request_validation():
    ok = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "max_completion_tokens": 5,
        "stop": "x", "frequency_penalty": 0.1})
    assert ok.plain_messages() == [{"role": "user", "content": "ab"}]
    assert ok.requested_max_tokens() == 5 and ok.stops() == ["x"]
    for bad, fragment in (({"model": "m", "messages": []}, "messages"),
                          ({"model": "", "messages": [{"role": "user", "content": "a"}]}, "model"),
                          ({"model": "m", "messages": [{"role": "user", "content": "a"}], "seed": 1}, "seed"),
                          ({"model": "m", "messages": [{"role": "user", "content": "a"}], "n": 3}, "n=1")):
        with pytest.raises(ValidationError) as err:
            ChatRequest.model_validate(bad)
        assert fragment in validation_message(err.value)


def test_teacher_conversation_wraps_the_last_user_message_with_the_task_prompt():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first"},
                {"role": "assistant", "content": "Final Answer: en"}, {"role": "user", "content": "Hola a todos"}]
    convo = teacher_conversation(LANGID, messages)
    assert convo[0]["role"] == "system"
    assert convo[0]["content"].startswith(LANGID.prompt.system.rstrip()) and convo[0]["content"].endswith("Be brief.")
    assert convo[1:3] == messages[1:3]
    assert convo[-1] == {"role": "user", "content": "Text: Hola a todos"}


# -- config ------------------------------------------------------------------------------------------------------
def test_serve_config_defaults_and_validation(tmp_path):
    config = ServeConfig()
    assert config.host == "127.0.0.1" and config.rollout.student_share == 0.01
    with pytest.raises(ValidationError):
        ServeConfig.model_validate({"student": {"adapters": {"teacher": "/x"}}})
    with pytest.raises(ValidationError):
        ServeConfig.model_validate({"routed_model": "student"})
    with pytest.raises(ValidationError):
        ServeConfig.model_validate({"rollout": {"student_share": 2}})
    with pytest.raises(ValidationError):
        ServeConfig.model_validate({"teacher": {"min_replicas": 3, "max_replicas": 2}})
    with pytest.raises(ConfigError, match="not a PEFT adapter"):
        adapter_rank(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 32}))
    assert adapter_rank(str(tmp_path)) == 32
    assert vllm_max_lora_rank([8, 12]) == 16 and vllm_max_lora_rank([32]) == 32


def test_resolve_config_refuses_adapters_without_one_for_the_task(tmp_path):
    from serve.app import resolve_config

    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8}))
    with pytest.raises(ConfigError, match="no adapter named after the task"):
        resolve_config(ServeConfig.model_validate({"student": {"adapters": {"other": str(tmp_path)}}}))
    with pytest.raises(ConfigError, match="not a PEFT adapter"):
        resolve_config(ServeConfig.model_validate({"student": {"adapters": {"language-id": str(tmp_path / "no")}}}))
    with pytest.raises(ConfigError, match="do not parse"):
        resolve_config(ServeConfig.model_validate({"student": {"guided_choices": ["en"]}}))
    resolved = resolve_config(ServeConfig.model_validate({"student": {"adapters": {"language-id": str(tmp_path)}}}))
    assert resolved.student.adapters["language-id"] == str(tmp_path.resolve())


def test_cli_registers_serve_and_compare_latency():
    from pipelines.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["serve", "--teacher", "T", "--student", "S", "--adapter", "A", "--port", "9001"])
    assert args.func.__name__ == "_serve_cli" and args.port == 9001
    args = parser.parse_args(["compare-latency", "--url", "http://127.0.0.1:1", "--limit", "3"])
    assert args.func.__name__ == "_compare_cli"


# -- selective serving: the cascade, its savings, drift ----------------------------------------------------------
def answer(text: str, confidence, prompt_tokens: int = 10, completion_tokens: int = 3, cached_tokens: int = 0):
    return ArmAnswer(text=text, raw=text, confidence=confidence, prompt_tokens=prompt_tokens,
                     completion_tokens=completion_tokens, cached_tokens=cached_tokens, finish_reason="stop")


def cascaded(r: Rollout, student, teacher=None, student_status=None, teacher_status=None):
    """One cascaded request through the rollout, as the gateway records it; returns (kept, reason)."""
    route = r.route("u")
    assert route.cascade
    kept, reason = r.cascade_decision(student) if student else (False, "student_error")
    r.record_cascade(route, student, student_status, 0.2, kept, reason,
                     None if kept else teacher, None if kept else teacher_status, None if kept else 0.5)
    return kept, reason


def test_the_cascade_keeps_confident_answers_defers_the_rest_and_every_request_is_counted_once():
    r = rollout(student_share=1.0, mode="cascade", cascade={"threshold": 0.6}, max_student_p95_s=None)
    teacher = answer("Final Answer: de", None, prompt_tokens=1500, cached_tokens=1400)
    outcomes = [
        cascaded(r, answer("Final Answer: en", 0.9)),                             # kept
        cascaded(r, answer("Final Answer: en", 0.6)),                             # kept: the threshold keeps
        cascaded(r, answer("Final Answer: fr", 0.59), teacher),                   # low confidence
        cascaded(r, answer("no label at all", 0.99), teacher),                    # names no label
        cascaded(r, answer("Final Answer: de", None), teacher),                   # no confidence
        cascaded(r, None, teacher, student_status=503),                           # the student failed
        cascaded(r, answer("Final Answer: fr", 0.1), None, teacher_status=504),   # ... and the teacher failed
    ]
    assert [k for k, _ in outcomes] == [True, True, False, False, False, False, False]
    assert [reason for _, reason in outcomes] == ["confident", "confident", "low_confidence", "no_label",
                                                  "no_confidence", "student_error", "low_confidence"]
    c = r.snapshot()["cascade"]
    assert (c["requests"], c["kept"], c["deferred"], c["failed"]) == (7, 2, 4, 1)
    assert c["requests"] == c["kept"] + c["deferred"] + c["failed"]
    assert c["deferred_by_reason"] == {"low_confidence": 1, "no_label": 1, "no_confidence": 1, "student_error": 1}
    assert c["deferral_rate"] == 5 / 7 and c["threshold"] == 0.6
    # Answered by the arm that answered: 2 kept by the student, 4 by the teacher, the failed one by nobody.
    assert r.snapshot()["routed"] == {"teacher": 4, "student": 2}
    # The teacher's fallback against the student's answer: de vs fr, vs no label, vs de (agree).
    assert c["deferred_comparisons"] == {"agree": 1, "disagree": 2, "unjudged": 0}
    # The windows judge the kept share: 2 kept (successes), 2 failures (the 503, the answer with no label); the
    # low-confidence deferrals are neither; latency only of the kept.
    assert list(r.outcomes) == [False, False, True, True] and list(r.student_latencies) == [0.2, 0.2]
    assert r.unparsable == 1
    # Per arm: the student was asked 7 times (one 503), the teacher 5 times (one 504).
    arms = r.snapshot()["arms"]
    assert arms["student"]["requests"] == 6 and arms["student"]["errors"] == {"503": 1}
    assert arms["teacher"]["requests"] == 4 and arms["teacher"]["errors"] == {"504": 1}


def test_the_cascade_rolls_back_on_the_kept_shares_failures_not_on_its_deferrals():
    r = rollout(student_share=1.0, mode="cascade", cascade={"threshold": 0.5}, error_window=10,
                min_error_samples=10, max_error_rate=0.3, max_student_p95_s=None)
    teacher = answer("Final Answer: en", None)
    for _ in range(50):  # unsure but fine: deferred every time, no failure
        cascaded(r, answer("Final Answer: en", 0.2), teacher)
    assert r.rollbacks == 0 and r.share == 1.0 and len(r.outcomes) == 0
    for _ in range(6):
        cascaded(r, answer("Final Answer: en", 0.9))
    for _ in range(4):
        cascaded(r, None, teacher, student_status=503)
    assert r.rollbacks == 1 and r.share == 0.0 and r.events[-1]["rule"] == "error_rate"
    assert r.route("u") == Route(TEACHER, r.stage, cascade=False)  # at share 0 nothing is cascaded


def test_mode_and_threshold_change_at_runtime_and_bad_ones_are_refused():
    r = rollout(student_share=0.5)
    assert r.mode == "split" and not r.route("u1").cascade
    with pytest.raises(ValueError, match="needs a threshold"):
        r.set_cascade("cascade")
    with pytest.raises(ValueError, match=r"within \[0, 1\]"):
        r.set_cascade("cascade", 1.5)
    with pytest.raises(ValueError, match="mode must be"):
        r.set_cascade("sideways", 0.5)
    r.drift.observe_deferral(True)
    event = r.set_cascade("cascade", 0.7, "try it", by="admin key 'ops'")
    assert event == {"time": 1000.0, "kind": "cascade_change", "from": {"mode": "split", "threshold": None},
                     "to": {"mode": "cascade", "threshold": 0.7}, "reason": "try it", "by": "admin key 'ops'",
                     "stage": 1}
    assert r.stage == 1 and len(r.drift.deferrals) == 0  # a new threshold starts a new deferral window
    users = [f"u{i}" for i in range(200)]
    assert {r.route(u).cascade for u in users if r.choose_arm(u) == STUDENT} == {True}
    assert {r.route(u).cascade for u in users if r.choose_arm(u) == TEACHER} == {False}
    r.set_cascade(threshold=0.4)
    assert (r.mode, r.threshold) == ("cascade", 0.4)
    free = Rollout(RolloutConfig(), PERSONA)
    with pytest.raises(ValueError, match="<= 0"):
        free.set_cascade("cascade", 0.5)  # a free-text confidence is a mean log-probability
    free.set_cascade("cascade", -1.2)


def test_a_cascade_needs_a_threshold_that_fits_the_task(tmp_path):
    from serve.app import resolve_config

    with pytest.raises(ConfigError, match="needs a threshold"):
        check_rules(RolloutConfig(mode="cascade"), LANGID)
    with pytest.raises(ConfigError, match=r"within \[0, 1\]"):
        check_rules(RolloutConfig(cascade={"threshold": 2.0}), LANGID)
    with pytest.raises(ConfigError, match="<= 0"):
        check_rules(RolloutConfig(mode="cascade", cascade={"threshold": 0.5}), PERSONA)
    with pytest.raises(ValidationError, match="not both"):
        RolloutConfig(cascade={"threshold": 0.5, "threshold_from": "r.json"})

    def resolved(report) -> RolloutConfig:
        path = tmp_path / "report.json"
        path.write_text(json.dumps(report))
        return resolve_config(ServeConfig.model_validate(
            {"rollout": {"mode": "cascade", "cascade": {"threshold_from": str(path)}}})).rollout

    rollout_config = resolved({"selective": {"threshold": 0.72, "target_agreement": 0.95, "deferral_rate": 0.3}})
    assert rollout_config.cascade.threshold == 0.72 and rollout_config.cascade.threshold_from is None
    assert rollout_config.drift.reference_deferral_rate == 0.3  # the report's rate at that threshold
    ServeConfig.model_validate(ServeConfig(rollout=rollout_config).model_dump())  # what the gateway revalidates
    with pytest.raises(ConfigError, match="selective.threshold is null.*target agreement 0.99"):
        resolved({"selective": {"threshold": None, "target_agreement": 0.99}})
    with pytest.raises(ConfigError, match="no selective.threshold"):
        resolved({"fidelity": {}})
    with pytest.raises(ConfigError, match="no such file"):
        resolve_config(ServeConfig.model_validate(
            {"rollout": {"cascade": {"threshold_from": str(tmp_path / "missing.json")}}}))


def test_savings_price_the_student_answers_at_the_teachers_mean():
    from distill.cost import CostConfig, Price

    prices = CostConfig(teacher=Price(input_per_million=1.0, cached_input_per_million=0.0, output_per_million=10.0),
                        student=Price(input_per_million=0.1, output_per_million=1.0))
    r = Rollout(RolloutConfig(student_share=1.0, mode="cascade", cascade={"threshold": 0.5},
                              max_student_p95_s=None), LANGID, rng=random.Random(0), prices=prices)
    assert r.snapshot()["cost"]["teacher_only_usd"] is None  # no teacher answer seen yet: unknown, and said so
    # A teacher answer: 1500 prompt tokens of which 1000 cached, 4 output tokens: (500 * 1 + 4 * 10) / 1e6.
    teacher = answer("Final Answer: de", None, prompt_tokens=1500, completion_tokens=4, cached_tokens=1000)
    student = answer("Final Answer: de", 0.9, prompt_tokens=100, completion_tokens=4)
    cascaded(r, answer("Final Answer: de", 0.1, prompt_tokens=100, completion_tokens=4), teacher)
    cascaded(r, student)
    cascaded(r, student)
    cost = r.snapshot()["cost"]
    t, s = 540 / 1e6, (100 * 0.1 + 4 * 1.0) / 1e6
    assert cost["teacher_usd"] == pytest.approx(t) and cost["student_usd"] == pytest.approx(3 * s)
    assert cost["teacher_only_usd"] == pytest.approx(3 * t)
    assert cost["saved_usd"] == pytest.approx(3 * t - t - 3 * s)
    assert cost["saved_fraction"] == pytest.approx((2 * t - 3 * s) / (3 * t))
    # A shadow answer is spent, not saved.
    assert r.should_shadow() is False  # shadow rate 0.1 with this rng: force one
    r.shadow_in_flight += 1
    r.record_shadow(r.stage, teacher.text, student.text, teacher_tokens=teacher)
    assert r.snapshot()["cost"]["shadow_usd"] == pytest.approx(t)
    assert r.snapshot()["cascade"]["kept_comparisons"]["agree"] == 1


def test_psi_is_zero_for_the_reference_and_grows_with_the_shift():
    from serve.selective import psi

    reference = {"en": 0.5, "fr": 0.3, "de": 0.2}
    assert psi({"en": 50, "fr": 30, "de": 20}, reference) == pytest.approx(0.0)
    # By hand: (0.3-0.5) ln(0.3/0.5) + (0.3-0.3) ln 1 + (0.4-0.2) ln(0.4/0.2) = 0.1022 + 0.1386.
    assert psi({"en": 30, "fr": 30, "de": 40}, reference) == pytest.approx(
        -0.2 * math.log(0.6) + 0.2 * math.log(2.0))
    assert psi({"zh": 10}, reference) > 5  # a label the training data never had: an empty bin is floored
    assert psi({}, reference) is None


def test_drift_records_an_event_once_when_the_live_labels_leave_the_training_distribution():
    r = Rollout(RolloutConfig(student_share=0.0, drift={"window": 50, "min_samples": 20, "max_psi": 0.25}),
                LANGID, rng=random.Random(0), clock=lambda: 1000.0, reference_labels={"en": 0.5, "fr": 0.5})
    assert r.snapshot()["drift"]["deferral"]["off"].startswith("no reference deferral rate")
    for i in range(40):  # as in training: no event
        r.record_request(routed(r, TEACHER), 0.1, 10, 2, f"Final Answer: {'en' if i % 2 else 'fr'}")
    assert r.drift.readings()["labels"]["psi"] == pytest.approx(0.0) and not r.events
    for _ in range(40):  # the traffic turns German
        r.record_request(routed(r, TEACHER), 0.1, 10, 2, "Final Answer: de")
    events = [e for e in r.events if e["kind"] == "drift"]
    assert len(events) == 1, r.events  # once, not once per request over the limit
    assert events[0]["signal"] == "labels" and events[0]["reason"].startswith("re-distill recommended")
    assert events[0]["psi"] > 0.25 and events[0]["samples"] >= 20
    assert r.snapshot()["drift"]["labels"]["alarmed"] is True
    for i in range(50):  # back to the training mix: cleared, and armed again
        r.record_request(routed(r, TEACHER), 0.1, 10, 2, f"Final Answer: {'en' if i % 2 else 'fr'}")
    assert r.events[-1]["kind"] == "drift_cleared" and not r.drift.alarmed["labels"]
    assert 'distill_drift_events_total{signal="labels"} 1' in prometheus_text(r).splitlines()
    direct = len(r.drift.labels)
    r.record_request(Route(TEACHER), 0.1, 10, 2, "Final Answer: zh")  # not routed: not the production traffic
    assert len(r.drift.labels) == direct


def test_drift_of_the_deferral_rate_against_the_reports():
    r = rollout(student_share=1.0, mode="cascade", cascade={"threshold": 0.5}, max_student_p95_s=None,
                drift={"reference_deferral_rate": 0.1, "window": 40, "min_samples": 20})
    assert r.snapshot()["drift"]["labels"]["off"].startswith("no reference: set rollout.drift.reference_data")
    teacher = answer("Final Answer: de", None)
    for i in range(30):  # half deferred where the report expected a tenth
        cascaded(r, answer("Final Answer: en", 0.9 if i % 2 else 0.1), teacher)
    (event,) = [e for e in r.events if e["kind"] == "drift"]
    assert event["signal"] == "deferral" and event["live"] == {"deferred": 0.5, "kept": 0.5}


def test_a_resumed_rollout_keeps_the_mode_the_threshold_and_the_counters(tmp_path):
    config = RolloutConfig(student_share=1.0, mode="split", cascade={"threshold": 0.5}, max_student_p95_s=None,
                           drift={"reference_deferral_rate": 0.2})
    first = Rollout(config, LANGID, rng=random.Random(0), reference_labels={"en": 1.0})
    first.set_cascade("cascade", 0.8, "on", by="admin key 'ops'")
    teacher = answer("Final Answer: de", None, prompt_tokens=1500)
    for conf in (0.9, 0.3, 0.95, 0.1):
        cascaded(first, answer("Final Answer: en", conf), teacher)
    store = UriStateStore(str(tmp_path / "rollout.json"))
    asyncio.run(store.save({"rollout": first.to_state()}))
    resumed = Rollout(config, LANGID, rng=random.Random(0), reference_labels={"en": 1.0})
    resumed.load_state(asyncio.run(store.load())["rollout"])
    assert (resumed.mode, resumed.threshold) == ("cascade", 0.8)
    for key in ("cascade", "cost", "drift", "routed", "events", "stage"):
        assert resumed.snapshot()[key] == first.snapshot()[key], key
    # State saved before the cascade existed resumes as it did, in the config's mode.
    old = {k: v for k, v in first.to_state().items() if k not in ("mode", "threshold", "cascade", "savings",
                                                                   "drift", "routed")}
    older = Rollout(config, LANGID, rng=random.Random(0))
    older.load_state(old)
    assert older.mode == "split" and older.snapshot()["cascade"]["requests"] == 0 and older.share == first.share


# -- capture -----------------------------------------------------------------------------------------------------
def test_captured_rows_are_generation_data_each_query_once_and_survive_a_restart(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distill.formats import DATA_SCHEMA
    from distill.inputs import content_id
    from distill.tasks import task_of_data
    from serve.capture import Capture

    def open_capture() -> Capture:
        return Capture(str(tmp_path / "cap"), LANGID, "teacher-model", rows_per_shard=100, flush_seconds=60).open()

    def user(text):
        return [{"role": "user", "content": text}]

    capture = open_capture()
    rows = [capture.row(user("  Hallo Welt  "), answer("Final Answer: de", None, 1500, 4)),
            capture.row(user("Hallo Welt"), answer("Final Answer: de", None)),               # the same query
            capture.row(user("Bonjour"), dataclasses.replace(answer("", None), raw="<think>French</think>\nFinal Answer: fr")),
            capture.row(user("???"), answer("I cannot tell", None)),                         # unparsable
            capture.row([{"role": "system", "content": "be brief"}] + user("Hi"), answer("Final Answer: en", None))]
    assert [r is not None for r in rows] == [True, False, True, False, False]
    assert rows[0]["id"] == content_id("Hallo Welt") and rows[0]["text"] == "Hallo Welt"
    assert rows[0]["messages"] == [{"role": "user", "content": "Hallo Welt"},
                                   {"role": "assistant", "content": "Final Answer: de"}]
    assert (rows[0]["label"], rows[0]["prompt_tokens"], rows[0]["output_tokens"]) == ("de", 1500, 4)
    assert rows[2]["reasoning"] == "French" and rows[2]["answer"] == "Final Answer: fr"
    assert rows[2]["teacher_output"] == "<think>French</think>\nFinal Answer: fr"
    for row in (rows[0], rows[2]):
        asyncio.run(capture.write(row))
    capture.close()
    snapshot = capture.snapshot()
    assert (snapshot["accepted"], snapshot["written"], snapshot["pending"]) == (2, 2, 0)
    assert snapshot["skipped"] == {"duplicate": 1, "conversation": 1, "unparsable": 1, "write_failed": 0}
    (shard,) = (tmp_path / "cap" / "data").glob("*.parquet")
    table = pq.read_table(shard)
    assert table.schema.equals(DATA_SCHEMA)  # the generation data format, column for column
    assert table.column("id").to_pylist() == [content_id("Hallo Welt"), content_id("Bonjour")]
    assert task_of_data(str(tmp_path / "cap")).name == "language-id"  # what training reads the task from
    # A restarted gateway knows what is there already: the same query is not written again.
    again = open_capture()
    assert again.on_disk_at_start == 2 and again.row(user("Hallo Welt"), answer("Final Answer: de", None)) is None
    again.close()
    pa.Table.from_pylist([], schema=DATA_SCHEMA)  # (the schema builds empty tables too)
    with pytest.raises(ValueError, match="not 'persona'"):
        Capture(str(tmp_path / "cap"), PERSONA, "t", 10, 1).open()


# -- the student engine: merged or LoRA -----------------------------------------------------------------------
def test_one_adapter_on_cpu_is_served_merged_and_several_keep_lora(tmp_path):
    from distill.student_serving import serving_mode

    def adapter(name: str, experts: bool = False) -> str:
        folder = tmp_path / name
        folder.mkdir()
        config = {"r": 8, **({"target_parameters": ["mlp.experts.gate_up_proj"]} if experts else {})}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        return str(folder)

    one, other, moe = adapter("one"), adapter("other"), adapter("moe", experts=True)
    assert serving_mode("auto", {}, "cpu")[0] == "plain"
    mode, why = serving_mode("auto", {"language-id": one}, "cpu")
    assert mode == "merged" and "no fast LoRA path" in why
    mode, why = serving_mode("auto", {"language-id": moe}, "cpu")
    assert mode == "merged" and "mixture-of-experts" in why
    assert serving_mode("auto", {"language-id": one}, "gpu")[0] == "lora"
    assert serving_mode("auto", {"language-id": moe}, "gpu")[0] == "lora"
    mode, why = serving_mode("auto", {"language-id": one, "x": other}, "cpu")
    assert mode == "lora" and "2 adapters share one base" in why
    assert serving_mode("lora", {"language-id": one}, "cpu") == ("lora", "serving: lora")
    assert serving_mode("merged", {"language-id": one}, "gpu")[0] == "merged"
    with pytest.raises(ConfigError, match="folds one adapter"):
        serving_mode("merged", {"language-id": one, "x": other}, "cpu")
    with pytest.raises(ConfigError, match="cannot serve with LoRA"):
        serving_mode("auto", {"language-id": moe, "x": other}, "cpu")


def test_the_adapter_digest_changes_with_its_contents(tmp_path):
    from distill.student_serving import adapter_digest, merged_location

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text('{"r": 8}')
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"weights-1")
    first = adapter_digest(str(tmp_path / "a"))
    assert adapter_digest(str(tmp_path / "a")) == first
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"weights-2")
    assert adapter_digest(str(tmp_path / "a")) != first
    assert merged_location("/runs/demo/train/adapter/", None) == "/runs/demo/train/adapter-merged"
    assert merged_location("s3://b/adapter", "s3://b/cache/merged") == "s3://b/cache/merged"


# -- confidence from the engine's logprobs ---------------------------------------------------------------------
def test_answer_confidence_is_the_reports_and_leaves_reasoning_out():
    from types import SimpleNamespace

    from distill.selective import confidence
    from serve.arms import answer_confidence, sampled_logprobs

    def position(token, logprob, text, other=None):
        entries = {token: SimpleNamespace(logprob=logprob, decoded_token=text)}
        if other is not None:  # the top-1 token vLLM returns beside a sampled one that is not it
            entries[other] = SimpleNamespace(logprob=-0.01, decoded_token="?")
        return entries

    output = SimpleNamespace(token_ids=[5, 6, 7], logprobs=[position(5, -0.1, "Final"), position(6, -0.2, " Answer:"),
                                                             position(7, -0.3, " en", other=9)])
    lps, texts = sampled_logprobs(output)
    assert lps == [-0.1, -0.2, -0.3] and texts == ["Final", " Answer:", " en"]
    assert answer_confidence(LANGID, lps, texts) == pytest.approx(math.exp(-0.6)) == confidence(
        LANGID, {"token_logprobs": lps, "error": None})
    # A thinking teacher: only the tokens after </think> (and the blank ones after it) are the answer's.
    texts = ["<think>", "Latin", "</th", "ink>", "\n\n", "Final Answer: en"]
    lps = [-5.0, -5.0, -5.0, -5.0, -1.0, -0.25]
    assert answer_confidence(LANGID, lps, texts) == pytest.approx(math.exp(-0.25))
    assert answer_confidence(PERSONA, [-1.0, -3.0], ["Ah", "!"]) == pytest.approx(-2.0)  # mean logprob per token
    assert answer_confidence(LANGID, [], []) is None


# -- administration apart from clients -------------------------------------------------------------------------
def test_admin_keys_administer_client_keys_get_403_and_open_is_loopback_only():
    from serve.auth import OPEN, Keys, check_exposure
    from serve.protocol import ApiError

    keys = Keys("client-key", {"ops": "admin-key", "ci": "ci-key"})

    def bearer(token):
        return {"authorization": f"Bearer {token}"}

    assert keys.client(bearer("client-key")) == "client key"
    assert keys.client(bearer("ci-key")) == "admin key 'ci'"  # an admin may use the models too
    assert keys.admin(bearer("admin-key")) == "admin key 'ops'"
    for headers, status in ((bearer("client-key"), 403), (bearer("nope"), 401), ({}, 401)):
        with pytest.raises(ApiError) as err:
            keys.admin(headers)
        assert err.value.status == status
    with pytest.raises(ApiError) as err:
        keys.client(bearer("nope"))
    assert err.value.status == 401
    with pytest.raises(ApiError) as err:
        Keys("client-key", {}).admin(bearer("client-key"))
    assert err.value.status == 403 and "administration is off" in err.value.message
    assert Keys(None, {}).admin({}) == OPEN and Keys(None, {}).client({}) == OPEN
    assert Keys(None, {"ops": "admin-key"}).client({}) == "client (no client key configured)"

    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_exposure(host, None, False)
    for host in ("0.0.0.0", "::", "10.1.2.3", "my-host"):
        with pytest.raises(ConfigError, match="without an API key.*--insecure-no-auth"):
            check_exposure(host, None, False)
        check_exposure(host, "key", False)
        check_exposure(host, None, True)


def test_a_start_on_0_0_0_0_without_keys_is_refused(monkeypatch, tmp_path):
    from serve.app import build_app, resolve_config, start

    monkeypatch.delenv("DISTILL_API_KEY", raising=False)
    monkeypatch.delenv("DISTILL_ADMIN_KEY", raising=False)
    with pytest.raises(ConfigError, match="refusing to serve on 0.0.0.0 without an API key"):
        start(ServeConfig(host="0.0.0.0"))  # refused before Ray or any engine starts
    assert resolve_config(ServeConfig(host="0.0.0.0", insecure_no_auth=True)).api_key is None
    monkeypatch.setenv("DISTILL_API_KEY", "client")
    monkeypatch.setenv("DISTILL_ADMIN_KEY", "admin")
    resolved = resolve_config(ServeConfig(host="0.0.0.0"))
    assert resolved.api_key == "client" and resolved.admin_keys == {"DISTILL_ADMIN_KEY": "admin"}
    monkeypatch.setenv("DISTILL_ADMIN_KEY", "client")
    with pytest.raises(ConfigError, match="the same"):
        resolve_config(ServeConfig())
    with pytest.raises(ValidationError, match="differ from api_key"):
        ServeConfig(api_key="k", admin_keys={"ops": "k"})
    # Serve's builder cannot see the address Serve listens on: without a key it counts as exposed.
    monkeypatch.delenv("DISTILL_API_KEY")
    monkeypatch.delenv("DISTILL_ADMIN_KEY")
    with pytest.raises(ConfigError, match="without an API key"):
        build_app({"task": "language-id"})


def test_cli_takes_the_selective_serving_options(monkeypatch):
    from pipelines.cli import build_parser
    from serve.cli import _serve_overrides

    args = build_parser().parse_args(["serve", "--adapter", "A", "--mode", "cascade", "--threshold-from", "r.json",
                                      "--capture", "s3://b/cap", "--admin-key", "k", "--insecure-no-auth",
                                      "--student-serving", "lora", "--reference-data", "runs/gen"])
    assert (args.mode, args.threshold_from, args.capture, args.admin_key) == ("cascade", "r.json", "s3://b/cap", "k")
    assert args.insecure_no_auth and args.student_serving == "lora" and args.reference_data == "runs/gen"
    assert _serve_overrides(args, {})["student"]["serving"] == "lora"
