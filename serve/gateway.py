"""The gateway deployment: the OpenAI-compatible HTTP front (FastAPI ingress, one replica) that authenticates,
validates, routes every request to an arm (the A/B split, the cascade), records the outcome in the rollout, shadows
and captures in the background, and serves /stats, /metrics and the admin endpoints. Streams are in
serve/streaming.py, the rollout in serve/rollout.py, its saves in serve/state.py, the metrics text in
serve/metrics.py.

Every answer carries its confidence (`x-distill-confidence` and a `confidence` field beside the OpenAI ones; in a
stream, on the chunk with the finish reason), the arm that answered (`x-distill-arm`, `arm`), in cascade mode the
decision (`x-distill-cascade`: kept | deferred, `cascade`), and for a whole answer the gateway's own time
(`x-distill-gateway-ms`: its handler's time minus the arms').
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from distill.tasks import load_task
from serve.arm_messages import ArmAnswer, ArmRefusal, ArmRequest
from serve.auth import Keys
from serve.capture import Capture
from serve.config import STUDENT_MODEL, TEACHER_MODEL, ServeConfig
from serve.metrics import prometheus_text
from serve.protocol import (GATEWAY_HEADER, ApiError, ChatRequest, answer_headers, chat_completion, completion_id,
                            error_body, validation_message)
from serve.rollout import STUDENT, TEACHER, Rollout, Route
from serve.state import RolloutKeeper, open_state_store
from serve.streaming import relay_stream, whole_answer_stream

log = logging.getLogger("distill.serve")


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
        self.keeper = RolloutKeeper(self.rollout, open_state_store(self.config.rollout.state_uri,
                                                                   self.config.app_name),
                                    self.identity, self.config.rollout.persist_interval_s)
        await self.keeper.resume()
        self.capture: Optional[Capture] = None
        if self.config.capture:
            self.capture = await asyncio.to_thread(Capture(
                self.config.capture, self.task, self.config.teacher.model, self.config.capture_rows_per_shard,
                self.config.capture_flush_seconds).open)
        if not self.keys.admin_keys and not self.keys.open:
            log.warning("no admin key (admin_keys, $DISTILL_ADMIN_KEY): /admin/* is off; the share and the cascade "
                        "change only with a restart")
        await self.keeper.save()
        self._in_background(self.keeper.save_periodically())

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

    async def _call(self, arm: str, req: ArmRequest) -> Union[ArmAnswer, ArmRefusal]:
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

    async def _answer(self, arm: str, req: ArmRequest) -> ArmAnswer:
        """The arm's whole answer; an ApiError for a refusal or a failed call."""
        result = await self._call(arm, req)
        if isinstance(result, ArmRefusal):
            raise ApiError(result.status, result.message)
        return result

    def _respond(self, chat: ChatRequest, arm: str, result: ArmAnswer, started: float, engine_s: float,
                 cascade: Optional[dict] = None) -> JSONResponse:
        body = chat_completion(completion_id(), chat.model, result) | {"arm": arm, "confidence": result.confidence}
        if cascade is not None:
            body["cascade"] = cascade
        response = JSONResponse(body, headers=answer_headers(arm, result.confidence, cascade))
        # Everything but the arms' own time, the body's serialisation included (the response is built).
        overhead = time.perf_counter() - started - engine_s
        self.rollout.record_overhead(overhead)
        response.headers[GATEWAY_HEADER] = f"{overhead * 1000:.3f}"
        return response

    # -- rollout state and its evidence ----------------------------------------------------------------------
    def _in_background(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _rolled_back(self, event: Optional[dict]) -> None:
        """A rollback is saved at once: a gateway restart right after it must not bring the student back."""
        if event is not None:
            await self.keeper.try_save()

    async def _record_error(self, route: Route, status: int) -> None:
        await self._rolled_back(self.rollout.record_error(route, status))

    async def _record_answer(self, route: Route, started: float, result: ArmAnswer, messages: list[dict]) -> None:
        await self._rolled_back(self.rollout.record_request(
            route, time.perf_counter() - started, result.prompt_tokens, result.completion_tokens, result.text,
            result.cached_tokens))
        if route.arm == TEACHER and route.stage is not None:
            self._capture(messages, result)
        self._maybe_shadow(route, messages, result.text)

    def _maybe_shadow(self, route: Route, messages: list[dict], student_text: str) -> None:
        # Shadow only answers of the current stage: a result of an earlier one would be thrown away as stale.
        if route.arm == STUDENT and route.stage == self.rollout.stage and self.rollout.should_shadow():
            self._in_background(self._shadow(route.stage, messages, student_text))

    def _capture(self, messages: list[dict], teacher: ArmAnswer) -> None:
        """Keep a successful teacher answer as training data (when capture is on), written in the background."""
        if self.capture is not None and (row := self.capture.row(messages, teacher)) is not None:
            self._in_background(self.capture.write(row))

    async def _shadow(self, stage: int, messages: list[dict], student_text: str) -> None:
        teacher = None
        try:
            # The teacher's own defaults (temperature, max_tokens, guided decoding): the comparison is with the
            # answer production would get from it, whatever sampling the client asked the student for.
            result = await self._call(TEACHER, ArmRequest(messages=messages,
                                                          request_id=f"shadow-{uuid.uuid4().hex}"))
            if isinstance(result, ArmAnswer):
                teacher = result
        except ApiError as err:
            log.warning("shadow request to the teacher failed: %s", err.message)
        finally:
            await self._rolled_back(self.rollout.record_shadow(
                stage, teacher and teacher.text, student_text, teacher_tokens=teacher))
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
        req = ArmRequest(messages=messages, request_id=uuid.uuid4().hex, adapter=adapter,
                         max_tokens=chat.requested_max_tokens(), temperature=chat.temperature, top_p=chat.top_p,
                         stop=chat.stops())
        if route.cascade:
            return await self._cascade(chat, route, req, started)
        if chat.stream:
            return await self._stream(chat, route, req, started)
        try:
            result = await self._answer(route.arm, req)
        except ApiError as err:
            await self._record_error(route, err.status)
            raise
        await self._record_answer(route, started, result, messages)
        return self._respond(chat, route.arm, result, started, result.engine_s)

    async def _stream(self, chat: ChatRequest, route: Route, req: ArmRequest, started: float,
                      cascade: Optional[dict] = None, on_error=None, on_done=None) -> StreamingResponse:
        """The arm's answer as it is generated. `on_error(status)` / `on_done(result)` record the outcome
        (default: the route's request or error)."""
        async def failed(status: int) -> None:
            await (on_error(status) if on_error else self._record_error(route, status))

        async def done(result: ArmAnswer) -> None:
            if on_done:
                await on_done(result)
            else:
                await self._record_answer(route, started, result, req.messages)

        return await relay_stream(self.handles[route.arm], route.arm, chat, req, self.config.request_timeout_s,
                                  answer_headers(route.arm, None, cascade), failed, done)

    async def _cascade(self, chat: ChatRequest, route: Route, req: ArmRequest, started: float):
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
                    "student_confidence": student.confidence if student else None}
        if kept:
            await self._rolled_back(self.rollout.record_cascade(route, student, None, student_s, True, reason))
            self._maybe_shadow(route, req.messages, student.text)
            if chat.stream:
                return whole_answer_stream(chat, student, answer_headers(STUDENT, student.confidence, decision))
            return self._respond(chat, STUDENT, student, started, student.engine_s, decision)

        teacher_req = req.for_teacher()
        t1 = time.perf_counter()

        async def teacher_failed(status: int) -> None:
            await self._rolled_back(self.rollout.record_cascade(
                route, student, student_status, student_s, False, reason, None, status))

        async def teacher_answered(teacher: ArmAnswer) -> None:
            await self._rolled_back(self.rollout.record_cascade(
                route, student, student_status, student_s, False, reason, teacher, None, time.perf_counter() - t1))
            self._capture(req.messages, teacher)

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
                             (student.engine_s if student else 0.0) + teacher.engine_s, decision)

    # -- operations -------------------------------------------------------------------------------------------
    @api.get("/stats")
    async def stats(self, request: Request) -> dict:
        self.keys.client(request.headers)
        return {"task": self.task.name, "models": self.model_names(), "routed_model": self.config.routed_model,
                "gateway_replica": self.replica, **self.rollout.snapshot(),
                "threshold_source": self.facts["threshold_source"], "student_serving": self.facts["student"],
                "capture": self.capture.snapshot() if self.capture else None,
                "auth": {"client_key": bool(self.keys.api_key), "admin_keys": sorted(self.keys.admin_keys)},
                "state": {**self.keeper.status, "revision": self.rollout.revision}}

    @api.get("/metrics")
    async def metrics(self, request: Request) -> PlainTextResponse:
        self.keys.client(request.headers)
        text = prometheus_text(self.rollout, self.keeper.status["failures"],
                               self.capture.snapshot() if self.capture is not None else None)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @api.post("/admin/share")
    async def change_share(self, request: Request) -> dict:
        who, change = await self._admin_body(request, ShareChange)
        event = self.rollout.set_share(change.student_share, change.reason, change.shadow_sample_rate, by=who)
        await self.keeper.save_or_refuse(f"the share is now {change.student_share}")
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
        await self.keeper.save_or_refuse(f"the mode is now {self.rollout.mode}, the threshold {self.rollout.threshold}")
        return {"event": event, "mode": self.rollout.mode, "threshold": self.rollout.threshold,
                "stage": self.rollout.stage}

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}
