"""The student model: which weights LoRA adapts, how a sharded student is built without any rank holding the whole
model, and how an adapter is folded into its base.

Memory: `build_sharded_student` builds the model on the meta device (no memory), adds the LoRA adapter, shards
every decoder layer and the root with FSDP2, allocates only this rank's shard, and then reads from the
checkpoint's safetensors files only the rows of each weight that the rank owns. No rank ever holds the whole
model: at most its shard (plus, for checkpoints stored per expert, the experts of its own rows).

MoE students: in transformers 5 the experts of a mixture-of-experts layer (Qwen3-MoE: `mlp.experts.gate_up_proj`
[experts, 2 x moe_intermediate, hidden] and `mlp.experts.down_proj`) are 3-D parameters, not `nn.Linear`
modules, so a module-based 'all-linear' misses them and would adapt attention only. `lora_plan` adapts them
through peft's `target_parameters`, and never adapts the router (the `gate` Linear that scores the experts).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from distill.config import ConfigError
from distill.storage import local_dir, staged_dir

log = logging.getLogger("distill.student_model")

PEFT_PREFIX = "base_model.model."
LAYER_INDEX = re.compile(r"^(.*?\.)?layers\.\d+\.")  # the decoder-layer prefix of a parameter name


# ----------------------------------------------------------------------------------------------------------------
# What LoRA adapts
@dataclass(frozen=True)
class LoraPlan:
    target_modules: list[str]                 # short names of nn.Linear modules (q_proj, ..., down_proj)
    target_parameters: list[str] = field(default_factory=list)  # fused expert weights, as layer-relative names
    routers: list[str] = field(default_factory=list)            # MoE routers left alone (for the log)


def _is_router(name: str, module, modules: dict) -> bool:
    """An MoE router: a weight-holding module beside an `experts` container in the same block (Qwen3-MoE
    `mlp.gate`, Mixtral `block_sparse_moe.gate`). Adapting it would change which experts each token is sent to."""
    parent, _, short = name.rpartition(".")
    return short != "experts" and hasattr(module, "weight") and f"{parent}.experts" in modules


def lora_plan(model, target_modules: str | list[str]) -> LoraPlan:
    """'all-linear' spelled out for this model: every linear layer of attention and MLP by its short name (never
    the output head, never an MoE router) plus the fused 3-D expert weights as peft target_parameters. A list
    names modules (short names) and/or layer-relative parameters (e.g. mlp.experts.gate_up_proj); a name that
    matches nothing adaptable is a ConfigError that says what it is."""
    import torch

    modules = dict(model.named_modules())
    head = model.get_output_embeddings()
    routers = sorted(name for name, m in modules.items() if name and _is_router(name, m, modules))
    linear_short = {name.rsplit(".", 1)[-1] for name, m in modules.items()
                    if isinstance(m, torch.nn.Linear) and m is not head and name not in routers}
    fused = sorted({LAYER_INDEX.sub("", name) for name, p in model.named_parameters()
                    if p.ndim == 3 and ".experts." in f".{name}"})
    if target_modules == "all-linear":
        return LoraPlan(sorted(linear_short), fused, routers)
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    router_short = {r.rsplit(".", 1)[-1] for r in routers}
    mods, params = [], []
    for n in names:
        if n in fused:
            params.append(n)
        elif n in linear_short:
            mods.append(n)
        elif n in router_short:
            raise ConfigError(f"lora.target_modules: {n!r} is the MoE router of this model ({routers[0]}); LoRA on "
                              f"the router would change which experts each token uses; leave it out")
        else:
            raise ConfigError(f"lora.target_modules: {n!r} is neither a linear layer ({', '.join(sorted(linear_short))}) "
                              f"nor a fused expert weight ({', '.join(fused) or 'none in this model'}) of the student")
    return LoraPlan(sorted(mods), sorted(params), routers)


def lora_config(plan: LoraPlan, rank: int, alpha: float, dropout: float):
    from peft import LoraConfig

    kwargs: dict[str, Any] = {}
    if plan.target_parameters:
        kwargs["target_parameters"] = plan.target_parameters
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=plan.target_modules,
                      task_type="CAUSAL_LM", **kwargs)


def checkpoint_name(param_name: str) -> str:
    """A peft-wrapped parameter's name in the base model's own checkpoint."""
    name = param_name[len(PEFT_PREFIX):] if param_name.startswith(PEFT_PREFIX) else param_name
    return name.replace(".base_layer", "")


# ----------------------------------------------------------------------------------------------------------------
# Reading a checkpoint by slices
def model_folder(model: str) -> str:
    """A local folder with the model's config and safetensors: the folder itself, or the hub snapshot."""
    if os.path.isdir(model):
        return model
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as err:
        raise ConfigError(f"student {model!r}: not a local folder and not downloadable ({err})") from None


