"""vLLM engines for Ray Data stages (generation and evaluation), configured once for CPU and GPU clusters."""

from __future__ import annotations

import json
import logging
import time

from typing import Any, Iterable, Literal, Optional

from pydantic import Field, model_validator

from distill.config import ConfigError, StrictModel
from distill.console import Progress
from distill.hardware import cpu_flags, engine_dtype
from distill.storage import join, read_json

log = logging.getLogger("distill.engine")


CPU_BLOCK_SIZE = 32  # the smallest KV block vLLM's CPU attention takes (multiples of 32)


class EngineConfig(StrictModel):
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="Where engines run. auto: GPU when the cluster has GPUs right now, else CPU. Set "
        "'gpu' on autoscaling clusters whose GPU nodes start from zero.")
    min_actors: int = Field(1, ge=1, description="Engine replicas kept up (Ray Data actor pool lower bound).")
    max_actors: int = Field(1, ge=1, description="Engine replicas Ray Data may scale up to (autoscaling).")
    batch_size: int = Field(16, ge=1, description="Rows per batch handed to one engine.")
    max_concurrent_batches: int = Field(4, ge=1, description="Batches in flight per engine (overlap).")
    max_model_len: Optional[int] = Field(
        None, ge=64, description="Context length of the engine (prompt + reasoning + answer). Unset: planned for "
        "each pass from what it sends, the longest prompt plus its max_tokens (distill.engine.plan_pass), within "
        "the model's own context. Set: checked against the same figure before the engine starts; a pass it cannot "
        "hold is refused with both figures.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (GPU only).")
    gpu_memory_utilization: float = Field(0.90, gt=0, le=1, description="GPU memory fraction (GPU only).")
    kv_cache_memory_bytes: int = Field(
        512 * 1024**2, ge=16 * 1024**2, description="KV cache size on CPU (the GPU fraction check does not apply).")
    cpus_per_engine: float = Field(1, gt=0, description="CPUs reserved per engine on CPU nodes.")
    side_stage_cpus: float = Field(0.25, gt=0, description="CPUs per templating actor and per pre/post-processing task.")
    enable_prefix_caching: bool = Field(
        True, description="Every request shares the long task prompt: cache its KV once, not per request.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights and activations dtype. auto: bfloat16 on GPUs and on CPUs with native bf16 "
        "(AVX512_BF16 or AMX), float32 on other CPUs (AVX2 laptops), where vLLM's bf16 falls back to slow kernels "
        "(distill.hardware). A dtype set here always wins.")
    block_size: Optional[int] = Field(
        None, ge=16, description="KV cache block size in tokens; default: 32 on CPU (vLLM's CPU default is 128: "
        "the shared prompt's last partial block is recomputed by every request, and measured on a 2-core AVX2 CPU "
        "with the language-id prompt, 32 gave 1.7x the rows/s of 128), vLLM's own on GPU.")
    structured_outputs_backend: str = Field(
        "guidance", description="vLLM's backend for constrained decoding (guided choice): guidance, xgrammar, "
        "outlines or auto. guidance by default: with SmolLM2 it spells a label answer in the tokenizer's own 6 "
        "tokens where xgrammar took 11-13 tiny ones (1.2x the rows/s with the language-id prompt on CPU).")
    enforce_eager: Optional[bool] = Field(None, description="Skip graph capture; default: on for CPU, off for GPU.")
    continue_on_error: bool = Field(
        True, description="A failing request becomes a rejected row instead of failing the job.")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra vLLM engine arguments.")
    cpu_reserved_cores: Optional[int] = Field(
        None, ge=0, description="CPU only: cores vLLM keeps off its compute threads for its scheduler process "
        "(VLLM_CPU_NUM_OF_RESERVED_CPU; vLLM's default: 1). 0 gives the model every core the engine binds to: "
        "on a 2-core machine that doubles throughput (measured: 300 rows with the language-id prompt, 73 s -> "
        "35 s after start-up) at the price of a warning from vLLM.")
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment variables of the engine processes, e.g. "
        "VLLM_CPU_OMP_THREADS_BIND=0-15 to give a CPU engine its own cores.")

    @model_validator(mode="after")
    def _bounds(self) -> "EngineConfig":
        if self.max_actors < self.min_actors:
            raise ValueError("max_actors must be >= min_actors")
        return self


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import ray

    return "gpu" if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def engine_kwargs(config: EngineConfig, device: str, flags: Optional[Iterable[str]] = None,
                  **extra: Any) -> dict[str, Any]:
    """vLLM engine arguments. `flags`: the CPU features of the node(s) the engine may run on (default: this
    machine's), which decide `dtype: auto` on CPU."""
    if config.max_model_len is None:
        raise ValueError("engine_kwargs: max_model_len is not planned yet (distill.engine.plan_pass)")
    kwargs: dict[str, Any] = dict(
        max_model_len=config.max_model_len,
        enable_prefix_caching=config.enable_prefix_caching,
        dtype=engine_dtype(config.dtype, device, cpu_flags() if flags is None else flags),
        enforce_eager=config.enforce_eager if config.enforce_eager is not None else device == "cpu",
        structured_outputs_config={"backend": config.structured_outputs_backend},
    )
    if config.block_size is not None or device == "cpu":
        kwargs["block_size"] = config.block_size or CPU_BLOCK_SIZE
    if device == "cpu":
        kwargs["kv_cache_memory_bytes"] = config.kv_cache_memory_bytes
    else:
        kwargs["tensor_parallel_size"] = config.tensor_parallel_size
        kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
    kwargs.update(extra)
    kwargs.update(config.engine_kwargs)
    return kwargs


