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
step's machinery is in distill.generation.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

from pydantic import Field

from distill.checkpoints import AttemptClock
from distill.config import StrictModel, check_settings
from distill.engine import EngineConfig, engine_facts
from distill.generation import (account, attempt_dir, data_dir, prepare, rejects_dir, run_attempt,
                                settings_fingerprint)
from distill.models import default_model_dir, sample_data_path
from distill.sampling import teacher_sampling
from distill.storage import clean_temporaries, join, read_json, write_json
from distill.tasks import load_task

log = logging.getLogger("distill.generate")


class GenerateConfig(StrictModel):
    task: str = Field("language-id", description="Built-in task name or path to a task YAML.")
    input: str = Field(str(sample_data_path()), description="Queries: .txt/.jsonl/.parquet file or folder, or URI.")
    output: str = Field("runs/generate", description="Output directory or URI (data/, rejects/, manifest.json).")
    teacher: str = Field(default_model_dir(), description="Teacher model: a local folder or a hub name.")
    limit: Optional[int] = Field(None, ge=1, description="Use only the first N input rows.")
    sample: Optional[int] = Field(
        None, ge=1, description="Use N rows spread over the whole input (those whose id hashes lowest: the same rows "
        "on every run; a file sorted by label still yields every label). The input is read twice.")
    text_column: str = Field("text", description="Column holding the query text (.jsonl/.parquet).")
    id_column: str = Field("id", description="Column holding a stable id; ids are derived from the text if absent.")
    label_column: str = Field("label", description="Column holding a gold label, if any (kept for evaluation).")
    temperature: Optional[float] = Field(None, ge=0, description="Override the task's teacher temperature.")
    max_tokens: Optional[int] = Field(None, ge=1, description="Override the task's teacher max_tokens.")
    samples: int = Field(1, ge=1, description="Teacher samples per query; >1 takes the majority answer.")
    retries: int = Field(2, ge=0, description="Extra attempts (new seed) for unparseable answers before rejecting.")
    logprobs: int = Field(
        20, ge=0, le=20, description="Keep the teacher's top-k logprobs per answer token (0: off): the soft labels "
        "training mixes in when the student shares the teacher's tokenizer. On by default: vLLM returns them "
        "with the tokens it samples anyway (20 is vLLM's max_logprobs).")
    seed: int = Field(0, description="Engine sampling seed; attempt k uses seed + k.")
    rows_per_shard: int = Field(1000, ge=1, description="Rows per output Parquet shard.")
    flush_seconds: float = Field(60.0, gt=0, description="Write a shard at least this often while rows arrive.")
    progress_seconds: float = Field(10.0, gt=0, description="How often progress is logged.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engines and their actor pool.")


def main(config: GenerateConfig) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from distill.ray_init import init_ray

    out = config.output
    manifest_path = join(out, "manifest.json")
    task = load_task(config.task)
    sampling = teacher_sampling(task, config.temperature, config.max_tokens, config.logprobs)
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
        tokenizer = AutoTokenizer.from_pretrained(config.teacher)
        prepared = prepare(config, task, tokenizer, sampling)

        # 2. Teacher pass: the first attempt, then retries of the unparseable answers
        attempts = {}
        init_ray()
        engine = engine_facts(config.engine)
        log.info("teacher engine: %s, dtype %s (setting %s; CPU kind %s)", engine["device"], engine["dtype"],
                 engine["dtype_setting"], engine["cpu_kind"])
        if prepared["queries"]:
            for attempt in range(config.retries + 1):
                clean_temporaries(attempt_dir(out, attempt + 1))
                counts = run_attempt(config, task, sampling, attempt)
                if counts:
                    attempts[str(attempt)] = dict(counts)

        # 3. Accounting, and the manifest that proves it
        manifest = {
            **account(config, prepared),
            "complete": True,
            "task": task.name, "task_spec": task.model_dump(), "teacher": config.teacher,
            "input": config.input, "output": out,
            "prompt_tokens_per_query": prepared["prompt_tokens"],
            "sampling": {k: v for k, v in sampling.items() if k != "structured_outputs"},
            "constrained": "structured_outputs" in sampling,
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
