"""Task specs and input checks: fast, no Ray, no engine."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill.config import ConfigError, load_config
from distill.inputs import InputError, content_id, read_queries
from distill.tasks import builtin_tasks, load_task, split_reasoning
from distill.generate.config import GenerateConfig


def test_builtin_tasks_load_and_render():
    assert {"language-id", "persona"} <= set(builtin_tasks())
    task = load_task("language-id")
    assert task.answer.labels == ["ar", "de", "el", "en", "es", "fr", "hi", "ru", "tr", "ur", "vi", "zh", "ot"]
    assert task.teacher.temperature == 0.15
    teacher = task.teacher_messages("Bonjour tout le monde")
    assert teacher[0]["role"] == "system" and len(teacher[0]["content"]) > 2000
    assert teacher[1] == {"role": "user", "content": "Text: Bonjour tout le monde"}
    # The student never sees the prompt.
    assert task.student_messages("Bonjour", "Final Answer: fr") == [
        {"role": "user", "content": "Bonjour"}, {"role": "assistant", "content": "Final Answer: fr"}]
    assert load_task("persona").answer.type == "free_text"


@pytest.mark.parametrize("raw, reasoning, visible, finished", [
    ("Final Answer: en", None, "Final Answer: en", True),
    ("<think>Latin script, 'the'.</think>\nFinal Answer: en", "Latin script, 'the'.", "Final Answer: en", True),
    # Qwen3-Thinking: the template opened the block, the output only closes it.
    ("Latin script.\n</think>\n\nFinal Answer: en", "Latin script.", "Final Answer: en", True),
    ("<think>still thinking about", "still thinking about", "", False),
])
def test_split_reasoning(raw, reasoning, visible, finished):
    assert split_reasoning(raw) == (reasoning, visible, finished)


def test_a_template_that_opens_the_reasoning_makes_an_output_without_its_end_no_answer(tiny_model, tiny_thinking):
    """Thinking-2507's template opens the think block itself: an output that never closes it is a reasoning cut by
    the budget, whatever it was weighing, never an answer; a model that answers directly means what it writes."""
    from transformers import AutoTokenizer

    from distill.chat import opens_reasoning, teacher_output

    task = load_task("language-id")
    messages = task.teacher_messages("Bonjour")
    assert opens_reasoning(AutoTokenizer.from_pretrained(tiny_thinking), messages)
    assert not opens_reasoning(AutoTokenizer.from_pretrained(tiny_model), messages)
    weighing = "French? Final Answer: de would be wrong, so"
    cut = task.parse(teacher_output(weighing, opened=True))
    assert cut.answer is None and cut.reason == "reasoning not finished (raise teacher.reasoning_tokens)"
    assert cut.reasoning == weighing and cut.visible == ""
    assert task.parse(teacher_output(weighing, opened=False)).answer == "Final Answer: de"
    done = task.parse(teacher_output("French.\n</think>\n\nFinal Answer: fr", opened=True))
    assert done.answer == "Final Answer: fr" and done.reasoning == "French."


def test_parse_answers():
    task = load_task("language-id")
    assert task.parse("<think>x</think>Final Answer: de").answer == "Final Answer: de"
    assert task.parse("final answer?").reason == "no answer matching the task pattern"
    assert task.parse("Final Answer: xx").reason == "label 'xx' not in the label set"
    assert task.parse("<think>never closed").reason.startswith("reasoning not finished")
    assert task.label_of("Final Answer: zh") == "zh"
    assert task.canonical_answers()[0] == "Final Answer: ar"


def write_yaml(path, data):
    path.write_text(json.dumps(data))  # JSON is YAML
    return str(path)


def test_user_task_from_yaml_and_field_errors(tmp_path):
    ok = write_yaml(tmp_path / "sentiment.yaml", {
        "name": "sentiment", "prompt": {"system": "Rate the sentiment.", "user": "Review: {query}"},
        "answer": {"type": "labels", "labels": ["pos", "neg"], "pattern": r"Sentiment:\s*(\w+)",
                   "template": "Sentiment: {label}"},
        "teacher": {"constrained": True, "max_tokens": 8}})
    task = load_task(ok)
    assert task.parse("Sentiment: neg").answer == "Sentiment: neg"

    bad = write_yaml(tmp_path / "bad.yaml", {
        "name": "bad task", "prompt": {"user": "no slot here"},
        "answer": {"type": "labels", "labels": ["a", "a"], "pattern": "(", "template": "x"},
        "teacher": {"temperature": -1}, "colour": "blue"})
    with pytest.raises(ConfigError) as err:
        load_task(bad)
    message = str(err.value)
    for field in ("name", "prompt.user", "answer", "teacher.temperature", "colour"):
        assert field in message, (field, message)

    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        load_task("nope")
    with pytest.raises(ConfigError, match="only possible with a label set"):
        load_task(write_yaml(tmp_path / "c.yaml", {
            "name": "c", "prompt": {"user": "{query}"}, "answer": {"type": "free_text"},
            "teacher": {"constrained": True}}))


def test_generate_config_rejects_unknown_and_bad_fields(tmp_path):
    path = write_yaml(tmp_path / "gen.yaml", {"samples": 0, "engine": {"max_actors": 1, "min_actors": 2},
                                              "temprature": 0.3})
    with pytest.raises(ConfigError) as err:
        load_config(GenerateConfig, path)
    for field in ("samples", "engine", "temprature"):
        assert field in str(err.value)


def test_read_queries_every_row_accounted(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"hello world\n\n   \nbad \xff\xfe bytes\nhello world\nsecond line\r\n")
    (folder / "b.jsonl").write_text("\n".join([
        json.dumps({"id": "j1", "text": "Guten Tag", "label": "de"}),
        "{not json",
        json.dumps({"id": "j2", "body": "no text field"}),
        json.dumps({"id": "j1", "text": "same id again"}),
        json.dumps({"id": 7, "text": 12}),
        "",
        json.dumps(["a", "list"]),
    ]) + "\n")
    pq.write_table(pa.table({"text": ["Hola", None], "label": ["es", None]}), folder / "c.parquet")

    rows = list(read_queries(str(folder)))
    assert [r.row for r in rows] == list(range(len(rows))) and len(rows) == 6 + 7 + 2
    reasons = [r.reason for r in rows]
    assert reasons[:6] == [None, "empty text", "blank text (whitespace only)",
                           "undecodable bytes (not UTF-8 at byte 4)",
                           f"duplicate id {content_id('hello world')!r} (first seen at {folder}/a.txt:1)", None]
    assert rows[5].text == "second line"  # CRLF handled, whitespace stripped
    assert reasons[6:13] == [None, "invalid JSON: Expecting property name enclosed in double quotes",
                             "missing field 'text'", f"duplicate id 'j1' (first seen at {folder}/b.jsonl:1)",
                             "text is a int, not a string", "blank line", "a JSON list, not an object"]
    assert rows[6].gold == "de" and rows[6].id == "j1"
    assert rows[13].id == content_id("Hola") and rows[13].gold == "es"
    assert rows[14].reason == "text is null" and rows[14].id == "row-14"
    # Every rejected row still has an id, so the reject log can account for it.
    assert all(r.id for r in rows)
    assert len(list(read_queries(str(folder), limit=4))) == 4


def test_structurally_wrong_inputs_fail_clearly(tmp_path):
    with pytest.raises(InputError, match="no such file or directory"):
        list(read_queries(str(tmp_path / "missing.jsonl")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .txt, .jsonl, .parquet files found"):
        list(read_queries(str(tmp_path / "empty")))
    pq.write_table(pa.table({"query": ["a"]}), tmp_path / "q.parquet")
    with pytest.raises(InputError, match=r"no column 'text' \(columns: query\)"):
        list(read_queries(str(tmp_path / "q.parquet")))
    (tmp_path / "q.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(InputError, match=r"q.jsonl:1: no column 'text' \(columns: prompt\)"):
        list(read_queries(str(tmp_path / "q.jsonl")))


def test_a_sample_of_the_bundled_file_covers_every_label_and_splits_like_the_whole():
    """The bundled sample is grouped by language: a sample must reach every label, and it must not be drawn by the
    hash that also decides training's split (then the sample would be mostly test and validation rows)."""
    from collections import Counter

    from distill.inputs import read_queries, sampled_positions
    from distill.local_models import sample_data_path
    from distill.train.examples import split_of

    keep = sampled_positions(str(sample_data_path()), 400)
    rows = list(read_queries(str(sample_data_path()), keep=keep))
    assert len(rows) == 400
    labels = Counter(r.gold for r in rows)
    everything = Counter(r.gold for r in read_queries(str(sample_data_path())))
    assert set(labels) == set(everything)
    parts = Counter(split_of([r.id for r in rows], 0.1, 0, 0.15).values())
    assert 0.08 <= parts["test"] / 400 <= 0.22 and 0.05 <= parts["validation"] / 400 <= 0.15
