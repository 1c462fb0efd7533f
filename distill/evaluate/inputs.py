"""What an evaluation runs on: the held-out rows and every model, taken from the config or from what the training
and generation outputs record (`resolve_inputs`), how the distilled student is served (`distilled_model`), and
every request of the three engine passes (`plan_requests`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import pyarrow.parquet as pq

from distill.chat import teacher_output
from distill.checkpoints import read_metrics
from distill.config import ConfigError
from distill.engine import resolve_device
from distill.evaluate import scores as E
from distill.evaluate.config import EvalConfig
from distill.sampling import student_sampling, teacher_sampling
from distill.scoring import scoring_sampling
from distill.storage import exists, join, list_files, read_columns, read_json, resolve
from distill.tasks import TaskSpec, load_task

log = logging.getLogger("distill.evaluate")  # the stage's name on its log lines, wherever the code lives


@dataclass
class Inputs:
    rows: list[dict]            # held-out rows: id, text, answer, gold (sorted by id)
    task: TaskSpec
    teacher: str
    student: str
    adapter: str
    data: str                   # where the rows came from
    train: Optional[str]
    summary: Optional[dict]     # OUT/train_summary.json
    manifest: Optional[dict]    # the generation manifest of `data`, if it is a generation output
    train_metrics: list[dict] = field(default_factory=list)  # OUT/metrics.jsonl
    selection_rows: list[dict] = field(default_factory=list)  # rows the selective threshold is chosen on


def _data_root(data: str) -> str:
    """Where the rows are: a generation output folder's data/ shards, else the Parquet file/folder itself."""
    if exists(join(data, "manifest.json")) or list_files(join(data, "data")):
        return join(data, "data")
    return data


def _read_rows(data: str) -> tuple[list[dict], dict[str, Optional[str]]]:
    root = _data_root(data)
    files = list_files(root)
    if not files:
        raise ConfigError(f"data {data}: no Parquet files (expected a generation output folder or DATA_SCHEMA "
                          f"Parquet)")
    fs, path = resolve(files[0])
    names = set(pq.read_schema(path, filesystem=fs).names)
    missing = {"id", "text", "answer"} - names
    if missing:
        raise ConfigError(f"data {data}: missing column(s) {sorted(missing)}; expected DATA_SCHEMA rows")
    rows = read_columns(root, ["id", "text", "answer"] + [c for c in ("gold", "teacher", "task") if c in names])
    rows = rows.to_pylist()
    origin = {c: next((r[c] for r in rows if r.get(c)), None) for c in ("teacher", "task")}
    for r in rows:
        r.setdefault("gold", None)
    return rows, origin


def resolve_inputs(config: EvalConfig) -> Inputs:
    """The held-out rows and every model, each taken from the config, else from what the artifacts record."""
    from distill.tasks import task_of_data

    summary, train_metrics = None, []
    if config.train:
        summary = read_json(join(config.train, "train_summary.json"))
        if summary is None:
            raise ConfigError(f"--train {config.train}: no train_summary.json (is it a training output?)")
        train_metrics = read_metrics(join(config.train, "metrics.jsonl"))
    if not config.data and not summary:
        raise ConfigError("nothing to evaluate: give --train OUT (a training output) or --data HELDOUT")
    data = config.data or summary["data"]
    rows, origin = _read_rows(data)
    rows.sort(key=lambda r: r["id"])
    selection_rows: list[dict] = []
    if not config.data:
        split_path = join(config.train, "split.parquet")
        if not exists(split_path):
            raise ConfigError(f"--train {config.train}: no split.parquet; pass --data to say what is held out")
        split = {s["id"]: s["split"] for s in read_columns(split_path, ["id", "split"]).to_pylist()}
        if config.split not in split.values():
            raise ConfigError(f"{split_path}: no rows in split {config.split!r} (splits there: "
                              f"{sorted(set(split.values()))})")
        if config.selection_split == config.split:
            raise ConfigError(f"selection_split {config.selection_split!r} is the held-out split: a threshold "
                              f"chosen on the rows it is graded on would grade itself")
        selection_rows = [r for r in rows if split.get(r["id"]) == config.selection_split][:config.selection_limit]
        rows = [r for r in rows if split.get(r["id"]) == config.split]
    if config.limit:
        rows = rows[:config.limit]
    if not rows:
        raise ConfigError(f"no held-out rows to evaluate in {data}")

    summary = summary or {}
    adapter = config.adapter or (join(config.train, "adapter") if config.train else None)
    if adapter is None:
        raise ConfigError("no adapter given and no training output to take it from; pass --adapter OUT/adapter")
    adapter_config = read_json(join(adapter, "adapter_config.json"))
    if adapter_config is None:
        raise ConfigError(f"adapter {adapter}: no adapter_config.json (a PEFT LoRA adapter folder is expected)")

    def pick(name: str, *candidates: Optional[str]) -> str:
        for c in candidates:
            if c:
                return c
        raise ConfigError(f"no {name} given and none recorded in the training output, the adapter or the data; "
                          f"pass --{name}")

    # The data's manifest records the whole task spec: a user's task file need not exist here (the training
    # summary names the task only).
    task = load_task(config.task) if config.task else task_of_data(data)
    if task is None:
        task = load_task(pick("task", summary.get("task"), origin["task"]))
    manifest = read_json(join(data, "manifest.json"))
    return Inputs(
        rows=rows, selection_rows=selection_rows, task=task,
        teacher=pick("teacher", config.teacher, summary.get("teacher"), origin["teacher"]),
        student=pick("student", config.student, summary.get("student"), adapter_config.get("base_model_name_or_path")),
        adapter=adapter, data=data, train=config.train, summary=summary or None, manifest=manifest,
        train_metrics=train_metrics,
    )


