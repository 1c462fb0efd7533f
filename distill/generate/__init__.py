"""The generate stage: its config (`config`) and its steps (`steps`): the input checked and staged, the teacher's
Ray Data pass, the output's accounting. The recipe that runs them is pipelines/generate.py."""
