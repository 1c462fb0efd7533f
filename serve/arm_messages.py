"""What crosses the Ray hop between the gateway (`serve/gateway.py`) and an arm (`serve/arms.py`): the request the
gateway makes of an arm and what the arm answers, whole or streamed. Frozen dataclasses, pickled by Ray Serve as
they are; each side reads named fields, never keys of a loose dict."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Union


@dataclass(frozen=True)
class ArmRequest:
    """A chat request as an arm serves it: the client's messages and sampling (None: the arm's defaults), the
    adapter for the student arm (None: the base or merged model) and an id the engine's logs carry."""

    messages: list[dict[str, str]]
    request_id: str
    adapter: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stop: Optional[list[str]] = None

    def for_teacher(self) -> "ArmRequest":
        """The same request for the teacher arm (the cascade's deferral), which serves no adapters."""
        return replace(self, adapter=None)


@dataclass(frozen=True)
class ArmRefusal:
    """The arm refused the request (the client's fault, or an adapter it does not serve): the HTTP status and
    message the client gets. Answered, never raised, so a bad request cannot look like a failing replica."""

    status: int
    message: str


@dataclass(frozen=True)
class TokenCounts:
    """What an answer cost in tokens, as prices count them (distill.cost.request_cost)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class ArmAnswer:
    """A whole answer. `text` is what the client sees; `reasoning` a thinking teacher's reasoning (None for the
    student); `raw` the whole output with its reasoning tags, as generation stores it (what capture and shadows
    parse). `completion_tokens` counts every generated token, `reasoning_tokens` those of the reasoning among
    them. `confidence` is over the answer's own tokens (None when this arm's task cannot judge it); `engine_s`
    the seconds spent in the arm's replica."""

    text: str
    raw: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    confidence: Optional[float]
    reasoning: Optional[str] = None
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    engine_s: float = 0.0

    @property
    def tokens(self) -> TokenCounts:
        return TokenCounts(self.prompt_tokens, self.completion_tokens, self.cached_tokens)


@dataclass(frozen=True)
class StreamAccepted:
    """A stream's first item when the arm took the request (else the first item is an ArmRefusal): the gateway
    commits to a 200 event stream only after it."""

    prompt_tokens: int


@dataclass(frozen=True)
class StreamDelta:
    """Text generated since the last item: reasoning and visible content kept apart (either may be empty)."""

    reasoning: str
    content: str


@dataclass(frozen=True)
class StreamEnd:
    """A stream's last item: what an ArmAnswer holds but the visible text, which the deltas carried."""

    raw: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    confidence: Optional[float]
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    engine_s: float = 0.0

    def answer(self, text: str, reasoning: Optional[str]) -> ArmAnswer:
        """The whole answer the stream delivered, for the same bookkeeping as a non-streamed one."""
        return ArmAnswer(text=text, raw=self.raw, prompt_tokens=self.prompt_tokens,
                         completion_tokens=self.completion_tokens, finish_reason=self.finish_reason,
                         confidence=self.confidence, reasoning=reasoning, reasoning_tokens=self.reasoning_tokens,
                         cached_tokens=self.cached_tokens, engine_s=self.engine_s)


StreamItem = Union[ArmRefusal, StreamAccepted, StreamDelta, StreamEnd]
