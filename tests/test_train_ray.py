"""Training end to end on a real local Ray cluster with the tiny model: FSDP2 over 2 workers, a worker killed
mid-run and a crashed driver both resume to the same final loss, the adapter reloads in peft with the trained
model's numbers, and vLLM serving the adapter reproduces the teacher's answers with no prompt.

Teacher data comes from the real generation pipeline (tiny teacher, with top-k logprobs)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from distill.config import ConfigError
from distill.local_models import default_model_dir
from distill.storage import read_columns
from distill.train.examples import tokenize_rows
from distill.train.step import collate, token_losses
from distill.checkpoints import read_metrics
from distill.train.data import read_data
from distill.train.config import LoraOptions, TrainConfig
from pipelines.train import main


@pytest.fixture(scope="module")
def generated(tiny_generation) -> str:
    """The session's tiny-teacher generation (conftest.tiny_generation): 24 rows with top-5 logprobs."""
    return tiny_generation


def fsdp_config(data: str, output: str, student: str, **overrides) -> TrainConfig:
    """2 workers x 2 examples x 2 micro-batches; 4 epochs of ~18 examples = 12 steps, checkpoints every 4.
    Soft labels mixed in (the tiny teacher and student share a tokenizer), so they run under FSDP too."""
    settings = dict(data=data, output=output, student=student, workers=2, per_device_batch_size=2,
                    gradient_accumulation=2, epochs=4, learning_rate=3e-3, validation_fraction=0.25,
                    eval_every=4, checkpoint_every=4, soft_label_weight=0.5, lora=LoraOptions(rank=16, alpha=32),
                    max_failures=0)
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def reference(generated, tiny_model, tmp_path_factory) -> tuple[TrainConfig, dict]:
    config = fsdp_config(generated, str(tmp_path_factory.mktemp("train") / "out"), tiny_model, merge=True)
    return config, main(config)


def test_two_worker_fsdp_run_learns_and_writes_the_contract(reference, generated):
    config, summary = reference
    out = config.output
    assert summary["complete"] and summary["workers"] == 2 and summary["steps"] == 12
    metrics = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [m["step"] for m in metrics] == list(range(1, 13))
    for m in metrics:
        assert {"step", "epoch", "loss", "lr", "tokens_per_s", "elapsed_s"} <= set(m)
    validations = [m for m in metrics if "val_loss" in m]
    vals = [m["val_loss"] for m in validations]
    assert [m["step"] for m in validations] == [4, 8, 12]
    assert vals[-1] < vals[0] and metrics[-1]["loss"] < metrics[0]["loss"]  # validation loss falls
    assert summary["final_val_loss"] == vals[-1]
    # A label task: the workers decode the held-out queries and the best checkpoint is the one that agrees most
    # with the teacher's labels (validation loss breaks ties).
    assert summary["select_by"] == "agreement" and all(0 <= m["val_agreement"] <= 1 for m in validations)
    best = min(validations, key=lambda m: (1 - m["val_agreement"], m["val_loss"]))
    assert summary["best_step"] == best["step"] and summary["best_val_loss"] == best["val_loss"]
    assert summary["best_val_agreement"] == best["val_agreement"]
    # The learning curve's x axis: examples seen, four epochs of the training split by the end.
    assert metrics[-1]["examples"] == 4 * summary["examples"]["train"]

    split = pq.read_table(os.path.join(out, "split.parquet")).to_pylist()
    counts = {s: sum(r["split"] == s for r in split) for s in ("train", "validation", "test")}
    assert summary["split"] == {**counts, "excluded": 0} and counts["validation"] >= 1 and counts["test"] >= 1
    assert summary["soft_examples"] > 0  # generation kept top-k, so soft labels were used
    assert summary["padding_waste"] == 0.0 and summary["padding_waste_unpacked"] > 0
    assert summary["task"] == "language-id" and summary["teacher"] == config.student
    assert summary["skipped"] == {} and summary["tokens_per_s"] > 0
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert os.path.isfile(os.path.join(out, "adapter", name))
    assert json.load(open(os.path.join(out, "train_summary.json")))["steps"] == 12
    adapter_config = json.load(open(os.path.join(out, "adapter", "adapter_config.json")))
    assert adapter_config["r"] == 16 and adapter_config["base_model_name_or_path"] == config.student
    # all-linear: attention and MLP projections, never the (tied) output head.
    assert sorted(adapter_config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                        "up_proj", "v_proj"]
    # Checkpoints: the best by validation loss and the latest are kept.
    kept = sorted(d for d in os.listdir(os.path.join(out, "checkpoints")) if d.startswith("step_"))
    assert f"step_{summary['best_step']:06d}" in kept and "step_000012" in kept and len(kept) <= 2

    # Rerunning a finished run returns its summary without training again.
    again = main(config)
    assert again == summary


