"""The evaluate stage: its config (`config`), what it runs on (`inputs`), its numbers (`scores`), the report's
sections (`sections`) and the written report (`render`). The recipe that runs them is pipelines/evaluate.py."""
