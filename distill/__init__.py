"""distill: prompt distillation on Ray.

A teacher LLM answers queries with a long task prompt; a student learns, with LoRA, to give the same answers with
no prompt. The library holds what the stages share: configs, task specs, data formats and model helpers. The
stages themselves live in `pipelines/` (Ray Data generation, Ray Train training, evaluation) and `serve/`.
"""

__version__ = "0.1.0"
