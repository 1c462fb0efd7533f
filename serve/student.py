"""How the student engine serves the student: its base with LoRA adapters, or the task's adapter folded into the
base ("merged"), decided once at start-up.

vLLM's CPU build has no fast LoRA path: measured after `make demo`, the student with its adapter answered with a
p50 of 0.994 s against the prompted teacher's 0.395 s (2.5x slower, 13.9x with 16 in flight), while the same
student merged answered in 0.44x the teacher's time; and it cannot serve LoRA on mixture-of-experts models at all.
So where one task adapter is served on a CPU engine, `student.serving: auto` (the default) folds it into the base
once and serves the merged model; several adapters on one base, or `serving: lora`, keep LoRA.

The merged model is cached beside the adapter (`<adapter>-merged`, or `student.merged_dir`) with a marker file
naming the base and the sha256 of the adapter's files: a later start with the same adapter reuses it, a retrained
adapter is merged again. The merge is `distill.student_model.merge_adapter`, run as a Ray task (so on a worker node, and
the result lands where every node reads it).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass
from typing import Optional

from distill.config import ConfigError
from distill.storage import join, list_files, read_json, resolve, write_json

log = logging.getLogger("distill.serve.student")

MARKER = "distill_merged.json"  # written last: the merged folder is complete and of this adapter


@dataclass(frozen=True)
class StudentServing:
    """What the student engine serves, for the log, /v1/models and /stats."""
    mode: str                       # merged | lora | plain
    why: str
    base: str
    adapters: dict                  # what the config names (served under these names in every mode)
    engine_model: str               # the model the engine loads
    engine_adapters: dict           # the adapters the engine loads (LoRA)
    adapter_sha256: Optional[str] = None
    merged_now: Optional[bool] = None  # merged at this start (False: the cached merge was reused)

    def as_dict(self) -> dict:
        return asdict(self)


def has_experts(adapter: str) -> bool:
    from distill.student_model import adapter_has_experts

    return adapter_has_experts(read_json(join(adapter, "adapter_config.json")) or {})


def serving_mode(setting: str, adapters: dict[str, str], task_name: str, device: str) -> tuple[str, str]:
    """(merged | lora | plain, why) for the student engine. A ConfigError for a combination that cannot be
    served."""
    if not adapters:
        return "plain", "no adapter: the student model is served as it is (a merged student, or the bare base)"
    moe = sorted(name for name, path in adapters.items() if has_experts(path))
    if setting == "merged" or (setting == "auto" and len(adapters) == 1 and device == "cpu"):
        if len(adapters) != 1:
            raise ConfigError(f"student.serving: merged folds one adapter into the base, and {len(adapters)} are "
                              f"configured ({', '.join(sorted(adapters))}); serve them with LoRA (serving: lora, "
                              f"on a GPU) or one per application")
        why = ("vLLM's CPU build cannot serve LoRA on a mixture-of-experts model" if moe else
               "vLLM's CPU build has no fast LoRA path (the adapter made the student 2.5x slower than the prompted "
               "teacher, merged it is faster)") if device == "cpu" else "student.serving: merged"
        return "merged", f"{why}: the task's adapter is folded into the base once"
    if device == "cpu" and moe:
        raise ConfigError(f"adapters {moe} adapt mixture-of-experts weights, which vLLM's CPU build cannot serve "
                          f"with LoRA: serve one adapter merged (student.serving: merged) or use GPUs")
    if setting == "lora":
        return "lora", "student.serving: lora"
    if len(adapters) > 1:
        return "lora", f"{len(adapters)} adapters share one base engine (LoRA)"
    return "lora", f"LoRA on {device}: the adapter costs little there, and the engine can take more adapters"


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


def merged_location(adapter: str, merged_dir: Optional[str]) -> str:
    return merged_dir or adapter.rstrip("/") + "-merged"


def fold(base: str, adapter: str, dest: str) -> tuple[str, bool]:
    """The merged model at `dest`, merged now unless a merge of the same base and adapter is there already.
    Returns (sha256 of the adapter, merged now)."""
    from distill.student_model import merge_adapter_on_cluster

    expected = {"base": base, "adapter": adapter, "adapter_sha256": adapter_digest(adapter)}
    marker = read_json(join(dest, MARKER)) or {}
    if {k: marker.get(k) for k in expected} == expected:
        log.info("student: reusing the merged model at %s (base %s + adapter %s, sha256 %s)", dest, base, adapter,
                 expected["adapter_sha256"][:12])
        return expected["adapter_sha256"], False
    t0 = time.monotonic()
    log.info("student: folding the adapter %s into %s once, into %s", adapter, base, dest)
    merge_adapter_on_cluster(base, adapter, dest)
    write_json(join(dest, MARKER), {**expected, "merged_at": time.time()})
    log.info("student: merged in %.1fs", time.monotonic() - t0)
    return expected["adapter_sha256"], True


def prepare(student, task_name: str, device: str) -> StudentServing:
    """Decide how to serve the student (a `StudentArmConfig` already through resolve_config) and, when merged,
    make sure the merged model exists. Logs the decision."""
    mode, why = serving_mode(student.serving, student.adapters, task_name, device)
    if mode != "merged":
        serving = StudentServing(mode, why, student.model, dict(student.adapters), student.model,
                                 dict(student.adapters))
    else:
        adapter = student.adapters[task_name]
        dest = merged_location(adapter, student.merged_dir)
        digest, merged_now = fold(student.model, adapter, dest)
        serving = StudentServing(mode, why, student.model, dict(student.adapters), dest, {}, digest, merged_now)
    log.info("student engine: %s (%s); loads %s%s", mode, why, serving.engine_model,
             f" with LoRA {sorted(serving.engine_adapters)}" if serving.engine_adapters else "")
    return serving
