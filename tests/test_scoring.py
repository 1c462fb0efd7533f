"""Teacher-forced scoring on a real vLLM engine equals the log-likelihood transformers computes for the same
tokens, with the long task prompt (prefix-cached) and without, and returns the model's top-k at every step; under
a task's answer grammar it returns the constrained model's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from distill.scoring import read_scores, scoring_sampling

ENGINE_SCRIPT = textwrap.dedent("""
    import json, sys

    if __name__ == "__main__":  # vLLM's engine runs in a spawned process
        from vllm import LLM, SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        from distill.engine import EngineConfig, engine_kwargs
        from distill.scoring import ENGINE_ARGS, read_scores, scoring_sampling

        model, cases_path = sys.argv[1], sys.argv[2]
        cases = json.load(open(cases_path))
        # float32 like the reference below: the check is that forcing scores the given tokens exactly, and a
        # bf16 engine (dtype auto on a CPU with bf16 instructions) differs from fp32 by more than the tolerance.
        engine = EngineConfig(max_model_len=4096, kv_cache_memory_bytes=128 * 1024**2, dtype="float32")
        llm = LLM(model=model, seed=0, **engine_kwargs(engine, "cpu", **ENGINE_ARGS))
        prompts = [{"prompt_token_ids": c["prompt"]} for c in cases]
        params = []
        for c in cases:
            p = scoring_sampling(c["answer"], top_k=5, choices=c.get("choices"), next_step=c.get("next_step", False))
            if "structured_outputs" in p:
                p["structured_outputs"] = StructuredOutputsParams(**p["structured_outputs"])
            params.append(SamplingParams(**p))
        outputs = llm.generate(prompts, params)
        print("RESULT " + json.dumps([
            {"tokens": list(o.outputs[0].token_ids),
             **read_scores(o.outputs[0].logprobs, list(o.outputs[0].token_ids), 5)}
            for o, c in zip(outputs, cases)]))
