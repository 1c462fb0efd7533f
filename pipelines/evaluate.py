"""Evaluate: did the student internalize the prompt, how much faster and cheaper is it, should it ship?

    distill eval --train runs/train --output runs/eval
    distill eval --data HELDOUT --teacher MODEL --student MODEL_DIR --adapter OUT/adapter --output REPORT_DIR

1. Held-out queries: by default the split that training saved (`OUT/split.parquet`, rows of `split`) of the
   generation output training read (`OUT/train_summary.json` -> data); `--data` instead takes a generation output
   folder or any Parquet of DATA_SCHEMA rows, and then every row is held out.
2. Three generation runs on the same queries with the engines the pipeline uses (Ray Data x `ray.data.llm` vLLM,
   `distill.engine.processor_config`), greedy: the teacher with its prompt (and its guided choice when the task
   constrains the teacher), the base student with no prompt, and the distilled student (base + LoRA) with no
   prompt. The students decode freely unless `student_constrained`: what they write unaided is the honest measure
   of what they learned, and the parse rate says how often it was usable.
3. Prompt absorption for every task: mean NLL of the held-out teacher answers (the `answer` column training
   learned) under (a) base student without prompt, (b) base student with the prompt, (c) distilled student without
   prompt, with transformers forward passes; gap closed = (a - c) / (a - b).
4. Metrics (`distill.metrics`), cost model, and the report (`distill.report`): report.json, report.md,
   report.html with PNG plots, and predictions.parquet (one row per query with every model's answer).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from distill import metrics as M
from distill.config import ConfigError, StrictModel
from distill.engine import EngineConfig, adapter_rank, engine_facts, processor_config, vllm_max_lora_rank
from distill.storage import exists, join, list_files, local_dir, read_columns, read_json, resolve
from distill.tasks import TaskSpec, load_task
from distill.checkpoints import read_metrics
from distill.modeling import merge_adapter

log = logging.getLogger("distill.evaluate")

RUNS = ("teacher", "student", "base")  # report order: the teacher, the distilled student, the baseline
RUN_TITLES = {"teacher": "teacher + prompt", "student": "distilled student, no prompt",
              "base": "base student, no prompt"}


class Price(StrictModel):
    input_per_million: float = Field(ge=0, description="Dollars per million prompt (input) tokens.")
    output_per_million: float = Field(ge=0, description="Dollars per million generated (output) tokens.")


class CostConfig(StrictModel):
    """Prices for the cost model. The defaults are illustrative placeholders (a typical hosted rate for a small
    open model), the same for teacher and student because the embedded demo uses one model for both: then every
    saving comes from the prompt tokens the student no longer needs. Set your own provider's or cluster's rates."""

    teacher: Price = Field(default_factory=lambda: Price(input_per_million=0.10, output_per_million=0.40),
                           description="Price of the teacher's tokens.")
    student: Price = Field(default_factory=lambda: Price(input_per_million=0.10, output_per_million=0.40),
                           description="Price of the distilled student's tokens (LoRA on the base student).")
    train_per_worker_hour: float = Field(
        1.0, ge=0, description="Dollars per hour of one training worker; training cost = measured training wall "
        "time x workers x this.")


class EvalConfig(StrictModel):
    train: Optional[str] = Field(
        None, description="Training output OUT: reads train_summary.json (data, student, teacher, task), "
        "split.parquet (held-out ids), adapter/ and metrics.jsonl (loss curves).")
    data: Optional[str] = Field(
        None, description="Held-out data instead of the training split: a generation output folder or Parquet "
        "file/folder of DATA_SCHEMA rows (every row is held out).")
    split: str = Field("validation", description="Which split of OUT/split.parquet is held out.")
    task: Optional[str] = Field(None, description="Task name or YAML; default: the one training/generation used.")
    teacher: Optional[str] = Field(None, description="Teacher model; default: the one that generated the data.")
    student: Optional[str] = Field(None, description="Base student model; default: the one training used.")
    adapter: Optional[str] = Field(None, description="LoRA adapter of the distilled student; default: OUT/adapter.")
    output: str = Field("runs/eval", description="Report directory (report.json/.md/.html, PNG plots).")
    limit: Optional[int] = Field(None, ge=1, description="Evaluate only the first N held-out rows (by id).")
    student_constrained: bool = Field(
        False, description="Constrain the students to the task's label set like the teacher (label tasks only). "
        "Off by default: a student that needs guidance to produce a valid label has not fully learned the task.")
    student_serving: Literal["merged", "lora"] = Field(
        "merged", description="How the engine serves the distilled student. merged: the adapter folded into a "
        "temporary full copy of the base weights (peft merge_and_unload), i.e. the model one would ship, with the "
        "same kernels as the base student. lora: base model + the adapter through vLLM's LoRA support (on vLLM CPU "
        "0.32 this made SmolLM2 about 10x slower per request than the plain model).")
    student_max_tokens: Optional[int] = Field(
        None, ge=1, description="Most tokens a student may write; default: the longest held-out answer + 16.")
    nll_batch_size: int = Field(8, ge=1, description="Sequences per transformers forward pass for the NLLs.")
    nll_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Weights dtype for the NLL forward passes (float32: exact; bfloat16: half memory).")
    examples: int = Field(20, ge=0, description="Held-out rows shown side by side in the report.")
    seed: int = Field(0, description="Engine seed (decoding is greedy; this only pins any tie-breaking).")
    cost: CostConfig = Field(default_factory=CostConfig, description="Prices for the cost model.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engines and their actor pool.")


# ----------------------------------------------------------------------------------------------------------------
# 1. What to evaluate
@dataclass
class Inputs:
    rows: list[dict]            # held-out rows: id, text, answer, label, gold (sorted by id)
    task: TaskSpec
    teacher: str
    student: str
    adapter: str
    data: str                   # where the rows came from
    train: Optional[str]
    summary: Optional[dict]     # OUT/train_summary.json
    train_metrics: list[dict] = field(default_factory=list)  # OUT/metrics.jsonl


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
    # What produced the data, for the defaults: one teacher and one task per generation output.
    origin = {c: next((r[c] for r in rows if r.get(c)), None) for c in ("teacher", "task")}
    for r in rows:
        r.setdefault("gold", None)
    return rows, origin


def resolve_inputs(config: EvalConfig) -> Inputs:
    summary = None
    train_metrics: list[dict] = []
    if config.train:
        summary = read_json(join(config.train, "train_summary.json"))
        if summary is None:
            raise ConfigError(f"--train {config.train}: no train_summary.json (is it a training output?)")
        train_metrics = read_metrics(join(config.train, "metrics.jsonl"))
    if not config.data and not summary:
        raise ConfigError("nothing to evaluate: give --train OUT (a training output) or --data HELDOUT")
    data = config.data or summary["data"]
    rows, origin = _read_rows(data)
    if not config.data:
        # The training split: only the ids training held out, so no query the student was trained on is scored.
        split_path = join(config.train, "split.parquet")
        if not exists(split_path):
            raise ConfigError(f"--train {config.train}: no split.parquet; pass --data to say what is held out")
        split = read_columns(split_path, ["id", "split"]).to_pylist()
        held = {s["id"] for s in split if s["split"] == config.split}
        if not held:
            raise ConfigError(f"{split_path}: no rows in split {config.split!r}")
        rows = [r for r in rows if r["id"] in held]
    rows.sort(key=lambda r: r["id"])
    if config.limit:
        rows = rows[:config.limit]
    if not rows:
        raise ConfigError(f"no held-out rows to evaluate in {data}")

    def pick(name: str, *candidates: Optional[str]) -> str:
        for c in candidates:
            if c:
                return c
        raise ConfigError(f"no {name} given and none recorded in the training output or the data; pass --{name}")

    summary = summary or {}
    task = load_task(pick("task", config.task, summary.get("task"), origin["task"]))
    adapter = pick("adapter", config.adapter, join(config.train, "adapter") if config.train else None)
    if not exists(join(adapter, "adapter_config.json")):
        raise ConfigError(f"adapter {adapter}: no adapter_config.json (a PEFT LoRA adapter folder is expected)")
    return Inputs(
        rows=rows, task=task,
        teacher=pick("teacher", config.teacher, summary.get("teacher"), origin["teacher"]),
        student=pick("student", config.student, summary.get("student")),
        adapter=adapter, data=data, train=config.train, summary=summary or None, train_metrics=train_metrics,
    )


# ----------------------------------------------------------------------------------------------------------------
# 2. Generation runs
def run_engine(name: str, rows: list[dict], model: str, messages: Callable[[str], list[dict]],
               sampling: dict[str, Any], config: EvalConfig, chat_template_kwargs: Optional[dict] = None,
               adapter: Optional[str] = None) -> tuple[dict[str, dict], float]:
    """Generate one answer per row with a `ray.data.llm` vLLM engine over `model` (through `adapter` if given).

    Returns ({id: result}, wall seconds including the engine start-up).

    LoRA: ray.data.llm's vLLM stage turns a row whose "model" differs from the engine's model into a LoRARequest;
    without `dynamic_lora_loading_path` that "model" value is used as the adapter path as is, so a local (or
    shared-filesystem) adapter folder is served directly, with no merged copy of the weights. The engine needs
    enable_lora and max_lora_rank >= the adapter's rank.
    """
    import ray
    from ray.data.llm import build_processor

    extra: dict[str, Any] = {"seed": config.seed}
    lora_path = None
    if adapter:
        lora_path = os.path.abspath(adapter) if "://" not in adapter else adapter
        extra.update(enable_lora=True, max_lora_rank=vllm_max_lora_rank([adapter_rank(adapter)]), max_loras=1)

    def preprocess(row: dict) -> dict:
        out = {"messages": messages(row["text"]), "sampling_params": sampling}
        if lora_path:
            out["model"] = lora_path
        return out

    def postprocess(row: dict) -> dict:
        stats = row.get("metrics") or {}

        def span(start: str, end: str) -> Optional[float]:
            a, b = stats.get(start), stats.get(end)
            return float(b - a) if a and b and b >= a else None

        taken = row.get("time_taken_llm")
        return {
            "id": row["id"], "generated_text": row.get("generated_text") or "",
            "num_input_tokens": int(row.get("num_input_tokens") or 0),
            "num_generated_tokens": int(row.get("num_generated_tokens") or 0),
            # ray.data.llm's time_taken_llm: from handing the request to the engine until its last token
            # (-1 for a failed request).
            "latency_s": float(taken) if taken is not None and taken >= 0 else None,
            # vLLM's own engine-core timestamps, where the engine reports them.
            "queue_s": span("queued_ts", "scheduled_ts"),
            "ttft_s": span("queued_ts", "first_token_ts"),
            "decode_s": span("first_token_ts", "last_token_ts"),
            "error": row.get("__inference_error__") or None,
        }

    log.info("%s: %d queries on %s%s", name, len(rows), model, f" + LoRA {lora_path}" if lora_path else "")
    processor = build_processor(
        processor_config(config.engine, model, chat_template_kwargs=chat_template_kwargs, **extra),
        preprocess=preprocess, postprocess=postprocess,
        preprocess_map_kwargs={"num_cpus": config.engine.side_stage_cpus},
        postprocess_map_kwargs={"num_cpus": config.engine.side_stage_cpus},
    )
    t0 = time.monotonic()
    ds = ray.data.from_items([{"id": r["id"], "text": r["text"]} for r in rows])
    results = {out["id"]: out for out in processor(ds).iter_rows()}
    wall = time.monotonic() - t0
    missing = {r["id"] for r in rows} - set(results)
    if missing:
        raise RuntimeError(f"{name}: {len(missing)} queries came back without an answer, e.g. {sorted(missing)[:3]}")
    log.info("%s: done in %.1fs", name, wall)
    return results, wall


def distilled_engine(config: EvalConfig, student: str, adapter: str,
                     stack: contextlib.ExitStack) -> tuple[str, dict[str, Any]]:
    """(model folder, run_engine kwargs) that serve the distilled student as `config.student_serving` says.

    merged: vLLM could serve the adapter itself (see run_engine), but on CPU its LoRA kernels dominated the
    latency, which would measure vLLM's CPU LoRA path rather than the student; and a deployed student is usually
    merged. The merged copy lives in a temporary folder (removed with `stack`) on this machine, like a downloaded
    adapter: engines on other nodes need a shared filesystem, or `student_serving: lora` with a shared adapter.
    """
    if config.student_serving == "lora":
        return student, {"adapter": adapter}
    import shutil
    import tempfile

    dest = tempfile.mkdtemp(prefix="distill-merged-student-")
    stack.callback(shutil.rmtree, dest, True)
    log.info("merging %s into a copy of %s at %s", adapter, student, dest)
    merge_adapter(student, adapter, dest)
    return dest, {}


def student_sampling(config: EvalConfig, task: TaskSpec, tokenizer, rows: list[dict]) -> dict[str, Any]:
    longest = max(len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) for r in rows)
    params: dict[str, Any] = {"temperature": 0.0, "max_tokens": config.student_max_tokens or longest + 16}
    choices = task.canonical_answers()
    if config.student_constrained and choices:
        params["structured_outputs"] = {"choice": choices}
        params["max_tokens"] = max(params["max_tokens"], TaskSpec.choice_budget(choices))
    return params


# ----------------------------------------------------------------------------------------------------------------
# 3. NLL of the teacher's answers
def answer_tokens(tokenizer, context: list[dict], answer: str) -> tuple[list[int], int]:
    """Token ids of the conversation context + assistant answer, and where the answer starts.

    The answer's tokens run through the template's end-of-turn token (the model must also learn to stop); what the
    template adds after it (a newline) is formatting and is not scored. The context is tokenized as the engine
    sees it (the generation prompt); the answer separately, so the boundary never merges across a BPE token.
    """
    prompt = tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(context + [{"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the assistant turn differently from its generation prompt; "
                         "cannot separate the answer tokens")
    rest = full[len(prompt):]
    eos = tokenizer.eos_token
    if eos and eos in rest:
        rest = rest[:rest.index(eos) + len(eos)]
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ids + tokenizer(rest, add_special_tokens=False)["input_ids"], len(ids)


def sequence_nll(model, sequences: list[tuple[list[int], int]], batch_size: int) -> tuple[list[float], list[int]]:
    """Summed NLL of tokens[start:] given tokens[:start], per sequence, and the number of scored tokens.

    Every sequence of a setting shares its beginning (the chat template, and for (b) the whole task prompt). That
    common prefix runs through the model once and its KV cache is reused by every batch, which is what makes (b)
    affordable on a CPU: the long prompt is thousands of tokens, the query and answer a few dozen.
    """
    import torch

    if not sequences:
        return [], []
    first = sequences[0][0]
    common = len(first)
    for ids, _ in sequences[1:]:
        n = 0
        limit = min(common, len(ids))
        while n < limit and ids[n] == first[n]:
            n += 1
        common = n
    # The logit that predicts the first answer token sits at position start - 1; it must come out of the batch
    # forward pass, so the cached prefix stops before the earliest such position.
    prefix_len = max(0, min(common, min(start for _, start in sequences) - 1))
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    sums, counts = [0.0] * len(sequences), [0] * len(sequences)
    with torch.no_grad():
        prefix_cache = None
        if prefix_len:
            prefix_cache = model(input_ids=torch.tensor([first[:prefix_len]]), use_cache=True).past_key_values
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            suffixes = [sequences[i][0][prefix_len:] for i in idx]
            width = max(map(len, suffixes))
            input_ids = torch.zeros((len(idx), width), dtype=torch.long)
            mask = torch.zeros((len(idx), prefix_len + width), dtype=torch.long)
            mask[:, :prefix_len] = 1
            for j, s in enumerate(suffixes):
                input_ids[j, :len(s)] = torch.tensor(s)
                mask[j, prefix_len:prefix_len + len(s)] = 1
            kwargs: dict[str, Any] = {}
            if prefix_cache is not None:
                cache = copy.deepcopy(prefix_cache)  # the forward pass appends to the cache it is given
                cache.batch_repeat_interleave(len(idx))
                kwargs["past_key_values"] = cache
            positions = torch.arange(prefix_len, prefix_len + width).unsqueeze(0).expand(len(idx), -1)
            logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                           **kwargs).logits
            for j, i in enumerate(idx):
                ids, start = sequences[i]
                targets = torch.tensor(ids[start:])
                rows = torch.arange(start - 1, len(ids) - 1) - prefix_len
                logp = torch.log_softmax(logits[j, rows].float(), dim=-1)
                sums[i] = float(-logp.gather(1, targets.unsqueeze(1)).sum())
                counts[i] = len(targets)
    return sums, counts


def prompt_absorption(config: EvalConfig, inputs: Inputs) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """NLL of the teacher's held-out answers under (a) base student, no prompt; (b) base student with the task
    prompt; (c) distilled student, no prompt; and the gap closed."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(inputs.student)
    dtype = torch.float32 if config.nll_dtype == "float32" else torch.bfloat16
    base = AutoModelForCausalLM.from_pretrained(inputs.student, dtype=dtype)
    model = PeftModel.from_pretrained(base, inputs.adapter).eval()
    task = inputs.task
    plain = [answer_tokens(tokenizer, task.student_messages(r["text"]), r["answer"]) for r in inputs.rows]
    prompted = [answer_tokens(tokenizer, task.teacher_messages(r["text"]), r["answer"]) for r in inputs.rows]
    per_row: dict[str, list[float]] = {}
    counts: dict[str, list[int]] = {}
    with model.disable_adapter():
        log.info("NLL (a): base student without the prompt")
        sums_a, counts["a"] = sequence_nll(model, plain, config.nll_batch_size)
        log.info("NLL (b): base student with the prompt")
        sums_b, counts["b"] = sequence_nll(model, prompted, config.nll_batch_size)
    log.info("NLL (c): distilled student without the prompt")
    sums_c, counts["c"] = sequence_nll(model, plain, config.nll_batch_size)
    for key, sums in (("a", sums_a), ("b", sums_b), ("c", sums_c)):
        per_row[key] = [s / n if n else float("nan") for s, n in zip(sums, counts[key])]
    a, b, c = (M.mean_nll(s, counts[k]) for k, s in (("a", sums_a), ("b", sums_b), ("c", sums_c)))
    gap = M.gap_closed(a, b, c)
    result = {
        "base_no_prompt": a, "base_with_prompt": b, "student_no_prompt": c,
        "gap_closed": gap["value"], "note": gap["note"],
        "answer_tokens": sum(counts["a"]), "rows": len(inputs.rows),
        "prompt_context_tokens_mean": M.mean(start for _, start in prompted),
        "seconds": round(time.monotonic() - t0, 3),
    }
    return result, per_row


