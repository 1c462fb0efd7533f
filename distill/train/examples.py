"""The student's training examples, kept apart from Ray so each piece is testable on its own.

- `split_of`: the deterministic train/validation/test split by id hash.
- `tokenize_example`: the student's chat template (distill.chat.render), targets only on the assistant's answer.
- `StepPlan`: which examples every rank trains on at every optimizer step (the data position is the step).
- Token files: each worker's examples, in training order, in its own Parquet shard that it streams.

What one optimizer step computes from them (batches, attention, losses) is in distill.train.step.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from distill.chat import Skip, render
from distill.inputs import id_hash

IGNORE = -100  # target value of a position that is not in the loss (prompt, padding, last token)


class TrainDataError(ValueError):
    """The training data cannot be used at all (as opposed to a bad row, which is skipped and counted)."""


# ----------------------------------------------------------------------------------------------------------------
# Split
def split_of(ids: list[str], validation_fraction: float, seed: int = 0, test_fraction: float = 0.0) -> dict[str, str]:
    """id -> "train" | "validation" | "test". The hash of the id alone decides (more data never moves an id):
    below test_fraction -> test, below test_fraction + validation_fraction -> validation, else train. Test ids are
    for the evaluation only (training neither learns from them nor selects checkpoints on them). With enough ids
    every requested part gets at least one: the lowest hashes go to the empty parts."""
    hashes = {i: id_hash(i, seed) for i in ids}
    split = {i: "test" if h < test_fraction else "validation" if h < test_fraction + validation_fraction
             else "train" for i, h in hashes.items()}
    wanted = [part for part, fraction in (("test", test_fraction), ("validation", validation_fraction))
              if fraction > 0]
    by_hash = sorted(ids, key=hashes.get)
    for part in wanted:
        train = [i for i in by_hash if split[i] == "train"]
        if part not in split.values() and len(train) > 1:
            split[train[0]] = part
    if "train" not in split.values() and len(ids) >= 2:
        split[by_hash[-1]] = "train"
    return split


def split_keeping(rows: list[dict], earlier: dict[str, str], held_texts: set[str], validation_fraction: float,
                  seed: int = 0) -> dict[str, str]:
    """The split of a retraining on old + new rows (serving's captured answers, say) that keeps an earlier run's
    held-out rows held out: an id the earlier split had keeps its part, so its test rows are the same test rows
    and the two runs' evaluations compare; a new row whose text is one of the earlier held-out texts is
    "excluded" (a captured copy of a test query must not train); every other new row is train or validation by
    its id hash, never test."""
    new = [r["id"] for r in rows if r["id"] not in earlier and r["text"] not in held_texts]
    split = split_of(new, validation_fraction, seed) if new else {}
    for r in rows:
        if r["id"] in earlier:
            split[r["id"]] = earlier[r["id"]]
        elif r["text"] in held_texts:
            split[r["id"]] = "excluded"
    return split


# ----------------------------------------------------------------------------------------------------------------
# Tokenization
@dataclass
class Example:
    id: str
    input_ids: np.ndarray            # int64 [T]
    targets: np.ndarray              # int64 [T]: targets[t] = input_ids[t+1] on answer tokens, else IGNORE
    soft_positions: Optional[np.ndarray] = None   # int64 [P]: positions t whose next token has teacher top-k
    soft_ids: Optional[np.ndarray] = None          # int64 [P, k]
    soft_logprobs: Optional[np.ndarray] = None     # float32 [P, k]

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE).sum())


def tokenize_example(tokenizer, example_id: str, messages: list[dict], max_length: int,
                     teacher_token_ids: Optional[list[int]] = None, topk_ids: Optional[list[list[int]]] = None,
                     topk_logprobs: Optional[list[list[float]]] = None) -> Example:
    """One chat example -> input ids and next-token targets on the answer only (prompt never in the loss).

    With the teacher's top-k per answer token (soft labels), the answer is spelled with the teacher's own tokens
    as far as they decode to the rendered answer (constrained decoding often splits a text differently from the
    tokenizer), so each top-k distribution sits at the position it was produced for; those positions get soft
    targets. The rest of the rendered answer (e.g. the template's trailing newline) is tokenized normally."""
    prompt_ids, answer_ids = render(tokenizer, messages)
    soft = None
    if teacher_token_ids is not None and topk_ids is not None and topk_logprobs is not None:
        # Whitespace the teacher wrote before its answer (after a think block) is not part of the stripped answer.
        lead = 0
        while lead < len(teacher_token_ids) and not tokenizer.decode(teacher_token_ids[lead:lead + 1]).strip():
            lead += 1
        teacher_token_ids, topk_ids, topk_logprobs = teacher_token_ids[lead:], topk_ids[lead:], topk_logprobs[lead:]
        answer_text = tokenizer.decode(answer_ids, skip_special_tokens=False)
        for m in range(min(len(teacher_token_ids), len(topk_ids), len(topk_logprobs)), 0, -1):
            head = tokenizer.decode(teacher_token_ids[:m], skip_special_tokens=False)
            if answer_text.startswith(head) and all(len(row) for row in topk_ids[:m]):
                rest = answer_text[len(head):]
                answer_ids = list(teacher_token_ids[:m]) + (
                    tokenizer(rest, add_special_tokens=False)["input_ids"] if rest else [])
                soft = m
                break
    ids = prompt_ids + answer_ids
    if len(ids) > max_length:
        raise Skip("longer than max_length")
    input_ids = np.asarray(ids, dtype=np.int64)
    targets = np.full(len(ids), IGNORE, dtype=np.int64)
    # Position t predicts token t+1: the targets are the answer tokens, placed one to the left.
    start = len(prompt_ids)
    targets[start - 1:len(ids) - 1] = input_ids[start:]
    ex = Example(example_id, input_ids, targets)
    if soft:
        k = min(len(row) for row in topk_ids[:soft])
        ex.soft_positions = np.arange(start - 1, start - 1 + soft, dtype=np.int64)
        ex.soft_ids = np.asarray([row[:k] for row in topk_ids[:soft]], dtype=np.int64)
        ex.soft_logprobs = np.asarray([row[:k] for row in topk_logprobs[:soft]], dtype=np.float32)
    return ex


def tokenize_rows(tokenizer, rows: list[dict], max_length: int, soft: bool) -> tuple[list[Example], Counter]:
    """Tokenize generation rows; bad rows are skipped and counted by reason."""
    examples, skipped = [], Counter()
    for row in rows:
        try:
            examples.append(tokenize_example(
                tokenizer, row["id"], row["messages"] or [], max_length,
                row.get("teacher_token_ids") if soft else None, row.get("topk_ids") if soft else None,
                row.get("topk_logprobs") if soft else None))
        except Skip as reason:
            skipped[str(reason)] += 1
    return examples, skipped


def same_tokenizer(student_tokenizer, teacher: str) -> tuple[bool, str]:
    """Soft labels index the teacher's vocabulary: they mean something to the student only if it shares the
    teacher's tokenizer. (same, why) with the teacher given by its model folder or name."""
    from transformers import AutoTokenizer

    try:
        teacher_tokenizer = AutoTokenizer.from_pretrained(teacher)
    except Exception as err:
        return False, f"cannot load the teacher's tokenizer {teacher!r} to compare ({type(err).__name__}: {err})"
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        return False, (f"the student's tokenizer differs from the teacher's ({teacher}; vocabularies of "
                       f"{len(student_tokenizer)} and {len(teacher_tokenizer)} tokens)")
    return True, "same tokenizer"


# ----------------------------------------------------------------------------------------------------------------
# Which examples each rank trains on at each step
@dataclass
class StepPlan:
    """Every optimizer step's examples, per rank and micro-batch: indices into the training examples.

    Each epoch is a seeded permutation; a step takes the next per_device x accumulation x workers examples,
    sorts them by length (so a padded micro-batch holds similar lengths) and deals them out so that every rank
    and micro-batch gets a share. The step number alone is the data position: resuming at step s trains on exactly
    what an uninterrupted run would have."""

    steps: list[list[list[list[int]]]] = field(default_factory=list)  # [step][rank][micro] -> example indices

    @classmethod
    def build(cls, lengths: list[int], per_device: int, accumulation: int, workers: int, epochs: int, seed: int,
              max_steps: Optional[int] = None) -> "StepPlan":
        per_step = per_device * accumulation * workers
        slots = accumulation * workers
        steps = []
        for epoch in range(epochs):
            order = np.random.default_rng([seed, epoch]).permutation(len(lengths)).tolist()
            for i in range(0, len(order), per_step):
                chunk = sorted(order[i:i + per_step], key=lambda j: (lengths[j], j))
                # Contiguous runs of the length-sorted chunk, one per (rank, micro-batch) slot.
                bounds = np.linspace(0, len(chunk), slots + 1).round().astype(int)
                groups = [chunk[bounds[s]:bounds[s + 1]] for s in range(slots)]
                steps.append([[groups[r * accumulation + m] for m in range(accumulation)] for r in range(workers)])
        if max_steps is not None:
            steps = steps[:max_steps]
        return cls(steps)

    def __len__(self) -> int:
        return len(self.steps)


def shard_evenly(n: int, per_batch: int, workers: int) -> list[list[list[int]]]:
    """Validation batches per rank: [rank][batch] -> indices; every rank gets the same number of batches (some
    possibly empty) because every forward pass of a sharded model is a collective."""
    per_rank = [list(range(r, n, workers)) for r in range(workers)]
    count = max(1, max(math.ceil(len(p) / per_batch) for p in per_rank))
    return [[p[b * per_batch:(b + 1) * per_batch] for b in range(count)] for p in per_rank]


# ----------------------------------------------------------------------------------------------------------------
# Tokenized examples on storage: each worker streams its own shard instead of every worker receiving the whole set
STEPS_PER_ROW_GROUP = 16


def token_schema():
    import pyarrow as pa

    ints = pa.list_(pa.int32())
    return pa.schema([("step", pa.int32()), ("micro", pa.int32()), ("id", pa.string()), ("input_ids", ints),
                      ("targets", ints), ("soft_positions", ints), ("soft_ids", pa.list_(ints)),
                      ("soft_logprobs", pa.list_(pa.list_(pa.float32())))])


def _example_row(step: int, micro: int, e: Example) -> dict:
    soft = e.soft_positions is not None
    return {"step": step, "micro": micro, "id": e.id, "input_ids": e.input_ids.tolist(),
            "targets": e.targets.tolist(), "soft_positions": e.soft_positions.tolist() if soft else None,
            "soft_ids": e.soft_ids.tolist() if soft else None,
            "soft_logprobs": e.soft_logprobs.tolist() if soft else None}


def _row_example(row: dict) -> Example:
    soft = row["soft_positions"] is not None
    return Example(row["id"], np.asarray(row["input_ids"], np.int64), np.asarray(row["targets"], np.int64),
                   np.asarray(row["soft_positions"], np.int64) if soft else None,
                   np.asarray(row["soft_ids"], np.int64) if soft else None,
                   np.asarray(row["soft_logprobs"], np.float32) if soft else None)


def write_rank_shards(fs, folder: str, examples: list[Example], steps: list, workers: int) -> list[str]:
    """One Parquet file per rank with, in training order, the examples that rank trains on: rows (step, micro,
    example), row groups of STEPS_PER_ROW_GROUP steps (a resumed worker skips whole groups). Returns the paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs.create_dir(folder, recursive=True)
    schema = token_schema()
    paths = []
    for rank in range(workers):
        path = f"{folder}/train-rank{rank:03d}-of{workers:03d}.parquet"
        with pq.ParquetWriter(path, schema, filesystem=fs) as writer:
            for start in range(0, len(steps), STEPS_PER_ROW_GROUP):
                rows = [_example_row(s, m, examples[j])
                        for s in range(start, min(start + STEPS_PER_ROW_GROUP, len(steps)))
                        for m, micro in enumerate(steps[s][rank]) for j in micro]
                if rows:
                    writer.write_table(pa.Table.from_pylist(rows, schema=schema))
        paths.append(path)
    return paths


def write_examples(fs, path: str, examples: list[Example]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [_example_row(0, 0, e) for e in examples]
    pq.write_table(pa.Table.from_pylist(rows, schema=token_schema()), path, filesystem=fs)


def read_examples(fs, path: str, keep=None) -> list[Example]:
    """All examples of a token file (`keep(i)` selects by row position)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(path, filesystem=fs).to_pylist()
    return [_row_example(r) for i, r in enumerate(rows) if keep is None or keep(i)]


def rank_steps(fs, path: str, start_step: int, accumulation: int):
    """Yield (step, [micro-batch examples] x accumulation) from a rank's shard, from `start_step` on, reading one
    row group at a time (memory stays at one group however large the data). A micro slot the plan left empty is
    an empty list."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path, filesystem=fs)
    current, micros = None, None
    for g in range(pf.num_row_groups):
        steps = pf.metadata.row_group(g).column(0).statistics
        if steps is not None and steps.has_min_max and steps.max < start_step:
            continue
        for row in pf.read_row_group(g).to_pylist():
            if row["step"] < start_step:
                continue
            if row["step"] != current:
                if current is not None:
                    yield current, micros
                current, micros = row["step"], [[] for _ in range(accumulation)]
            micros[row["micro"]].append(_row_example(row))
    if current is not None:
        yield current, micros
