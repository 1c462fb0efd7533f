"""Training data and loss for the student, kept apart from Ray so each piece is testable on its own.

- `split_of`: the deterministic train/validation split by id hash.
- `tokenize_example`: the student's chat template, with targets only on the assistant's answer.
- `collate`: a micro-batch as one packed row (position ids restart per example, and the example boundaries go
  to the attention, so examples never attend to each other) or as a padded batch.
- `packed_attention`: causal attention run per packed example (SDPA's fused kernel, no L x L mask).
- `token_losses`: summed cross-entropy over the targets, optionally mixed with KL to the teacher's top-k.
- `StepPlan`: which examples every rank trains on at every optimizer step (the data position is the step).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

IGNORE = -100  # target value of a position that is not in the loss (prompt, padding, last token)


class TrainDataError(ValueError):
    """The training data cannot be used at all (as opposed to a bad row, which is skipped and counted)."""


# ----------------------------------------------------------------------------------------------------------------
# Split
def id_hash(example_id: str, seed: int | str) -> float:
    """A uniform number in [0, 1) from the id alone: the same id lands in the same split on every run."""
    digest = hashlib.sha256(f"{seed}:{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


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
class Skip(Exception):
    """This example cannot be trained on; the message is the reason it is counted under."""


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


def render(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(prompt token ids, answer token ids) for a conversation whose last message is the assistant's.

    The prompt is what the student sees at inference: the template up to and including the generation prompt.
    The answer is the rest of the rendered conversation (answer text and the template's end-of-turn tokens, so the
    student learns to stop). Both are tokenized separately, exactly as at inference where the engine tokenizes the
    prompt and then generates.
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise Skip("no assistant turn")
    if not (messages[-1]["content"] or "").strip():
        raise Skip("empty assistant turn")
    context = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    full = [*context, {"role": "assistant", "content": messages[-1]["content"]}]
    prompt_text = tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(full, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise TrainDataError(
            "the student's chat template renders a conversation that does not start with its own generation "
            "prompt; assistant-only masking needs a template where it does (ChatML, Llama, Qwen without thinking)")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    return prompt_ids, answer_ids


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
# Batches
def collate(examples: list[Example], packed: bool, pad_id: int) -> dict[str, Any]:
    """A micro-batch as tensors.

    packed: one row, the examples end to end, position ids restarting at 0 for each, and the cumulative example
    lengths (`cu_seq_lens`, the boundaries that varlen attention kernels take). `packed_attention` attends within
    each example; plain SDPA derives a block-diagonal mask from the position ids instead. Either way no example
    sees another: no padding, and the same loss as the examples one by one.
    Otherwise: a padded batch with an attention mask (padding is never a target).
    """
    import torch

    if packed:
        batch = {
            "input_ids": torch.from_numpy(np.concatenate([e.input_ids for e in examples]))[None],
            "position_ids": torch.from_numpy(np.concatenate([np.arange(e.length) for e in examples]))[None],
            "targets": torch.from_numpy(np.concatenate([e.targets for e in examples]))[None],
            "cu_seq_lens": torch.from_numpy(np.cumsum([0] + [e.length for e in examples])).to(torch.int32),
            "max_length": max(e.length for e in examples),
        }
        offsets = np.cumsum([0] + [e.length for e in examples[:-1]])
        rows = [0] * len(examples)
    else:
        width = max(e.length for e in examples)
        ids = np.full((len(examples), width), pad_id, dtype=np.int64)
        targets = np.full((len(examples), width), IGNORE, dtype=np.int64)
        mask = np.zeros((len(examples), width), dtype=np.int64)
        for i, e in enumerate(examples):
            ids[i, :e.length], targets[i, :e.length], mask[i, :e.length] = e.input_ids, e.targets, 1
        batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                 "targets": torch.from_numpy(targets)}
        offsets = np.zeros(len(examples), dtype=np.int64)
        rows = list(range(len(examples)))
    soft = [(r, o, e) for r, o, e in zip(rows, offsets, examples) if e.soft_positions is not None]
    if soft:
        k = min(e.soft_ids.shape[1] for _, _, e in soft)
        batch["soft_rows"] = torch.from_numpy(np.concatenate([np.full(len(e.soft_positions), r) for r, _, e in soft]))
        batch["soft_positions"] = torch.from_numpy(np.concatenate([e.soft_positions + o for _, o, e in soft]))
        batch["soft_ids"] = torch.from_numpy(np.concatenate([e.soft_ids[:, :k] for _, _, e in soft]))
        batch["soft_logprobs"] = torch.from_numpy(np.concatenate([e.soft_logprobs[:, :k] for _, _, e in soft]))
    batch["tokens"] = sum(e.length for e in examples)
    batch["slots"] = int(batch["input_ids"].numel())
    return batch


# ----------------------------------------------------------------------------------------------------------------
# Attention over packed rows
PACKED_ATTENTION = "distill_packed_sdpa"


def packed_attention() -> str:
    """Registers (once) and returns the name of an attention implementation for packed rows, to pass as
    `attn_implementation`: causal SDPA run separately on each example of the row (`cu_seq_lens_q`).

    Why: plain SDPA on a packed row needs a block-diagonal L x L mask, which rules out the fused causal kernel,
    costs L^2 per head and layer, and computes every cross-example score only to mask it; per example the cost
    is the sum of the squared lengths. Measured on a 2-core CPU with SmolLM2, 8 examples per row: forward and
    backward 1.5x faster. Padded batches (no `cu_seq_lens_q`) take plain SDPA with transformers' mask.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        import torch
        import torch.nn.functional as F

        cu = kwargs.get("cu_seq_lens_q")
        if cu is None or query.shape[0] != 1:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        bounds = cu.tolist()
        parts = [F.scaled_dot_product_attention(  # [1, heads, length, head_dim] per example
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling,
            dropout_p=dropout if module.training else 0.0, enable_gqa=query.shape[1] != key.shape[1])
            for a, b in zip(bounds[:-1], bounds[1:])]
        return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None

    if PACKED_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(PACKED_ATTENTION, attention)
        AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)  # padded batches keep their mask
    return PACKED_ATTENTION


