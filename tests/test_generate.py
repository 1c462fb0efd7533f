"""Generation end to end on a real local Ray cluster with real vLLM engines (tiny model; SmolLM2 for the last)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from distill.formats import DATA_SCHEMA, REJECT_SCHEMA
from distill.inputs import content_id
from distill.local_models import sample_data_path
from distill.processes import kill_session
from distill.storage import read_columns
from distill.tasks import load_task
from distill.generate.config import GenerateConfig
from pipelines.generate import main

SAMPLE = [json.loads(line) for line in sample_data_path().open(encoding="utf-8")]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def outputs(out: str):
    data = pq.read_table(f"{out}/data") if os.listdir(f"{out}/data") else DATA_SCHEMA.empty_table()
    rejects = pq.read_table(f"{out}/rejects") if os.listdir(f"{out}/rejects") else REJECT_SCHEMA.empty_table()
    manifest = json.loads(Path(out, "manifest.json").read_text())
    return data, rejects, manifest


def assert_each_id_once(out: str, expected_ids: set[str]):
    data, rejects, manifest = outputs(out)
    ids = data.column("id").to_pylist() + rejects.column("id").to_pylist()
    assert max(Counter(ids).values()) == 1, "an id was written twice"
    assert set(ids) == expected_ids
    assert manifest["rows_in"] == len(expected_ids) == manifest["rows_written"] + manifest["rows_rejected"]
    assert manifest["rows_written"] == data.num_rows and manifest["rows_rejected"] == rejects.num_rows


def test_pipeline_with_bad_rows_samples_and_logprobs(tmp_path, ray_cluster, tiny_model):
    """The whole pipeline: schema, counts, ids, every bad row rejected with its reason, majority vote, top-k."""
    good = SAMPLE[::60][:20]
    rows = [{"id": r["id"], "text": r["text"], "label": r["label"]} for r in good] + [
        {"id": "blank", "text": "   "},
        {"id": good[0]["id"], "text": "a second row with a taken id"},
        {"id": "too-long", "text": "word " * 3000},
        {"id": "no-text", "query": "wrong field"},
    ]
    source = write_jsonl(tmp_path / "queries.jsonl", rows)
    out = str(tmp_path / "gen")
    config = GenerateConfig(input=source, output=out, teacher=tiny_model, samples=3, logprobs=3, rows_per_shard=8)
    manifest = main(config)

    data, rejects, _ = outputs(out)
    assert data.schema.equals(DATA_SCHEMA) and rejects.schema.equals(REJECT_SCHEMA)
    assert manifest["rows_in"] == 24 and manifest["rows_written"] == 20 and manifest["rows_rejected"] == 4
    reasons = dict(zip(rejects.column("row").to_pylist(), rejects.column("reason").to_pylist()))
    assert reasons[20] == "blank text (whitespace only)"
    assert reasons[21].startswith(f"duplicate id {good[0]['id']!r} (first seen at {source}:1)")
    assert re.match(r"too long: \d+ query tokens, the engine leaves \d+ after the \d+-token prompt", reasons[22])
    assert reasons[23] == "missing field 'text'"
    assert set(rejects.column("stage").to_pylist()) == {"input"}

    task = load_task("language-id")
    canonical = set(task.canonical_answers())
    by_id = {r["id"]: r for r in data.to_pylist()}
    assert set(by_id) == {r["id"] for r in good}
    for r in good:
        ex = by_id[r["id"]]
        # Prompt-free chat example: the bare query, then the teacher's canonical answer.
        assert ex["messages"] == [{"role": "user", "content": r["text"]},
                                  {"role": "assistant", "content": ex["answer"]}]
        assert ex["answer"] in canonical and ex["label"] == task.label_of(ex["answer"])
        assert ex["gold"] == r["label"] and ex["task"] == "language-id" and ex["teacher"] == tiny_model
        assert ex["prompt_tokens"] > 1000  # the long prompt was there for the teacher ...
        assert task.prompt.system[:200] not in json.dumps(ex["messages"])  # ... and is nowhere in the example
        assert ex["samples"] == 3 and any(abs(ex["agreement"] - v) < 1e-6 for v in (1 / 3, 2 / 3, 1.0))
        # Top-k logprobs of the chosen answer's tokens, aligned with them, best first.
        assert len(ex["topk_ids"]) == len(ex["teacher_token_ids"]) == len(ex["topk_logprobs"]) > 0
        for ids, lps in zip(ex["topk_ids"], ex["topk_logprobs"]):
            assert 1 <= len(ids) <= 3 and lps == sorted(lps, reverse=True)

    # `datasets` reads the output as it is.
    import datasets
    ds = datasets.load_dataset("parquet", data_dir=f"{out}/data", split="train")
    assert ds.num_rows == 20 and ds[0]["messages"][0]["role"] == "user"

    # Rerunning a complete output does nothing and changes nothing.
    before = sorted(os.listdir(f"{out}/data"))
    assert main(config)["rows_written"] == 20 and sorted(os.listdir(f"{out}/data")) == before


def test_unparseable_answers_are_retried_then_rejected(tmp_path, ray_cluster, tiny_model):
    """Without constrained decoding the random tiny model never writes 'Final Answer: xx': each query is tried
    1 + retries times (a new engine seed each pass), then rejected with the parser's reason."""
    task = tmp_path / "free-labels.yaml"
    task.write_text(json.dumps({
        "name": "free-labels", "prompt": {"system": "Answer with Final Answer: <label>.", "user": "{query}"},
        "answer": {"type": "labels", "labels": ["en", "fr"], "pattern": r"Final Answer:\s*(\w\w)\b",
                   "template": "Final Answer: {label}"},
        "teacher": {"max_tokens": 6}}))
    source = write_jsonl(tmp_path / "q.jsonl", [{"text": r["text"]} for r in SAMPLE[:6]])
    out = str(tmp_path / "gen")
    manifest = main(GenerateConfig(task=str(task), input=source, output=out, teacher=tiny_model, retries=1))
    assert_each_id_once(out, {content_id(r["text"]) for r in SAMPLE[:6]})
    assert manifest["rows_written"] == 0 and manifest["rows_rejected"] == 6
    assert manifest["timings"]["attempts"]["0"]["retried"] == 6 and manifest["timings"]["attempts"]["1"]["rejected"] == 6
    _, rejects, _ = outputs(out)
    assert set(rejects.column("reason").to_pylist()) == {
        "teacher: no answer matching the task pattern (after 2 attempt(s))"}
    assert all(t for t in rejects.column("teacher_output").to_pylist())


