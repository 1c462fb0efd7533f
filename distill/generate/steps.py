"""Generation's machinery: the output's layout (data/, rejects/, _work/), the input checked and staged before any
engine starts (`prepare`), the Ray Data x `ray.data.llm` teacher pass (`build_generation_pipeline`), the
`Decider` that turns a query's samples into an example, a retry or a reject, one attempt over the pending queries
(`run_attempt`), and the accounting that proves every input row is in exactly one place (`account`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc

from distill.chat import answer_start, answer_start_of_ids, teacher_output
from distill.config import ConfigError
from distill.console import Progress
from distill.engine import model_context_limit, processor_config
from distill.formats import DATA_SCHEMA, QUERY_SCHEMA, REJECT_SCHEMA
from distill.inputs import read_queries, sampled_positions
from distill.generate.config import GenerateConfig
from distill.storage import ShardWriter, join, list_files, read_columns, read_ids, read_json, remove, write_json
from distill.tasks import TaskSpec

log = logging.getLogger("distill.generate")  # the stage's name on its log lines, wherever the code lives


# ----------------------------------------------------------------------------------------------------------------
# Paths inside the output directory.
def data_dir(out: str) -> str:
    return join(out, "data")


def rejects_dir(out: str) -> str:
    return join(out, "rejects")


def work_dir(out: str, *parts: str) -> str:
    return join(out, "_work", *parts)


def attempt_dir(out: str, attempt: int) -> str:
    return work_dir(out, "queries") if attempt == 0 else work_dir(out, f"retry-{attempt}")


# ----------------------------------------------------------------------------------------------------------------
# 1. Prepare
# Tokens the chat template may add where it joins a query to the prompt (rendered here with an empty query),
# beyond the query's own: the planned engine context keeps this much spare.
QUERY_JOIN_MARGIN = 16


def settings_fingerprint(config: GenerateConfig, task: TaskSpec, sampling: dict[str, Any]) -> dict[str, Any]:
    """Everything that changes what generation writes: a rerun into the same output must match it (see
    distill.config.check_settings). Sharding, flushing, logging and the actor pool's size do not, and stay free."""
    return {
        "input": config.input, "limit": config.limit, "sample": config.sample,
        "columns": [config.text_column, config.id_column, config.label_column],
        "task": task.model_dump(), "teacher": config.teacher, "sampling": sampling,
        "samples": config.samples, "retries": config.retries, "seed": config.seed, "logprobs": config.logprobs,
        "max_model_len": config.engine.max_model_len, "dtype": config.engine.dtype,
    }


def prepare(config: GenerateConfig, task: TaskSpec, tokenizer, sampling: dict[str, Any]) -> dict[str, Any]:
    """Check every input row and stage the valid queries. Idempotent: done once per output directory (whose
    settings `main` has already checked)."""
    out = config.output
    marker = work_dir(out, "prepared.json")
    done = read_json(marker)
    if done is not None:
        return done
    # A prepare that died half-way left partial staging: start it over (it is deterministic).
    remove(work_dir(out))
    for f in list_files(rejects_dir(out)):
        remove(f)

    prompt_text = tokenizer.apply_chat_template(task.teacher_messages(""), add_generation_prompt=True,
                                                tokenize=False)
    prompt_tokens = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    # The context a query may use: what engine.max_model_len leaves after the prompt and the teacher's budget
    # (reasoning + answer); unset, what the model's own context leaves, and the engine is then planned for the
    # longest query staged (plus a margin for how the template joins a query to the prompt).
    context = config.engine.max_model_len or model_context_limit(config.teacher)
    setting = "engine.max_model_len" if config.engine.max_model_len else f"the context of {config.teacher}"
    budget = (context - sampling["max_tokens"] - prompt_tokens) if context else None
    if budget is not None and budget <= 0:
        raise ConfigError(
            f"the task prompt alone takes {prompt_tokens} tokens and the teacher's budget {sampling['max_tokens']} "
            f"(reasoning + answer), more than {setting}={context}: raise max_model_len or lower the budget")
    longest = 0

    stats = Counter()
    t0 = time.monotonic()
    with ShardWriter(work_dir(out, "queries"), "queries", QUERY_SCHEMA, config.rows_per_shard * 10) as queries, \
            ShardWriter(rejects_dir(out), "input", REJECT_SCHEMA, config.rows_per_shard * 10) as rejects:
        pending = []

        def check_lengths() -> None:
            nonlocal longest
            lengths = [len(ids) for ids in tokenizer([r.text for r in pending], add_special_tokens=False)["input_ids"]]
            for row, n in zip(pending, lengths):
                if budget is not None and n > budget:
                    reject(row, f"too long: {n} query tokens, the engine leaves {budget} after the "
                                f"{prompt_tokens}-token prompt and the teacher's {sampling['max_tokens']} tokens "
                                f"({setting}: {context})")
                else:
                    queries.write({"id": row.id, "text": row.text, "gold": row.gold, "row": row.row})
                    stats["queries"] += 1
                    longest = max(longest, n)
            pending.clear()

        def reject(row, reason: str) -> None:
            rejects.write({"id": row.id, "row": row.row, "text": row.text, "reason": reason, "stage": "input",
                           "teacher_output": None})
            stats["rejected"] += 1

        keep = sampled_positions(config.input, config.sample, config.text_column, config.id_column,
                                 config.label_column) if config.sample else None
        for row in read_queries(config.input, config.text_column, config.id_column, config.label_column,
                                config.limit, keep):
            stats["rows_in"] += 1
            if row.reason:
                reject(row, row.reason)
            else:
                pending.append(row)
                if len(pending) >= 512:
                    check_lengths()
        check_lengths()
    planned = prompt_tokens + longest + QUERY_JOIN_MARGIN + sampling["max_tokens"]
    result = {
        "rows_in": stats["rows_in"], "queries": stats["queries"],
        "rejected_at_input": stats["rejected"], "prompt_tokens": prompt_tokens, "seconds": time.monotonic() - t0,
        "longest_query_tokens": longest,
        "max_model_len": config.engine.max_model_len or (min(planned, context) if context else planned),
    }
    write_json(marker, result)
    log.info("prepared %d rows: %d queries, %d rejected at input", stats["rows_in"], stats["queries"],
             stats["rejected"])
    return result


