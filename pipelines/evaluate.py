"""Evaluate: did the student internalize the prompt, how faithful is it, how much faster and cheaper, should it ship?

    distill eval --train runs/train --output runs/eval
    distill eval --data HELDOUT --adapter OUT/adapter --output REPORT_DIR      # student: the adapter's base model

1. Held-out queries: the `test` split training saved (`OUT/split.parquet`: never trained on, never used to pick
   a checkpoint) of the generation output training read; `--data` instead takes a generation output folder or
   any Parquet of DATA_SCHEMA rows, all of them held out.
2. Three engine passes (Ray Data x `ray.data.llm` vLLM, one model each, one after another), every request on the
   engines, nothing scored on the driver: the teacher with its prompt (greedy, plus a second sample at its own
   temperature: its self-consistency is the ceiling); the base student without the prompt (its answers, and the
   teacher's answer tokens scored without and with the prompt: NLLs a and b); the distilled student (served
   merged or through LoRA; its answers, and the teacher's answers scored: NLL c). Scoring is teacher-forced
   decoding with the prompt prefix-cached (distill.scoring), not prompt_logprobs, which bypass the cache.
3. The report (distill.evaluation, distill.report): fidelity against floor, ceiling and serving threshold, a
   verdict, labels, gap closed = (a - c) / (a - b), latency, cost, the learning curve; report.json, report.md,
   report.html with PNG plots, predictions.parquet.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from distill import evaluation as E
from distill import metrics as M
from distill.checkpoints import AttemptClock, read_metrics
from distill.config import ConfigError, StrictModel, check_settings
from distill.cost import CostConfig, cost_model
from distill.engine import EngineConfig, engine_facts, resolve_device, run_requests
from distill.sampling import student_sampling, teacher_sampling
from distill.scoring import ENGINE_ARGS, scoring_sampling
from distill.storage import exists, join, list_files, read_columns, read_json, resolve
from distill.tasks import TaskSpec, load_task

log = logging.getLogger("distill.evaluate")


class EvalConfig(StrictModel):
    train: Optional[str] = Field(
        None, description="Training output OUT: reads train_summary.json (data, student, teacher, task), "
        "split.parquet (held-out ids), adapter/ (and merged/) and metrics.jsonl (learning curve).")
    data: Optional[str] = Field(
        None, description="Held-out data instead of the training split: a generation output folder or Parquet "
        "file/folder of DATA_SCHEMA rows (every row is held out).")
    split: str = Field("test", description="Which split of OUT/split.parquet is held out (test: never trained on "
                       "and never used to pick a checkpoint).")
    task: Optional[str] = Field(None, description="Task name or YAML; default: the one training/generation used.")
    teacher: Optional[str] = Field(None, description="Teacher model; default: the one that generated the data.")
    student: Optional[str] = Field(None, description="Base student model; default: the one training used, else the "
                                   "adapter's own base model (adapter_config.json).")
    adapter: Optional[str] = Field(None, description="LoRA adapter of the distilled student; default: OUT/adapter.")
    output: str = Field("runs/eval", description="Report directory (report.json/.md/.html, PNG plots), local or URI.")
    limit: Optional[int] = Field(None, ge=1, description="Evaluate only the first N held-out rows (by id).")
    student_constrained: bool = Field(
        False, description="Constrain the students to the task's label set like the teacher (label tasks only). "
        "Off by default: a student that needs guidance to produce a valid label has not fully learned the task.")
    student_serving: Literal["auto", "merged", "lora"] = Field(
        "auto", description="How the engine serves the distilled student. merged: the adapter folded into the "
        "base (the training run's OUT/merged when it holds this adapter, else merged by a Ray task into "
        "OUTPUT/merged-student), the model one would ship. lora: the base + the adapter through vLLM's LoRA "
        "(on vLLM CPU ~10x slower per request; none for MoE experts on CPU). auto: lora on GPUs for adapters of "
        "linear layers, merged otherwise.")
    student_max_tokens: Optional[int] = Field(
        None, ge=1, description="Most tokens a student may write; default: the longest held-out answer + 16.")
    ship_agreement: float = Field(
        0.9, ge=0, le=1, description="Agreement the verdict requires (label tasks): the rollout's rollback "
        "threshold (serve RolloutConfig.min_agreement), so the report never ticks a student that serving would "
        "roll back.")
    ship_similarity: float = Field(
        0.9, ge=0, le=1, description="Free text: the share of the teacher's own consistency (ROUGE-L of greedy vs "
        "a second sample) the student's similarity must reach for the verdict.")
    selection_split: str = Field(
        "validation", description="Split of OUT/split.parquet the selective threshold is chosen on (the training run's "
        "validation rows), then applied unchanged to the held-out rows. With --data there is none: no threshold.")
    selection_limit: Optional[int] = Field(None, ge=1, description="Use only the first N selection rows (by id).")
    target_agreement: Optional[float] = Field(
        None, ge=0, le=1, description="Agreement the student's kept answers must reach for the selective threshold "
        "(labels; free text: similarity); default ship_agreement / ship_similarity.")
    examples: int = Field(20, ge=0, description="Held-out rows shown side by side in the report.")
    seed: int = Field(0, description="Engine seed (answers are greedy; it draws the teacher's second sample).")
    cost: CostConfig = Field(default_factory=CostConfig, description="Prices for the cost model.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engines and their actor pool.")


# Options that do not change the report's numbers.
RERUN_FREE = {"examples", "output"}


# ----------------------------------------------------------------------------------------------------------------
# 1. What to evaluate
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

    recorded_task = task_of_data(data) if not (config.task or summary.get("task")) else None
    task = load_task(config.task or summary["task"]) if (config.task or summary.get("task")) else recorded_task
    if task is None:
        task = load_task(pick("task", origin["task"]))
    manifest = read_json(join(data, "manifest.json"))
    return Inputs(
        rows=rows, selection_rows=selection_rows, task=task,
        teacher=pick("teacher", config.teacher, summary.get("teacher"), origin["teacher"]),
        student=pick("student", config.student, summary.get("student"), adapter_config.get("base_model_name_or_path")),
        adapter=adapter, data=data, train=config.train, summary=summary or None, manifest=manifest,
        train_metrics=train_metrics,
    )


def distilled_model(config: EvalConfig, inputs: Inputs) -> tuple[str, Optional[str], str]:
    """(engine model, adapter for LoRA or None, how it is served) for the distilled student."""
    from distill.modeling import adapter_has_experts, merge_adapter_on_cluster

    adapter_config = read_json(join(inputs.adapter, "adapter_config.json")) or {}
    serving = config.student_serving
    if serving == "auto":
        gpu = resolve_device(config.engine.device) == "gpu"
        serving = "lora" if gpu and not adapter_has_experts(adapter_config) else "merged"
    if serving == "lora":
        return inputs.student, inputs.adapter, "lora"
    summary = inputs.summary or {}
    if summary.get("merged") and summary.get("adapter") == inputs.adapter and exists(join(summary["merged"],
                                                                                        "config.json")):
        return summary["merged"], None, "merged"
    dest = join(config.output, "merged-student")
    log.info("merging %s into %s at %s (a Ray task: every engine node reads the result)", inputs.adapter,
             inputs.student, dest)
    return merge_adapter_on_cluster(inputs.student, inputs.adapter, dest), None, "merged"


# ----------------------------------------------------------------------------------------------------------------
# 2. The engine passes
def plan_requests(config: EvalConfig, inputs: Inputs, tokenizer) -> tuple[dict[str, list[dict]], dict]:
    """Every request of every pass, keyed "<id>|<kind>": answer (greedy), sample (teacher's second sample), a / b /
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
    student = student_sampling(task, config.student_max_tokens or longest + 16, config.student_constrained,
                               logprobs=1)
    greedy_teacher = teacher_sampling(task, temperature=0.0)
    sampled_teacher = teacher_sampling(task)

    def ask(r: dict, kind: str, messages: list[dict], sampling: dict) -> dict:
        return {"key": f"{r['id']}|{kind}", "messages": messages, "sampling_params": sampling}

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


# ----------------------------------------------------------------------------------------------------------------
# 3. The report
def build_report(config: EvalConfig, inputs: Inputs, results: dict[str, dict], walls: dict[str, float],
                 planned: dict, serving: str, tokenizer, seconds: float) -> tuple[dict, dict]:
    from distill.evaluation import RUN_TITLES, RUNS

    task, rows = inputs.task, inputs.rows
    is_labels = task.answer.type == "labels"
    labels = list(task.answer.labels or [])

    def result(run: str, row: dict, kind: str = "answer") -> dict:
        return results[run][f"{row['id']}|{kind}"]

    outputs = {run: [None if result(run, r)["error"] else result(run, r)["generated_text"] for r in rows]
               for run in RUNS}
    parsed = {run: [task.parse(o).answer if o is not None else None for o in outputs[run]] for run in RUNS}
    label_of = {run: [task.label_of(a) for a in parsed[run]] for run in RUNS}
    samples = [None if result("teacher", r, "sample")["error"] else result("teacher", r, "sample")["generated_text"]
               for r in rows]
    fidelity = E.fidelity_section(task, outputs, [r["answer"] for r in rows], samples,
                                  config.ship_agreement if is_labels else config.ship_similarity)

    runs: dict[str, Any] = {}
    for run in RUNS:
        res = [result(run, r) for r in rows]
        ok = [x for x in res if not x["error"]]
        runs[run] = {
            "title": RUN_TITLES[run],
            "model": inputs.teacher if run == "teacher" else inputs.student,
            "adapter": inputs.adapter if run == "student" else None, "prompt": run == "teacher",
            "requests": len(res), "errors": len(res) - len(ok), "parse_rate": M.parse_rate(parsed[run]),
            "prompt_tokens_mean": M.mean(x["num_input_tokens"] for x in ok),
            "output_tokens_mean": M.mean(x["num_generated_tokens"] for x in ok),
            "latency_s": M.latency_summary([x["latency_s"] for x in ok]),
            "ttft_s": M.latency_summary([x["ttft_s"] for x in ok if x["ttft_s"] is not None]),
            "wall_s": round(walls[run], 3),
        }

    gold = [r["gold"] for r in rows]
    has_gold = is_labels and any(g is not None for g in gold)
    label_section = gold_section = None
    if is_labels:
        pairs = {"student_vs_teacher": (label_of["teacher"], label_of["student"]),
                 "base_vs_teacher": (label_of["teacher"], label_of["base"])}
        if has_gold:
            pairs.update({f"{run}_vs_gold": (gold, label_of[run]) for run in RUNS})
        label_section = {
            "labels": labels,
            "per_label": {k: M.per_label_scores(ref, pred, labels) for k, (ref, pred) in pairs.items()},
            "confusion": {k: M.confusion_matrix(ref, pred, labels) for k, (ref, pred) in pairs.items()},
        }
    if has_gold:
        acc = {run: M.accuracy(label_of[run], gold) for run in RUNS}
        gold_section = {"rows": acc["teacher"]["n"], "accuracy": {run: acc[run]["accuracy"] for run in RUNS}}

    scores = {k: [None if results[run][f"{r['id']}|{k}"]["error"] else results[run][f"{r['id']}|{k}"]["token_logprobs"]
                  for r in rows] for k, run in (("a", "base"), ("b", "base"), ("c", "student"))}
    nll, nll_rows = E.nll_section(scores, planned["context_lengths"], len(rows))
    verdict = E.verdict(task, fidelity, nll["gap_closed"])

    stage_seconds = {
        "generation": ((inputs.manifest or {}).get("timings") or {}).get("total_s_all_attempts"),
        "training": (inputs.summary or {}).get("wall_s"),
        "evaluation": seconds,
    }
    generation_engines = (((inputs.manifest or {}).get("config") or {}).get("engine") or {}).get("min_actors", 1)
    cost = cost_model(config.cost, runs["teacher"], runs["student"], E.shared_prefix_tokens(tokenizer, task),
                      stage_seconds, int((inputs.summary or {}).get("workers") or 1),
                      {"generation": generation_engines, "evaluation": 1})
    speedup = M.ratio(runs["teacher"]["latency_s"]["p50"], runs["student"]["latency_s"]["p50"])
    selective = selective_report(config, inputs, results, outputs, cost)
    s = fidelity["student"]
    headline = {
        "agreement": s["agreement"] if is_labels else None,
        "agreement_ci95": s["agreement_ci95"] if is_labels else None,
        "kappa": s["kappa"], "agreement_base": fidelity["base"]["agreement"] if is_labels else None,
        "majority_agreement": fidelity["floor"]["rate"] if is_labels else None,
        "teacher_self_agreement": fidelity["ceiling"]["teacher_vs_sample"]["agreement"] if is_labels else None,
        "similarity": s["similarity"],
        "gold_accuracy": gold_section["accuracy"] if gold_section else None,
        "gap_closed": nll["gap_closed"], "speedup_p50": speedup,
        "savings_per_1k_queries_usd": cost["savings_per_1k_queries_usd"],
        "break_even_queries": cost["break_even_queries"], "student_parse_rate": runs["student"]["parse_rate"],
        "ready_to_ship": verdict["ready"],
        "selective_threshold": selective["threshold"],
        "selective_coverage": selective["at_threshold"]["coverage"],
        "selective_agreement": selective["at_threshold"]["agreement"],
        "cascade_cost_per_1k_queries_usd": selective["cascade"]["cost_per_1k_queries_usd"]["cascade"],
        "teacher_cost_per_1k_queries_usd": selective["cascade"]["cost_per_1k_queries_usd"]["teacher_only"],
    }
    summary = inputs.summary or {}
    report = {
        "schema_version": 2,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(seconds, 3),
        "task": {"name": task.name, "type": task.answer.type, "labels": labels or None,
                 "description": task.description},
        "inputs": {"data": inputs.data, "train": inputs.train, "split": config.split if not config.data else None,
                   "rows": len(rows), "rows_with_gold": sum(g is not None for g in gold), "limit": config.limit,
                   "teacher": inputs.teacher, "student": inputs.student, "adapter": inputs.adapter,
                   "student_constrained": config.student_constrained, "student_serving": serving,
                   "engine": engine_facts(config.engine)},
        "headline": headline,
        "verdict": verdict,
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
        "selective": selective,
        "training": ({**{k: summary.get(k) for k in (
            "complete", "steps", "planned_steps", "stopped_early", "final_loss", "final_val_loss",
            "final_val_agreement", "best_val_loss", "best_val_agreement", "best_step", "select_by", "tokens_per_s",
            "wall_s", "attempts", "workers", "split", "soft_labels", "precision")},
                      "curve": E.learning_curve(inputs.train_metrics)} if summary else None),
        "plots": {},
        "config": config.model_dump(),
    }
    details = {
        "latency": {run: [result(run, r)["latency_s"] for r in rows if result(run, r)["latency_s"] is not None]
                    for run in RUNS},
        "train_metrics": inputs.train_metrics,
        "predictions": predictions_table(task, rows, results, outputs, parsed, label_of, samples, nll_rows),
    }
    return report, details


def selective_report(config: EvalConfig, inputs: Inputs, results: dict, outputs: dict, cost: dict) -> dict:
    """The selective section: the distilled student's confidence against its agreement with the teacher, the
    threshold chosen on the selection rows, what it keeps of the held-out rows, and the cascade's cost and latency."""
    task = inputs.task

    def answers(run: str, rows: list[dict]) -> list[dict]:
        return [results[run][f"{r['id']}|answer"] for r in rows]

    def confidences_and_scores(rows: list[dict], teacher_out: list, student_res: list[dict]) -> dict[str, list]:
        student_out = [None if x["error"] else x["generated_text"] for x in student_res]
        return {"confidence": [E.confidence(task, x) for x in student_res],
                "score": E.agreement_scores(task, teacher_out, student_out)}

    held_student = answers("student", inputs.rows)
    held = confidences_and_scores(inputs.rows, outputs["teacher"], held_student)
    selection = None
    if inputs.selection_rows:
        teacher_sel = [None if x["error"] else x["generated_text"] for x in answers("teacher", inputs.selection_rows)]
        selection = confidences_and_scores(inputs.selection_rows, teacher_sel, answers("student", inputs.selection_rows))
    source = (f"the {config.selection_split!r} split of {inputs.train}" if inputs.train and not config.data
              else "no selection split (--data: every row is held out)")
    target = config.target_agreement if config.target_agreement is not None else (
        config.ship_agreement if task.answer.type == "labels" else config.ship_similarity)
    return E.selective_section(target, held, selection, source, {
        "student_latency": [x["latency_s"] for x in held_student],
        "teacher_latency": [x["latency_s"] for x in answers("teacher", inputs.rows)],
        "student_cost": cost["per_request_usd"]["student"], "teacher_cost": cost["per_request_usd"]["teacher"]})


LATENCY_DEFINITION = (
    "Per request: seconds from when ray.data.llm's engine stage hands the request to vLLM until its last token "
    "(time_taken_llm), prefill + decode, inside one engine, over the answer requests only. They run concurrently "
    "in continuous batches (up to the stated concurrency in flight per engine) beside the pass's other requests "
    "(the teacher's second samples; the students' scoring requests), so this is latency under batch load, not an "
    "idle single-request latency; `make bench` measures served latency. Engine start-up is excluded. Each model "
    "has its own engine with the same settings and queries; the distilled student is served as "
    "inputs.student_serving says.")


def predictions_table(task: TaskSpec, rows: list[dict], results: dict, outputs: dict, parsed: dict, label_of: dict,
                      samples: list, nll_rows: dict) -> pa.Table:
    from distill.evaluation import RUNS

    cols: dict[str, list] = {"id": [r["id"] for r in rows], "text": [r["text"] for r in rows],
                             "gold": [r["gold"] for r in rows], "data_answer": [r["answer"] for r in rows],
                             "teacher_sample_output": samples}
    for run in RUNS:
        res = [results[run][f"{r['id']}|answer"] for r in rows]
        cols[f"{run}_output"] = [x["generated_text"] for x in res]
        cols[f"{run}_answer"] = parsed[run]
        cols[f"{run}_label"] = label_of[run]
        cols[f"{run}_prompt_tokens"] = [x["num_input_tokens"] for x in res]
        cols[f"{run}_output_tokens"] = [x["num_generated_tokens"] for x in res]
        cols[f"{run}_latency_s"] = [x["latency_s"] for x in res]
        cols[f"{run}_error"] = [x["error"] for x in res]
        if run != "teacher":
            cols[f"{run}_confidence"] = [E.confidence(task, x) for x in res]
    for key, name in (("a", "nll_base_no_prompt"), ("b", "nll_base_with_prompt"), ("c", "nll_student_no_prompt")):
        cols[name] = nll_rows[key]
    return pa.table(cols)


# ----------------------------------------------------------------------------------------------------------------
def main(config: EvalConfig) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from distill.ray_init import init_ray
    from distill.report import write_report

    check_settings(join(config.output, "settings.json"),
                   {k: v for k, v in config.model_dump().items() if k not in RERUN_FREE}, "an evaluation")
    existing = read_json(join(config.output, "report.json"))
    if existing is not None:  # written last and whole: the evaluation is complete
        log.info("%s exists; evaluation is complete", join(config.output, "report.json"))
        return existing
    with AttemptClock(config.output) as clock:
        inputs = resolve_inputs(config)
        task = inputs.task
        log.info("evaluating %d held-out rows of %s (task %s): teacher %s, student %s + %s", len(inputs.rows),
                 inputs.data, task.name, inputs.teacher, inputs.student, inputs.adapter)
        init_ray()
        tokenizer = AutoTokenizer.from_pretrained(inputs.student)
        requests, planned = plan_requests(config, inputs, tokenizer)
        model, adapter, serving = distilled_model(config, inputs)
        # One engine per model, one after another, so no pass is timed while another one computes. The base and
        # the distilled student never share a LoRA-enabled engine: on vLLM CPU (0.32) a batch that mixed requests
        # with and without a LoRA applied the adapter to the base requests too.
        results, walls = {}, {}
        for run, name, engine_model, kwargs in (
                ("teacher", "teacher", inputs.teacher, {"chat_template_kwargs": {"enable_thinking": task.teacher.thinks}}),
                ("base", "base student", inputs.student, {}),
                ("student", "distilled student", model, {"adapter": adapter})):
            results[run], walls[run] = run_requests(name, requests[run], engine_model, config.engine, seed=config.seed,
                                                    **ENGINE_ARGS, **kwargs)
        report, details = build_report(config, inputs, results, walls, planned, serving, tokenizer, clock.total_s())
        paths = write_report(config.output, report, details)
    log.info("report: %s", paths["html"])
    return report


# ----------------------------------------------------------------------------------------------------------------
# CLI
def add_cli(subparsers) -> None:
    from distill.config import add_config_arguments

    p = subparsers.add_parser("eval", help="held-out fidelity, gold accuracy, gap closed, latency and cost report")
    add_config_arguments(p, EvalConfig)
    p.set_defaults(func=_cli)


def _cli(args) -> None:
    from distill.config import config_from_args
    from distill.report import headline_lines

    config = config_from_args(EvalConfig, args)
    report = main(config)
    print("\n".join(headline_lines(report)))
    print(f"report: {join(config.output, 'report.html')}\n        {join(config.output, 'report.md')}\n"
          f"        {join(config.output, 'report.json')}")
