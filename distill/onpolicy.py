"""On-policy prompt distillation: the rounds (`train_rounds`) and each round's data. The student answers without
the prompt (its own samples, on a `ray.data.llm` vLLM engine), the teacher scores exactly those tokens with the
prompt (teacher-forced decoding, the long prompt prefix-cached: distill.scoring) and returns its top-k at every
position; training (distill.trainer) then minimises the reverse KL to the teacher on them
(distill.training.token_losses, objective "reverse").

Why: off-policy SFT trains on the teacher's answers; at inference the student continues its own, and its
mistakes compound where the teacher's data never went. On the student's own samples the teacher says, token by
token, where the student went wrong (Thinking Machines 2025: the same quality as RL at 9-30x less compute;
Microsoft's OPCD 2026: better than off-policy SFT for context distillation).
"""

from __future__ import annotations

import json
import logging
import shutil
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.fs as pafs

from distill.checkpoints import read_metrics
from distill.config import ConfigError
from distill.engine import EngineConfig, run_requests
from distill.scoring import ENGINE_ARGS, scoring_sampling
from distill.storage import join, local_dir, read_columns, read_json, resolve, staged_dir, write_json
from distill.tasks import TaskSpec
from distill.train_data import read_data, step_totals
from distill.trainer import export, fit
from distill.training import IGNORE, Example, StepPlan, read_examples, same_tokenizer, write_examples, write_rank_shards

if TYPE_CHECKING:  # the recipe's config; distill never imports a pipeline at run time
    from pipelines.train import TrainConfig

log = logging.getLogger("distill.onpolicy")


def sample_answers(rows: list[dict], task: TaskSpec, student: str, engine: EngineConfig, temperature: float,
                   max_tokens: int, seed: int) -> dict[str, dict]:
    """{id: {prompt_ids, tokens}}: the student's own answer to each query, no prompt, sampled at `temperature`."""
    requests = [{"key": r["id"], "messages": task.student_messages(r["text"]),
                 "sampling_params": {"temperature": temperature, "max_tokens": max_tokens}} for r in rows]
    results, wall = run_requests("on-policy: student samples", requests, student, engine, seed=seed)
    out = {k: {"prompt_ids": v["prompt_token_ids"], "tokens": v["generated_tokens"]} for k, v in results.items()
           if not v["error"] and v["generated_tokens"]}
    log.info("student sampled %d answers of %d queries in %.0fs", len(out), len(rows), wall)
    return out


def score_with_teacher(rows: list[dict], samples: dict[str, dict], task: TaskSpec, teacher: str,
                       engine: EngineConfig, top_k: int, seed: int) -> dict[str, dict]:
    """{id: {topk_ids, topk_logprobs, token_logprobs}}: the prompted teacher's view of each student token."""
    requests = [{"key": r["id"], "messages": task.teacher_messages(r["text"]),
                 "sampling_params": scoring_sampling(samples[r["id"]]["tokens"], top_k)}
                for r in rows if r["id"] in samples]
    results, wall = run_requests("on-policy: teacher scores", requests, teacher, engine, seed=seed,
                                 chat_template_kwargs={"enable_thinking": False}, **ENGINE_ARGS)
    failed = [k for k, v in results.items() if v["error"]]
    if failed:
        raise RuntimeError(f"the teacher could not score {len(failed)} student answers, e.g. {failed[:3]}: "
                           f"{results[failed[0]]['error'][:300]}")
    log.info("teacher scored %d student answers in %.0fs", len(results), wall)
    return results


def examples(samples: dict[str, dict], scores: dict[str, dict], max_length: int) -> list[Example]:
    """Training examples of the round: the student's prompt and its own answer, every answer position with the
    teacher's top-k there (the reverse-KL target) and the sampled token as its target (which counts the
    position; under objective "reverse" with soft weight 1 the cross-entropy has no weight)."""
    out = []
    for key in sorted(samples):
        prompt, tokens = samples[key]["prompt_ids"], samples[key]["tokens"]
        score = scores[key]
        ids = np.asarray(prompt + tokens, dtype=np.int64)
        if len(ids) > max_length:
            continue
        targets = np.full(len(ids), IGNORE, dtype=np.int64)
        start = len(prompt)
        targets[start - 1:len(ids) - 1] = ids[start:]
        k = min(len(row) for row in score["topk_ids"])
        if k == 0:
            raise RuntimeError(f"{key}: the teacher returned no top-k logprobs (top_k must be > 0)")
        out.append(Example(key, ids, targets, np.arange(start - 1, len(ids) - 1, dtype=np.int64),
                           np.asarray([row[:k] for row in score["topk_ids"]], dtype=np.int64),
                           np.asarray([row[:k] for row in score["topk_logprobs"]], dtype=np.float32)))
    return out


def round_summary(samples: dict, scores: dict[str, Any], task: TaskSpec, tokenizer) -> dict[str, Any]:
    """How far the student's samples were from the teacher: mean teacher log-probability per sampled token, and
    how many samples the task can read as an answer (on a label task, a student that drifts out of the answer
    format shows here first: the prompted teacher, scored without the generation's grammar, may not hold it up)."""
    lps = [lp for v in scores.values() for lp in (v["token_logprobs"] or [])]
    texts = [tokenizer.decode(v["tokens"], skip_special_tokens=True) for v in samples.values()]
    parsed = sum(task.parse(t).answer is not None for t in texts)
    return {"samples": len(samples), "tokens": len(lps), "answers_parsed": parsed,
            "teacher_logprob_per_token": float(np.mean(lps)) if lps else None}


