"""Chats and their tokens, the same for every stage: how a conversation splits into the prompt a model sees and
the answer it must produce (training's targets, evaluation's scored tokens), and where the answer starts in what a
thinking model generated (generation's stored answer, serving's confidence).
"""

from __future__ import annotations

from typing import Optional

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class Skip(Exception):
    """This conversation cannot be trained on or scored; the message is the reason it is counted under."""


class ChatTemplateError(ValueError):
    """The model's chat template cannot separate a conversation's prompt from its answer."""


def render(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(prompt token ids, answer token ids) for a conversation whose last message is the assistant's.

    The prompt is what the student sees at inference: the template up to and including the generation prompt.
    The answer is the rest of the rendered conversation (answer text and the template's end-of-turn tokens, so the
    student learns to stop). Both are tokenized separately, exactly as at inference where the engine tokenizes the
    prompt and then generates.
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise Skip("no assistant turn")
    if not (messages[-1]["content"] or "").strip():
        raise Skip("empty assistant turn")
    context = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    full = [*context, {"role": "assistant", "content": messages[-1]["content"]}]
    prompt_text = tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(full, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ChatTemplateError(
            "the student's chat template renders a conversation that does not start with its own generation "
            "prompt; assistant-only masking needs a template where it does (ChatML, Llama, Qwen without thinking)")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    return prompt_ids, answer_ids


def answer_start(texts: list[str]) -> int:
    """Index of the first answer token, given each generated token's text: after the token that completes the
    last `</think>` (however the tokenizer splits the tag) and the whitespace-only tokens after it (a thinking
    teacher writes "</think>\n\nFinal Answer: ..."; the answer the student learns is stripped)."""
    joined = "".join(texts)
    end = joined.rfind(THINK_CLOSE)
    start = 0
    if end >= 0:
        end += len(THINK_CLOSE)
        offset = 0
        for i, t in enumerate(texts):
            offset += len(t)
            if offset >= end:
                start = i + 1
                break
    while start < len(texts) and not texts[start].strip():
        start += 1
    return start


def answer_start_of_ids(tokenizer, ids: list[int]) -> int:
    """answer_start for generated token ids without their texts (a pass that asked no logprobs): the tail is
    decoded from the end until it holds the last `</think>` (answers are short, reasoning long), then its tokens
    one by one. 0 when the output has no `</think>`."""
    for k in range(1, len(ids) + 1):
        if THINK_CLOSE in tokenizer.decode(ids[-k:], skip_special_tokens=False):
            first = len(ids) - k
            return first + answer_start([tokenizer.decode([t], skip_special_tokens=False) for t in ids[first:]])
    return 0


def opens_reasoning(tokenizer, messages: list[dict], chat_template_kwargs: Optional[dict] = None) -> bool:
    """Does the model's generation prompt for `messages` open the think block itself (Qwen3-*-Thinking-2507)? Its
    output then starts inside the reasoning: `...</think>answer`, or no tag at all when the budget ran out."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                           **(chat_template_kwargs or {}))
    return prompt_opens_reasoning(prompt)


def prompt_opens_reasoning(prompt_text: str) -> bool:
    return prompt_text.rstrip().endswith(THINK_OPEN)


# What follows an opening tag to make an empty, finished reasoning, as Qwen3's hybrid templates write one with
# enable_thinking False: "<think>\n\n</think>\n\n".
EMPTY_REASONING_CLOSE = "\n\n" + THINK_CLOSE + "\n\n"


def prompt_after_reasoning(tokenizer, messages: list[dict], chat_template_kwargs: Optional[dict] = None) -> str:
    """The generation prompt for `messages` with the reasoning over (empty): what the model writes next is its
    answer. A hybrid template renders that itself with enable_thinking False; a template that opens the think
    block regardless (Thinking-2507) gets it closed the way Qwen3's hybrid templates close an empty one. On-policy
    scoring uses it: the teacher judges the student's answer as an answer, not as the start of its reasoning."""
    kwargs = {**(chat_template_kwargs or {}), "enable_thinking": False}
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
    if prompt_opens_reasoning(prompt):
        prompt = prompt.rstrip("\n") + EMPTY_REASONING_CLOSE
    return prompt


def teacher_output(generated: str, opened: bool) -> str:
    """What a teacher wrote as the task reads it (distill.tasks.split_reasoning): the engine's text, behind the
    think tag its template opened. The one place generation, evaluation and serving (and so capture) turn an
    engine's text into the teacher's output: without the tag, a reasoning cut by the token budget would read as a
    finished answer, and an answer it was still weighing would become a label."""
    return THINK_OPEN + generated if opened else generated
