"""Generate: the teacher answers every query with the task's long prompt; the student's training data comes out.

    distill generate --task language-id --input queries.jsonl --output runs/gen

1. Prepare (driver, before any engine starts): read the input, check every row (blank, undecodable, too long for
   the engine, duplicate id) and stage the valid queries; bad rows go to the reject log with their reason.
2. Teacher pass (Ray Data x `ray.data.llm` vLLM actor pool): every pending query is sent with the task prompt
   (shared by all requests, so prefix caching computes it once). The driver parses each answer, strips any
   reasoning, and writes prompt-free chat examples as atomic Parquet shards. Unparseable answers go to the next
   pass with a new seed, up to `retries` times, then to the reject log.
3. Accounting: every input row is in exactly one of data/ and rejects/; manifest.json proves it with counts.

Rerunning the same command into the same output after a crash finishes only the ids that are missing. Each
step's machinery is in distill.generate.steps.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from distill.checkpoints import AttemptClock
from distill.config import check_settings
from distill.engine import engine_facts
from distill.generate.config import GenerateConfig
from distill.generate.soft_labels import score_answers
from distill.generate.steps import (account, attempt_dir, data_dir, prepare, reasons, rejects_dir, run_attempt,
                                    settings_fingerprint)
from distill.sampling import teacher_sampling
from distill.storage import clean_temporaries, join, read_json, write_json
from distill.tasks import load_task

log = logging.getLogger("distill.generate")


def main(config: GenerateConfig) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from distill.ray_init import init_ray

    out = config.output
    manifest_path = join(out, "manifest.json")
    task = load_task(config.task).with_teacher_budgets(config.max_tokens, config.reasoning_tokens)
    # Before any work: does the teacher's template open a think block (Qwen3-*-Thinking-2507)?
    tokenizer = AutoTokenizer.from_pretrained(config.teacher)
    opened = task.teacher_opens_reasoning(tokenizer, config.teacher)
    if opened:
        log.info("the teacher's template opens the think block: an output without </think> is an unfinished "
                 "reasoning, never an answer")
    # A teacher that reasons is asked no logprobs while it generates: they would cover every reasoning token
    # (thousands) where only the answer's are kept. Its answers are scored after the reasoning instead.
    soft_labels_after = config.logprobs > 0 and reasons(task, opened)
    sampling = teacher_sampling(task, tokenizer, config.temperature, 0 if soft_labels_after else config.logprobs)
    # Before anything is reused: a complete or partial output made with other settings is an error, not a skip.
    check_settings(join(out, "settings.json"), settings_fingerprint(config, task, sampling), "a generation run")
    existing = read_json(manifest_path)
    if existing is not None and existing.get("complete"):
        log.info("%s is complete already (%d rows written); nothing to do", out, existing["rows_written"])
        return existing

    with AttemptClock(out) as clock:
        t0 = time.monotonic()
        # 1. Prepare
        for d in (data_dir(out), rejects_dir(out)):
            clean_temporaries(d)
        prepared = prepare(config, task, tokenizer, sampling)
        # The teacher's engine holds the prompt, the longest query staged and the teacher's whole budget.
        config = config.model_copy(update={"engine": config.engine.model_copy(
            update={"max_model_len": prepared["max_model_len"]})})
        log.info("teacher engine context: %d tokens (prompt %d + longest query %d + the teacher's budget %d)",
                 prepared["max_model_len"], prepared["prompt_tokens"], prepared["longest_query_tokens"],
                 sampling["max_tokens"])

        # 2. Teacher pass: the first attempt, then retries of the unparseable answers
        attempts = {}
        init_ray()
        engine = engine_facts(config.engine)
        log.info("teacher engine: %s, dtype %s (setting %s; CPU kind %s)", engine["device"], engine["dtype"],
                 engine["dtype_setting"], engine["cpu_kind"])
        if prepared["queries"]:
            for attempt in range(config.retries + 1):
                clean_temporaries(attempt_dir(out, attempt + 1))
                counts = run_attempt(config, task, sampling, attempt, opened, tokenizer)
                if counts:
                    attempts[str(attempt)] = dict(counts)
        soft_labels = score_answers(config, task, tokenizer) if soft_labels_after else None

        # 3. Accounting, and the manifest that proves it
        manifest = {
            **account(config, prepared),
            "complete": True,
            "task": task.name, "task_spec": task.model_dump(), "teacher": config.teacher,
            "input": config.input, "output": out,
            "prompt_tokens_per_query": prepared["prompt_tokens"],
            "sampling": {k: v for k, v in sampling.items() if k != "structured_outputs"},
            "constrained": "structured_outputs" in sampling,
            "template_opens_reasoning": opened, "max_model_len": prepared["max_model_len"],
            # A reasoning teacher's top-k, scored at its answers after generation (None: taken while generating).
            "soft_labels_after_reasoning": soft_labels,
            "cut_by_length": sum(a.get("cut_by_length", 0) for a in attempts.values()),
            "samples": config.samples, "retries": config.retries, "engine": engine,
            "timings": {"prepare_s": round(prepared["seconds"], 3),
                        "total_s_this_run": round(time.monotonic() - t0, 3),
                        # Every attempt (a preempted run and its rerun) counts towards generation's cost.
                        "total_s_all_attempts": round(clock.total_s(), 3),
                        "attempts": attempts},
            "config": config.model_dump(),
        }
        write_json(manifest_path, manifest)
        log.info("wrote %d examples to %s, %d rejects to %s; manifest %s", manifest["rows_written"], data_dir(out),
                 manifest["rows_rejected"], rejects_dir(out), manifest_path)
        return manifest


def add_cli(subparsers) -> None:
    from distill.config import add_config_arguments

    p = subparsers.add_parser("generate", help="teacher answers queries with the task prompt -> student data")
    add_config_arguments(p, GenerateConfig)
    p.set_defaults(func=_cli)


def _cli(args) -> None:
    import json

    from distill.config import config_from_args

    config = config_from_args(GenerateConfig, args)
    manifest = main(config)
    print(json.dumps({k: manifest[k] for k in ("rows_in", "rows_written", "rows_rejected", "reject_reasons")},
                     indent=2))
    print(f"examples: {data_dir(config.output)}\nrejects:  {rejects_dir(config.output)}\n"
          f"manifest: {join(config.output, 'manifest.json')}")
