"""distill: prompt distillation on Ray.

A teacher LLM answers queries with a long task prompt; a student learns, with LoRA, to give the same answers with
no prompt. The library holds what the stages share (task specs, data formats, storage, engines, chat rendering,
the student model, metrics) and one package per stage with its config and machinery: `distill.generate`,
`distill.train`, `distill.evaluate`. The recipes (a `main` over a stage's config, and the `distill` command) live
in `pipelines/`, the serving application in `serve/`; the library imports neither.
"""

__version__ = "0.1.0"