def test_saved_adapter_reloads_in_peft_with_the_trained_models_numbers(reference, tiny_model):
    """The adapter in OUT/adapter, loaded by plain peft, gives the validation loss that the FSDP workers measured
    for the same step (every logit of every validation token goes into that number)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, summary = reference
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    split = {r["id"]: r["split"] for r in pq.read_table(os.path.join(config.output, "split.parquet")).to_pylist()}
    rows = [r for r in sorted(read_data(config), key=lambda r: r["id"]) if split[r["id"]] == "validation"]
    val, _ = tokenize_rows(tokenizer, rows, config.max_length, soft=False)

    def val_loss(model) -> float:
        with torch.no_grad():
            sums = [token_losses(model, collate([e], packed=True, pad_id=tokenizer.pad_token_id)) for e in val]
        return sum(float(s) for s, _ in sums) / sum(n for _, n in sums)

    # The base in the dtype it was trained in (bf16-base: bf16 base weights under an fp32 adapter).
    base = AutoModelForCausalLM.from_pretrained(
        tiny_model, dtype=torch.bfloat16 if summary["precision"] == "bf16-base" else torch.float32)
    untrained = val_loss(base)
    peft_model = PeftModel.from_pretrained(base, os.path.join(config.output, "adapter")).eval()
    reloaded = val_loss(peft_model)
    assert summary["adapter_step"] == summary["best_step"]
    assert reloaded == pytest.approx(summary["best_val_loss"], rel=1e-5)
    assert abs(reloaded - untrained) > 1e-3
    # The optional merged model is the same model, in the base's bf16.
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(config.output, "merged"), dtype=torch.float32)
    assert val_loss(merged) == pytest.approx(reloaded, rel=1e-2)


def test_killed_worker_and_crashed_driver_both_resume_to_the_same_loss(reference, generated, tiny_model, tmp_path):
    """First the last worker dies at step 6 with no retries allowed: the run fails, like a crashed command. The
    same command rerun resumes from the step-4 checkpoint; then a worker dies again at step 10 and Ray Train's
    FailureConfig restarts the workers from the step-8 checkpoint. The end matches the uninterrupted run."""
    config, expected = reference
    out = str(tmp_path / "out")
    crashing = fsdp_config(generated, out, tiny_model, merge=True, fail_at_step=6, max_failures=0)
    with pytest.raises(Exception):
        main(crashing)
    assert not os.path.exists(os.path.join(out, "train_summary.json"))
    assert max(m["step"] for m in read_metrics(os.path.join(out, "metrics.jsonl"))) == 5

    summary = main(crashing.model_copy(update={"fail_at_step": 10, "max_failures": 1}))
    assert os.path.exists(os.path.join(out, "_chaos", "failed_at_step_6"))
    assert os.path.exists(os.path.join(out, "_chaos", "failed_at_step_10"))
    assert summary["steps"] == expected["steps"]
    assert summary["final_loss"] == pytest.approx(expected["final_loss"], rel=1e-6)
    assert summary["final_val_loss"] == pytest.approx(expected["final_val_loss"], rel=1e-6)
    resumed = read_metrics(os.path.join(out, "metrics.jsonl"))
    uninterrupted = read_metrics(os.path.join(config.output, "metrics.jsonl"))
    assert [m["step"] for m in resumed] == [m["step"] for m in uninterrupted]  # no duplicated steps
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in uninterrupted], rel=1e-6)


def test_hsdp_2x2_matches_fsdp_and_its_sharded_checkpoint_resumes_on_another_world_size(reference, generated,
                                                                                         tiny_model, tmp_path):
    """4 workers as 2 replicas x 2 shards (HSDP: a 2-D gloo mesh) with the reference's global batch (2 per device
    x 1 micro-batch x 4 workers = 2 x 2 x 2): every step trains on the same micro-batches, so the losses match the
    2-worker FSDP2 run. Crashed at step 6, the same output resumes on ONE worker with 4 micro-batches per step:
    the step-4 checkpoint that 4 ranks wrote in shards reshards to one rank, and the run ends where the reference
    does. Its adapter is exported once, from the chosen checkpoint."""
    config, expected = reference
    out = str(tmp_path / "hsdp")
    hsdp = fsdp_config(generated, out, tiny_model, workers=4, gradient_accumulation=1, shard_group_size=2,
                       fail_at_step=6, max_failures=0)
    with pytest.raises(Exception):
        main(hsdp)
    uninterrupted = read_metrics(os.path.join(config.output, "metrics.jsonl"))
    first = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [m["step"] for m in first] == [1, 2, 3, 4, 5]
    assert [m["loss"] for m in first] == pytest.approx([m["loss"] for m in uninterrupted[:5]], rel=1e-4)
    assert first[3]["sharding"] == "hsdp 2 replicas x 2 shards"
    assert uninterrupted[3]["sharding"] == "fsdp over 2"
    shards = os.listdir(os.path.join(out, "checkpoints", "step_000004", "model"))
    assert ".metadata" in shards and sum(f.endswith(".distcp") for f in shards) > 1  # written by several ranks
    assert not os.path.exists(os.path.join(out, "adapter"))

    summary = main(hsdp.model_copy(update={"workers": 1, "gradient_accumulation": 4, "shard_group_size": None,
                                           "fail_at_step": None}))
    resumed = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [m["step"] for m in resumed] == list(range(1, 13))
    # One rank summing 4 micro-batches' gradients rounds differently from 2 ranks averaging theirs; measured: the
    # resumed steps within 2.5e-4 of the reference (a lost Adam state or another step's data moves far more).
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in uninterrupted], rel=1e-3)
    assert summary["final_val_loss"] == pytest.approx(expected["final_val_loss"], rel=1e-3)
    assert resumed[-1]["sharding"] == "fsdp over 1"
    assert sorted(os.listdir(os.path.join(out, "adapter"))) == ["adapter_config.json", "adapter_model.safetensors"]

    # Another global batch would train other examples at every step: refused, naming it.
    with pytest.raises(ConfigError, match="global_batch"):
        main(hsdp.model_copy(update={"workers": 2, "gradient_accumulation": 1, "fail_at_step": None}))


VLLM_SCRIPT = textwrap.dedent("""
    import json, sys

    if __name__ == "__main__":  # vLLM's engine runs in a spawned process
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        from distill.engine import EngineConfig, engine_kwargs

        student, adapter, examples_path, rank = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
        examples = json.load(open(examples_path))
        engine = EngineConfig(max_model_len=1024, kv_cache_memory_bytes=256 * 1024**2)  # dtype: auto for this CPU
        llm = LLM(model=student, enable_lora=True, max_lora_rank=rank, max_loras=1, seed=0,
                  **engine_kwargs(engine, "cpu"))
        conversations = [[{"role": "user", "content": e["text"]}] for e in examples]  # no task prompt
        params = SamplingParams(temperature=0.0, max_tokens=24)
        student_out = llm.chat(conversations, params, lora_request=LoRARequest("student", 1, adapter))
        base_out = llm.chat(conversations, params)
        print("RESULT " + json.dumps({"student": [o.outputs[0].text for o in student_out],
                                      "base": [o.outputs[0].text for o in base_out]}))
