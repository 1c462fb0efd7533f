"""The soft labels of a teacher that reasons: its top-k at its answers' tokens only, scored after generation.

Asked while it generates, logprobs would cover every reasoning token (thousands for Thinking-2507) where only the
answer's are kept; the teacher pass asks none, the Decider (distill.generate.steps) keeps each answer's tokens and
the tokens before them, and this pass scores the answers in exactly the context they were sampled in.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow as pa

from distill.formats import DATA_SCHEMA
from distill.generate.config import GenerateConfig
from distill.generate.steps import data_dir
from distill.storage import list_files, resolve, write_table
from distill.tasks import TaskSpec

log = logging.getLogger("distill.generate")


def score_answers(config: GenerateConfig, task: TaskSpec, tokenizer) -> dict[str, Any]:
    """The soft labels of a reasoning teacher: its top-k at its answers' tokens only. The rows it wrote carry the
    tokens it generated before its answer and no top-k (Decider); one teacher-forced pass (distill.scoring)
    scores each answer after the teacher's own prompt, rendered and tokenized as generation's engine did it,
    and those tokens: exactly the context the answer was sampled in. Each data shard holding such rows is then
    rewritten whole (one file at a time, atomically); a rerun scores what is still unscored. Returns counts."""
    import pyarrow.parquet as pq

    from distill.engine import run_requests
    from distill.scoring import ENGINE_ARGS, scoring_sampling

    t0 = time.monotonic()
    shards, requests = {}, []
    for uri in list_files(data_dir(config.output)):
        fs, path = resolve(uri)
        rows = pq.read_table(path, filesystem=fs).to_pylist()
        todo = [r for r in rows if r["reasoning_token_ids"] is not None and r["topk_ids"] is None]
        if not todo:
            continue
        shards[uri] = rows
        for r in todo:
            prompt = tokenizer.apply_chat_template(task.teacher_messages(r["text"]), add_generation_prompt=True,
                                                   tokenize=False, **task.teacher_template_kwargs())
            requests.append({"key": r["id"], "prompt_token_ids": tokenizer(prompt)["input_ids"]
                             + list(r["reasoning_token_ids"]),
                             "sampling_params": scoring_sampling(list(r["teacher_token_ids"]), config.logprobs)})
    if not requests:
        return {"rows": 0, "shards": 0, "seconds": 0.0}
    log.info("soft labels: scoring %d answers after their reasoning (%d shards)", len(requests), len(shards))
    results, _ = run_requests("teacher soft labels", requests, config.teacher, config.engine, seed=config.seed,
                              tokenizer=tokenizer, **ENGINE_ARGS)
    failed = [k for k, v in results.items() if v["error"]]
    if failed:  # a row without its soft labels would train differently from its neighbours, unsaid
        raise RuntimeError(f"the teacher could not score {len(failed)} of its answers, e.g. {failed[:3]}: "
                           f"{results[failed[0]]['error'][:300]}")
    for uri, rows in shards.items():
        for r in rows:
            if r["id"] in results:
                r["topk_ids"], r["topk_logprobs"] = results[r["id"]]["topk_ids"], results[r["id"]]["topk_logprobs"]
        write_table(uri, pa.Table.from_pylist(rows, schema=DATA_SCHEMA))
    return {"rows": len(requests), "shards": len(shards), "seconds": round(time.monotonic() - t0, 3)}
