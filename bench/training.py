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
from distill.models import default_model_dir, sample_data_path
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
    run_script(["-m", "distill.cli", "train", "--data", str(data), "--output", str(out), "--config", str(config)])
    return json.loads((out / "train_summary.json").read_text())


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
    write_result("training", {"rows": rows, "batch_size": batch_size, "distill_train": summary,
                              "baseline": baseline, "ratio": ratio}, table)


if __name__ == "__main__":
    main()