""")


def test_vllm_serves_the_adapter_and_reproduces_the_teacher_without_the_prompt(generated, tiny_model, tmp_path):
    out = str(tmp_path / "overfit")
    config = TrainConfig(data=generated, output=out, student=tiny_model, workers=1, limit=8, per_device_batch_size=4,
                         gradient_accumulation=1, epochs=60, learning_rate=3e-3, warmup_fraction=0,
                         lora=LoraOptions(rank=32, alpha=32, dropout=0.0), log_every=10, eval_every=120,
                         checkpoint_every=120, export="last")
    summary = main(config)
    assert summary["steps"] == 120
    # The 8 trained examples: `limit` takes the first ids of the train split.
    split = {r["id"]: r["split"] for r in pq.read_table(os.path.join(out, "split.parquet")).to_pylist()}
    rows = read_columns(os.path.join(generated, "data"), ["id", "text", "answer"]).to_pylist()
    examples = sorted((r for r in rows if split[r["id"]] == "train"), key=lambda r: r["id"])[:8]
    (tmp_path / "examples.json").write_text(json.dumps(examples))
    (tmp_path / "serve.py").write_text(VLLM_SCRIPT)
    proc = subprocess.run([sys.executable, str(tmp_path / "serve.py"), tiny_model, os.path.join(out, "adapter"),
                           str(tmp_path / "examples.json"), "32"], capture_output=True, text=True, timeout=400,
                          cwd=tmp_path)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert [t.strip() for t in result["student"]] == [e["answer"] for e in examples]
    assert [t.strip() for t in result["base"]] != [e["answer"] for e in examples]  # the adapter did it


def test_default_student_is_the_embedded_model():
    assert TrainConfig(data="d").student == default_model_dir()


MERGED_VLLM_SCRIPT = textwrap.dedent("""
    import json, sys

    if __name__ == "__main__":  # vLLM's engine runs in a spawned process
        from vllm import LLM, SamplingParams

        from distill.engine import EngineConfig, engine_kwargs

        merged, prompts_path = sys.argv[1], sys.argv[2]
        engine = EngineConfig(max_model_len=1024, kv_cache_memory_bytes=128 * 1024**2)
        llm = LLM(model=merged, seed=0, **engine_kwargs(engine, "cpu"))  # a merged MoE: no enable_lora on CPU
        prompts = [{"prompt_token_ids": p} for p in json.load(open(prompts_path))]
        outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
        print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outputs]))
