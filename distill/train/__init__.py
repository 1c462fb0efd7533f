"""The train stage: its config (`config`), the driver's data preparation (`data`), examples and their token files
(`examples`), what one step computes (`step`), the Ray Train run (`loop`) and on-policy rounds (`onpolicy`). The
recipe that runs them is pipelines/train.py."""
