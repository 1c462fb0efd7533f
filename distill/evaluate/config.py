"""The evaluate stage's config: every option of `distill eval`, named, typed and documented (the recipe
pipelines/evaluate.py maps the command line onto it)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from distill.config import StrictModel
from distill.cost import CostConfig
from distill.engine import EngineConfig


class EvalConfig(StrictModel):
    train: Optional[str] = Field(
        None, description="Training output OUT: reads train_summary.json (data, student, teacher, task), "
        "split.parquet (held-out ids), adapter/ (and merged/) and metrics.jsonl (learning curve).")
    data: Optional[str] = Field(
        None, description="Held-out data instead of the training split: a generation output folder or Parquet "
        "file/folder of DATA_SCHEMA rows (every row is held out).")
    split: str = Field("test", description="Which split of OUT/split.parquet is held out (test: never trained on "
                       "and never used to pick a checkpoint).")
    task: Optional[str] = Field(None, description="Task name or YAML; default: the one training/generation used.")
    teacher: Optional[str] = Field(None, description="Teacher model; default: the one that generated the data.")
    student: Optional[str] = Field(None, description="Base student model; default: the one training used, else the "
                                   "adapter's own base model (adapter_config.json).")
    adapter: Optional[str] = Field(None, description="LoRA adapter of the distilled student; default: OUT/adapter.")
    output: str = Field("runs/eval", description="Report directory (report.json/.md/.html, PNG plots), local or URI.")
    limit: Optional[int] = Field(None, ge=1, description="Evaluate only the first N held-out rows (by id).")
    student_constrained: bool = Field(
        False, description="Constrain the students to the task's label set like the teacher (label tasks only). "
        "Off by default: a student that needs guidance to produce a valid label has not fully learned the task.")
    student_serving: Literal["auto", "merged", "lora"] = Field(
        "auto", description="How the engine serves the distilled student. merged: the adapter folded into the "
        "base (the training run's OUT/merged when it holds this adapter, else merged by a Ray task into "
        "OUTPUT/merged-student), the model one would ship. lora: the base + the adapter through vLLM's LoRA "
        "(on vLLM CPU ~10x slower per request; none for MoE experts on CPU). auto: lora on GPUs for adapters of "
        "linear layers, merged otherwise.")
    student_max_tokens: Optional[int] = Field(
        None, ge=1, description="Most tokens a student may write; default: the longest held-out answer + 16.")
    ship_agreement: float = Field(
        0.9, ge=0, le=1, description="Agreement the verdict requires (label tasks): the rollout's rollback "
        "threshold (serve RolloutConfig.min_agreement), so the report never ticks a student that serving would "
        "roll back.")
    ship_similarity: float = Field(
        0.9, ge=0, le=1, description="Free text: the share of the teacher's own consistency (ROUGE-L of greedy vs "
        "a second sample) the student's similarity must reach for the verdict.")
    selection_split: str = Field(
        "validation", description="Split of OUT/split.parquet the selective threshold is chosen on (the training run's "
        "validation rows), then applied unchanged to the held-out rows. With --data there is none: no threshold.")
    selection_limit: Optional[int] = Field(None, ge=1, description="Use only the first N selection rows (by id).")
    target_agreement: Optional[float] = Field(
        None, ge=0, le=1, description="Agreement the student's kept answers must reach for the selective threshold "
        "(labels; free text: similarity); default ship_agreement / ship_similarity.")
    examples: int = Field(20, ge=0, description="Held-out rows shown side by side in the report.")
    seed: int = Field(0, description="Engine seed (answers are greedy; it draws the teacher's second sample).")
    cost: CostConfig = Field(default_factory=CostConfig, description="Prices for the cost model.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engines and their actor pool.")


# Options that do not change the report's numbers.
RERUN_FREE = {"examples", "output"}
