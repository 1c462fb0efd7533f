"""The demo's task, support-routing: its built-in queries (deterministic, balanced, each naming exactly one desk),
its parser, and constrained decoding spelled in the model's own tokens (distill.sampling.guided_choice), which is
what makes the embedded teacher route these messages: SmolLM2 under a grammar alone wrote a bare space token and
then a word it never writes after a space."""

from __future__ import annotations

import json
import re
from collections import Counter

from distill.sampling import canonical_token_ids, guided_choice, teacher_sampling
from distill.support_routing import DESKS, SAMPLE, build_rows, sample_lines
from distill.tasks import load_task

TASK = load_task("support-routing")


def test_the_shipped_queries_are_the_generators_and_every_desk_is_named_once():
    assert SAMPLE.read_text(encoding="utf-8") == sample_lines()  # `python -m distill.support_routing` made them
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 800 and len({r["id"] for r in rows}) == 800
    assert Counter(r["label"] for r in rows) == {desk: 100 for desk in DESKS}
    assert sorted(DESKS) == sorted(TASK.answer.labels)
    for r in rows:
        named = [d for d in DESKS if re.search(rf"\b{d}\b", r["text"])]
        assert named == [r["label"]], r  # the gold desk, and no other, is in the message
    assert build_rows(16, seed=1) != build_rows(16, seed=0)  # the seed, not luck, fixes the rows


def test_the_parser_reads_the_desk_and_rejects_what_is_not_one():
    assert TASK.label_of(TASK.parse("Final Answer: cedar").answer) == "cedar"
    assert TASK.label_of(TASK.parse("Final Answer:haven\n").answer) == "haven"
    assert TASK.parse("Final Answer: zebra").answer is None
    assert TASK.parse("Final Answer: zebra").reason.startswith("label 'zebra'")
    assert TASK.parse("Please pass this to cedar.").answer is None  # the desk alone is not an answer
    assert [TASK.label_of(a) for a in TASK.canonical_answers()] == TASK.answer.labels
    assert "amber  billing" in TASK.prompt.system and TASK.student_messages("hi") == [{"role": "user", "content": "hi"}]


class SpaceSplittingTokenizer:
    """Tokens as a BPE tokenizer with a leading-space marker makes them: "Ġcedar" is one token, a bare "Ġ"
    another that the grammar alone would allow before "cedar"."""

    vocab = {w: i for i, w in enumerate(["Final", "ĠAnswer", ":", "Ġ", "cedar", "Ġcedar", "Ġhaven", "haven",
                                         "<|im_end|>"])}
    all_special_ids = [8]

    def __call__(self, text, add_special_tokens=False):
        ids = []
        for n, word in enumerate(text.replace(":", " :").split()):
            ids.append(self.vocab[word if n == 0 or word == ":" else "Ġ" + word])
        return {"input_ids": ids}


def test_guided_choice_allows_only_the_tokens_the_tokenizer_spells_the_answers_with():
    tokenizer = SpaceSplittingTokenizer()
    choices = ["Final Answer: cedar", "Final Answer: haven"]
    allowed = canonical_token_ids(choices, tokenizer)
    v = tokenizer.vocab
    assert allowed == sorted([v["Final"], v["ĠAnswer"], v[":"], v["Ġcedar"], v["Ġhaven"], v["<|im_end|>"]])
    assert v["Ġ"] not in allowed and v["cedar"] not in allowed  # the spelling that made SmolLM2 answer at random
    params = guided_choice(choices, 4, tokenizer)
    assert params["allowed_token_ids"] == allowed and params["structured_outputs"] == {"choice": choices}
    assert "allowed_token_ids" not in guided_choice(choices, 4)  # no tokenizer given: the grammar alone


def test_the_teachers_request_carries_the_canonical_tokens_of_the_shipped_task(smollm2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    params = teacher_sampling(TASK, tokenizer)
    space = tokenizer.convert_tokens_to_ids("Ġ")
    assert space not in params["allowed_token_ids"]
    for answer in TASK.canonical_answers():
        assert set(tokenizer(answer, add_special_tokens=False)["input_ids"]) <= set(params["allowed_token_ids"])
    assert tokenizer.eos_token_id in params["allowed_token_ids"]
