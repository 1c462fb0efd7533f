"""What one training step computes, kept apart from Ray so each piece is testable on its own.

- `collate`: a micro-batch as one packed row (position ids restart per example, and the example boundaries go
  to the attention, so examples never attend to each other) or as a padded batch.
- `packed_attention`: causal attention run per packed example (SDPA's fused kernel, no L x L mask).
- `token_losses`: summed cross-entropy over the targets, optionally mixed with KL to the teacher's top-k.
- `lr_factor`: the learning-rate schedule.
- `greedy_agreement`: the (sharded) student's own greedy answers during training, against the teacher's.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from distill.train.examples import IGNORE, Example, shard_evenly


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
