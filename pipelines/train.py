"""Train: the student learns to answer like the teacher, without the prompt (LoRA on Ray Train, FSDP2).

    distill train --data runs/gen --output runs/train [--student MODEL_DIR] [--workers N] [--config YAML]

1. Prepare (driver): read `DATA/data`, split by id hash into train/validation (`OUT/split.parquet`), tokenize
   with the student's chat template (targets on the assistant answer only; bad rows skipped and counted), plan
   every optimizer step, and write each worker's examples, in training order, to its own Parquet shard
   (`OUT/_tokens`): workers stream their shard, nobody receives the whole set.
2. Train (Ray Train `TorchTrainer`, N workers): the student built on the meta device and sharded with FSDP2
   before any weight is read, each rank reading only its rows of the checkpoint (`distill.student_model`); LoRA on
   every linear layer and on fused MoE expert weights. Packed micro-batches (no padding, no cross-example
   attention). Every `eval_every` steps: validation loss and, for label tasks, agreement with the teacher's
   held-out labels decoded greedily by the workers' own model; the best checkpoint by agreement (or loss) is
   kept, and training may stop early when it stops improving. A lost worker resumes from the last checkpoint
   (`FailureConfig`); rerunning the command resumes the same Ray Train run from `OUT/checkpoints`.
3. Export (driver): the chosen checkpoint's adapter to `OUT/adapter` (PEFT: loads in peft and vLLM), optionally
   the merged student to `OUT/merged` (merged by a Ray task on a worker node), `OUT/train_summary.json`.

OUT may be local or a pyarrow filesystem URI (s3://, gs://, ...) that every node reaches. The steps are in
distill.train.data (1), distill.train.loop (2, 3) and distill.train.onpolicy (method on-policy).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from distill.checkpoints import AttemptClock, read_metrics
from distill.config import ConfigError, check_settings
from distill.storage import join, read_json, resolve, write_json
from distill.train.config import RERUN_FREE, TrainConfig

log = logging.getLogger("distill.train")


def main(config: TrainConfig) -> dict[str, Any]:
    import ray
    from transformers import AutoTokenizer

    from distill.hardware import cluster_cpu_flags, cpu_kind, training_precision
    from distill.train.onpolicy import train_rounds
    from distill.ray_init import init_ray
    from distill.tasks import task_of_data
    from distill.train.data import prepare
    from distill.train.loop import Placement, export, fit, train_summary

    out = config.output
    check_rerun(config)  # before anything is reused: a finished run with other settings is an error, not a skip
    existing = read_json(join(out, "train_summary.json"))
    if existing is not None and existing.get("complete"):
        log.info("%s is complete already (%d steps); nothing to do", out, existing["steps"])
        return existing
    fs, out_path = resolve(out)
    with AttemptClock(out):
        t0 = time.monotonic()
        # 1. Prepare
        tokenizer = AutoTokenizer.from_pretrained(config.student)
        task = task_of_data(config.data)
        prepared = prepare(config, tokenizer, fs, out_path)
        select_by = config.select_by if config.select_by != "auto" else (
            "agreement" if task is not None and task.answer.type == "labels" and prepared.examples["validation"]
            else "loss")
        log.info("split %s, training on %d examples in %d steps; skipped %s; padding waste %.1f%% (%.1f%% "
                 "unpacked); soft labels %s; best checkpoint by %s", prepared.split, prepared.examples["train"],
                 prepared.steps, prepared.skipped or "none", 100 * prepared.padding_waste,
                 100 * prepared.padding_waste_unpacked, prepared.soft_labels, select_by)
        init_ray()
        use_gpu = config.device == "gpu" or (config.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
        flags = cluster_cpu_flags()
        precision = training_precision(config.precision, use_gpu, flags)
        log.info("training precision %s (setting %s; %s, CPU kind %s)", precision, config.precision,
                 "GPU" if use_gpu else "CPU", cpu_kind(flags))
        placement = Placement(use_gpu, precision, tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                              else tokenizer.eos_token_id)
        # 2. Train and 3. export: one Ray Train run, or one per on-policy round
        if config.method == "sft":
            exported = export(config, fit(config, prepared, task, select_by, placement), placement)
            rounds = None
        else:
            exported, rounds = train_rounds(config, tokenizer, task, prepared, select_by, placement)
        metrics = read_metrics(join(out, "metrics.jsonl"))
        wall_this_run = round(time.monotonic() - t0, 3)
    # After the clock has recorded this attempt: the summary's wall time counts every attempt.
    summary = train_summary(config, prepared, exported, rounds, metrics, select_by, use_gpu, precision, flags,
                            wall_this_run)
    write_json(join(out, "train_summary.json"), summary)
    log.info("trained %d steps: loss %.4f, val loss %s, val agreement %s, %.0f tokens/s; adapter %s",
             summary["steps"], summary["final_loss"], summary["final_val_loss"], summary["final_val_agreement"],
             summary["tokens_per_s"] or 0, summary["adapter"])
    return summary


def check_rerun(config: TrainConfig) -> None:
    """A rerun into the same OUT resumes (or finds it complete); it must then train the same thing."""
    settings = {k: v for k, v in config.model_dump().items() if k not in RERUN_FREE}
    # Workers and accumulation may change between attempts; the examples per optimizer step may not.
    settings["global_batch"] = config.per_device_batch_size * config.gradient_accumulation * config.workers
    check_settings(join(config.output, "train_run.json"), settings, "a training run")


def add_cli(subparsers) -> None:
    from distill.config import add_config_arguments

    p = subparsers.add_parser("train", help="LoRA student learns the teacher's answers without the prompt")
    add_config_arguments(p, TrainConfig)
    p.set_defaults(func=_cli)


def _cli(args) -> None:
    from distill.config import config_from_args
    from distill.chat import ChatTemplateError
    from distill.train.examples import TrainDataError

    try:
        config = config_from_args(TrainConfig, args)
        summary = main(config)
    except (TrainDataError, ChatTemplateError) as err:
        raise ConfigError(str(err)) from None
    print(json.dumps({k: summary[k] for k in ("steps", "final_loss", "final_val_loss", "final_val_agreement",
                                              "best_val_loss", "tokens_per_s", "padding_waste", "split", "skipped",
                                              "soft_labels")}, indent=2))
    print(f"adapter: {summary['adapter']}\nmetrics: {join(config.output, 'metrics.jsonl')}")
