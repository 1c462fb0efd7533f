"""The decisions that scale a run, checked without a cluster: which ranks shard the student together (FSDP2 on one
node, HSDP across nodes), what one student artifact every stage serves, and the merge's reserved resources and
refusals. The runs themselves are in test_train_ray.py (HSDP 2 x 2 against FSDP2, resharded resume)."""

from __future__ import annotations

import json

import pytest
import torch

from distill.config import ConfigError
from distill.student_serving import (GIB, check_merge_fits, checkpoint_parameters, merge_needs, student_artifact)
from distill.train.mesh import mesh_layout


def test_workers_on_one_node_shard_together_and_nodes_replicate():
    assert mesh_layout(["a"] * 4, None).groups == ((0, 1, 2, 3),)
    assert mesh_layout(["a"] * 4, None).describe() == "fsdp over 4"
    # Two 4-GPU nodes, ranks interleaved by Ray: each node's ranks form one shard group; the groups replicate.
    layout = mesh_layout(["n1", "n2", "n1", "n2", "n1", "n2", "n1", "n2"], None)
    assert layout.groups == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert layout.describe() == "hsdp 2 replicas x 4 shards"
    # Forced on one node (the CPU test's 2 x 2).
    assert mesh_layout(["a"] * 4, 2).groups == ((0, 1), (2, 3))
    assert mesh_layout(["a"] * 4, 4).groups == ((0, 1, 2, 3),)


def test_uneven_nodes_and_a_group_size_that_does_not_divide_are_refused():
    with pytest.raises(ConfigError, match=r"same number of training workers on every node; Ray placed \[3, 1\]"):
        mesh_layout(["n1", "n1", "n1", "n2"], None)
    with pytest.raises(ConfigError, match="shard_group_size 3 does not divide the 4"):
        mesh_layout(["a"] * 4, 3)


def adapter(folder, experts: bool = False) -> str:
    folder.mkdir()
    config = {"r": 8, "target_modules": ["q_proj"],
              **({"target_parameters": ["mlp.experts.gate_up_proj"]} if experts else {})}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return str(folder)


def test_on_gpus_the_moe_student_ships_as_lora_and_nothing_is_merged(tmp_path):
    moe = adapter(tmp_path / "moe", experts=True)
    shipped = student_artifact("Qwen/Qwen3-30B-A3B-Instruct-2507", {"language-id": moe}, "auto", "gpu", "language-id")
    assert (shipped.mode, shipped.engine_model, shipped.engine_adapter) == \
        ("lora", "Qwen/Qwen3-30B-A3B-Instruct-2507", moe)
    assert "fused MoE experts included" in shipped.why
    assert not (tmp_path / "moe-merged").exists()
    with pytest.raises(ConfigError, match="CPU build cannot serve"):
        student_artifact("base", {"language-id": moe, "x": adapter(tmp_path / "x")}, "auto", "cpu", "language-id")


def test_a_merge_reserves_what_it_needs_and_one_that_fits_no_node_is_refused():
    # The 30B student: float32 on a CPU needs 4 + 2 bytes per parameter; on a GPU its bf16 weights.
    cpu = merge_needs(30_532_122_624, 2, "cpu")
    assert cpu.memory_bytes == 30_532_122_624 * 6 + GIB and cpu.dtype == "float32"
    with pytest.raises(ConfigError, match=r"needs 171\.6 GiB of memory on one node; the largest node has 64\.0 GiB"):
        check_merge_fits(cpu, [64 * GIB, 32 * GIB], None, "Qwen/Qwen3-30B-A3B-Instruct-2507")
    gpu = merge_needs(30_532_122_624, 2, "gpu")
    assert gpu.gpu_bytes == 30_532_122_624 * 2 + GIB
    check_merge_fits(gpu, [128 * GIB], 80 * GIB, "30B")  # one 80 GB GPU holds the bf16 merge
    with pytest.raises(ConfigError, match=r"needs 57\.9 GiB of GPU memory; the GPUs have 48\.0 GiB"):
        check_merge_fits(gpu, [128 * GIB], 48 * GIB, "30B")
    check_merge_fits(merge_needs(135_000_000, 2, "cpu"), [8 * GIB], None, "SmolLM2")


def test_a_merge_is_sized_from_the_checkpoints_headers(tiny_moe):
    from transformers import AutoModelForCausalLM

    parameters, width = checkpoint_parameters(tiny_moe)
    model = AutoModelForCausalLM.from_pretrained(tiny_moe)
    assert parameters == sum(p.numel() for p in model.parameters())
    assert width == torch.finfo(model.dtype).bits // 8 == 2  # stored in bfloat16