def padding_waste(lengths_per_batch: list[list[int]], packed: bool) -> float:
    """Fraction of the token slots computed that are padding: 0 when packed, else 1 - real / (rows x longest)."""
    real = sum(sum(b) for b in lengths_per_batch)
    slots = real if packed else sum(len(b) * max(b) for b in lengths_per_batch if b)
    return 0.0 if slots == 0 else 1.0 - real / slots


# ----------------------------------------------------------------------------------------------------------------
# Loss
OTHER_EPS = 1e-6  # least mass of the reverse KL's "any other token" bucket: a finite loss where it is ~0


def token_losses(model, batch: dict[str, Any], soft_weight: float = 0.0, objective: str = "forward"):
    """(sum of per-target-token losses, number of target tokens) for one micro-batch.

    Hard loss: cross-entropy to the answer tokens. Where a target also has the teacher's top-k, its loss is
    (1 - soft_weight) x cross-entropy + soft_weight x a KL term:
    - forward (off-policy soft labels): KL(teacher || student) over the teacher's top-k, the teacher's
      log-probabilities renormalised over the k tokens;
    - reverse (on-policy distillation, on the student's own samples): KL(student || teacher) over k + 1 outcomes,
      the teacher's top-k tokens at that position and one "any other token" bucket holding the rest of each
      model's mass (both full-vocabulary probabilities; the teacher's are vLLM's raw log-probabilities). The
      bucket is what makes the student move mass *into* the teacher's top-k: renormalising both over the top-k
      alone would only match their shapes there and leave a student that puts its mass elsewhere at zero loss.
      Merging tokens can only lower a KL, so this is a lower bound of the full-vocabulary reverse KL, exact
      when the student's mass lies in the teacher's top-k.
    Summing (not averaging) lets the caller divide by the target tokens of the whole optimizer step, so packing,
    padding and sharding all weight every token the same.
    """
    import torch
    import torch.nn.functional as F

    device = next(p.device for p in model.parameters())
    targets = batch["targets"].to(device)
    # Only positions with a target need logits: projecting the few answer positions, not the whole prompt,
    # onto the vocabulary saves most of the output layer's time and memory (49k-token vocabularies).
    keep = (targets != IGNORE).any(0).nonzero().squeeze(-1)
    kwargs = {"input_ids": batch["input_ids"].to(device), "use_cache": False, "logits_to_keep": keep}
    if "position_ids" in batch:
        # No attention mask on purpose: a mask would switch off plain SDPA's packed-sequence detection. The
        # boundaries go by the names transformers' varlen (flash) attention reads, as does `packed_attention`.
        cu = batch["cu_seq_lens"].to(device)
        kwargs.update(position_ids=batch["position_ids"].to(device), cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                      max_length_q=batch["max_length"], max_length_k=batch["max_length"])
    else:
        kwargs["attention_mask"] = batch["attention_mask"].to(device)
    logits = model(**kwargs).logits.float()  # [rows, kept positions, vocab]
    targets = targets[:, keep]
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
    ce = ce.view_as(targets)
    n = int((targets != IGNORE).sum())
    if soft_weight > 0 and "soft_positions" in batch:
        rows = batch["soft_rows"].to(device)
        pos = torch.searchsorted(keep, batch["soft_positions"].to(device))  # soft positions are answer positions
        ids = batch["soft_ids"].to(device)
        if objective == "reverse":
            teacher = batch["soft_logprobs"].to(device).float()
            # A listed token the teacher gives no mass (-inf) counts in the "other" bucket of both. Masked with
            # finite stand-ins, never -inf: an -inf inside the graph turns gradients into NaN even where unused.
            support = torch.isfinite(teacher)
            teacher = teacher.masked_fill(~support, 0.0)
            student = torch.log_softmax(logits[rows, pos], dim=-1).gather(-1, ids)
            q = student.exp().masked_fill(~support, 0.0)
            head = (q * (student - teacher)).sum(-1)
            # log(1 - sum q) from the log-sum-exp, kept finite when the top-k hold (nearly) all the mass.
            listed = torch.logsumexp(student.masked_fill(~support, -1e4), -1)
            log_q_other = torch.log(-torch.expm1(listed.clamp(max=-OTHER_EPS)))
            log_p_other = torch.log((1.0 - teacher.exp().masked_fill(~support, 0.0).sum(-1)).clamp(min=OTHER_EPS))
            kl = head + log_q_other.exp() * (log_q_other - log_p_other)
        else:
            teacher = torch.log_softmax(batch["soft_logprobs"].to(device).float(), dim=-1)
            student = torch.log_softmax(logits[rows, pos], dim=-1).gather(-1, ids)
            # Constrained decoding leaves -inf in the top-k: those tokens have no teacher mass and add nothing.
            p = teacher.exp()
            kl = torch.where(p > 0, p * (teacher - student), torch.zeros_like(p)).sum(-1)
        weight = torch.ones_like(ce)
        weight[rows, pos] = 1.0 - soft_weight
        soft_term = torch.zeros_like(ce)
        soft_term[rows, pos] = soft_weight * kl
        return (ce * weight + soft_term).sum(), n
    return ce.sum(), n


