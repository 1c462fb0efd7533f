"""The Serve application: an OpenAI-compatible gateway in front of a teacher arm and a student arm, built and
started here.

    gateway (FastAPI ingress, 1 replica: owns the rollout state; serve/gateway.py)
      ├── teacher  (LLMArm: vLLM AsyncLLM + the task prompt added server-side, autoscaling; serve/arms.py)
      └── student  (LLMArm: vLLM AsyncLLM: the base + LoRA adapters, or the task's adapter merged in; autoscaling)

Models: `teacher`, `student` (the adapter named like the task), every adapter by its own name, and the routed
model (`routed` by default) that A/B-splits between the arms or cascades (`serve/rollout.py`,
`serve/selective.py`). Also GET /v1/models, /stats (JSON), /metrics (Prometheus), /healthz, and for
administrators (`serve/auth.py`) POST /admin/share and /admin/cascade. The rollout state is saved outside the
gateway (`serve/state.py`) and resumed by a restarted gateway replica; teacher answers can be captured as training
data (`serve/capture.py`).

`build_app` is the application builder of `serve run serve.app:build_app` and of a KubeRay RayService
(`import_path` + `args`); `start` is the one `distill serve` uses.

Why plain deployments and not `ray.serve.llm`: its OpenAI app cannot add a task prompt server-side or strip the
teacher's reasoning, its dynamic LoRA loading only reads adapters from cloud URIs (the adapters here are local
PEFT folders from `distill train`), and the A/B split with shadow comparison needs a router of our own anyway.
The engines are the same vLLM `AsyncLLM` that `ray.serve.llm` wraps.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

from ray import serve
from ray.serve import Application

from distill.config import ConfigError, build_config
from distill.engine import adapter_rank, engine_env
from distill.tasks import load_task
from serve.arms import STUDENT_ROLE, TEACHER_ROLE, LLMArm
from serve.auth import check_exposure
from serve.config import ArmConfig, ServeConfig, check_rules
from serve.gateway import Gateway
from serve.selective import proportions, threshold_from_report
from serve.state import delete_state_actor

log = logging.getLogger("distill.serve")


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
    from distill.student_serving import student_artifact

    student = config.student
    serving = student_artifact(student.model, student.adapters, student.serving,
                               resolve_device(student.engine.device), load_task(config.task).name, student.merged_dir)
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
