"""One arm of the rollout: a Ray Serve deployment around a vLLM `AsyncLLM` engine.

The teacher arm adds the task's long prompt server-side and keeps its reasoning out of the visible answer; the
student arm serves one base model with several LoRA adapters (one per task) and answers the bare user message.
Requests arrive as `ArmRequest`s from the gateway (`serve/gateway.py`), already validated for shape; this class
checks what only the engine can know (token counts against the context) and answers bad input with an
`ArmRefusal`, never an exception, so a bad request cannot look like a failing replica (`serve/arm_messages.py`).

Adapters may be local folders or object-store URIs (s3://, gs://): vLLM reads only local files, so the replica
that loads an adapter downloads it first (distill.storage.local_dir) and removes the download when it shuts down.

Every answer of the served task carries its confidence, `distill.evaluate.scores.confidence` over the logprobs of the
answer's own tokens (the number the evaluation report's selective section uses): each request asks the engine for
logprobs=1, the sampled token's logprob, which vLLM computes after the grammar mask of guided decoding, so for a
guided label answer it is normalised over the allowed labels. A thinking teacher's reasoning tokens are left out
(the answer starts after `</think>`, as in generation).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Union

from distill.config import ConfigError
from distill.engine import adapter_rank, model_context_limit, planned_engine, vllm_max_lora_rank
from distill.selective import confidence
from distill.sampling import guided_choice
from distill.storage import local_dir
from distill.chat import THINK_CLOSE, answer_start, prompt_opens_reasoning, teacher_output
from distill.tasks import TaskSpec, load_task, split_reasoning
from serve.arm_messages import (ArmAnswer, ArmRefusal, ArmRequest, StreamAccepted, StreamDelta, StreamEnd,
                                StreamItem)
from serve.config import StudentArmConfig, TeacherArmConfig
from serve.protocol import ThinkSplitter

log = logging.getLogger("distill.serve.arm")

TEACHER_ROLE, STUDENT_ROLE = "teacher", "student"


def teacher_conversation(task: TaskSpec, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The teacher's view of a client conversation: the task prompt wraps the last user message; earlier turns
    stay in order; a client's own system text is appended to the task's system prompt (one system message,
    which every chat template accepts)."""
    convo = task.teacher_messages(messages[-1]["content"])
    client_system = "\n\n".join(m["content"] for m in messages[:-1] if m["role"] == "system" and m["content"])
    history = [m for m in messages[:-1] if m["role"] != "system"]
    if client_system:
        if convo[0]["role"] == "system":
            convo[0] = {"role": "system", "content": convo[0]["content"].rstrip() + "\n\n" + client_system}
        else:
            convo.insert(0, {"role": "system", "content": client_system})
    return convo[:-1] + history + convo[-1:]


def sampled_logprobs(output) -> tuple[list[float], list[str]]:
    """(logprob, text) of each token a vLLM CompletionOutput (or one streamed delta of it) sampled."""
    lps, texts = [], []
    for position, token in zip(output.logprobs or [], output.token_ids):
        chosen = position[token]  # the sampled token is always among the returned ones
        lps.append(chosen.logprob)
        texts.append(chosen.decoded_token or "")
    return lps, texts


def answer_confidence(task: TaskSpec, lps: list[float], texts: list[str]) -> Optional[float]:
    """The confidence of an answer from its tokens' logprobs, reasoning excluded (see the module docstring)."""
    if THINK_CLOSE in "".join(texts):
        start = answer_start(texts)  # the tokens after </think>, as generation aligns them
        lps = lps[start:]
    return confidence(task, {"token_logprobs": lps, "error": None})


@dataclass(frozen=True)
class EngineRequest:
    """An ArmRequest made ready for the engine: its prompt's token ids, sampling, adapter and what reading the
    output needs."""

    prompt: Any  # vllm.inputs.TokensPrompt
    params: Any  # vllm.SamplingParams
    lora: Any  # vllm LoRARequest or None
    prompt_tokens: int
    scored: bool  # the answer's confidence is this task's to judge
    think_opened: bool  # the template opened the think block: the output starts inside it
    request_id: str
    answer_tokens: Optional[int] = None  # the visible answer's bound when the engine's max_tokens also holds a
    # reasoning budget (a thinking teacher); None: the engine's max_tokens bounds the answer itself


def reasoning_tokens(texts: list[str], think_opened: bool) -> int:
    """How many of the generated tokens (their texts) are reasoning: those before the answer when the output
    closes a think block, all of them when the template opened one that never closed, else none."""
    if THINK_CLOSE in "".join(texts):
        return answer_start(texts)
    return len(texts) if think_opened else 0