def distilled_model(config: EvalConfig, inputs: Inputs):
    """The distilled student as it ships (`distill.student_serving.student_artifact`, the decision serving makes
    too): the base + the adapter with LoRA on GPUs, the merged model on CPUs — the training run's OUT/merged when it
    holds this adapter, else merged once beside the adapter, where `distill serve` finds it."""
    from distill.student_serving import student_artifact

    summary = inputs.summary or {}
    trained_merge = summary.get("merged") if summary.get("adapter") == inputs.adapter else None
    return student_artifact(inputs.student, {inputs.task.name: inputs.adapter}, config.student_serving,
                            resolve_device(config.engine.device), inputs.task.name, trained_merge)


# ----------------------------------------------------------------------------------------------------------------
# The engine passes' requests
def plan_requests(config: EvalConfig, inputs: Inputs, tokenizer,
                  teacher_tokenizer) -> tuple[dict[str, list[dict]], dict]:
    """Every request of every pass, keyed by `request_key(id, kind)`: answer (greedy), sample (teacher's second sample), a / b /
    c (the teacher's answer tokens scored by the base student without and with the prompt, and by the distilled
    student). Also returns the scored tokens and context lengths."""
    task, rows = inputs.task, inputs.rows
    tokens, context_lengths = {}, []
    for r in rows:
        plain_ctx, plain = E.answer_tokens(tokenizer, task.student_messages(r["text"]), r["answer"])
        prompted_ctx, prompted = E.answer_tokens(tokenizer, task.teacher_messages(r["text"]), r["answer"])
        tokens[r["id"]] = {"a": plain, "b": prompted, "c": plain}
        context_lengths.append(len(prompted_ctx))
    longest = max(len(t["a"]) for t in tokens.values())
    student = student_sampling(task, config.student_max_tokens or longest + 16, tokenizer, config.student_constrained,
                               logprobs=1)
    greedy_teacher = teacher_sampling(task, teacher_tokenizer, temperature=0.0)
    sampled_teacher = teacher_sampling(task, teacher_tokenizer)

    def ask(r: dict, kind: str, messages: list[dict], sampling: dict) -> dict:
        return {"key": request_key(r["id"], kind), "messages": messages, "sampling_params": sampling}

    # The selection rows need only the teacher's and the distilled student's answers (to choose the threshold).
    selection = inputs.selection_rows
    requests = {
        "teacher": [ask(r, kind, task.teacher_messages(r["text"]), s) for r in rows
                    for kind, s in (("answer", greedy_teacher), ("sample", sampled_teacher))]
        + [ask(r, "answer", task.teacher_messages(r["text"]), greedy_teacher) for r in selection],
        "base": [req for r in rows for req in (
            ask(r, "answer", task.student_messages(r["text"]), student),
            ask(r, "a", task.student_messages(r["text"]), scoring_sampling(tokens[r["id"]]["a"])),
            ask(r, "b", task.teacher_messages(r["text"]), scoring_sampling(tokens[r["id"]]["b"])))],
        "student": [req for r in rows for req in (
            ask(r, "answer", task.student_messages(r["text"]), student),
            ask(r, "c", task.student_messages(r["text"]), scoring_sampling(tokens[r["id"]]["c"])))]
        + [ask(r, "answer", task.student_messages(r["text"]), student) for r in selection],
    }
    return requests, {"tokens": tokens, "context_lengths": context_lengths}


def request_key(row_id: str, kind: str) -> str:
    """The engine request key of a held-out row's request of one kind (answer, sample, a, b, c)."""
    return f"{row_id}|{kind}"


@dataclass(frozen=True)
class EnginePass:
    """One engine pass of the evaluation (teacher, base or distilled student): each request's engine result
    (distill.engine.run_requests) and the pass's wall time with start-up."""
    results: dict[str, dict]
    wall_s: float

    def result(self, row_id: str, kind: str = "answer") -> dict:
        return self.results[request_key(row_id, kind)]

    def behind_opened_reasoning(self) -> "EnginePass":
        """The pass of a teacher whose template opens the think block: each generated text as the teacher's
        output (distill.chat.teacher_output), so an unfinished reasoning parses as no answer."""
        return EnginePass({k: {**v, "generated_text": teacher_output(v["generated_text"], True)}
                           for k, v in self.results.items()}, self.wall_s)
