"""Fast unit tests of the rollout rules, the wire format and the serve config (no Ray, no vLLM)."""

from __future__ import annotations

import json
import random

import pytest
from pydantic import ValidationError

from distill.config import ConfigError
from distill.tasks import load_task, split_reasoning
from serve.arms import teacher_conversation
from distill.engine import adapter_rank, vllm_max_lora_rank
from serve.config import ServeConfig
from serve.protocol import ChatRequest, ThinkSplitter, validation_message
from serve.router import STUDENT, TEACHER, Rollout, RolloutConfig, agreement, normalise, quantile, user_fraction

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
def test_agreement_compares_labels_for_label_tasks_and_normalised_text_otherwise():
    assert agreement(LANGID, "Final Answer: en", "Final Answer: en") is True
    assert agreement(LANGID, "Final Answer: en", "  Final Answer:   en  ") is True
    assert agreement(LANGID, "<think>hmm</think>Final Answer: fr", "Final Answer: fr") is True
    assert agreement(LANGID, "Final Answer: en", "Final Answer: fr") is False
    assert agreement(LANGID, "Final Answer: en", "no idea") is False
    assert agreement(LANGID, "garbage", "Final Answer: en") is None  # teacher unparseable: not judged
    assert agreement(PERSONA, "Ahoy, matey!", "ahoy,   MATEY") is True
    assert agreement(PERSONA, "Ahoy, matey!", "Hello friend") is False
    assert agreement(PERSONA, "   ", "anything") is None
    assert normalise("  Ｈｅｌｌｏ,\n World!! ") == "hello, world"


def test_quantile_interpolates_like_numpy():
    assert quantile([], 0.5) is None
    assert quantile([3.0], 0.95) == 3.0
    assert quantile([1, 2, 3, 4], 0.5) == 2.5
    assert quantile(range(101), 0.95) == pytest.approx(95.0)


# -- shadow and rollback -----------------------------------------------------------------------------------------
def test_rollback_when_agreement_falls_below_threshold_after_enough_samples():
    r = rollout(student_share=0.5, shadow_sample_rate=1.0, agreement_window=10, min_agreement_samples=10,
                min_agreement=0.8, max_student_p95_s=None)
    for i in range(9):
        assert r.should_shadow()
        assert r.record_shadow("Final Answer: en", "Final Answer: fr") is None  # too few samples yet
    assert r.share == 0.5
    assert r.should_shadow()
    event = r.record_shadow("Final Answer: en", "Final Answer: fr")
    assert event["kind"] == "rollback" and event["from"] == 0.5 and event["to"] == 0.0
    assert "agreement 0.000" in event["reason"]
    assert r.share == 0.0 and r.rollbacks == 1 and r.events[-1] is event
    assert r.choose_arm("anyone") == TEACHER
    snap = r.snapshot()
    assert snap["rollbacks"] == 1 and snap["student_share"] == 0.0 and snap["agreement"]["shadow"]["disagree"] == 10
    assert json.dumps(snap)  # JSON-ready


def test_high_agreement_does_not_roll_back_and_unjudged_samples_do_not_count():
    r = rollout(student_share=0.5, shadow_sample_rate=1.0, agreement_window=10, min_agreement_samples=5,
                min_agreement=0.8, max_student_p95_s=None)
    for i in range(50):
        r.should_shadow()
        r.record_shadow("Final Answer: en", "Final Answer: en" if i % 10 else "Final Answer: fr")
        r.should_shadow()
        r.record_shadow("unparseable", "Final Answer: en")
    assert r.share == 0.5 and r.rollbacks == 0
    assert r.shadow["unjudged"] == 50 and r.live_agreement() >= 0.8


def test_rollback_when_student_p95_latency_exceeds_the_limit():
    r = rollout(student_share=0.1, max_student_p95_s=1.0, latency_window=20, min_latency_samples=20)
    for _ in range(19):
        assert r.record_request(STUDENT, 0.2, 10, 2, routed=True) is None
    for _ in range(100):  # the teacher's latency never counts against the student
        assert r.record_request(TEACHER, 50.0, 10, 2, routed=True) is None
    assert r.record_request(STUDENT, 0.2, 10, 2, routed=True) is None  # 20 fast requests: fine
    event = None
    for _ in range(2):
        event = r.record_request(STUDENT, 5.0, 10, 2, routed=True) or event
    assert event is not None and "p95 latency" in event["reason"] and r.share == 0.0


def test_share_change_resets_the_windows_and_is_logged():
    r = rollout(student_share=0.1, shadow_sample_rate=1.0, agreement_window=10, min_agreement_samples=10,
                min_agreement=0.9, max_student_p95_s=None)
    for _ in range(9):
        r.should_shadow()
        r.record_shadow("Final Answer: en", "Final Answer: fr")
    event = r.set_share(0.5, "stage 3", shadow_rate=0.25)
    assert event == {"time": 1000.0, "kind": "share_change", "from": 0.1, "to": 0.5, "reason": "stage 3",
                     "shadow_sample_rate": 0.25}
    assert len(r.agreements) == 0 and r.shadow_rate == 0.25
    with pytest.raises(ValueError):
        r.set_share(1.5, "bad")
    with pytest.raises(ValueError):
        r.set_share(0.5, "bad", shadow_rate=-1)


def test_shadow_requests_in_flight_are_capped():
    r = rollout(shadow_sample_rate=1.0, max_shadow_in_flight=2)
    assert r.should_shadow() and r.should_shadow()
    assert not r.should_shadow()
    assert r.shadow["skipped"] == 1
    r.record_shadow(None, "x")  # a failed shadow call frees its slot too
    assert r.shadow["failed"] == 1 and r.should_shadow()
    assert not rollout(shadow_sample_rate=0.0).should_shadow()


def test_prometheus_text_has_every_metric():
    r = rollout(student_share=0.25)
    r.record_request(TEACHER, 0.5, 100, 3, routed=True)
    r.record_request(STUDENT, 0.1, 10, 3, routed=False)
    r.record_error(STUDENT, 400)
    text = r.prometheus()
    for line in ('distill_requests_total{arm="teacher"} 1', 'distill_routed_requests_total{arm="teacher"} 1',
                 'distill_routed_requests_total{arm="student"} 0', 'distill_errors_total{arm="student",status="400"} 1',
                 'distill_tokens_total{arm="teacher",kind="prompt"} 100',
                 'distill_latency_seconds{arm="student",quantile="0.5"} 0.1',
                 'distill_latency_seconds_count{arm="teacher"} 1', "distill_student_share 0.25",
                 "distill_shadow_agreement NaN", "distill_rollbacks_total 0"):
        assert line in text.splitlines(), line
    # The official parser reads it back: every family, with the right types.
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families == {
        "distill_requests": "counter", "distill_routed_requests": "counter", "distill_errors": "counter",
        "distill_tokens": "counter", "distill_latency_seconds": "summary", "distill_student_share": "gauge",
        "distill_shadow_agreement": "gauge", "distill_shadow_comparisons": "counter", "distill_rollbacks": "counter"}


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
