"""The evaluation's report content, from the three passes' engine results: report.json's sections (fidelity,
labels, gold accuracy, NLLs and gap closed, latency, cost, selective answering, training) and the predictions
table (`build_report`). The numbers come from distill.evaluate.scores; distill.evaluate.render renders and writes them.
"""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from distill import metrics as M
from distill.cost import cost_model
from distill.engine import engine_facts
from distill.evaluate import scores as E
from distill.evaluate.config import EvalConfig
from distill.evaluate.inputs import EnginePass, Inputs
from distill.evaluate.scores import RUN_TITLES, RUNS
from distill.selective import confidence
from distill.student_serving import StudentArtifact
from distill.tasks import TaskSpec, split_reasoning


def build_report(config: EvalConfig, inputs: Inputs, passes: dict[str, EnginePass], planned: dict, serving: StudentArtifact,
                 tokenizer, seconds: float) -> tuple[dict, dict]:
    task, rows = inputs.task, inputs.rows
    is_labels = task.answer.type == "labels"
    labels = list(task.answer.labels or [])

    def result(run: str, row: dict, kind: str = "answer") -> dict:
        return passes[run].result(row["id"], kind)

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
            "cut_by_length": sum(x["cut_by_length"] for x in ok),
            "unfinished_reasoning": sum(not split_reasoning(x["generated_text"])[2] for x in ok),
            "prompt_tokens_mean": M.mean(x["num_input_tokens"] for x in ok),
            "output_tokens_mean": M.mean(x["num_generated_tokens"] for x in ok),
            "latency_s": M.latency_summary([x["latency_s"] for x in ok]),
            "ttft_s": M.latency_summary([x["ttft_s"] for x in ok if x["ttft_s"] is not None]),
            "wall_s": round(passes[run].wall_s, 3),
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

    scores = {k: [None if passes[run].result(r["id"], k)["error"] else passes[run].result(r["id"], k)["token_logprobs"]
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
    selective = selective_report(config, inputs, passes, outputs, cost)
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
                   "student_constrained": config.student_constrained, "student_serving": serving.mode,
                   # The artifact that was judged: what `distill serve` loads for this adapter.
                   "student_artifact": {"mode": serving.mode, "engine_model": serving.engine_model,
                                        "lora": serving.engine_adapter, "why": serving.why},
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
        "predictions": predictions_table(task, rows, passes, outputs, parsed, label_of, samples, nll_rows),
    }
    return report, details


def selective_report(config: EvalConfig, inputs: Inputs, passes: dict[str, EnginePass], outputs: dict,
                     cost: dict) -> dict:
    """The selective section: the distilled student's confidence against its agreement with the teacher, the
    threshold chosen on the selection rows, what it keeps of the held-out rows, and the cascade's cost and latency."""
    task = inputs.task

    def answers(run: str, rows: list[dict]) -> list[dict]:
        return [passes[run].result(r["id"]) for r in rows]

    def confidences_and_scores(teacher_out: list, student_res: list[dict]) -> dict[str, list]:
        student_out = [None if x["error"] else x["generated_text"] for x in student_res]
        return {"confidence": [confidence(task, x) for x in student_res],
                "score": E.agreement_scores(task, teacher_out, student_out)}

    held_student = answers("student", inputs.rows)
    held = confidences_and_scores(outputs["teacher"], held_student)
    selection = None
    if inputs.selection_rows:
        teacher_sel = [None if x["error"] else x["generated_text"] for x in answers("teacher", inputs.selection_rows)]
        selection = confidences_and_scores(teacher_sel, answers("student", inputs.selection_rows))
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


def predictions_table(task: TaskSpec, rows: list[dict], passes: dict[str, EnginePass], outputs: dict, parsed: dict,
                      label_of: dict, samples: list, nll_rows: dict) -> pa.Table:
    cols: dict[str, list] = {"id": [r["id"] for r in rows], "text": [r["text"] for r in rows],
                             "gold": [r["gold"] for r in rows], "data_answer": [r["answer"] for r in rows],
                             "teacher_sample_output": samples}
    for run in RUNS:
        res = [passes[run].result(r["id"]) for r in rows]
        cols[f"{run}_output"] = [x["generated_text"] for x in res]
        cols[f"{run}_answer"] = parsed[run]
        cols[f"{run}_label"] = label_of[run]
        cols[f"{run}_prompt_tokens"] = [x["num_input_tokens"] for x in res]
        cols[f"{run}_output_tokens"] = [x["num_generated_tokens"] for x in res]
        cols[f"{run}_latency_s"] = [x["latency_s"] for x in res]
        cols[f"{run}_error"] = [x["error"] for x in res]
        if run != "teacher":
            cols[f"{run}_confidence"] = [confidence(task, x) for x in res]
    for key, name in (("a", "nll_base_no_prompt"), ("b", "nll_base_with_prompt"), ("c", "nll_student_no_prompt")):
        cols[name] = nll_rows[key]
    return pa.table(cols)
