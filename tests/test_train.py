"""Training without Ray: the mask, packing, the split, bad data, soft labels, the schedule and the step plan.

The end-to-end runs on a real Ray cluster are in test_train_ray.py."""

from __future__ import annotations

import math
import os
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distill.config import ConfigError
from distill.formats import DATA_SCHEMA
from distill.storage import resolve
from distill.train.data import PreparedData, prepare, soft_label_choice
from distill.train.examples import (IGNORE, StepPlan, TrainDataError, rank_steps, read_examples, shard_evenly,
                                    split_of, tokenize_example)
from distill.train.step import collate, lr_factor, packed_attention, padding_waste, token_losses
from distill.train.config import TrainConfig

TEXTS = ["Bonjour tout le monde, ceci est un texte.", "Hello", "Alle Menschen sind frei und gleich an Würde.",
         "Todos los seres humanos nacen libres e iguales en dignidad y derechos, dotados como están de razón.",
         "Все люди рождаются свободными"]


def chat(text: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]


def write_data(root, rows: list[dict]) -> str:
    """A generation output folder holding `rows` (missing DATA_SCHEMA columns are null)."""
    os.makedirs(root / "data", exist_ok=True)
    full = [{"task": "language-id", "teacher": "test-teacher", **r} for r in rows]
    pq.write_table(pa.Table.from_pylist(full, schema=DATA_SCHEMA), root / "data" / "part-0.parquet")
    return str(root)


def run_prepare(config: TrainConfig, tokenizer) -> PreparedData:
    fs, path = resolve(config.output)
    return prepare(config, tokenizer, fs, path)


def shard_contents(prepared: PreparedData, accumulation: int) -> list[list]:
    """Per rank: [(step, [[example ids] per micro-batch])] as the workers stream them."""
    fs, _ = resolve(prepared.shards[0])
    return [[(step, [[e.id for e in micro] for micro in micros]) for step, micros in rank_steps(fs, path, 0, accumulation)]
            for path in prepared.shards]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def load_model(path: str, attention: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention).eval()


@pytest.fixture(scope="module")
def model(tiny_model):
    return load_model(tiny_model)


# ----------------------------------------------------------------------------------------------------------------
# The mask: prompt tokens are never in the loss
@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_targets_cover_the_answer_only(which, tiny_model, request):
    from transformers import AutoTokenizer

    path = tiny_model if which == "tiny" else request.getfixturevalue("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    ex = tokenize_example(tok, "a", chat("Bonjour tout le monde", "Final Answer: fr"), 2048)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Bonjour tout le monde"}],
                                     add_generation_prompt=True, tokenize=False)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    # Position t predicts token t+1: nothing before the last prompt position has a target ...
    assert (ex.targets[:n_prompt - 1] == IGNORE).all()
    # ... and what is learned is exactly the answer and the template's end of turn.
    learned = tok.decode(ex.targets[ex.targets != IGNORE])
    assert learned.startswith("Final Answer: fr") and learned.replace("Final Answer: fr", "").strip() \
        in (tok.eos_token, "<|im_end|>")
    assert "Bonjour" not in learned and "user" not in learned


