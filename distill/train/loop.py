"""The student's Ray Train run: the loop every worker runs (`train_loop`: FSDP2-sharded LoRA student, packed
micro-batches, validation, checkpoint selection, early stopping), the `TorchTrainer` that launches it (`fit`), the
chosen checkpoint's adapter copied out (`export`), and the stage's summary (`train_summary`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional

import pyarrow.fs as pafs

from distill.console import Progress, Watching
from distill.checkpoints import MetricsLog, attempts_wall_s, export_adapter, load_checkpoint, save_checkpoint
from distill.storage import join, resolve, staged_dir
from distill.tasks import TaskSpec
from distill.train.config import TrainConfig
from distill.train.data import PreparedData
from distill.train.mesh import MeshLayout, device_mesh, mesh_layout
from distill.train.examples import rank_steps, read_examples, shard_evenly
from distill.train.step import collate, greedy_agreement, lr_factor, packed_attention, token_losses

log = logging.getLogger("distill.train")  # the stage's name on its log lines, wherever the code lives


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
    """What every Ray Train worker runs (TorchTrainer's train_loop_per_worker; `fit` builds `args`): the sharded
    student, resumed or started, trains the planned steps from this rank's shard; validation, checkpoint selection
    and early stopping every `eval_every` steps."""
    worker = Worker(args)
    config, total = worker.config, worker.prep.steps
    for step, micros, started in worker.planned_steps():
        chaos(config, worker.fs, worker.out, step + 1, worker.rank, worker.world)
        row = worker.train_step(step, micros, started)
        done = step + 1
        save = done % config.checkpoint_every == 0 or done == total
        stop = False
        if save or done % config.eval_every == 0:
            row.update(worker.validate(), sharding=worker.sharding.describe())
            improved, stop = worker.judge(row)
            stop = stop and done < total
            save = save or improved or stop  # the best so far is always kept (export may pick it), and the last
            if stop:
                row["early_stop"] = True
        worker.record(row, save)
        if stop:
            log.info("early stop after step %d: no better score in %d validations", done, worker.state["since_best"])
            break


class Worker:
    """One Ray Train worker's part of a run: the FSDP2-sharded LoRA student, its optimizer and schedule, its
    shard of the step plan, and its slice of the validation examples."""

    def __init__(self, args: dict):
        import ray.train
        import ray.train.torch
        import torch
        from torch.distributed.fsdp import MixedPrecisionPolicy
        from transformers import AutoTokenizer

        from distill.checkpoints import load_adapter_weights
        from distill.student_model import build_sharded_student

        self.config: TrainConfig = args["config"]  # the driver's config, pickled
        config = self.config
        self.prep: PreparedData = args["prepared"]
        self.placement: Placement = args["placement"]
        self.select_by: str = args["select_by"]
        self.fs, self.out = args["output"]  # OUT's filesystem and path, resolved on the driver
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(config.cpus_per_worker)))  # the cores Ray reserved for this worker
        self.sharding = self.sharding_layout()
        precision = self.placement.precision
        # bf16: base stored in bf16 and every parameter cast to bf16 for compute, gradients reduced in fp32.
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if precision == "bf16" else MixedPrecisionPolicy()
        self.model, _ = build_sharded_student(
            config.student, config.lora.target_modules, config.lora.rank, config.lora.alpha, config.lora.dropout,
            config.seed, torch.float32 if precision == "fp32" else torch.bfloat16, self.device,
            packed_attention() if config.packing else "sdpa",
            config.gradient_checkpointing if config.gradient_checkpointing is not None else self.placement.use_gpu,
            policy, device_mesh(self.sharding, self.device.type))
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        total = self.prep.steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total, config.warmup_fraction, config.min_lr_ratio))
        self.state = {"step": 0, "elapsed_s": 0.0, "best_score": None, "since_best": 0}
        checkpoint = ray.train.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as path:
                self.state.update(load_checkpoint(path, self.model, self.optimizer, self.scheduler))
            log.info("worker %d resumes after step %d", self.rank, self.state["step"])
        elif config.init_adapter:
            load_adapter_weights(self.model, config.init_adapter)
        self.metrics_log = MetricsLog(self.fs, f"{self.out}/metrics.jsonl", self.rank == 0, self.state["step"])
        self.val = read_examples(self.fs, self.prep.validation)
        self.task = TaskSpec.model_validate(args["task"]) if args["task"] else None
        self.tokenizer = AutoTokenizer.from_pretrained(config.student)
        self.examples_seen = sum(self.prep.step_examples[:self.state["step"]])
        self.t_start = time.monotonic() - self.state["elapsed_s"]

    def sharding_layout(self) -> MeshLayout:
        """FSDP2 over every worker on one node, HSDP (shard within a node, replicate across) when the run spans
        nodes, or the shard groups the config sets; every rank learns every rank's node to decide the same."""
        import ray
        import torch.distributed as dist

        nodes: list = [None] * self.world
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
        layout = mesh_layout(nodes, self.config.shard_group_size)
        if self.rank == 0:
            log.info("training workers on %d node(s): %s", len(set(nodes)), layout.describe())
        return layout

    def planned_steps(self):
        """(step, micro-batches of examples, when the step started) for every step from the resumed one to the
        last: this rank's shard, streamed, and empty micro-batches where the plan gave this rank nothing. A step's
        time includes reading the next step's rows from the shard."""
        stream = rank_steps(self.fs, self.prep.shards[self.rank], self.state["step"], self.config.gradient_accumulation)
        pending = next(stream, None)
        for step in range(self.state["step"], self.prep.steps):
            started = time.monotonic()
            if pending is not None and pending[0] == step:
                micros, pending = pending[1], next(stream, None)
            else:
                micros = [[] for _ in range(self.config.gradient_accumulation)]
            yield step, micros, started

    def all_sum(self, *values: float) -> list[float]:
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def micro_batch(self, examples: list) -> tuple[dict, float]:
        """(batch, weight). A rank with nothing in this slot still runs a forward/backward (FSDP's gathers are
        collective) on one validation example whose loss counts zero."""
        pad_id = self.placement.pad_id
        return (collate(examples, self.config.packing, pad_id), 1.0) if examples \
            else (collate([self.val[0]], self.config.packing, pad_id), 0.0)

    def train_step(self, step: int, micros: list[list], started: float) -> dict:
        """One optimizer step over the step's micro-batches; its metrics row."""
        import torch

        config, prep, model = self.config, self.prep, self.model
        torch.manual_seed(config.seed * 1_000_003 + step * 1_009 + self.rank)  # dropout: same on every (re)run
        # Every target token of the step weighs the same, whichever rank and micro-batch it is in: divide the
        # summed token losses by the step's target count (x world size, since FSDP averages gradients).
        n_targets = prep.step_targets[step]
        loss_sum = 0.0
        for i, examples in enumerate(micros):
            model.set_requires_gradient_sync(i == len(micros) - 1)  # reduce gradients once per step
            batch, weight = self.micro_batch(examples)
            s, _ = token_losses(model, batch, prep.soft_weight, prep.objective)
            (s * (weight * self.world / n_targets)).backward()
            loss_sum += weight * float(s.detach())
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.trainable, config.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        (loss_sum,) = self.all_sum(loss_sum)
        step_s = time.monotonic() - started
        self.examples_seen += prep.step_examples[step]
        done = step + 1
        return {"step": done, "epoch": round(done / prep.steps_per_epoch, 4), "examples": self.examples_seen,
                "loss": loss_sum / n_targets, "lr": lr, "tokens": prep.step_tokens[step], "step_s": round(step_s, 4),
                "tokens_per_s": prep.step_tokens[step] / step_s,
                "elapsed_s": round(time.monotonic() - self.t_start, 3)}

    def validate(self) -> dict:
        """Validation loss over every rank's slice, and for selection by agreement the student's own greedy
        answers against the teacher's."""
        import torch

        if not self.val:
            return {"val_loss": None}
        self.model.eval()
        loss_sum = n = 0.0
        with torch.no_grad():
            for indices in shard_evenly(len(self.val), self.config.per_device_batch_size, self.world)[self.rank]:
                batch, weight = self.micro_batch([self.val[j] for j in indices])
                s, k = token_losses(self.model, batch)
                loss_sum, n = loss_sum + weight * float(s), n + weight * k
        result = {}
        if self.select_by == "agreement":
            # Decode batches of the training micro-batch size: greedy_agreement groups prompts of similar length,
            # so small batches pad little (one batch of every validation row padded each to the longest: the
            # demo's 31 rows took ~100 s on an AVX2 CPU).
            agree, judged = greedy_agreement(self.model, self.tokenizer, self.task, self.val,
                                             self.prep.validation_answers, self.rank, self.world,
                                             self.config.per_device_batch_size)
            agree, judged = self.all_sum(agree, judged)
            result["val_agreement"] = agree / judged if judged else None
        self.model.train()
        loss_sum, n = self.all_sum(loss_sum, n)
        return {"val_loss": loss_sum / n, **result}

    def judge(self, row: dict) -> tuple[bool, bool]:
        """Score a validated row (lower is better: 1 - agreement with the validation loss breaking ties, or the
        loss) into it; (the best so far, patience ran out)."""
        if row.get("val_agreement") is not None:
            row["score"] = 1.0 - row["val_agreement"] + 1e-6 * row["val_loss"]
        else:
            row["score"] = row["val_loss"] if row.get("val_loss") is not None else row["loss"]
        improved = self.state["best_score"] is None or row["score"] < self.state["best_score"]
        if improved:
            self.state["best_score"], self.state["since_best"] = row["score"], 0
        else:
            self.state["since_best"] += 1
        patience = self.config.early_stopping_patience
        return improved, bool(patience) and self.state["since_best"] >= patience

    def record(self, row: dict, save: bool) -> None:
        """The metrics log, and at validations a report to Ray Train (a barrier across workers) with the
        checkpoint when one is saved."""
        import ray.train

        if row["step"] % self.config.log_every == 0 or "score" in row:
            self.metrics_log.write(row)
        if "score" not in row:
            return
        self.metrics_log.flush()
        path = save_checkpoint(self.model, self.optimizer, self.scheduler, {
            "step": row["step"], "elapsed_s": row["elapsed_s"], "best_score": self.state["best_score"],
            "since_best": self.state["since_best"]}, self.rank) if save else None
        ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(path) if path else None,
                         checkpoint_dir_name=f"step_{row['step']:06d}" if save else None)
        if path:
            shutil.rmtree(path, ignore_errors=True)  # Ray copied it to storage and does not delete it


