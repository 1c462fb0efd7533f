"""Train: the student learns to answer like the teacher, without the prompt (LoRA on Ray Train, FSDP2).

    distill train --data runs/gen --output runs/train [--student MODEL_DIR] [--workers N] [--config YAML]

1. Prepare (driver): read `DATA/data`, split by id hash into train/validation (`OUT/split.parquet`), tokenize
   with the student's chat template (targets on the assistant answer only; bad rows skipped and counted), and
   plan every optimizer step's examples.
2. Train (Ray Train `TorchTrainer`, N workers): a peft LoRA model sharded with FSDP2 (`fully_shard` per decoder
   layer, then the root). Each micro-batch is packed into one row with position ids restarting per example, so
   short examples cost no padding and never attend to each other. Validation loss at intervals; metrics to
   `OUT/metrics.jsonl` and Ray Train; checkpoints (adapter, optimizer, scheduler, step) every K steps, the best
   by validation loss kept. A lost worker resumes from the last checkpoint (`FailureConfig`); rerunning the
   command after a crash resumes the same Ray Train run from `OUT/checkpoints`.
3. Export (driver): the best (or last) checkpoint's adapter to `OUT/adapter` (PEFT format, loads in peft and
   vLLM), optionally a merged model to `OUT/merged`, and `OUT/train_summary.json`.

OUT may be local or a pyarrow filesystem URI (s3://, gs://, ...), for clusters whose only shared storage is an
object store. The driver writes split.parquet, adapter/, merged/ and the summaries; Ray Train keeps its
checkpoints in OUT/checkpoints through the same filesystem (`storage_filesystem`); rank 0, which may run on
another node, writes metrics.jsonl and the chaos markers through the filesystem object resolved on the driver.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal, Optional

import pyarrow.fs as pafs
from pydantic import Field

from distill.config import ConfigError, StrictModel
from distill.models import default_model_dir
from distill.storage import (is_local, join, list_files, read_columns, read_json, read_text, resolve, staged_dir,
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
        "all-linear", description="Modules that get adapters: 'all-linear' (every linear layer of attention and "
        "MLP, never lm_head) or a list of module names such as [q_proj, v_proj].")


class TrainConfig(StrictModel):
    data: str = Field(description="Generation output directory (reads DATA/data/*.parquet), local or URI.")
    output: str = Field("runs/train", description="Output directory: a local path or a pyarrow filesystem URI "
                        "(s3://, gs://, ...) that every node can reach.")
    student: str = Field(default_model_dir(), description="Student model: a local folder or a hub name.")
    workers: int = Field(1, ge=1, description="Ray Train workers; the model is sharded over them with FSDP2.")
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="auto: one GPU per worker when the cluster has GPUs, else CPU.")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker (its torch threads).")
    # data
    validation_fraction: float = Field(
        0.1, ge=0, lt=1, description="Fraction of ids held out for validation (by id hash; at least 1 with >= 2 "
        "rows, unless 0: no validation at all).")
    split_seed: int = Field(0, description="Salt of the id hash that decides the split.")
    limit: Optional[int] = Field(None, ge=1, description="Train on at most this many examples (the first by id "
                                 "of the train split; the split itself is unchanged).")
    validation_limit: Optional[int] = Field(
        None, ge=1, description="Compute the validation loss on at most this many held-out examples (the first by "
        "id; split.parquet still lists every held-out id). Saves time on CPU.")
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
    soft_label_weight: float = Field(
        0.0, ge=0, le=1, description="Weight of KL to the teacher's top-k logprobs (needs generation with "
        "logprobs > 0 and the teacher's tokenizer): 0 hard labels only, 1 KL only where top-k exist.")
    precision: Literal["auto", "fp32", "bf16", "bf16-base"] = Field(
        "auto", description="fp32: everything in fp32. bf16: fp32 master weights, bf16 compute (FSDP mixed "
        "precision). bf16-base: the frozen base weights stored and run in bf16, the LoRA weights and their "
        "optimizer state in fp32 (half the base's memory; on an AVX-512 CPU with bf16 instructions 1.6x faster "
        "than fp32, where FSDP's mixed precision is slower). auto: bf16 on GPU; on CPU bf16-base where every CPU "
        "node has native bf16 (AVX512_BF16 or AMX), else fp32 (distill.hardware, the rule the engines' dtype "
        "follows).")
    gradient_checkpointing: Optional[bool] = Field(None, description="Recompute activations in backward; "
                                                   "default: on for GPU, off for CPU.")
    # evaluation, logging, checkpoints
    log_every: int = Field(1, ge=1, description="Write a metrics line every N steps (validation steps always; "
                           "those are also reported to Ray Train).")
    eval_every: int = Field(25, ge=1, description="Validation loss every N steps (and at every checkpoint).")
    checkpoint_every: int = Field(50, ge=1, description="Checkpoint every N steps (and at the last step).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept: the best by validation loss (plus the "
                                  "latest, always kept for resuming).")
    export: Literal["best", "last"] = Field("best", description="Which checkpoint becomes OUT/adapter.")
    merge: bool = Field(False, description="Also write OUT/merged: the base model with the adapter merged in.")
    max_failures: int = Field(1, ge=0, description="Worker-group restarts from the last checkpoint after a lost "
                              "worker (Ray Train FailureConfig).")
    fail_at_step: Optional[int] = Field(
        None, ge=1, description="TESTING/CHAOS ONLY: the last worker kills its own process (os._exit) when it "
        "starts this step, once per output directory, to prove that training resumes from a checkpoint.")


# Options that may change between a crashed run and its rerun without changing what is trained.
RERUN_FREE = {"max_failures", "fail_at_step", "merge", "export", "cpus_per_worker", "device"}


# ----------------------------------------------------------------------------------------------------------------
# 1. Prepare
def read_data(config: TrainConfig, soft: bool) -> list[dict]:
    data = join(config.data, "data")
    if not list_files(data):
        raise ConfigError(f"{data}: no Parquet files; run `distill generate` first (or check --data)")
    columns = ["id", "messages", "task", "teacher"] + (["teacher_token_ids", "topk_ids", "topk_logprobs"]
                                                       if soft else [])
    try:
        table = read_columns(data, columns)
    except Exception as err:  # a Parquet file without the contract's columns
        raise ConfigError(f"{data}: not generation output ({err})") from None
    if table.num_rows == 0:
        raise ConfigError(f"{data}: the Parquet files hold no rows")
    return table.to_pylist()


def prepare(config: TrainConfig, tokenizer) -> dict[str, Any]:
    """Split, tokenize and plan; everything the workers need, and the counts the summary reports."""
    import pyarrow as pa

    from distill.training import StepPlan, TrainDataError, padding_waste, split_of, tokenize_rows

    soft = config.soft_label_weight > 0
    rows = read_data(config, soft)
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{config.data}: duplicate ids; the split by id needs unique ids")
    if config.validation_fraction > 0:
        split = split_of(ids, config.validation_fraction, config.split_seed)
    else:
        split = dict.fromkeys(ids, "train")
    ordered = sorted(ids)
    write_table(join(config.output, "split.parquet"),
                pa.table({"id": pa.array(ordered, pa.string()),
                          "split": pa.array([split[i] for i in ordered], pa.string())}))

    if soft:
        check_soft_labels(config, tokenizer, rows)
    rows.sort(key=lambda r: r["id"])
    train_rows = [r for r in rows if split[r["id"]] == "train"]
    val_rows = [r for r in rows if split[r["id"]] == "validation"]
    train, skipped = tokenize_rows(tokenizer, train_rows, config.max_length, soft)
    val, val_skipped = tokenize_rows(tokenizer, val_rows, config.max_length, soft=False)
    skipped.update(val_skipped)
    if config.limit:
        train = train[:config.limit]
    if config.validation_limit:
        val = val[:config.validation_limit]
    if not train:
        raise TrainDataError(f"{config.data}: no trainable examples ({len(train_rows)} train rows; skipped: "
                             f"{dict(skipped) or 'none'})")
    plan = StepPlan.build([e.length for e in train], config.per_device_batch_size, config.gradient_accumulation,
                          config.workers, config.epochs, config.seed, config.max_steps)
    micro_lengths = [[train[j].length for j in micro] for step in plan.steps for rank in step for micro in rank]
    return {
        "train": train, "val": val, "plan": plan.steps,
        "step_targets": [sum(train[j].n_targets for rank in s for micro in rank for j in micro) for s in plan.steps],
        "step_tokens": [sum(train[j].length for rank in s for micro in rank for j in micro) for s in plan.steps],
        "steps_per_epoch": -(-len(train) // (config.per_device_batch_size * config.gradient_accumulation
                                             * config.workers)),
        "split": {"train": len(train_rows), "validation": len(val_rows)},
        "examples": {"train": len(train), "validation": len(val)},
        "skipped": dict(skipped),
        "soft_examples": sum(e.soft_positions is not None for e in train),
        "padding_waste": padding_waste(micro_lengths, config.packing),
        "padding_waste_unpacked": padding_waste(micro_lengths, packed=False),
        "task": _one(rows, "task"), "teacher": _one(rows, "teacher"),
    }


def _one(rows: list[dict], key: str):
    values = sorted({r[key] for r in rows if r.get(key) is not None})
    return values[0] if len(values) == 1 else values


def check_soft_labels(config: TrainConfig, tokenizer, rows: list[dict]) -> None:
    from transformers import AutoTokenizer

    from distill.training import TrainDataError, check_same_tokenizer

    if not any(r.get("topk_ids") for r in rows):
        raise TrainDataError(f"{config.data}: soft_label_weight > 0 but the data has no teacher top-k logprobs; "
                             "generate with logprobs > 0 (e.g. logprobs: 5) or train with soft_label_weight: 0")
    for teacher in sorted({r["teacher"] for r in rows if r.get("topk_ids")}):
        try:
            teacher_tokenizer = AutoTokenizer.from_pretrained(teacher)
        except Exception as err:
            raise TrainDataError(f"soft labels: cannot load the teacher's tokenizer {teacher!r} to check that it "
                                 f"is the student's ({err})") from None
        check_same_tokenizer(tokenizer, teacher_tokenizer, teacher)


# ----------------------------------------------------------------------------------------------------------------
# 2. Train (runs on every Ray Train worker)
def build_model(config: TrainConfig, device, use_gpu: bool, precision: str):
    """The student with a LoRA adapter, sharded with FSDP2: each decoder layer is its own unit, then the root."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM

    from distill.training import packed_attention

    checkpointing = config.gradient_checkpointing if config.gradient_checkpointing is not None else use_gpu
    # Packed rows attend per example (distill.training.packed_attention); padded batches take plain SDPA.
    base = AutoModelForCausalLM.from_pretrained(
        config.student, dtype=torch.bfloat16 if precision == "bf16-base" else torch.float32,
        attn_implementation=packed_attention() if config.packing else "sdpa")
    base.config.use_cache = False
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    torch.manual_seed(config.seed)  # the same LoRA init on every rank (each keeps its own shard of it)
    lora = LoraConfig(r=config.lora.rank, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=lora_targets(base, config.lora.target_modules), task_type="CAUSAL_LM")
    # peft keeps the adapter in fp32 over a bf16 base (autocast_adapter_dtype): the optimizer updates fp32 weights.
    model = get_peft_model(base, lora, autocast_adapter_dtype=True).to(device)
    # bf16: FSDP keeps fp32 master weights and casts them to bf16 for compute.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" \
        else MixedPrecisionPolicy()
    layer_classes = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise RuntimeError(f"{config.student}: found no decoder layers ({layer_classes}) to shard")
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def lora_targets(base, target_modules: str | list[str]) -> list[str]:
    """'all-linear' spelled out as the short names of the linear layers (q_proj, ..., down_proj), never the
    output head: adapter_config.json then lists the module names that vLLM and peft match on any model."""
    import torch

    if target_modules != "all-linear":
        return [target_modules] if isinstance(target_modules, str) else list(target_modules)
    head = base.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in base.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not head})


