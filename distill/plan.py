"""Will the run fit? Every stage's memory, traffic and checkpoint figures from the models' config.json files and
the run's settings alone: no weights, no Ray, no vLLM (`distill plan`; `distill run` plans first).

Per device (a GPU; the host for CPU runs). Engines: weights / tensor_parallel_size, an allowance for vLLM, and
the KV cache in what is left of gpu_memory_utilization x GPU memory, which must hold one sequence of the context
the pass needs (distill.engine's planning), itself within the model's max_position_embeddings. Training (FSDP2
over LoRA, as distill.student_model builds it): the frozen base sharded over the shard group, the units gathered
at once, LoRA weights + grads + AdamW states (fp32: 4 + 4 + 8 bytes per trainable parameter) sharded too, the
LoRA grads FSDP2 keeps unsharded between micro-batches, activations (ModelFacts.activation_width: an ESTIMATE),
the fp32 logits of the loss, an allowance for CUDA and NCCL; bytes moved per step, checkpoint size. A figure
that does not fit refuses the plan: a ConfigError naming it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from pydantic import Field

from distill.config import ConfigError, StrictModel
from distill.engine import EngineConfig, planned_engine
from distill.evaluate.config import EvalConfig
from distill.generate.config import GenerateConfig
from distill.model_facts import DTYPE_BYTES, LoraFacts, ModelFacts, lora_facts, model_facts
from distill.train.config import TrainConfig

GIB = 1024**3
# Allowances, round figures rather than measurements: vLLM profiles its own peak at start-up (activations of a
# full batch, CUDA graphs, the CUDA context); training needs the CUDA context, NCCL buffers and allocator slack;
# on CPU each engine or worker is a process with torch (and vLLM) loaded.
ENGINE_OVERHEAD = TRAIN_OVERHEAD = 2 * GIB
CPU_PROCESS_OVERHEAD = 1 * GIB
# Without the model's tokenizer at hand (a hub name planned offline), a prompt's tokens are estimated from its
# UTF-8 bytes: 3 per token undercounts none of the built-in prompts (SmolLM2's tokenizer: 3.1 on language-id).
PROMPT_BYTES_PER_TOKEN = 3
TEMPLATE_TOKENS = 16
ASSUMED_GPU = (80.0, 8)  # a GPU run that names no cluster, planned on a machine without GPUs (and says so)


class ClusterSpec(StrictModel):
    gpu_memory_gib: float = Field(gt=0, description="Memory of one GPU in GiB (80 for A100/H100 80 GB, 48 for L40S).")
    gpus_per_node: int = Field(ge=1, description="GPUs per node: training workers fill nodes in turn, and an "
                               "engine's tensor-parallel GPUs must be on one node.")


@dataclass(frozen=True)
class Term:  # one thing a device holds, in bytes
    what: str
    bytes: int


@dataclass(frozen=True)
class Budget:
    """What one device holds: each term, and what it has (`capacity`, said in `of`)."""
    terms: tuple[Term, ...]
    capacity: int
    of: str

    @property
    def needed(self) -> int:
        return sum(t.bytes for t in self.terms)

    def text(self, relation: str = "of") -> str:
        parts = " + ".join(f"{t.what} {gib(t.bytes)}" for t in self.terms if t.bytes)
        return f"{gib(self.needed)} GiB ({parts}) {relation} {self.of}"


@dataclass(frozen=True)
class EnginePlan:
    stage: str
    role: str                  # teacher, base student, distilled student
    model: str
    device: str
    dtype: str
    tensor_parallel: int
    actors: tuple[int, int]    # min, max
    gpus: int                  # at most: max actors x tensor_parallel_size
    memory: Budget             # per GPU (CPU: per engine process)
    kv_bytes_per_token: int    # per GPU
    kv_tokens: int             # tokens the KV cache holds
    context_need: int          # what the pass needs, before its longest query (read at run time)
    context_note: str
    max_model_len: int
    sequences_at_once: int


@dataclass(frozen=True)
class Traffic:
    """Bytes one GPU receives per optimizer step."""
    gathers: int               # FSDP all-gathers: every unit in forward and again in backward, per micro-batch
    gradients: int             # LoRA gradients reduced once per step (fp32)
    intra_node: int
    inter_node: int


@dataclass(frozen=True)
class TrainPlan:
    device: str
    workers: int
    nodes: int
    shard_group: int           # GPUs one copy of the model is sharded over
    replicas: int              # shard groups (HSDP when more than one: each holds a whole copy)
    precision: str
    checkpointing: bool
    tokens_per_micro_batch: int
    memory: Budget             # per GPU (CPU: per worker)
    activations_other: int     # the activations with the other gradient-checkpointing setting, for comparison
    params: int
    trainable: int
    traffic: Traffic
    checkpoint_bytes: int      # LoRA weights + AdamW states (fp32)
    adapter_bytes: int         # the exported adapter (fp32)


@dataclass(frozen=True)
class RunPlan:
    source: str
    cluster: str
    models: tuple[ModelFacts, ...]
    engines: tuple[EnginePlan, ...]
    train: Optional[TrainPlan]
    refusals: tuple[str, ...]

    def lines(self) -> list[str]:
        out = [f"plan of {self.source} ({self.cluster})"]
        for m in self.models:
            out.append(f"model {m.name}: {m.architecture}, {billions(m.params)} parameters ({m.params:,}), "
                       f"{m.layers} layers, {m.kv_heads} KV heads x {m.head_dim}"
                       + (f", {m.experts} experts ({m.experts_per_token} per token)" if m.experts else "")
                       + f", context {m.max_position or '?'}; config: {m.source}")
        for e in self.engines:
            out.append(f"{e.stage} {e.role}: {e.device} {e.dtype}, {e.actors[0]}-{e.actors[1]} engine(s) x TP "
                       f"{e.tensor_parallel}" + (f" = up to {e.gpus} GPUs" if e.device == "gpu" else "")
                       + f"; per {'GPU' if e.device == 'gpu' else 'engine'} {e.memory.text()}")
            out.append(f"  KV {e.kv_bytes_per_token / 1024:.0f} KiB/token -> {e.kv_tokens:,} tokens; context "
                       f"{e.max_model_len:,} ({e.context_note}) -> {e.sequences_at_once} sequence(s) at once")
        t = self.train
        if t is not None:
            layout = (f"HSDP: {t.replicas} replicas x {t.shard_group} shards" if t.replicas > 1
                      else f"FSDP2 over {t.shard_group}")
            out += [f"train: {t.workers} worker(s) on {t.nodes} node(s), {layout}; {t.precision}, gradient "
                    f"checkpointing {'on' if t.checkpointing else 'off'}; per {'GPU' if t.device == 'gpu' else 'worker'} "
                    f"{t.memory.text()}",
                    f"  activations {gib(t.activations_other)} GiB with gradient checkpointing "
                    f"{'off' if t.checkpointing else 'on'} (estimate, {t.tokens_per_micro_batch:,} tokens per micro-batch)",
                    f"  LoRA trains {billions(t.trainable)} of {billions(t.params)} parameters ({t.trainable:,}, "
                    f"{100 * t.trainable / t.params:.2f} %)",
                    f"  per step and {'GPU' if t.device == 'gpu' else 'worker'}: gathers {gib(t.traffic.gathers)} GiB + gradients {gib(t.traffic.gradients)} "
                    f"GiB; {gib(t.traffic.intra_node)} GiB within the node, {gib(t.traffic.inter_node)} GiB across nodes",
                    f"  checkpoint {gib(t.checkpoint_bytes)} GiB (LoRA weights + AdamW states); exported adapter "
                    f"{gib(t.adapter_bytes)} GiB"]
        out += [f"REFUSED: {r}" for r in self.refusals]
        return out

    def table(self) -> str:
        return "\n".join(self.lines())

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def check(self) -> "RunPlan":
        if self.refusals:
            raise ConfigError("the run does not fit (distill plan shows every figure):\n"
                              + "\n".join(f"  - {r}" for r in self.refusals))
        return self


def gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def billions(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


# ----------------------------------------------------------------------------------------------------------------
# Where things run
def host_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def local_gpu() -> Optional[ClusterSpec]:
    import torch

    return ClusterSpec(gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / GIB,
                       gpus_per_node=torch.cuda.device_count()) if torch.cuda.is_available() else None


def resolve(device: str, cluster: Optional[ClusterSpec]) -> str:
    """A stage's device without a cluster to ask: 'auto' is a GPU when the run names a cluster or this machine
    has a GPU, else the CPU."""
    return device if device != "auto" else "gpu" if cluster is not None or local_gpu() is not None else "cpu"


# ----------------------------------------------------------------------------------------------------------------
# Engines
def prompt_tokens(model: str, messages: list[dict], template_kwargs: Optional[dict] = None) -> tuple[int, bool]:
    """(tokens of the rendered prompt with an empty query, exact?): counted with the model's tokenizer when it is a
    local folder (as generation's prepare counts it), else estimated from the bytes."""
    if os.path.isfile(os.path.join(model, "tokenizer_config.json")):
        tokenizer = _tokenizer(model)
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                             **(template_kwargs or {}))
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]), True
    size = sum(len((m.get("content") or "").encode("utf-8")) for m in messages)
    return -(-size // PROMPT_BYTES_PER_TOKEN) + TEMPLATE_TOKENS, False


@functools.lru_cache(maxsize=4)
def _tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def plan_engine(stage: str, role: str, model: str, engine: EngineConfig, need: int, need_note: str,
                gpu: Optional[ClusterSpec], refusals: list[str], adapter_params: int = 0) -> EnginePlan:
    from distill.hardware import cpu_flags, engine_dtype

    facts = model_facts(model)
    device = resolve(engine.device, gpu)
    dtype = engine_dtype(engine.dtype, device, cpu_flags() if device == "cpu" else ())
    width, tp = DTYPE_BYTES[dtype], engine.tensor_parallel_size if device == "gpu" else 1
    name = f"{stage} {role} engine"
    # The context: the setting (checked against the need and the model) or the need itself, within the model.
    if engine.max_model_len is not None:
        max_len = engine.max_model_len
        if facts.max_position and max_len > facts.max_position:
            refusals.append(f"{name}: engine.max_model_len {max_len:,} is beyond the {facts.max_position:,} tokens "
                            f"that {model} holds (max_position_embeddings)")
        try:
            planned_engine(engine, model, need, f"{name} ({need_note})")
        except ConfigError as err:
            refusals.append(str(err))
    else:
        max_len = need
        if facts.max_position and need > facts.max_position:  # distill.engine.planned_engine's refusal, offline
            refusals.append(f"{name} ({need_note}) needs {need} tokens of context, more than the "
                            f"{facts.max_position} that {model} holds (max_position_embeddings): shorten the "
                            "prompt or the task's budgets")
    weights = Term("weights", -(-(facts.params + adapter_params) * width // tp))
    per_token = facts.kv_bytes_per_token(width, tp)
    if device == "gpu":
        if tp > gpu.gpus_per_node:
            refusals.append(f"{name}: tensor_parallel_size {tp} > {gpu.gpus_per_node} GPUs per node")
        capacity, of = int(engine.gpu_memory_utilization * gpu.gpu_memory_gib * GIB), \
            f"{engine.gpu_memory_utilization:.2f} x {gpu.gpu_memory_gib:g} GiB"
        fixed = Budget((weights, Term("vLLM overhead", ENGINE_OVERHEAD)), capacity, f"{gib(capacity)} GiB ({of})")
        room = capacity - fixed.needed
        if room < 0:
            refusals.append(f"{name}: per GPU {fixed.text('>')}: weights over tensor_parallel_size {tp}; raise it")
        memory = Budget(fixed.terms + (Term("KV cache", max(room, 0)),), capacity, fixed.of)
    else:
        room, host, actors = engine.kv_cache_memory_bytes, host_memory(), engine.max_actors
        memory = Budget((weights, Term("KV cache", room), Term("process", CPU_PROCESS_OVERHEAD)), host // actors,
                        f"{gib(host // actors)} GiB (host {gib(host)} GiB / {actors} engine(s))")
        if memory.needed > memory.capacity:
            refusals.append(f"{name}: per engine {memory.text('>')}")
    tokens = max(room, 0) // per_token
    if memory.needed <= memory.capacity and tokens < max_len:
        refusals.append(f"{name}: its KV cache ({gib(max(room, 0))} GiB per {'GPU' if device == 'gpu' else 'engine'}) "
                        f"holds {tokens:,} tokens, fewer than one sequence of {max_len:,} (max_model_len)")
    return EnginePlan(stage, role, model, device, dtype, tp, (engine.min_actors, engine.max_actors),
                      engine.max_actors * tp if device == "gpu" else 0, memory, per_token, tokens, need,
                      need_note, max_len, tokens // max_len if max_len else 0)


# ----------------------------------------------------------------------------------------------------------------
# Training
def lora_of(config: TrainConfig) -> LoraFacts:
    targets = config.lora.target_modules
    return lora_facts(config.student, config.lora.rank, targets if isinstance(targets, str) else tuple(targets))


def plan_training(config: TrainConfig, gpu: Optional[ClusterSpec], refusals: list[str]) -> TrainPlan:
    """The training figures of `config` on `gpu` (None: the host's memory, CPU), in the layout distill/train/mesh.py
    builds: FSDP2 over every worker on one node, HSDP (sharded within a node, replicated across) when the workers
    span nodes, or shard groups of train.shard_group_size. Workers are taken to fill nodes in turn."""
    from distill.hardware import cpu_flags, training_precision

    facts, trainable = model_facts(config.student), lora_of(config).trainable
    device = resolve(config.device, gpu)
    use_gpu = device == "gpu"
    precision = training_precision(config.precision, use_gpu, cpu_flags())
    checkpointing = config.gradient_checkpointing if config.gradient_checkpointing is not None else use_gpu
    base, act = (4, 4) if precision == "fp32" else (2, 2)
    lora_gathered = 2 if precision == "bf16" else 4  # FSDP mixed precision casts the LoRA weights to bf16
    workers, per_node = config.workers, (gpu.gpus_per_node if use_gpu else config.workers)
    nodes = -(-workers // per_node)
    shard = config.shard_group_size or (workers if nodes == 1 else per_node)
    if workers % shard or (nodes > 1 and workers % per_node and not config.shard_group_size):
        refusals.append(f"train: {workers} workers do not split into shard groups of {shard} (HSDP shards within a "
                        f"node of {per_node} GPUs): set train.shard_group_size to a divisor of workers")
    replicas = max(1, workers // shard)
    tokens = config.per_device_batch_size * config.max_length
    layer = tokens * facts.activation_width() * act
    saved = facts.layers * tokens * facts.hidden * act + layer  # checkpointing: every layer's input + one layer
    activations, other = (saved, facts.layers * layer) if checkpointing else (facts.layers * layer, saved)
    terms = (
        Term("weights", -(-facts.params * base // shard)),
        # The units unsharded at once: the root (embeddings, head; FSDP2 keeps it gathered through the step),
        # the layer being computed and the one prefetched.
        Term("gathered", (facts.root_params + 2 * facts.layer_params) * base if shard > 1 else 0),
        Term("LoRA+AdamW", -(-trainable * 16 // shard)),
        # FSDP2 holds the gradients unsharded (fp32) between the micro-batches of a step: reduced once at its end.
        Term("LoRA grads", trainable * 4 if shard > 1 and config.gradient_accumulation > 1 else 0),
        Term("activations", activations),
        Term("logits", tokens * facts.vocab * 4),
        Term("overhead", TRAIN_OVERHEAD if use_gpu else CPU_PROCESS_OVERHEAD),
    )
    if use_gpu:
        memory = Budget(terms, int(gpu.gpu_memory_gib * GIB), f"{gpu.gpu_memory_gib:g} GiB")
    else:
        host = host_memory()
        memory = Budget(terms, host // workers, f"{gib(host // workers)} GiB (host {gib(host)} GiB / {workers} "
                        f"worker(s))")
    if memory.needed > memory.capacity:
        refusals.append(f"train: per {'GPU' if use_gpu else 'worker'} {memory.text('>')}" + (
            "" if checkpointing else f"; gradient_checkpointing: true saves {gib(activations - other)} GiB"))
    # Traffic: each GPU receives (shard - 1) / shard of what its group gathers or reduce-scatters; from its own node
    # the share (the group's GPUs on that node - 1) / (shard - 1), the rest across nodes. HSDP replicas then
    # all-reduce their gradient shards (a ring: 2 (replicas - 1) / replicas of a shard), across nodes when the run
    # spans them.
    share = (shard - 1) / shard if shard > 1 else 0.0
    per_micro = (2 * (facts.params - facts.root_params) + facts.root_params) * base + 2 * trainable * lora_gathered
    gathers = int(per_micro * share * config.gradient_accumulation)
    reduce = int(trainable * 4 * share)
    local = (min(shard, per_node) - 1) / (shard - 1) if shard > 1 else 1.0
    intra, inter = int((gathers + reduce) * local), int((gathers + reduce) * (1 - local))
    replicated = int(2 * (replicas - 1) / replicas * trainable * 4 / shard)
    reduce += replicated
    intra, inter = (intra, inter + replicated) if nodes > 1 else (intra + replicated, inter)
    return TrainPlan(device, workers, nodes, shard, replicas, precision, checkpointing, tokens, memory, other,
                     facts.params, trainable, Traffic(gathers, reduce, intra, inter), trainable * 12, trainable * 4)


# ----------------------------------------------------------------------------------------------------------------
# The run
def plan_run(stages: Sequence[str], generate: GenerateConfig, train: TrainConfig, evaluate: EvalConfig,
             cluster: Optional[ClusterSpec] = None, source: str = "the run") -> RunPlan:
    """Every stage's figures, with what does not fit listed in `refusals` (`RunPlan.check` raises them)."""
    from distill.generate.steps import QUERY_JOIN_MARGIN
    from distill.tasks import load_task

    refusals: list[str] = []
    devices = {resolve(e.device, cluster) for e in (generate.engine, evaluate.engine)} | {resolve(train.device, cluster)}
    gpu, where = cluster, "cluster: " + (f"{cluster.gpu_memory_gib:g} GiB per GPU, {cluster.gpus_per_node} per node"
                                         if cluster else "none given")
    if "gpu" in devices and gpu is None:
        gpu = local_gpu() or ClusterSpec(gpu_memory_gib=ASSUMED_GPU[0], gpus_per_node=ASSUMED_GPU[1])
        where = (f"no cluster: section; planned for {gpu.gpu_memory_gib:g} GiB GPUs, {gpu.gpus_per_node} per node "
                 + ("(this machine)" if local_gpu() else "(assumed: set cluster.gpu_memory_gib / gpus_per_node)"))
    if "cpu" in devices:
        where += f"; CPU stages: host memory {gib(host_memory())} GiB"
    task = load_task(generate.task).with_teacher_budgets(generate.max_tokens, generate.reasoning_tokens)
    teacher, student = generate.teacher, train.student
    engines: list[EnginePlan] = []

    def teacher_need(engine_model: str) -> tuple[int, str]:
        n, exact = prompt_tokens(engine_model, task.teacher_messages(""), task.teacher_template_kwargs())
        return (n + task.teacher_budget() + QUERY_JOIN_MARGIN,
                f"prompt {'' if exact else '~'}{n} + budget {task.teacher_budget()} + {QUERY_JOIN_MARGIN} + the "
                "longest query")

    if "generate" in stages:
        need, note = teacher_need(teacher)
        engines.append(plan_engine("generate", "teacher", teacher, generate.engine, need, note, gpu, refusals))
    plan = None
    if "train" in stages:
        plan = plan_training(train, gpu if resolve(train.device, cluster) == "gpu" else None, refusals)
    if "eval" in stages:
        answer = max(task.teacher.max_tokens, evaluate.student_max_tokens or 0) + QUERY_JOIN_MARGIN
        need, note = teacher_need(teacher)
        engines.append(plan_engine("eval", "teacher", teacher, evaluate.engine, need, note, gpu, refusals))
        n, exact = prompt_tokens(student, task.teacher_messages(""))
        engines.append(plan_engine("eval", "base student", student, evaluate.engine, n + answer,
                                   f"scored with the prompt {'' if exact else '~'}{n} + answer {answer} + the "
                                   "longest query", gpu, refusals))
        lora = lora_of(train)
        # Served through vLLM's LoRA on GPUs for adapters of linear layers, merged otherwise (EvalConfig).
        served_lora = evaluate.student_serving == "lora" or (
            evaluate.student_serving == "auto" and resolve(evaluate.engine.device, cluster) == "gpu"
            and not lora.target_parameters)
        engines.append(plan_engine("eval", "distilled student", student, evaluate.engine, answer,
                                   f"answer {answer} + the longest query", gpu, refusals,
                                   adapter_params=lora.trainable if served_lora else 0))
    models = tuple(model_facts(m) for m in dict.fromkeys(
        ([teacher] if {"generate", "eval"} & set(stages) else []) + ([student] if {"train", "eval"} & set(stages) else [])))
    return RunPlan(source, where, models, tuple(engines), plan, tuple(refusals))
