"""Training data, prepared on the driver: the generation outputs read (`read_data`), split by id hash, tokenized with
the student's chat template, every optimizer step planned and each worker's examples written to its own shard
(`prepare`), and the soft-label decision (`soft_label_choice`). The pieces it builds on are in distill.train.examples.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Any

from distill.config import ConfigError
from distill.storage import exists, join, list_files, read_columns, read_json, write_table
from distill.train.examples import (StepPlan, TrainDataError, same_tokenizer, split_keeping, split_of, tokenize_rows,
                                    write_examples, write_rank_shards)
from distill.train.step import padding_waste
from distill.train.config import TrainConfig


def read_data(config: TrainConfig) -> list[dict]:
    """The rows of `data`, then those of each `extra_data` source whose id and text no earlier source has."""
    rows = read_source(config.data)
    for source in config.extra_data:
        ids, texts = {r["id"] for r in rows}, {r["text"] for r in rows}
        rows += [r for r in read_source(source) if r["id"] not in ids and r["text"] not in texts]
    return rows


def read_source(source: str) -> list[dict]:
    """The rows of one generation output's data/ (a clear error when the folder is not one)."""
    data = join(source, "data")
    if not list_files(data):
        raise ConfigError(f"{data}: no Parquet files; run `distill generate` first (or check --data)")
    try:
        table = read_columns(data, ["id", "text", "messages", "answer", "task", "teacher", "teacher_token_ids", "topk_ids",
                                    "topk_logprobs"])
    except Exception as err:  # a Parquet file without the contract's columns
        raise ConfigError(f"{data}: not generation output ({err})") from None
    if table.num_rows == 0:
        raise ConfigError(f"{data}: the Parquet files hold no rows")
    return table.to_pylist()


def soft_label_choice(config: TrainConfig, tokenizer, rows: list[dict]) -> tuple[float, str]:
    """(weight, why): the configured weight, or the default described in TrainConfig.soft_label_weight."""
    has_topk = any(r.get("topk_ids") for r in rows)
    if config.soft_label_weight == 0:
        return 0.0, "off (soft_label_weight: 0)"
    if not has_topk:
        if config.soft_label_weight is not None:
            raise TrainDataError(f"{config.data}: soft_label_weight > 0 but the data has no teacher top-k logprobs; "
                                 "generate with logprobs > 0 (e.g. logprobs: 20) or train with soft_label_weight: 0")
        return 0.0, "off: the data has no teacher top-k logprobs (generate with logprobs > 0)"
    for teacher in sorted({r["teacher"] for r in rows if r.get("topk_ids")}):
        same, why = same_tokenizer(tokenizer, teacher)
        if not same:
            if config.soft_label_weight is not None:
                raise TrainDataError(f"soft labels need the student to share the teacher's tokenizer: {why}; train "
                                     "on hard labels (soft_label_weight: 0) or use a student of the teacher's family")
            return 0.0, f"off: {why}"
    weight = config.soft_label_weight if config.soft_label_weight is not None else 0.5
    return weight, f"on (weight {weight}): the teacher's top-k logprobs, same tokenizer"


@dataclass(frozen=True)
class PreparedData:
    """What the driver's preparation hands to the workers (each rank streams its shard) and to the summary."""
    shards: list[str]                 # per rank: its token file (examples in training order)
    validation: str                   # the validation examples' token file
    validation_answers: list[str]     # the teacher's answer to each validation example, in its order
    steps: int                        # optimizer steps planned
    steps_per_epoch: int
    step_targets: list[int]           # per step, over every rank: target tokens (the loss's divisor)
    step_tokens: list[int]            # per step: tokens (throughput)
    step_examples: list[int]          # per step: examples (the data position)
    split: dict[str, int]             # rows per split: train, validation, test, excluded
    examples: dict[str, int]          # tokenized examples: train, validation
    skipped: dict[str, int]           # rows skipped, by reason
    soft_weight: float                # weight of the teacher's top-k in the loss
    soft_labels: str                  # why that weight
    soft_examples: int                # training examples that carry the teacher's top-k
    padding_waste: float
    padding_waste_unpacked: float
    task: Any                         # the data's task name (a list when rows disagree)
    teacher: Any                      # the data's teacher (a list when rows disagree)
    objective: str = "forward"        # forward KL to the teacher's top-k; on-policy rounds: "reverse"