def test_a_thinking_teacher_cut_by_its_budget_is_rejected_as_unfinished_never_parsed(tmp_path, ray_cluster,
                                                                                      tiny_thinking):
    """The thinking double's template opens the think block (as Thinking-2507's does) and a budget of 4 + 4
    tokens never lets it close (its reasoning and `</think>` take 17): each query is rejected as an unfinished
    reasoning, not read as an answer, and counted as cut by length. A task that constrains the teacher's output, or gives it no
    reasoning budget, is refused before any engine starts."""
    from distill.config import ConfigError

    source = write_jsonl(tmp_path / "q.jsonl", [{"id": r["id"], "text": r["text"]} for r in SAMPLE[:6]])
    with pytest.raises(ConfigError, match="opens a think block"):
        main(GenerateConfig(task="language-id", input=source, output=str(tmp_path / "constrained"),
                            teacher=tiny_thinking))
    with pytest.raises(ConfigError, match=r"opens a think block, but task 'persona' gives the teacher no "
                                          r"reasoning budget \(teacher.reasoning_tokens: 0\)"):
        main(GenerateConfig(task="persona", input=source, output=str(tmp_path / "no-budget"),
                            teacher=tiny_thinking))
    thinking_task = Path(__file__).resolve().parents[1] / "configs" / "tasks" / "language-id-thinking.yaml"
    with pytest.raises(ConfigError, match="a thinking teacher needs a reasoning budget"):
        main(GenerateConfig(task=str(thinking_task), input=source, output=str(tmp_path / "zero-budget"),
                            teacher=tiny_thinking, reasoning_tokens=0))
    out = str(tmp_path / "gen")
    manifest = main(GenerateConfig(task=str(thinking_task), input=source, output=out, teacher=tiny_thinking,
                                   reasoning_tokens=4, max_tokens=4, retries=0, logprobs=0))
    assert manifest["template_opens_reasoning"] is True
    assert manifest["sampling"]["max_tokens"] == 4 + 4  # the reasoning budget + the answer's
    assert manifest["rows_written"] == 0 and manifest["rows_rejected"] == 6 and manifest["cut_by_length"] == 6
    _, rejects, _ = outputs(out)
    assert set(rejects.column("reason").to_pylist()) == {
        "teacher: reasoning not finished (raise teacher.reasoning_tokens) (after 1 attempt(s))"}


