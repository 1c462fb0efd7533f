"""How a distilled student is served, decided in one place for every engine that runs it — evaluation, on-policy
sampling and `distill serve` — so the report describes the artifact that ships.

- On GPUs: the base + the LoRA adapter (vLLM's LoRA, fused MoE experts included), nothing merged.
- On CPUs: vLLM's CPU build has no fast LoRA path (the adapter made the student 2.5x slower than the prompted
  teacher; merged it was faster) and no LoRA for MoE experts at all, so one task's adapter is folded into the base
  once, and that merged model is what every stage loads.

A merge is cached beside the adapter (`<adapter>-merged`, or a folder the caller names) with a marker naming the
base and the sha256 of the adapter's files: a later stage with the same adapter reuses it, a retrained adapter is
merged again. It runs as a Ray task with the resources it needs reserved: on a CPU node, in float32 (no rounding of
the LoRA product into bf16 first) only where the float32 model fits a node's memory; on a GPU, in the base's dtype.
Where it fits nowhere it is refused with both figures, before anything loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from dataclasses import asdict, dataclass
from typing import Optional

from distill.config import ConfigError
from distill.storage import join, list_files, read_json, resolve, write_json

log = logging.getLogger("distill.student_serving")

MARKER = "distill_merged.json"  # written last: the merged folder is complete and of this adapter
GIB = 1024**3


@dataclass(frozen=True)
class StudentArtifact:
    """What an engine loads to run the distilled student, and why."""
    mode: str                          # lora | merged | plain
    why: str
    base: str                          # the student's base model
    adapters: dict                     # task name -> adapter folder, as configured
    engine_model: str                  # the model the engine loads
    engine_adapters: dict              # the adapters the engine loads with LoRA (none when merged)
    adapter_sha256: Optional[str] = None
    merged_now: Optional[bool] = None  # merged at this start (False: an earlier merge was reused)

    @property
    def engine_adapter(self) -> Optional[str]:
        """The one LoRA adapter a single-task engine loads (None when merged or plain)."""
        return next(iter(self.engine_adapters.values()), None)

    def as_dict(self) -> dict:
        return asdict(self)


def has_experts(adapter: str) -> bool:
    """An adapter of fused MoE expert weights (peft target_parameters): vLLM's CPU build cannot serve it."""
    from distill.student_model import adapter_has_experts

    return adapter_has_experts(read_json(join(adapter, "adapter_config.json")) or {})


def serving_mode(setting: str, adapters: dict[str, str], device: str) -> tuple[str, str]:
    """(merged | lora | plain, why). `setting`: auto | merged | lora. A ConfigError for what cannot be served."""
    if not adapters:
        return "plain", "no adapter: the student model is served as it is (a merged student, or the bare base)"
    moe = sorted(name for name, path in adapters.items() if has_experts(path))
    if setting == "merged" or (setting == "auto" and len(adapters) == 1 and device == "cpu"):
        if len(adapters) != 1:
            raise ConfigError(f"serving merged folds one adapter into the base, and {len(adapters)} are configured "
                              f"({', '.join(sorted(adapters))}); serve them with LoRA (serving: lora, on a GPU) or "
                              f"one per application")
        why = ("vLLM's CPU build cannot serve LoRA on a mixture-of-experts model" if moe else
               "vLLM's CPU build has no fast LoRA path (the adapter made the student 2.5x slower than the prompted "
               "teacher, merged it is faster)") if device == "cpu" else "serving: merged"
        return "merged", f"{why}: the task's adapter is folded into the base once"
    if device == "cpu" and moe:
        raise ConfigError(f"adapters {moe} adapt mixture-of-experts weights, which vLLM's CPU build cannot serve "
                          f"with LoRA: serve one adapter merged (serving: merged) or use GPUs")
    if setting == "lora":
        return "lora", "serving: lora"
    if len(adapters) > 1:
        return "lora", f"{len(adapters)} adapters share one base engine (LoRA)"
    return "lora", (f"LoRA on {device}" + (", fused MoE experts included" if moe else "")
                    + ": the adapter costs little there, nothing to merge or store twice")


def student_artifact(base: str, adapters: dict[str, str], setting: str, device: str, task_name: Optional[str] = None,
                     merged_dir: Optional[str] = None) -> StudentArtifact:
    """Decide how the student is served and, when merged, make sure the merged model exists (merging it now, or
    reusing an earlier merge of the same base and adapter). Logs the decision."""
    mode, why = serving_mode(setting, adapters, device)
    if mode != "merged":
        artifact = StudentArtifact(mode, why, base, dict(adapters), base, dict(adapters))
    else:
        adapter = adapters[task_name] if task_name in adapters else next(iter(adapters.values()))
        dest = merged_location(adapter, merged_dir)
        digest, merged_now = fold(base, adapter, dest, device)
        artifact = StudentArtifact(mode, why, base, dict(adapters), dest, {}, digest, merged_now)
    log.info("student engine: %s (%s); loads %s%s", mode, why, artifact.engine_model,
             f" with LoRA {sorted(artifact.engine_adapters)}" if artifact.engine_adapters else "")
    return artifact


def adapter_digest(adapter: str) -> str:
    """sha256 over the adapter folder's files (names and contents), read in pieces (local or URI)."""
    digest = hashlib.sha256()
    files = list_files(adapter, ("",))  # every file; hidden and _-prefixed ones are not the adapter's
    if not files:
        raise ConfigError(f"{adapter}: an empty adapter folder")
    for path in files:
        digest.update(path[len(adapter.rstrip("/")):].encode())
        fs, p = resolve(path)
        with fs.open_input_stream(p) as f:
            while piece := f.read(8 << 20):
                digest.update(piece)
    return digest.hexdigest()


