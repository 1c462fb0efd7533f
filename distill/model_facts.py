"""What the planner needs to know about a model, read from its config.json alone: exact parameter counts (the
model built on the meta device, no memory, no weights), the shape of its KV cache and of its decoder layers, and
the exact number of parameters a LoRA plan trains.

Where a config comes from, in order: a local model folder; a file shipped in distill/model_configs for the seeds'
hub models (so planning works offline); `huggingface_hub.hf_hub_download` (a cluster that reaches the hub); else a
ConfigError that names the model.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from distill.config import ConfigError

SHIPPED_CONFIGS = Path(__file__).parent / "model_configs"
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ModelConfigSource:
    config: dict[str, Any]
    source: str  # where it was read: "local", "shipped", "hub" or "object store"


def shipped_config_path(model: str) -> Path:
    """The shipped config of a hub name 'org/name': distill/model_configs/org--name/config.json."""
    return SHIPPED_CONFIGS / model.replace("/", "--") / "config.json"


def read_model_config(model: str) -> ModelConfigSource:
    """`model`'s config.json as a dict (the text model's, for a multimodal config)."""
    found: Optional[ModelConfigSource] = None
    if os.path.isdir(model):
        path = Path(model) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{model}: a folder without config.json, not a model")
        found = ModelConfigSource(json.loads(path.read_text(encoding="utf-8")), "local")
    elif "://" in model:
        from distill.storage import join, read_json

        config = read_json(join(model, "config.json"))
        if config is None:
            raise ConfigError(f"{model}: no config.json there")
        found = ModelConfigSource(config, "object store")
    elif shipped_config_path(model).is_file():
        found = ModelConfigSource(json.loads(shipped_config_path(model).read_text(encoding="utf-8")), "shipped")
    else:
        try:
            from huggingface_hub import hf_hub_download

            found = ModelConfigSource(json.loads(Path(hf_hub_download(model, "config.json")).read_text("utf-8")),
                                      "hub")
        except Exception as err:  # noqa: BLE001 - any failure means the same thing: nothing to plan from
            raise ConfigError(
                f"{model}: no config.json to plan from: not a local folder, not shipped in "
                f"{SHIPPED_CONFIGS.name}/ ({shipped_config_path(model).parent.name}), and not downloadable "
                f"({type(err).__name__}: {str(err).splitlines()[0][:160]})") from None
    text = found.config.get("text_config")
    return ModelConfigSource(text, found.source) if isinstance(text, dict) and "model_type" in text else found


@dataclass(frozen=True)
class ModelFacts:
    """One model's figures, exact where they are counts."""
    name: str
    architecture: str
    source: str                  # where its config.json came from
    params: int                  # every parameter (a tied head counted once)
    layer_params: int            # one decoder layer (the largest)
    root_params: int             # everything outside the decoder layers: embeddings, output head, final norm
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_position: Optional[int]  # max_position_embeddings: the longest context it was built for
    checkpoint_dtype: str        # the dtype its weights are stored in
    experts: int = 0             # MoE experts per layer (0: dense)
    experts_per_token: int = 0
    intermediate: int = 0        # the MLP width a token goes through: per expert for MoE

    def kv_bytes_per_token(self, dtype_bytes: int, tensor_parallel: int = 1) -> int:
        """KV cache bytes one token takes on one GPU: keys and values of every layer, 2 x layers x kv_heads x
        head_dim x dtype bytes; tensor parallelism splits the KV heads (vLLM replicates them when it has fewer
        heads than GPUs, so at least one head stays on each)."""
        heads_per_gpu = max(1, self.kv_heads // tensor_parallel)
        return 2 * self.layers * heads_per_gpu * self.head_dim * dtype_bytes

    def activation_width(self) -> int:
        """Values per token that one decoder layer keeps for its backward (an ESTIMATE, not a measurement):
        attention 3 x hidden (norm input and output, o_proj output) + 3 x (q + k + v widths) (the projections,
        q and k after their norm and rotary, the attention output); a dense MLP 3 x hidden + 4 x intermediate
        (gate, up, act(gate), act(gate) x up); an MoE MLP 3 x hidden + 2 x experts (router logits and
        probabilities) + experts_per_token x (2 x hidden + 4 x moe_intermediate) (each token's copy in and out
        of its experts, and the same four MLP tensors per expert it visits). Flash/SDPA attention keeps no
        length x length scores; LoRA's rank-r intermediates are left out (small)."""
        attention = 3 * self.hidden + 3 * (self.heads + 2 * self.kv_heads) * self.head_dim
        if self.experts:
            mlp = 3 * self.hidden + 2 * self.experts + self.experts_per_token * (2 * self.hidden + 4 * self.intermediate)
        else:
            mlp = 3 * self.hidden + 4 * self.intermediate
        return attention + mlp


def _dtype_name(config: dict[str, Any]) -> str:
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    return dtype if dtype in DTYPE_BYTES else "float32"


def _meta_model(config: dict[str, Any]):
    """The model built from `config` with every parameter on the meta device (no memory is allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    rest = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "transformers_version")}
    try:
        hf_config = AutoConfig.for_model(config["model_type"], **rest)
    except (KeyError, ValueError) as err:
        raise ConfigError(f"config.json of model_type {config.get('model_type')!r}: transformers does not know "
                          f"it ({err})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    model.tie_weights()  # from_config leaves a tied head untied until asked: count it once
    return model


def _decoder_layers(model) -> list:
    classes = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in classes]


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@functools.lru_cache(maxsize=8)
def model_facts(model: str) -> ModelFacts:
    read = read_model_config(model)
    built = _meta_model(read.config)
    cfg = built.config
    layers = _decoder_layers(built)
    layer_params = max((count(m) for m in layers), default=0)
    params = count(built)
    heads = cfg.num_attention_heads
    experts = int(getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None) or 0)
    return ModelFacts(
        name=model, architecture=type(built).__name__, source=read.source, params=params,
        layer_params=layer_params, root_params=params - sum(count(m) for m in layers),
        layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, vocab=cfg.vocab_size,
        max_position=getattr(cfg, "max_position_embeddings", None), checkpoint_dtype=_dtype_name(read.config),
        experts=experts, experts_per_token=int(getattr(cfg, "num_experts_per_tok", 0) or 0) if experts else 0,
        intermediate=int((getattr(cfg, "moe_intermediate_size", None) if experts else None)
                         or getattr(cfg, "intermediate_size", 0) or 0))


@dataclass(frozen=True)
class LoraFacts:
    trainable: int                       # parameters LoRA trains, exactly
    target_modules: tuple[str, ...]      # linear layers adapted, by short name
    target_parameters: tuple[str, ...]   # fused MoE expert weights adapted (peft target_parameters)


@functools.lru_cache(maxsize=8)
def lora_facts(model: str, rank: int, target_modules: str | tuple[str, ...]) -> LoraFacts:
    """Exactly what LoRA at `rank` on `target_modules` trains: distill.student_model's plan ('all-linear' spelled
    out, fused MoE experts as peft target_parameters) applied with peft to the meta-device model, counted."""
    from peft import get_peft_model

    from distill.student_model import lora_config, lora_plan

    base = _meta_model(read_model_config(model).config)
    plan = lora_plan(base, target_modules if isinstance(target_modules, str) else list(target_modules))
    peft_model = get_peft_model(base, lora_config(plan, rank, float(rank), 0.0), low_cpu_mem_usage=True)
    return LoraFacts(sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
                     tuple(plan.target_modules), tuple(plan.target_parameters))
