"""The Serve application: an OpenAI-compatible gateway in front of a teacher arm and a student arm.

    gateway (FastAPI ingress, 1 replica: owns the rollout state)
      ├── teacher  (LLMArm: vLLM AsyncLLM + the task prompt added server-side, autoscaling)
      └── student  (LLMArm: vLLM AsyncLLM: the base + LoRA adapters, or the task's adapter merged in; autoscaling)

Models: `teacher`, `student` (the adapter named like the task), every adapter by its own name, and the routed
model (`routed` by default) that A/B-splits between the arms or cascades (`serve/router.py`,
`serve/selective.py`). Also GET /v1/models, /stats (JSON), /metrics (Prometheus), /healthz, and for
administrators (`serve/auth.py`) POST /admin/share and /admin/cascade. The rollout state is saved outside the
gateway (`serve/state.py`) and resumed by a restarted gateway replica; teacher answers can be captured as training
data (`serve/capture.py`).

Every answer carries its confidence (`x-distill-confidence` and a `confidence` field beside the OpenAI ones; in a
stream, on the chunk with the finish reason), the arm that answered (`x-distill-arm`, `arm`), in cascade mode the
decision (`x-distill-cascade`: kept | deferred, `cascade`), and for a whole answer the gateway's own time
(`x-distill-gateway-ms`: its handler's time minus the arms').

`build_app` is the application builder of `serve run serve.app:build_app` and of a KubeRay RayService
(`import_path` + `args`); `start` is the one `distill serve` uses.

Why plain deployments and not `ray.serve.llm`: its OpenAI app cannot add a task prompt server-side or strip the
teacher's reasoning, its dynamic LoRA loading only reads adapters from cloud URIs (the adapters here are local
PEFT folders from `distill train`), and the A/B split with shadow comparison needs a router of our own anyway.
The engines are the same vLLM `AsyncLLM` that `ray.serve.llm` wraps.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Literal, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve import Application

from distill.config import ConfigError, build_config
from distill.engine import adapter_rank, engine_env
from distill.tasks import load_task
from serve.arms import STUDENT_ROLE, TEACHER_ROLE, LLMArm
from serve.auth import Keys, check_exposure
from serve.capture import Capture
from serve.config import STUDENT_MODEL, TEACHER_MODEL, ArmConfig, ServeConfig
from serve.protocol import (ApiError, ChatRequest, chat_completion, chunk, completion_id, error_body, usage,
                            validation_message)
from serve.router import STUDENT, TEACHER, Rollout, Route, check_rules
from serve.selective import proportions, threshold_from_report
from serve.state import delete_state_actor, open_state_store

log = logging.getLogger("distill.serve")

ARM_HEADER = "x-distill-arm"
CONFIDENCE_HEADER = "x-distill-confidence"
CASCADE_HEADER = "x-distill-cascade"
STUDENT_CONFIDENCE_HEADER = "x-distill-student-confidence"
GATEWAY_HEADER = "x-distill-gateway-ms"


class ShareChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    student_share: float = Field(ge=0.0, le=1.0)
    shadow_sample_rate: Optional[float] = Field(None, ge=0.0, le=1.0)
    reason: str = "admin"


class CascadeChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Optional[Literal["split", "cascade"]] = None
    threshold: Optional[float] = None
    reason: str = "admin"


api = FastAPI(title="distill serve", description="Teacher and distilled student behind one OpenAI-compatible API.")


@api.exception_handler(ApiError)
async def _api_error(_: Request, err: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(error_body(err.message, err.status, err.param), status_code=err.status, headers=headers)


@api.exception_handler(Exception)
async def _unexpected(_: Request, err: Exception) -> JSONResponse:
    # A bug in one request must answer that request, not bring the replica down.
    log.exception("unexpected error")
    return JSONResponse(error_body(f"internal error: {type(err).__name__}: {err}", 500), status_code=500)


async def _awaited(response):
    """A DeploymentResponse as a coroutine, so that asyncio.wait_for can time it out."""
    return await response


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def answer_headers(arm: str, confidence: Optional[float], cascade: Optional[dict]) -> dict[str, str]:
    headers = {ARM_HEADER: arm}
    if confidence is not None:
        headers[CONFIDENCE_HEADER] = repr(confidence)
    if cascade is not None:
        headers[CASCADE_HEADER] = cascade["decision"]
        if cascade["student_confidence"] is not None:
            headers[STUDENT_CONFIDENCE_HEADER] = repr(cascade["student_confidence"])
    return headers


@serve.deployment(name="gateway")
@serve.ingress(api)
class Gateway:
    async def __init__(self, config: dict, teacher, student, facts: dict):
        self.config = ServeConfig.model_validate(config)
        self.facts = facts
        self.task = load_task(self.config.task)
        self.rollout = Rollout(self.config.rollout, self.task, prices=self.config.cost,
                               reference_labels=facts["reference_labels"])
        self.keys = Keys(self.config.api_key, self.config.admin_keys)
        self.handles = {TEACHER: teacher, STUDENT: student}
        # The adapters the student engine loads; in merged mode none, and the task's name serves the merged model.
        self.lora = set(facts["student"]["engine_adapters"])
        self.student_adapter = self.task.name if self.task.name in self.lora else None
        self.created = int(time.time())
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.background: set[asyncio.Task] = set()
        adapters = self.config.student.adapters
        # What the rollout is of: persisted state of another student (a new adapter, say) is not resumed.
        self.identity = {"task": self.task.name, "teacher": self.config.teacher.model,
                         "student": self.config.student.model, "adapter": adapters.get(self.task.name)}
        self.store = open_state_store(self.config.rollout.state_uri, self.config.app_name)
        self.persisted = {"store": self.store.describe(), "resumed": False, "saved_revision": None,
                          "saved_at": None, "failures": 0, "last_failure": None}
        self.persist_lock = asyncio.Lock()
        saved = await self.store.load()
        if saved and saved.get("identity") == self.identity:
            self.rollout.load_state(saved["rollout"])
            self.persisted["resumed"] = True
            log.info("resumed the rollout from %s: share %.3f, mode %s, threshold %s, stage %d, %d rollbacks",
                     self.store.describe(), self.rollout.share, self.rollout.mode, self.rollout.threshold,
                     self.rollout.stage, self.rollout.rollbacks)
        elif saved:
            log.warning("the rollout state in %s is of %s, not of %s: starting a new rollout at share %.3f",
                        self.store.describe(), saved.get("identity"), self.identity, self.rollout.share)
        self.capture: Optional[Capture] = None
        if self.config.capture:
            self.capture = await asyncio.to_thread(Capture(
                self.config.capture, self.task, self.config.teacher.model, self.config.capture_rows_per_shard,
                self.config.capture_flush_seconds).open)
        if not self.keys.admin_keys and not self.keys.open:
            log.warning("no admin key (admin_keys, $DISTILL_ADMIN_KEY): /admin/* is off; the share and the cascade "
                        "change only with a restart")
        await self._persist()
        self._in_background(self._persist_periodically())

    def __del__(self):
        # Serve calls this when it stops the replica: write what the capture still buffers.
        capture = getattr(self, "capture", None)
        if capture is not None:
            capture.close()

    # -- helpers ----------------------------------------------------------------------------------------------
    async def _read_json(self, request: Request) -> Any:
        limit = self.config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
        body, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
            body.append(part)
        try:
            return json.loads(b"".join(body))
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiError(400, f"malformed JSON body: {err}") from None

    async def _admin_body(self, request: Request, model: type[BaseModel]) -> tuple[str, BaseModel]:
        who = self.keys.admin(request.headers)
        try:
            return who, model.model_validate(await self._read_json(request))
        except ValidationError as err:
            raise ApiError(400, validation_message(err)) from None

    def model_names(self) -> list[str]:
        return [TEACHER_MODEL, STUDENT_MODEL, self.config.routed_model] + sorted(self.config.student.adapters)

    def model_facts(self, name: str) -> dict:
        """What serves a model name (the `distill` field of /v1/models; OpenAI clients ignore it)."""
        serving = self.facts["student"]
        if name == TEACHER_MODEL:
            return {"arm": TEACHER, "model": self.config.teacher.model, "task_prompt": True}
        if name == self.config.routed_model:
            return {"arm": "routed", "mode": self.rollout.mode, "student_share": self.rollout.share,
                    "threshold": self.rollout.threshold}
        adapter = self.task.name if name == STUDENT_MODEL else name
        return {"arm": STUDENT, "serving": serving["mode"], "why": serving["why"], "base": serving["base"],
                "adapter": serving["adapters"].get(adapter), "engine_model": serving["engine_model"],
                "lora": adapter in self.lora}

    def _resolve(self, model: str, user: Optional[str]) -> tuple[Route, Optional[str]]:
        """(route, adapter) for a requested model name."""
        if model == TEACHER_MODEL:
            return Route(TEACHER), None
        if model == STUDENT_MODEL:
            return Route(STUDENT), self.student_adapter
        if model in self.config.student.adapters:
            return Route(STUDENT), (model if model in self.lora else None)
        if model == self.config.routed_model:
            route = self.rollout.route(user)
            return route, (self.student_adapter if route.arm == STUDENT else None)
        raise ApiError(404, f"model {model!r} does not exist; served models: {', '.join(self.model_names())}",
                       "model")

    async def _call(self, arm: str, req: dict) -> dict:
        response = self.handles[arm].generate.remote(req)
        try:
            return await asyncio.wait_for(_awaited(response), self.config.request_timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise ApiError(504, f"the {arm} did not answer within {self.config.request_timeout_s}s") from None
        except asyncio.CancelledError:
            # The client went away: the engine must not keep generating an answer nobody reads.
            response.cancel()
            raise
        except ApiError:
            raise
        except Exception as err:
            log.exception("%s call failed", arm)
            raise ApiError(503, f"the {arm} engine failed: {type(err).__name__}: {err}") from None

    async def _answer(self, arm: str, req: dict) -> dict:
        """The arm's whole answer; an ApiError for an error it answered with or a failed call."""
        result = await self._call(arm, req)
        if "error" in result:
            raise ApiError(result["error"]["status"], result["error"]["message"])
        return result

    def _respond(self, chat: ChatRequest, arm: str, result: dict, started: float, engine_s: float,
                 cascade: Optional[dict] = None) -> JSONResponse:
        body = chat_completion(completion_id(), chat.model, result) | {"arm": arm,
                                                                       "confidence": result["confidence"]}
        if cascade is not None:
            body["cascade"] = cascade
        response = JSONResponse(body, headers=answer_headers(arm, result["confidence"], cascade))
        # Everything but the arms' own time, the body's serialisation included (the response is built).
        overhead = time.perf_counter() - started - engine_s
        self.rollout.record_overhead(overhead)
        response.headers[GATEWAY_HEADER] = f"{overhead * 1000:.3f}"
        return response

    # -- rollout state ----------------------------------------------------------------------------------------
    def _in_background(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _persist(self) -> None:
        """Save the rollout state now. Saves are serialised and each takes the state when it starts, so the
        store never goes back to an older state."""
        async with self.persist_lock:
            revision = self.rollout.revision
            saved_at = time.time()
            await self.store.save({"identity": self.identity, "saved_at": saved_at,
                                   "rollout": self.rollout.to_state()})
            self.persisted.update(saved_revision=revision, saved_at=saved_at)

    async def _try_persist(self) -> None:
        try:
            await self._persist()
        except Exception as err:
            # Counted and shown in /stats; the periodic save retries, since the revision is still unsaved.
            self.persisted["failures"] += 1
            self.persisted["last_failure"] = f"{type(err).__name__}: {err}"
            log.exception("could not save the rollout state to %s", self.store.describe())

    async def _persist_now(self, what: str) -> None:
        """An admin change is answered only once it is saved: a restarted gateway must not undo it."""
        try:
            await self._persist()
        except Exception as err:
            raise ApiError(503, f"{what} on this gateway, but the rollout state could not be saved to "
                           f"{self.store.describe()} ({type(err).__name__}: {err}); a restarted gateway would not "
                           f"keep it. The save is retried every {self.config.rollout.persist_interval_s}s") from None

    async def _persist_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.rollout.persist_interval_s)
            if self.rollout.revision != self.persisted["saved_revision"]:
                await self._try_persist()

    async def _rolled_back(self, event: Optional[dict]) -> None:
        """A rollback is saved at once: a gateway restart right after it must not bring the student back."""
        if event is not None:
            await self._try_persist()

    async def _record_error(self, route: Route, status: int) -> None:
        await self._rolled_back(self.rollout.record_error(route, status))

    async def _record_answer(self, route: Route, started: float, result: dict, text: str,
                             messages: list[dict]) -> None:
        await self._rolled_back(self.rollout.record_request(
            route, time.perf_counter() - started, result["prompt_tokens"], result["completion_tokens"], text,
            result["cached_tokens"]))
        if route.arm == TEACHER and route.stage is not None:
            self._capture(messages, result)
        self._maybe_shadow(route, messages, text)

    def _maybe_shadow(self, route: Route, messages: list[dict], student_text: str) -> None:
        # Shadow only answers of the current stage: a result of an earlier one would be thrown away as stale.
        if route.arm == STUDENT and route.stage == self.rollout.stage and self.rollout.should_shadow():
            self._in_background(self._shadow(route.stage, messages, student_text))

    def _capture(self, messages: list[dict], teacher: dict) -> None:
        """Keep a successful teacher answer as training data (when capture is on), written in the background."""
        if self.capture is not None and (row := self.capture.row(messages, teacher)) is not None:
            self._in_background(self.capture.write(row))

    async def _shadow(self, stage: int, messages: list[dict], student_text: str) -> None:
        teacher = None
        try:
            # The teacher's own defaults (temperature, max_tokens, guided decoding): the comparison is with the
            # answer production would get from it, whatever sampling the client asked the student for.
            result = await self._call(TEACHER, {"messages": messages, "request_id": f"shadow-{uuid.uuid4().hex}"})
            if "error" not in result:
                teacher = result
        except ApiError as err:
            log.warning("shadow request to the teacher failed: %s", err.message)
        finally:
            await self._rolled_back(self.rollout.record_shadow(
                stage, teacher and teacher["text"], student_text, teacher_tokens=teacher))
        if teacher is not None:
            self._capture(messages, teacher)

    # -- OpenAI API -------------------------------------------------------------------------------------------
    @api.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self.keys.client(request.headers)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "distill",
             "distill": self.model_facts(name)} for name in self.model_names()]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        started = time.perf_counter()
        self.keys.client(request.headers)
        body = await self._read_json(request)
        if not isinstance(body, dict):
            raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}")
        try:
            chat = ChatRequest.model_validate(body)
        except ValidationError as err:
            raise ApiError(400, validation_message(err)) from None
        user = chat.user or request.headers.get(self.config.rollout.user_header)
        route, adapter = self._resolve(chat.model, user)
        messages = chat.plain_messages()
        req = {"messages": messages, "adapter": adapter, "max_tokens": chat.requested_max_tokens(),
               "temperature": chat.temperature, "top_p": chat.top_p, "stop": chat.stops(),
               "request_id": uuid.uuid4().hex}
        if route.cascade:
            return await self._cascade(chat, route, req, started)
        if chat.stream:
            return await self._stream(chat, route, req, started)
        try:
            result = await self._answer(route.arm, req)
        except ApiError as err:
            await self._record_error(route, err.status)
            raise
        await self._record_answer(route, started, result, result["text"], messages)
        return self._respond(chat, route.arm, result, started, result["engine_s"])

    async def _cascade(self, chat: ChatRequest, route: Route, req: dict, started: float):
        """The student first; below the threshold (or failing) the same request goes to the teacher, whose
        answer is returned. Decided before the first byte, streamed or not: the student's answer is taken whole
        (for free text too: a cascade buffers the student), and a deferred stream is the teacher's own stream."""
        t0 = time.perf_counter()
        student, student_status = None, None
        try:
            student = await self._answer(STUDENT, req)
        except ApiError as err:
            if err.status < 500:  # the client's fault (bad input): the teacher would refuse it as well
                await self._record_error(route, err.status)
                raise
            student_status = err.status
        student_s = time.perf_counter() - t0
        kept, reason = self.rollout.cascade_decision(student) if student else (False, "student_error")
        decision = {"decision": "kept" if kept else "deferred", "reason": reason, "threshold": self.rollout.threshold,
                    "student_confidence": student["confidence"] if student else None}
        if kept:
            await self._rolled_back(self.rollout.record_cascade(route, student, None, student_s, True, reason))
            self._maybe_shadow(route, req["messages"], student["text"])
            if chat.stream:
                return self._whole_answer_stream(chat, STUDENT, student, decision)
            return self._respond(chat, STUDENT, student, started, student["engine_s"], decision)

        teacher_req = {**req, "adapter": None}
        t1 = time.perf_counter()

        async def teacher_failed(status: int) -> None:
            await self._rolled_back(self.rollout.record_cascade(
                route, student, student_status, student_s, False, reason, None, status))

        async def teacher_answered(teacher: dict) -> None:
            await self._rolled_back(self.rollout.record_cascade(
                route, student, student_status, student_s, False, reason, teacher, None, time.perf_counter() - t1))
            self._capture(req["messages"], teacher)

        if chat.stream:
            return await self._stream(chat, Route(TEACHER, route.stage), teacher_req, started, decision,
                                      on_error=teacher_failed, on_done=teacher_answered)
        try:
            teacher = await self._answer(TEACHER, teacher_req)
        except ApiError as err:
            await teacher_failed(err.status)
            raise
        await teacher_answered(teacher)
        return self._respond(chat, TEACHER, teacher, started,
                             (student["engine_s"] if student else 0.0) + teacher["engine_s"], decision)

    def _stream_end(self, cid: str, model: str, created: int, chat: ChatRequest, final: dict):
        """The last events of a stream: the finish reason with the confidence, the usage if asked, [DONE]."""
        yield sse(chunk(cid, model, created, {}, final["finish_reason"]) | {"confidence": final["confidence"]})
        if chat.stream_options and chat.stream_options.include_usage:
            yield sse(chunk(cid, model, created, {}, usage_block=usage(final)))
        yield "data: [DONE]\n\n"

    def _whole_answer_stream(self, chat: ChatRequest, arm: str, result: dict, cascade: dict) -> StreamingResponse:
        """An answer already complete, as an event stream (the cascade's kept student answer)."""
        cid, created = completion_id(), int(time.time())

        async def events():
            yield sse(chunk(cid, chat.model, created, {"role": "assistant", "content": ""}))
            if result["text"]:
                yield sse(chunk(cid, chat.model, created, {"content": result["text"]}))
            for event in self._stream_end(cid, chat.model, created, chat, result):
                yield event

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers=answer_headers(arm, result["confidence"], cascade))

    async def _stream(self, chat: ChatRequest, route: Route, req: dict, started: float,
                      cascade: Optional[dict] = None, on_error=None, on_done=None):
        """The arm's answer as it is generated. `on_error(status)` / `on_done(result)` record the outcome
        (default: the route's request or error)."""
        arm = route.arm

        async def failed(status: int) -> None:
            await (on_error(status) if on_error else self._record_error(route, status))

        async def done(result: dict) -> None:
            if on_done:
                await on_done(result)
            else:
                await self._record_answer(route, started, result, result["text"], req["messages"])

        generator = self.handles[arm].options(stream=True).stream.remote(req)
        try:
            first = await asyncio.wait_for(generator.__anext__(), self.config.request_timeout_s)
        except asyncio.TimeoutError:
            generator.cancel()
            await failed(504)
            raise ApiError(504, f"the {arm} did not answer within {self.config.request_timeout_s}s") from None
        except asyncio.CancelledError:
            generator.cancel()
            raise
        except Exception as err:
            log.exception("%s stream failed to start", arm)
            await failed(503)
            raise ApiError(503, f"the {arm} engine failed: {type(err).__name__}: {err}") from None
        if "error" in first:
            await failed(first["error"]["status"])
            raise ApiError(first["error"]["status"], first["error"]["message"])
        cid, created, model = completion_id(), int(time.time()), chat.model

        async def events():
            text: list[str] = []
            final = None
            try:
                yield sse(chunk(cid, model, created, {"role": "assistant", "content": ""}))
                async for item in generator:
                    if item.get("done"):
                        final = item
                        break
                    delta = {}
                    if item["reasoning"]:
                        delta["reasoning_content"] = item["reasoning"]
                    if item["content"]:
                        delta["content"] = item["content"]
                        text.append(item["content"])
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
            for event in self._stream_end(cid, model, created, chat, final):
                yield event
            await done({**final, "text": "".join(text)})

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers=answer_headers(arm, None, cascade))

    # -- operations -------------------------------------------------------------------------------------------
    @api.get("/stats")
    async def stats(self, request: Request) -> dict:
        self.keys.client(request.headers)
        return {"task": self.task.name, "models": self.model_names(), "routed_model": self.config.routed_model,
                "gateway_replica": self.replica, **self.rollout.snapshot(),
                "threshold_source": self.facts["threshold_source"], "student_serving": self.facts["student"],
                "capture": self.capture.snapshot() if self.capture else None,
                "auth": {"client_key": bool(self.keys.api_key), "admin_keys": sorted(self.keys.admin_keys)},
                "state": {**self.persisted, "revision": self.rollout.revision}}

    @api.get("/metrics")
    async def metrics(self, request: Request) -> PlainTextResponse:
        self.keys.client(request.headers)
        text = self.rollout.prometheus() + (
            "# HELP distill_state_save_failures_total Failed saves of the rollout state.\n"
            "# TYPE distill_state_save_failures_total counter\n"
            f"distill_state_save_failures_total {self.persisted['failures']}\n")
        if self.capture is not None:
            snapshot = self.capture.snapshot()
            text += ("# HELP distill_capture_rows_total Captured teacher answers: written to shards, buffered, "
                     "and turned down by reason.\n# TYPE distill_capture_rows_total counter\n"
                     f'distill_capture_rows_total{{result="written"}} {snapshot["written"]}\n'
                     f'distill_capture_rows_total{{result="pending"}} {snapshot["pending"]}\n'
                     + "".join(f'distill_capture_rows_total{{result="{reason}"}} {n}\n'
                               for reason, n in snapshot["skipped"].items()))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @api.post("/admin/share")
    async def change_share(self, request: Request) -> dict:
        who, change = await self._admin_body(request, ShareChange)
        event = self.rollout.set_share(change.student_share, change.reason, change.shadow_sample_rate, by=who)
        await self._persist_now(f"the share is now {change.student_share}")
        return {"event": event, "student_share": self.rollout.share, "shadow_sample_rate": self.rollout.shadow_rate,
                "stage": self.rollout.stage}

    @api.post("/admin/cascade")
    async def change_cascade(self, request: Request) -> dict:
        who, change = await self._admin_body(request, CascadeChange)
        if change.mode is None and change.threshold is None:
            raise ApiError(400, "give mode (split or cascade) and/or threshold")
        try:
            event = self.rollout.set_cascade(change.mode, change.threshold, change.reason, by=who)
        except ValueError as err:
            raise ApiError(400, str(err)) from None
        await self._persist_now(f"the mode is now {self.rollout.mode}, the threshold {self.rollout.threshold}")
        return {"event": event, "mode": self.rollout.mode, "threshold": self.rollout.threshold,
                "stage": self.rollout.stage}

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}