def adapter_key_map(model) -> dict[str, str]:
    """PEFT file key (adapter name dropped, as peft saves it) -> the model's parameter name."""
    name = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
    return {k.replace(f".{name}.", "."): k for k, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(model, optimizer, scheduler, state: dict, rank: int) -> Optional[str]:
    """Every rank joins the gathers; rank 0 writes adapter/ (PEFT format), optimizer, scheduler and the step."""
    import torch
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))
    if rank != 0:
        return None
    path = tempfile.mkdtemp(prefix="distill-ckpt-")
    model.save_pretrained(os.path.join(path, "adapter"), state_dict=weights)
    torch.save(optim, os.path.join(path, "optimizer.pt"))
    torch.save(scheduler.state_dict(), os.path.join(path, "scheduler.pt"))
    Path(path, "trainer_state.json").write_text(json.dumps(state))
    return path


def load_checkpoint(path: str, model, optimizer, scheduler) -> dict:
    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    keys = adapter_key_map(model)
    weights = load_file(os.path.join(path, "adapter", "adapter_model.safetensors"))
    set_model_state_dict(model, {keys[k]: v for k, v in weights.items()},
                         options=StateDictOptions(full_state_dict=True, strict=False))
    optim = torch.load(os.path.join(path, "optimizer.pt"), weights_only=False)
    set_optimizer_state_dict(model, optimizer, optim, options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=False))
    return json.loads(Path(path, "trainer_state.json").read_text())


