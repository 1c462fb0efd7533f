"""The Serve application: an OpenAI-compatible gateway in front of a teacher arm and a student arm.

    gateway (FastAPI ingress, 1 replica: owns the rollout state)
      ├── teacher  (LLMArm: vLLM AsyncLLM + the task prompt added server-side, autoscaling)
      └── student  (LLMArm: vLLM AsyncLLM base model + LoRA adapters, autoscaling)

Models: `teacher`, `student` (the adapter named like the task), every adapter by its own name, and the routed
model (`routed` by default) that A/B-splits between the arms (`serve/router.py`). Also GET /v1/models, /stats
(JSON), /metrics (Prometheus), /healthz and POST /admin/share. The rollout state is saved outside the gateway
(`serve/state.py`) and resumed by a restarted gateway replica.

`build_app` is the application builder of `serve run serve.app:build_app` and of a KubeRay RayService
(`import_path` + `args`); `start` is the one `distill serve` uses.

Why plain deployments and not `ray.serve.llm`: its OpenAI app cannot add a task prompt server-side or strip the
teacher's reasoning, its dynamic LoRA loading only reads adapters from cloud URIs (the adapters here are local
PEFT folders from `distill train`), and the A/B split with shadow comparison needs a router of our own anyway.
The engines are the same vLLM `AsyncLLM` that `ray.serve.llm` wraps.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve import Application

from distill.config import ConfigError, build_config
from distill.engine import adapter_rank, engine_env
from distill.tasks import load_task
from serve.arms import STUDENT_ROLE, TEACHER_ROLE, LLMArm
from serve.config import STUDENT_MODEL, TEACHER_MODEL, ArmConfig, ServeConfig
from serve.protocol import (ChatRequest, chat_completion, chunk, completion_id, error_body, usage,
                            validation_message)
from serve.router import STUDENT, TEACHER, Rollout, Route, check_rules
from serve.state import delete_state_actor, open_state_store

log = logging.getLogger("distill.serve")

ARM_HEADER = "x-distill-arm"


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class ShareChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    student_share: float = Field(ge=0.0, le=1.0)
    shadow_sample_rate: Optional[float] = Field(None, ge=0.0, le=1.0)
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


@serve.deployment(name="gateway")
@serve.ingress(api)
class Gateway:
    async def __init__(self, config: dict, teacher, student):
        self.config = ServeConfig.model_validate(config)
        self.task = load_task(self.config.task)
        self.rollout = Rollout(self.config.rollout, self.task)
        self.handles = {TEACHER: teacher, STUDENT: student}
        adapters = self.config.student.adapters
        self.student_adapter = self.task.name if self.task.name in adapters else None
        self.created = int(time.time())
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.background: set[asyncio.Task] = set()
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
            log.info("resumed the rollout from %s: share %.3f, stage %d, %d rollbacks", self.store.describe(),
                     self.rollout.share, self.rollout.stage, self.rollout.rollbacks)
        elif saved:
            log.warning("the rollout state in %s is of %s, not of %s: starting a new rollout at share %.3f",
                        self.store.describe(), saved.get("identity"), self.identity, self.rollout.share)
        await self._persist()
        self._in_background(self._persist_periodically())

    # -- helpers ----------------------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        key = self.config.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'")

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

    def model_names(self) -> list[str]:
        return [TEACHER_MODEL, STUDENT_MODEL, self.config.routed_model] + sorted(self.config.student.adapters)

    def _resolve(self, model: str, user: Optional[str]) -> tuple[Route, Optional[str]]:
        """(route, adapter) for a requested model name."""
        if model == TEACHER_MODEL:
            return Route(TEACHER), None
        if model == STUDENT_MODEL:
            return Route(STUDENT), self.student_adapter
        if model in self.config.student.adapters:
            return Route(STUDENT), model
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
            route, time.perf_counter() - started, result["prompt_tokens"], result["completion_tokens"], text))
        # Shadow only answers of the current stage: a result of an earlier one would be thrown away as stale.
        if route.arm == STUDENT and route.stage == self.rollout.stage and self.rollout.should_shadow():
            self._in_background(self._shadow(route.stage, messages, text))

    async def _shadow(self, stage: int, messages: list[dict], student_text: str) -> None:
        teacher_text = None
        try:
            # The teacher's own defaults (temperature, max_tokens, guided decoding): the comparison is with the
            # answer production would get from it, whatever sampling the client asked the student for.
            result = await self._call(TEACHER, {"messages": messages, "request_id": f"shadow-{uuid.uuid4().hex}"})
            if "error" not in result:
                teacher_text = result["text"]
        except ApiError as err:
            log.warning("shadow request to the teacher failed: %s", err.message)
        finally:
            await self._rolled_back(self.rollout.record_shadow(stage, teacher_text, student_text))

    # -- OpenAI API -------------------------------------------------------------------------------------------
    @api.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self._authorize(request)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "distill"}
            for name in self.model_names()]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self._authorize(request)
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
        started = time.perf_counter()
        if chat.stream:
            return await self._stream(chat, route, req, started)
        try:
            result = await self._call(route.arm, req)
            if "error" in result:
                raise ApiError(result["error"]["status"], result["error"]["message"])
        except ApiError as err:
            await self._record_error(route, err.status)
            raise
        await self._record_answer(route, started, result, result["text"], messages)
        return JSONResponse(chat_completion(completion_id(), chat.model, result) | {"arm": route.arm},
                            headers={ARM_HEADER: route.arm})

    async def _stream(self, chat: ChatRequest, route: Route, req: dict, started: float):
        arm = route.arm
        generator = self.handles[arm].options(stream=True).stream.remote(req)
        try:
            first = await asyncio.wait_for(generator.__anext__(), self.config.request_timeout_s)
        except asyncio.TimeoutError:
            generator.cancel()
            await self._record_error(route, 504)
            raise ApiError(504, f"the {arm} did not answer within {self.config.request_timeout_s}s") from None
        except asyncio.CancelledError:
            generator.cancel()
            raise
        except Exception as err:
            log.exception("%s stream failed to start", arm)
            await self._record_error(route, 503)
            raise ApiError(503, f"the {arm} engine failed: {type(err).__name__}: {err}") from None
        if "error" in first:
            await self._record_error(route, first["error"]["status"])
            raise ApiError(first["error"]["status"], first["error"]["message"])
        cid, created, model = completion_id(), int(time.time()), chat.model
        include_usage = bool(chat.stream_options and chat.stream_options.include_usage)

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
                await self._record_error(route, 503)
                yield sse(error_body(f"the {arm} engine failed mid-stream: {type(err).__name__}: {err}", 503))
                yield "data: [DONE]\n\n"
                return
            finally:
                if final is None:
                    # The client disconnected (the generator is closed or cancelled) or the stream failed: stop
                    # the engine's request rather than let it generate an answer nobody reads.
                    generator.cancel()
            yield sse(chunk(cid, model, created, {}, final["finish_reason"]))
            if include_usage:
                yield sse(chunk(cid, model, created, {}, usage_block=usage(final)))
            yield "data: [DONE]\n\n"
            await self._record_answer(route, started, final, "".join(text), req["messages"])

        return StreamingResponse(events(), media_type="text/event-stream", headers={ARM_HEADER: arm})

    # -- operations -------------------------------------------------------------------------------------------
    @api.get("/stats")
    async def stats(self, request: Request) -> dict:
        self._authorize(request)
        return {"task": self.task.name, "models": self.model_names(), "routed_model": self.config.routed_model,
                "gateway_replica": self.replica, **self.rollout.snapshot(),
                "state": {**self.persisted, "revision": self.rollout.revision}}

    @api.get("/metrics")
    async def metrics(self, request: Request) -> PlainTextResponse:
        self._authorize(request)
        text = self.rollout.prometheus() + (
            "# HELP distill_state_save_failures_total Failed saves of the rollout state.\n"
            "# TYPE distill_state_save_failures_total counter\n"
            f"distill_state_save_failures_total {self.persisted['failures']}\n")
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @api.post("/admin/share")
    async def change_share(self, request: Request) -> dict:
        self._authorize(request)
        body = await self._read_json(request)
        try:
            change = ShareChange.model_validate(body)
        except ValidationError as err:
            raise ApiError(400, validation_message(err)) from None
        event = self.rollout.set_share(change.student_share, change.reason, change.shadow_sample_rate)
        try:
            await self._persist()
        except Exception as err:
            raise ApiError(503, f"the share is now {change.student_share} on this gateway, but the rollout state "
                           f"could not be saved to {self.store.describe()} ({type(err).__name__}: {err}); a "
                           f"restarted gateway would not keep it. The save is retried every "
                           f"{self.config.rollout.persist_interval_s}s") from None
        return {"event": event, "student_share": self.rollout.share, "shadow_sample_rate": self.rollout.shadow_rate,
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
    """Check what can be checked before any engine starts, and make paths absolute."""
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
    check_rules(config.rollout, task)
    for arm in (config.teacher, config.student):
        if arm.guided_choices and task.answer.type == "labels":
            bad = [c for c in arm.guided_choices if task.label_of(c) is None]
            if bad:
                raise ConfigError(f"guided_choices {bad} do not parse as labels of task {task.name!r}")
    task_source = config.task if (Path(config.task).suffix not in {".yaml", ".yml"}) else _absolute_if_local(
        config.task)
    return config.model_copy(update={
        "task": task_source,
        "api_key": config.api_key or os.environ.get("DISTILL_API_KEY") or None,
        "teacher": config.teacher.model_copy(update={"model": _absolute_if_local(config.teacher.model)}),
        "student": config.student.model_copy(update={"model": _absolute_if_local(config.student.model),
                                                     "adapters": adapters}),
    })


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
    it sees a string and hands over the dict as it is; validating here also names every bad field at once."""
    return application(resolve_config(build_config(ServeConfig, args, "serve application args")))


