"""Evaluate: did the student internalize the prompt, how faithful is it, how much faster and cheaper, should it ship?

    distill eval --train runs/train --output runs/eval
    distill eval --data HELDOUT --adapter OUT/adapter --output REPORT_DIR      # student: the adapter's base model

1. Held-out queries: the `test` split training saved (`OUT/split.parquet`: never trained on, never used to pick
   a checkpoint) of the generation output training read; `--data` instead takes a generation output folder or
   any Parquet of DATA_SCHEMA rows, all of them held out (distill.evaluate.inputs, which also plans every request).
2. Three engine passes (Ray Data x `ray.data.llm` vLLM, one model each, one after another), every request on the
   engines, nothing scored on the driver: the teacher with its prompt (greedy, plus a second sample at its own
   temperature: its self-consistency is the ceiling); the base student without the prompt (its answers, and the
   teacher's answer tokens scored without and with the prompt: NLLs a and b); the distilled student (served
   merged or through LoRA; its answers, and the teacher's answers scored: NLL c). Scoring is teacher-forced
   decoding with the prompt prefix-cached (distill.scoring), not prompt_logprobs, which bypass the cache.
3. The report (distill.evaluate.sections, from distill.evaluate.scores's numbers; distill.evaluate.render writes
   it): fidelity against floor, ceiling and serving threshold, a verdict, labels, gap closed = (a - c) / (a - b),
   latency, cost, the learning curve; report.json, report.md, report.html with PNG plots, predictions.parquet.
"""

from __future__ import annotations

import logging
from typing import Any

from distill.checkpoints import AttemptClock
from distill.config import check_settings
from distill.engine import plan_pass, run_requests
from distill.evaluate.config import RERUN_FREE, EvalConfig
from distill.scoring import ENGINE_ARGS
from distill.storage import join, read_json

log = logging.getLogger("distill.evaluate")


def main(config: EvalConfig) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from distill.evaluate.inputs import EnginePass, distilled_model, plan_requests, resolve_inputs
    from distill.evaluate.sections import build_report
    from distill.ray_init import init_ray
    from distill.evaluate.render import write_report

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
        teacher_tokenizer = AutoTokenizer.from_pretrained(inputs.teacher)
        requests, planned = plan_requests(config, inputs, tokenizer, teacher_tokenizer)
        artifact = distilled_model(config, inputs)
        # One engine per model, one after another, so no pass is timed while another one computes. The base and
        # the distilled student never share a LoRA-enabled engine: on vLLM CPU (0.32) a batch that mixed requests
        # with and without a LoRA applied the adapter to the base requests too.
        opened = task.teacher_opens_reasoning(teacher_tokenizer, inputs.teacher)
        runs = (("teacher", "teacher", inputs.teacher, teacher_tokenizer,
                 {"chat_template_kwargs": task.teacher_template_kwargs()}),
                ("base", "base student", inputs.student, tokenizer, {}),
                ("student", "distilled student", artifact.engine_model, tokenizer, {"adapter": artifact.engine_adapter}))
        # Every pass's context planned (or its setting checked) before the first engine starts.
        for run, name, engine_model, run_tokenizer, kwargs in runs:
            plan_pass(name, requests[run], engine_model, config.engine, run_tokenizer,
                      kwargs.get("chat_template_kwargs"))
        passes = {}
        for run, name, engine_model, run_tokenizer, kwargs in runs:
            passes[run] = EnginePass(*run_requests(name, requests[run], engine_model, config.engine,
                                                   seed=config.seed, tokenizer=run_tokenizer, **ENGINE_ARGS,
                                                   **kwargs))
        if opened:  # its outputs start inside the think block its template opened
            passes["teacher"] = passes["teacher"].behind_opened_reasoning()
        report, details = build_report(config, inputs, passes, planned, artifact, tokenizer, clock.total_s())
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
    from distill.evaluate.render import headline_lines

    config = config_from_args(EvalConfig, args)
    report = main(config)
    print("\n".join(headline_lines(report)))
    print(f"report: {join(config.output, 'report.html')}\n        {join(config.output, 'report.md')}\n"
          f"        {join(config.output, 'report.json')}")