def engine_facts(config: EngineConfig) -> dict[str, Any]:
    """What the manifest, the training summary and the report record about the engines: device, the dtype that
    `auto` resolved to, and the CPU kind it was decided from (the flags every CPU node of the cluster shares)."""
    from distill.hardware import cluster_cpu_flags, cpu_kind, cpu_model, native_bf16

    device = resolve_device(config.device)
    flags = cluster_cpu_flags() if device == "cpu" else cpu_flags()
    return {"device": device, "dtype": engine_dtype(config.dtype, device, flags), "dtype_setting": config.dtype,
            "cpu_kind": cpu_kind(flags), "native_bf16": native_bf16(flags), "driver_cpu": cpu_model()}


def engine_env(config: EngineConfig) -> dict[str, str]:
    """The environment of an engine's processes (Ray runtime_env env_vars)."""
    env = dict(config.env)
    if config.cpu_reserved_cores is not None:
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", str(config.cpu_reserved_cores))
    return env


def processor_config(config: EngineConfig, model: str, chat_template_kwargs: Optional[dict] = None,
                     lora_root: Optional[str] = None, templated: bool = True, **extra_engine_kwargs: Any):
    """A `ray.data.llm` vLLM processor config: an autoscaling actor pool of engines over `model` (a local folder,
    a hub name or an object-store URI, which each engine's node downloads). `lora_root`: an object-store folder
    whose sub-folders are adapters, fetched by the engine that serves them."""
    from ray.data.llm import vLLMEngineProcessorConfig

    from distill.hardware import cluster_cpu_flags

    device = resolve_device(config.device)
    flags = cluster_cpu_flags() if device == "cpu" else frozenset()
    if device == "cpu":
        placement = {"bundles": [{"CPU": config.cpus_per_engine}]}
    else:
        placement = {"bundles": [{"GPU": 1, "CPU": 1}] * config.tensor_parallel_size, "strategy": "PACK"}
    env = engine_env(config)
    concurrency = (config.min_actors, config.max_actors) if config.max_actors > config.min_actors \
        else config.min_actors
    return vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs=engine_kwargs(config, device, flags, **extra_engine_kwargs),
        concurrency=concurrency,
        batch_size=config.batch_size,
        max_concurrent_batches=config.max_concurrent_batches,
        placement_group_config=placement,
        should_continue_on_error=config.continue_on_error,
        dynamic_lora_loading_path=lora_root,
        runtime_env={"env_vars": env} if env else None,
        # Templating is light: a fraction of a CPU leaves the cores to the engines. No tokenizing or detokenizing
        # stages: vLLM tokenizes a text prompt with the same tokenizer and defaults (special tokens added) and
        # detokenizes what it generates anyway, so those two stages were two more actors, each a process that
        # imports transformers and loads the tokenizer, started for every pass (measured on 2 AVX-512 cores with
        # the tiny model, 8 requests, same tokens and top-k either way: 66.6 s -> 39.7 s for a cold pass, 40.3 s ->
        # 33.5 s for a warm one).
        # templated=False: the rows carry their prompts already rendered (text or token ids).
        chat_template_stage={"num_cpus": config.side_stage_cpus, "chat_template_kwargs": chat_template_kwargs}
        if templated else False,
        tokenize_stage=False,
        detokenize_stage=False,
    )