def test_loss_reads_the_answer_positions_only(tokenizer, model):
    """The output layer only ever sees the answer positions, and the loss is the cross-entropy there: no prompt
    position can contribute to it."""
    ex = tokenize_example(tokenizer, "a", chat(TEXTS[0], "Final Answer: fr"), 2048)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda module, inputs, out: seen.append(inputs[0].shape[1]))
    try:
        with torch.no_grad():
            loss, n = token_losses(model, collate([ex], packed=True, pad_id=tokenizer.pad_token_id))
            logits = model(input_ids=torch.from_numpy(ex.input_ids)[None], use_cache=False).logits[0]
    finally:
        hook.remove()
    answer = torch.from_numpy(ex.targets != IGNORE)
    assert seen[0] == n == int(answer.sum()) and n < len(ex.input_ids) // 2
    manual = torch.nn.functional.cross_entropy(logits[answer], torch.from_numpy(ex.targets)[answer], reduction="sum")
    assert float(loss) == pytest.approx(float(manual), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Packing
@pytest.mark.parametrize("attention", ["sdpa", packed_attention()])
def test_packing_gives_the_loss_of_unpacked_batches(attention, tokenizer, tiny_model):
    """Plain SDPA (block-diagonal mask from the position ids) and `packed_attention` (SDPA per example)."""
    model = load_model(tiny_model, attention)
    examples = [tokenize_example(tokenizer, str(i), chat(t, f"Final Answer: {a}"), 2048)
                for i, (t, a) in enumerate(zip(TEXTS, ["fr", "en", "de", "es", "ru"]))]
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        packed, n_packed = token_losses(model, collate(examples, packed=True, pad_id=pad))
        padded, n_padded = token_losses(model, collate(examples, packed=False, pad_id=pad))
        one_by_one = [token_losses(model, collate([e], packed=True, pad_id=pad)) for e in examples]
        # Each example's logits inside the pack equal its logits alone: no example sees another.
        batch = collate(examples, packed=True, pad_id=pad)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                       cu_seq_lens_q=batch["cu_seq_lens"], cu_seq_lens_k=batch["cu_seq_lens"],
                       max_length_q=batch["max_length"], max_length_k=batch["max_length"]).logits[0]
        start = 0
        for e in examples:
            alone = model(input_ids=torch.from_numpy(e.input_ids)[None], use_cache=False).logits[0]
            torch.testing.assert_close(logits[start:start + e.length], alone, rtol=1e-4, atol=1e-4)
            start += e.length
        # The test can tell: the same row as one sequence (examples attending to each other).
        width = batch["input_ids"].shape[1]
        leaky, _ = token_losses(model, {**batch, "position_ids": torch.arange(width)[None],
                                        "cu_seq_lens": torch.tensor([0, width], dtype=torch.int32),
                                        "max_length": width})
    assert n_packed == n_padded == sum(n for _, n in one_by_one) == sum(e.n_targets for e in examples)
    expected = sum(float(s) for s, _ in one_by_one)
    assert float(packed) == pytest.approx(expected, rel=1e-5)
    assert float(padded) == pytest.approx(expected, rel=1e-5)
    assert abs(float(leaky) - expected) > 1e-3


def test_padding_waste_is_reported():
    assert padding_waste([[10, 2], [5, 5]], packed=True) == 0.0
    assert padding_waste([[10, 2], [5, 5]], packed=False) == pytest.approx(1 - 22 / 30)


# ----------------------------------------------------------------------------------------------------------------
# Split, plan, schedule
def test_split_is_deterministic_by_id_and_holds_out_at_least_one():
    ids = [f"id-{i}" for i in range(2000)]
    split = split_of(ids, 0.1)
    assert split == split_of(list(reversed(ids)), 0.1)  # by id, not by position
    assert split_of(ids[:500], 0.1) == {i: split[i] for i in ids[:500]}  # more data never moves an id
    assert 0.08 < Counter(split.values())["validation"] / len(ids) < 0.12
    for n in (2, 3, 5):
        assert Counter(split_of(ids[:n], 0.1).values())["validation"] >= 1
        assert Counter(split_of(ids[:n], 0.1).values())["train"] >= 1
    assert split_of(["only"], 0.1) == {"only": "train"}
    # A test part for the evaluation alone: disjoint from validation, the same ids at any data size.
    three = split_of(ids, 0.1, test_fraction=0.1)
    assert 0.08 < Counter(three.values())["test"] / len(ids) < 0.12
    assert split_of(ids[:500], 0.1, test_fraction=0.1) == {i: three[i] for i in ids[:500]}
    assert Counter(split_of(ids[:3], 0.1, test_fraction=0.1).values()) == {"train": 1, "validation": 1, "test": 1}


