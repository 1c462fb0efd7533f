"""The seeds' thinking teacher (Qwen3-30B-A3B-Thinking-2507) as it behaves, through every stage, on its test
double: the tiny model whose chat template opens the think block in the generation prompt and which was taught to
write a short reasoning, `</think>` and `Final Answer: <label>` (distill.local_models, `tiny_thinking`). Real Ray,
real vLLM engines, real Serve HTTP on 127.0.0.1.

The task is configs/tasks/language-id-thinking.yaml with a reasoning budget that the tiny model's 4,096-token
context holds (the shipped 4,080 does not, and is refused: see the budget test).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from distill.config import ConfigError
from distill.local_models import sample_data_path

THINKING_TASK = Path(__file__).resolve().parents[1] / "configs" / "tasks" / "language-id-thinking.yaml"
SAMPLE = [json.loads(line) for line in sample_data_path().read_text(encoding="utf-8").splitlines()]
REASONING_TOKENS = 64


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> str:
    """The thinking task with a reasoning budget of 64 tokens (the double reasons in 11)."""
    import yaml

    spec = yaml.safe_load(THINKING_TASK.read_text(encoding="utf-8"))
    spec["teacher"]["reasoning_tokens"] = REASONING_TOKENS
    path = tmp_path_factory.mktemp("task") / "language-id-thinking-64.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def thinking_generation(ray_cluster, tiny_thinking, task_file, tmp_path_factory) -> tuple[str, dict]:
    """24 rows of teacher data from the thinking double, with its top-5 soft labels."""
    from distill.generate.config import GenerateConfig
    from pipelines.generate import main

    out = str(tmp_path_factory.mktemp("thinking-generation"))
    return out, main(GenerateConfig(task=task_file, teacher=tiny_thinking, output=out, limit=24, logprobs=5))


def test_soft_labels_of_a_thinking_teacher_are_scored_at_its_answer_alone(thinking_generation, tiny_thinking):
    """Generation asks the thinking teacher for no logprobs (they would cover its reasoning); each answer is then
    scored after the reasoning the teacher wrote (the soft-label pass): one top-5 row per answer token, starting
    at the answer's first token, never one over the reasoning."""
    from transformers import AutoTokenizer

    from distill.formats import DATA_SCHEMA

    out, manifest = thinking_generation
    assert manifest["template_opens_reasoning"] is True and "logprobs" not in manifest["sampling"]
    assert manifest["sampling"]["max_tokens"] == REASONING_TOKENS + 16
    assert manifest["rows_written"] >= 20, manifest
    assert manifest["soft_labels_after_reasoning"]["rows"] == manifest["rows_written"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_thinking)
    data = pq.read_table(Path(out) / "data")
    assert data.schema.equals(DATA_SCHEMA)
    for row in data.to_pylist():
        reasoning = tokenizer.decode(row["reasoning_token_ids"])
        answer = tokenizer.decode(row["teacher_token_ids"], skip_special_tokens=True)
        assert reasoning.rstrip().endswith("</think>") and "Final Answer" not in reasoning
        assert answer == row["answer"] and answer.startswith("Final Answer:")
        assert len(row["topk_ids"]) == len(row["topk_logprobs"]) == len(row["teacher_token_ids"])
        assert all(len(k) == 5 for k in row["topk_ids"])
        # The teacher wrote these tokens at temperature 0.15: each is among its own top 5 in that context.
        assert all(t in k for t, k in zip(row["teacher_token_ids"], row["topk_ids"]))