# vLLM accepts only these values for max_lora_rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def adapter_rank(path: str) -> int:
    """The largest LoRA rank of a PEFT adapter folder (local or URI): `r`, or a per-module `rank_pattern` entry
    above it. A ConfigError names the folder if it is not an adapter."""
    config_path = join(path, "adapter_config.json")
    try:
        cfg = read_json(config_path)
        if cfg is None:
            raise ConfigError(f"{path}: not a PEFT adapter folder (no adapter_config.json); train one with "
                              f"`distill train` or point at OUT/adapter")
        return max([int(cfg["r"])] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()])
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{config_path}: cannot read the LoRA rank 'r': {err}") from None


def vllm_max_lora_rank(ranks: list[int]) -> int:
    """The smallest max_lora_rank vLLM accepts that covers every rank."""
    need = max(ranks)
    for allowed in VLLM_LORA_RANKS:
        if allowed >= need:
            return allowed
    raise ConfigError(f"LoRA rank {need} is above vLLM's maximum {VLLM_LORA_RANKS[-1]}")


def adapter_request_model(adapter: str) -> tuple[str, Optional[str]]:
    """(the `model` a ray.data.llm row names to get `adapter` applied, the processor's lora_root): a local folder
    by its absolute path; an object-store adapter by its folder name under its parent URI, which the engine's node
    downloads (ray.data.llm refuses URIs as row models)."""
    import os

    if "://" in adapter:
        parent, _, name = adapter.rstrip("/").rpartition("/")
        return name, parent
    return os.path.abspath(adapter), None


def model_context_limit(model: str) -> Optional[int]:
    """The longest context `model` (a local folder, hub name or object-store URI) was built for: its config's
    max_position_embeddings (the text model's, for a multimodal config). None, logged, when it cannot be read."""
    try:
        if "://" in model:
            cfg = read_json(join(model, "config.json")) or {}
            cfg = cfg.get("text_config", cfg)
            return cfg.get("max_position_embeddings")
        from transformers import AutoConfig

        return getattr(AutoConfig.from_pretrained(model).get_text_config(), "max_position_embeddings", None)
    except Exception as err:  # noqa: BLE001 - an unreadable config leaves the check to vLLM, and says so
        log.warning("could not read the context length of %s (%s: %s): vLLM will check it at start-up", model,
                    type(err).__name__, err)
        return None


def planned_engine(config: EngineConfig, model: str, need: int, what: str) -> EngineConfig:
    """`config` with a max_model_len that holds `need` tokens (`what` needs them: a prompt, its reasoning and
    answer budgets): the setting when it holds them, else a ConfigError naming both figures; unset, `need`
    itself, refused when `model`'s own context is shorter. Called before the engine starts."""
    if config.max_model_len is not None:
        if need > config.max_model_len:
            raise ConfigError(f"{what} needs {need} tokens of context, but engine.max_model_len is "
                              f"{config.max_model_len}: raise it, or unset it to have it planned")
        return config
    limit = model_context_limit(model)
    if limit is not None and need > limit:
        raise ConfigError(f"{what} needs {need} tokens of context, more than the {limit} that {model} holds "
                          "(max_position_embeddings): shorten the prompt or the task's budgets")
    return config.model_copy(update={"max_model_len": need})


