"""Run: the whole distillation as one driver — generate, train, evaluate — the job users `ray job submit`.

    distill run --config configs/demo.yaml
    ray job submit --address http://HEAD:8265 --working-dir . -- distill run --config configs/qwen3-30b-a3b.yaml

Every stage writes under one output root (local, or s3:// / gs:// so every node sees it):
`OUTPUT/generate` (teacher data), `OUTPUT/train` (adapter, checkpoints), `OUTPUT/eval` (report). A stage whose
output is complete is skipped; a partial one resumes (generation finishes only the missing ids, training restarts
from its last checkpoint), so a preempted job that is submitted again picks up where it stopped.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from distill.config import StrictModel, build_config
from distill.local_models import default_model_dir, sample_data_path
from distill.plan import ClusterSpec, RunPlan
from distill.storage import join, read_json, write_json
from distill.evaluate.config import EvalConfig
from distill.generate.config import GenerateConfig
from distill.train.config import TrainConfig

log = logging.getLogger("distill.run")

Stage = Literal["generate", "train", "eval"]
STAGES: tuple[Stage, ...] = ("generate", "train", "eval")

# Fields the run sets in each stage's config from its own top-level fields: one place to say them, no way for
# a stage section to contradict them.
DERIVED = {
    "generate": ("output", "task", "teacher", "input", "limit"),
    "train": ("data", "output", "student"),
    # No `data` for eval: given explicitly it means "all these rows are held out"; from `train` it is the split.
    "eval": ("train", "data", "task", "teacher", "student", "adapter", "output"),
}


class RunConfig(StrictModel):
    output: str = Field("runs/demo", description="Output root: generate/, train/, eval/ and run.json go under it.")
    task: str = Field("language-id", description="Built-in task name or task YAML path.")
    teacher: str = Field(default_model_dir(), description="Teacher model (folder or hub name).")
    student: str = Field(default_model_dir(), description="Student base model (folder or hub name).")
    input: str = Field(str(sample_data_path()), description="Queries (file, folder or URI) for generation.")
    limit: Optional[int] = Field(None, ge=1, description="Use only the first N input rows.")
    data: Optional[str] = Field(
        None, description="Train on this existing generation output instead of OUTPUT/generate (run the stages "
        "train,eval). With train.extra_data (serving's capture), train.held_out_from and train.init_adapter it "
        "retrains the served student on old + captured data and evaluates it on the earlier run's test rows.")
    stages: list[Stage] = Field(list(STAGES), description="Stages to run, in pipeline order.")
    sizing: Optional[str] = Field(None, description="What the run is sized for and why (printed with the plan at "
                                  "the start, so a user sees why it runs what it runs).")
    generate: dict[str, Any] = Field(default_factory=dict, description="GenerateConfig options (pipelines/generate.py).")
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig options (pipelines/train.py).")
    eval: dict[str, Any] = Field(default_factory=dict, description="EvalConfig options (pipelines/evaluate.py).")
    cluster: Optional[ClusterSpec] = Field(
        None, description="The GPUs the run is planned for (distill.plan; `distill plan` prints the plan): GPU "
        "memory in GiB and GPUs per node. Unset: this machine's GPU, else its host memory for CPU stages (a driver "
        "without GPUs plans `device: auto` stages as CPU ones: set it, or device: gpu, for GPU runs).")

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if [s for s in STAGES if s in self.stages] != list(self.stages):
            raise ValueError(f"stages: must be in pipeline order {list(STAGES)} without repeats")
        for stage, fields in DERIVED.items():
            clash = sorted(set(getattr(self, stage)) & set(fields))
            if clash:
                raise ValueError(f"{stage}: {', '.join(clash)} are set by the run itself (top-level output, task, "
                                 f"teacher, student, input, limit); remove them from the {stage} section")
        if self.data and "generate" in self.stages:
            raise ValueError("data names an existing generation output: run only the stages train,eval")
        # Build every stage config now, so a typo in any section fails before the first stage starts.
        self.generate_config(), self.train_config(), self.eval_config()
        return self

    def stage_dir(self, stage: Stage) -> str:
        return join(self.output, stage)

    def generate_config(self) -> GenerateConfig:
        return build_config(GenerateConfig, {**self.generate, "output": self.stage_dir("generate"), "task": self.task,
                                             "teacher": self.teacher, "input": self.input, "limit": self.limit},
                            "generate")

    def train_config(self) -> TrainConfig:
        return build_config(TrainConfig, {**self.train, "data": self.data or self.stage_dir("generate"),
                                          "output": self.stage_dir("train"), "student": self.student}, "train")

    def eval_config(self) -> EvalConfig:
        train = self.stage_dir("train")
        return build_config(EvalConfig, {**self.eval, "train": train, "task": self.task, "teacher": self.teacher, "student": self.student,
                                         "adapter": join(train, "adapter"), "output": self.stage_dir("eval")}, "eval")


def plan_lines(config: RunConfig) -> list[str]:
    """What the run will do, in a few lines: rows, steps, held-out rows, engine dtype and training precision with
    the CPU kind they were decided from, and the config's own word on why it is sized so."""
    from distill.engine import engine_facts
    from distill.hardware import cluster_cpu_flags, training_precision

    g, t, e = config.generate_config(), config.train_config(), config.eval_config()
    rows = (f"a sample of {g.sample} rows spread over the labels" if g.sample else
            f"the first {g.limit} rows" if g.limit else "every row")
    facts = engine_facts(g.engine)
    precision = training_precision(t.precision, facts["device"] == "gpu", cluster_cpu_flags())
    steps = f"{t.epochs} epoch(s)" + (f", at most {t.max_steps} steps" if t.max_steps else "")
    lines = [f"generate: {rows} of {config.input}, {g.samples} teacher sample(s) each",
             f"train ({t.method}): {steps} of {t.per_device_batch_size * t.gradient_accumulation * t.workers} "
             f"examples per step, {t.workers} worker(s); held out: {t.test_fraction:.0%} test, "
             f"{t.validation_fraction:.0%} validation",
             f"eval: {'the first ' + str(e.limit) if e.limit else 'all'} test rows; selective threshold on the "
             f"{e.selection_split} rows",
             f"engines {facts['dtype']} on {facts['device']}, training {precision} (CPU kind {facts['cpu_kind']}"
             + (f" as capped by ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']}"
                if os.environ.get("ONEDNN_MAX_CPU_ISA") else "")
             + f", {facts['driver_cpu']}, {os.cpu_count()} cores)"]
    return lines + ([f"why this size: {config.sizing}"] if config.sizing else [])