# ----------------------------------------------------------------------------------------------------------------
# Building and starting the application.
def _absolute_if_local(path: str) -> str:
    """Replicas may run in another working directory: pass local paths as absolute ones."""
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


def resolve_config(config: ServeConfig) -> ServeConfig:
    """Check what can be checked before any engine starts (and before Ray), make paths absolute, take the keys
    from the environment where the config has none, and read a cascade threshold from its report."""
    task = load_task(config.task)
    adapters = {name: _absolute_if_local(path) for name, path in config.student.adapters.items()}
    for path in adapters.values():
        adapter_rank(path)  # a ConfigError here names the folder that is not an adapter
    if adapters and task.name not in adapters:
        raise ConfigError(f"student.adapters has no adapter named after the task {task.name!r} (it is what the "
                          f"model 'student' serves); adapters: {sorted(adapters)}")
    if not adapters:
        log.info("no student adapter: the model 'student' is %s as it is (a merged student, or the bare base)",
                 config.student.model)
    api_key = config.api_key or os.environ.get("DISTILL_API_KEY") or None
    admin_keys = config.admin_keys or (
        {"DISTILL_ADMIN_KEY": os.environ["DISTILL_ADMIN_KEY"]} if os.environ.get("DISTILL_ADMIN_KEY") else {})
    if api_key and api_key in admin_keys.values():
        raise ConfigError("the API key and an admin key are the same: a client key must not administer")
    check_exposure(config.host, api_key, config.insecure_no_auth)
    rollout = config.rollout
    if rollout.cascade.threshold_from:
        threshold, deferral_rate, _ = threshold_from_report(rollout.cascade.threshold_from)
        drift = rollout.drift
        if drift.reference_deferral_rate is None and deferral_rate is not None:
            drift = drift.model_copy(update={"reference_deferral_rate": deferral_rate})
        # The number from now on (the gateway revalidates the config, which takes one source only).
        rollout = rollout.model_copy(update={"cascade": rollout.cascade.model_copy(
            update={"threshold": threshold, "threshold_from": None}), "drift": drift})
    check_rules(rollout, task)
    if rollout.drift.reference_data and task.answer.type != "labels":
        raise ConfigError(f"rollout.drift.reference_data: task {task.name!r} answers in free text, which has no "
                          f"label distribution to compare; drop it")
    for arm in (config.teacher, config.student):
        if arm.guided_choices and task.answer.type == "labels":
            bad = [c for c in arm.guided_choices if task.label_of(c) is None]
            if bad:
                raise ConfigError(f"guided_choices {bad} do not parse as labels of task {task.name!r}")
    task_source = config.task if (Path(config.task).suffix not in {".yaml", ".yml"}) else _absolute_if_local(
        config.task)
    return config.model_copy(update={
        "task": task_source, "api_key": api_key, "admin_keys": admin_keys, "rollout": rollout,
        "teacher": config.teacher.model_copy(update={"model": _absolute_if_local(config.teacher.model)}),
        "student": config.student.model_copy(update={"model": _absolute_if_local(config.student.model),
                                                     "adapters": adapters}),
    })


