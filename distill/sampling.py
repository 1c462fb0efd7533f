"""Sampling parameters for a task, in one place: what the teacher, the students and the serving arms send to vLLM.

Every function returns a plain dict of `vllm.SamplingParams` fields (what a `ray.data.llm` row's
`sampling_params` holds); `guided_choice` is the one definition of constrained decoding to a set of answers.
"""

from __future__ import annotations

from typing import Any, Optional

from distill.tasks import TaskSpec


def canonical_token_ids(choices: list[str], tokenizer) -> list[int]:
    """The tokens `tokenizer` spells `choices` with (each on its own, as training tokenizes an answer), plus its
    special tokens (the end of turn the grammar asks for once an answer is complete)."""
    ids = {t for choice in choices for t in tokenizer(choice, add_special_tokens=False)["input_ids"]}
    return sorted(ids | set(tokenizer.all_special_ids))


def guided_choice(choices: list[str], max_tokens: int, tokenizer=None) -> dict[str, Any]:
    """Constrain decoding to one of `choices`, with a token budget that fits any of them however the model spells
    it (TaskSpec.choice_budget: counted in bytes; the grammar ends decoding once an answer is complete).

    With the model's `tokenizer`, only the tokens it spells the choices with are allowed. A grammar alone accepts
    any spelling: SmolLM2 wrote "Final Answer:" then a bare space token then "haven" (a word it never writes
    after a space) for 58 of 96 support-routing messages, because the space token is likely on its own and no
    choice is excluded until the next token. In the tokenizer's own spelling the choice is made on whole words:
    37.5 % -> 100 % right on the same messages, and the answer's tokens are the ones training scores (soft labels
    line up with the student's targets)."""
    params: dict[str, Any] = {"structured_outputs": {"choice": list(choices)},
                              "max_tokens": max(max_tokens, TaskSpec.choice_budget(choices))}
    if tokenizer is not None:
        params["allowed_token_ids"] = canonical_token_ids(choices, tokenizer)
    return params


def teacher_sampling(task: TaskSpec, tokenizer, temperature: Optional[float] = None,
                     logprobs: int = 0) -> dict[str, Any]:
    """The teacher's request: the task's sampling defaults (temperature overridable), guided to the canonical
    answers when the task constrains its teacher, and its top-k logprobs per answer token when asked for (soft
    labels), spelled in the teacher `tokenizer`'s own tokens (guided_choice). max_tokens is the engine's: the reasoning budget plus the answer's (TaskSpec.teacher_budget; a run's
    overrides go through TaskSpec.with_teacher_budgets)."""
    params: dict[str, Any] = {
        "temperature": task.teacher.temperature if temperature is None else temperature,
        "top_p": task.teacher.top_p,
        "max_tokens": task.teacher_budget(),
    }
    choices = task.canonical_answers() if task.teacher.constrained else None
    if choices:
        params.update(guided_choice(choices, params["max_tokens"], tokenizer))
    if logprobs:
        params["logprobs"] = logprobs
    return params


def student_sampling(task: TaskSpec, max_tokens: int, tokenizer, constrained: bool = False,
                     logprobs: int = 0) -> dict[str, Any]:
    """A student's request: greedy, no prompt; guided to the label set (in the student `tokenizer`'s spelling)
    only when asked (a student that needs the guidance has not fully learned the task); each answer token's
    logprob when asked (its confidence)."""
    params: dict[str, Any] = {"temperature": 0.0, "max_tokens": max_tokens}
    choices = task.canonical_answers()
    if constrained and choices:
        params.update(guided_choice(choices, max_tokens, tokenizer))
    if logprobs:
        params["logprobs"] = logprobs
    return params


# Every field a request may set, with vLLM's own defaults: rows of one Ray Data pass carry the same keys, so that
# generation and scoring requests sit in one Arrow table (a missing field would become null, which vLLM rejects).
# extra_args is never null: its one key (distill.scoring's forced tokens) is "" where nothing is forced, so blocks
# of unforced rows have the type blocks of forced ones have.
DEFAULTS: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 16, "min_tokens": 0, "ignore_eos": False,
                            "logprobs": None, "skip_special_tokens": True,
                            "extra_args": {"distill_forced_tokens": ""}, "structured_outputs": None,
                            "allowed_token_ids": None}


def complete(params: dict[str, Any]) -> dict[str, Any]:
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"sampling fields {sorted(unknown)} are not among distill.sampling.DEFAULTS")
    return {**DEFAULTS, **params}