def plan_pass(name: str, requests: list[dict], model: str, config: EngineConfig, tokenizer=None,
              chat_template_kwargs: Optional[dict] = None) -> EngineConfig:
    """The engine `config` for one pass of `requests` (rows with messages, a rendered prompt or prompt_token_ids;
    and sampling_params) on `model`: the context its longest prompt needs, rendered and tokenized as the pass's
    engine does it (the chat template with `chat_template_kwargs`, special tokens added), plus its max_tokens
    (distill.engine.planned_engine). `tokenizer`: the model's (default: loaded from `model`)."""
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
    need, longest, seen = 0, None, {}
    for r in requests:
        key = json.dumps(r.get("messages") or r.get("prompt") or r.get("prompt_token_ids"), sort_keys=True)
        if key not in seen:
            if "prompt_token_ids" in r:
                seen[key] = len(r["prompt_token_ids"])
            else:
                text = r["prompt"] if "prompt" in r else tokenizer.apply_chat_template(
                    r["messages"], add_generation_prompt=True, tokenize=False, **(chat_template_kwargs or {}))
                seen[key] = len(tokenizer(text)["input_ids"])
        total = seen[key] + r["sampling_params"].get("max_tokens", 16)
        if total > need:
            need, longest = total, (seen[key], r["sampling_params"].get("max_tokens", 16))
    what = (f"{name} ({longest[0]} prompt tokens + max_tokens {longest[1]} in its longest request)" if longest
            else name)
    return planned_engine(config, model, max(need, 64), what)