# ----------------------------------------------------------------------------------------------------------------
# 2. Teacher pass
def build_generation_pipeline(ds, config: GenerateConfig, task: TaskSpec, sampling: dict[str, Any], attempt: int):
    """Ray Data dataset of queries (id, text, gold) -> dataset of raw teacher samples, one row per sample.

    The vLLM actor pool comes from `ray.data.llm`; this function only says what each request is and what to keep.
    """
    from ray.data.llm import build_processor

    samples, top_k = config.samples, config.logprobs

    def preprocess(row: dict) -> dict:
        return {"messages": task.teacher_messages(row["text"]), "sampling_params": sampling}

    def postprocess(row: dict) -> dict:
        return {
            "id": row["id"], "row": row["row"], "text": row["text"], "gold": row["gold"], "sample": row["sample"],
            "generated_text": row["generated_text"], "generated_tokens": list(row["generated_tokens"]),
            "num_input_tokens": row["num_input_tokens"], "num_generated_tokens": row["num_generated_tokens"],
            "logprobs": _topk(row.get("logprobs"), row["generated_tokens"], top_k),
        }

    ds = ds.flat_map(lambda r: [{**r, "sample": s} for s in range(samples)])
    processor = build_processor(
        # No per-request seeds: vLLM's CPU sampler crashes ("CPU Generator does not use offset") when a seeded
        # request's prefill is chunked, which the long shared prompt makes common. The engine seed differs per
        # attempt, so a retry draws new answers; the samples of one query differ by the engine's RNG stream.
        processor_config(config.engine, config.teacher, chat_template_kwargs=task.teacher_template_kwargs(),
                         seed=config.seed + attempt),
        preprocess=preprocess,
        postprocess=postprocess,
        preprocess_map_kwargs={"num_cpus": config.engine.side_stage_cpus},
        postprocess_map_kwargs={"num_cpus": config.engine.side_stage_cpus},
    )
    return processor(ds)


def _topk(logprobs, tokens, k: int) -> Optional[dict]:
    """vLLM's per-token {token_id: {logprob, rank, decoded_token}} -> sorted top-k ids and logprobs per token,
    plus each sampled token's text (to find where the answer starts after any reasoning). vLLM adds the sampled
    token to the k best when it ranks lower; distill.scoring.top_k_of keeps the k best."""
    if not logprobs:
        return None
    from distill.scoring import top_k_of

    ids, lps, texts = [], [], []
    for position, token in zip(logprobs, tokens):
        top = top_k_of(position, k)
        ids.append([t for t, _ in top])
        lps.append([lp for _, lp in top])
        chosen = position.get(int(token)) or position.get(str(int(token))) or {}
        texts.append(chosen.get("decoded_token") or "")
    return {"ids": ids, "logprobs": lps, "texts": texts}