def resource_plan(config: RunConfig, source: str = "the run") -> RunPlan:
    """Memory per GPU, KV cache, traffic and checkpoint size of every stage the run has (distill.plan)."""
    from distill.plan import plan_run

    return plan_run(config.stages, config.generate_config(), config.train_config(), config.eval_config(),
                    config.cluster, source)


def main(config: RunConfig) -> dict[str, Any]:
    from distill.ray_init import init_ray
    from pipelines import evaluate, generate, train

    # Before Ray or any engine starts: a run that cannot fit stops here, with the figure that does not.
    planned = resource_plan(config)
    print("\n".join(f"plan: {line}" for line in planned.lines()), flush=True)
    planned.check()
    init_ray()
    for line in plan_lines(config):
        print(f"plan: {line}", flush=True)
    record_path = join(config.output, "run.json")
    record = read_json(record_path) or {"stages": {}}
    record["config"] = config.model_dump()
    for stage in config.stages:
        t0 = time.monotonic()
        if stage == "generate":
            manifest = generate.main(config.generate_config())
            result = {k: manifest[k] for k in ("rows_in", "rows_written", "rows_rejected")}
        elif stage == "train":
            summary = train.main(config.train_config())
            result = {k: summary.get(k) for k in ("steps", "final_loss", "final_val_loss", "best_val_loss")}
        else:
            # evaluate.main checks the settings first, then returns a finished report as it is.
            report = evaluate.main(config.eval_config())
            result = {"report": join(config.stage_dir("eval"), "report.html"), "headline": report["headline"],
                      "verdict": report["verdict"]["text"]}
        record["stages"][stage] = {**result, "seconds_this_run": round(time.monotonic() - t0, 3)}
        write_json(record_path, record)  # progress survives a preemption between stages
        log.info("stage %s done in %.0fs: %s", stage, time.monotonic() - t0, result)
    record["complete"] = list(config.stages) == list(STAGES)
    write_json(record_path, record)
    return record


def add_cli(subparsers) -> None:
    from distill.config import add_config_arguments

    p = subparsers.add_parser("run", help="generate -> train -> eval in one job (skips complete, resumes partial)")
    add_config_arguments(p, RunConfig)
    p.set_defaults(func=_cli)

    p = subparsers.add_parser("plan", help="will the run fit: memory per GPU, KV cache, bytes per step, checkpoint "
                              "size of every stage (offline; refuses what cannot fit)")
    add_config_arguments(p, RunConfig)
    p.add_argument("--json", nargs="?", const="-", metavar="PATH", help="also write the plan as JSON to PATH "
                   "(without one: print only the JSON)")
    p.set_defaults(func=_plan_cli)


def _plan_cli(args) -> None:
    from pathlib import Path

    from distill.config import config_from_args

    config = config_from_args(RunConfig, args)
    planned = resource_plan(config, args.config or "the command line")
    print(planned.to_json() if args.json == "-" else planned.table())  # --json alone: nothing but the JSON
    if args.json and args.json != "-":
        Path(args.json).write_text(planned.to_json() + "\n")
    planned.check()


def _cli(args) -> None:
    from distill.config import config_from_args
    from distill.evaluate.render import headline_lines

    config = config_from_args(RunConfig, args)
    record = main(config)
    for stage, result in record["stages"].items():
        print(f"{stage}: {result}" if stage != "eval" else "eval:")
    if "eval" in record["stages"]:
        print("\n".join("  " + line for line in headline_lines(read_json(join(config.stage_dir("eval"), "report.json")))))
        print(f"report: {record['stages']['eval']['report']}")
    print(f"outputs: {config.output} (generate/, train/, eval/, run.json)")
