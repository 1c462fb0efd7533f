"""Baselines the pipeline is measured against, each run in its own process by bench/generation.py:

    python -m bench.baselines vllm --model M --rows N [--no-prompt] [--no-prefix-caching]
    python -m bench.baselines hf --model M --rows N

`vllm`: raw single-process vLLM `LLM.chat` on the same rows, model and sampling as the pipeline.
`hf`: the approach the seeds started from, a sequential per-query Hugging Face `generate` loop.
Each prints one JSON line: rows, seconds to build the engine/model, seconds to answer, tokens.
"""

from __future__ import annotations

import argparse
import json
import time


def workload(rows: int, with_prompt: bool, task_name: str = "language-id"):
    from distill.models import sample_data_path
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["vllm", "hf"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--no-prompt", action="store_true")
    parser.add_argument("--no-prefix-caching", action="store_true")
    args = parser.parse_args()
    result = run_vllm(args) if args.kind == "vllm" else run_hf(args)
    print(json.dumps(result))
