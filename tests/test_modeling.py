"""The student model without Ray: what LoRA adapts (MoE experts yes, routers no), and the sharded build that reads
only each rank's rows of the checkpoint yet computes exactly what the model loaded whole computes."""

from __future__ import annotations

import json
import os
import socket
import sys
import textwrap

import pytest
import torch

from distill.config import ConfigError
from distill.student_model import checkpoint_name, lora_plan


def load(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_all_linear_on_a_moe_student_adapts_the_experts_and_leaves_the_router(tiny_moe):
    plan = lora_plan(load(tiny_moe), "all-linear")
    assert plan.target_modules == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert plan.target_parameters == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert plan.routers == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    with pytest.raises(ConfigError, match="MoE router"):
        lora_plan(load(tiny_moe), ["q_proj", "gate"])
    with pytest.raises(ConfigError, match="neither a linear layer"):
        lora_plan(load(tiny_moe), ["gate_proj"])  # the experts' projections are fused: no such module
    assert lora_plan(load(tiny_moe), ["q_proj", "mlp.experts.gate_up_proj"]).target_parameters == [
        "mlp.experts.gate_up_proj"]


def test_all_linear_on_a_dense_student_is_every_projection_but_the_head(tiny_model):
    plan = lora_plan(load(tiny_model), "all-linear")
    assert plan.target_modules == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert plan.target_parameters == [] and plan.routers == []


def test_peft_names_map_back_to_the_checkpoint():
    assert checkpoint_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "model.layers.0.self_attn.q_proj.weight"
    assert checkpoint_name("base_model.model.model.layers.1.mlp.experts.base_layer.base_layer.gate_up_proj") == \
        "model.layers.1.mlp.experts.gate_up_proj"


SHARDED = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from distill.student_model import build_sharded_student

    model_dir, out, world, rank = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(os.environ["RANK"])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    model, _ = build_sharded_student(model_dir, "all-linear", 4, 8, 0.0, 0, torch.float32, torch.device("cpu"),
                                     "sdpa", False, MixedPrecisionPolicy())
    local = sum(p.to_local().numel() for p in model.parameters())
    full = sum(p.numel() for p in model.parameters())
    ids = torch.arange(12).unsqueeze(0) * 7 % 1000
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    lora_b = sum(float(p.full_tensor().abs().sum()) for n, p in model.named_parameters() if "lora_B" in n)
    if rank == 0:
        torch.save({"logits": logits, "lora_b": lora_b}, out)
    print(f"RANK {rank} LOCAL {local} FULL {full}", flush=True)
    dist.destroy_process_group()
""")


@pytest.mark.parametrize("which", ["tiny_model", "tiny_moe"])
def test_sharded_build_reads_only_its_rows_and_computes_what_the_whole_model_does(which, request, tmp_path):
    """Two gloo ranks build the student sharded: each holds about half the parameters, and the logits equal those
    of the model loaded whole by transformers (the fresh adapter's lora_B is zero, so it changes nothing)."""
    import subprocess

    model_dir = request.getfixturevalue(which)
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "PYTHONPATH": os.getcwd()}
        procs.append(subprocess.Popen([sys.executable, str(script), model_dir, str(tmp_path / "out.pt"), "2"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    counts = [line.split() for o in outputs for line in o.splitlines() if line.startswith("RANK ")]
    local, full = [int(c[3]) for c in counts], int(counts[0][5])
    assert sum(local) == full and max(local) <= 0.6 * full
    result = torch.load(tmp_path / "out.pt")
    assert result["lora_b"] == 0.0
    with torch.no_grad():
        expected = load(model_dir)(input_ids=torch.arange(12).unsqueeze(0) * 7 % 1000).logits
    assert torch.allclose(result["logits"], expected, atol=1e-5)