def application(config: ServeConfig) -> Application:
    """The Serve application for `config` (already passed through `resolve_config`)."""
    from distill.engine import resolve_device

    teacher = _arm(TEACHER_ROLE, config.teacher, config.task, resolve_device(config.teacher.engine.device))
    student = _arm(STUDENT_ROLE, config.student, config.task, resolve_device(config.student.engine.device))
    # One gateway replica: it owns the rollout state (share, windows, stats). It only parses and forwards, so
    # one asyncio replica keeps up with engines that take tens of milliseconds per request or more.
    gateway = Gateway.options(num_replicas=1, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0.25})
    return gateway.bind(config.model_dump(), teacher, student)


def start(config: ServeConfig) -> str:
    """Start (or update) the application on this Ray cluster and return its base URL once every replica is up."""
    from distill.ray_init import init_ray

    config = resolve_config(config)
    init_ray()
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(application(config), name=config.app_name, route_prefix="/")
    return f"http://{config.host}:{config.port}"


def stop(config: ServeConfig) -> None:
    """Delete this application and stop Serve on this (private) cluster. The rollout ends with the application:
    its state actor goes too (a `rollout.state_uri` file stays, for the next `distill serve` of the same student)."""
    serve.delete(config.app_name)
    delete_state_actor(config.app_name)
    serve.shutdown()
