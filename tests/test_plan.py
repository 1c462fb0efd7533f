"""`distill plan`: exact counts for tiny models against hand computations, the seeds' 30B figures offline from the
shipped config.json files, every shipped config planned, and the refusals naming the figure that does not fit.
Meta device only: no weights, no Ray, no vLLM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distill.config import ConfigError, build_config, read_yaml
from distill.local_models import default_model_dir, is_prepared
from distill.model_facts import lora_facts, model_facts
from distill.plan import ClusterSpec, plan_training
from distill.train.config import TrainConfig
from pipelines.run import RunConfig, resource_plan

ROOT = Path(__file__).resolve().parents[1]
QWEN_30B = "configs/qwen3-30b-a3b.yaml"

# Tiny configs whose every count is computed by hand below: hidden 64, 2 layers, 4 heads and 2 KV heads of 16,
# vocabulary 256, an untied head.
COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              vocab_size=256, tie_word_embeddings=False, max_position_embeddings=512, torch_dtype="bfloat16")
DENSE = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], intermediate_size=128, **COMMON)
MOE = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], intermediate_size=128, num_experts=4,
           num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[], **COMMON)
H, V, Q, KV, FF, E, FF_MOE, R = 64, 256, 4 * 16, 2 * 16, 128, 4, 32, 4
ATTENTION = H * Q + H * KV + H * KV + Q * H + 2 * 16  # q, k, v, o projections; q_norm and k_norm over head_dim
NORMS = 2 * H                                          # the layer's two RMSNorms
ROOT_PARAMS = 2 * V * H + H                            # embeddings, untied head, final norm
DENSE_LAYER = ATTENTION + 3 * H * FF + NORMS
MOE_LAYER = ATTENTION + E * H + E * 2 * FF_MOE * H + E * H * FF_MOE + NORMS  # router, gate_up, down
LORA_ATTENTION = R * ((H + Q) + (H + KV) + (H + KV) + (Q + H))  # r x (in + out) per adapted linear layer
LORA_DENSE = 2 * (LORA_ATTENTION + R * (H + FF) * 2 + R * (FF + H))
LORA_MOE = 2 * (LORA_ATTENTION + R * E * (H + 2 * FF_MOE) + R * E * (FF_MOE + H))  # r per expert, never the router


def model_folder(tmp_path: Path, name: str, config: dict) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def run_config(path: str, **sets) -> RunConfig:
    data = read_yaml(ROOT / path)
    for key, value in sets.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return build_config(RunConfig, data, path)


def test_tiny_dense_counts_match_hand_computation(tmp_path):
    folder = model_folder(tmp_path, "dense", DENSE)
    facts = model_facts(folder)
    assert facts.params == ROOT_PARAMS + 2 * DENSE_LAYER == 106_880
    assert (facts.layer_params, facts.root_params, facts.source) == (DENSE_LAYER, ROOT_PARAMS, "local")
    assert lora_facts(folder, R, "all-linear").trainable == LORA_DENSE == 8_192
    assert facts.kv_bytes_per_token(2) == 2 * 2 * 2 * 16 * 2 == 256       # K and V x layers x heads x dim x bf16
    assert facts.kv_bytes_per_token(2, tensor_parallel=2) == 128          # the KV heads split over 2 GPUs
    assert facts.kv_bytes_per_token(2, tensor_parallel=4) == 128          # ... and replicated beyond 2
    assert facts.activation_width() == 3 * H + 3 * (4 + 2 * 2) * 16 + 3 * H + 4 * FF


def test_tiny_moe_counts_experts_and_their_lora(tmp_path):
    folder = model_folder(tmp_path, "moe", MOE)
    facts = model_facts(folder)
    assert facts.params == ROOT_PARAMS + 2 * MOE_LAYER == 107_392
    assert (facts.experts, facts.experts_per_token, facts.intermediate) == (E, 2, FF_MOE)
    lora = lora_facts(folder, R, "all-linear")
    assert lora.trainable == LORA_MOE == 10_752
    assert lora.target_parameters == ("mlp.experts.down_proj", "mlp.experts.gate_up_proj")


def test_training_terms_on_cpu_match_hand_computation(tmp_path):
    folder = model_folder(tmp_path, "dense", DENSE)
    config = TrainConfig(data="unused", student=folder, device="cpu", precision="fp32", workers=1,
                         per_device_batch_size=2, max_length=32, gradient_accumulation=1,
                         gradient_checkpointing=False, lora={"rank": R})
    plan = plan_training(config, None, refusals := [])
    tokens, width = 2 * 32, model_facts(folder).activation_width()
    terms = {t.what: t.bytes for t in plan.memory.terms}
    assert terms["weights"] == 106_880 * 4 and terms["gathered"] == 0 and terms["LoRA grads"] == 0
    assert terms["LoRA+AdamW"] == LORA_DENSE * (4 + 4 + 8)
    assert terms["activations"] == 2 * tokens * width * 4                 # every layer's, no checkpointing
    assert plan.activations_other == 2 * tokens * H * 4 + tokens * width * 4  # layer inputs + one layer
    assert terms["logits"] == tokens * V * 4
    assert (plan.checkpoint_bytes, plan.adapter_bytes) == (LORA_DENSE * 12, LORA_DENSE * 4)
    assert (plan.traffic.gathers, plan.traffic.gradients) == (0, 0) and refusals == []


def test_hsdp_keeps_the_gathers_within_a_node(tmp_path):
    folder = model_folder(tmp_path, "dense", DENSE)
    config = TrainConfig(data="unused", student=folder, device="gpu", precision="bf16", workers=4,
                         gradient_accumulation=2, lora={"rank": R})
    plan = plan_training(config, ClusterSpec(gpu_memory_gib=80, gpus_per_node=2), [])
    assert (plan.nodes, plan.shard_group, plan.replicas) == (2, 2, 2)
    per_micro = (2 * 2 * DENSE_LAYER + ROOT_PARAMS) * 2 + 2 * LORA_DENSE * 2   # bf16 base and LoRA, fwd + bwd
    assert plan.traffic.gathers == int(per_micro / 2 * 2)                     # half from the peer, 2 micro-batches
    across = int(2 * (1 / 2) * LORA_DENSE * 4 / 2)                           # the replicas' gradient all-reduce
    assert plan.traffic.inter_node == across
    assert plan.traffic.intra_node == plan.traffic.gathers + int(LORA_DENSE * 4 / 2)
    terms = {t.what: t.bytes for t in plan.memory.terms}
    assert terms["weights"] == 106_880 * 2 // 2 and terms["LoRA grads"] == LORA_DENSE * 4


def test_the_30b_models_offline():
    for name in ("Qwen/Qwen3-30B-A3B-Thinking-2507", "Qwen/Qwen3-30B-A3B-Instruct-2507"):
        facts = model_facts(name)
        assert facts.source == "shipped" and facts.architecture == "Qwen3MoeForCausalLM"
        assert abs(facts.params - 30.5e9) / 30.5e9 < 0.01
        assert abs(facts.params * 2 - 61e9) / 61e9 < 0.01                      # bf16 weights
        assert facts.kv_bytes_per_token(2) == 2 * 48 * 4 * 128 * 2
    hidden, q, kv, experts, ff, r = 2048, 32 * 128, 4 * 128, 128, 768, 32
    per_layer = r * (2 * (hidden + q) + 2 * (hidden + kv)) + r * experts * ((hidden + 2 * ff) + (ff + hidden))
    assert lora_facts("Qwen/Qwen3-30B-A3B-Instruct-2507", r, "all-linear").trainable == 48 * per_layer


def test_the_30b_config_fits_its_cluster():
    plan = resource_plan(run_config(QWEN_30B), QWEN_30B).check()
    assert plan.train.trainable == 1_285_029_888 and plan.train.replicas == 2
    assert plan.train.memory.needed < plan.train.memory.capacity
    assert plan.train.traffic.inter_node < plan.train.traffic.intra_node / 100  # HSDP: only LoRA grads cross
    generate = plan.engines[0]
    assert generate.max_model_len == 16384 and generate.sequences_at_once >= 1
    assert "train: 8 worker(s) on 2 node(s), HSDP" in plan.table()


@pytest.mark.parametrize("path", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_plans_offline(path, request):
    sets = {}
    if path.startswith("demo") and not is_prepared(default_model_dir()):
        tiny = request.getfixturevalue("tiny_model")
        sets = {"teacher": tiny, "student": tiny}
    plan = resource_plan(run_config(f"configs/{path}", **sets), path).check()
    assert plan.train is not None and len(plan.engines) == 4 and plan.refusals == ()


def refusal(config: RunConfig) -> str:
    with pytest.raises(ConfigError) as err:
        resource_plan(config).check()
    return str(err.value)


def test_too_little_gpu_memory_is_refused_with_the_figures():
    text = refusal(run_config(QWEN_30B, **{"cluster.gpu_memory_gib": 24}))
    assert "train: per GPU 36.7 GiB (weights 14.2 + " in text and "> 24 GiB" in text
    assert "generate teacher engine: per GPU 30.4 GiB (weights 28.4 + vLLM overhead 2.0) > 21.6 GiB" in text


def test_tensor_parallel_too_small_for_the_weights():
    text = refusal(run_config(QWEN_30B, **{"generate.engine.tensor_parallel_size": 1}))
    assert "weights 56.9" in text and "tensor_parallel_size 1" in text and "eval" not in text


def test_a_context_beyond_the_model_or_its_kv_cache():
    text = refusal(run_config(QWEN_30B, **{"generate.engine.max_model_len": 300_000}))
    assert "engine.max_model_len 300,000 is beyond the 262,144 tokens" in text
    text = refusal(run_config(QWEN_30B, **{"generate.engine.max_model_len": 262_144}))
    assert "holds 219,867 tokens, fewer than one sequence of 262,144" in text
    text = refusal(run_config(QWEN_30B, **{"generate.engine.max_model_len": 1024}))
    assert "needs 5566 tokens of context, but engine.max_model_len is 1024" in text  # distill.engine's own words


def test_an_unknown_model_names_itself(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no 25 s of retries offline
    with pytest.raises(ConfigError, match="nobody/no-such-model: no config.json to plan from"):
        model_facts("nobody/no-such-model")


def test_run_stops_on_the_refusal_before_ray_starts():
    # In a fresh interpreter: in this one an earlier test may already have started Ray.
    script = """
import sys
from distill.config import ConfigError
from pipelines import run
from tests.test_plan import QWEN_30B, run_config
try:
    run.main(run_config(QWEN_30B, **{"cluster.gpu_memory_gib": 24}))
except ConfigError as error:
    assert "the run does not fit" in str(error), error
else:
    raise SystemExit("the run was not refused")
print("ray started:", "ray" in sys.modules and sys.modules["ray"].is_initialized())
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ray started: False" in done.stdout


def test_the_cli_prints_the_plan_and_refuses_with_status_2(tmp_path):
    out = tmp_path / "plan.json"
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "plan", "--config", QWEN_30B, "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "LoRA trains 1.29 B of 30.53 B parameters (1,285,029,888" in done.stdout
    assert json.loads(out.read_text())["train"]["trainable"] == 1_285_029_888
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "plan", "--config", QWEN_30B,
                           "--set", "cluster.gpu_memory_gib=24"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "REFUSED: train: per GPU" in done.stdout
    assert "distill: error: the run does not fit" in done.stderr