""")


def test_forced_decoding_scores_given_tokens_exactly(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.train.onpolicy import AnswerGrammar
    from distill.tasks import load_task

    task = load_task("language-id")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    cases = []
    for messages in (task.teacher_messages("Jeder hat das Recht auf Leben."),  # the long prompt, cached
                     task.teacher_messages("Toute personne a droit à la vie."),
                     task.student_messages("Everyone has the right to life.")):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        # An answer the random model would never write itself: forced, not sampled.
        answer = tokenizer("Final Answer: de", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        cases.append({"prompt": prompt, "answer": answer})
    # Under the answer grammar (on-policy scoring of a constrained teacher): a whole answer, and an answer that
    # leaves the format after "Final Answer" (its accepted tokens forced, then one step of the teacher's own).
    grammar = AnswerGrammar(tokenizer, task.canonical_answers())
    off_format = tokenizer("Final Answer is", add_special_tokens=False)["input_ids"]
    accepted = grammar.accepted(off_format)
    assert accepted == len(tokenizer("Final Answer", add_special_tokens=False)["input_ids"]) < len(off_format)
    constrained = [{**cases[0], "choices": task.canonical_answers()},
                   {**cases[0], "answer": off_format[:accepted], "choices": task.canonical_answers(), "next_step": True}]
    (tmp_path / "cases.json").write_text(json.dumps(cases + constrained))
    (tmp_path / "engine.py").write_text(ENGINE_SCRIPT)
    proc = subprocess.run([sys.executable, str(tmp_path / "engine.py"), tiny_model, str(tmp_path / "cases.json")],
                          capture_output=True, text=True, timeout=400, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    results = json.loads(lines[-1][len("RESULT "):])
    for case, result in zip(constrained, results[len(cases):]):
        ids = torch.tensor([case["prompt"] + case["answer"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        start, n = len(case["prompt"]), len(case["answer"])
        assert result["tokens"][:n] == case["answer"] and len(result["tokens"]) == n + int(case.get("next_step", 0))
        # The constrained teacher's log-probabilities: renormalised over the allowed tokens, so never below the
        # unconstrained ones, and far above them where the random model puts little mass on the format.
        free = [float(logp[start - 1 + i, t]) for i, t in enumerate(case["answer"])]
        assert all(c >= f - 2e-3 for c, f in zip(result["token_logprobs"], free))
        assert sum(result["token_logprobs"][:n]) > sum(free) + 1.0
        # Every token the top-k gives mass is one the grammar allows after the tokens before it.
        for i, (top_ids, top_lps) in enumerate(zip(result["topk_ids"], result["topk_logprobs"])):
            prefix = result["tokens"][:i]
            for t, lp in zip(top_ids, top_lps):
                if lp > float("-inf"):
                    assert grammar.accepted(prefix + [t]) == i + 1, (i, t, tokenizer.decode(prefix + [t]))
    for case, result in zip(cases, results):
        assert result["tokens"] == case["answer"]  # the engine emitted exactly the given tokens, EOS included
        ids = torch.tensor([case["prompt"] + case["answer"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        start = len(case["prompt"])
        expected = [float(logp[start - 1 + i, t]) for i, t in enumerate(case["answer"])]
        assert result["token_logprobs"] == pytest.approx(expected, abs=2e-3)
        for i, (top_ids, top_lps) in enumerate(zip(result["topk_ids"], result["topk_logprobs"])):
            assert len(top_ids) == 5 and top_lps == sorted(top_lps, reverse=True)
            assert top_ids[0] == int(logp[start - 1 + i].argmax())


def test_missing_or_unforced_logprobs_are_errors():
    assert scoring_sampling([5, 6], top_k=3)["max_tokens"] == 2
    with pytest.raises(ValueError, match="nothing to score"):
        scoring_sampling([])
    # One step past the given tokens (none here) is something to score; end of turn stays possible there.
    assert scoring_sampling([], top_k=3, next_step=True) | {"extra_args": None} == scoring_sampling([9], 3) | {
        "extra_args": None, "min_tokens": 0}
    assert scoring_sampling([5], choices=["a", "b"])["structured_outputs"] == {"choice": ["a", "b"]}
    with pytest.raises(RuntimeError, match="ENGINE_ARGS"):
        read_scores(None, [5])
    with pytest.raises(RuntimeError, match="no logprob"):
        read_scores([{7: {"logprob": -0.1, "rank": 1}}], [5])
    scores = read_scores([{5: {"logprob": -2.0, "rank": 3}, 7: {"logprob": -0.1, "rank": 1},
                           9: {"logprob": -1.0, "rank": 2}}], [5], top_k=2)
    assert scores == {"token_logprobs": [-2.0], "topk_ids": [[7, 9]], "topk_logprobs": [[-0.1, -1.0]]}


def test_top_k_drops_the_sampled_token_below_k_and_shared_ranks_beyond_k():
    from distill.scoring import top_k_of

    # vLLM's per-step entries: the top 3, plus the sampled token ranked 7, plus a token sharing rank 3 (a tie).
    step = {"11": {"logprob": -0.1, "rank": 1}, "12": {"logprob": -2.0, "rank": 2},
            "13": {"logprob": -9.0, "rank": 3}, "14": {"logprob": -9.5, "rank": 3}, "99": {"logprob": -12.0, "rank": 7}}
    assert top_k_of(step, 3) == [(11, -0.1), (12, -2.0), (13, -9.0)]
    assert top_k_of(step, 0) == []


def test_unforced_requests_carry_the_forced_field_empty_so_mixed_passes_share_one_schema():
    from distill.sampling import DEFAULTS, complete
    from distill.scoring import FORCED_TOKENS

    forced = complete(scoring_sampling([5, 6, 7]))
    plain = complete({"temperature": 0.0, "max_tokens": 4})
    assert forced["extra_args"] == {FORCED_TOKENS: "5,6,7"} and plain["extra_args"] == {FORCED_TOKENS: ""}
    assert DEFAULTS["extra_args"] == {FORCED_TOKENS: ""}