def run_requests(name: str, requests: list[dict], model: str, config: EngineConfig,
                 chat_template_kwargs: Optional[dict] = None, adapter: Optional[str] = None, tokenizer=None,
                 **extra_engine_kwargs: Any) -> tuple[dict[str, dict], float]:
    """One `ray.data.llm` engine pass over request rows {key, messages, sampling_params} (any mix of generation
    and scoring requests: distill.scoring; a pass may carry a rendered `prompt` or `prompt_token_ids` instead of
    messages), through `adapter` when given, on an engine whose context is planned
    for them (plan_pass; `tokenizer`: the model's, default loaded from `model`). Returns ({key: result}, wall
    seconds with start-up). A result: generated_text, generated_tokens, token_logprobs / topk_ids /
    topk_logprobs (when the request asked for logprobs), token counts, cut_by_length (a generation that used its
    whole max_tokens: its answer may be cut), latency_s, queue_s, ttft_s, decode_s, error."""
    import ray
    from ray.data.llm import build_processor

    from distill.sampling import complete
    from distill.scoring import read_scores

    config = plan_pass(name, requests, model, config, tokenizer, chat_template_kwargs)
    lora_model, lora_root = adapter_request_model(adapter) if adapter else (None, None)
    if adapter:
        extra_engine_kwargs.update(enable_lora=True, max_lora_rank=vllm_max_lora_rank([adapter_rank(adapter)]),
                                   max_loras=1)
    top_k = max((r["sampling_params"].get("logprobs") or 0) for r in requests) if requests else 0
    # One kind of prompt per pass: messages (templated by the pass), or prompts rendered by the caller, as text
    # or token ids (ray.data.llm's tokenized_prompt).
    kinds = {next((k for k in ("messages", "prompt", "prompt_token_ids") if k in r), None) for r in requests}
    if len(kinds) > 1 or None in kinds:
        raise ValueError(f"{name}: every request carries one of messages, prompt or prompt_token_ids, the same "
                         f"in one pass; got {sorted(map(str, kinds))}")
    prompt_kind = kinds.pop() if kinds else "messages"
    row_field = {"messages": "messages", "prompt": "prompt", "prompt_token_ids": "tokenized_prompt"}[prompt_kind]

    def preprocess(row: dict) -> dict:
        out = {row_field: row[prompt_kind], "sampling_params": row["sampling_params"]}
        if lora_model:
            out["model"] = lora_model
        return out

    def postprocess(row: dict) -> dict:
        stats = row.get("metrics") or {}

        def span(start: str, end: str) -> Optional[float]:
            a, b = stats.get(start), stats.get(end)
            return float(b - a) if a and b and b >= a else None

        tokens = [int(t) for t in (row.get("generated_tokens") or [])]
        error = row.get("__inference_error__") or None
        scores = read_scores(row["logprobs"], tokens, top_k) if row.get("logprobs") is not None and tokens \
            and not error else {}
        taken = row.get("time_taken_llm")
        return {
            "key": row["key"], "generated_text": row.get("generated_text") or "", "generated_tokens": tokens,
            "prompt_token_ids": [int(t) for t in (row.get("prompt_token_ids") or [])],
            "token_logprobs": scores.get("token_logprobs"), "topk_ids": scores.get("topk_ids"),
            "topk_logprobs": scores.get("topk_logprobs"),
            "num_input_tokens": int(row.get("num_input_tokens") or 0),
            "num_generated_tokens": int(row.get("num_generated_tokens") or 0),
            # ray.data.llm's time_taken_llm: from handing the request to the engine until its last token
            # (-1 for a failed request).
            "latency_s": float(taken) if taken is not None and taken >= 0 else None,
            # vLLM's own engine-core timestamps, where the engine reports them.
            "queue_s": span("queued_ts", "scheduled_ts"), "ttft_s": span("queued_ts", "first_token_ts"),
            "decode_s": span("first_token_ts", "last_token_ts"), "error": error,
        }

    log.info("%s: %d requests on %s%s", name, len(requests), model, f" + LoRA {adapter}" if adapter else "")
    processor = build_processor(
        processor_config(config, model, chat_template_kwargs=chat_template_kwargs, lora_root=lora_root,
                         templated=prompt_kind == "messages", **extra_engine_kwargs),
        preprocess=preprocess, postprocess=postprocess,
        preprocess_map_kwargs={"num_cpus": config.side_stage_cpus},
        postprocess_map_kwargs={"num_cpus": config.side_stage_cpus},
    )
    t0 = time.monotonic()
    # One Arrow table, so the input blocks share one schema (from_items infers each tiny block's types on its
    # own), in blocks of an engine batch. The stages after the row-wise preprocess infer types per block again:
    # that is why every request carries the same fields with non-null values (distill.sampling.DEFAULTS).
    import pyarrow as pa

    table = pa.Table.from_pylist([{"key": r["key"], prompt_kind: r[prompt_kind],
                                   "sampling_params": complete(r["sampling_params"])} for r in requests])
    ds = ray.data.from_arrow(table).repartition(target_num_rows_per_block=config.batch_size)
    progress = Progress(name, len(requests), "requests")
    results = {}
    for out in processor(ds).iter_rows():
        results[out["key"]] = out
        progress.update(len(results))
    progress.close()
    wall = time.monotonic() - t0
    missing = {r["key"] for r in requests} - set(results)
    if missing:
        raise RuntimeError(f"{name}: {len(missing)} requests came back without an answer, e.g. {sorted(missing)[:3]}")
    for r in requests:  # ray.data.llm returns no finish reason: a generation that used every token it had was cut
        sampling, result = complete(r["sampling_params"]), results[r["key"]]
        result["cut_by_length"] = (not sampling["ignore_eos"] and not result["error"]
                                   and result["num_generated_tokens"] >= sampling["max_tokens"])
    cut = sum(results[r["key"]]["cut_by_length"] for r in requests)
    if cut:
        log.warning("%s: %d of %d answers used their whole max_tokens and may be cut", name, cut, len(requests))
    log.info("%s: done in %.1fs", name, wall)
    return results, wall