# ----------------------------------------------------------------------------------------------------------------
# 4. Metrics and report
def _answers(task: TaskSpec, results: dict[str, dict], rows: list[dict]) -> tuple[list, list, list]:
    """(raw text, parsed answer or None, label or None) per row, in row order."""
    raw, parsed, labels = [], [], []
    for r in rows:
        out = results[r["id"]]
        p = task.parse(out["generated_text"]) if not out["error"] else None
        answer = p.answer if p else None
        raw.append(out["generated_text"])
        parsed.append(answer)
        labels.append(task.label_of(answer))
    return raw, parsed, labels


def build_report(config: EvalConfig, inputs: Inputs, results: dict[str, dict[str, dict]], walls: dict[str, float],
                 nll: dict[str, Any], nll_rows: dict[str, list[float]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The report (JSON-able, keys documented in distill.report.REPORT_KEYS) and the per-row details behind the
    plots and predictions.parquet."""
    task, rows = inputs.task, inputs.rows
    is_labels = task.answer.type == "labels"
    labels = list(task.answer.labels or [])
    gold = [r["gold"] for r in rows]
    has_gold = is_labels and any(g is not None for g in gold)
    answers = {run: _answers(task, results[run], rows) for run in RUNS}
    teacher_answers, teacher_labels = answers["teacher"][1], answers["teacher"][2]

    runs: dict[str, Any] = {}
    for run in RUNS:
        res = [results[run][r["id"]] for r in rows]
        ok = [x for x in res if not x["error"]]
        runs[run] = {
            "title": RUN_TITLES[run],
            "model": inputs.teacher if run == "teacher" else inputs.student,
            "adapter": inputs.adapter if run == "student" else None,
            "prompt": run == "teacher",
            "requests": len(res), "errors": len(res) - len(ok),
            "parse_rate": M.parse_rate(answers[run][1]),
            "prompt_tokens_mean": M.mean(x["num_input_tokens"] for x in ok),
            "output_tokens_mean": M.mean(x["num_generated_tokens"] for x in ok),
            "latency_s": M.latency_summary([x["latency_s"] for x in ok]),
            "ttft_s": M.latency_summary([x["ttft_s"] for x in ok if x["ttft_s"] is not None]),
            "wall_s": round(walls[run], 3),
        }

    fidelity: dict[str, Any] = {}
    for run in ("student", "base"):
        sim = M.text_similarity(answers[run][1], teacher_answers)
        fidelity[run] = {
            "agreement": M.agreement(answers[run][2], teacher_labels) if is_labels else None,
            **sim,
        }
    fidelity["teacher_vs_data"] = {
        "agreement": M.agreement(teacher_labels, [task.label_of(r["answer"]) for r in rows]) if is_labels else None,
        **M.text_similarity(teacher_answers, [r["answer"] for r in rows]),
    }

    gold_section = None
    label_section = None
    if is_labels:
        pairs = {"student_vs_teacher": (teacher_labels, answers["student"][2]),
                 "base_vs_teacher": (teacher_labels, answers["base"][2])}
        if has_gold:
            pairs.update({f"{run}_vs_gold": (gold, answers[run][2]) for run in RUNS})
        label_section = {
            "labels": labels,
            "per_label": {k: M.per_label_scores(ref, pred, labels) for k, (ref, pred) in pairs.items()},
            "confusion": {k: M.confusion_matrix(ref, pred, labels) for k, (ref, pred) in pairs.items()},
        }
    if has_gold:
        acc = {run: M.accuracy(answers[run][2], gold) for run in RUNS}
        gold_section = {"rows": acc["teacher"]["n"], "accuracy": {run: acc[run]["accuracy"] for run in RUNS}}

    cost = cost_model(config, inputs, runs)
    speedup = M.ratio(runs["teacher"]["latency_s"]["p50"], runs["student"]["latency_s"]["p50"])
    headline = {
        "agreement": fidelity["student"]["agreement"],
        "agreement_base": fidelity["base"]["agreement"],
        "rouge_l": fidelity["student"]["rouge_l"],
        "gold_accuracy": gold_section["accuracy"] if gold_section else None,
        "gap_closed": nll["gap_closed"],
        "speedup_p50": speedup,
        "savings_per_1k_queries_usd": cost["savings_per_1k_queries_usd"],
        "break_even_queries": cost["break_even_queries"],
        "student_parse_rate": runs["student"]["parse_rate"],
    }
    summary = inputs.summary or {}
    report = {
        "schema_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "task": {"name": task.name, "type": task.answer.type, "labels": labels or None,
                 "description": task.description},
        "inputs": {"data": inputs.data, "train": inputs.train, "split": config.split if not config.data else None,
                   "rows": len(rows), "rows_with_gold": sum(g is not None for g in gold), "limit": config.limit,
                   "teacher": inputs.teacher, "student": inputs.student, "adapter": inputs.adapter,
                   "student_constrained": config.student_constrained, "student_serving": config.student_serving,
                   "engine": engine_facts(config.engine)},
        "headline": headline,
        "runs": runs,
        "fidelity": fidelity,
        "gold": gold_section,
        "labels": label_section,
        "nll": nll,
        "latency": {
            "definition": LATENCY_DEFINITION,
            "concurrency": config.engine.batch_size * config.engine.max_concurrent_batches,
            "speedup_p50": speedup,
            "speedup_p95": M.ratio(runs["teacher"]["latency_s"]["p95"], runs["student"]["latency_s"]["p95"]),
        },
        "cost": cost,
        "training": {k: summary.get(k) for k in ("complete", "steps", "final_loss", "final_val_loss",
                                                 "best_val_loss", "best_step", "tokens_per_s", "wall_s", "workers",
                                                 "split")} if summary else None,
        "plots": {},
        "config": config.model_dump(),
    }
    details = {
        "latency": {run: [results[run][r["id"]]["latency_s"] for r in rows
                          if results[run][r["id"]]["latency_s"] is not None] for run in RUNS},
        "train_metrics": inputs.train_metrics,
        "predictions": predictions_table(rows, results, answers, nll_rows),
    }
    return report, details


LATENCY_DEFINITION = (
    "Per request: seconds from when ray.data.llm's engine stage hands the request to vLLM until its last token "
    "(time_taken_llm), prefill + decode, inside one engine. Requests run concurrently in continuous batches "
    "(up to the stated concurrency in flight per engine), so this is latency under batch load, not an idle "
    "single-request latency; engine start-up and Ray Data scheduling are excluded. Each model has its own engine "
    "with the same settings and the same queries; the distilled student is served as inputs.student_serving says "
    "(merged: adapter folded into the weights; lora: base + adapter through vLLM's LoRA kernels).")


def cost_model(config: EvalConfig, inputs: Inputs, runs: dict[str, Any]) -> dict[str, Any]:
    prices = config.cost
    per_request = {
        "teacher": M.request_cost(runs["teacher"]["prompt_tokens_mean"], runs["teacher"]["output_tokens_mean"],
                                  prices.teacher.input_per_million, prices.teacher.output_per_million),
        "student": M.request_cost(runs["student"]["prompt_tokens_mean"], runs["student"]["output_tokens_mean"],
                                  prices.student.input_per_million, prices.student.output_per_million),
    }
    savings = None
    if per_request["teacher"] is not None and per_request["student"] is not None:
        savings = per_request["teacher"] - per_request["student"]
    summary = inputs.summary or {}
    workers = int(summary.get("workers") or 1)
    train_cost = M.training_cost(summary.get("wall_s"), prices.train_per_worker_hour, workers)
    break_even = M.break_even_queries(train_cost, savings)
    if train_cost is None:
        note = "no training summary (pass --train OUT): training cost and break-even unknown"
    elif break_even is None:
        note = "the student saves nothing per query at these prices: training never pays for itself"
    else:
        note = None
    return {
        "prices": prices.model_dump(),
        "per_request_usd": per_request,
        "savings_per_query_usd": savings,
        "savings_per_1k_queries_usd": savings * 1000 if savings is not None else None,
        "training_wall_s": summary.get("wall_s"),
        "training_workers": workers if summary else None,
        "training_cost_usd": train_cost,
        "break_even_queries": break_even,
        "note": note,
    }


def predictions_table(rows: list[dict], results: dict[str, dict[str, dict]], answers: dict[str, tuple],
                      nll_rows: dict[str, list[float]]) -> pa.Table:
    cols: dict[str, list] = {
        "id": [r["id"] for r in rows], "text": [r["text"] for r in rows], "gold": [r["gold"] for r in rows],
        "data_answer": [r["answer"] for r in rows],
    }
    for run in RUNS:
        raw, parsed, labels = answers[run]
        res = [results[run][r["id"]] for r in rows]
        cols[f"{run}_output"] = raw
        cols[f"{run}_answer"] = parsed
        cols[f"{run}_label"] = labels
        cols[f"{run}_prompt_tokens"] = [x["num_input_tokens"] for x in res]
        cols[f"{run}_output_tokens"] = [x["num_generated_tokens"] for x in res]
        cols[f"{run}_latency_s"] = [x["latency_s"] for x in res]
        cols[f"{run}_error"] = [x["error"] for x in res]
    for key, name in (("a", "nll_base_no_prompt"), ("b", "nll_base_with_prompt"), ("c", "nll_student_no_prompt")):
        cols[name] = nll_rows[key]
    return pa.table(cols)


def main(config: EvalConfig) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from distill.ray_init import init_ray
    from distill.report import write_report
    from pipelines.generate import GenerateConfig, teacher_sampling

    t0 = time.monotonic()
    inputs = resolve_inputs(config)
    task = inputs.task
    log.info("evaluating %d held-out rows of %s (task %s): teacher %s, student %s + %s", len(inputs.rows),
             inputs.data, task.name, inputs.teacher, inputs.student, inputs.adapter)
    # The teacher's sampling exactly as generation builds it (guided choice when the task constrains the
    # teacher), but greedy: evaluation compares deterministic answers.
    t_sampling = teacher_sampling(GenerateConfig(task=task.name, teacher=inputs.teacher, temperature=0.0), task)
    s_sampling = student_sampling(config, task, AutoTokenizer.from_pretrained(inputs.student), inputs.rows)

    init_ray()
    # One engine per model, one after another, so no run is timed while another one computes (the merge, if any,
    # happens before the first engine starts). The base and the distilled student never share a LoRA-enabled
    # engine: on vLLM CPU (0.32) a batch that mixed requests with and without a LoRA applied the adapter to the base
    # requests too (their greedy answers became the distilled student's), which would make the baseline a copy of
    # the student. A separate engine costs one start-up.
    # vLLM and peft load adapters from local folders: one in object storage (s3://...) is downloaded first.
    results, walls = {}, {}
    with contextlib.ExitStack() as stack:
        adapter = stack.enter_context(local_dir(inputs.adapter))
        for run, name, model, kwargs, messages, sampling in (
                ("teacher", "teacher", inputs.teacher,
                 {"chat_template_kwargs": {"enable_thinking": task.teacher.thinks}}, task.teacher_messages,
                 t_sampling),
                ("base", "base student", inputs.student, {}, task.student_messages, s_sampling),
                ("student", "distilled student", *distilled_engine(config, inputs.student, adapter, stack),
                 task.student_messages, s_sampling)):
            results[run], walls[run] = run_engine(name, inputs.rows, model, messages, sampling, config, **kwargs)

        nll, per_row = prompt_absorption(config, dataclasses.replace(inputs, adapter=adapter))
    report, details = build_report(config, inputs, results, walls, nll, per_row)
    report["seconds"] = round(time.monotonic() - t0, 3)
    paths = write_report(config.output, report, details)
    log.info("report: %s", paths["html"])
    return report


# ----------------------------------------------------------------------------------------------------------------
# CLI
def _fmt(value: Optional[float], spec: str = ".3f", suffix: str = "") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}{suffix}"


def headline_lines(report: dict[str, Any]) -> list[str]:
    h = report["headline"]
    lines = []
    if h["agreement"] is not None:
        lines.append(f"agreement with teacher: student {_fmt(h['agreement'], '.1%')}, "
                     f"base {_fmt(h['agreement_base'], '.1%')}")
    else:
        lines.append(f"ROUGE-L vs teacher: student {_fmt(h['rouge_l'])}")
    if h["gold_accuracy"]:
        g = h["gold_accuracy"]
        lines.append(f"gold accuracy: teacher {_fmt(g['teacher'], '.1%')}, student {_fmt(g['student'], '.1%')}, "
                     f"base {_fmt(g['base'], '.1%')}")
    lines.append(f"gap closed: {_fmt(h['gap_closed'], '.2f')}")
    lines.append(f"speedup (p50 latency): {_fmt(h['speedup_p50'], '.2f', 'x')}")
    lines.append(f"savings per 1k queries: ${_fmt(h['savings_per_1k_queries_usd'], '.4f')}; "
                 f"break-even after {h['break_even_queries'] if h['break_even_queries'] is not None else 'n/a'} "
                 f"queries")
    return lines


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("eval", help="held-out fidelity, gold accuracy, gap closed, latency and cost report")
    p.add_argument("--train", help="training output OUT (train_summary.json, split.parquet, adapter/, metrics)")
    p.add_argument("--data", help="held-out data: generation output folder or DATA_SCHEMA Parquet (all rows)")
    p.add_argument("--task", help="task name or YAML (default: the one training used)")
    p.add_argument("--teacher", help="teacher model (default: the one that generated the data)")
    p.add_argument("--student", help="base student model (default: the one training used)")
    p.add_argument("--adapter", help="LoRA adapter folder (default: OUT/adapter)")
    p.add_argument("--output", help="report directory (default: runs/eval)")
    p.add_argument("--limit", type=int, help="only the first N held-out rows")
    p.add_argument("--config", help="YAML file with EvalConfig fields (command-line options override it)")
    p.set_defaults(func=_cli)


def _cli(args) -> None:
    from distill.config import load_config

    config = load_config(EvalConfig, args.config, train=args.train, data=args.data, task=args.task,
                         teacher=args.teacher, student=args.student, adapter=args.adapter, output=args.output,
                         limit=args.limit)
    report = main(config)
    print("\n".join(headline_lines(report)))
    print(f"report: {join(config.output, 'report.html')}\n        {join(config.output, 'report.md')}\n"
          f"        {join(config.output, 'report.json')}")