def threshold_source(config: ServeConfig) -> Optional[str]:
    """Where the cascade threshold comes from, for /stats (read before resolve_config replaces it by the number)."""
    cascade = config.rollout.cascade
    if cascade.threshold_from:
        return f"{cascade.threshold_from} (selective.threshold)"
    return "config" if cascade.threshold is not None else None


def reference_labels(uri: str) -> dict[str, float]:
    """The label distribution of a generation output's data (URI/data/*.parquet), the drift reference."""
    from collections import Counter

    from distill.storage import join, list_files, read_columns

    data = join(uri, "data")
    if not list_files(data):
        raise ConfigError(f"rollout.drift.reference_data {uri}: no Parquet files under {data} (point it at the "
                          f"output of `distill generate` the student was trained on)")
    labels = [label for label in read_columns(data, ["label"]).column("label").to_pylist() if label]
    if not labels:
        raise ConfigError(f"rollout.drift.reference_data {uri}: its data has no labels")
    return proportions(Counter(labels))


def gateway_facts(config: ServeConfig, source: Optional[str]) -> dict:
    """What the gateway is told besides its config, decided once where the cluster is reachable: how the student
    is served (a merge, if it is folded in), the drift reference, where the threshold came from."""
    from distill.engine import resolve_device
    from serve.student import prepare

    serving = prepare(config.student, load_task(config.task).name, resolve_device(config.student.engine.device))
    reference = reference_labels(config.rollout.drift.reference_data) if config.rollout.drift.reference_data \
        else None
    return {"student": serving.as_dict(), "reference_labels": reference, "threshold_source": source}