def test_killed_run_resumes_with_each_id_exactly_once(tmp_path, ray_cluster, tiny_model):
    """Kill -9 a generation run after its first shards land, rerun into the same output: every id once."""
    # 120 queries: the kill comes within 0.2 s of the second 4-row shard, far before the last one.
    rows = [{"id": r["id"], "text": r["text"], "label": r["label"]} for r in SAMPLE[:120]]
    source = write_jsonl(tmp_path / "q.jsonl", rows)
    out = tmp_path / "gen"
    config = tmp_path / "gen.yaml"
    config.write_text(json.dumps({"rows_per_shard": 4, "flush_seconds": 1,
                                  "engine": {"batch_size": 4, "max_concurrent_batches": 1}}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "pipelines.cli", "generate", "--input", source, "--output", str(out),
           "--teacher", tiny_model, "--config", str(config)]
    log = open(tmp_path / "killed.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            shards = list((out / "data").glob("*.parquet")) if (out / "data").exists() else []
            if len(shards) >= 2:
                break
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            time.sleep(0.2)
        else:
            pytest.fail("no shard was written in time")
    finally:
        kill_session(proc.pid)  # the driver, the local Ray cluster it started, and the vLLM engines
        proc.wait()
    partial = read_columns(str(out / "data"), ["id"]).num_rows
    assert 0 < partial < len(rows), "the kill must land mid-run"
    assert not (out / "manifest.json").exists()

    main(GenerateConfig(input=source, output=str(out), teacher=tiny_model, rows_per_shard=4, flush_seconds=1,
                        engine={"batch_size": 16}))
    assert_each_id_once(str(out), {r["id"] for r in rows})


@pytest.mark.slow
def test_smollm2_end_to_end_on_sample_rows(tmp_path, ray_cluster, smollm2):
    """The real model on 50 rows of the bundled sample: every row answered with a valid label, or rejected."""
    rows = SAMPLE[::26][:50]
    source = write_jsonl(tmp_path / "q.jsonl", rows)
    out = str(tmp_path / "gen")
    # Both cores for the engine's threads, as the demo runs it.
    manifest = main(GenerateConfig(input=source, output=out, teacher=smollm2,
                                   engine={"batch_size": 25, "cpu_reserved_cores": 0}))
    assert_each_id_once(out, {r["id"] for r in rows})
    data, _, _ = outputs(out)
    task = load_task("language-id")
    # Constrained decoding: the weak model's every answer is a valid label.
    assert manifest["rows_written"] == 50
    assert all(task.label_of(a) for a in data.column("answer").to_pylist())
    assert len(set(data.column("label").to_pylist())) >= 2, "a real model does not answer one label for everything"
    # Each answer in the tokenizer's own spelling (distill.sampling.guided_choice), the tokens training scores.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    for answer, ids in zip(data.column("answer").to_pylist(), data.column("teacher_token_ids").to_pylist()):
        assert ids[:-1] == tokenizer(answer, add_special_tokens=False)["input_ids"] and ids[-1] in \
            tokenizer.all_special_ids, (answer, tokenizer.convert_ids_to_tokens(ids))


def test_engine_environment_reaches_the_engine_actors(tiny_model):
    """cpu_reserved_cores and env become the runtime_env of the ray.data.llm engine stage (and so of the vLLM
    processes it starts); an explicit env entry wins over the shortcut."""
    from distill.engine import EngineConfig, processor_config

    config = processor_config(EngineConfig(device="cpu", cpu_reserved_cores=0, env={"VLLM_LOGGING_LEVEL": "DEBUG"},
                                           max_model_len=512), tiny_model)
    assert config.runtime_env == {"env_vars": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_LOGGING_LEVEL": "DEBUG"}}
    config = processor_config(EngineConfig(device="cpu", cpu_reserved_cores=0, max_model_len=512,
                                           env={"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}), tiny_model)
    assert config.runtime_env == {"env_vars": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}}
    assert processor_config(EngineConfig(device="cpu", max_model_len=512), tiny_model).runtime_env is None


def test_rerun_with_changed_settings_is_refused_and_free_options_stay_free(tmp_path, ray_cluster, tiny_model):
    """A finished --limit 5 output rerun with --limit 8 (or another temperature, or another task prompt) is an
    error naming the changed settings, not a silent return of the old 5 rows; sharding options may change."""
    from distill.config import ConfigError

    source = write_jsonl(tmp_path / "q.jsonl", [{"id": r["id"], "text": r["text"]} for r in SAMPLE[:10]])
    out = str(tmp_path / "gen")
    config = GenerateConfig(input=source, output=out, teacher=tiny_model, limit=5)
    assert main(config)["rows_in"] == 5
    with pytest.raises(ConfigError, match=r"different settings \(limit\)"):
        main(config.model_copy(update={"limit": 8}))
    with pytest.raises(ConfigError, match=r"\(sampling\)"):
        main(config.model_copy(update={"temperature": 0.9}))
    task = tmp_path / "task.yaml"
    spec = load_task("language-id").model_dump()
    spec["prompt"]["system"] += "\nOne more rule."
    task.write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match=r"\(task\)"):
        main(config.model_copy(update={"task": str(task)}))
    again = main(GenerateConfig(**{**config.model_dump(), "rows_per_shard": 3, "flush_seconds": 5,
                                   "engine": {"batch_size": 2}}))
    assert again["rows_written"] + again["rows_rejected"] == 5