class SafetensorsReader:
    """Reads slices of named tensors from a model folder's safetensors files without loading whole files."""

    def __init__(self, folder: str):
        from safetensors import safe_open

        index_path = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.exists(os.path.join(folder, "model.safetensors")):
            with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise ConfigError(f"{folder}: no model.safetensors or model.safetensors.index.json")
        self.folder, self.weight_map = folder, weight_map
        self._open: dict[str, Any] = {}
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.weight_map

    def read(self, key: str, index: tuple[slice, ...] = ()):
        from safetensors import safe_open

        file = self.weight_map[key]
        if file not in self._open:
            self._open[file] = safe_open(os.path.join(self.folder, file), framework="pt")
        self.used.add(key)
        tensor_slice = self._open[file].get_slice(key)
        return tensor_slice[index] if index else tensor_slice[:]

    def unused(self) -> list[str]:
        return sorted(set(self.weight_map) - self.used)


def read_weight(reader: SafetensorsReader, name: str, index: tuple[slice, ...]):
    """The `index` part of the model parameter `name`, from the checkpoint. Fused expert weights are assembled from
    per-expert checkpoint tensors (how transformers saves them), reading only the experts in `index[0]`."""
    import torch

    if reader.has(name):
        return reader.read(name, index)
    prefix, _, tail = name.rpartition("experts.")
    first = index[0] if index else slice(None)
    rest = index[1:]
    if tail in ("gate_up_proj", "down_proj") and reader.has(f"{prefix}experts.0.{tail.split('_')[0]}_proj.weight"):
        count = _expert_count(reader, prefix)
        parts = ("gate_proj", "up_proj") if tail == "gate_up_proj" else ("down_proj",)
        # Other ranks read the other experts: every expert of this weight is accounted for here.
        reader.used.update(f"{prefix}experts.{e}.{part}.weight" for e in range(count) for part in parts)
        experts = range(*first.indices(count))
        # gate_up_proj[e] = [gate_proj; up_proj] of expert e (rows), down_proj[e] = its down_proj.
        stacked = torch.stack([torch.cat([reader.read(f"{prefix}experts.{e}.{part}.weight") for part in parts], dim=0)
                               for e in experts])
        return stacked[(slice(None), *rest)] if rest else stacked
    raise KeyError(name)


def _expert_count(reader: SafetensorsReader, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"experts\.(\d+)\.")
    return 1 + max(int(m.group(1)) for k in reader.weight_map if (m := pattern.match(k)))