def train_rounds(config: TrainConfig, tokenizer, task, prepared: dict, select_by: str, run: tuple):
    """Rounds of on-policy distillation (the functions above), each in OUT/rounds/NN: the current student samples
    the training queries without the prompt, the prompted teacher scores those tokens, Ray Train minimises the
    reverse KL on them starting from the current adapter. A finished round is skipped on a rerun; a round's samples
    and scores are kept, so its training resumes on exactly the same data. OUT/adapter is the last round's."""
    from distill.modeling import merge_adapter_on_cluster

    op = config.on_policy
    teacher = op.teacher or (prepared["teacher"] if isinstance(prepared["teacher"], str) else None)
    if not teacher:
        raise ConfigError(f"on-policy: the data names no single teacher ({prepared['teacher']}); set on_policy.teacher")
    same, why = same_tokenizer(tokenizer, teacher)
    if not same:
        raise ConfigError(f"on-policy distillation scores the student's own tokens with the teacher: {why}")
    split = read_columns(join(config.output, "split.parquet"), ["id", "split"]).to_pylist()
    train_ids = {r["id"] for r in split if r["split"] == "train"}
    rows = [r for r in read_data(config) if r["id"] in train_ids]
    texts = sorted(({"id": r["id"], "text": r["messages"][0]["content"], "answer": r["answer"]} for r in rows),
                   key=lambda r: r["id"])
    max_tokens = op.max_new_tokens or max(len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"])
                                          for r in texts) + 8
    policy, rounds, merged_metrics, offset = config.init_adapter, [], [], 0
    for r in range(op.rounds):
        rdir = join(config.output, "rounds", f"{r:02d}")
        fs, rpath = resolve(rdir)
        done = read_json(join(rdir, "round.json"))
        if done is None:
            cached = f"{rpath}/_tokens/examples.parquet"
            if fs.get_file_info(cached).type == pafs.FileType.NotFound:
                rng = np.random.default_rng([config.seed, r])
                queries = [texts[i] for i in sorted(rng.permutation(len(texts))[:op.queries_per_round or len(texts)])]
                model = config.student if policy is None else merge_adapter_on_cluster(
                    config.student, policy, join(rdir, "policy-merged"))
                samples = sample_answers(queries, task, model, op.engine, op.temperature, max_tokens, config.seed + r)
                scores = score_with_teacher(queries, samples, task, teacher, op.engine, op.top_k, config.seed + r)
                fs.create_dir(f"{rpath}/_tokens", recursive=True)
                write_examples(fs, cached, examples(samples, scores, config.max_length))
                summary = round_summary(samples, scores, task, tokenizer)
                log.info("round %d: %d of %d student samples parse as answers; teacher log-prob per token %.2f",
                         r, summary["answers_parsed"], summary["samples"], summary["teacher_logprob_per_token"] or 0)
                write_json(join(rdir, "samples.json"), summary)
            # Named apart from `examples` (the function above, which builds them).
            round_examples = read_examples(fs, cached)
            plan = StepPlan.build([e.length for e in round_examples], config.per_device_batch_size,
                                  config.gradient_accumulation, config.workers, 1, config.seed + r, op.steps_per_round)
            round_prepared = {**prepared, "steps": len(plan), "soft_weight": 1.0, "objective": "reverse",
                              "shards": write_rank_shards(fs, f"{rpath}/_tokens", round_examples, plan.steps,
                                                          config.workers),
                              **step_totals(round_examples, plan.steps), "steps_per_epoch": len(plan)}
            round_config = config.model_copy(update={"output": rdir, "init_adapter": policy, "merge": False})
            exported = export(round_config, fit(round_config, round_prepared, task, select_by, *run))
            done = {"complete": True, "round": r, "planned_steps": len(plan), "policy": policy,
                    **(read_json(join(rdir, "samples.json")) or {}), **exported}
            write_json(join(rdir, "round.json"), done)
        rounds.append(done)
        policy = join(rdir, "adapter")
        for m in read_metrics(join(rdir, "metrics.jsonl")):  # one learning curve over every round
            merged_metrics.append({**m, "step": m["step"] + offset, "round": r})
        offset += done["planned_steps"]
    out_fs, out_path = resolve(config.output)
    with out_fs.open_output_stream(f"{out_path}/metrics.jsonl") as f:
        f.write("".join(json.dumps(m) + "\n" for m in merged_metrics).encode())
    with staged_dir(join(config.output, "adapter")) as staging, local_dir(policy) as last:
        shutil.copytree(last, staging, dirs_exist_ok=True)
    if config.merge:
        merge_adapter_on_cluster(config.student, join(config.output, "adapter"), join(config.output, "merged"))
    last = rounds[-1]
    return {"best_val_loss": last.get("best_val_loss"), "best_val_agreement": last.get("best_val_agreement"),
            "best_step": last["best_step"] + offset - last["planned_steps"], "adapter_step": offset}, rounds