def reasons(task: TaskSpec, opens_reasoning: bool) -> bool:
    """Does the teacher reason before it answers: the task says it thinks, or its template opens the block."""
    return opens_reasoning or task.teacher.thinks


class Decider:
    """Turns the samples of one query into a training example, a retry, or a reject."""

    def __init__(self, config: GenerateConfig, task: TaskSpec, attempt: int, writers: dict[str, ShardWriter],
                 opens_reasoning: bool, max_tokens: int, tokenizer):
        self.config, self.task, self.attempt, self.writers = config, task, attempt, writers
        self.opens_reasoning = opens_reasoning  # the teacher's template opens the think block itself
        self.max_tokens = max_tokens  # the engine's, reasoning included: an output this long was cut
        self.tokenizer = tokenizer  # the teacher's: where a reasoning teacher's answer starts (no logprobs asked)
        self.last = attempt == config.retries
        self.counts = Counter()

    def decide(self, samples: list[dict]) -> None:
        first = samples[0]
        parsed = []
        reasons = Counter()
        for s in samples:
            if s.get("__inference_error__"):
                reasons[f"inference error: {s['__inference_error__'][:300]}"] += 1
                continue
            # ray.data.llm returns no finish reason: an output that used every token it had was cut.
            self.counts["cut_by_length"] += int(s["num_generated_tokens"] >= self.max_tokens)
            p = self.task.parse(teacher_output(s["generated_text"] or "", self.opens_reasoning))
            if p.answer is None:
                reasons[p.reason] += 1
            else:
                parsed.append((s, p))
        if parsed:
            votes = Counter(p.answer for _, p in parsed)
            best, count = votes.most_common(1)[0]
            s, p = next((s, p) for s, p in parsed if p.answer == best)
            self.writers["data"].write(self._example(s, p, count / len(samples)))
            self.counts["written"] += 1
            return
        reason, _ = reasons.most_common(1)[0]
        inference_failed = reason.startswith("inference error")
        if not self.last and not inference_failed:
            self.writers["retry"].write({k: first[k] for k in ("id", "text", "gold", "row")})
            self.counts["retried"] += 1
            return
        tries = "" if inference_failed else f" (after {self.attempt + 1} attempt(s))"
        self.writers["rejects"].write({"id": first["id"], "row": first["row"], "text": first["text"],
                                       "reason": f"teacher: {reason}{tries}", "stage": "teacher",
                                       "teacher_output": first.get("generated_text")})
        self.counts["rejected"] += 1

    def _example(self, s: dict, p, agreement: float) -> dict:
        topk = s.get("logprobs")
        tokens = [int(t) for t in s["generated_tokens"]]
        # A teacher that reasons is asked no logprobs (they would cover its whole reasoning): its answer's tokens
        # and the tokens before them are kept, and the soft-label pass (distill.generate.soft_labels) scores the answer alone.
        scored_later = self.config.logprobs > 0 and topk is None and reasons(self.task, self.opens_reasoning)
        if topk:
            start = answer_start(topk["texts"])
        elif scored_later:
            start = answer_start_of_ids(self.tokenizer, tokens)
        else:
            start = 0
        return {
            "id": s["id"], "text": s["text"],
            "messages": TaskSpec.student_messages(s["text"], p.answer),
            "answer": p.answer, "label": self.task.label_of(p.answer), "gold": s["gold"],
            "teacher_output": p.raw, "reasoning": p.reasoning,
            "prompt_tokens": int(s["num_input_tokens"]), "output_tokens": int(s["num_generated_tokens"]),
            "teacher": self.config.teacher, "task": self.task.name, "attempt": self.attempt,
            "samples": self.config.samples, "agreement": agreement,
            "teacher_token_ids": tokens[start:] if topk or scored_later else None,
            "reasoning_token_ids": tokens[:start] if scored_later else None,
            "topk_ids": topk["ids"][start:] if topk else None,
            "topk_logprobs": topk["logprobs"][start:] if topk else None,
        }