def local_index(param, full_shape) -> tuple[tuple[slice, ...], Any]:
    """(slices of the full tensor this rank holds, the local tensor to fill) for a plain or FSDP2-sharded param."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(full_shape, param.device_mesh, param.placements)
        local = param.to_local()
        if tuple(local.shape) != tuple(shape):
            raise RuntimeError(f"local shard {tuple(local.shape)} != computed {tuple(shape)}")
        return tuple(slice(o, o + s) for o, s in zip(offset, shape)), local
    return tuple(slice(0, s) for s in full_shape), param.data


# ----------------------------------------------------------------------------------------------------------------
# The sharded student
def build_sharded_student(student: str, plan_modules: str | list[str], rank: int, alpha: float, dropout: float,
                          seed: int, base_dtype, device, attn_implementation: str, checkpointing: bool,
                          mp_policy, mesh=None) -> tuple[Any, LoraPlan]:
    """The student with a LoRA adapter, sharded with FSDP2 (each decoder layer its own unit, then the root) over
    `mesh` (None: every rank; a 2-D mesh: HSDP, see distill/train/mesh.py), its base weights read shard by shard
    from the checkpoint. Works with one worker too (the shard is everything)."""
    import torch
    from peft import get_peft_model
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    from accelerate import init_empty_weights

    folder = model_folder(student)
    config = AutoConfig.from_pretrained(folder)
    # Parameters on the meta device (no memory); buffers (rotary frequencies) computed for real, kept to restore
    # after FSDP allocates the shards.
    with init_empty_weights(include_buffers=False):
        base = AutoModelForCausalLM.from_config(config, dtype=base_dtype, attn_implementation=attn_implementation)
    base.tie_weights()  # from_config leaves a tied output head untied until asked
    buffers = {PEFT_PREFIX + name: b.detach().clone() for name, b in base.named_buffers()}
    base.config.use_cache = False
    plan = lora_plan(base, plan_modules)
    if plan.routers:
        log.info("LoRA leaves the MoE routers alone: %s", ", ".join(plan.routers[:3]) + (" ..." if len(plan.routers) > 3 else ""))
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    # peft keeps the adapter in fp32 over a bf16 base (autocast_adapter_dtype): the optimizer updates fp32 weights.
    model = get_peft_model(base, lora_config(plan, rank, alpha, dropout), autocast_adapter_dtype=True,
                           low_cpu_mem_usage=True)
    layer_classes = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise RuntimeError(f"{student}: found no decoder layers ({layer_classes}) to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    model.to_empty(device=device)
    with torch.no_grad():
        _load_base(model, folder)
        _init_lora(model, seed)
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name].to(buffer.dtype))
    return model, plan


def _load_base(model, folder: str) -> None:
    reader = SafetensorsReader(folder)
    missing = []
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        key = checkpoint_name(name)
        index, local = local_index(param, param.shape)
        try:
            local.copy_(read_weight(reader, key, index))
        except KeyError:
            missing.append(key)
    if missing:
        raise ConfigError(f"{folder}: the checkpoint has no weights for {len(missing)} parameter(s) of the model, "
                          f"e.g. {missing[:5]}")
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    unused = [k for k in reader.unused() if k not in tied]
    if unused:
        raise ConfigError(f"{folder}: {len(unused)} checkpoint tensor(s) match no parameter of the model (an "
                          f"unknown layout?), e.g. {unused[:5]}")


def _init_lora(model, seed: int) -> None:
    """peft's own initialisation (lora_A Kaiming-uniform, a=sqrt(5); lora_B zero), drawn for the full tensor from a
    generator seeded by the seed and the parameter's name, then cut to this rank's shard: every rank and every
    world size starts from the same adapter."""
    import torch

    for name, param in model.named_parameters():
        if "lora_" not in name:
            continue
        index, local = local_index(param, param.shape)
        if "lora_B" in name:
            local.zero_()
        elif "lora_A" in name:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + _stable_hash(name))
            bound = 1.0 / math.sqrt(param.shape[1])
            full = torch.empty(tuple(param.shape), dtype=torch.float32).uniform_(-bound, bound, generator=generator)
            local.copy_(full[index])
        else:
            raise RuntimeError(f"unexpected LoRA parameter {name}: only lora_A/lora_B are initialised here")


def _stable_hash(text: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


# ----------------------------------------------------------------------------------------------------------------
# Folding an adapter into its base
def merge_adapter(student: str, adapter: str, dest: str, device: str = "cpu", needs=None) -> str:
    """The base model with the adapter (local folder or URI) merged in, saved with the tokenizer to `dest` (local
    or URI), in the student's dtype. On a CPU merged in float32 (no rounding of the LoRA product into bf16 weights
    first); on a GPU in the base's own dtype (a 30B base in float32 fits neither). Fused MoE expert adapters (peft
    target_parameters) merge the same way. Run it through `distill.student_serving.merge_on_cluster`, which
    reserves what it needs (`needs`, checked here against the GPU before anything loads)."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(AutoConfig.from_pretrained(student), "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if device == "gpu":
        free, _ = torch.cuda.mem_get_info()
        if needs is not None and needs.gpu_bytes > free:
            raise ConfigError(f"merging an adapter into {student} on a GPU needs {needs.gpu_bytes / 1024**3:.1f} GiB; "
                              f"the GPU has {free / 1024**3:.1f} GiB free: serve the adapter with LoRA instead")
        load = dict(dtype=dtype, device_map="cuda")
    else:
        load = dict(dtype=torch.float32)
    with local_dir(adapter) as adapter_path:
        base = AutoModelForCausalLM.from_pretrained(student, **load)
        merged = PeftModel.from_pretrained(base, adapter_path).merge_and_unload().to(dtype)
    with staged_dir(dest) as staging:
        merged.save_pretrained(staging)
        AutoTokenizer.from_pretrained(student).save_pretrained(staging)
    return dest


def adapter_has_experts(adapter_config: dict) -> bool:
    """An adapter of fused MoE expert weights (vLLM's CPU build has no LoRA kernels for those)."""
    return bool(adapter_config.get("target_parameters"))

