"""Baselines the pipeline is measured against, each run in its own process by bench/generation.py:

    python -m bench.baselines vllm --model M --rows N [--no-prompt] [--no-prefix-caching]
    python -m bench.baselines hf --model M --rows N
    python -m bench.baselines arm-latency --rows N --arm '{"model": M, ...}'

`vllm`: raw single-process vLLM `LLM.chat` on the same rows, model and sampling as the pipeline.
`arm-latency`: the teacher arm of `distill serve` in process, no Serve around it.
`hf`: the approach the seeds started from, a sequential per-query Hugging Face `generate` loop.
`train`: a plain single-process peft LoRA loop over padded batches in data order (what one writes first).
Each prints its measurements as one JSON line after bench.common.RESULT_MARK.
"""

from __future__ import annotations

import argparse
import json
import time


def workload(rows: int, with_prompt: bool, task_name: str = "language-id"):
    from distill.local_models import sample_data_path
    from distill.tasks import TaskSpec, load_task

    task = load_task(task_name)
    lines = sample_data_path().read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    texts = [texts[i % len(texts)] for i in range(rows)]
    messages = [task.teacher_messages(t) if with_prompt else TaskSpec.student_messages(t) for t in texts]
    return task, messages


def run_vllm(args) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    task, messages = workload(args.rows, not args.no_prompt)
    t0 = time.perf_counter()
    llm = LLM(model=args.model, dtype="bfloat16", enforce_eager=True, max_model_len=4096,
              kv_cache_memory_bytes=512 * 1024**2, enable_prefix_caching=not args.no_prefix_caching, seed=0)
    t1 = time.perf_counter()
    params = SamplingParams(temperature=task.teacher.temperature, max_tokens=args.max_tokens,
                            structured_outputs=StructuredOutputsParams(choice=task.canonical_answers()))
    outputs = llm.chat(messages, params, use_tqdm=False)
    t2 = time.perf_counter()
    return {"rows": len(outputs), "init_s": t1 - t0, "generate_s": t2 - t1, "total_s": t2 - t0,
            "prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs),
            "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs)}


def run_arm_latency(args) -> dict:
    """The served teacher's own code without Serve: serve/arms.py `LLMArm` built in this process with the same
    arm settings, and the same queries sent one at a time, after the same warm-up. What is left between this and
    the served latency is Serve itself: HTTP proxy, gateway deployment, handle calls (P6)."""
    import asyncio

    from serve.arm_messages import ArmAnswer, ArmRequest
    from serve.arms import TEACHER_ROLE, LLMArm
    from serve.latency import CompareLatencyConfig, load_queries

    queries = load_queries(CompareLatencyConfig(limit=args.rows))

    async def measure() -> list[float]:
        arm = LLMArm(TEACHER_ROLE, json.loads(args.arm), "language-id", "cpu")
        latencies = []
        for i, query in enumerate(queries[:args.warmup] + queries):
            t = time.perf_counter()
            answer = await arm.generate(ArmRequest(messages=[{"role": "user", "content": query}],
                                                   request_id=f"bench-{i}"))
            assert isinstance(answer, ArmAnswer), answer
            if i >= args.warmup:
                latencies.append(time.perf_counter() - t)
        return latencies

    return {"rows": len(queries), "latencies_s": asyncio.run(measure())}


def run_hf(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task, messages = workload(args.rows, not args.no_prompt)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    t1 = time.perf_counter()
    prompt_tokens = output_tokens = 0
    with torch.inference_mode():
        for m in messages:  # one query at a time, as the seeds did
            ids = tokenizer.apply_chat_template(m, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
            out = model.generate(**ids, max_new_tokens=args.max_tokens, do_sample=True,
                                 temperature=task.teacher.temperature, pad_token_id=tokenizer.eos_token_id)
            prompt_tokens += ids["input_ids"].shape[1]
            output_tokens += out.shape[1] - ids["input_ids"].shape[1]
    t2 = time.perf_counter()
    return {"rows": len(messages), "init_s": t1 - t0, "generate_s": t2 - t1, "total_s": t2 - t0,
            "prompt_tokens": prompt_tokens, "output_tokens": output_tokens}


def run_train(args) -> dict:
    """Single process, padded micro-batches in data order, loss on the answer tokens (the same objective as
    `distill train`), the same LoRA settings; tokens/s counts real (non-padding) tokens over step time."""
    import pyarrow.parquet as pq
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.train.config import LoraOptions

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    lora = LoraOptions()  # distill train's defaults: the same adapter shape and dropout on both sides
    model = get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             task_type="CAUSAL_LM", target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    rows = pq.read_table(args.data).to_pylist()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = []
    for r in rows:
        prompt = tokenizer.apply_chat_template(r["messages"][:1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(r["messages"], tokenize=False)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        f_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        examples.append((f_ids, [-100] * len(p_ids) + f_ids[len(p_ids):]))
    tokens = 0
    step_s = 0.0
    model.train()
    for step in range(args.steps):
        batch = examples[step * args.batch_size:(step + 1) * args.batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        t = time.perf_counter()
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step_s += time.perf_counter() - t
        tokens += sum(len(ids) for ids, _ in batch)
    return {"steps": args.steps, "tokens": tokens, "step_s": step_s, "tokens_per_s": tokens / step_s,
            "padding_waste": None}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["vllm", "arm-latency", "hf", "train"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--model")
    parser.add_argument("--arm", help="arm-latency: the teacher arm's settings (TeacherArmConfig) as JSON")
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--no-prompt", action="store_true")
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--data", help="train: a Parquet file of DATA_SCHEMA rows")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    result = {"vllm": run_vllm, "arm-latency": run_arm_latency, "hf": run_hf, "train": run_train}[args.kind](args)
    from bench.common import RESULT_MARK

    print(RESULT_MARK + json.dumps(result), flush=True)
