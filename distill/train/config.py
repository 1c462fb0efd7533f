"""The train stage's config: every option of `distill train` (SFT and on-policy, LoRA, the Ray Train run),
named, typed and documented (the recipe pipelines/train.py maps the command line onto it)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from distill.config import StrictModel
from distill.engine import EngineConfig
from distill.local_models import default_model_dir


class LoraOptions(StrictModel):
    rank: int = Field(32, ge=1, description="LoRA rank r (vLLM serves ranks 8, 16, 32, 64, ...).")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="Dropout on the LoRA input (training only). Off by default: it draws a "
        "random mask over the input of every adapted layer, ~30% of a CPU training step (SmolLM2, 2 cores: 543 vs "
        "371 tokens/s), and one epoch over thousands of examples has little to regularize.")
    target_modules: str | list[str] = Field(
        "all-linear", description="What gets adapters: 'all-linear' (every linear layer of attention and MLP, "
        "never the output head or an MoE router, plus the fused expert weights of MoE layers) or a list of module "
        "short names (q_proj, v_proj) and fused expert weights (mlp.experts.gate_up_proj).")


class OnPolicyOptions(StrictModel):
    rounds: int = Field(2, ge=1, description="Rounds of sample -> score -> train, each from the last round's adapter.")
    queries_per_round: Optional[int] = Field(
        None, ge=1, description="Training queries the student answers per round (a seeded sample; default: all).")
    steps_per_round: Optional[int] = Field(None, ge=1, description="Optimizer steps per round (default: one pass "
                                           "over the round's samples).")
    temperature: float = Field(1.0, ge=0, le=2, description="The student's sampling temperature: its own "
                               "distribution, which the reverse KL corrects.")
    top_k: int = Field(20, ge=1, le=20, description="Teacher logprobs kept per student token (vLLM's max 20).")
    max_new_tokens: Optional[int] = Field(None, ge=1, description="Most tokens a student sample may have; default: "
                                          "the longest training answer + 8.")
    teacher: Optional[str] = Field(None, description="The teacher that scores (default: the data's teacher).")
    answer_grammar: Optional[bool] = Field(
        None, description="The teacher scores under the task's answer grammar, as it generated (default: when the "
        "task's teacher is constrained): its logprobs and top-k are then the constrained teacher's, over the tokens "
        "the grammar allows. A student answer is scored up to and including the token where it left the format "
        "(the teacher's mass there lies on allowed tokens: the KL pulls the student back); the rest is not trained "
        "on (counted per round). Unconstrained, a small teacher puts most of its mass outside the format and pulls "
        "the student out of it (measured: README, Fidelity).")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engines that sample and score.")


class TrainConfig(StrictModel):
    data: str = Field(description="Generation output directory (reads DATA/data/*.parquet), local or URI.")
    extra_data: list[str] = Field(
        default_factory=list, description="More outputs in the generation data format trained on with `data` (for "
        "example serving's capture URI, the flywheel); a query already in an earlier source is kept once.")
    held_out_from: Optional[str] = Field(
        None, description="An earlier training output whose held-out rows stay held out: its ids keep their split "
        "(the same test rows, so the evaluations compare), new rows with the text of one of its test or validation "
        "rows never train, other new rows are split into train and validation only. Pair it with init_adapter "
        "(the adapter being served) to retrain on old + captured data.")
    output: str = Field("runs/train", description="Output directory: a local path or a pyarrow filesystem URI "
                        "(s3://, gs://, ...) that every node can reach.")
    student: str = Field(default_model_dir(), description="Student model: a local folder or a hub name.")
    init_adapter: Optional[str] = Field(
        None, description="Start from this adapter (a PEFT folder or URI, e.g. the one being served) instead of a "
        "fresh one: its rank and targets must be this config's.")
    method: Literal["sft", "on-policy"] = Field(
        "sft", description="sft: learn the teacher's answers from the data (hard labels, soft where free). "
        "on-policy: learn from the student's own answers, scored token by token by the prompted teacher (reverse "
        "KL, `on_policy`); start it from an SFT adapter with init_adapter for on-policy after SFT.")
    on_policy: OnPolicyOptions = Field(default_factory=OnPolicyOptions, description="Options of method on-policy.")
    workers: int = Field(1, ge=1, description="Ray Train workers; the model is sharded over them with FSDP2.")
    shard_group_size: Optional[int] = Field(
        None, ge=1, description="Workers that shard the student together; the groups replicate it (HSDP). Unset: "
        "all workers when they share a node, the workers of one node when the run spans nodes (only the LoRA "
        "gradients cross nodes). Must divide workers.")
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="auto: one GPU per worker when the cluster has GPUs, else CPU.")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker (its torch threads).")
    # data
    validation_fraction: float = Field(
        0.1, ge=0, lt=1, description="Fraction of ids held out for validation (by id hash; at least 1 with >= 2 "
        "rows, unless 0: no validation at all).")
    test_fraction: float = Field(
        0.1, ge=0, lt=1, description="Fraction of ids held out for the evaluation alone (by id hash): training "
        "neither learns from them nor picks checkpoints on them, so `distill eval` scores a clean test split.")
    split_seed: int = Field(0, description="Salt of the id hash that decides the split.")
    exclude_ids: Optional[str] = Field(
        None, description="A Parquet file or folder (local or URI) with an `id` column: those ids never train (for "
        "example an evaluation's held-out rows that also came back from serving).")
    limit: Optional[int] = Field(None, ge=1, description="Train on at most this many examples (the first by id "
                                 "of the train split; the split itself is unchanged).")
    validation_limit: Optional[int] = Field(
        None, ge=1, description="Validate on at most this many held-out examples (the first by id; split.parquet "
        "still lists every held-out id). Saves time on CPU.")
    max_length: int = Field(2048, ge=8, description="Longest example in tokens; longer ones are skipped, counted.")
    packing: bool = Field(
        True, description="Pack each micro-batch into one row (no padding; position ids restart per example so "
        "examples never attend to each other). Off: pad to the longest example of a length-sorted micro-batch.")
    # optimisation
    per_device_batch_size: int = Field(4, ge=1, description="Examples per micro-batch on each worker.")
    gradient_accumulation: int = Field(4, ge=1, description="Micro-batches per optimizer step on each worker.")
    epochs: int = Field(1, ge=1, description="Passes over the training split.")
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this many optimizer steps (the learning "
                                     "rate schedule spans them).")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    warmup_fraction: float = Field(0.03, ge=0, lt=1, description="Linear warm-up, as a fraction of all steps.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decay ends at this fraction of the peak.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Gradient clipping (None: off).")
    seed: int = Field(0, description="Seeds the data order, the LoRA init and dropout.")
    lora: LoraOptions = Field(default_factory=LoraOptions, description="The LoRA adapter.")
    soft_label_weight: Optional[float] = Field(
        None, ge=0, le=1, description="Weight of KL to the teacher's top-k logprobs at the answer tokens they were "
        "kept for: 0 hard labels only, 1 KL only there. Default: 0.5 when the data has top-k logprobs and the "
        "student shares the teacher's tokenizer (they are free then), else 0 (the summary says why). Soft labels "
        "that align with no training example are an error.")
    precision: Literal["auto", "fp32", "bf16", "bf16-base"] = Field(
        "auto", description="fp32: everything in fp32. bf16: the frozen base stored in bf16, fp32 LoRA weights, "
        "bf16 compute (FSDP mixed precision; the GPU default). bf16-base: the frozen base stored and run in bf16, "
        "the LoRA weights, their compute and optimizer state in fp32 (on an AVX-512 CPU with bf16 instructions "
        "1.6x faster than fp32, where FSDP's mixed precision is slower). auto: bf16 on GPU; on CPU bf16-base where "
        "every CPU node has native bf16 (AVX512_BF16 or AMX), else fp32 (distill.hardware, the rule the engines' "
        "dtype follows).")
    gradient_checkpointing: Optional[bool] = Field(None, description="Recompute activations in backward; "
                                                   "default: on for GPU, off for CPU.")
    # validation, selection, logging, checkpoints
    log_every: int = Field(1, ge=1, description="Write a metrics line every N steps (validation steps always; "
                           "those are also reported to Ray Train).")
    eval_every: int = Field(25, ge=1, description="Validation (loss, and agreement for label tasks) every N steps "
                            "and at every checkpoint.")
    select_by: Literal["auto", "agreement", "loss"] = Field(
        "auto", description="What picks the best checkpoint and drives early stopping: agreement with the "
        "teacher's held-out labels (decoded greedily by the workers; label tasks) or validation loss. auto: "
        "agreement for label tasks, loss for free text.")
    early_stopping_patience: Optional[int] = Field(
        None, ge=1, description="Stop after this many validations in a row without a better selection score "
        "(None: train every planned step).")
    checkpoint_every: int = Field(50, ge=1, description="Checkpoint every N steps (and at the last step, and "
                                  "at every validation that beats the best score so far).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept: the best by the selection score (plus "
                                  "the latest, always kept for resuming).")
    export: Literal["best", "last"] = Field("best", description="Which checkpoint becomes OUT/adapter.")
    merge: bool = Field(False, description="Also write OUT/merged: the base model with the adapter merged in.")
    max_failures: int = Field(1, ge=0, description="Worker-group restarts from the last checkpoint after a lost "
                              "worker (Ray Train FailureConfig).")
    fail_at_step: Optional[int] = Field(
        None, ge=1, description="TESTING/CHAOS ONLY: the last worker kills its own process (os._exit) when it "
        "starts this step, once per output directory, to prove that training resumes from a checkpoint.")


# Options that may change between a crashed run and its rerun without changing what is trained.
# The world size may change too (spot nodes lost or added) while the global batch stays: every step then trains on
# the same examples (see StepPlan) and the sharded checkpoint reshards to the new world.
RERUN_FREE = {"max_failures", "fail_at_step", "merge", "export", "cpus_per_worker", "device", "log_every",
              "workers", "gradient_accumulation", "shard_group_size"}
