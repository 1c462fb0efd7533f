"""Answers as server-sent events (the OpenAI stream format): an arm's answer relayed as it is generated, or an
answer already whole (the cascade's kept student answer), each ending with the finish reason and the confidence,
the usage when asked, and [DONE]. A failure after the 200 status is reported in-band, as OpenAI does."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Awaitable, Callable, Optional, Union

from fastapi.responses import StreamingResponse

from serve.arm_messages import ArmAnswer, ArmRefusal, ArmRequest, StreamEnd
from serve.protocol import ApiError, ChatRequest, chunk, completion_id, error_body, usage

log = logging.getLogger("distill.serve")


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def stream_end(cid: str, model: str, created: int, chat: ChatRequest, final: Union[ArmAnswer, StreamEnd]):
    """The last events of a stream: the finish reason with the confidence, the usage if asked, [DONE]."""
    yield sse(chunk(cid, model, created, {}, final.finish_reason) | {"confidence": final.confidence})
    if chat.stream_options and chat.stream_options.include_usage:
        yield sse(chunk(cid, model, created, {}, usage_block=usage(final)))
    yield "data: [DONE]\n\n"


def whole_answer_stream(chat: ChatRequest, result: ArmAnswer, headers: dict[str, str]) -> StreamingResponse:
    """An answer already complete, as an event stream (the cascade's kept student answer)."""
    cid, created = completion_id(), int(time.time())

    async def events():
        yield sse(chunk(cid, chat.model, created, {"role": "assistant", "content": ""}))
        if result.text:
            yield sse(chunk(cid, chat.model, created, {"content": result.text}))
        for event in stream_end(cid, chat.model, created, chat, result):
            yield event

    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


async def relay_stream(handle, arm: str, chat: ChatRequest, req: ArmRequest, timeout_s: float,
                       headers: dict[str, str], failed: Callable[[int], Awaitable[None]],
                       done: Callable[[ArmAnswer], Awaitable[None]]) -> StreamingResponse:
    """The arm's answer as it is generated (`handle`: its deployment). Errors before the first token are an
    ApiError (a proper status); `failed(status)` and `done(result)` record the outcome."""
    generator = handle.options(stream=True).stream.remote(req)
    try:
        first = await asyncio.wait_for(generator.__anext__(), timeout_s)
    except asyncio.TimeoutError:
        generator.cancel()
        await failed(504)
        raise ApiError(504, f"the {arm} did not answer within {timeout_s}s") from None
    except asyncio.CancelledError:
        generator.cancel()
        raise
    except Exception as err:
        log.exception("%s stream failed to start", arm)
        await failed(503)
        raise ApiError(503, f"the {arm} engine failed: {type(err).__name__}: {err}") from None
    if isinstance(first, ArmRefusal):
        await failed(first.status)
        raise ApiError(first.status, first.message)
    cid, created, model = completion_id(), int(time.time()), chat.model

    async def events():
        text: list[str] = []
        reasoning: list[str] = []
        final: Optional[StreamEnd] = None
        try:
            yield sse(chunk(cid, model, created, {"role": "assistant", "content": ""}))
            async for item in generator:
                if isinstance(item, StreamEnd):
                    final = item
                    break
                delta = {}
                if item.reasoning:
                    delta["reasoning_content"] = item.reasoning
                    reasoning.append(item.reasoning)
                if item.content:
                    delta["content"] = item.content
                    text.append(item.content)
                yield sse(chunk(cid, model, created, delta))
            if final is None:
                raise RuntimeError("the engine stream ended without a final item")
        except Exception as err:
            # The 200 status is already sent: report the failure in-band, as OpenAI does, and count it.
            log.exception("%s stream failed", arm)
            await failed(503)
            yield sse(error_body(f"the {arm} engine failed mid-stream: {type(err).__name__}: {err}", 503))
            yield "data: [DONE]\n\n"
            return
        finally:
            if final is None:
                # The client disconnected (the generator is closed or cancelled) or the stream failed: stop
                # the engine's request rather than let it generate an answer nobody reads.
                generator.cancel()
        for event in stream_end(cid, model, created, chat, final):
            yield event
        await done(final.answer("".join(text), "".join(reasoning) if reasoning else None))

    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