def _arm(role: str, arm: ArmConfig, task: str, device: str):
    engine = arm.engine
    options: dict[str, Any] = {
        "name": role,
        "max_ongoing_requests": arm.max_ongoing_requests,
        "autoscaling_config": {"min_replicas": arm.min_replicas, "max_replicas": arm.max_replicas,
                               "initial_replicas": max(arm.min_replicas, 1),
                               "target_ongoing_requests": arm.target_ongoing_requests},
        # Engine start-up (weights, KV cache) takes a while on CPU; the health check runs vLLM's own.
        "health_check_period_s": 10, "health_check_timeout_s": 60, "graceful_shutdown_timeout_s": 20,
    }
    env = engine_env(engine)
    actor_options: dict[str, Any] = {"runtime_env": {"env_vars": env}} if env else {}
    if device == "gpu" and engine.tensor_parallel_size > 1:
        # One bundle per GPU worker of the engine, packed on one node; vLLM's Ray executor fills them.
        options["placement_group_bundles"] = [{"CPU": 1}] + [{"GPU": 1}] * engine.tensor_parallel_size
        options["placement_group_strategy"] = "STRICT_PACK"
    elif device == "gpu":
        actor_options["num_gpus"] = 1
    else:
        actor_options["num_cpus"] = engine.cpus_per_engine
    options["ray_actor_options"] = actor_options
    return serve.deployment(LLMArm).options(**options).bind(role, arm.model_dump(), task, device)


