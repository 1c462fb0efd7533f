"""Serving benchmarks P5 and P6.

P5  served latency p50/p95, student ÷ teacher: the same queries to both arms through Serve, one at a time
    (`distill compare-latency`), same engine settings and hardware.
P5  also under load: the same at concurrency 16, each arm under its own load alone (`order: separate`): the
    student's advantage shows there (the teacher attends over its long prompt in every request of a batch, and
    its KV cache holds fewer requests at once). Goal on CPU: student p50 <= 0.3x the teacher's.
P6  Serve's overhead per request: the teacher's p50 through Serve (HTTP proxy, gateway, engine deployment)
    minus the p50 of the same requests to the same arm class (serve/arms.py `LLMArm`) built in process; and the
    gateway's own time per request at concurrency 16 (its x-distill-gateway-ms header: the handler's time minus
    the arms'), goal <= 5 ms p50.

The student is SmolLM2 trained by `distill train` (default LoRA settings, one epoch over ~100 examples) on the
sample's gold answers, so it answers in the task's format as a distilled student does (an untrained adapter leaves the base
model, which under guided decoding spells a label in many small tokens, and so measures decoding length rather
than the student), then merged into the base (`merge: true`): served as one plain model, the way a single-task
student goes to production. (vLLM's CPU LoRA kernels decode ~11x slower than the base model; the first run, with
an adapter on the base engine, had the student 3.5x slower than the teacher.)
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from bench.common import run_script, verdict, write_result
from bench.training import train_student
from distill.engine import EngineConfig, engine_env
from distill.hardware import cpu_flags, cpu_kind
from distill.local_models import default_model_dir
from distill.metrics import quantile


LOADED_CONCURRENCY = 16


def served_latency(serve_config: dict, out: Path, **measure) -> dict:
    """`distill compare-latency` (it starts Serve with `serve_config` and stops it) in its own process: the
    summary of latency.json (p50/p95, tokens, gateway time per arm)."""
    config = out.with_suffix(".yaml")
    config.write_text(json.dumps({"output": str(out), "serve": serve_config, **measure}))
    run_script(["-m", "pipelines.cli", "compare-latency", "--config", str(config)])
    return json.loads((out / "latency.json").read_text())["summary"]


def main(queries: int = 30, loaded_queries: int = 64) -> None:
    # Both arms and the in-process baseline run the same engine settings, vLLM's default on CPU: one core kept
    # off the model's threads, where its scheduler and here Serve's proxy and gateway run. (With
    # cpu_reserved_cores: 0 on 2 cores, answers came faster, 245 ms served p50 instead of 323, but Serve's
    # processes then compete with the engine's threads: 28 ms overhead instead of 5.)
    engine = {"max_model_len": 2048, "kv_cache_memory_bytes": 256 * 1024**2}
    teacher_arm = {"model": default_model_dir(), "engine": engine}
    with tempfile.TemporaryDirectory() as tmp:
        train_student(Path(tmp), merge=True)
        student = str(Path(tmp) / "train" / "merged")
        serve_config = {"task": "language-id", "port": 8123, "teacher": teacher_arm,
                        "student": {"model": student, "engine": engine}}
        arms = served_latency(serve_config, Path(tmp) / "lone", limit=queries, concurrency=1, warmup=2)
        # A fresh Serve for the loaded run: nothing of the lone run (warm caches, queued work) carries over.
        loaded = served_latency(serve_config, Path(tmp) / "loaded", limit=loaded_queries,
                                concurrency=LOADED_CONCURRENCY, order="separate", warmup=2)
        # The arm's engine environment, which Serve gives its replicas through their runtime_env.
        direct = run_script(["-m", "bench.baselines", "arm-latency", "--rows", str(queries), "--warmup", "2",
                             "--arm", json.dumps(teacher_arm)], env=engine_env(EngineConfig(**engine)))
    p50 = {"teacher": arms["teacher"]["p50_s"], "student": arms["student"]["p50_s"],
           "in_process": quantile(direct["latencies_s"], 0.5)}
    p95 = {"teacher": arms["teacher"]["p95_s"], "student": arms["student"]["p95_s"]}
    tokens = {arm: round(arms[arm]["completion_tokens_mean"], 1) for arm in ("teacher", "student")}
    overhead_ms = 1000 * (p50["teacher"] - p50["in_process"])
    loaded_ratio = loaded["student"]["p50_s"] / loaded["teacher"]["p50_s"]
    # The gateway's own time, over the requests of both arms at that load (each arm's p50 is shown too).
    gateway_ms = max(loaded[arm]["gateway_ms_p50"] for arm in ("teacher", "student"))
    kind = cpu_kind(cpu_flags())  # also in the result's machine facts (bench.common.machine)
    c = LOADED_CONCURRENCY
    table = [
        ("P5 served p50 latency student ÷ teacher", f"{p50['student'] / p50['teacher']:.2f} "
         f"({1000 * p50['student']:.0f} vs {1000 * p50['teacher']:.0f} ms; {tokens['student']} vs "
         f"{tokens['teacher']} answer tokens)", "< 1 (student faster)",
         verdict(p50["student"] / p50["teacher"], 1.0, higher_is_better=False)),
        ("P5 served p95 latency student ÷ teacher", f"{p95['student'] / p95['teacher']:.2f} "
         f"({1000 * p95['student']:.0f} vs {1000 * p95['teacher']:.0f} ms)", "(reference)", ""),
        (f"P5 served p50 latency student ÷ teacher at concurrency {c} ({kind} CPU)",
         f"{loaded_ratio:.2f} ({1000 * loaded['student']['p50_s']:.0f} vs {1000 * loaded['teacher']['p50_s']:.0f} "
         f"ms)", "≤ 0.3", verdict(loaded_ratio, 0.3, higher_is_better=False)),
        (f"P5 served p95 latency student ÷ teacher at concurrency {c}",
         f"{loaded['student']['p95_s'] / loaded['teacher']['p95_s']:.2f} ({1000 * loaded['student']['p95_s']:.0f} "
         f"vs {1000 * loaded['teacher']['p95_s']:.0f} ms)", "(reference)", ""),
        ("P6 Serve overhead per request (p50)", f"{overhead_ms:.1f} ms ({1000 * p50['teacher']:.0f} ms served vs "
         f"{1000 * p50['in_process']:.0f} ms in process)", "≤ 10 ms",
         # Serve cannot be faster than the engine it wraps: a negative figure means the baseline is not like for like.
         "INVALID (baseline slower)" if overhead_ms < 0 else verdict(overhead_ms, 10, higher_is_better=False)),
        (f"P6 gateway's own time per request at concurrency {c} (p50)",
         f"{gateway_ms:.2f} ms (teacher requests {loaded['teacher']['gateway_ms_p50']:.2f}, student "
         f"{loaded['student']['gateway_ms_p50']:.2f})", "≤ 5 ms", verdict(gateway_ms, 5, higher_is_better=False)),
    ]
    write_result("serving", {"queries": queries, "p50_s": p50, "p95_s": p95,
                             "serve_overhead_ms": overhead_ms, "served": arms, "in_process": direct,
                             "loaded": {"concurrency": c, "queries": loaded_queries, "served": loaded,
                                        "student_teacher_p50_ratio": loaded_ratio, "gateway_ms_p50": gateway_ms}},
                  table)


if __name__ == "__main__":
    main()