@dataclass(frozen=True)
class Placement:
    """Where and how the workers compute, decided once on the driver for every Ray Train run of a training."""
    use_gpu: bool
    precision: str  # "bf16" | "fp32"
    pad_id: int     # the student tokenizer's padding token (its end of text when it has none)


def fit(config: TrainConfig, prepared: PreparedData, task, select_by: str, placement: Placement):
    """One Ray Train run of `train_loop` over prepared shards, into config.output/checkpoints (resumed if an
    earlier attempt left one there)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    fs, out_path = resolve(config.output)
    trainer = TorchTrainer(
        train_loop,
        # The workers get OUT as the filesystem object the driver resolved (endpoint, region and all), so they
        # read their shards and rank 0 writes metrics from whichever node they land on.
        train_loop_config={"config": config, "prepared": prepared, "placement": placement, "output": (fs, out_path),
                           "task": task.model_dump() if task else None, "select_by": select_by},
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=placement.use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker}),
        run_config=RunConfig(
            name="checkpoints", storage_path=out_path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints,
                                               checkpoint_score_attribute="score", checkpoint_score_order="min"),
        ),
    )
    with Watching(Progress("train", prepared.steps, "steps"), partial(steps_logged, fs, f"{out_path}/metrics.jsonl")):
        result = trainer.fit()
    if result.error:
        raise result.error
    return result


def steps_logged(fs, path: str) -> tuple[int, str]:
    """The last step rank 0 logged in OUT/metrics.jsonl and its loss (the driver's view of training progress)."""
    with fs.open_input_stream(path) as f:
        lines = f.read().decode().strip().splitlines()
    if not lines:
        return 0, ""
    row = json.loads(lines[-1])
    note = f"loss {row['loss']:.3f}" if row.get("loss") is not None else ""
    if row.get("val_agreement") is not None:
        note += f", validation agreement {row['val_agreement']:.0%}"
    return int(row["step"]), note


def export(config: TrainConfig, result, placement: Placement) -> dict[str, Any]:
    """The chosen checkpoint's LoRA weights as a PEFT adapter in OUT/adapter (whole, see `staged_dir`), exported
    once here from the sharded checkpoint; optionally merged into the base by a Ray task (OUT/merged, with the
    marker that lets evaluation and serving reuse it)."""
    from distill.student_serving import fold

    scored = [(m["score"], m["step"], m, c) for c, m in (result.best_checkpoints or [])]
    if not scored:
        raise RuntimeError("training finished without a checkpoint")
    _, best_step, best, best_checkpoint = min(scored, key=lambda t: (t[0], t[1]))
    chosen = best_checkpoint if config.export == "best" else result.checkpoint
    with checkpoint_parts(chosen, ("model", "adapter_config.json", "trainer_state.json")) as path:
        chosen_step = json.loads(Path(path, "trainer_state.json").read_text())["step"]
        with staged_dir(join(config.output, "adapter")) as staging:
            export_adapter(path, staging)
    if config.merge:
        fold(config.student, join(config.output, "adapter"), join(config.output, "merged"),
             "gpu" if placement.use_gpu else "cpu")
    return {"best_val_loss": best.get("val_loss"), "best_val_agreement": best.get("val_agreement"),
            "best_step": best_step, "adapter_step": chosen_step, "sharding": best.get("sharding")}


@contextmanager
def checkpoint_parts(checkpoint, parts: tuple[str, ...]):
    """A local folder with only these files and folders of a Ray checkpoint: exporting the adapter reads the LoRA
    weights, not the optimizer states that are two thirds of a checkpoint (~10 GB for the 30B MoE student)."""
    with tempfile.TemporaryDirectory(prefix="distill-export-") as local:
        for part in parts:
            if checkpoint.filesystem.get_file_info(f"{checkpoint.path}/{part}").type == pafs.FileType.Directory:
                os.makedirs(f"{local}/{part}")  # copy_files fills a folder; it does not make it
            pafs.copy_files(f"{checkpoint.path}/{part}", f"{local}/{part}", source_filesystem=checkpoint.filesystem,
                            destination_filesystem=pafs.LocalFileSystem())
        yield local


def train_summary(config: TrainConfig, prepared: PreparedData, exported: dict, rounds: Optional[list[dict]],
                  metrics: list[dict], select_by: str, use_gpu: bool, precision: str, flags,
                  wall_this_run: float) -> dict[str, Any]:
    """OUT/train_summary.json: what was trained on what, how it went, and what it cost. `rounds` is None for sft,
    the on-policy rounds otherwise; `metrics` is OUT/metrics.jsonl; `flags` the cluster's CPU flags."""
    from distill.hardware import describe

    out = config.output
    vals = [m for m in metrics if m.get("val_loss") is not None]
    tokens, seconds = sum(m["tokens"] for m in metrics), sum(m["step_s"] for m in metrics)
    return {
        "complete": True, "method": config.method, "rounds": rounds,
        "steps": metrics[-1]["step"], "planned_steps": prepared.steps if rounds is None else
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
        "split": prepared.split, "examples": prepared.examples, "skipped": prepared.skipped,
        "soft_labels": prepared.soft_labels if rounds is None else "on-policy: reverse KL to the teacher's top-k",
        "soft_label_weight": prepared.soft_weight, "soft_examples": prepared.soft_examples,
        "padding_waste": prepared.padding_waste, "padding_waste_unpacked": prepared.padding_waste_unpacked,
        "data": config.data, "extra_data": config.extra_data, "held_out_from": config.held_out_from,
        "student": config.student, "task": prepared.task, "teacher": prepared.teacher,
        "workers": config.workers, "device": "gpu" if use_gpu else "cpu", "precision": precision,
        "gradient_checkpointing": (config.gradient_checkpointing if config.gradient_checkpointing is not None
                                   else use_gpu),
        "cpu": describe(flags),
        "adapter": join(out, "adapter"), "merged": join(out, "merged") if config.merge else None,
        "config": config.model_dump(),
    }