def test_engine_budgets_are_planned_and_a_setting_that_cannot_hold_them_is_refused_before_start(
        tiny_thinking, task_file, tmp_path):
    """Each pass's context is the longest prompt + its max_tokens (the reasoning and answer budgets); a set
    max_model_len below it, or a model whose own context is shorter, is a ConfigError naming the figures, raised
    before any engine (or Ray) starts."""
    from transformers import AutoTokenizer

    from distill.engine import EngineConfig, plan_pass, run_requests
    from distill.generate.config import GenerateConfig
    from distill.sampling import teacher_sampling
    from distill.tasks import load_task
    from pipelines.generate import main

    tokenizer = AutoTokenizer.from_pretrained(tiny_thinking)
    task = load_task(task_file)
    sampling = teacher_sampling(task, tokenizer)
    requests = [{"key": r["id"], "messages": task.teacher_messages(r["text"]), "sampling_params": sampling}
                for r in SAMPLE[:6]]
    longest = max(len(tokenizer(tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True,
                                                              tokenize=False))["input_ids"]) for r in requests)
    planned = plan_pass("teacher", requests, tiny_thinking, EngineConfig(), tokenizer)
    assert planned.max_model_len == longest + REASONING_TOKENS + 16
    with pytest.raises(ConfigError, match=rf"teacher \({longest} prompt tokens \+ max_tokens {REASONING_TOKENS + 16}"
                                          rf" in its longest request\) needs {planned.max_model_len} tokens of "
                                          r"context, but engine.max_model_len is 1024"):
        run_requests("teacher", requests, tiny_thinking, EngineConfig(max_model_len=1024), tokenizer=tokenizer)
    shipped = load_task(str(THINKING_TASK))  # 4,080 reasoning tokens: more than the double's 4,096 context holds
    with pytest.raises(ConfigError, match=r"more than the 4096 that .* holds \(max_position_embeddings\)"):
        plan_pass("teacher", [{**r, "sampling_params": teacher_sampling(shipped, tokenizer)} for r in requests], tiny_thinking,
                  EngineConfig(), tokenizer)
    source = tmp_path / "q.jsonl"
    source.write_text("\n".join(json.dumps({"text": r["text"]}) for r in SAMPLE[:4]), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"the task prompt alone takes \d+ tokens and the teacher's budget "
                                          rf"{REASONING_TOKENS + 16} \(reasoning \+ answer\), more than "
                                          r"engine.max_model_len=1024"):
        main(GenerateConfig(task=task_file, teacher=tiny_thinking, input=str(source), output=str(tmp_path / "g"),
                            engine={"max_model_len": 1024}))