class MetricsLog:
    """OUT/metrics.jsonl, written by rank 0 through the output's filesystem (`fs`, resolved on the driver: rank 0
    may run on another node). A resumed run first drops the lines after its checkpoint's step, so the file reads as
    one uninterrupted run.

    A local file gets each line as it is logged (appended). An object store has no append: there the file is
    rewritten whole at every `flush` (called at the validation steps, which include every checkpoint's step, so
    a rerun always finds the lines up to its checkpoint)."""

    def __init__(self, fs, path: str, active: bool, resume_step: int):
        self.fs, self.path, self.active = fs, path, active
        self.append = is_local(fs)
        self.lines: list[str] = []
        if not active:
            return
        if resume_step and fs.get_file_info(path).type != pafs.FileType.NotFound:
            with fs.open_input_stream(path) as f:
                self.lines = [line for line in f.read().decode().splitlines()
                              if line.strip() and json.loads(line)["step"] <= resume_step]
        self._rewrite()

    def write(self, row: dict) -> None:
        if not self.active:
            return
        self.lines.append(json.dumps(row))
        if self.append:
            with open(self.path, "a") as f:
                f.write(self.lines[-1] + "\n")

    def flush(self) -> None:
        if self.active and not self.append:
            self._rewrite()

    def _rewrite(self) -> None:
        with self.fs.open_output_stream(self.path) as f:
            f.write("".join(line + "\n" for line in self.lines).encode())


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

    from distill.training import collate, lr_factor, shard_evenly, token_losses

    config = TrainConfig.model_validate(args["config"])
    fs, out = args["output"]  # OUT's filesystem and path, resolved on the driver
    data = ray.get(args["data"])
    train, val, plan = data["train"], data["val"], data["plan"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(config.cpus_per_worker)))  # the cores Ray reserved for this worker
    pad_id = args["pad_id"]
    model = build_model(config, device, args["use_gpu"], args["precision"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    total = len(plan)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, config.warmup_fraction, config.min_lr_ratio))

    state = {"step": 0, "elapsed_s": 0.0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as path:
            state = load_checkpoint(path, model, optimizer, scheduler)
        log.info("worker %d resumes after step %d", rank, state["step"])
    metrics_log = MetricsLog(fs, f"{out}/metrics.jsonl", rank == 0, state["step"])

    def all_sum(*values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def micro_batch(indices: list[int], examples) -> tuple[dict, float]:
        # A rank with nothing left in this slot still runs a forward/backward (FSDP's gathers are collective)
        # on one example whose loss counts zero.
        return (collate([examples[j] for j in indices], config.packing, pad_id), 1.0) if indices \
            else (collate([examples[0]], config.packing, pad_id), 0.0)

    def validation_loss() -> Optional[float]:
        if not val:
            return None
        model.eval()
        loss_sum = n = 0.0
        with torch.no_grad():
            for indices in shard_evenly(len(val), config.per_device_batch_size, world)[rank]:
                batch, weight = micro_batch(indices, val)
                s, k = token_losses(model, batch)
                loss_sum, n = loss_sum + weight * float(s), n + weight * k
        model.train()
        loss_sum, n = all_sum(loss_sum, n)
        return loss_sum / n

    t_start = time.monotonic() - state["elapsed_s"]
    model.train()
    for step in range(state["step"], total):
        chaos(config, fs, out, step + 1, rank, world)
        torch.manual_seed(config.seed * 1_000_003 + step * 1_009 + rank)  # dropout: same on every (re)run
        t0 = time.monotonic()
        # Every target token of the step weighs the same, whichever rank and micro-batch it is in: divide the
        # summed token losses by the step's target count (x world size, since FSDP averages gradients).
        n_targets = data["step_targets"][step]
        loss_sum = 0.0
        micros = plan[step][rank]
        for i, indices in enumerate(micros):
            model.set_requires_gradient_sync(i == len(micros) - 1)  # reduce gradients once per step
            batch, weight = micro_batch(indices, train)
            s, _ = token_losses(model, batch, config.soft_label_weight)
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

        done = step + 1
        last = done == total
        row = {"step": done, "epoch": round(done / data["steps_per_epoch"], 4), "loss": loss_sum / n_targets,
               "lr": lr, "tokens": data["step_tokens"][step], "step_s": round(step_s, 4),
               "tokens_per_s": data["step_tokens"][step] / step_s, "elapsed_s": round(time.monotonic() - t_start, 3)}
        save = done % config.checkpoint_every == 0 or last
        if save or done % config.eval_every == 0:
            row["val_loss"] = validation_loss()
        if done % config.log_every == 0 or "val_loss" in row:
            metrics_log.write(row)
        if "val_loss" in row:
            metrics_log.flush()
            # Ray Train gets the validation steps (a report is a barrier across workers: not every step).
            path = save_checkpoint(model, optimizer, scheduler, {"step": done, "elapsed_s": row["elapsed_s"]},
                                   rank) if save else None
            # Checkpoints rank by validation loss; with no validation split, by training loss.
            reported = {**row, "score": row["val_loss"] if row["val_loss"] is not None else row["loss"]}
            ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(path) if path else None,
                             checkpoint_dir_name=f"step_{done:06d}" if save else None)
            if path:
                shutil.rmtree(path, ignore_errors=True)  # Ray copied it to storage and does not delete it


# ----------------------------------------------------------------------------------------------------------------
# 3. Export
def export(config: TrainConfig, result) -> dict[str, Any]:
    """Copy the chosen checkpoint's adapter to OUT/adapter (whole, see `staged_dir`); optionally merge it into the
    base. The checkpoint is read locally (Ray downloads it when OUT is in an object store)."""
    scored = [(m["score"], m["step"], m["val_loss"], c) for c, m in (result.best_checkpoints or [])]
    if not scored:
        raise RuntimeError("training finished without a checkpoint")
    _, best_step, best_loss, best = min(scored, key=lambda t: (t[0], t[1]))
    chosen = best if config.export == "best" else result.checkpoint
    with chosen.as_directory() as path:
        adapter = os.path.join(path, "adapter")
        chosen_step = json.loads(Path(path, "trainer_state.json").read_text())["step"]
        with staged_dir(join(config.output, "adapter")) as staging:
            shutil.copytree(adapter, staging, dirs_exist_ok=True)
        if config.merge:
            merge_adapter(config.student, adapter, join(config.output, "merged"))
    return {"best_val_loss": best_loss, "best_step": best_step, "adapter_step": chosen_step}


def merge_adapter(student: str, adapter: str, dest: str) -> None:
    """The base model with the (local) adapter merged in, saved with the tokenizer to `dest` (local or URI).
    Merged in float32 (no rounding of the LoRA product into bf16 weights first), saved in the student's dtype."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(AutoConfig.from_pretrained(student), "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    base = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload().to(dtype)
    with staged_dir(dest) as staging:
        merged.save_pretrained(staging)
        AutoTokenizer.from_pretrained(student).save_pretrained(staging)


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl (local path or URI); none when it does not exist."""
    text = read_text(path) or ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------------------
def main(config: TrainConfig) -> dict[str, Any]:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from transformers import AutoTokenizer

    from distill.hardware import cluster_cpu_flags, cpu_kind, describe, training_precision
    from distill.ray_init import init_ray

    out = config.output
    summary_path = join(out, "train_summary.json")
    existing = read_json(summary_path)
    if existing is not None and existing.get("complete"):
        log.info("%s is complete already (%d steps); nothing to do", out, existing["steps"])
        return existing
    t0 = time.monotonic()
    fs, out_path = resolve(out)
    fs.create_dir(out_path, recursive=True)
    check_rerun(config)
    tokenizer = AutoTokenizer.from_pretrained(config.student)
    prepared = prepare(config, tokenizer)
    log.info("split %s, training on %d examples in %d steps; skipped %s; padding waste %.1f%% (%.1f%% unpacked)",
             prepared["split"], prepared["examples"]["train"], len(prepared["plan"]), prepared["skipped"] or "none",
             100 * prepared["padding_waste"], 100 * prepared["padding_waste_unpacked"])

    init_ray()
    use_gpu = config.device == "gpu" or (config.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    flags = cluster_cpu_flags()
    precision = training_precision(config.precision, use_gpu, flags)
    log.info("training precision %s (setting %s; %s, CPU kind %s)", precision, config.precision,
             "GPU" if use_gpu else "CPU", cpu_kind(flags))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = TorchTrainer(
        train_loop,
        # The workers get OUT as the filesystem object the driver resolved (endpoint, region and all), so rank 0
        # writes metrics to the same place from whichever node it lands on.
        train_loop_config={"config": config.model_dump(), "data": ray.put(prepared), "use_gpu": use_gpu,
                           "precision": precision, "pad_id": pad_id, "output": (fs, out_path)},
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker}),
        run_config=RunConfig(
            name="checkpoints", storage_path=out_path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints,
                                               checkpoint_score_attribute="score", checkpoint_score_order="min"),
        ),
    )
    result = trainer.fit()  # resumes the run in OUT/checkpoints if an earlier attempt left one
    if result.error:
        raise result.error
    exported = export(config, result)
    metrics = read_metrics(join(out, "metrics.jsonl"))
    vals = [m["val_loss"] for m in metrics if m.get("val_loss") is not None]
    tokens, seconds = sum(m["tokens"] for m in metrics), sum(m["step_s"] for m in metrics)
    summary = {
        "complete": True,
        "steps": metrics[-1]["step"],
        "final_loss": metrics[-1]["loss"],
        "final_val_loss": vals[-1] if vals else None,
        **exported,
        "tokens_per_s": tokens / seconds if seconds else None,
        "wall_s": round(time.monotonic() - t0, 3),
        "split": prepared["split"],
        "examples": prepared["examples"],
        "skipped": prepared["skipped"],
        "soft_examples": prepared["soft_examples"],
        "padding_waste": prepared["padding_waste"],
        "padding_waste_unpacked": prepared["padding_waste_unpacked"],
        "data": config.data, "student": config.student, "task": prepared["task"], "teacher": prepared["teacher"],
        "workers": config.workers, "device": "gpu" if use_gpu else "cpu", "precision": precision,
        "cpu": describe(flags),
        "adapter": join(out, "adapter"),
        "config": config.model_dump(),
    }
    write_json(summary_path, summary)
    log.info("trained %d steps: loss %.4f, val loss %s, %.0f tokens/s; adapter %s", summary["steps"],
             summary["final_loss"], summary["final_val_loss"], summary["tokens_per_s"] or 0, summary["adapter"])
    return summary