""")


def test_moe_student_trains_on_two_workers_with_lora_on_the_experts_and_vllm_serves_it_merged(
        generated, tiny_moe, tmp_path):
    """A tiny Qwen3-MoE student (4 experts, fused expert weights): 2-worker FSDP2 training adapts the experts (not
    the router), learns, the adapter reloads in peft with the trained numbers, it merges, and vLLM's CPU build
    serves the merged student (it has no MoE LoRA kernels) with the greedy tokens transformers computes."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = fsdp_config(generated, str(tmp_path / "moe"), tiny_moe, merge=True, select_by="loss", epochs=2)
    summary = main(config)
    adapter = os.path.join(config.output, "adapter")
    adapter_config = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert sorted(adapter_config["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert "gate" not in adapter_config["target_modules"]
    weights = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    expert_tensors = [k for k in weights if ".experts." in k]
    assert len(expert_tensors) == 2 * 2 * 2  # 2 layers x (gate_up_proj, down_proj) x (lora_A, lora_B)
    assert all(float(weights[k].abs().sum()) > 0 for k in expert_tensors if "lora_B" in k)  # trained, not zero
    assert not any("mlp.gate." in k for k in weights)
    vals = [m["val_loss"] for m in read_metrics(os.path.join(config.output, "metrics.jsonl")) if "val_loss" in m]
    assert vals[-1] < vals[0]

    tokenizer = AutoTokenizer.from_pretrained(tiny_moe)
    split = {r["id"]: r["split"] for r in pq.read_table(os.path.join(config.output, "split.parquet")).to_pylist()}
    rows = [r for r in sorted(read_data(config), key=lambda r: r["id"]) if split[r["id"]] == "validation"]
    val, _ = tokenize_rows(tokenizer, rows, config.max_length, soft=False)

    def val_loss(model) -> float:
        with torch.no_grad():
            sums = [token_losses(model, collate([e], packed=True, pad_id=tokenizer.pad_token_id)) for e in val]
        return sum(float(s) for s, _ in sums) / sum(n for _, n in sums)

    base = AutoModelForCausalLM.from_pretrained(
        tiny_moe, dtype=torch.bfloat16 if summary["precision"] == "bf16-base" else torch.float32)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    assert val_loss(peft_model) == pytest.approx(summary["best_val_loss"], rel=1e-4)
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(config.output, "merged"), dtype=torch.float32).eval()
    assert val_loss(merged) == pytest.approx(val_loss(peft_model), rel=1e-2)

    prompts = [e.input_ids[:int(np.argmax(e.targets != -100)) + 1].tolist() for e in val[:4]]
    expected = []
    with torch.no_grad():
        for p in prompts:
            out = merged.generate(torch.tensor([p]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
            expected.append(out[0, len(p):].tolist())
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    (tmp_path / "serve.py").write_text(MERGED_VLLM_SCRIPT)
    proc = subprocess.run([sys.executable, str(tmp_path / "serve.py"), os.path.join(config.output, "merged"),
                           str(tmp_path / "prompts.json")], capture_output=True, text=True, timeout=400, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    assert json.loads(lines[-1][len("RESULT "):]) == expected


def test_training_stops_early_when_the_selection_score_stops_improving(generated, tiny_model, tmp_path):
    """With a learning rate too small to move anything, the second validation is no better than the first:
    patience 1 stops there, checkpoints that step, and the summary says so."""
    config = TrainConfig(data=generated, output=str(tmp_path / "early"), student=tiny_model, workers=1,
                         per_device_batch_size=2, gradient_accumulation=1, max_steps=8, learning_rate=1e-12,
                         eval_every=1, checkpoint_every=8, early_stopping_patience=1, validation_fraction=0.25)
    summary = main(config)
    assert summary["steps"] == 2 and summary["planned_steps"] == 8 and summary["stopped_early"]
    assert summary["adapter_step"] == summary["best_step"] == 1


def test_on_policy_rounds_sample_score_and_train_and_a_round_resumes_after_a_lost_worker(generated, tiny_model,
                                                                                          tmp_path):
    """Two on-policy rounds on the tiny model: the student samples its own answers (vLLM through ray.data.llm),
    the prompted teacher scores those tokens (top-k), Ray Train minimises the reverse KL; round 2 samples from
    round 1's adapter. A worker dies in each round's training and the round resumes from its checkpoint; a rerun
    of the finished run trains nothing."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from distill.train.onpolicy import AnswerGrammar
    from distill.tasks import load_task

    config = TrainConfig(data=generated, output=str(tmp_path / "op"), student=tiny_model, method="on-policy",
                         workers=1, per_device_batch_size=2, gradient_accumulation=1, learning_rate=3e-3,
                         eval_every=2, checkpoint_every=2, validation_fraction=0.25, test_fraction=0.0,
                         lora=LoraOptions(rank=8, alpha=16), fail_at_step=3, max_failures=1,
                         on_policy={"rounds": 2, "queries_per_round": 8, "steps_per_round": 4, "top_k": 5,
                                    "max_new_tokens": 8, "engine": {"batch_size": 8}})
    summary = main(config)
    assert summary["method"] == "on-policy" and len(summary["rounds"]) == 2 and summary["steps"] == 8
    first, second = summary["rounds"]
    assert first["policy"] is None and second["policy"] == os.path.join(config.output, "rounds", "00", "adapter")
    assert first["samples"] == 8 and first["positions"] > 0
    assert 0 <= first["answers_parsed"] <= first["samples"]  # counted (the random-init student parses rarely)
    # The constrained teacher (language-id's) scored each sample up to the token where it left the answer format:
    # the random-init student leaves it at once, so about one position per sample trains, each on a teacher top-k
    # that holds only tokens the grammar allows there.
    assert first["samples"] <= first["positions_trained"] < first["positions"]
    # "tokens": the student tokens the grammar accepted (the teacher's log-probability of each); one position more
    # per sample that left the format.
    assert first["tokens"] <= first["positions_trained"] <= first["tokens"] + first["samples"]
    grammar = AnswerGrammar(AutoTokenizer.from_pretrained(tiny_model), load_task("language-id").canonical_answers())
    for row in pq.read_table(os.path.join(config.output, "rounds", "00", "_tokens", "examples.parquet")).to_pylist():
        answer = row["input_ids"][row["soft_positions"][0] + 1:]
        for i, (ids, lps) in enumerate(zip(row["soft_ids"], row["soft_logprobs"])):
            assert all(grammar.accepted(answer[:i] + [t]) == i + 1 for t, lp in zip(ids, lps) if lp > -math.inf)
    for r in ("00", "01"):
        assert os.path.exists(os.path.join(config.output, "rounds", r, "_chaos", "failed_at_step_3"))
    # Round 2 started from round 1's adapter and moved it.
    w0 = load_file(os.path.join(config.output, "rounds", "00", "adapter", "adapter_model.safetensors"))
    w1 = load_file(os.path.join(config.output, "adapter", "adapter_model.safetensors"))
    assert set(w0) == set(w1) and any(not torch.equal(w0[k], w1[k]) for k in w0)
    metrics = read_metrics(os.path.join(config.output, "metrics.jsonl"))
    assert [m["step"] for m in metrics] == list(range(1, 9)) and {m["round"] for m in metrics} == {0, 1}
    assert main(config) == summary