def test_on_policy_scores_the_students_answer_after_a_finished_reasoning(ray_cluster, tiny_thinking, task_file):
    """The teacher scores exactly the student's answer tokens, rendered after a finished, empty reasoning
    (`<think>\\n\\n</think>\\n\\n`, as Qwen3 writes one): the double's first choice there is the answer's first token.
    Inside the open think block, where its template leaves it, the same tokens would read as reasoning."""
    from transformers import AutoTokenizer

    from distill.engine import EngineConfig
    from distill.tasks import load_task
    from distill.train.onpolicy import score_with_teacher

    tokenizer = AutoTokenizer.from_pretrained(tiny_thinking)
    task = load_task(task_file)
    rows = [{"id": r["id"], "text": r["text"]} for r in SAMPLE[64:70]]
    answer = tokenizer("Final Answer: de", add_special_tokens=False)["input_ids"]
    samples = {r["id"]: {"prompt_ids": [], "tokens": answer} for r in rows}
    scores = score_with_teacher(rows, samples, task, tiny_thinking, EngineConfig(), top_k=3, seed=0)
    assert set(scores) == {r["id"] for r in rows}
    for r in rows:
        s = scores[r["id"]]
        assert len(s["token_logprobs"]) == len(s["topk_ids"]) == len(answer)  # the answer's positions, no more
        assert s["generated_tokens"] == answer
        assert tokenizer.decode(s["prompt_token_ids"]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert s["topk_ids"][0][0] == answer[0]  # after a closed reasoning the double starts its answer


def test_the_thinking_teacher_through_training_evaluation_and_serving(thinking_generation, tiny_model, tiny_thinking,
                                                                      task_file, tmp_path, free_port):
    """SFT with the soft labels, an on-policy round scored by the thinking teacher, the evaluation (its teacher
    pass behind the opened block), then Serve: the teacher arm honours the client's max_tokens for the visible
    answer while the task's budget bounds the reasoning (usage counts both), a stream never carries reasoning as
    content, capture keeps the teacher's answers, and the cascade routes between the arms."""
    from distill.evaluate.config import EvalConfig
    from distill.train.config import LoraOptions, TrainConfig
    from pipelines.evaluate import main as evaluate
    from pipelines.train import main as train
    from serve.app import start, stop
    from serve.config import ServeConfig

    generated, _ = thinking_generation
    common = dict(data=generated, student=tiny_model, workers=1, per_device_batch_size=4, gradient_accumulation=1,
                  learning_rate=3e-3, eval_every=4, checkpoint_every=4, validation_fraction=0.2, test_fraction=0.3,
                  lora=LoraOptions(rank=8, alpha=16))
    sft = train(TrainConfig(output=str(tmp_path / "sft"), max_steps=4, **common))
    assert sft["soft_labels"], sft  # the student shares the double's tokenizer: its top-k trains too
    op = train(TrainConfig(output=str(tmp_path / "op"), method="on-policy", init_adapter=str(tmp_path / "sft" / "adapter"),
                           on_policy={"rounds": 1, "queries_per_round": 6, "steps_per_round": 2, "top_k": 3,
                                      "max_new_tokens": 8, "engine": {"batch_size": 8}}, **common))
    assert op["rounds"][0]["samples"] == 6 and op["rounds"][0]["positions_trained"] > 0

    report = evaluate(EvalConfig(train=str(tmp_path / "op"), output=str(tmp_path / "report")))
    teacher = report["runs"]["teacher"]
    assert teacher["requests"] >= 4 and teacher["parse_rate"] > 0.5  # it closes its reasoning and answers
    assert teacher["unfinished_reasoning"] == 0 and teacher["cut_by_length"] == 0

    config = ServeConfig.model_validate({
        "task": task_file, "port": free_port(), "capture": str(tmp_path / "capture"), "capture_flush_seconds": 0.5,
        "teacher": {"model": tiny_thinking, "temperature": 0.0, "engine": {"kv_cache_memory_bytes": 128 * 1024**2}},
        "student": {"model": tiny_model, "adapters": {"language-id-thinking": str(tmp_path / "op" / "adapter")},
                    "engine": {"kv_cache_memory_bytes": 128 * 1024**2}},
        "rollout": {"mode": "cascade", "cascade": {"threshold": 0.99}, "student_share": 1.0,
                    "shadow_sample_rate": 0.0, "min_agreement": None, "max_student_p95_s": None}})
    url = start(config)
    try:
        def ask(model: str, text: str, **extra) -> dict:
            r = httpx.post(url + "/v1/chat/completions", timeout=120,
                           json={"model": model, "messages": [{"role": "user", "content": text}], **extra})
            assert r.status_code == 200, r.text
            return r.json()

        whole = ask("teacher", SAMPLE[80]["text"])
        message = whole["choices"][0]["message"]
        assert message["reasoning_content"].startswith("The letters") and "</think>" not in message["content"]
        assert message["content"].startswith("Final Answer:") and whole["choices"][0]["finish_reason"] == "stop"
        details = whole["usage"]["completion_tokens_details"]
        assert 0 < details["reasoning_tokens"] < whole["usage"]["completion_tokens"]

        cut = ask("teacher", SAMPLE[80]["text"], max_tokens=2)  # two answer tokens after the whole reasoning
        assert cut["choices"][0]["message"]["content"] == "Final Answer"
        assert cut["choices"][0]["finish_reason"] == "length"
        # Usage counts what the engine generated: the whole reasoning and at least the answer tokens shown.
        assert cut["usage"]["completion_tokens_details"]["reasoning_tokens"] == details["reasoning_tokens"]
        assert cut["usage"]["completion_tokens"] >= details["reasoning_tokens"] + 2
        assert cut["choices"][0]["message"]["reasoning_content"] == message["reasoning_content"]

        content, reasoning = [], []
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=120,
                          json={"model": "teacher", "stream": True, "max_tokens": 2,
                                "messages": [{"role": "user", "content": SAMPLE[80]["text"]}]}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[len("data: "):])
                    for choice in event["choices"]:
                        content.append(choice["delta"].get("content") or "")
                        reasoning.append(choice["delta"].get("reasoning_content") or "")
        assert "".join(content) == "Final Answer" and "".join(reasoning).strip() == message["reasoning_content"]

        routed = [ask("routed", r["text"]) for r in SAMPLE[81:85]]
        assert {a["arm"] for a in routed} <= {"student", "teacher"}
        stats = httpx.get(url + "/stats", timeout=30).json()
        assert stats["cascade"]["requests"] == 4
    finally:
        stop(config)
    captured = pq.read_table(tmp_path / "capture" / "data").to_pylist()
    assert captured and all(r["reasoning"].startswith("The letters") for r in captured)
    assert all(r["answer"].startswith("Final Answer:") for r in captured)
