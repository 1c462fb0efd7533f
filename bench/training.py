"""Training benchmark P4: tokens/s of `distill train` (packed, FSDP2 LoRA on Ray Train) ÷ a padded
single-process peft loop on the same examples, model, LoRA settings and batch size (bench/baselines.py train).

The examples are the bundled sample with its gold labels as the answers: throughput depends on the token
lengths, not on who wrote the answers.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import run_script, verdict, write_result
from distill.formats import DATA_SCHEMA
from distill.models import default_model_dir, sample_data_path
from distill.tasks import TaskSpec, load_task


def write_examples(folder: Path) -> Path:
    task = load_task("language-id")
    rows = []
    for line in sample_data_path().read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        answer = task.answer.template.format(label=r["label"])
        rows.append({"id": r["id"], "text": r["text"], "messages": TaskSpec.student_messages(r["text"], answer),
                     "answer": answer, "label": r["label"], "gold": r["label"], "task": task.name,
                     "teacher": "gold labels"})
    (folder / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=DATA_SCHEMA), folder / "data" / "part-0.parquet")
    return folder


def main(steps: int = 12, batch_size: int = 8) -> None:
    model = default_model_dir()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_examples(Path(tmp) / "gen")
        config = Path(tmp) / "train.yaml"
        config.write_text(json.dumps({
            "workers": 1, "cpus_per_worker": 2, "per_device_batch_size": batch_size, "gradient_accumulation": 1,
            "max_steps": steps, "learning_rate": 1e-3, "max_length": 1024, "validation_limit": 8,
            "eval_every": steps, "checkpoint_every": steps}))
        out = Path(tmp) / "train"
        run_script(["-m", "distill.cli", "train", "--data", str(data), "--output", str(out), "--config", str(config)])
        summary = json.loads((out / "train_summary.json").read_text())
        baseline = run_script(["-m", "bench.baselines", "train", "--model", model, "--steps", str(steps),
                               "--batch-size", str(batch_size), "--data", str(data / "data" / "part-0.parquet")])
    ratio = summary["tokens_per_s"] / baseline["tokens_per_s"]
    table = [("P4 training tokens/s: distill train ÷ padded single-process loop",
              f"{ratio:.2f}× ({summary['tokens_per_s']:.0f} vs {baseline['tokens_per_s']:.0f} tokens/s; padding "
              f"waste {summary['padding_waste']:.0%} packed vs {summary['padding_waste_unpacked']:.0%} padded)",
              "≥ 3×", verdict(ratio, 3))]
    write_result("training", {"steps": steps, "batch_size": batch_size, "distill_train": summary,
                              "baseline": baseline, "ratio": ratio}, table)


if __name__ == "__main__":
    main()
