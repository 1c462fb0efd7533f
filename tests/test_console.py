"""What `distill run` prints: one progress line per stage part (done/total, rate, time left, start-up), the engines'
and Ray's logs in OUTPUT/logs instead of on the console, and an error still shown with the logs' path."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill import console
from distill.local_models import sample_data_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def progress_mode(tmp_path):
    """Progress mode into a StringIO, restored afterwards (the root logger's handlers included)."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    saved = (console.CONSOLE.mode, console.CONSOLE.logs, console.CONSOLE.stream, console.CONSOLE.every_s,
             list(console.CONSOLE.finished))
    stream = io.StringIO()
    console.configure("progress", tmp_path / "logs", stream)
    yield stream, tmp_path / "logs"
    for h in root.handlers:
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)
    (console.CONSOLE.mode, console.CONSOLE.logs, console.CONSOLE.stream, console.CONSOLE.every_s,
     console.CONSOLE.finished) = saved


def test_a_progress_line_counts_rate_time_left_and_start_up(progress_mode):
    stream, logs = progress_mode
    progress = console.Progress("eval: teacher", 40, "requests", every_s=0)
    time.sleep(0.2)
    progress.update(4)   # the first answers: the start-up ends here
    time.sleep(1.1)
    progress.update(24, "note")
    progress.update(40)
    line = progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "eval: teacher: 40 requests to do"
    assert re.fullmatch(r"eval: teacher: 24/40 requests, [\d.]+ requests/s, \d+s left, \d+s so far, "
                        r"started up in \d+s; note", lines[2]), lines
    assert lines[-1] == line and "so far" not in line and "left" not in line
    part = console.CONSOLE.finished[-1]
    assert (part["part"], part["done"], part["total"]) == ("eval: teacher", 40, 40)
    assert 0.15 < part["start_up_s"] < part["seconds"] - 1.0 and part["seconds"] >= 1.3
    # The file log has every line; the console handlers pass warnings only.
    import logging

    logging.getLogger("distill.something").info("only in the file")
    logging.getLogger("distill.something").warning("on the console too")
    text = (logs / "distill.log").read_text()
    assert "only in the file" in text and "24/40 requests" in text and "on the console too" in text


def write_config(tmp_path: Path, tiny_model: str, source: str) -> Path:
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({
        "output": str(tmp_path / "out"), "task": "language-id", "teacher": tiny_model, "student": tiny_model,
        "input": source, "limit": 24, "stages": ["generate"],
        "generate": {"engine": {"batch_size": 8}}}))
    return config


def test_the_console_shows_progress_and_the_engines_logs_go_to_the_output(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_model, str(sample_data_path()))
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    shown = done.stdout + done.stderr
    assert re.search(r"^generate: 24/24 queries, .*started up in \d+", done.stdout, re.M), done.stdout
    engine_line = "Initializing a V1 LLM engine"  # what every vLLM engine logs as it starts
    assert "Traceback" not in shown and "EngineDeadError" not in shown and engine_line not in shown, shown[-3000:]
    assert len(shown.splitlines()) < 60, shown  # the plan, the progress, a few warnings: not the engines' logs
    logs = tmp_path / "out" / "logs"
    assert f"logs: {logs}" in done.stdout
    assert "generate: 24/24 queries" in (logs / "distill.log").read_text()
    engine_logs = "".join(p.read_text(errors="replace") for p in (logs / "ray").rglob("*") if p.is_file()
                          and p.suffix in {".out", ".err", ".log"})
    assert engine_line in engine_logs  # the engine's own lines, kept
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    part = run["stages"]["generate"]["parts"][0]
    assert part["part"] == "generate" and part["done"] == 24 and part["start_up_s"] > 0


def test_an_error_is_shown_with_the_path_of_the_logs(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_model, str(tmp_path / "missing.jsonl"))
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "missing.jsonl" in done.stderr
    assert f"its logs: {tmp_path / 'out' / 'logs'}" in done.stderr
