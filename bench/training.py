"""Training benchmark P4: tokens/s of `distill train` (packed, FSDP2 LoRA on Ray Train) ÷ a padded
single-process peft loop on the same examples, model, LoRA settings and batch size (bench/baselines.py train).

The examples are the bundled sample with its gold labels as the answers: throughput depends on the token
lengths, not on who wrote the answers.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import run_script, verdict, write_result
from distill.formats import DATA_SCHEMA
from distill.local_models import default_model_dir, sample_data_path
from distill.tasks import TaskSpec, load_task


def write_examples(folder: Path, rows: int) -> Path:
    """`rows` examples drawn at random (seeded) from the sample, in one Parquet file in that order."""
    task = load_task("language-id")
    lines = sample_data_path().read_text(encoding="utf-8").splitlines()
    random.Random(0).shuffle(lines)
    examples = []
    for line in lines[:rows]:
        r = json.loads(line)
        answer = task.answer.template.format(label=r["label"])
        examples.append({"id": r["id"], "text": r["text"], "messages": TaskSpec.student_messages(r["text"], answer),
                         "answer": answer, "label": r["label"], "gold": r["label"], "task": task.name,
                         "teacher": "gold labels"})
    (folder / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(examples, schema=DATA_SCHEMA), folder / "data" / "part-0.parquet")
    return folder


def train_student(folder: Path, rows: int = 104, batch_size: int = 8, merge: bool = False) -> dict:
    """`distill train` of SmolLM2 (default LoRA settings) for one epoch over `rows` examples of the sample with
    their gold answers, one worker on all cores; its train_summary."""
    data = write_examples(folder / "gen", rows)
    config = folder / "train.yaml"
    config.write_text(json.dumps({
        "workers": 1, "cpus_per_worker": os.cpu_count() or 1, "per_device_batch_size": batch_size,
        "gradient_accumulation": 1, "learning_rate": 1e-3, "max_length": 1024, "validation_limit": 8,
        "merge": merge}))
    out = folder / "train"
    run_script(["-m", "pipelines.cli", "train", "--data", str(data), "--output", str(out), "--config", str(config)])
    return json.loads((out / "train_summary.json").read_text())


# One rank of a sharded student build (distill.student_model.build_sharded_student, what every Ray Train worker runs):
# its resident memory after imports, and its peak once the model is built and has run one forward pass.
SHARDED_BUILD = """
import json, os, resource, sys
import torch, torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy
from distill.student_model import build_sharded_student

def rss_gib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024**2

dist.init_process_group("gloo")
torch.set_num_threads(1)
before = rss_gib()
model, _ = build_sharded_student(sys.argv[1], "all-linear", 32, 32, 0.0, 0, torch.bfloat16, torch.device("cpu"),
                                 "sdpa", False, MixedPrecisionPolicy())
with torch.no_grad():
    model(input_ids=torch.arange(64).unsqueeze(0))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
print("BENCH_RANK " + json.dumps({"rank": dist.get_rank(), "before_gib": before, "peak_gib": peak,
                                  "local_params": local}), flush=True)
dist.destroy_process_group()
"""


def sharded_build_memory(model_dir: str, world: int) -> list[dict]:
    """Per rank of a `world`-rank gloo group building the student sharded: RSS before the build, peak after."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", SHARDED_BUILD, model_dir], text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              env={**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_PORT": str(port),
                                   "MASTER_ADDR": "127.0.0.1"})
             for rank in range(world)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("sharded build failed:\n" + "\n".join(o[-3000:] for o in outs))
    return [json.loads(line[len("BENCH_RANK "):]) for o in outs for line in o.splitlines()
            if line.startswith("BENCH_RANK ")]