def lr_factor(step: int, total_steps: int, warmup_fraction: float, min_lr_ratio: float) -> float:
    """Linear warm-up over the first `warmup_fraction` of the steps, then cosine down to `min_lr_ratio`."""
    warmup = max(1, math.ceil(warmup_fraction * total_steps)) if warmup_fraction > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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


# ----------------------------------------------------------------------------------------------------------------
# Greedy answers from the (sharded) student, for agreement during training
def prompt_length(example: Example) -> int:
    """Tokens before the answer (the student's view at inference: the template up to the generation prompt)."""
    return int(np.argmax(example.targets != IGNORE)) + 1


def greedy_decode(model, prompts: list[list[int]], max_new_tokens: int, pad_id: int,
                  eos_ids: set[int]) -> list[list[int]]:
    """Greedy continuations of left-padded prompts with the KV cache, for exactly `max_new_tokens` steps (every
    forward pass of an FSDP-sharded model is collective, so every rank takes the same number of steps); each
    answer is cut at its first end-of-turn token."""
    import torch

    device = next(p.device for p in model.parameters())
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    out = [[] for _ in prompts]
    done = [False] * len(prompts)
    past = None
    step_ids = ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
            result = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                           use_cache=True)
            past = result.past_key_values
            nxt = result.logits[:, -1].argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    if t in eos_ids:
                        done[i] = True
                    else:
                        out[i].append(t)
            step_ids = nxt[:, None]
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
    return out


def greedy_agreement(model, tokenizer, task, examples: list[Example], answers: list[str], rank: int, world: int,
                     batch_size: int) -> tuple[float, float]:
    """(agreements, judged comparisons) on this rank's share of `examples`: the student's greedy answer to each
    prompt against the teacher's answer in the data (distill.agreement, the report's definition). Every rank runs
    the same number of batches and decoding steps (FSDP forward passes are collective); padding rows count zero."""
    from distill.agreement import compare

    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, (list, tuple)) else [configured]
    eos = {t for t in [tokenizer.eos_token_id, *configured] if t is not None}
    answer_tokens = max(len(e.input_ids) - prompt_length(e) for e in examples)
    # Prompts of similar length batched together: batches are left-padded to their longest prompt, and on the
    # demo's data (56 to 555 tokens) arbitrary batches spent most of the decode's prefill on padding.
    by_length = sorted(range(len(examples)), key=lambda j: prompt_length(examples[j]))
    agree = judged = 0.0
    for positions in shard_evenly(len(examples), batch_size, world)[rank]:
        batch = [by_length[p] for p in positions]
        indices = batch or [0]  # an idle rank still takes part in every forward pass
        prompts = [examples[j].input_ids[:prompt_length(examples[j])].tolist() for j in indices]
        outputs = greedy_decode(model, prompts, answer_tokens + 2, tokenizer.pad_token_id or 0, eos)
        if not batch:
            continue
        for j, ids in zip(indices, outputs):
            c = compare(task, answers[j], tokenizer.decode(ids, skip_special_tokens=True))
            if c.agree is not None:
                judged += 1
                agree += bool(c.agree)
    return agree, judged
