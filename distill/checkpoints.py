"""Training checkpoints and the metrics log, readable from any node (local paths or object-store URIs).

A checkpoint is a folder with `adapter/` (PEFT format: loads in peft and vLLM), `optimizer.pt`, `scheduler.pt` and
`trainer_state.json` (step, data position, elapsed time); Ray Train copies it into OUT/checkpoints. Every rank
joins the state-dict gathers (they are collective); rank 0 writes.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import pyarrow.fs as pafs

from distill.storage import is_local, read_text


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
    """Every rank: the adapter, optimizer and scheduler of a checkpoint folder; returns its trainer state."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    load_adapter_weights(model, os.path.join(path, "adapter"))
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


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl (local path or URI); none when it does not exist."""
    text = read_text(path) or ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class AttemptClock:
    """Wall time of every attempt at a stage (a run, a rerun after a crash, a resubmitted job), so that cost counts
    all of them, not the last. Each attempt keeps one small JSON object under DIR/_attempts, rewritten every
    `every_s` while it runs (a killed attempt counts up to its last write) and once more when it ends."""

    def __init__(self, folder: str, every_s: float = 30.0):
        import threading
        import time
        import uuid

        from distill.storage import join

        self.path = join(folder, "_attempts", f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}.json")
        self.every_s, self._done = every_s, threading.Event()
        self._t0 = time.monotonic()
        self._started = time.time()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _write(self, finished: Optional[bool]) -> None:
        import time

        from distill.storage import write_json

        write_json(self.path, {"started": self._started, "wall_s": round(time.monotonic() - self._t0, 3),
                               "finished": finished})

    def _beat(self) -> None:
        while not self._done.wait(self.every_s):
            try:
                self._write(None)
            except Exception:  # a flaky store must not kill the stage it only measures
                pass

    def total_s(self) -> float:
        """Seconds of every attempt so far: the earlier ones' records plus this one's own time."""
        import time

        folder = self.path.rsplit("/_attempts/", 1)[0]
        return attempts_wall_s(folder, exclude=self.path)["wall_s"] + time.monotonic() - self._t0

    def __enter__(self) -> "AttemptClock":
        self._write(None)
        self._thread.start()
        return self

    def __exit__(self, exc_type, *_) -> None:
        self._done.set()
        self._thread.join()
        self._write(exc_type is None)


def attempts_wall_s(folder: str, exclude: Optional[str] = None) -> dict:
    """{wall_s: summed over every attempt, attempts: how many} from DIR/_attempts (`exclude`: one record's path)."""
    from distill.storage import join, list_files, read_json

    records = [read_json(f) for f in list_files(join(folder, "_attempts"), suffixes=(".json",)) if f != exclude]
    records = [r for r in records if r]
    return {"wall_s": round(sum(r["wall_s"] for r in records), 3), "attempts": len(records)}


def load_adapter_weights(model, adapter: str) -> None:
    """Set the (sharded) model's LoRA weights from a PEFT adapter folder or URI (every rank; collective)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from distill.config import ConfigError
    from distill.storage import local_dir

    keys = adapter_key_map(model)
    with local_dir(adapter) as path:
        weights = load_file(os.path.join(path, "adapter_model.safetensors"))
    unknown = sorted(set(weights) - set(keys))
    missing = sorted(set(keys) - set(weights))
    if unknown or missing:
        raise ConfigError(f"init_adapter {adapter}: does not fit this student's LoRA layout ({len(missing)} tensors "
                          f"missing, e.g. {missing[:3]}; {len(unknown)} unknown, e.g. {unknown[:3]}); use the same "
                          "lora.rank and lora.target_modules it was trained with")
    set_model_state_dict(model, {keys[k]: v for k, v in weights.items()},
                         options=StateDictOptions(full_state_dict=True, strict=False))