def test_prepare_never_trains_on_held_out_ids(tmp_path, tiny_model, tokenizer):
    rows = [{"id": f"r{i:03d}", "text": t, "messages": chat(t, "Final Answer: en")}
            for i, t in enumerate(TEXTS * 8)]
    config = TrainConfig(data=write_data(tmp_path / "gen", rows), output=str(tmp_path / "out"), student=tiny_model,
                         validation_fraction=0.2, per_device_batch_size=2, gradient_accumulation=2, workers=2,
                         epochs=2)
    prepared = run_prepare(config, tokenizer)
    split = {r["id"]: r["split"] for r in pq.read_table(tmp_path / "out" / "split.parquet").to_pylist()}
    assert set(split) == {r["id"] for r in rows} and set(split.values()) == {"train", "validation", "test"}
    held_out = {i for i, s in split.items() if s != "train"}
    # Each worker streams its own shard: the two ranks together hold every training example, twice (2 epochs),
    # and no held-out one; every step has the same number of micro-batches on every rank.
    shards = shard_contents(prepared, accumulation=2)
    trained = [i for rank in shards for _, micros in rank for micro in micros for i in micro]
    assert Counter(trained) == {i: 2 for i in set(split) - held_out}
    assert all(len(micros) == 2 for rank in shards for _, micros in rank)
    fs, _ = resolve(prepared.validation)
    assert {e.id for e in read_examples(fs, prepared.validation)} == {i for i, s in split.items() if s == "validation"}
    assert prepared.split == {"train": len(rows) - len(held_out), "excluded": 0,
                                 **{part: sum(s == part for s in split.values()) for part in ("validation", "test")}}
    assert shard_contents(run_prepare(config, tokenizer), 2) == shards  # deterministic
    # A resumed worker starts at its step: the stream from step 3 is the tail of the whole stream.
    fs, _ = resolve(prepared.shards[1])
    tail = [(s, [[e.id for e in m] for m in ms]) for s, ms in rank_steps(fs, prepared.shards[1], 3, 2)]
    assert tail == [x for x in shards[1] if x[0] >= 3] and tail[0][0] == 3


def test_excluded_ids_never_train(tmp_path, tiny_model, tokenizer):
    rows = [{"id": f"r{i:03d}", "text": t, "messages": chat(t, "Final Answer: en")} for i, t in enumerate(TEXTS * 4)]
    pq.write_table(pa.table({"id": ["r001", "r002", "not-in-data"]}), tmp_path / "held.parquet")
    config = TrainConfig(data=write_data(tmp_path / "gen", rows), output=str(tmp_path / "out"), student=tiny_model,
                         validation_fraction=0, test_fraction=0, exclude_ids=str(tmp_path / "held.parquet"),
                         per_device_batch_size=2,
                         gradient_accumulation=1)
    prepared = run_prepare(config, tokenizer)
    trained = {i for rank in shard_contents(prepared, 1) for _, micros in rank for micro in micros for i in micro}
    assert trained == {r["id"] for r in rows} - {"r001", "r002"}
    assert prepared.split["excluded"] == 2


def test_step_plan_gives_every_rank_the_same_number_of_micro_batches():
    lengths = list(range(3, 40))
    plan = StepPlan.build(lengths, per_device=4, accumulation=2, workers=2, epochs=2, seed=0)
    assert len(plan) == 2 * -(-len(lengths) // 16)
    for epoch in range(2):
        steps = plan.steps[epoch * 3:(epoch + 1) * 3]
        seen = sorted(j for s in steps for rank in s for micro in rank for j in micro)
        assert seen == list(range(len(lengths)))  # every example once per epoch
    assert all(len(rank) == 2 for s in plan.steps for rank in s)
    assert plan.steps[:3] != plan.steps[3:]  # a new order each epoch
    assert len(StepPlan.build(lengths, 4, 2, 2, 2, 0, max_steps=4)) == 4
    batches = shard_evenly(5, per_batch=2, workers=2)
    assert [len(b) for b in batches] == [2, 2] and sorted(j for b in batches for m in b for j in m) == list(range(5))


def test_lr_warms_up_then_decays_to_the_floor():
    total = 100
    factors = [lr_factor(s, total, 0.03, 0.1) for s in range(total)]
    assert factors[0] == pytest.approx(1 / 3) and factors[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[2:], factors[3:]))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# Bad data
def test_empty_data_dir_is_a_clear_error(tmp_path, tiny_model, tokenizer):
    (tmp_path / "gen" / "data").mkdir(parents=True)
    config = TrainConfig(data=str(tmp_path / "gen"), output=str(tmp_path / "out"), student=tiny_model)
    with pytest.raises(ConfigError, match="no Parquet files"):
        run_prepare(config, tokenizer)
    pq.write_table(pa.Table.from_pylist([], schema=DATA_SCHEMA), tmp_path / "gen" / "data" / "part-0.parquet")
    with pytest.raises(ConfigError, match="no rows"):
        run_prepare(config, tokenizer)


