"""On-policy prompt distillation, one round's data: the student answers without the prompt (its own samples, on a
`ray.data.llm` vLLM engine), the teacher scores exactly those tokens with the prompt (teacher-forced decoding,
the long prompt prefix-cached: distill.scoring) and returns its top-k at every position; training then minimises
the reverse KL to the teacher on them (distill.training.token_losses, objective "reverse").

Why: off-policy SFT trains on the teacher's answers; at inference the student continues its own, and its
mistakes compound where the teacher's data never went. On the student's own samples the teacher says, token by
token, where the student went wrong (Thinking Machines 2025: the same quality as RL at 9-30x less compute;
Microsoft's OPCD 2026: better than off-policy SFT for context distillation).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from distill.engine import EngineConfig, run_requests
from distill.scoring import ENGINE_ARGS, scoring_sampling
from distill.tasks import TaskSpec
from distill.training import IGNORE, Example

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


def round_summary(samples: dict, scores: dict[str, Any]) -> dict[str, Any]:
    """How far the student's samples were from the teacher: mean teacher log-probability per sampled token."""
    lps = [lp for v in scores.values() for lp in (v["token_logprobs"] or [])]
    return {"samples": len(samples), "tokens": len(lps),
            "teacher_logprob_per_token": float(np.mean(lps)) if lps else None}
