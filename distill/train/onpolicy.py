"""On-policy prompt distillation: the rounds (`train_rounds`) and each round's data. The student answers without
the prompt (its own samples, on a `ray.data.llm` vLLM engine), the teacher scores exactly those tokens with the
prompt (teacher-forced decoding, the long prompt prefix-cached: distill.scoring) and returns its top-k at every
position, under the task's answer grammar where the teacher generated under it (`AnswerGrammar`); training
(distill.train.loop) then minimises the reverse KL to the teacher on them (distill.train.examples.token_losses,
objective "reverse").

Why: off-policy SFT trains on the teacher's answers; at inference the student continues its own, and its
mistakes compound where the teacher's data never went. On the student's own samples the teacher says, token by
token, where the student went wrong (Thinking Machines 2025: the same quality as RL at 9-30x less compute;
Microsoft's OPCD 2026: better than off-policy SFT for context distillation).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from distill.checkpoints import read_metrics
from distill.config import ConfigError
from distill.engine import EngineConfig, resolve_device, run_requests
from distill.scoring import ENGINE_ARGS, scoring_sampling
from distill.storage import join, local_dir, read_columns, read_json, resolve, staged_dir, write_json
from distill.tasks import TaskSpec
from distill.train.data import PreparedData, read_data, step_totals
from distill.train.loop import Placement, export, fit
from distill.train.examples import (IGNORE, Example, StepPlan, read_examples, same_tokenizer, write_examples,
                                    write_rank_shards)
from distill.train.config import TrainConfig

log = logging.getLogger("distill.train.onpolicy")


def sample_answers(rows: list[dict], task: TaskSpec, student: str, engine: EngineConfig, temperature: float,
                   max_tokens: int, seed: int, tokenizer=None, adapter: str | None = None) -> dict[str, dict]:
    """{id: {prompt_ids, tokens}}: the student's own answer to each query, no prompt, sampled at `temperature`
    (`tokenizer`: the student's, for a `student` folder the driver cannot read, a merged one in a store;
    `adapter`: the policy's LoRA adapter, where the student is served with LoRA)."""
    requests = [{"key": r["id"], "messages": task.student_messages(r["text"]),
                 "sampling_params": {"temperature": temperature, "max_tokens": max_tokens}} for r in rows]
    results, wall = run_requests("on-policy: student samples", requests, student, engine, seed=seed,
                                 tokenizer=tokenizer, adapter=adapter)
    out = {k: {"prompt_ids": v["prompt_token_ids"], "tokens": v["generated_tokens"]} for k, v in results.items()
           if not v["error"] and v["generated_tokens"]}
    log.info("student sampled %d answers of %d queries in %.0fs", len(out), len(rows), wall)
    return out


def score_with_teacher(rows: list[dict], samples: dict[str, dict], task: TaskSpec, teacher: str,
                       engine: EngineConfig, top_k: int, seed: int,
                       grammar: AnswerGrammar | None = None) -> dict[str, dict]:
    """{id: {topk_ids, topk_logprobs, token_logprobs}}: the prompted teacher's view of each student token. Under
    `grammar` the view is the constrained teacher's, over the tokens the grammar accepts and the one position
    after them where the student left it (token_logprobs: the accepted tokens'; topk: one row more).

    The teacher sees the student's tokens as its answer, after a finished, empty reasoning
    (distill.chat.prompt_after_reasoning): a thinking teacher's template would otherwise have them read as the
    start of its reasoning."""
    from transformers import AutoTokenizer

    from distill.chat import prompt_after_reasoning

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    requests, accepted = [], {}
    for r in rows:
        if r["id"] not in samples:
            continue
        tokens = samples[r["id"]]["tokens"]
        if grammar is None:
            params = scoring_sampling(tokens, top_k)
        else:
            n = accepted[r["id"]] = grammar.accepted(tokens)
            params = scoring_sampling(tokens[:n], top_k, grammar.choices, next_step=n < len(tokens))
        prompt = prompt_after_reasoning(tokenizer, task.teacher_messages(r["text"]), task.teacher_template_kwargs())
        requests.append({"key": r["id"], "prompt": prompt, "sampling_params": params})
    results, wall = run_requests("on-policy: teacher scores", requests, teacher, engine, seed=seed,
                                 tokenizer=tokenizer, **ENGINE_ARGS)
    failed = [k for k, v in results.items() if v["error"]]
    if failed:
        raise RuntimeError(f"the teacher could not score {len(failed)} student answers, e.g. {failed[:3]}: "
                           f"{results[failed[0]]['error'][:300]}")
    for key, n in accepted.items():  # the unforced step's token is the teacher's own, not the student's
        results[key]["token_logprobs"] = results[key]["token_logprobs"][:n]
    log.info("teacher scored %d student answers in %.0fs", len(results), wall)
    return results


class AnswerGrammar:
    """The task's answer grammar (one of `choices`, then end of turn), as the teacher generated under it. Scoring
    the student under it (`score_with_teacher`) gives the constrained teacher's distribution, the one it samples
    from; the unconstrained one instead asks the student for what the teacher itself never writes (a small
    prompted teacher puts most of its mass outside the format)."""

    def __init__(self, tokenizer, choices: list[str]):
        self.tokenizer, self.choices = tokenizer, choices
        self.ends = set(tokenizer.all_special_ids)  # end of turn; any special token inside an answer is off-format

    def _text(self, ids: list[int]) -> str:
        # A token may end inside a multi-byte character: judge the text before it, whose bytes are complete.
        return self.tokenizer.decode(ids, skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False).rstrip("\ufffd")

    def accepted(self, tokens: list[int]) -> int:
        """How many leading tokens the grammar accepts: each keeps the text a prefix of an answer, and an end of
        turn only after a complete one."""
        before = ""
        for t, token in enumerate(tokens):
            if token in self.ends:
                if before not in self.choices:
                    return t
                return t + 1  # the answer ends here; nothing after an end of turn is scored
            text = self._text(tokens[:t + 1])
            if len(text) <= len(before) or not any(c.startswith(text) for c in self.choices):
                return t
            before = text
        return len(tokens)


def examples(samples: dict[str, dict], scores: dict[str, dict], max_length: int) -> tuple[list[Example], dict]:
    """Training examples of the round and their counts: the student's prompt and its own answer, each answer
    position the teacher scored with its top-k there (the reverse-KL target) and the sampled token as its target
    (which counts the position; under objective "reverse" with soft weight 1 the cross-entropy has no weight).
    The teacher scores every position, or under the answer grammar the positions up to and including the one
    where the student left it: the rest have no target."""
    out, counts = [], {"positions": 0, "positions_trained": 0, "samples_too_long": 0}
    for key in sorted(samples):
        prompt, tokens = samples[key]["prompt_ids"], samples[key]["tokens"]
        score = scores[key]
        ids = np.asarray(prompt + tokens, dtype=np.int64)
        counts["positions"] += len(tokens)
        if len(ids) > max_length:
            counts["samples_too_long"] += 1
            continue
        n = min(len(score["topk_ids"]), len(tokens))
        k = min(len(row) for row in score["topk_ids"][:n])
        if k == 0:
            raise RuntimeError(f"{key}: the teacher returned no top-k logprobs (top_k must be > 0)")
        start = len(prompt)
        positions = np.arange(start - 1, start - 1 + n, dtype=np.int64)
        targets = np.full(len(ids), IGNORE, dtype=np.int64)
        targets[positions] = ids[positions + 1]
        counts["positions_trained"] += n
        out.append(Example(key, ids, targets, positions,
                           np.asarray([row[:k] for row in score["topk_ids"][:n]], dtype=np.int64),
                           np.asarray([row[:k] for row in score["topk_logprobs"][:n]], dtype=np.float32)))
    return out, counts


def round_summary(samples: dict, scores: dict[str, Any], task: TaskSpec, tokenizer,
                  counts: dict[str, int]) -> dict[str, Any]:
    """How far the student's samples were from the teacher: mean teacher log-probability per scored student
    token (under the answer grammar when the teacher scored under it), how many samples the task can read as an answer (a student drifting out of the answer format
    shows here first), how many sampled tokens the teacher gives no mass, and `examples`' counts of what was
    trained on."""
    lps = np.asarray([lp for v in scores.values() for lp in (v["token_logprobs"] or [])], dtype=np.float64)
    finite = lps[np.isfinite(lps)]
    texts = [tokenizer.decode(v["tokens"], skip_special_tokens=True) for v in samples.values()]
    parsed = sum(task.parse(t).answer is not None for t in texts)
    # A constrained teacher gives no mass at all to a spelling its grammar masks (only "Final", never "F", as
    # SmolLM2's first answer token): counted apart, so the mean stays a number.
    return {"samples": len(samples), "tokens": len(lps), "answers_parsed": parsed,
            "teacher_logprob_per_token": float(finite.mean()) if len(finite) else None,
            "tokens_without_teacher_mass": int(len(lps) - len(finite)), **counts}


def answer_grammar(config: TrainConfig, task: TaskSpec, tokenizer) -> AnswerGrammar | None:
    """on_policy.answer_grammar resolved: the task's grammar when asked for, or by default when the teacher
    generated under it; an error where the task has none."""
    wanted = config.on_policy.answer_grammar
    if wanted is None:
        wanted = task.teacher.constrained
    if not wanted:
        return None
    choices = task.canonical_answers()
    if not choices:
        raise ConfigError(f"on_policy.answer_grammar: task {task.name!r} has no label set to constrain answers to")
    return AnswerGrammar(tokenizer, choices)


def train_rounds(config: TrainConfig, tokenizer, task, prepared: PreparedData, select_by: str,
                 placement: Placement):
    """Rounds of on-policy distillation (the functions above), each in OUT/rounds/NN: the current student samples
    the training queries without the prompt, the prompted teacher scores those tokens, Ray Train minimises the
    reverse KL on them starting from the current adapter. A finished round is skipped on a rerun; a round's samples
    and scores are kept, so its training resumes on exactly the same data. OUT/adapter is the last round's."""
    from distill.student_serving import fold, student_artifact

    op = config.on_policy
    teacher = op.teacher or (prepared.teacher if isinstance(prepared.teacher, str) else None)
    if not teacher:
        raise ConfigError(f"on-policy: the data names no single teacher ({prepared.teacher}); set on_policy.teacher")
    same, why = same_tokenizer(tokenizer, teacher)
    if not same:
        raise ConfigError(f"on-policy distillation scores the student's own tokens with the teacher: {why}")
    split = read_columns(join(config.output, "split.parquet"), ["id", "split"]).to_pylist()
    train_ids = {r["id"] for r in split if r["split"] == "train"}
    rows = [r for r in read_data(config) if r["id"] in train_ids]
    texts = sorted(({"id": r["id"], "text": r["messages"][0]["content"], "answer": r["answer"]} for r in rows),
                   key=lambda r: r["id"])
    grammar = answer_grammar(config, task, tokenizer)
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
                # The policy samples as it would be served (LoRA on GPUs, merged on CPUs): the same decision.
                policy_served = student_artifact(config.student, {task.name: policy} if policy else {}, "auto",
                                                 resolve_device(op.engine.device), task.name,
                                                 join(rdir, "policy-merged"))
                samples = sample_answers(queries, task, policy_served.engine_model, op.engine, op.temperature,
                                         max_tokens, config.seed + r, tokenizer, policy_served.engine_adapter)
                scores = score_with_teacher(queries, samples, task, teacher, op.engine, op.top_k, config.seed + r,
                                            grammar)
                round_examples, counts = examples(samples, scores, config.max_length)
                summary = round_summary(samples, scores, task, tokenizer, counts)
                log.info("round %d: %d of %d student samples parse as answers; teacher log-prob per token %.2f; "
                         "%d of %d answer positions trained on%s", r, summary["answers_parsed"], summary["samples"],
                         summary["teacher_logprob_per_token"] or 0, counts["positions_trained"], counts["positions"],
                         " (the rest after the student left the answer grammar)" if grammar else "")
                if not round_examples:
                    raise RuntimeError(f"on-policy round {r}: nothing to train on: the student answered "
                                       f"{len(samples)} of {len(queries)} queries, {counts['samples_too_long']} "
                                       f"longer than max_length ({config.max_length})")
                fs.create_dir(f"{rpath}/_tokens", recursive=True)
                write_examples(fs, cached, round_examples)
                write_json(join(rdir, "samples.json"), summary)
            # Named apart from `examples` (the function above, which builds them).
            round_examples = read_examples(fs, cached)
            plan = StepPlan.build([e.length for e in round_examples], config.per_device_batch_size,
                                  config.gradient_accumulation, config.workers, 1, config.seed + r, op.steps_per_round)
            round_prepared = replace(prepared, steps=len(plan), soft_weight=1.0, objective="reverse",
                                     shards=write_rank_shards(fs, f"{rpath}/_tokens", round_examples, plan.steps,
                                                              config.workers),
                                     **step_totals(round_examples, plan.steps), steps_per_epoch=len(plan))
            round_config = config.model_copy(update={"output": rdir, "init_adapter": policy, "merge": False})
            exported = export(round_config, fit(round_config, round_prepared, task, select_by, placement), placement)
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
        fold(config.student, join(config.output, "adapter"), join(config.output, "merged"),
             "gpu" if placement.use_gpu else "cpu")
    last = rounds[-1]
    return {"best_val_loss": last.get("best_val_loss"), "best_val_agreement": last.get("best_val_agreement"),
            "best_step": last["best_step"] + offset - last["planned_steps"], "adapter_step": offset}, rounds
