"""Config of `distill serve`: the two arms, the rollout, the HTTP front. Every field is documented; YAML keys that
do not exist are errors (see distill/config.py)."""

from __future__ import annotations

from typing import Optional

from pydantic import Field, field_validator, model_validator

from distill.config import StrictModel
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
        None, description="Bearer token every request must carry (401 without it); default: $DISTILL_API_KEY, "
        "none if that is unset.")
    routed_model: str = Field("routed", description="Model name that A/B-splits between teacher and student.")
    max_request_bytes: int = Field(1024**2, ge=1024, description="Larger request bodies are refused with 413.")
    request_timeout_s: float = Field(120.0, gt=0, description="A request waiting longer on an engine gets 504.")
    teacher: TeacherArmConfig = Field(default_factory=TeacherArmConfig, description="The prompted teacher.")
    student: StudentArmConfig = Field(default_factory=StudentArmConfig, description="The LoRA student.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="A/B split, shadow and rollback.")

    @model_validator(mode="after")
    def _names(self) -> "ServeConfig":
        reserved = {TEACHER_MODEL, STUDENT_MODEL, self.routed_model}
        if self.routed_model in {TEACHER_MODEL, STUDENT_MODEL}:
            raise ValueError(f"routed_model must differ from {TEACHER_MODEL!r} and {STUDENT_MODEL!r}")
        clash = reserved & set(self.student.adapters)
        if clash:
            raise ValueError(f"student.adapters: names {sorted(clash)} are reserved model names")
        return self
