"""The generate stage's config: every option of `distill generate`, named, typed and documented (the recipe
pipelines/generate.py maps the command line onto it)."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from distill.config import StrictModel
from distill.engine import EngineConfig
from distill.local_models import default_model_dir, sample_data_path


class GenerateConfig(StrictModel):
    task: str = Field("language-id", description="Built-in task name or path to a task YAML.")
    input: str = Field(str(sample_data_path()), description="Queries: .txt/.jsonl/.parquet file or folder, or URI.")
    output: str = Field("runs/generate", description="Output directory or URI (data/, rejects/, manifest.json).")
    teacher: str = Field(default_model_dir(), description="Teacher model: a local folder or a hub name.")
    limit: Optional[int] = Field(None, ge=1, description="Use only the first N input rows.")
    sample: Optional[int] = Field(
        None, ge=1, description="Use N rows spread over the whole input (those whose id hashes lowest: the same rows "
        "on every run; a file sorted by label still yields every label). The input is read twice.")
    text_column: str = Field("text", description="Column holding the query text (.jsonl/.parquet).")
    id_column: str = Field("id", description="Column holding a stable id; ids are derived from the text if absent.")
    label_column: str = Field("label", description="Column holding a gold label, if any (kept for evaluation).")
    temperature: Optional[float] = Field(None, ge=0, description="Override the task's teacher temperature.")
    max_tokens: Optional[int] = Field(None, ge=1, description="Override the task's teacher max_tokens (the "
                                      "answer's budget).")
    reasoning_tokens: Optional[int] = Field(None, ge=0, description="Override the task's teacher reasoning_tokens "
                                            "(a thinking teacher's reasoning budget).")
    samples: int = Field(1, ge=1, description="Teacher samples per query; >1 takes the majority answer.")
    retries: int = Field(2, ge=0, description="Extra attempts (new seed) for unparseable answers before rejecting.")
    logprobs: int = Field(
        20, ge=0, le=20, description="Keep the teacher's top-k logprobs per answer token (0: off): the soft labels "
        "training mixes in when the student shares the teacher's tokenizer. On by default: vLLM returns them "
        "with the tokens it samples anyway (20 is vLLM's max_logprobs).")
    seed: int = Field(0, description="Engine sampling seed; attempt k uses seed + k.")
    rows_per_shard: int = Field(1000, ge=1, description="Rows per output Parquet shard.")
    flush_seconds: float = Field(60.0, gt=0, description="Write a shard at least this often while rows arrive.")
    progress_seconds: float = Field(10.0, gt=0, description="How often progress is logged.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engines and their actor pool.")
