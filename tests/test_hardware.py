"""The one rule for engine dtype and training precision, decided from CPU feature flags (not from this machine)."""

from __future__ import annotations

import pytest

from distill.engine import EngineConfig, engine_kwargs
from distill.hardware import capped_flags, cpu_kind, engine_dtype, native_bf16, training_precision

# Feature flags as /proc/cpuinfo lists them, trimmed to what matters.
AVX2_LAPTOP = {"sse4_2", "avx", "avx2", "fma", "f16c"}
AVX512_NO_BF16 = AVX2_LAPTOP | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
AVX512_BF16 = AVX512_NO_BF16 | {"avx512_bf16", "avx512_vnni"}
SAPPHIRE_RAPIDS = AVX512_BF16 | {"amx_bf16", "amx_tile", "amx_int8"}


@pytest.mark.parametrize("flags, kind, bf16", [
    (AVX2_LAPTOP, "avx2", False), (AVX512_NO_BF16, "avx512", False), (AVX512_BF16, "avx512-bf16", True),
    (SAPPHIRE_RAPIDS, "amx", True), (set(), "other", False),
])
def test_cpu_kind_and_native_bf16(flags, kind, bf16):
    assert cpu_kind(flags) == kind and native_bf16(flags) is bf16


def test_auto_dtype_is_float32_on_avx2_and_bfloat16_with_native_bf16_or_a_gpu():
    assert engine_dtype("auto", "cpu", AVX2_LAPTOP) == "float32"
    assert engine_dtype("auto", "cpu", AVX512_NO_BF16) == "float32"  # AVX-512 alone has no bf16 arithmetic
    assert engine_dtype("auto", "cpu", AVX512_BF16) == "bfloat16"
    assert engine_dtype("auto", "cpu", SAPPHIRE_RAPIDS) == "bfloat16"
    assert engine_dtype("auto", "gpu", AVX2_LAPTOP) == "bfloat16"  # a GPU engine does not care about the host CPU
    # A dtype the user sets always wins.
    assert engine_dtype("bfloat16", "cpu", AVX2_LAPTOP) == "bfloat16"
    assert engine_dtype("float32", "gpu", SAPPHIRE_RAPIDS) == "float32"


def test_training_precision_follows_the_same_rule():
    assert training_precision("auto", False, AVX2_LAPTOP) == "fp32"
    assert training_precision("auto", False, AVX512_BF16) == "bf16-base"
    assert training_precision("auto", True, AVX2_LAPTOP) == "bf16"
    assert training_precision("fp32", True, SAPPHIRE_RAPIDS) == "fp32"


def test_engine_arguments_carry_the_resolved_dtype():
    auto = EngineConfig(max_model_len=1024)  # planned before an engine starts (distill.engine.plan_pass)
    with pytest.raises(ValueError, match="not planned"):
        engine_kwargs(EngineConfig(), "cpu", AVX2_LAPTOP)
    assert engine_kwargs(auto, "cpu", AVX2_LAPTOP)["dtype"] == "float32"
    assert engine_kwargs(auto, "cpu", SAPPHIRE_RAPIDS)["dtype"] == "bfloat16"
    assert engine_kwargs(auto, "gpu", frozenset())["dtype"] == "bfloat16"
    assert engine_kwargs(EngineConfig(dtype="bfloat16", max_model_len=1024), "cpu", AVX2_LAPTOP)["dtype"] == "bfloat16"
    # CPU engines get the small KV blocks; GPU engines keep vLLM's own unless one is set.
    assert engine_kwargs(auto, "cpu", AVX2_LAPTOP)["block_size"] == 32
    assert "block_size" not in engine_kwargs(auto, "gpu", frozenset())


@pytest.mark.parametrize("cap, kind", [
    (None, "amx"), ("ALL", "amx"), ("AVX2", "avx2"), ("avx2_vnni", "avx2"), ("AVX512_CORE", "avx512"),
    ("AVX512_CORE_BF16", "avx512-bf16"), ("AVX512_CORE_AMX", "amx"),
])
def test_a_onednn_isa_cap_makes_the_machine_count_as_the_cpu_it_emulates(cap, kind):
    # ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 machine emulates a laptop: its engines must then get float32 too.
    flags = capped_flags(SAPPHIRE_RAPIDS, cap)
    assert cpu_kind(flags) == kind
    assert engine_dtype("auto", "cpu", flags) == ("bfloat16" if kind in ("amx", "avx512-bf16") else "float32")
