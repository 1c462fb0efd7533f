"""distill: prompt distillation on Ray.

A teacher LLM answers queries with a long task prompt; a student learns, with LoRA, to give the same answers with
no prompt. The library holds what the stages share (configs, task specs, data formats, model helpers) and each
stage's machinery (generation, train_data, trainer, onpolicy, eval_inputs, eval_report). The stages' recipes, a
config and a `main` each, live in `pipelines/` (Ray Data generation, Ray Train training, evaluation) and `serve/`.
"""

__version__ = "0.1.0"
