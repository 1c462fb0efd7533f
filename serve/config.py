"""Config of `distill serve`: the two arms, the rollout, the HTTP front. Every field is documented; YAML keys that
do not exist are errors (see distill/config.py)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from distill.config import ConfigError, StrictModel
from distill.cost import CostConfig
from distill.engine import EngineConfig
from distill.local_models import default_model_dir
from distill.tasks import TaskSpec
from serve.selective import CASCADE, CascadeConfig, DriftConfig, check_threshold

TEACHER_MODEL, STUDENT_MODEL = "teacher", "student"


class RolloutConfig(StrictModel):
    student_share: float = Field(
        0.01, ge=0.0, le=1.0, description="Fraction of the routed model's traffic the student serves at start "
        "(staged rollout: 0.01 -> 0.1 -> 0.5 -> 1.0; change it at runtime with POST /admin/share). A gateway "
        "that finds persisted state for the same task, teacher, student and adapter resumes from that instead.")
    sticky: bool = Field(True, description="Requests that carry a user id always get the same arm for a share.")
    user_header: str = Field("x-user-id", description="Header read for the user id when the body has no `user`.")
    shadow_sample_rate: float = Field(
        0.1, ge=0.0, le=1.0, description="Fraction of student-served routed requests also sent to the teacher "
        "in the background to measure live agreement (0: shadow off).")
    max_shadow_in_flight: int = Field(
        8, ge=1, description="Shadow requests waiting on the teacher at once; more are skipped (and counted) so "
        "that shadowing never queues up behind production traffic.")
    error_window: int = Field(200, ge=1, description="Routed student requests the error rate is computed over.")
    min_error_samples: int = Field(
        20, ge=1, description="Routed student requests needed in the window before errors can trigger a rollback.")
    max_error_rate: Optional[float] = Field(
        0.05, ge=0.0, le=1.0, description="Roll back when the fraction of failed routed student requests over the "
        "window exceeds this. Failed: a 5xx from the student (engine failure, replica lost, timeout) or, for "
        "label tasks, an answer that names no label. 4xx (the client's fault) and client disconnects do not "
        "count either way. null turns the rule off.")
    agreement_window: int = Field(
        200, ge=1, description="Judged shadow comparisons that live agreement and similarity are computed over.")
    min_agreement_samples: int = Field(
        50, ge=1, description="Comparisons needed in the window before agreement or similarity can trigger a "
        "rollback.")
    min_agreement: Optional[float] = Field(
        0.9, ge=0.0, le=1.0, description="Label tasks: roll back when the fraction of shadow comparisons whose "
        "labels agree falls below this; null turns the rule off. Free-text tasks refuse it: exact agreement of "
        "free text is rare between two good answers (use min_similarity).")
    min_similarity: Optional[float] = Field(
        None, ge=0.0, le=1.0, description="Free-text tasks: roll back when the mean ROUGE-L F1 of the student's "
        "answers to the teacher's (distill.agreement, as in the evaluation report) over the window falls below "
        "this. Default null: no agreement rule for free text, since paraphrases of one answer share few words and "
        "a fair limit depends on the task; set it from the report's similarity of a student you accept. Label "
        "tasks refuse it (use min_agreement).")
    latency_window: int = Field(
        200, ge=1, description="Routed student requests its rollback p95 latency is computed over.")
    min_latency_samples: int = Field(
        20, ge=1, description="Routed student requests needed in the window before latency can trigger a rollback.")
    max_student_p95_s: Optional[float] = Field(
        10.0, gt=0, description="Roll back when the student's p95 latency (seconds, end to end at the gateway) "
        "exceeds this; null turns the latency rule off.")
    stats_window: int = Field(2048, ge=16, description="Latencies per arm kept for the p50/p95 in /stats.")
    max_events: int = Field(100, ge=1, description="Rollout events (share changes, rollbacks) kept for /stats.")
    state_uri: Optional[str] = Field(
        None, description="Where the rollout state (share, stage, windows, events) is persisted so that a "
        "restarted gateway resumes it. null: a detached Ray actor on the head node, named after the application; "
        "it survives gateway restarts and in-place Serve upgrades, not a new cluster. A path or s3:// / gs:// URI "
        "of a JSON file survives those too (a RayService upgrade that replaces the cluster).")
    persist_interval_s: float = Field(
        2.0, gt=0, description="Seconds between saves of window updates; share changes and rollbacks are saved "
        "at once.")
    mode: Literal["split", "cascade"] = Field(
        "split", description="split: the student's share of the routed traffic is answered by the student. "
        "cascade: that share asks the student first and, when its confidence is below cascade.threshold, sends "
        "the same request on to the teacher and returns the teacher's answer. Changeable at runtime (POST "
        "/admin/cascade); a resumed rollout keeps the mode it had.")
    cascade: CascadeConfig = Field(default_factory=CascadeConfig, description="The cascade's threshold.")
    drift: DriftConfig = Field(default_factory=DriftConfig, description="Drift of the live labels and deferral "
                               "rate against the training data and the report.")


def check_rules(config: RolloutConfig, task: TaskSpec) -> None:
    """Refuse agreement limits and cascade thresholds that do not fit the task's answers, and a cascade without
    a threshold (a ConfigError, before any engine starts; run after cascade.threshold_from is read)."""
    if config.cascade.threshold is not None:
        try:
            check_threshold(task, config.cascade.threshold)
        except ValueError as err:
            raise ConfigError(f"rollout.cascade.threshold: {err}") from None
    elif config.mode == CASCADE:
        raise ConfigError("rollout.mode cascade needs a threshold: set rollout.cascade.threshold, or "
                          "rollout.cascade.threshold_from to the report.json of `distill eval`")
    if task.answer.type == "labels" and config.min_similarity is not None:
        raise ConfigError(f"rollout.min_similarity applies to free-text tasks; {task.name!r} has labels: use "
                          f"rollout.min_agreement")
    if task.answer.type != "labels" and "min_agreement" in config.model_fields_set:
        raise ConfigError(f"rollout.min_agreement applies to label tasks; {task.name!r} answers in free text, "
                          f"where exact agreement is rare between two good answers: use rollout.min_similarity")


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
        None, ge=1, description="max_tokens of a request that gives none (default: the task's). It bounds the "
        "visible answer: a thinking teacher also gets the task's reasoning budget (teacher.reasoning_tokens) "
        "before it.")
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
