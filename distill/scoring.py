"""Scoring given answer tokens on a vLLM engine: the log-probability of each token and the model's top-k there,
teacher-forced, with the prompt's KV cache shared between requests.

Why not vLLM's `prompt_logprobs`: requests that ask for them bypass the prefix cache and compute logprobs at every
prompt position. Measured on a 2-core CPU (SmolLM2, the 1,503-token language-id prompt, 64 requests): 67.5 s
with `prompt_logprobs`, 5.0 s for cached one-token decodes. Why not guided decoding of the given answer: its
logprobs are taken after the grammar mask (about 0 for every forced token), so they score nothing.

What is done instead: the prompt is sent as usual and the answer is *decoded*, one step per token, under a logits
processor (`ForcedTokens`, registered with the engine by `ENGINE_ARGS`) that makes the given token the only
possible one. vLLM computes the returned logprobs from the raw logits before any logits processor
(`logprobs_mode` raw_logprobs, its default), so each step returns the model's true log-probability of the forced
token, plus its top-k. One request per sequence, prefix-cached, batched with everything else in the engine.
"""

from __future__ import annotations

from typing import Any, Optional

FORCED_TOKENS = "distill_forced_tokens"  # SamplingParams.extra_args key: the token ids to emit, in order
ENGINE_ARGS = {"logits_processors": ["distill.scoring:ForcedTokens"]}


def _processor_class():
    import torch
    from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

    class ForcedTokens(AdapterLogitsProcessor):
        """Per request: at output position i, only `extra_args[FORCED_TOKENS][i]` may be sampled."""

        def is_argmax_invariant(self) -> bool:
            return False  # it decides the argmax: greedy requests must go through it

        def new_req_logits_processor(self, params):
            forced = (params.extra_args or {}).get(FORCED_TOKENS)
            if not forced:
                return None
            forced = [int(t) for t in (forced.split(",") if isinstance(forced, str) else forced)]

            def force(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
                i = len(output_ids)
                if i < len(forced):
                    logits = torch.full_like(logits, float("-inf"))
                    logits[forced[i]] = 0.0
                return logits

            return force

    return ForcedTokens


def __getattr__(name: str):
    # vLLM imports "distill.scoring:ForcedTokens" inside the engine process; the class needs vLLM, which this
    # module must not import at the top (the driver and the tests use the helpers below without it).
    if name == "ForcedTokens":
        cls = _processor_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def scoring_sampling(tokens: list[int], top_k: int = 0, choices: Optional[list[str]] = None,
                     next_step: bool = False) -> dict[str, Any]:
    """sampling_params (a `ray.data.llm` row field, or SamplingParams(**...)) that score `tokens`: greedy, exactly
    len(tokens) steps, each forced, with the forced token's logprob and the top_k others at every step.

    choices: score under the grammar of these answers (structured outputs, as distill.sampling.guided_choice).
    The grammar's mask comes before the logprobs, so they are the constrained model's: its distribution over the
    tokens the grammar allows there, renormalised. Every token must be one the grammar allows.
    next_step: one more step, not forced, after the tokens (greedy, under the grammar when given): its top_k is the
    model's distribution at the position after them (where a scored answer left the grammar, say); `tokens` may
    then be empty."""
    if not tokens and not next_step:
        raise ValueError("nothing to score: empty token list")
    steps = len(tokens) + int(next_step)
    # The tokens as one comma-separated string: a Ray Data pass mixes these rows with unforced ones, whose
    # extra_args carry "" (distill.sampling.DEFAULTS), so every block has the same string-typed field (a list here
    # and None there made blocks of unforced rows only fail to concatenate inside ray.data.llm).
    # min_tokens only over the forced steps: it masks end-of-turn below it, which the next step may need (the
    # grammar allows nothing else after a complete answer).
    params = {"temperature": 0.0, "max_tokens": steps, "min_tokens": len(tokens), "ignore_eos": True,
              "logprobs": top_k, "skip_special_tokens": False,
              "extra_args": {FORCED_TOKENS: ",".join(str(int(t)) for t in tokens)}}
    if choices:
        from distill.sampling import guided_choice  # the one definition of constrained decoding

        params["structured_outputs"] = guided_choice(choices, steps)["structured_outputs"]
    return params


def read_scores(logprobs: Optional[list], tokens: list[int], top_k: int = 0) -> dict[str, Any]:
    """From the engine's per-step logprobs ({token id: {logprob, rank, ...}} per step, as ray.data.llm returns them,
    or vLLM Logprob objects): {token_logprobs: [log p(token_i)], topk_ids, topk_logprobs (best first, k per step)}.
    A step whose forced token is missing means the engine did not force it: an error, never a silent guess."""
    if logprobs is None or len(logprobs) != len(tokens):
        raise RuntimeError(f"the engine returned {0 if logprobs is None else len(logprobs)} logprob steps for "
                           f"{len(tokens)} forced tokens (is distill.scoring.ENGINE_ARGS set on the engine?)")
    token_lps, topk_ids, topk_lps = [], [], []
    for step, token in zip(logprobs, tokens):
        entries = {int(t): _value(v) for t, v in step.items() if v is not None}
        if int(token) not in entries:
            raise RuntimeError(f"forced token {token} has no logprob at its step; got {sorted(entries)[:5]}")
        token_lps.append(entries[int(token)][0])
        top = top_k_of(step, top_k)
        topk_ids.append([t for t, _ in top])
        topk_lps.append([lp for _, lp in top])
    return {"token_logprobs": token_lps, "topk_ids": topk_ids, "topk_logprobs": topk_lps}


def top_k_of(step: dict, k: int) -> list[tuple[int, float]]:
    """The k best (token id, logprob) of one step's logprobs, best first. vLLM adds the sampled (or forced)
    token when it ranks below k, and tokens of equal logprob (under a grammar mask, say) can share a rank, so
    the entries are filtered by rank, ordered by logprob and cut at k."""
    entries = [(int(t), *_value(v)) for t, v in step.items() if v is not None]
    ranked = sorted(((t, lp) for t, lp, rank in entries if rank is not None and rank <= k), key=lambda e: -e[1])
    return ranked[:k]


def _value(entry) -> tuple[float, Optional[int]]:
    if isinstance(entry, dict):
        return float(entry["logprob"]), entry.get("rank")
    return float(entry.logprob), getattr(entry, "rank", None)
