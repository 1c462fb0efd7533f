"""Evaluate: did the student internalize the prompt, how faithful is it, how much faster and cheaper, should it ship?

    distill eval --train runs/train --output runs/eval
    distill eval --data HELDOUT --adapter OUT/adapter --output REPORT_DIR      # student: the adapter's base model

1. Held-out queries: the `test` split training saved (`OUT/split.parquet`: never trained on, never used to pick
   a checkpoint) of the generation output training read; `--data` instead takes a generation output folder or
   any Parquet of DATA_SCHEMA rows, all of them held out (distill.eval_inputs, which also plans every request).
2. Three engine passes (Ray Data x `ray.data.llm` vLLM, one model each, one after another), every request on the
   engines, nothing scored on the driver: the teacher with its prompt (greedy, plus a second sample at its own
   temperature: its self-consistency is the ceiling); the base student without the prompt (its answers, and the
   teacher's answer tokens scored without and with the prompt: NLLs a and b); the distilled student (served
   merged or through LoRA; its answers, and the teacher's answers scored: NLL c). Scoring is teacher-forced
   decoding with the prompt prefix-cached (distill.scoring), not prompt_logprobs, which bypass the cache.
3. The report (distill.eval_report, from distill.evaluation's numbers; distill.report writes it): fidelity
   against floor, ceiling and serving threshold, a verdict, labels, gap closed = (a - c) / (a - b), latency,
   cost, the learning curve; report.json, report.md, report.html with PNG plots, predictions.parquet.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Optional

from pydantic import Field

from distill.checkpoints import AttemptClock
from distill.config import StrictModel, check_settings
from distill.cost import CostConfig
from distill.engine import EngineConfig, run_requests
from distill.scoring import ENGINE_ARGS
from distill.storage import join, read_json

log = logging.getLogger("distill.evaluate")


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


# ----------------------------------------------------------------------------------------------------------------
def main(config: EvalConfig) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from distill.eval_inputs import distilled_model, plan_requests, resolve_inputs
    from distill.eval_report import build_report
    from distill.ray_init import init_ray
    from distill.report import write_report

    check_settings(join(config.output, "settings.json"),
                   {k: v for k, v in config.model_dump().items() if k not in RERUN_FREE}, "an evaluation")
    existing = read_json(join(config.output, "report.json"))
    if existing is not None:  # written last and whole: the evaluation is complete
        log.info("%s exists; evaluation is complete", join(config.output, "report.json"))
        return existing
    with AttemptClock(config.output) as clock:
        inputs = resolve_inputs(config)
        task = inputs.task
        log.info("evaluating %d held-out rows of %s (task %s): teacher %s, student %s + %s", len(inputs.rows),
                 inputs.data, task.name, inputs.teacher, inputs.student, inputs.adapter)
        init_ray()
        tokenizer = AutoTokenizer.from_pretrained(inputs.student)
        requests, planned = plan_requests(config, inputs, tokenizer)
        model, adapter, serving = distilled_model(config, inputs)
        # One engine per model, one after another, so no pass is timed while another one computes. The base and
        # the distilled student never share a LoRA-enabled engine: on vLLM CPU (0.32) a batch that mixed requests
        # with and without a LoRA applied the adapter to the base requests too.
        results, walls = {}, {}
        for run, name, engine_model, kwargs in (
                ("teacher", "teacher", inputs.teacher, {"chat_template_kwargs": {"enable_thinking": task.teacher.thinks}}),
                ("base", "base student", inputs.student, {}),
                ("student", "distilled student", model, {"adapter": adapter})):
            results[run], walls[run] = run_requests(name, requests[run], engine_model, config.engine, seed=config.seed,
                                                    **ENGINE_ARGS, **kwargs)
        report, details = build_report(config, inputs, results, walls, planned, serving, tokenizer, clock.total_s())
        paths = write_report(config.output, report, details)
    log.info("report: %s", paths["html"])
    return report


# ----------------------------------------------------------------------------------------------------------------
# CLI
def add_cli(subparsers) -> None:
    from distill.config import add_config_arguments

    p = subparsers.add_parser("eval", help="held-out fidelity, gold accuracy, gap closed, latency and cost report")
    add_config_arguments(p, EvalConfig)
    p.set_defaults(func=_cli)


def _cli(args) -> None:
    from distill.config import config_from_args
    from distill.report import headline_lines

    config = config_from_args(EvalConfig, args)
    report = main(config)
    print("\n".join(headline_lines(report)))
    print(f"report: {join(config.output, 'report.html')}\n        {join(config.output, 'report.md')}\n"
          f"        {join(config.output, 'report.json')}")
