"""The cost model: what a query costs the teacher and the student, what distillation cost, and when it pays off.

- Per request: uncached prompt tokens, cached prompt tokens (the task prompt every teacher request shares, which
  the engine's prefix cache computes once) and output tokens, each at its own price.
- Distillation: generation and evaluation engine time, and training worker time, summed over every attempt
  (a preempted run and its rerun both cost), at per-hour prices.
- Break-even: the queries after which the per-query savings have paid for the distillation.
The default prices are illustrative placeholders; set your provider's or cluster's.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from pydantic import Field

from distill.config import StrictModel


class Price(StrictModel):
    input_per_million: float = Field(ge=0, description="Dollars per million uncached prompt (input) tokens.")
    cached_input_per_million: Optional[float] = Field(
        None, ge=0, description="Dollars per million prompt tokens served from the prefix cache (the shared task "
        "prompt); default: a quarter of input_per_million, a typical hosted discount for cached input.")
    output_per_million: float = Field(ge=0, description="Dollars per million generated (output) tokens.")

    def cached_rate(self) -> float:
        return self.cached_input_per_million if self.cached_input_per_million is not None \
            else self.input_per_million / 4


class CostConfig(StrictModel):
    """Prices for the cost model, the same for teacher and student by default because the embedded demo uses one
    model for both: then every saving comes from the prompt tokens the student no longer needs."""

    teacher: Price = Field(default_factory=lambda: Price(input_per_million=0.10, output_per_million=0.40),
                           description="Price of the teacher's tokens.")
    student: Price = Field(default_factory=lambda: Price(input_per_million=0.10, output_per_million=0.40),
                           description="Price of the distilled student's tokens.")
    train_per_worker_hour: float = Field(1.0, ge=0, description="Dollars per hour of one training worker.")
    engine_per_hour: float = Field(1.0, ge=0, description="Dollars per hour of one generation or evaluation "
                                   "engine (its GPU, or its CPU bundle).")


def request_cost(price: Price, prompt_tokens: Optional[float], cached_tokens: float,
                 output_tokens: Optional[float]) -> Optional[float]:
    """Dollars for one request of the given (mean) token counts; `cached_tokens` of the prompt are cached."""
    if prompt_tokens is None or output_tokens is None:
        return None
    cached = min(cached_tokens, prompt_tokens)
    return ((prompt_tokens - cached) * price.input_per_million + cached * price.cached_rate()
            + output_tokens * price.output_per_million) / 1e6


def hours_cost(seconds: Optional[float], per_hour: float, units: int = 1) -> Optional[float]:
    return None if seconds is None else seconds / 3600 * per_hour * max(1, units)


def break_even_queries(fixed_cost: Optional[float], savings_per_query: Optional[float]) -> Optional[int]:
    """Queries after which the per-query savings have paid the fixed cost (rounded up). None when the student
    saves nothing per query (it never pays off) or either number is unknown."""
    if fixed_cost is None or savings_per_query is None or savings_per_query <= 0:
        return None
    # The relative nudge keeps float noise (4.0 / 0.001 = 4000.0000000000005) from adding a query.
    return max(0, math.ceil(fixed_cost / savings_per_query * (1 - 1e-12)))


def cost_model(prices: CostConfig, teacher: dict, student: dict, cached_prompt_tokens: float,
               stage_seconds: dict[str, Optional[float]], workers: int, engines: dict[str, int]) -> dict[str, Any]:
    """The report's cost section. teacher/student: {prompt_tokens_mean, output_tokens_mean}; stage_seconds:
    {generation, training, evaluation} wall seconds over all attempts (None: unknown)."""
    per_request = {
        "teacher": request_cost(prices.teacher, teacher["prompt_tokens_mean"], cached_prompt_tokens,
                                teacher["output_tokens_mean"]),
        "student": request_cost(prices.student, student["prompt_tokens_mean"], 0.0, student["output_tokens_mean"]),
    }
    savings = None if None in per_request.values() else per_request["teacher"] - per_request["student"]
    distillation = {
        "generation_usd": hours_cost(stage_seconds.get("generation"), prices.engine_per_hour, engines.get("generation", 1)),
        "training_usd": hours_cost(stage_seconds.get("training"), prices.train_per_worker_hour, workers),
        "evaluation_usd": hours_cost(stage_seconds.get("evaluation"), prices.engine_per_hour, engines.get("evaluation", 1)),
    }
    known = [v for v in distillation.values() if v is not None]
    total = sum(known) if known else None
    break_even = break_even_queries(total, savings)
    if total is None:
        note = "no stage timings (pass --train OUT): distillation cost and break-even unknown"
    elif break_even is None:
        note = "the student saves nothing per query at these prices: distillation never pays for itself"
    else:
        missing = [k.removesuffix("_usd") for k, v in distillation.items() if v is None]
        note = f"distillation cost leaves out {', '.join(missing)} (not recorded)" if missing else None
    return {
        "prices": prices.model_dump(),
        "cached_prompt_tokens": cached_prompt_tokens,
        "per_request_usd": per_request,
        "savings_per_query_usd": savings,
        "savings_per_1k_queries_usd": savings * 1000 if savings is not None else None,
        "stage_seconds": stage_seconds, "training_workers": workers,
        "distillation_usd": {**distillation, "total_usd": total},
        "break_even_queries": break_even,
        "note": note,
    }
