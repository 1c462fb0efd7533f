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
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from distill.config import StrictModel, build_config
from distill.console import CONSOLE, collect_ray_logs
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
    console: Literal["progress", "full"] = Field(
        "progress", description="What `distill run` prints. progress: the plan, one progress line per stage, the "
        "headline and the report's path; distill's log in OUTPUT/logs/distill.log (a local folder under the system "
        "temp folder for object-store outputs), Ray's and the engines' logs in Ray's session folder, copied to "
        "OUTPUT/logs/ray when the run started its own cluster. full: every log line on the console.")
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
    # Where the minutes go besides the work itself: every engine and every training run starts up first (on a
    # 2-core CPU, 15-60 s per vLLM engine), and the progress lines and the summary report each start-up measured.
    starts = {"generate": f"1 teacher engine (+1 per retry attempt with unparsed answers, up to {g.retries})",
              "train": (f"{t.on_policy.rounds} round(s) of 2 engines (student samples, teacher scores) + 1 "
                        "training run each" if t.method == "on-policy" else "1 training run"),
              "eval": "3 engines, one after another (teacher, base student, distilled student)"}
    lines.append("start-ups: " + "; ".join(f"{stage} {starts[stage]}" for stage in config.stages))
    return lines + ([f"why this size: {config.sizing}"] if config.sizing else [])


def resource_plan(config: RunConfig, source: str = "the run") -> RunPlan:
    """Memory per GPU, KV cache, traffic and checkpoint size of every stage the run has (distill.plan)."""
    from distill.plan import plan_run

    return plan_run(config.stages, config.generate_config(), config.train_config(), config.eval_config(),
                    config.cluster, source)


def main(config: RunConfig) -> dict[str, Any]:
    from distill.ray_init import STARTED_SESSION, init_ray

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
    try:
        for stage in config.stages:
            record["stages"][stage] = run_stage(config, stage)
            write_json(record_path, record)  # progress survives a preemption between stages
    finally:
        logs = collect_ray_logs(STARTED_SESSION.get("dir"))
        if logs:
            log.info("Ray and engine logs copied to %s", logs)
    record["complete"] = list(config.stages) == list(STAGES)
    write_json(record_path, record)
    return record


def run_stage(config: RunConfig, stage: Stage) -> dict[str, Any]:
    """One stage; what it produced, its time, and the time of each of its parts (engine passes, training runs)
    with their start-ups (an engine's from its launch to its first answer)."""
    from pipelines import evaluate, generate, train

    t0, first_part = time.monotonic(), len(CONSOLE.finished)
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
    seconds = time.monotonic() - t0
    log.info("stage %s done in %.0fs: %s", stage, seconds, result)
    return {**result, "seconds_this_run": round(seconds, 3), "parts": CONSOLE.finished[first_part:]}


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


def logs_folder(output: str) -> Path:
    """OUTPUT/logs for a local output; for an object store, a local folder named after it (logs are appended
    line by line, which an object store cannot do)."""
    from distill.storage import is_local, resolve

    if is_local(resolve(output)[0]):
        return Path(output) / "logs"
    return Path(tempfile.gettempdir()) / "distill-logs" / re.sub(r"[^A-Za-z0-9_.-]+", "_", output)


def _cli(args) -> None:
    from distill.config import config_from_args
    from distill.console import configure, duration
    from distill.evaluate.render import headline_lines

    config = config_from_args(RunConfig, args)
    logs = logs_folder(config.output)
    configure(config.console, logs)
    try:
        record = main(config)
    except BaseException:
        if config.console == "progress":
            print(f"distill: the run stopped; its logs: {logs} (distill.log, ray/)", file=sys.stderr, flush=True)
        raise
    for stage, result in record["stages"].items():
        parts = "; ".join(f"{p['part']} {duration(p['seconds'])}"
                          + (f" (start-up {duration(p['start_up_s'])})" if p.get("start_up_s") is not None else "")
                          for p in result.get("parts") or [])
        took = f"{duration(result['seconds_this_run'])}" + (f": {parts}" if parts else "")
        if stage == "eval":
            print(f"eval: {took}")
        else:
            shown = {k: v for k, v in result.items() if k not in ("seconds_this_run", "parts")}
            print(f"{stage}: {took}\n  {shown}")
    if "eval" in record["stages"]:
        print("\n".join("  " + line for line in headline_lines(read_json(join(config.stage_dir("eval"), "report.json")))))
        print(f"report: {record['stages']['eval']['report']}")
    print(f"outputs: {config.output} (generate/, train/, eval/, run.json)"
          + (f"; logs: {logs}" if config.console == "progress" else ""))
