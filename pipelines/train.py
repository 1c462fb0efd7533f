"""Train: the student learns to answer like the teacher, without the prompt (LoRA on Ray Train, FSDP2).

    distill train --data runs/gen --output runs/train [--student MODEL_DIR] [--workers N] [--config YAML]

1. Prepare (driver): read `DATA/data`, split by id hash into train/validation (`OUT/split.parquet`), tokenize
   with the student's chat template (targets on the assistant answer only; bad rows skipped and counted), plan
   every optimizer step, and write each worker's examples, in training order, to its own Parquet shard
   (`OUT/_tokens`): workers stream their shard, nobody receives the whole set.
2. Train (Ray Train `TorchTrainer`, N workers): the student built on the meta device and sharded with FSDP2
   before any weight is read, each rank reading only its rows of the checkpoint (`distill.modeling`); LoRA on
   every linear layer and on fused MoE expert weights. Packed micro-batches (no padding, no cross-example
   attention). Every `eval_every` steps: validation loss and, for label tasks, agreement with the teacher's
   held-out labels decoded greedily by the workers' own model; the best checkpoint by agreement (or loss) is
   kept, and training may stop early when it stops improving. A lost worker resumes from the last checkpoint
   (`FailureConfig`); rerunning the command resumes the same Ray Train run from `OUT/checkpoints`.
3. Export (driver): the chosen checkpoint's adapter to `OUT/adapter` (PEFT: loads in peft and vLLM), optionally
   the merged student to `OUT/merged` (merged by a Ray task on a worker node), `OUT/train_summary.json`.

OUT may be local or a pyarrow filesystem URI (s3://, gs://, ...) that every node reaches.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import pyarrow.fs as pafs
from pydantic import Field

from distill.checkpoints import (AttemptClock, MetricsLog, attempts_wall_s, load_checkpoint, read_metrics,
                                 save_checkpoint)
from distill.config import ConfigError, StrictModel, check_settings
from distill.models import default_model_dir
from distill.engine import EngineConfig
from distill.storage import (exists, join, list_files, local_dir, read_columns, read_json, resolve, staged_dir,
                             write_json, write_table)

log = logging.getLogger("distill.train")


class LoraOptions(StrictModel):
    rank: int = Field(32, ge=1, description="LoRA rank r (vLLM serves ranks 8, 16, 32, 64, ...).")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="Dropout on the LoRA input (training only). Off by default: it draws a "
        "random mask over the input of every adapted layer, ~30% of a CPU training step (SmolLM2, 2 cores: 543 vs "
        "371 tokens/s), and one epoch over thousands of examples has little to regularize.")
    target_modules: str | list[str] = Field(
        "all-linear", description="What gets adapters: 'all-linear' (every linear layer of attention and MLP, "
        "never the output head or an MoE router, plus the fused expert weights of MoE layers) or a list of module "
        "short names (q_proj, v_proj) and fused expert weights (mlp.experts.gate_up_proj).")


class OnPolicyOptions(StrictModel):
    rounds: int = Field(2, ge=1, description="Rounds of sample -> score -> train, each from the last round's adapter.")
    queries_per_round: Optional[int] = Field(
        None, ge=1, description="Training queries the student answers per round (a seeded sample; default: all).")
    steps_per_round: Optional[int] = Field(None, ge=1, description="Optimizer steps per round (default: one pass "
                                           "over the round's samples).")
    temperature: float = Field(1.0, ge=0, le=2, description="The student's sampling temperature: its own "
                               "distribution, which the reverse KL corrects.")
    top_k: int = Field(20, ge=1, le=20, description="Teacher logprobs kept per student token (vLLM's max 20).")
    max_new_tokens: Optional[int] = Field(None, ge=1, description="Most tokens a student sample may have; default: "
                                          "the longest training answer + 8.")
    teacher: Optional[str] = Field(None, description="The teacher that scores (default: the data's teacher).")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engines that sample and score.")


class TrainConfig(StrictModel):
    data: str = Field(description="Generation output directory (reads DATA/data/*.parquet), local or URI.")
    extra_data: list[str] = Field(
        default_factory=list, description="More outputs in the generation data format trained on with `data` (for "
        "example serving's capture URI, the flywheel); a query already in an earlier source is kept once.")
    held_out_from: Optional[str] = Field(
        None, description="An earlier training output whose held-out rows stay held out: its ids keep their split "
        "(the same test rows, so the evaluations compare), new rows with the text of one of its test or validation "
        "rows never train, other new rows are split into train and validation only. Pair it with init_adapter "
        "(the adapter being served) to retrain on old + captured data.")
    output: str = Field("runs/train", description="Output directory: a local path or a pyarrow filesystem URI "
                        "(s3://, gs://, ...) that every node can reach.")
    student: str = Field(default_model_dir(), description="Student model: a local folder or a hub name.")
    init_adapter: Optional[str] = Field(
        None, description="Start from this adapter (a PEFT folder or URI, e.g. the one being served) instead of a "
        "fresh one: its rank and targets must be this config's.")
    method: Literal["sft", "on-policy"] = Field(
        "sft", description="sft: learn the teacher's answers from the data (hard labels, soft where free). "
        "on-policy: learn from the student's own answers, scored token by token by the prompted teacher (reverse "
        "KL, `on_policy`); start it from an SFT adapter with init_adapter for on-policy after SFT.")
    on_policy: OnPolicyOptions = Field(default_factory=OnPolicyOptions, description="Options of method on-policy.")
    workers: int = Field(1, ge=1, description="Ray Train workers; the model is sharded over them with FSDP2.")
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="auto: one GPU per worker when the cluster has GPUs, else CPU.")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker (its torch threads).")
    # data
    validation_fraction: float = Field(
        0.1, ge=0, lt=1, description="Fraction of ids held out for validation (by id hash; at least 1 with >= 2 "
        "rows, unless 0: no validation at all).")
    test_fraction: float = Field(
        0.1, ge=0, lt=1, description="Fraction of ids held out for the evaluation alone (by id hash): training "
        "neither learns from them nor picks checkpoints on them, so `distill eval` scores a clean test split.")
    split_seed: int = Field(0, description="Salt of the id hash that decides the split.")
    exclude_ids: Optional[str] = Field(
        None, description="A Parquet file or folder (local or URI) with an `id` column: those ids never train (for "
        "example an evaluation's held-out rows that also came back from serving).")
    limit: Optional[int] = Field(None, ge=1, description="Train on at most this many examples (the first by id "
                                 "of the train split; the split itself is unchanged).")
    validation_limit: Optional[int] = Field(
        None, ge=1, description="Validate on at most this many held-out examples (the first by id; split.parquet "
        "still lists every held-out id). Saves time on CPU.")
    max_length: int = Field(2048, ge=8, description="Longest example in tokens; longer ones are skipped, counted.")
    packing: bool = Field(
        True, description="Pack each micro-batch into one row (no padding; position ids restart per example so "
        "examples never attend to each other). Off: pad to the longest example of a length-sorted micro-batch.")
    # optimisation
    per_device_batch_size: int = Field(4, ge=1, description="Examples per micro-batch on each worker.")
    gradient_accumulation: int = Field(4, ge=1, description="Micro-batches per optimizer step on each worker.")
    epochs: int = Field(1, ge=1, description="Passes over the training split.")
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this many optimizer steps (the learning "
                                     "rate schedule spans them).")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    warmup_fraction: float = Field(0.03, ge=0, lt=1, description="Linear warm-up, as a fraction of all steps.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decay ends at this fraction of the peak.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Gradient clipping (None: off).")
    seed: int = Field(0, description="Seeds the data order, the LoRA init and dropout.")
    lora: LoraOptions = Field(default_factory=LoraOptions, description="The LoRA adapter.")
    soft_label_weight: Optional[float] = Field(
        None, ge=0, le=1, description="Weight of KL to the teacher's top-k logprobs at the answer tokens they were "
        "kept for: 0 hard labels only, 1 KL only there. Default: 0.5 when the data has top-k logprobs and the "
        "student shares the teacher's tokenizer (they are free then), else 0 (the summary says why). Soft labels "
        "that align with no training example are an error.")
    precision: Literal["auto", "fp32", "bf16", "bf16-base"] = Field(
        "auto", description="fp32: everything in fp32. bf16: the frozen base stored in bf16, fp32 LoRA weights, "
        "bf16 compute (FSDP mixed precision; the GPU default). bf16-base: the frozen base stored and run in bf16, "
        "the LoRA weights, their compute and optimizer state in fp32 (on an AVX-512 CPU with bf16 instructions "
        "1.6x faster than fp32, where FSDP's mixed precision is slower). auto: bf16 on GPU; on CPU bf16-base where "
        "every CPU node has native bf16 (AVX512_BF16 or AMX), else fp32 (distill.hardware, the rule the engines' "
        "dtype follows).")
    gradient_checkpointing: Optional[bool] = Field(None, description="Recompute activations in backward; "
                                                   "default: on for GPU, off for CPU.")
    # validation, selection, logging, checkpoints
    log_every: int = Field(1, ge=1, description="Write a metrics line every N steps (validation steps always; "
                           "those are also reported to Ray Train).")
    eval_every: int = Field(25, ge=1, description="Validation (loss, and agreement for label tasks) every N steps "
                            "and at every checkpoint.")
    select_by: Literal["auto", "agreement", "loss"] = Field(
        "auto", description="What picks the best checkpoint and drives early stopping: agreement with the "
        "teacher's held-out labels (decoded greedily by the workers; label tasks) or validation loss. auto: "
        "agreement for label tasks, loss for free text.")
    early_stopping_patience: Optional[int] = Field(
        None, ge=1, description="Stop after this many validations in a row without a better selection score "
        "(None: train every planned step).")
    checkpoint_every: int = Field(50, ge=1, description="Checkpoint every N steps (and at the last step, and "
                                  "at every validation that beats the best score so far).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept: the best by the selection score (plus "
                                  "the latest, always kept for resuming).")
    export: Literal["best", "last"] = Field("best", description="Which checkpoint becomes OUT/adapter.")
    merge: bool = Field(False, description="Also write OUT/merged: the base model with the adapter merged in.")
    max_failures: int = Field(1, ge=0, description="Worker-group restarts from the last checkpoint after a lost "
                              "worker (Ray Train FailureConfig).")
    fail_at_step: Optional[int] = Field(
        None, ge=1, description="TESTING/CHAOS ONLY: the last worker kills its own process (os._exit) when it "
        "starts this step, once per output directory, to prove that training resumes from a checkpoint.")


# Options that may change between a crashed run and its rerun without changing what is trained.
RERUN_FREE = {"max_failures", "fail_at_step", "merge", "export", "cpus_per_worker", "device", "log_every"}


# ----------------------------------------------------------------------------------------------------------------
# 1. Prepare
def read_data(config: TrainConfig) -> list[dict]:
    """The rows of `data`, then those of each `extra_data` source whose id and text no earlier source has."""
    rows = read_source(config.data)
    for source in config.extra_data:
        ids, texts = {r["id"] for r in rows}, {r["text"] for r in rows}
        rows += [r for r in read_source(source) if r["id"] not in ids and r["text"] not in texts]
    return rows


def read_source(source: str) -> list[dict]:
    data = join(source, "data")
    if not list_files(data):
        raise ConfigError(f"{data}: no Parquet files; run `distill generate` first (or check --data)")
    try:
        table = read_columns(data, ["id", "text", "messages", "answer", "task", "teacher", "teacher_token_ids", "topk_ids",
                                    "topk_logprobs"])
    except Exception as err:  # a Parquet file without the contract's columns
        raise ConfigError(f"{data}: not generation output ({err})") from None
    if table.num_rows == 0:
        raise ConfigError(f"{data}: the Parquet files hold no rows")
    return table.to_pylist()


def soft_label_choice(config: TrainConfig, tokenizer, rows: list[dict]) -> tuple[float, str]:
    """(weight, why): the configured weight, or the default described in TrainConfig.soft_label_weight."""
    from distill.training import TrainDataError, same_tokenizer

    has_topk = any(r.get("topk_ids") for r in rows)
    if config.soft_label_weight == 0:
        return 0.0, "off (soft_label_weight: 0)"
    if not has_topk:
        if config.soft_label_weight is not None:
            raise TrainDataError(f"{config.data}: soft_label_weight > 0 but the data has no teacher top-k logprobs; "
                                 "generate with logprobs > 0 (e.g. logprobs: 20) or train with soft_label_weight: 0")
        return 0.0, "off: the data has no teacher top-k logprobs (generate with logprobs > 0)"
    for teacher in sorted({r["teacher"] for r in rows if r.get("topk_ids")}):
        same, why = same_tokenizer(tokenizer, teacher)
        if not same:
            if config.soft_label_weight is not None:
                raise TrainDataError(f"soft labels need the student to share the teacher's tokenizer: {why}; train "
                                     "on hard labels (soft_label_weight: 0) or use a student of the teacher's family")
            return 0.0, f"off: {why}"
    weight = config.soft_label_weight if config.soft_label_weight is not None else 0.5
    return weight, f"on (weight {weight}): the teacher's top-k logprobs, same tokenizer"


def prepare(config: TrainConfig, tokenizer, fs, out_path: str) -> dict[str, Any]:
    """Split, tokenize, plan and write each rank's shard; returns the small things the workers and the summary
    need."""
    import pyarrow as pa

    from distill.training import (StepPlan, TrainDataError, padding_waste, split_keeping, split_of, tokenize_rows,
                                  write_examples, write_rank_shards)

    rows = read_data(config)
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{config.data}: duplicate ids; the split by id needs unique ids")
    excluded = set(read_columns(config.exclude_ids, ["id"]).column("id").to_pylist()) if config.exclude_ids else set()
    if config.held_out_from:
        split = split_keeping(rows, *held_out_of(config.held_out_from), config.validation_fraction, config.split_seed)
    else:
        split = split_of(ids, config.validation_fraction, config.split_seed, config.test_fraction)
    split.update({i: "excluded" for i in excluded if i in split})
    ordered = sorted(ids)
    write_table(join(config.output, "split.parquet"),
                pa.table({"id": pa.array(ordered, pa.string()),
                          "split": pa.array([split[i] for i in ordered], pa.string())}))

    soft_weight, soft_why = soft_label_choice(config, tokenizer, rows)
    rows.sort(key=lambda r: r["id"])
    train_rows = [r for r in rows if split[r["id"]] == "train"]
    val_rows = [r for r in rows if split[r["id"]] == "validation"]
    train, skipped = tokenize_rows(tokenizer, train_rows, config.max_length, soft_weight > 0)
    val, val_skipped = tokenize_rows(tokenizer, val_rows, config.max_length, soft=False)
    skipped.update(val_skipped)
    if config.limit:
        train = train[:config.limit]
    if config.validation_limit:
        val = val[:config.validation_limit]
    if not train:
        raise TrainDataError(f"{config.data}: no trainable examples ({len(train_rows)} train rows; skipped: "
                             f"{dict(skipped) or 'none'})")
    soft_examples = sum(e.soft_positions is not None for e in train)
    if soft_weight > 0 and soft_examples == 0:
        raise TrainDataError(f"{config.data}: the teacher's top-k logprobs align with the answer of no training "
                             "example (the teacher's tokens do not spell the answer the student learns); train with "
                             "soft_label_weight: 0 or check the generation output")
    plan = StepPlan.build([e.length for e in train], config.per_device_batch_size, config.gradient_accumulation,
                          config.workers, config.epochs, config.seed, config.max_steps)
    tokens = f"{out_path}/_tokens"
    shards = write_rank_shards(fs, tokens, train, plan.steps, config.workers)
    write_examples(fs, f"{tokens}/validation.parquet", val)
    answers = {r["id"]: r["answer"] for r in val_rows}
    micro_lengths = [[train[j].length for j in micro] for step in plan.steps for rank in step for micro in rank]
    return {
        "shards": shards, "validation": f"{tokens}/validation.parquet", "steps": len(plan),
        "validation_answers": [answers[e.id] for e in val],
        "step_targets": [sum(train[j].n_targets for rank in s for micro in rank for j in micro) for s in plan.steps],
        "step_tokens": [sum(train[j].length for rank in s for micro in rank for j in micro) for s in plan.steps],
        "step_examples": [sum(len(micro) for rank in s for micro in rank) for s in plan.steps],
        "steps_per_epoch": -(-len(train) // (config.per_device_batch_size * config.gradient_accumulation
                                             * config.workers)),
        "split": {"train": len(train_rows), "validation": len(val_rows),
                  "test": sum(s == "test" for s in split.values()), "excluded": len(excluded & set(ids))},
        "examples": {"train": len(train), "validation": len(val)},
        "skipped": dict(skipped), "soft_weight": soft_weight, "soft_labels": soft_why, "soft_examples": soft_examples,
        "padding_waste": padding_waste(micro_lengths, config.packing),
        "padding_waste_unpacked": padding_waste(micro_lengths, packed=False),
        "task": _one(rows, "task"), "teacher": _one(rows, "teacher"),
    }


def held_out_of(earlier: str) -> tuple[dict[str, str], set[str]]:
    """(id -> split, texts of the held-out rows) of an earlier training output."""
    split_path = join(earlier, "split.parquet")
    summary = read_json(join(earlier, "train_summary.json"))
    if summary is None or not exists(split_path):
        raise ConfigError(f"held_out_from {earlier}: not a finished training output (no train_summary.json or "
                          f"split.parquet)")
    split = {r["id"]: r["split"] for r in read_columns(split_path, ["id", "split"]).to_pylist()}
    held = {i for i, part in split.items() if part in ("test", "validation")}
    texts = {r["text"] for source in [summary["data"], *summary.get("extra_data", [])]
             for r in read_columns(join(source, "data"), ["id", "text"]).to_pylist() if r["id"] in held}
    return split, texts


def _one(rows: list[dict], key: str):
    values = sorted({r[key] for r in rows if r.get(key) is not None})
    return values[0] if len(values) == 1 else values


# ----------------------------------------------------------------------------------------------------------------
# 2. Train (runs on every Ray Train worker)
def chaos(config: TrainConfig, fs, out: str, step: int, rank: int, world: int) -> None:
    """Testing only (`fail_at_step`): the last worker dies abruptly at the start of that step, once (a marker in
    OUT/_chaos, on the output's filesystem `fs`, says it happened)."""
    if config.fail_at_step != step or rank != world - 1:
        return
    marker = f"{out}/_chaos/failed_at_step_{step}"
    if fs.get_file_info(marker).type != pafs.FileType.NotFound:
        return
    fs.create_dir(f"{out}/_chaos", recursive=True)
    with fs.open_output_stream(marker) as f:
        f.write(b"this worker exited on purpose (fail_at_step)\n")
    log.warning("fail_at_step=%d: worker %d exits now (chaos test)", step, rank)
    os._exit(1)


def train_loop(args: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from transformers import AutoTokenizer

    from distill.checkpoints import load_adapter_weights
    from distill.modeling import build_sharded_student
    from distill.tasks import TaskSpec
    from distill.training import (collate, greedy_agreement, lr_factor, packed_attention, rank_steps, read_examples,
                                  shard_evenly, token_losses)

    config = TrainConfig.model_validate(args["config"])
    prep = args["prepared"]
    fs, out = args["output"]  # OUT's filesystem and path, resolved on the driver
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(config.cpus_per_worker)))  # the cores Ray reserved for this worker
    precision, use_gpu = args["precision"], args["use_gpu"]
    # bf16: base stored in bf16 and every parameter cast to bf16 for compute, gradients reduced in fp32.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" \
        else MixedPrecisionPolicy()
    model, _ = build_sharded_student(
        config.student, config.lora.target_modules, config.lora.rank, config.lora.alpha, config.lora.dropout,
        config.seed, torch.float32 if precision == "fp32" else torch.bfloat16, device,
        packed_attention() if config.packing else "sdpa",
        config.gradient_checkpointing if config.gradient_checkpointing is not None else use_gpu, policy)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    total = prep["steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, config.warmup_fraction, config.min_lr_ratio))

    state = {"step": 0, "elapsed_s": 0.0, "best_score": None, "since_best": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as path:
            state = {**state, **load_checkpoint(path, model, optimizer, scheduler)}
        log.info("worker %d resumes after step %d", rank, state["step"])
    elif config.init_adapter:
        load_adapter_weights(model, config.init_adapter)
    metrics_log = MetricsLog(fs, f"{out}/metrics.jsonl", rank == 0, state["step"])
    val = read_examples(fs, prep["validation"])
    task = TaskSpec.model_validate(args["task"]) if args["task"] else None
    tokenizer = AutoTokenizer.from_pretrained(config.student)
    pad_id = args["pad_id"]

    def all_sum(*values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    filler = val[0] if val else None

    def micro_batch(examples: list) -> tuple[dict, float]:
        # A rank with nothing in this slot still runs a forward/backward (FSDP's gathers are collective) on one
        # example whose loss counts zero.
        return (collate(examples, config.packing, pad_id), 1.0) if examples \
            else (collate([filler], config.packing, pad_id), 0.0)

    def validate() -> dict:
        if not val:
            return {"val_loss": None}
        model.eval()
        loss_sum = n = 0.0
        with torch.no_grad():
            for indices in shard_evenly(len(val), config.per_device_batch_size, world)[rank]:
                batch, weight = micro_batch([val[j] for j in indices])
                s, k = token_losses(model, batch)
                loss_sum, n = loss_sum + weight * float(s), n + weight * k
        result = {}
        if args["select_by"] == "agreement":
            agree, judged = greedy_agreement(model, tokenizer, task, val, prep["validation_answers"], rank, world,
                                             config.per_device_batch_size * 4)
            agree, judged = all_sum(agree, judged)
            result["val_agreement"] = agree / judged if judged else None
        model.train()
        loss_sum, n = all_sum(loss_sum, n)
        return {"val_loss": loss_sum / n, **result}

    def score(row: dict) -> float:
        """Lower is better: 1 - agreement (validation loss breaking ties), or the loss."""
        if row.get("val_agreement") is not None:
            return 1.0 - row["val_agreement"] + 1e-6 * row["val_loss"]
        return row["val_loss"] if row.get("val_loss") is not None else row["loss"]

    stream = rank_steps(fs, prep["shards"][rank], state["step"], config.gradient_accumulation)
    pending = next(stream, None)
    examples_seen = sum(prep["step_examples"][:state["step"]])
    t_start = time.monotonic() - state["elapsed_s"]
    model.train()
    for step in range(state["step"], total):
        chaos(config, fs, out, step + 1, rank, world)
        torch.manual_seed(config.seed * 1_000_003 + step * 1_009 + rank)  # dropout: same on every (re)run
        t0 = time.monotonic()
        if pending is not None and pending[0] == step:
            micros, pending = pending[1], next(stream, None)
        else:  # the plan gave this rank nothing at this step
            micros = [[] for _ in range(config.gradient_accumulation)]
        # Every target token of the step weighs the same, whichever rank and micro-batch it is in: divide the
        # summed token losses by the step's target count (x world size, since FSDP averages gradients).
        n_targets = prep["step_targets"][step]
        loss_sum = 0.0
        for i, examples in enumerate(micros):
            model.set_requires_gradient_sync(i == len(micros) - 1)  # reduce gradients once per step
            batch, weight = micro_batch(examples)
            s, _ = token_losses(model, batch, prep["soft_weight"], prep.get("objective", "forward"))
            (s * (weight * world / n_targets)).backward()
            loss_sum += weight * float(s.detach())
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        (loss_sum,) = all_sum(loss_sum)
        step_s = time.monotonic() - t0
        examples_seen += prep["step_examples"][step]

        done = step + 1
        row = {"step": done, "epoch": round(done / prep["steps_per_epoch"], 4), "examples": examples_seen,
               "loss": loss_sum / n_targets, "lr": lr, "tokens": prep["step_tokens"][step], "step_s": round(step_s, 4),
               "tokens_per_s": prep["step_tokens"][step] / step_s, "elapsed_s": round(time.monotonic() - t_start, 3)}
        last = done == total
        save = done % config.checkpoint_every == 0 or last
        stop = False
        if save or done % config.eval_every == 0:
            row.update(validate())
            row["score"] = score(row)
            if state["best_score"] is None or row["score"] < state["best_score"]:
                state["best_score"], state["since_best"] = row["score"], 0
                save = True  # the best so far is always kept: export may pick it
            else:
                state["since_best"] += 1
            stop = bool(config.early_stopping_patience) and state["since_best"] >= config.early_stopping_patience
            if stop and not last:
                row["early_stop"] = True
                save = True
        if done % config.log_every == 0 or "score" in row:
            metrics_log.write(row)
        if "score" in row:
            metrics_log.flush()
            # Ray Train gets the validation steps (a report is a barrier across workers: not every step).
            path = save_checkpoint(model, optimizer, scheduler, {
                "step": done, "elapsed_s": row["elapsed_s"], "best_score": state["best_score"],
                "since_best": state["since_best"]}, rank) if save else None
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(path) if path else None,
                             checkpoint_dir_name=f"step_{done:06d}" if save else None)
            if path:
                shutil.rmtree(path, ignore_errors=True)  # Ray copied it to storage and does not delete it
        if stop:
            log.info("early stop after step %d: no better score in %d validations", done, state["since_best"])
            break


# ----------------------------------------------------------------------------------------------------------------
# 3. Export
def export(config: TrainConfig, result) -> dict[str, Any]:
    """Copy the chosen checkpoint's adapter to OUT/adapter (whole, see `staged_dir`); optionally merge it into the
    base on a worker node (OUT/merged). The checkpoint is read locally (Ray downloads it from an object store)."""
    from distill.modeling import merge_adapter_on_cluster

    scored = [(m["score"], m["step"], m, c) for c, m in (result.best_checkpoints or [])]
    if not scored:
        raise RuntimeError("training finished without a checkpoint")
    _, best_step, best, best_checkpoint = min(scored, key=lambda t: (t[0], t[1]))
    chosen = best_checkpoint if config.export == "best" else result.checkpoint
    with chosen.as_directory() as path:
        chosen_step = json.loads(Path(path, "trainer_state.json").read_text())["step"]
        with staged_dir(join(config.output, "adapter")) as staging:
            shutil.copytree(os.path.join(path, "adapter"), staging, dirs_exist_ok=True)
    if config.merge:
        merge_adapter_on_cluster(config.student, join(config.output, "adapter"), join(config.output, "merged"))
    return {"best_val_loss": best.get("val_loss"), "best_val_agreement": best.get("val_agreement"),
            "best_step": best_step, "adapter_step": chosen_step}


# ----------------------------------------------------------------------------------------------------------------
def fit(config: TrainConfig, prepared: dict, task, select_by: str, use_gpu: bool, precision: str, pad_id: int):
    """One Ray Train run of `train_loop` over prepared shards, into config.output/checkpoints (resumed if an
    earlier attempt left one there)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    fs, out_path = resolve(config.output)
    trainer = TorchTrainer(
        train_loop,
        # The workers get OUT as the filesystem object the driver resolved (endpoint, region and all), so they
        # read their shards and rank 0 writes metrics from whichever node they land on.
        train_loop_config={"config": config.model_dump(), "prepared": prepared, "use_gpu": use_gpu,
                           "precision": precision, "pad_id": pad_id, "output": (fs, out_path),
                           "task": task.model_dump() if task else None, "select_by": select_by},
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker}),
        run_config=RunConfig(
            name="checkpoints", storage_path=out_path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints,
                                               checkpoint_score_attribute="score", checkpoint_score_order="min"),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return result


def main(config: TrainConfig) -> dict[str, Any]:
    import ray
    from transformers import AutoTokenizer

    from distill.hardware import cluster_cpu_flags, cpu_kind, describe, training_precision
    from distill.ray_init import init_ray
    from distill.tasks import task_of_data

    out = config.output
    check_rerun(config)  # before anything is reused: a finished run with other settings is an error, not a skip
    existing = read_json(join(out, "train_summary.json"))
    if existing is not None and existing.get("complete"):
        log.info("%s is complete already (%d steps); nothing to do", out, existing["steps"])
        return existing
    fs, out_path = resolve(out)
    with AttemptClock(out):
        t0 = time.monotonic()
        tokenizer = AutoTokenizer.from_pretrained(config.student)
        task = task_of_data(config.data)
        prepared = prepare(config, tokenizer, fs, out_path)
        select_by = config.select_by if config.select_by != "auto" else (
            "agreement" if task is not None and task.answer.type == "labels" and prepared["examples"]["validation"]
            else "loss")
        log.info("split %s, training on %d examples in %d steps; skipped %s; padding waste %.1f%% (%.1f%% "
                 "unpacked); soft labels %s; best checkpoint by %s", prepared["split"], prepared["examples"]["train"],
                 prepared["steps"], prepared["skipped"] or "none", 100 * prepared["padding_waste"],
                 100 * prepared["padding_waste_unpacked"], prepared["soft_labels"], select_by)
        init_ray()
        use_gpu = config.device == "gpu" or (config.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
        flags = cluster_cpu_flags()
        precision = training_precision(config.precision, use_gpu, flags)
        log.info("training precision %s (setting %s; %s, CPU kind %s)", precision, config.precision,
                 "GPU" if use_gpu else "CPU", cpu_kind(flags))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        run = (use_gpu, precision, pad_id)
        if config.method == "sft":
            exported = export(config, fit(config, prepared, task, select_by, *run))
            rounds = None
        else:
            exported, rounds = on_policy(config, tokenizer, task, prepared, select_by, run)
        metrics = read_metrics(join(out, "metrics.jsonl"))
        wall_this_run = round(time.monotonic() - t0, 3)
    vals = [m for m in metrics if m.get("val_loss") is not None]
    tokens, seconds = sum(m["tokens"] for m in metrics), sum(m["step_s"] for m in metrics)
    summary = {
        "complete": True, "method": config.method, "rounds": rounds,
        "steps": metrics[-1]["step"], "planned_steps": prepared["steps"] if rounds is None else
        sum(r["planned_steps"] for r in rounds),
        "stopped_early": bool(metrics[-1].get("early_stop")),
        "final_loss": metrics[-1]["loss"],
        "final_val_loss": vals[-1]["val_loss"] if vals else None,
        "final_val_agreement": vals[-1].get("val_agreement") if vals else None,
        "select_by": select_by,
        **exported,
        "tokens_per_s": tokens / seconds if seconds else None,
        # Every attempt counts (a crash and its rerun both cost): training's cost is the sum.
        "wall_s": attempts_wall_s(out)["wall_s"], "attempts": attempts_wall_s(out)["attempts"],
        "wall_s_this_run": wall_this_run,
        "split": prepared["split"], "examples": prepared["examples"], "skipped": prepared["skipped"],
        "soft_labels": prepared["soft_labels"] if rounds is None else "on-policy: reverse KL to the teacher's top-k",
        "soft_label_weight": prepared["soft_weight"], "soft_examples": prepared["soft_examples"],
        "padding_waste": prepared["padding_waste"], "padding_waste_unpacked": prepared["padding_waste_unpacked"],
        "data": config.data, "extra_data": config.extra_data, "held_out_from": config.held_out_from,
        "student": config.student, "task": prepared["task"], "teacher": prepared["teacher"],
        "workers": config.workers, "device": "gpu" if use_gpu else "cpu", "precision": precision,
        "cpu": describe(flags),
        "adapter": join(out, "adapter"), "merged": join(out, "merged") if config.merge else None,
        "config": config.model_dump(),
    }
    write_json(join(out, "train_summary.json"), summary)
    log.info("trained %d steps: loss %.4f, val loss %s, val agreement %s, %.0f tokens/s; adapter %s",
             summary["steps"], summary["final_loss"], summary["final_val_loss"], summary["final_val_agreement"],
             summary["tokens_per_s"] or 0, summary["adapter"])
    return summary


def on_policy(config: TrainConfig, tokenizer, task, prepared: dict, select_by: str, run: tuple):
    """Rounds of on-policy distillation (distill/onpolicy.py), each in OUT/rounds/NN: the current student samples
    the training queries without the prompt, the prompted teacher scores those tokens, Ray Train minimises the
    reverse KL on them starting from the current adapter. A finished round is skipped on a rerun; a round's samples
    and scores are kept, so its training resumes on exactly the same data. OUT/adapter is the last round's."""
    from distill import onpolicy
    from distill.modeling import merge_adapter_on_cluster
    from distill.training import StepPlan, read_examples, same_tokenizer, write_examples, write_rank_shards

    op = config.on_policy
    teacher = op.teacher or (prepared["teacher"] if isinstance(prepared["teacher"], str) else None)
    if not teacher:
        raise ConfigError(f"on-policy: the data names no single teacher ({prepared['teacher']}); set on_policy.teacher")
    same, why = same_tokenizer(tokenizer, teacher)
    if not same:
        raise ConfigError(f"on-policy distillation scores the student's own tokens with the teacher: {why}")
    split = read_columns(join(config.output, "split.parquet"), ["id", "split"]).to_pylist()
    train_ids = {r["id"] for r in split if r["split"] == "train"}
    rows = [r for r in read_data(config) if r["id"] in train_ids]
    texts = sorted(({"id": r["id"], "text": r["messages"][0]["content"], "answer": r["answer"]} for r in rows),
                   key=lambda r: r["id"])
    max_tokens = op.max_new_tokens or max(len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"])
                                          for r in texts) + 8
    policy, rounds, merged_metrics, offset = config.init_adapter, [], [], 0
    for r in range(op.rounds):
        rdir = join(config.output, "rounds", f"{r:02d}")
        fs, rpath = resolve(rdir)
        done = read_json(join(rdir, "round.json"))
        if done is None:
            cached = f"{rpath}/_tokens/examples.parquet"
            if fs.get_file_info(cached).type == pafs.FileType.NotFound:
                rng = np.random.default_rng([config.seed, r])
                queries = [texts[i] for i in sorted(rng.permutation(len(texts))[:op.queries_per_round or len(texts)])]
                model = config.student if policy is None else merge_adapter_on_cluster(
                    config.student, policy, join(rdir, "policy-merged"))
                samples = onpolicy.sample_answers(queries, task, model, op.engine, op.temperature, max_tokens,
                                                  config.seed + r)
                scores = onpolicy.score_with_teacher(queries, samples, task, teacher, op.engine, op.top_k,
                                                     config.seed + r)
                fs.create_dir(f"{rpath}/_tokens", recursive=True)
                write_examples(fs, cached, onpolicy.examples(samples, scores, config.max_length))
                write_json(join(rdir, "samples.json"), onpolicy.round_summary(samples, scores))
            examples = read_examples(fs, cached)
            plan = StepPlan.build([e.length for e in examples], config.per_device_batch_size,
                                  config.gradient_accumulation, config.workers, 1, config.seed + r, op.steps_per_round)
            round_prepared = {**prepared, "steps": len(plan), "soft_weight": 1.0, "objective": "reverse",
                              "shards": write_rank_shards(fs, f"{rpath}/_tokens", examples, plan.steps, config.workers),
                              "step_targets": [sum(examples[j].n_targets for rk in s for m in rk for j in m)
                                               for s in plan.steps],
                              "step_tokens": [sum(examples[j].length for rk in s for m in rk for j in m)
                                              for s in plan.steps],
                              "step_examples": [sum(len(m) for rk in s for m in rk) for s in plan.steps],
                              "steps_per_epoch": len(plan)}
            round_config = config.model_copy(update={"output": rdir, "init_adapter": policy, "merge": False})
            exported = export(round_config, fit(round_config, round_prepared, task, select_by, *run))
            done = {"complete": True, "round": r, "planned_steps": len(plan), "policy": policy,
                    **(read_json(join(rdir, "samples.json")) or {}), **exported}
            write_json(join(rdir, "round.json"), done)
        rounds.append(done)
        policy = join(rdir, "adapter")
        for m in read_metrics(join(rdir, "metrics.jsonl")):  # one learning curve over every round
            merged_metrics.append({**m, "step": m["step"] + offset, "round": r})
        offset += done["planned_steps"]
    out_fs, out_path = resolve(config.output)
    with out_fs.open_output_stream(f"{out_path}/metrics.jsonl") as f:
        f.write("".join(json.dumps(m) + "\n" for m in merged_metrics).encode())
    with staged_dir(join(config.output, "adapter")) as staging, local_dir(policy) as last:
        shutil.copytree(last, staging, dirs_exist_ok=True)
    if config.merge:
        merge_adapter_on_cluster(config.student, join(config.output, "adapter"), join(config.output, "merged"))
    last = rounds[-1]
    return {"best_val_loss": last.get("best_val_loss"), "best_val_agreement": last.get("best_val_agreement"),
            "best_step": last["best_step"] + offset - last["planned_steps"], "adapter_step": offset}, rounds


def check_rerun(config: TrainConfig) -> None:
    """A rerun into the same OUT resumes (or finds it complete); it must then train the same thing."""
    check_settings(join(config.output, "train_run.json"),
                   {k: v for k, v in config.model_dump().items() if k not in RERUN_FREE}, "a training run")


def add_cli(subparsers) -> None:
    from distill.config import add_config_arguments

    p = subparsers.add_parser("train", help="LoRA student learns the teacher's answers without the prompt")
    add_config_arguments(p, TrainConfig)
    p.set_defaults(func=_cli)


def _cli(args) -> None:
    from distill.config import config_from_args
    from distill.training import TrainDataError

    try:
        config = config_from_args(TrainConfig, args)
        summary = main(config)
    except TrainDataError as err:
        raise ConfigError(str(err)) from None
    print(json.dumps({k: summary[k] for k in ("steps", "final_loss", "final_val_loss", "final_val_agreement",
                                              "best_val_loss", "tokens_per_s", "padding_waste", "split", "skipped",
                                              "soft_labels")}, indent=2))
    print(f"adapter: {summary['adapter']}\nmetrics: {join(config.output, 'metrics.jsonl')}")