def prepare(config: TrainConfig, tokenizer, fs, out_path: str) -> PreparedData:
    """Split, tokenize, plan and write each rank's shard; returns the small things the workers and the summary
    need."""
    import pyarrow as pa

    rows = read_data(config)
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{config.data}: duplicate ids; the split by id needs unique ids")
    excluded = set(read_columns(config.exclude_ids, ["id"]).column("id").to_pylist()) if config.exclude_ids else set()
    if config.held_out_from:
        split = split_keeping(rows, *held_out_of(config.held_out_from), config.validation_fraction, config.split_seed)
    else:
        split = split_of(ids, config.validation_fraction, config.split_seed, config.test_fraction)
    split.update({i: "excluded" for i in excluded if i in split})
    ordered = sorted(ids)
    write_table(join(config.output, "split.parquet"),
                pa.table({"id": pa.array(ordered, pa.string()),
                          "split": pa.array([split[i] for i in ordered], pa.string())}))

    soft_weight, soft_why = soft_label_choice(config, tokenizer, rows)
    rows.sort(key=lambda r: r["id"])
    train_rows = [r for r in rows if split[r["id"]] == "train"]
    val_rows = [r for r in rows if split[r["id"]] == "validation"]
    train, skipped = tokenize_rows(tokenizer, train_rows, config.max_length, soft_weight > 0)
    val, val_skipped = tokenize_rows(tokenizer, val_rows, config.max_length, soft=False)
    skipped.update(val_skipped)
    if config.limit:
        train = train[:config.limit]
    if config.validation_limit:
        val = val[:config.validation_limit]
    if not train:
        raise TrainDataError(f"{config.data}: no trainable examples ({len(train_rows)} train rows; skipped: "
                             f"{dict(skipped) or 'none'})")
    soft_examples = sum(e.soft_positions is not None for e in train)
    if soft_weight > 0 and soft_examples == 0:
        raise TrainDataError(f"{config.data}: the teacher's top-k logprobs align with the answer of no training "
                             "example (the teacher's tokens do not spell the answer the student learns); train with "
                             "soft_label_weight: 0 or check the generation output")
    plan = StepPlan.build([e.length for e in train], config.per_device_batch_size, config.gradient_accumulation,
                          config.workers, config.epochs, config.seed, config.max_steps)
    tokens = f"{out_path}/_tokens"
    shards = write_rank_shards(fs, tokens, train, plan.steps, config.workers)
    write_examples(fs, f"{tokens}/validation.parquet", val)
    answers = {r["id"]: r["answer"] for r in val_rows}
    micro_lengths = [[train[j].length for j in micro] for step in plan.steps for rank in step for micro in rank]
    return PreparedData(
        shards=shards, validation=f"{tokens}/validation.parquet", steps=len(plan),
        validation_answers=[answers[e.id] for e in val],
        **step_totals(train, plan.steps),
        steps_per_epoch=-(-len(train) // (config.per_device_batch_size * config.gradient_accumulation
                                          * config.workers)),
        split={"train": len(train_rows), "validation": len(val_rows),
               "test": sum(s == "test" for s in split.values()), "excluded": len(excluded & set(ids))},
        examples={"train": len(train), "validation": len(val)},
        skipped=dict(skipped), soft_weight=soft_weight, soft_labels=soft_why, soft_examples=soft_examples,
        padding_waste=padding_waste(micro_lengths, config.packing),
        padding_waste_unpacked=padding_waste(micro_lengths, packed=False),
        task=_one(rows, "task"), teacher=_one(rows, "teacher"))


def held_out_of(earlier: str) -> tuple[dict[str, str], set[str]]:
    """(id -> split, texts of the held-out rows) of an earlier training output."""
    split_path = join(earlier, "split.parquet")
    summary = read_json(join(earlier, "train_summary.json"))
    if summary is None or not exists(split_path):
        raise ConfigError(f"held_out_from {earlier}: not a finished training output (no train_summary.json or "
                          f"split.parquet)")
    split = {r["id"]: r["split"] for r in read_columns(split_path, ["id", "split"]).to_pylist()}
    held = {i for i, part in split.items() if part in ("test", "validation")}
    texts = {r["text"] for source in [summary["data"], *summary.get("extra_data", [])]
             for r in read_columns(join(source, "data"), ["id", "text"]).to_pylist() if r["id"] in held}
    return split, texts


def _one(rows: list[dict], key: str):
    values = sorted({r[key] for r in rows if r.get(key) is not None})
    return values[0] if len(values) == 1 else values


def step_totals(examples: list, steps: list) -> dict[str, list[int]]:
    """Per optimizer step, summed over every rank and micro-batch of the plan's `steps`: target tokens (what the
    step's loss is divided by), tokens (throughput) and examples (the data position)."""
    return {"step_targets": [sum(examples[j].n_targets for rank in s for micro in rank for j in micro) for s in steps],
            "step_tokens": [sum(examples[j].length for rank in s for micro in rank for j in micro) for s in steps],
            "step_examples": [sum(len(micro) for rank in s for micro in rank) for s in steps]}
