"""Fast unit tests of the rollout rules, the wire format and the serve config (no Ray, no vLLM)."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from pydantic import ValidationError

from distill.agreement import agreement_rate, compare, mean_similarity, normalize
from distill.config import ConfigError
from distill.tasks import load_task, split_reasoning
from serve.arms import teacher_conversation
from distill.engine import adapter_rank, vllm_max_lora_rank
from serve.config import ServeConfig
from serve.protocol import ChatRequest, ThinkSplitter, validation_message
from serve.router import STUDENT, TEACHER, Rollout, RolloutConfig, Route, check_rules, quantile, user_fraction
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
    metrics = r.prometheus().splitlines()
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
    assert 'distill_stale_results_total{kind="shadow"} 8' in r.prometheus().splitlines()


def test_share_change_resets_the_windows_and_is_logged():
    r = rollout(student_share=0.1, shadow_sample_rate=1.0, agreement_window=10, min_agreement_samples=10,
                min_agreement=0.9, max_student_p95_s=None)
    for _ in range(9):
        shadow(r, "Final Answer: en", "Final Answer: fr")
    event = r.set_share(0.5, "stage 3", shadow_rate=0.25)
    assert event == {"time": 1000.0, "kind": "share_change", "from": 0.1, "to": 0.5, "reason": "stage 3",
                     "shadow_sample_rate": 0.25, "stage": 1}
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
    text = r.prometheus()
    for line in ('distill_requests_total{arm="teacher"} 1', 'distill_routed_requests_total{arm="teacher"} 1',
                 'distill_routed_requests_total{arm="student"} 0', 'distill_errors_total{arm="student",status="400"} 1',
                 'distill_tokens_total{arm="teacher",kind="prompt"} 100',
                 'distill_latency_seconds{arm="student",quantile="0.5"} 0.1',
                 'distill_latency_seconds_count{arm="teacher"} 1', "distill_student_share 0.25",
                 "distill_shadow_agreement NaN", "distill_rollbacks_total 0", "distill_rollout_stage 0",
                 'distill_rollout_rule_limit{rule="error_rate"} 0.05', 'distill_rollout_rule_limit{rule="agreement"} 0.9',
                 'distill_rollout_rule_limit{rule="similarity"} NaN', 'distill_rollout_rule_limit{rule="latency_p95"} 10.0',
                 'distill_rollback_firings_total{rule="agreement"} 0', "distill_student_unparsable_total 0"):
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
        "distill_stale_results": "counter", "distill_rollbacks": "counter", "distill_rollback_firings": "counter"}


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
    from distill.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["serve", "--teacher", "T", "--student", "S", "--adapter", "A", "--port", "9001"])
    assert args.func.__name__ == "_serve_cli" and args.port == 9001
    args = parser.parse_args(["compare-latency", "--url", "http://127.0.0.1:1", "--limit", "3"])
    assert args.func.__name__ == "_compare_cli"