def build_app(args: dict[str, Any]) -> Application:
    """The application builder that `serve run serve.app:build_app` and a RayService's serveConfigV2 call with
    their `args`: the fields of ServeConfig.

    It takes the plain mapping and validates it itself. Serve converts `args` to a pydantic model only when the
    builder's parameter annotation is that class, and under `from __future__ import annotations` (this module)
    it sees a string and hands over the dict as it is; validating here also names every bad field at once.

    The address Serve listens on is Serve's (`serve run`'s options, a RayService's http_options), not this
    config's: unless `args` say `host` is a loopback address, the service counts as reachable from the network
    and needs an API key (or insecure_no_auth)."""
    config = build_config(ServeConfig, args, "serve application args")
    source = threshold_source(config)
    resolved = resolve_config(config)
    if "host" not in config.model_fields_set:
        check_exposure("the network (Serve's HTTP address)", resolved.api_key, resolved.insecure_no_auth)
    return application(resolved, gateway_facts(resolved, source))


def application(config: ServeConfig, facts: dict) -> Application:
    """The Serve application for `config` (already passed through `resolve_config`) and `gateway_facts`."""
    from distill.engine import resolve_device

    serving = facts["student"]
    student_engine = config.student.model_copy(update={"model": serving["engine_model"],
                                                       "adapters": serving["engine_adapters"]})
    teacher = _arm(TEACHER_ROLE, config.teacher, config.task, resolve_device(config.teacher.engine.device))
    student = _arm(STUDENT_ROLE, student_engine, config.task, resolve_device(config.student.engine.device))
    # One gateway replica: it owns the rollout state (share, windows, stats). It only parses and forwards, so
    # one asyncio replica keeps up with engines that take tens of milliseconds per request or more.
    gateway = Gateway.options(num_replicas=1, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0.25})
    return gateway.bind(config.model_dump(), teacher, student, facts)


def start(config: ServeConfig) -> str:
    """Start (or update) the application on this Ray cluster and return its base URL once every replica is up."""
    from distill.ray_init import init_ray

    source = threshold_source(config)
    config = resolve_config(config)  # config errors before Ray starts
    init_ray()
    facts = gateway_facts(config, source)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(application(config, facts), name=config.app_name, route_prefix="/")
    return f"http://{config.host}:{config.port}"


def stop(config: ServeConfig) -> None:
    """Delete this application and stop Serve on this (private) cluster. The rollout ends with the application:
    its state actor goes too (a `rollout.state_uri` file stays, for the next `distill serve` of the same student)."""
    serve.delete(config.app_name)
    delete_state_actor(config.app_name)
    serve.shutdown()
