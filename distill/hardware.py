"""What the hardware can do, decided in one place: the CPU's instruction set, and from it the dtype of every
engine (generation, evaluation, serving, bench) and the precision of training.

Why it matters: vLLM's CPU build runs bfloat16 at full speed only with native bf16 instructions (AVX512_BF16 or
AMX). On an AVX2 CPU (most laptops) it logs "Failed to create oneDNN linear, fallback to torch linear" and crawls
(measured: SmolLM2 with the language-id prompt, 0.18 rows/s in bf16 against 0.59 in float32), so `auto` picks
float32 there. GPUs get bfloat16.

The decisions are pure functions of CPU feature flags (unit-tested with made-up flags); `cpu_flags()` reads the
flags of this machine, `cluster_cpu_flags()` those that every CPU node of a Ray cluster shares (an engine may be
placed on any of them, and the driver can sit on a head of another kind).
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from typing import Iterable, Literal, Optional

log = logging.getLogger("distill.hardware")

EngineDtype = Literal["auto", "bfloat16", "float16", "float32"]
Precision = Literal["auto", "fp32", "bf16", "bf16-base"]

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


# oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA), as a prefix of its value -> the flag families it forbids. Capped, oneDNN
# and ATen (with ATEN_CPU_CAPABILITY=avx2) run as on a CPU without them, so the dtype rule must see that CPU: an
# AVX-512 machine capped at AVX2 gets float32 engines, as a laptop would (vLLM's own kernels still use the CPU's
# full ISA, so the emulation is close, not exact).
ISA_CAPS = (("AVX512_CORE_AMX", ()), ("AVX512_CORE_BF16", ("amx",)), ("AVX512_CORE_FP16", ("amx",)), ("AVX10", ("amx",)),
            ("AVX512_CORE", ("amx", "avx512_bf16")), ("AVX2", ("amx", "avx512")), ("AVX", ("amx", "avx512", "avx2")),
            ("SSE", ("amx", "avx512", "avx2")))


def capped_flags(flags: Iterable[str], max_isa: Optional[str]) -> frozenset[str]:
    """`flags` without those an ONEDNN_MAX_CPU_ISA value forbids (ALL, DEFAULT or unset: all kept)."""
    flags = frozenset(flags)
    cap = (max_isa or "").strip().upper()
    for prefix, forbidden in ISA_CAPS:
        if cap.startswith(prefix):
            return frozenset(f for f in flags if not f.startswith(forbidden))
    return flags


def cpu_flags() -> frozenset[str]:
    """The feature flags of this machine's CPU (Linux /proc/cpuinfo; empty elsewhere), less those that
    ONEDNN_MAX_CPU_ISA caps away."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return capped_flags(line.split(":", 1)[1].split(), os.environ.get("ONEDNN_MAX_CPU_ISA"))
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_kind(flags: Iterable[str]) -> str:
    """The instruction-set family that decides kernel speed: 'amx', 'avx512-bf16', 'avx512', 'avx2' or 'other'."""
    flags = set(flags)
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512-bf16"
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "other"


def native_bf16(flags: Iterable[str]) -> bool:
    """True when the CPU computes bfloat16 in hardware (AVX512_BF16 or AMX)."""
    return bool(NATIVE_BF16_FLAGS & set(flags))


def engine_dtype(requested: str, device: str, flags: Iterable[str]) -> str:
    """The vLLM dtype for an engine: what the user set, else bfloat16 on GPUs and on CPUs with native bf16,
    float32 on every other CPU."""
    if requested != "auto":
        return requested
    if device == "gpu":
        return "bfloat16"
    return "bfloat16" if native_bf16(flags) else "float32"


def training_precision(requested: str, use_gpu: bool, flags: Iterable[str]) -> str:
    """Training precision by the same rule as the engines: bf16 (fp32 master weights, bf16 compute) on GPUs;
    on CPUs with native bf16 the frozen base in bf16 under fp32 LoRA weights (`bf16-base`), else fp32."""
    if requested != "auto":
        return requested
    if use_gpu:
        return "bf16"
    return "bf16-base" if native_bf16(flags) else "fp32"


def describe(flags: Iterable[str], model: Optional[str] = None) -> dict:
    """What the manifests, summaries, reports and benchmarks record about a CPU."""
    flags = set(flags)
    return {"model": model if model is not None else cpu_model(), "kind": cpu_kind(flags),
            "native_bf16": native_bf16(flags), "cores": os.cpu_count()}


def _probe_flags() -> list[str]:
    return sorted(cpu_flags())


@functools.lru_cache(maxsize=1)
def _cluster_flags(node_ids: tuple[str, ...]) -> frozenset[str]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(_probe_flags)
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
            for node in node_ids]
    shared: Optional[set[str]] = None
    for flags in ray.get(refs, timeout=120):
        shared = set(flags) if shared is None else shared & set(flags)
    return frozenset(shared or ())


def cluster_cpu_flags() -> frozenset[str]:
    """The CPU flags every node that offers CPUs to work shares (a zero-task probe on each), so an engine placed on
    any of them runs its dtype natively. Without a Ray cluster: this machine's flags. A head started with
    `--num-cpus 0` takes no work and is left out: its CPU says nothing about where engines run."""
    import ray

    if not ray.is_initialized():
        return cpu_flags()
    nodes = tuple(sorted(n["NodeID"] for n in ray.nodes()
                         if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0))
    if not nodes:
        return cpu_flags()
    return _cluster_flags(nodes)
