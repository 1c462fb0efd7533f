"""Training checkpoints and the metrics log, readable from any node (local paths or object-store URIs).

A checkpoint is a folder with `model/` (the LoRA weights) and `optim/` (the AdamW states), both sharded
torch.distributed.checkpoint folders that every rank writes its own part of, plus `adapter_config.json`,
`scheduler.pt` and `trainer_state.json` (step, data position, elapsed time) from rank 0; Ray Train uploads every
rank's part into one folder under OUT/checkpoints. It resumes on any world size. The PEFT adapter that serving
loads is exported from the chosen checkpoint once, at the end (`export_adapter`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import pyarrow.fs as pafs

from distill.storage import is_local, read_text


def adapter_key_map(model) -> dict[str, str]:
    """PEFT file key (adapter name dropped, as peft saves it) -> the model's parameter name."""
    name = _adapter_name(model)
    return {peft_file_key(k, name): k for k, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(model, optimizer, scheduler, state: dict, rank: int) -> str:
    """Every rank writes its own shard of the LoRA weights (`model/`) and of the AdamW states (`optim/`) with
    torch.distributed.checkpoint into a local folder, which it returns; rank 0 adds the adapter's config, the
    scheduler and the step. Ray Train uploads every rank's folder into the one checkpoint directory (the file names
    are per rank: `__<rank>_0.distcp`, rank 0's `.metadata`), so nothing is gathered to one rank: for the 30B MoE
    student at rank 32 (~1.3 B trainable parameters, ~15 GB with Adam states) each of 8 ranks writes ~2 GB."""
    import torch
    import torch.distributed.checkpoint as dcp
    weights, optim = _lora_state(model, optimizer)
    path = tempfile.mkdtemp(prefix="distill-ckpt-")
    dcp.save(weights, checkpoint_id=os.path.join(path, "model"))
    dcp.save(optim, checkpoint_id=os.path.join(path, "optim"))
    if rank == 0:
        model.peft_config[_adapter_name(model)].save_pretrained(path)  # adapter_config.json
        torch.save(scheduler.state_dict(), os.path.join(path, "scheduler.pt"))
        Path(path, "trainer_state.json").write_text(json.dumps(state))
    return path


def load_checkpoint(path: str, model, optimizer, scheduler) -> dict:
    """Every rank (collective): the LoRA weights and AdamW states of a checkpoint folder, each rank reading the
    parts of its own shard, on any world size and mesh (DCP reshards); returns the checkpoint's trainer state."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    weights, optim = _lora_state(model, optimizer)
    dcp.load(weights, checkpoint_id=os.path.join(path, "model"))
    dcp.load(optim, checkpoint_id=os.path.join(path, "optim"))
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim, options=_sharded())
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=False))
    return json.loads(Path(path, "trainer_state.json").read_text())


def export_adapter(checkpoint: str, dest: str) -> None:
    """A checkpoint folder's LoRA weights as a PEFT adapter folder (adapter_config.json +
    adapter_model.safetensors: loads in peft and vLLM), read from the `model/` shards in one process without a
    process group. Reads neither the optimizer states nor the base model."""
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    reader = dcp.FileSystemReader(os.path.join(checkpoint, "model"))
    shapes = reader.read_metadata().state_dict_metadata
    weights = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in shapes.items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(weights, storage_reader=reader, no_dist=True)
    config = json.loads(Path(checkpoint, "adapter_config.json").read_text())
    os.makedirs(dest, exist_ok=True)
    save_file({peft_file_key(k, config.get("adapter_name", "default")): v.contiguous() for k, v in weights.items()},
              os.path.join(dest, "adapter_model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(os.path.join(checkpoint, "adapter_config.json"), os.path.join(dest, "adapter_config.json"))


def peft_file_key(param_name: str, adapter_name: str = "default") -> str:
    """The key peft writes a LoRA parameter under: its model name without the adapter's name."""
    return param_name.replace(f".{adapter_name}.", ".")


def _adapter_name(model) -> str:
    return model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]


def _lora_state(model, optimizer) -> tuple[dict, dict]:
    """This rank's shards of the trainable weights and their AdamW states. Filtered by name as well: a tied output
    head (`lm_head.weight`, the frozen embedding under another name) is not a parameter of its own, so
    `ignore_frozen_params` keeps it in the state dict."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, optimizer, options=_sharded())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    kept = {k: v for k, v in weights.items() if k in trainable}
    if len(kept) != len(trainable):
        raise RuntimeError(f"checkpoint: {len(trainable)} trainable parameters, {len(kept)} of them in the state dict")
    return kept, optim


def _sharded():
    """State-dict options of checkpoints: each rank's own shards (DTensors), the trainable LoRA weights only (the
    frozen base is read from the student's own files)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=False, ignore_frozen_params=True, strict=False)


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