def run_attempt(config: GenerateConfig, task: TaskSpec, sampling: dict[str, Any], attempt: int,
                opens_reasoning: bool, tokenizer) -> Counter:
    import ray

    out = config.output
    source = attempt_dir(out, attempt)
    done = read_ids(data_dir(out)) | teacher_rejected_ids(out) | read_ids(attempt_dir(out, attempt + 1))
    pending = read_ids(source) - done
    if not pending:
        return Counter()
    log.info("attempt %d: %d queries to send to the teacher (%d already done)", attempt, len(pending),
             len(read_ids(source)) - len(pending))
    pending_ref = ray.put(pa.array(sorted(pending), pa.string()))

    def keep_pending(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.is_in(batch["id"], value_set=ray.get(pending_ref)))

    ds = ray.data.read_parquet(list_files(source), num_cpus=0.25)
    ds = ds.map_batches(keep_pending, batch_format="pyarrow", num_cpus=0.25).select_columns(["id", "text", "gold", "row"])
    # Small blocks stream: answers reach the driver (and durable shards) a few batches at a time instead of one
    # block per staged file at the very end, and memory stays flat however many rows there are.
    ds = ds.repartition(target_num_rows_per_block=config.engine.batch_size)
    results = build_generation_pipeline(ds, config, task, sampling, attempt)

    writers = {
        "data": ShardWriter(data_dir(out), f"part-a{attempt}", DATA_SCHEMA, config.rows_per_shard,
                            config.flush_seconds),
        "rejects": ShardWriter(rejects_dir(out), f"teacher-a{attempt}", REJECT_SCHEMA, config.rows_per_shard,
                               config.flush_seconds),
        "retry": ShardWriter(attempt_dir(out, attempt + 1), "queries", QUERY_SCHEMA, config.rows_per_shard,
                             config.flush_seconds),
    }
    decider = Decider(config, task, attempt, writers, opens_reasoning, sampling["max_tokens"], tokenizer)
    try:
        groups: dict[str, list[dict]] = {}
        t0 = time.monotonic()
        progress = Progress(f"generate (attempt {attempt})" if attempt else "generate", len(pending), "queries",
                            config.progress_seconds)
        for row in results.iter_rows():
            group = groups.setdefault(row["id"], [])
            group.append(row)
            if len(group) == config.samples:
                decider.decide(groups.pop(row["id"]))
            counts = decider.counts
            progress.update(sum(counts.values()), f"written {counts['written']}, retry {counts['retried']}, "
                            f"rejected {counts['rejected']}")
        if groups:
            raise RuntimeError(f"{len(groups)} queries came back with fewer than {config.samples} samples")
    except BaseException:
        for w in writers.values():
            w.discard()
        raise
    for w in writers.values():
        w.close()
    progress.close()
    decider.counts["seconds"] = round(time.monotonic() - t0, 3)
    decider.counts["start_up_seconds"] = round(progress.start_up_s or 0.0, 3)
    return decider.counts


# ----------------------------------------------------------------------------------------------------------------
# 3. Accounting
def teacher_rejected_ids(out: str) -> set[str]:
    rejected = read_columns(rejects_dir(out), ["id", "stage"])
    return {i for i, stage in zip(rejected.column("id").to_pylist(), rejected.column("stage").to_pylist())
            if stage == "teacher"}


def account(config: GenerateConfig, prepared: dict[str, Any]) -> dict[str, Any]:
    """Prove that every input row is in exactly one place: data/ or rejects/ (else raise)."""
    out = config.output
    written = read_columns(data_dir(out), ["id"]).column("id").to_pylist()
    rejected = read_columns(rejects_dir(out), ["id", "row", "stage", "reason"])
    rows = rejected.column("row").to_pylist()
    stages = rejected.column("stage").to_pylist()
    teacher_rejected = [i for i, st in zip(rejected.column("id").to_pylist(), stages) if st == "teacher"]
    answered = written + teacher_rejected
    problems = []
    if len(set(answered)) != len(answered):
        problems.append(f"{len(answered) - len(set(answered))} query ids written or rejected more than once")
    if len(set(rows)) != len(rows):
        problems.append(f"{len(rows) - len(set(rows))} input rows rejected more than once")
    missing = read_ids(work_dir(out, "queries")) - set(answered)
    if missing:
        problems.append(f"{len(missing)} queries neither written nor rejected, e.g. {sorted(missing)[:5]}")
    if len(written) + len(rows) != prepared["rows_in"]:
        problems.append(f"rows_in={prepared['rows_in']} but written+rejected={len(written) + len(rows)}")
    if problems:
        raise RuntimeError(f"accounting failed for {out}: " + "; ".join(problems))
    reasons = Counter(r.split(":")[0] if r.startswith("teacher: inference") else r.split(" (")[0]
                      for r in rejected.column("reason").to_pylist())
    return {"rows_in": prepared["rows_in"], "rows_written": len(written), "rows_rejected": len(rows),
            "reject_reasons": dict(reasons.most_common())}