def check_rerun(config: TrainConfig) -> None:
    """A rerun into the same OUT resumes; it must then train the same thing."""
    path = join(config.output, "train_run.json")
    fingerprint = {k: v for k, v in config.model_dump().items() if k not in RERUN_FREE}
    previous = read_json(path)
    if previous is not None and previous != fingerprint:
        changed = sorted(k for k in fingerprint if previous.get(k) != fingerprint[k])
        raise ConfigError(f"{config.output} already holds a training run with different settings "
                          f"({', '.join(changed)}); use a new output directory or delete this one")
    write_json(path, fingerprint)


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("train", help="LoRA student learns the teacher's answers without the prompt")
    p.add_argument("--data", help="generation output directory (reads DATA/data/*.parquet)")
    p.add_argument("--output", help="output directory (adapter/, metrics.jsonl, split.parquet, checkpoints/)")
    p.add_argument("--student", help="student model folder or name (default: SmolLM2-135M-Instruct)")
    p.add_argument("--workers", type=int, help="Ray Train workers (FSDP2 over them)")
    p.add_argument("--config", help="YAML file with TrainConfig fields (command-line options override it)")
    p.set_defaults(func=_cli)


def _cli(args) -> None:
    from distill.config import load_config
    from distill.training import TrainDataError

    try:
        config = load_config(TrainConfig, args.config, data=args.data, output=args.output, student=args.student,
                             workers=args.workers)
        summary = main(config)
    except TrainDataError as err:
        raise ConfigError(str(err)) from None
    print(json.dumps({k: summary[k] for k in ("steps", "final_loss", "final_val_loss", "best_val_loss",
                                              "tokens_per_s", "padding_waste", "split", "skipped")}, indent=2))
    print(f"adapter: {summary['adapter']}\nmetrics: {join(config.output, 'metrics.jsonl')}")