class LLMArm:
    """Deployed with `serve.deployment(LLMArm).options(...)` in `serve/app.py`, once per arm."""

    def __init__(self, role: str, arm_config: dict, task_source: str, device: str):
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        from distill.engine import engine_kwargs

        self.role = role
        self.config = (TeacherArmConfig if role == TEACHER_ROLE else StudentArmConfig).model_validate(arm_config)
        self.task = load_task(task_source)
        self.tokenizer = AutoTokenizer.from_pretrained(self.config.model)
        self.allowed_tokens: dict[tuple[str, ...], Optional[list[int]]] = {}
        # A client's max_tokens bounds the visible answer; a thinking teacher reasons first, within the task's
        # reasoning budget. The template opening a think block with no budget set is refused here, before the
        # engine starts (TaskSpec.teacher_opens_reasoning), as is a context that cannot hold the prompt and both
        # budgets.
        self.default_max_tokens = self.config.max_tokens or self.task.teacher.max_tokens
        self.reasoning_budget = 0
        engine_config = self.config.engine
        if role == TEACHER_ROLE:
            opened = self.task.teacher_opens_reasoning(self.tokenizer, f"the teacher arm's {self.config.model}")
            if opened or self.task.teacher.thinks:
                self.reasoning_budget = self.task.teacher.reasoning_tokens
            prompt = self.tokenizer.apply_chat_template(teacher_conversation(self.task, [{"role": "user",
                                                                                            "content": ""}]),
                                                        add_generation_prompt=True, tokenize=False,
                                                        **self.task.teacher_template_kwargs())
            prompt_tokens = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            need = prompt_tokens + self.reasoning_budget + self.default_max_tokens
            what = (f"the teacher arm ({prompt_tokens} prompt tokens + reasoning {self.reasoning_budget} + answer "
                    f"{self.default_max_tokens}, before any query)")
        else:
            need, what = self.default_max_tokens, f"the student arm (answer {self.default_max_tokens})"
        if engine_config.max_model_len is None:  # unset: the model's own context, which must hold the budgets
            limit = model_context_limit(self.config.model)
            if limit is None:
                raise ConfigError(f"{what}: the context of {self.config.model} cannot be read; set "
                                  f"{role}.engine.max_model_len")
            engine_config = engine_config.model_copy(update={"max_model_len": limit})
        engine_config = planned_engine(engine_config, self.config.model, need, what)
        self.max_model_len = engine_config.max_model_len

        extra = {"model": self.config.model, "disable_log_stats": True}
        # vLLM loads an adapter when a request first asks for it, so the downloads live as long as the replica.
        self.downloads = contextlib.ExitStack()
        try:
            adapters = {name: self.downloads.enter_context(local_dir(path))
                        for name, path in (getattr(self.config, "adapters", {}) or {}).items()}
            if adapters:
                extra.update(enable_lora=True, max_loras=len(adapters),
                             max_lora_rank=vllm_max_lora_rank([adapter_rank(p) for p in adapters.values()]))
            if device == "gpu" and self.config.engine.tensor_parallel_size > 1:
                extra["distributed_executor_backend"] = "ray"
            self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(engine_config, device, **extra)))
        except BaseException:
            self.downloads.close()
            raise
        self.loras = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())}
        self.lora_enabled = bool(adapters)
        self.cancelled_streams = 0  # streams whose reader went away (a client disconnect): vLLM aborted them

        guided = self.config.guided if self.config.guided is not None else self.task.teacher.constrained
        self.choices: Optional[list[str]] = None
        if guided and self.task.answer.type == "labels":
            self.choices = self.config.guided_choices or self.task.canonical_answers()
        # A guided answer cut off mid-label is useless: max_tokens never goes below the choice budget
        # (distill.sampling.guided_choice, TaskSpec.choice_budget), as in generation and evaluation.
        self.default_temperature = (self.config.temperature if self.config.temperature is not None
                                    else self.task.teacher.temperature)
        log.info("%s arm ready: %s, adapters %s, guided %s", role, self.config.model, sorted(self.loras),
                 bool(self.choices))

    # -- Serve hooks ------------------------------------------------------------------------------------------
    async def check_health(self) -> None:
        """Serve calls this periodically; a dead engine fails it and Serve replaces the replica."""
        await self.engine.check_health()

    def __del__(self):
        # Serve calls this when it shuts the replica down: remove the adapters downloaded for it.
        downloads = getattr(self, "downloads", None)
        if downloads is not None:
            downloads.close()

    async def info(self) -> dict:
        return {"role": self.role, "model": self.config.model, "adapters": sorted(self.loras),
                "lora_enabled": self.lora_enabled, "max_model_len": self.max_model_len,
                "guided_choices": self.choices,
                # Requests the engine still holds (running or queued): 0 once every answer is done or aborted.
                "unfinished_requests": self.engine.get_num_unfinished_requests(),
                "cancelled_streams": self.cancelled_streams}

    def guided_params(self, choices: list[str], max_tokens: int) -> dict:
        """distill.sampling.guided_choice for this arm's tokenizer; the allowed tokens of a choice set are computed
        once, not per request."""
        key = tuple(choices)
        if key not in self.allowed_tokens:
            self.allowed_tokens[key] = guided_choice(choices, 1, self.tokenizer).get("allowed_token_ids")
        return {**guided_choice(choices, max_tokens), "allowed_token_ids": self.allowed_tokens[key]}

    def guided_choices_for(self, adapter: Optional[str]) -> Optional[list[str]]:
        """The choices are the task's labels: they bind the teacher and the task's own student (its adapter, or
        the base or merged model without one). Another task's adapter on the same engine answers its own task's
        way, unguided."""
        if self.role == STUDENT_ROLE and adapter not in (None, self.task.name):
            return None
        return self.choices

    # -- requests ---------------------------------------------------------------------------------------------
    def _answer_cut(self, token_ids: list[int], texts: list[str], prep: EngineRequest) -> Optional[str]:
        """The visible answer cut to the client's max_tokens when it ran past them, else None. Only a thinking
        teacher's can: its engine's max_tokens also holds the reasoning budget, which a short reasoning leaves
        to the answer."""
        if prep.answer_tokens is None or THINK_CLOSE not in "".join(texts):
            return None
        start = answer_start(texts)
        if len(token_ids) - start <= prep.answer_tokens:
            return None
        return self.tokenizer.decode(token_ids[start:start + prep.answer_tokens], skip_special_tokens=True).strip()

    def _prepare(self, req: ArmRequest, stream: bool) -> Union[EngineRequest, ArmRefusal]:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

        messages = req.messages
        lora = None
        if self.role == TEACHER_ROLE:
            messages = teacher_conversation(self.task, messages)
            template_kwargs = self.task.teacher_template_kwargs()
        else:
            if req.adapter is not None:
                if req.adapter not in self.loras:
                    return ArmRefusal(404, f"adapter {req.adapter!r} is not served")
                lora = self.loras[req.adapter]
            template_kwargs = {"enable_thinking": False}
        prompt_text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                         **template_kwargs)
        prompt_ids = self.tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        choices = self.guided_choices_for(lora.lora_name if lora else None)
        answer_tokens = req.max_tokens or self.default_max_tokens
        guided = {}
        if choices:  # the one definition of constrained decoding and its token budget (distill.sampling)
            guided = self.guided_params(choices, answer_tokens)
            answer_tokens = guided["max_tokens"]
        max_tokens = self.reasoning_budget + answer_tokens
        if len(prompt_ids) + max_tokens > self.max_model_len:
            added = " (the task prompt included)" if self.role == TEACHER_ROLE else ""
            reasoning = f" + the reasoning budget {self.reasoning_budget}" if self.reasoning_budget else ""
            return ArmRefusal(400, f"input too long: {len(prompt_ids)} prompt tokens{added}{reasoning} + "
                                   f"max_tokens {answer_tokens} exceed the {self.role}'s context of "
                                   f"{self.max_model_len} tokens")
        params = SamplingParams(
            temperature=self.default_temperature if req.temperature is None else req.temperature,
            top_p=req.top_p or (self.task.teacher.top_p if self.role == TEACHER_ROLE else 1.0),
            max_tokens=max_tokens,
            stop=req.stop,
            structured_outputs=StructuredOutputsParams(choice=choices) if choices else None,
            allowed_token_ids=guided.get("allowed_token_ids"),  # the answers in the tokenizer's own spelling
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
            logprobs=1,  # the sampled token's logprob, for the answer's confidence
        )
        # Another task's adapter answers its own task, whose confidence this task's definition cannot judge.
        scored = self.role == TEACHER_ROLE or lora is None or lora.lora_name == self.task.name
        return EngineRequest(
            prompt=TokensPrompt(prompt_token_ids=prompt_ids), params=params, lora=lora,
            prompt_tokens=len(prompt_ids), scored=scored,
            # Qwen3-Thinking style templates open the think block themselves: the output starts inside it.
            think_opened=prompt_opens_reasoning(prompt_text),
            request_id=f"{self.role}-{req.request_id or uuid.uuid4().hex}",
            answer_tokens=answer_tokens if self.reasoning_budget else None)

    async def generate(self, req: ArmRequest) -> Union[ArmAnswer, ArmRefusal]:
        """A whole answer (its visible text, reasoning, raw output, token counts, finish reason, confidence and
        the seconds spent in this replica), or a refusal."""
        started = time.perf_counter()
        prep = self._prepare(req, stream=False)
        if isinstance(prep, ArmRefusal):
            return prep
        final = None
        async for out in self.engine.generate(prep.prompt, prep.params, prep.request_id, lora_request=prep.lora):
            final = out
        output = final.outputs[0]
        lps, texts = sampled_logprobs(output)
        finish_reason = output.finish_reason or "stop"
        if self.role == TEACHER_ROLE:
            raw = teacher_output(output.text, prep.think_opened)  # what capture and shadows parse too
            reasoning, visible, _ = split_reasoning(raw)
            cut = self._answer_cut(list(output.token_ids), texts, prep)
            if cut is not None:
                visible, finish_reason = cut, "length"
        else:
            raw, reasoning, visible = output.text, None, output.text
        return ArmAnswer(
            text=visible, raw=raw, prompt_tokens=prep.prompt_tokens, completion_tokens=len(output.token_ids),
            finish_reason=finish_reason,
            confidence=answer_confidence(self.task, lps, texts) if prep.scored else None,
            reasoning=reasoning, reasoning_tokens=reasoning_tokens(texts, prep.think_opened),
            cached_tokens=final.num_cached_tokens or 0, engine_s=time.perf_counter() - started)

    async def stream(self, req: ArmRequest) -> AsyncIterator[StreamItem]:
        """The answer as it is generated: an ArmRefusal alone, or StreamAccepted (so the gateway can still
        answer 4xx before it commits to a 200 event stream), StreamDeltas, and a StreamEnd."""
        started = time.perf_counter()
        prep = self._prepare(req, stream=True)
        if isinstance(prep, ArmRefusal):
            yield prep
            return
        yield StreamAccepted(prompt_tokens=prep.prompt_tokens)
        splitter = ThinkSplitter(opened=prep.think_opened) if self.role == TEACHER_ROLE else None
        finish_reason, cached_tokens = None, 0
        raw, lps, texts, token_ids, shown = [], [], [], [], []
        generation = self.engine.generate(prep.prompt, prep.params, prep.request_id, lora_request=prep.lora)
        try:
            async for out in generation:
                output = out.outputs[0]
                token_ids += output.token_ids
                cached_tokens = out.num_cached_tokens or cached_tokens
                raw.append(output.text)
                piece_lps, piece_texts = sampled_logprobs(output)
                lps += piece_lps
                texts += piece_texts
                reasoning, content = splitter.feed(output.text) if splitter else ("", output.text)
                # Looked for once the reasoning is over (the splitter says), not over a long reasoning each delta.
                cut = self._answer_cut(token_ids, texts, prep) if splitter and not splitter.in_think else None
                if cut is not None:  # the answer reached the client's max_tokens: the rest is not shown
                    so_far = "".join(shown)
                    content = cut[len(so_far):] if cut.startswith(so_far) else ""
                    finish_reason, splitter = "length", None
                if reasoning or content:
                    shown.append(content)
                    yield StreamDelta(reasoning=reasoning, content=content)
                if cut is not None:
                    break
                if out.finished:
                    finish_reason = output.finish_reason
        except (asyncio.CancelledError, GeneratorExit):
            # Serve cancels the call when the gateway stops reading; vLLM's generate aborts the request on the
            # way out, freeing its batch slot and KV cache.
            self.cancelled_streams += 1
            raise
        finally:
            await generation.aclose()  # after a cut answer: vLLM aborts the request it still generates
        if splitter:
            reasoning, content = splitter.flush()
            if reasoning or content:
                yield StreamDelta(reasoning=reasoning, content=content)
        yield StreamEnd(
            raw=teacher_output("".join(raw), prep.think_opened) if self.role == TEACHER_ROLE else "".join(raw),
            prompt_tokens=prep.prompt_tokens, completion_tokens=len(token_ids),
            finish_reason=finish_reason or "stop",
            confidence=answer_confidence(self.task, lps, texts) if prep.scored else None,
            reasoning_tokens=reasoning_tokens(texts, prep.think_opened), cached_tokens=cached_tokens,
            engine_s=time.perf_counter() - started)
