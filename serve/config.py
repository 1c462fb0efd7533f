"""Config of `distill serve`: the two arms, the rollout, the HTTP front. Every field is documented; YAML keys that
do not exist are errors (see distill/config.py)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from distill.config import StrictModel
from distill.cost import CostConfig
from distill.engine import EngineConfig
from distill.models import default_model_dir
from serve.router import RolloutConfig

TEACHER_MODEL, STUDENT_MODEL = "teacher", "student"


class ArmConfig(StrictModel):
    min_replicas: int = Field(1, ge=0, description="Engine replicas Serve keeps up (autoscaling lower bound).")
    max_replicas: int = Field(1, ge=1, description="Engine replicas Serve may scale up to (autoscaling).")
    target_ongoing_requests: float = Field(
        16, gt=0, description="Requests in flight per replica the autoscaler aims for before adding a replica.")
    max_ongoing_requests: int = Field(
        64, ge=1, description="Requests one replica accepts at once; vLLM batches them, so keep it well above 1.")
    guided: Optional[bool] = Field(
        None, description="Constrain decoding to the task's canonical answers (label tasks only). Default: the "
        "task's teacher.constrained.")
    guided_choices: Optional[list[str]] = Field(
        None, description="Answers guided decoding allows on this arm instead of all canonical answers.")
    temperature: Optional[float] = Field(
        None, ge=0.0, le=2.0, description="Default temperature when a request gives none (default: the task's).")
    max_tokens: Optional[int] = Field(
        None, ge=1, description="max_tokens of a request that gives none (default: the task's).")
    engine: EngineConfig = Field(
        default_factory=lambda: EngineConfig(max_model_len=2048, kv_cache_memory_bytes=256 * 1024**2),
        description="vLLM engine settings (device, max_model_len, kv_cache_memory_bytes, dtype, engine_kwargs, "
        "cpus_per_engine, tensor_parallel_size, cpu_reserved_cores, env...). The Ray Data batching fields do not "
        "apply to serving.")

    @model_validator(mode="after")
    def _bounds(self) -> "ArmConfig":
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self


class TeacherArmConfig(ArmConfig):
    model: str = Field(default_model_dir(), description="Teacher model folder (or hub name).")


class StudentArmConfig(ArmConfig):
    model: str = Field(default_model_dir(), description="The student's base model folder (the one it was trained "
                       "from); adapters are applied on top of it.")
    adapters: dict[str, str] = Field(
        default_factory=dict, description="LoRA adapters (PEFT folders) served on the one base engine, by name. "
        "The model `student` is the adapter named like the task; every adapter is also served under its name.")
    serving: Literal["auto", "merged", "lora"] = Field(
        "auto", description="How the engine serves the task's adapter. auto: merged when it is the only adapter "
        "and the engine runs on CPU (vLLM's CPU build has no fast LoRA path, and none at all for mixture-of-experts "
        "models), LoRA otherwise (several adapters on one base, GPUs). merged: fold the one adapter into the base "
        "at start-up (once: cached, see merged_dir). lora: the base + the adapters through vLLM's LoRA.")
    merged_dir: Optional[str] = Field(
        None, description="Where the merged student is cached (folder or URI every node reads). Default: beside "
        "the adapter, `<adapter>-merged`. Reused while its marker names the same base and adapter contents.")

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not name or any(c.isspace() for c in name):
                raise ValueError(f"adapter name {name!r} must be non-empty and contain no whitespace")
        return v


class ServeConfig(StrictModel):
    task: str = Field("language-id", description="Built-in task name or task YAML: the teacher's prompt (added "
                      "server-side) and how answers are compared.")
    host: str = Field("127.0.0.1", description="HTTP host; 127.0.0.1 keeps the service off the network.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    app_name: str = Field("distill", description="Ray Serve application name.")
    api_key: Optional[str] = Field(
        None, description="Bearer token of the clients: /v1/*, /stats and /metrics need it (401 without it); "
        "default: $DISTILL_API_KEY, none if that is unset. It cannot administer (403 on /admin/*).")
    admin_keys: dict[str, str] = Field(
        default_factory=dict, description="Administration keys by name (the event log records the name of the key "
        "that changed what): /admin/* needs one of them. Default: {DISTILL_ADMIN_KEY: $DISTILL_ADMIN_KEY} if set. "
        "With client keys but no admin key, /admin/* is off (403). With no keys at all (loopback only), "
        "everything is open.")
    insecure_no_auth: bool = Field(
        False, description="INSECURE: listen on a non-loopback host without an API key, so that anyone who can "
        "reach it can use (and, without admin keys, administer) the service. Without it such a start is refused.")
    routed_model: str = Field("routed", description="Model name that A/B-splits between teacher and student.")
    max_request_bytes: int = Field(1024**2, ge=1024, description="Larger request bodies are refused with 413.")
    request_timeout_s: float = Field(120.0, gt=0, description="A request waiting longer on an engine gets 504.")
    teacher: TeacherArmConfig = Field(default_factory=TeacherArmConfig, description="The prompted teacher.")
    student: StudentArmConfig = Field(default_factory=StudentArmConfig, description="The LoRA student.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="A/B split or cascade, shadow, "
                                   "rollback and drift.")
    capture: Optional[str] = Field(
        None, description="Folder or URI that keeps every teacher answer of the routed model (its teacher share, "
        "cascade fallbacks, shadow comparisons) with its query as training data: CAPTURE/data/*.parquet in the "
        "generation data format, each query once (serve/capture.py). `distill train --data CAPTURE` reads it. "
        "null: off.")
    capture_rows_per_shard: int = Field(1000, ge=1, description="Captured rows per Parquet shard at most.")
    capture_flush_seconds: float = Field(
        60.0, gt=0, description="A captured row is in a shard at most this long after its answer.")
    cost: CostConfig = Field(default_factory=CostConfig, description="Prices per million tokens (distill.cost, "
                             "as in the evaluation report) for the routed model's cost and savings in /stats.")

    @model_validator(mode="after")
    def _names(self) -> "ServeConfig":
        reserved = {TEACHER_MODEL, STUDENT_MODEL, self.routed_model}
        if self.routed_model in {TEACHER_MODEL, STUDENT_MODEL}:
            raise ValueError(f"routed_model must differ from {TEACHER_MODEL!r} and {STUDENT_MODEL!r}")
        clash = reserved & set(self.student.adapters)
        if clash:
            raise ValueError(f"student.adapters: names {sorted(clash)} are reserved model names")
        keys = [k for k in self.admin_keys.values()]
        if any(not k for k in keys) or (self.api_key and self.api_key in keys):
            raise ValueError("admin_keys must be non-empty and differ from api_key: a client key must not "
                             "administer")
        return self