def test_bad_rows_are_skipped_and_counted(tmp_path, tiny_model, tokenizer):
    good = [{"id": f"ok{i}", "text": t, "messages": chat(t, "Final Answer: en")} for i, t in enumerate(TEXTS)]
    bad = [
        {"id": "no-answer", "text": "x", "messages": [{"role": "user", "content": "x"}]},
        {"id": "empty-answer", "text": "x", "messages": chat("x", "  ")},
        {"id": "long", "text": "y", "messages": chat(" ".join(["word"] * 400), "Final Answer: en")},
    ]
    config = TrainConfig(data=write_data(tmp_path / "gen", good + bad), output=str(tmp_path / "out"),
                         student=tiny_model, max_length=128, validation_fraction=0, test_fraction=0)
    prepared = run_prepare(config, tokenizer)
    assert prepared.skipped == {"no assistant turn": 1, "empty assistant turn": 1, "longer than max_length": 1}
    assert {i for rank in shard_contents(prepared, 4) for _, ms in rank for m in ms for i in m} == {r["id"] for r in good}

    config = TrainConfig(data=write_data(tmp_path / "gen2", bad), output=str(tmp_path / "out2"), student=tiny_model,
                         max_length=128)
    with pytest.raises(TrainDataError, match="no trainable examples"):
        run_prepare(config, tokenizer)


def test_changed_settings_in_the_same_output_are_refused(tmp_path, tiny_model):
    from pipelines.train import check_rerun

    config = TrainConfig(data="d", output=str(tmp_path), student=tiny_model)
    check_rerun(config)
    check_rerun(config.model_copy(update={"fail_at_step": 3, "max_failures": 0}))  # chaos/retry knobs may change
    with pytest.raises(ConfigError, match="learning_rate"):
        check_rerun(config.model_copy(update={"learning_rate": 1.0}))


