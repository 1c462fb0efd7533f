"""Serving benchmarks P5 and P6.

P5  served latency p50/p95, student ÷ teacher: the same queries to both arms through Serve, one at a time
    (`distill compare-latency`), same engine settings and hardware.
P6  Serve's overhead per request: the teacher's p50 through Serve (HTTP proxy, gateway, engine deployment)
    minus the p50 of the same requests to the same arm class (serve/arms.py `LLMArm`) built in process.

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
from distill.models import default_model_dir
from serve.router import quantile


def main(queries: int = 30) -> None:
    # Both arms and the in-process baseline run the same engine settings, vLLM's default on CPU: one core kept
    # off the model's threads, where its scheduler and here Serve's proxy and gateway run. (With
    # cpu_reserved_cores: 0 on 2 cores, answers came faster, 245 ms served p50 instead of 323, but Serve's
    # processes then compete with the engine's threads: 28 ms overhead instead of 5.)
    engine = {"max_model_len": 2048, "kv_cache_memory_bytes": 256 * 1024**2}
    teacher_arm = {"model": default_model_dir(), "engine": engine}
    with tempfile.TemporaryDirectory() as tmp:
        train_student(Path(tmp), merge=True)
        student = str(Path(tmp) / "train" / "merged")
        config = Path(tmp) / "latency.yaml"
        out = Path(tmp) / "latency"
        config.write_text(json.dumps({
            "limit": queries, "concurrency": 1, "warmup": 2, "output": str(out),
            "serve": {"task": "language-id", "port": 8123, "teacher": teacher_arm,
                      "student": {"model": student, "engine": engine}}}))
        run_script(["-m", "distill.cli", "compare-latency", "--config", str(config)])
        served = json.loads((out / "latency.json").read_text())
        # The arm's engine environment, which Serve gives its replicas through their runtime_env.
        direct = run_script(["-m", "bench.baselines", "arm-latency", "--rows", str(queries), "--warmup", "2",
                             "--arm", json.dumps(teacher_arm)], env=engine_env(EngineConfig(**engine)))
    arms = served["summary"]  # p50/p95 and token counts per arm (serve/latency.py)
    p50 = {"teacher": arms["teacher"]["p50_s"], "student": arms["student"]["p50_s"],
           "in_process": quantile(direct["latencies_s"], 0.5)}
    p95 = {"teacher": arms["teacher"]["p95_s"], "student": arms["student"]["p95_s"]}
    tokens = {arm: round(arms[arm]["completion_tokens_mean"], 1) for arm in ("teacher", "student")}
    overhead_ms = 1000 * (p50["teacher"] - p50["in_process"])
    table = [
        ("P5 served p50 latency student ÷ teacher", f"{p50['student'] / p50['teacher']:.2f} "
         f"({1000 * p50['student']:.0f} vs {1000 * p50['teacher']:.0f} ms; {tokens['student']} vs "
         f"{tokens['teacher']} answer tokens)", "< 1 (student faster)",
         verdict(p50["student"] / p50["teacher"], 1.0, higher_is_better=False)),
        ("P5 served p95 latency student ÷ teacher", f"{p95['student'] / p95['teacher']:.2f} "
         f"({1000 * p95['student']:.0f} vs {1000 * p95['teacher']:.0f} ms)", "(reference)", ""),
        ("P6 Serve overhead per request (p50)", f"{overhead_ms:.1f} ms ({1000 * p50['teacher']:.0f} ms served vs "
         f"{1000 * p50['in_process']:.0f} ms in process)", "≤ 10 ms",
         # Serve cannot be faster than the engine it wraps: a negative figure means the baseline is not like for like.
         "INVALID (baseline slower)" if overhead_ms < 0 else verdict(overhead_ms, 10, higher_is_better=False)),
    ]
    write_result("serving", {"queries": queries, "p50_s": p50, "p95_s": p95, "serve_overhead_ms": overhead_ms,
                             "served": served["summary"], "in_process": direct}, table)


if __name__ == "__main__":
    main()
