"""The OpenAI chat-completions wire format: request validation, response and stream-chunk shapes, error bodies,
and the incremental splitter that keeps a teacher's <think> reasoning out of streamed content."""

from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distill.chat import THINK_CLOSE, THINK_OPEN
from serve.arm_messages import ArmAnswer, StreamEnd


# distill's own headers on every answer (see serve/gateway.py)
ARM_HEADER = "x-distill-arm"
CONFIDENCE_HEADER = "x-distill-confidence"
CASCADE_HEADER = "x-distill-cascade"
STUDENT_CONFIDENCE_HEADER = "x-distill-student-confidence"
GATEWAY_HEADER = "x-distill-gateway-ms"


def answer_headers(arm: str, confidence: Optional[float], cascade: Optional[dict]) -> dict[str, str]:
    headers = {ARM_HEADER: arm}
    if confidence is not None:
        headers[CONFIDENCE_HEADER] = repr(confidence)
    if cascade is not None:
        headers[CASCADE_HEADER] = cascade["decision"]
        if cascade["student_confidence"] is not None:
            headers[STUDENT_CONFIDENCE_HEADER] = repr(cascade["student_confidence"])
    return headers


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The subset of OpenAI's request this server honours. Unknown fields are ignored, as OpenAI clients send
    optional ones freely; fields whose meaning we cannot honour are refused rather than silently dropped."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    stop: Optional[Union[str, list[str]]] = None
    n: int = 1
    user: Optional[str] = None
    seed: Optional[int] = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("seed")
    @classmethod
    def _no_seed(cls, v: Optional[int]) -> Optional[int]:
        # vLLM's CPU sampler crashes on seeded requests whose prefill is chunked (long teacher prompts); refusing
        # the field is better than an engine error half-way through a stream.
        if v is not None:
            raise ValueError("per-request seeds are not supported by this server")
        return v

    @model_validator(mode="after")
    def _conversation(self) -> "ChatRequest":
        if self.messages[-1].role != "user":
            raise ValueError("messages: the last message must be from the user")
        if not self.messages[-1].text().strip():
            raise ValueError("messages: the last user message is empty")
        return self

    def plain_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens

    def stops(self) -> Optional[list[str]]:
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ApiError(Exception):
    """A request answered with an HTTP error and an OpenAI-style error body (`error_body`)."""

    def __init__(self, status: int, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def validation_message(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "body"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def error_body(message: str, status: int, param: Optional[str] = None) -> dict:
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
            413: "invalid_request_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    code = {401: "invalid_api_key", 403: "forbidden", 404: "model_not_found", 413: "request_too_large"}.get(status)
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def chat_completion(cid: str, model: str, result: ArmAnswer) -> dict:
    message = {"role": "assistant", "content": result.text}
    if result.reasoning is not None:
        message["reasoning_content"] = result.reasoning
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": result.finish_reason, "logprobs": None}],
        "usage": usage(result),
    }


def usage(result: Union[ArmAnswer, StreamEnd]) -> dict:
    """OpenAI's usage block: completion tokens count the reasoning too, which its details break out."""
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
            "completion_tokens_details": {"reasoning_tokens": result.reasoning_tokens}}


def chunk(cid: str, model: str, created: int, delta: dict, finish_reason: Optional[str] = None,
          usage_block: Optional[dict] = None) -> dict:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    if usage_block is not None:
        body["choices"] = []
        body["usage"] = usage_block
    return body


class ThinkSplitter:
    """Splits streamed text into reasoning and visible content as it arrives, like `split_reasoning` does for a
    whole answer. `opened` says the chat template already opened the think block (Qwen3-Thinking style), so the
    text starts inside it. Text that could be the start of a tag is held back until the next piece decides it."""

    def __init__(self, opened: bool = False):
        self.in_think = opened
        self.started = opened
        self.buffer = ""
        # Visible content starts at its first non-blank character, as in the non-streamed answer.
        self.skip_blank = True

    def feed(self, piece: str) -> tuple[str, str]:
        """Returns (reasoning, content) that can be emitted now."""
        self.buffer += piece
        reasoning, content = [], []
        while self.buffer:
            if self.in_think:
                idx = self.buffer.find(THINK_CLOSE)
                if idx >= 0:
                    reasoning.append(self.buffer[:idx])
                    self.buffer = self.buffer[idx + len(THINK_CLOSE):]
                    self.in_think = False
                    self.skip_blank = True
                    continue
                keep = _partial_suffix(self.buffer, THINK_CLOSE)
                reasoning.append(self.buffer[:len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep:]
                break
            if not self.started:
                # A think block can only open at the very start of the answer (after whitespace).
                stripped = self.buffer.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self.buffer = stripped[len(THINK_OPEN):]
                    self.in_think = self.started = True
                    continue
                if stripped and THINK_OPEN.startswith(stripped):
                    break  # could still become "<think>"
                if not stripped:
                    break
                self.started = True
            if self.skip_blank:
                self.buffer = self.buffer.lstrip()
                if not self.buffer:
                    break
                self.skip_blank = False
            content.append(self.buffer)
            self.buffer = ""
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        rest, self.buffer = self.buffer, ""
        if self.in_think:
            return rest, ""
        return "", rest.lstrip() if self.skip_blank else rest


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