# ----------------------------------------------------------------------------------------------------------------
# Soft labels
def test_soft_targets_follow_the_teachers_tokens_and_mix_with_the_hard_loss(tokenizer, model):
    answer = "Final Answer: fr"
    # The teacher spelled the answer with other tokens than the tokenizer would (as constrained decoding does).
    teacher_ids = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.tokenize(answer[:6])] + \
        tokenizer(answer[6:], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    k = 3
    topk_ids = [[t, 5, 6] for t in teacher_ids]
    topk_lps = [[-0.1, -2.5, float("-inf")] for _ in teacher_ids]
    ex = tokenize_example(tokenizer, "a", chat(TEXTS[0], answer), 2048, teacher_ids, topk_ids, topk_lps)
    start = int(ex.soft_positions[0]) + 1
    assert ex.input_ids[start:start + len(teacher_ids)].tolist() == teacher_ids
    assert ex.soft_ids.shape == (len(teacher_ids), k)
    assert tokenizer.decode(ex.input_ids[start:]) == tokenizer.decode(
        tokenize_example(tokenizer, "a", chat(TEXTS[0], answer), 2048).input_ids[start:])

    batch = collate([ex], packed=True, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        hard, n = token_losses(model, batch, 0.0)
        mixed, _ = token_losses(model, batch, 0.5)
        soft_only, _ = token_losses(model, batch, 1.0)
        logp = torch.log_softmax(model(input_ids=batch["input_ids"], use_cache=False).logits[0].float(), -1)
    teacher = torch.log_softmax(torch.tensor(topk_lps), -1)
    p = teacher.exp()
    student = logp[torch.from_numpy(ex.soft_positions)].gather(-1, torch.tensor(topk_ids))
    kl = torch.where(p > 0, p * (teacher - student), torch.zeros_like(p)).sum(-1)
    targets = torch.from_numpy(ex.targets)
    ce = -logp[targets != IGNORE].gather(-1, targets[targets != IGNORE][:, None]).squeeze(-1)
    ce_soft = ce[:len(teacher_ids)]  # the soft positions are the first answer positions
    assert float(hard) == pytest.approx(float(ce.sum()), rel=1e-5)
    assert float(soft_only) == pytest.approx(float(kl.sum() + ce[len(teacher_ids):].sum()), rel=1e-5)
    assert float(mixed) == pytest.approx(float(0.5 * ce_soft.sum() + 0.5 * kl.sum() + ce[len(teacher_ids):].sum()),
                                         rel=1e-5)
    assert torch.isfinite(mixed)


def test_soft_labels_are_on_by_default_where_free_and_explicit_requests_that_cannot_work_fail(tmp_path, tiny_model,
                                                                                              smollm2, tokenizer):
    rows = [{"id": "a", "text": "x", "messages": chat("x", "y"), "teacher_token_ids": [1], "topk_ids": [[1]],
             "topk_logprobs": [[-0.1]], "teacher": smollm2}]
    auto = TrainConfig(data=str(tmp_path), output=str(tmp_path / "o"), student=tiny_model)
    explicit = auto.model_copy(update={"soft_label_weight": 0.3})
    # Default: on where they are free (top-k kept, same tokenizer), else off with the reason said.
    assert soft_label_choice(auto, tokenizer, [{**rows[0], "teacher": tiny_model}])[0] == 0.5
    weight, why = soft_label_choice(auto, tokenizer, rows)
    assert weight == 0 and "differs from the teacher's" in why
    weight, why = soft_label_choice(auto, tokenizer, [{**rows[0], "topk_ids": None}])
    assert weight == 0 and "no teacher top-k" in why
    # Asked for explicitly, the same cases are errors, not a quiet switch to hard labels.
    with pytest.raises(TrainDataError, match="share the teacher's tokenizer"):
        soft_label_choice(explicit, tokenizer, rows)
    assert soft_label_choice(explicit, tokenizer, [{**rows[0], "teacher": tiny_model}])[0] == 0.3
    with pytest.raises(TrainDataError, match="logprobs"):
        soft_label_choice(explicit, tokenizer, [{**rows[0], "topk_ids": None}])


def test_soft_labels_that_align_with_no_example_are_an_error(tmp_path, tiny_model, tokenizer):
    rows = [{"id": f"r{i}", "text": t, "messages": chat(t, "Final Answer: en"), "teacher": tiny_model,
             "teacher_token_ids": tokenizer("Something else", add_special_tokens=False)["input_ids"],
             "topk_ids": [[5]] * 2, "topk_logprobs": [[-0.1]] * 2} for i, t in enumerate(TEXTS)]
    config = TrainConfig(data=write_data(tmp_path / "gen", rows), output=str(tmp_path / "out"), student=tiny_model,
                         validation_fraction=0, test_fraction=0)
    with pytest.raises(TrainDataError, match="align with the answer of no training example"):
        run_prepare(config, tokenizer)


def test_soft_labels_align_for_a_thinking_teachers_answer(tokenizer):
    """A thinking teacher's answer tokens come after `</think>` and the whitespace it writes before its answer;
    generation drops both, and training still lines the teacher's top-k up with the student's answer tokens."""
    from distill.chat import answer_start

    answer = "Final Answer: fr"
    reasoning = tokenizer("<think>The text has é and à.</think>", add_special_tokens=False)["input_ids"]
    blank = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    tail = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    generated = reasoning + blank + tail
    texts = [tokenizer.decode([t]) for t in generated]
    start = answer_start(texts)
    assert generated[start:] == tail
    # Even when the whitespace reaches training (older data), it is skipped, and every answer token is aligned.
    ids = blank + tail
    topk = [[t, 3] for t in ids]
    ex = tokenize_example(tokenizer, "t", chat("Bonjour à tous", answer), 2048, ids, topk, [[-0.1, -3.0]] * len(ids))
    assert ex.soft_positions is not None and len(ex.soft_positions) == len(tail)
    begin = int(ex.soft_positions[0]) + 1
    assert ex.input_ids[begin:begin + len(tail)].tolist() == tail


def test_config_takes_object_store_output_and_rejects_unknown_keys(tmp_path):
    from distill.config import load_config

    for output in ("s3://bucket/run", "gs://bucket/run", str(tmp_path / "run")):
        assert TrainConfig(data="d", output=output).output == output
    (tmp_path / "c.yaml").write_text("data: d\nlearning_rte: 1\n")
    with pytest.raises(ConfigError, match="learning_rte"):
        load_config(TrainConfig, tmp_path / "c.yaml")
    assert np.isclose(TrainConfig(data="d").learning_rate, 2e-4)


def test_on_policy_loss_is_the_reverse_kl_over_the_teachers_top_k(tokenizer, model):
    """On the student's own tokens, each answer position's loss is KL(student || teacher) over the teacher's top-k
    there plus one bucket for every other token (full-vocabulary probabilities of both); a listed token the teacher
    gives no mass falls into that bucket. The bucket is what penalises a student whose mass lies elsewhere."""
    from distill.train.examples import Example

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": TEXTS[0]}], add_generation_prompt=True,
                                           tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    sampled = tokenizer("Final Answer: fr", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = np.asarray(prompt_ids + sampled)
    targets = np.full(len(ids), IGNORE)
    start = len(prompt_ids)
    targets[start - 1:-1] = ids[start:]
    top_ids = [[t, 7, 11] for t in sampled]
    top_lps = [[-0.2, -1.9, float("-inf")] if i == 0 else [-0.5, -1.2, -3.0] for i in range(len(sampled))]
    ex = Example("x", ids, targets, np.arange(start - 1, len(ids) - 1), np.asarray(top_ids), np.asarray(top_lps,
                                                                                                       np.float32))
    batch = collate([ex], packed=True, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        loss, n = token_losses(model, batch, soft_weight=1.0, objective="reverse")
        logits = model(input_ids=torch.from_numpy(ids)[None], use_cache=False).logits[0].float()
    expected = 0.0
    for i, (tid, tlp) in enumerate(zip(top_ids, top_lps)):
        keep = [j for j in range(3) if tlp[j] != float("-inf")]
        teacher = [math.exp(tlp[j]) for j in keep]
        student_all = torch.softmax(logits[start - 1 + i].double(), -1)
        student = [float(student_all[tid[j]]) for j in keep]
        teacher.append(1 - sum(teacher))                                # the "other" bucket of each
        student.append(1 - sum(student))
        expected += sum(q * math.log(q / p) for q, p in zip(student, teacher))
    assert n == len(sampled)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # This random-init student puts almost all its mass outside the teacher's top-k: the bucket makes that cost
    # about -log(teacher's other mass) per position, where a loss over the top-k alone would hardly see it.
    assert float(loss) > 0.9 * sum(-math.log(1 - sum(math.exp(v) for v in tlp)) for tlp in top_lps)
    # Gradients stay finite beside the teacher's -inf entry.
    model.zero_grad()
    loss, _ = token_losses(model, batch, soft_weight=1.0, objective="reverse")
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    model.zero_grad()
    # Not the forward KL of soft-label SFT: the direction matters.
    forward, _ = token_losses(model, batch, soft_weight=1.0)
    assert float(forward) != pytest.approx(expected, rel=1e-3)


def test_retraining_on_captured_rows_keeps_the_earlier_held_out_rows_held_out():
    from distill.train.examples import split_keeping

    earlier = {"a": "train", "b": "test", "c": "validation"}
    held_texts = {"text of b", "text of c"}
    rows = [{"id": "a", "text": "text of a"}, {"id": "b", "text": "text of b"}, {"id": "c", "text": "text of c"},
            # serving captured b's query under a content id: it must not train
            {"id": "cap-b", "text": "text of b"}]
    rows += [{"id": f"new{i}", "text": f"new query {i}"} for i in range(40)]
    split = split_keeping(rows, earlier, held_texts, validation_fraction=0.2)
    assert {k: split[k] for k in earlier} == earlier and split["cap-b"] == "excluded"
    new = [split[f"new{i}"] for i in range(40)]
    assert "test" not in new and {"train", "validation"} <= set(new)
    assert len(split) == len(rows)


def test_an_on_policy_rounds_summary_counts_the_student_samples_that_parse_as_answers(tokenizer):
    """The round record says how many of the student's own samples the task reads as an answer: the first sign of
    a student drifting out of the answer format."""
    from distill.train.onpolicy import round_summary
    from distill.tasks import load_task

    task = load_task("language-id")
    answers = ["Final Answer: fr", "The text is in French", "Final Answer: xx"]  # a label, free text, no such label
    samples = {f"q{i}": {"prompt_ids": [1], "tokens": tokenizer(a, add_special_tokens=False)["input_ids"]}
               for i, a in enumerate(answers)}
    scores = {k: {"token_logprobs": [-0.5] * len(v["tokens"])} for k, v in samples.items()}
    scores["q1"]["token_logprobs"][0] = float("-inf")  # a token the constrained teacher never writes
    summary = round_summary(samples, scores, task, tokenizer, {"positions_trained": 5})
    assert summary["answers_parsed"] == 1 and summary["samples"] == 3 and summary["positions_trained"] == 5
    assert summary["tokens"] == sum(len(v["tokens"]) for v in samples.values())
    assert summary["teacher_logprob_per_token"] == pytest.approx(-0.5) and summary["tokens_without_teacher_mass"] == 1


def test_on_policy_grammar_accepts_a_students_answer_up_to_where_it_leaves_the_format(tokenizer):
    """Which leading student tokens the answer grammar accepts (those the constrained teacher scores): each keeps the
    text a prefix of an answer, end of turn only after a whole one; then the round trains on those positions and
    the one where the student left, and nothing after."""
    from distill.train.onpolicy import AnswerGrammar, examples
    from distill.tasks import load_task

    grammar = AnswerGrammar(tokenizer, load_task("language-id").canonical_answers())
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tokenizer.eos_token_id
    whole = encode("Final Answer: fr") + [eos]
    assert grammar.accepted(whole) == len(whole)
    assert grammar.accepted(whole + encode(" more")) == len(whole)          # nothing after an end of turn
    assert grammar.accepted(encode("Final Answer: fr and more")) == len(encode("Final Answer: fr"))
    assert grammar.accepted(encode("Final Answer") + [eos]) == len(encode("Final Answer"))  # not a whole answer
    assert grammar.accepted(encode("Final Answer: z")) == len(encode("Final Answer: z"))   # " z" begins " zh"
    assert grammar.accepted(encode("Final Answer is French")) == len(encode("Final Answer"))
    assert grammar.accepted(encode("?")) == 0 and grammar.accepted([]) == 0

    # The teacher scored 3 positions of a 5-token answer (2 accepted + the one where it left), all of a 2-token one.
    samples = {"left": {"prompt_ids": [1, 2, 3], "tokens": [10, 11, 12, 13, 14]},
               "whole": {"prompt_ids": [1, 2], "tokens": [10, 15]}}
    scores = {"left": {"topk_ids": [[10, 20], [11, 21], [22, 23]], "topk_logprobs": [[-0.1, -2.5]] * 3},
              "whole": {"topk_ids": [[10, 20], [15, 25]], "topk_logprobs": [[-0.2, -1.9]] * 2}}
    built, counts = examples(samples, scores, max_length=64)
    assert counts == {"positions": 7, "positions_trained": 5, "samples_too_long": 0}
    left, whole = built
    assert left.soft_positions.tolist() == [2, 3, 4] and left.n_targets == 3
    assert left.targets[[2, 3, 4]].tolist() == [10, 11, 12] and left.soft_ids.tolist()[2] == [22, 23]
    assert whole.soft_positions.tolist() == [1, 2] and whole.targets[[1, 2]].tolist() == [10, 15]
    built, counts = examples(samples, scores, max_length=6)
    assert counts["samples_too_long"] == 1 and [e.id for e in built] == ["whole"]


def test_on_policy_answer_grammar_follows_the_teacher_and_is_an_error_where_the_task_has_none(tokenizer):
    from distill.config import ConfigError
    from distill.train.onpolicy import AnswerGrammar, answer_grammar
    from distill.tasks import load_task
    from distill.train.config import TrainConfig

    def config(**on_policy):
        return TrainConfig(data="unused", method="on-policy", on_policy=on_policy)

    labels, free_text = load_task("language-id"), load_task("persona")  # constrained teacher / unconstrained
    assert isinstance(answer_grammar(config(), labels, tokenizer), AnswerGrammar)
    assert answer_grammar(config(answer_grammar=False), labels, tokenizer) is None
    assert answer_grammar(config(), free_text, tokenizer) is None
    with pytest.raises(ConfigError, match="no label set"):
        answer_grammar(config(answer_grammar=True), free_text, tokenizer)