def merged_location(adapter: str, merged_dir: Optional[str] = None) -> str:
    """Where an adapter's merged model is kept: the folder named, else beside the adapter."""
    return merged_dir or adapter.rstrip("/") + "-merged"


def fold(base: str, adapter: str, dest: str, device: str = "cpu") -> tuple[str, bool]:
    """The merged model at `dest`, merged now unless a merge of the same base and adapter is there already.
    Returns (sha256 of the adapter, merged now)."""
    expected = {"base": base, "adapter": adapter, "adapter_sha256": adapter_digest(adapter)}
    marker = read_json(join(dest, MARKER)) or {}
    if {k: marker.get(k) for k in expected} == expected:
        log.info("student: reusing the merged model at %s (base %s + adapter %s, sha256 %s)", dest, base, adapter,
                 expected["adapter_sha256"][:12])
        return expected["adapter_sha256"], False
    t0 = time.monotonic()
    log.info("student: folding the adapter %s into %s once, into %s", adapter, base, dest)
    merge_on_cluster(base, adapter, dest, device)
    write_json(join(dest, MARKER), {**expected, "merged_at": time.time()})
    log.info("student: merged in %.1fs", time.monotonic() - t0)
    return expected["adapter_sha256"], True


# ----------------------------------------------------------------------------------------------------------------
# The merge, with its resources reserved
@dataclass(frozen=True)
class MergeNeeds:
    """What merging a model of `parameters` needs where it runs."""
    parameters: int
    device: str          # cpu | gpu
    dtype: str           # what the merge computes in
    memory_bytes: int    # host memory reserved for the task
    gpu_bytes: int = 0   # GPU memory the merge holds (gpu only)


def merge_needs(parameters: int, base_dtype_bytes: int, device: str) -> MergeNeeds:
    """CPU: float32 base (4 B/param) + its cast to the base's dtype to save, + 1 GiB. GPU: the base in its own dtype
    on one GPU; the host holds one layer's shards at a time while loading (reserve a tenth of the model + 4 GiB)."""
    if device == "gpu":
        size = parameters * base_dtype_bytes
        return MergeNeeds(parameters, "gpu", "base", size // 10 + 4 * GIB, size + GIB)
    return MergeNeeds(parameters, "cpu", "float32", parameters * (4 + base_dtype_bytes) + GIB)


def check_merge_fits(needs: MergeNeeds, node_memory: list[int], gpu_memory: Optional[int], model: str) -> None:
    """A ConfigError naming both figures when no node can hold the merge."""
    largest = max(node_memory, default=0)
    if needs.memory_bytes > largest:
        raise ConfigError(f"merging an adapter into {model} ({needs.parameters / 1e9:.2f} B parameters) on "
                          f"{needs.device} needs {needs.memory_bytes / GIB:.1f} GiB of memory on one node; the "
                          f"largest node has {largest / GIB:.1f} GiB: serve the adapter with LoRA on GPUs instead")
    if needs.device == "gpu" and gpu_memory is not None and needs.gpu_bytes > gpu_memory:
        raise ConfigError(f"merging an adapter into {model} on one GPU needs {needs.gpu_bytes / GIB:.1f} GiB of GPU "
                          f"memory; the GPUs have {gpu_memory / GIB:.1f} GiB: serve the adapter with LoRA instead")


def checkpoint_parameters(model: str) -> tuple[int, int]:
    """(parameters, bytes per parameter) of a model's safetensors checkpoint, from the files' headers alone (a local
    folder), or from the hub's safetensors metadata (a hub name)."""
    if os.path.isdir(model):
        files = [f for f in os.listdir(model) if f.endswith(".safetensors")]
        if not files:
            raise ConfigError(f"{model}: no .safetensors files to size the merge by")
        count, size = 0, 0
        for name in files:
            with open(os.path.join(model, name), "rb") as f:
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                n = 1
                for d in info["shape"]:
                    n *= d
                count += n
                size += info["data_offsets"][1] - info["data_offsets"][0]
        return count, max(1, round(size / max(count, 1)))
    try:
        from huggingface_hub import get_safetensors_metadata

        counts = get_safetensors_metadata(model).parameter_count
    except Exception as err:
        raise ConfigError(f"{model}: cannot size the merge (not a local folder; the hub's metadata: {err})") from None
    widths = {"F32": 4, "BF16": 2, "F16": 2}
    total = sum(counts.values())
    return total, round(sum(widths.get(k, 2) * v for k, v in counts.items()) / total)


def merge_on_cluster(base: str, adapter: str, dest: str, device: str = "cpu") -> str:
    """`distill.student_model.merge_adapter` as a Ray task on a node that can hold it (memory reserved; on GPUs one
    GPU), so that the merge never runs on a head that takes no work, and the result lands where every node reads
    it (`dest`: the output URI)."""
    import ray

    from distill.student_model import merge_adapter

    parameters, width = checkpoint_parameters(base)
    needs = merge_needs(parameters, width, device)
    if device == "cpu":  # GPU nodes may be still to come (autoscaling): the task checks its GPU before loading
        check_merge_fits(needs, [int(n["Resources"].get("memory", 0)) for n in ray.nodes() if n.get("Alive")],
                         None, base)
    task = ray.remote(num_cpus=1, num_gpus=1 if device == "gpu" else 0, memory=needs.memory_bytes)(merge_adapter)
    return ray.get(task.remote(base, adapter, dest, device, needs))