def memory_figure(model_dir: str) -> tuple[dict, tuple[str, str, str, str]]:
    """Peak host memory per worker for the model's share (peak minus what the process held before the build),
    with 1 and 2 workers on the same model (bf16 base, as on GPUs)."""
    one, two = sharded_build_memory(model_dir, 1), sharded_build_memory(model_dir, 2)
    share = {n: max(r["peak_gib"] - r["before_gib"] for r in ranks) for n, ranks in ((1, one), (2, two))}
    ratio = share[2] / share[1]
    row = ("peak host memory per worker for the model, 2 workers ÷ 1 (sharded build, SmolLM2 bf16)",
           f"{ratio:.2f}× ({share[2] * 1024:.0f} vs {share[1] * 1024:.0f} MiB over the process's "
           f"{one[0]['before_gib'] * 1024:.0f} MiB of imports)", "≤ 0.6×", verdict(ratio, 0.6, higher_is_better=False))
    return {"one_worker": one, "two_workers": two, "model_share_gib": share, "ratio": ratio}, row


# The machine's dense matrix-multiply peak in the training precision, every core: what MFU is measured against.
MATMUL_PEAK = """
import json, sys, time, torch
dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[sys.argv[1]]
n = 2048
a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
for _ in range(3):
    a @ b
best = 0.0
for _ in range(5):
    t0, reps = time.perf_counter(), 0
    while time.perf_counter() - t0 < 1.0:
        a @ b
        reps += 1
    best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
print("BENCH_PEAK " + json.dumps({"flops": best, "threads": torch.get_num_threads(), "n": n}), flush=True)
"""


def matmul_peak(precision: str) -> dict:
    """The best FLOP/s of 2048x2048 matmuls in `precision` (bf16 or fp32) over five 1-second windows, in a fresh
    process with torch's default threads (all cores)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", MATMUL_PEAK, precision], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("BENCH_PEAK "))[len("BENCH_PEAK "):])


def model_flops_utilization(summary: dict, params: int, peak: dict) -> dict:
    """MFU of LoRA training: per token, the forward (2N), the backward through the frozen base to reach the
    adapters of earlier layers (2N; no weight gradients of the base), and the forward again when gradient
    checkpointing recomputes it (2N); the adapters' own FLOPs (<1 % of N here) are left out. Tokens are the
    packed tokens trained per second (padding excluded)."""
    per_token = (6 if summary.get("gradient_checkpointing") else 4) * params
    achieved = per_token * summary["tokens_per_s"]
    return {"flops_per_token": per_token, "achieved_flops": achieved, "peak_flops": peak["flops"],
            "mfu": achieved / peak["flops"], "params": params}


def main(rows: int = 104, batch_size: int = 8) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        summary = train_student(Path(tmp), rows, batch_size)
        # The baseline: the same examples (all of them, the validation ones too) in file order, same batch size.
        baseline = run_script(["-m", "bench.baselines", "train", "--model", default_model_dir(),
                               "--steps", str(math.ceil(rows / batch_size)), "--batch-size", str(batch_size),
                               "--data", str(Path(tmp) / "gen" / "data" / "part-0.parquet")])
    ratio = summary["tokens_per_s"] / baseline["tokens_per_s"]
    table = [("P4 training tokens/s: distill train ÷ padded single-process loop",
              f"{ratio:.2f}× ({summary['tokens_per_s']:.0f} vs {baseline['tokens_per_s']:.0f} tokens/s; padding "
              f"waste {summary['padding_waste']:.0%} packed vs {summary['padding_waste_unpacked']:.0%} padded; "
              f"{summary['precision']})", "≥ 3×", verdict(ratio, 3))]
    from distill.model_facts import model_facts

    peak = matmul_peak(summary["precision"])
    mfu = model_flops_utilization(summary, model_facts(default_model_dir()).params, peak)
    table.append(("training MFU: model FLOPs per second ÷ this machine's measured matmul peak",
                  f"{mfu['mfu']:.1%} ({mfu['achieved_flops'] / 1e9:.0f} of {peak['flops'] / 1e9:.0f} GFLOP/s "
                  f"{summary['precision']} on {peak['threads']} threads; {mfu['flops_per_token'] / 1e9:.2f} "
                  "GFLOP per token)", "reported", "—"))
    memory, row = memory_figure(default_model_dir())
    table.append(row)
    write_result("training", {"rows": rows, "batch_size": batch_size, "distill_train": summary,
                              "baseline": baseline, "ratio": ratio, "mfu": mfu, "memory_per_worker": memory}, table)


if __name__ == "__main__":
    main()
