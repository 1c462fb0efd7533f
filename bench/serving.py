"""Serving benchmarks P5 and P6.

P5  served latency p50/p95, student ÷ teacher: the same queries to both arms through Serve, one at a time
    (`distill compare-latency`), same engine settings and hardware.
P6  Serve's overhead per request: the teacher's p50 through Serve (HTTP proxy, gateway, engine deployment)
    minus the p50 of the same requests to an in-process vLLM engine with the same settings.

The student is SmolLM2 with a rank-32 all-linear LoRA adapter (freshly initialised, B perturbed so it is not a
no-op: latency depends on the adapter's shape, not on what it learned), served as `distill serve` serves it.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from bench.common import run_script, verdict, write_result
from distill.models import default_model_dir


def make_adapter(folder: Path) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    model.save_pretrained(folder)
    return str(folder)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(queries: int = 30) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        adapter = make_adapter(Path(tmp) / "adapter")
        config = Path(tmp) / "latency.yaml"
        out = Path(tmp) / "latency"
        config.write_text(json.dumps({
            "limit": queries, "concurrency": 1, "warmup": 2, "output": str(out),
            "serve": {"task": "language-id", "port": 8123, "teacher": {"model": default_model_dir()},
                      "student": {"model": default_model_dir(), "adapters": {"language-id": adapter}}}}))
        run_script(["-m", "distill.cli", "compare-latency", "--config", str(config)])
        served = json.loads((out / "latency.json").read_text())
        direct = run_script(["-m", "bench.baselines", "vllm-latency", "--model", default_model_dir(),
                             "--rows", str(queries)])
    teacher = [r["latency_s"] for r in served["requests"]["teacher"] if r["status"] == 200]
    student = [r["latency_s"] for r in served["requests"]["student"] if r["status"] == 200]
    p50 = {"teacher": statistics.median(teacher), "student": statistics.median(student),
           "in_process": statistics.median(direct["latencies_s"])}
    p95 = {"teacher": quantile(teacher, 0.95), "student": quantile(student, 0.95)}
    overhead_ms = 1000 * (p50["teacher"] - p50["in_process"])
    table = [
        ("P5 served p50 latency student ÷ teacher", f"{p50['student'] / p50['teacher']:.2f} "
         f"({1000 * p50['student']:.0f} vs {1000 * p50['teacher']:.0f} ms)", "< 1 (student faster)",
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
