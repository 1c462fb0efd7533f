"""What a person sees while a run works: the plan, one progress line per stage, the headline; the rest in files.

Two modes, chosen once by the entry point (`configure`):
- `full` (the default when nothing configures it, as in the tests and a bare `import`): every log line on the
  console, as Python's logging and Ray print them; progress is an INFO line every `every_s` seconds.
- `progress` (`distill run`'s default): the console shows warnings, errors and one line per stage, rewritten in
  place on a terminal (a line every `every_s` seconds in a log file or a pipe); distill's INFO log goes to
  LOGS/distill.log, and Ray and the engines keep theirs in Ray's session folder, which `collect_ray_logs` copies
  to LOGS/ray/ when this run started the cluster.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TextIO

log = logging.getLogger("distill.progress")


@dataclass
class ConsoleMode:
    mode: str = "full"             # "full" or "progress"
    logs: Optional[Path] = None    # LOGS: distill.log and ray/ (progress mode)
    stream: TextIO = sys.stdout
    every_s: float = 10.0
    # Every Progress closed in this process, in order: what the run's summary says of each stage's parts.
    finished: list = field(default_factory=list)


CONSOLE = ConsoleMode()


def configure(mode: str, logs: Optional[Path] = None, stream: TextIO = sys.stdout) -> None:
    """Set the console mode for this process. progress: the root logger writes INFO and up to LOGS/distill.log
    and only warnings and errors to the console (Ray and vLLM loggers included)."""
    CONSOLE.mode, CONSOLE.logs, CONSOLE.stream = mode, logs, stream
    if mode != "progress":
        return
    if logs is None:
        raise ValueError("progress mode needs a folder for the logs")
    logs.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
    to_file = logging.FileHandler(logs / "distill.log", encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root.addHandler(to_file)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in root.handlers):
        to_console = logging.StreamHandler(sys.stderr)
        to_console.setLevel(logging.WARNING)
        root.addHandler(to_console)


def ray_init_kwargs() -> dict:
    """What `ray.init` is given in this mode: in progress mode the workers' output (engines included) stays in
    Ray's session logs instead of being echoed on the driver, and Ray's own driver logger prints warnings only."""
    if CONSOLE.mode != "progress":
        return {}
    return {"log_to_driver": False, "logging_level": logging.WARNING}


def quiet_ray_data() -> None:
    """Ray Data's progress bars and per-operator status lines, and ray.data.llm's INFO lines (its loggers print to
    stdout on their own handlers), off the console in progress mode; Ray Data's own file log keeps them. Called
    once Ray is up and again whenever a stage part starts (ray.data.llm makes its loggers on first use)."""
    if CONSOLE.mode != "progress":
        return
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    # Ray Data's warnings (backpressure, the progress bars being off) stay in its file log; errors still show.
    levels = {"ray.data": logging.ERROR, "ray.train": logging.WARNING, "ray.tune": logging.WARNING,
              "ray.serve": logging.WARNING}
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("ray.llm"):
            levels[name] = logging.WARNING
    for name, level in levels.items():
        for handler in logging.getLogger(name).handlers:
            if "File" not in type(handler).__name__:
                handler.setLevel(level)


def collect_ray_logs(session_dir: Optional[str]) -> Optional[Path]:
    """Copy Ray's session logs (engines, workers, Ray Data, Ray Train) to LOGS/ray; None when there is nothing to
    copy (full mode, or a cluster this run joined: its logs are on its nodes, `ray logs` reads them)."""
    if CONSOLE.mode != "progress" or not session_dir or CONSOLE.logs is None:
        return None
    source = Path(session_dir) / "logs"
    if not source.is_dir():
        return None
    dest = CONSOLE.logs / "ray"
    shutil.copytree(source, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.sock", "*.pid"),
                    ignore_dangling_symlinks=True)
    return dest


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """One stage's progress line: done/total units, rate (counted from the first unit, so an engine's start-up is
    not throughput), time left, and what the stage says about itself (`note`). On a terminal the line is rewritten
    in place; elsewhere it is written every `every_s` seconds; in full mode it is an INFO log line."""

    def __init__(self, stage: str, total: int, unit: str = "rows", every_s: Optional[float] = None):
        quiet_ray_data()  # first, so that its imports are not counted as the part's start-up
        self.stage, self.total, self.unit = stage, total, unit
        self.every_s = CONSOLE.every_s if every_s is None else every_s
        self.t0 = time.monotonic()
        self.first: Optional[float] = None
        self.done_at_first = 0
        self.done = 0
        self.note = ""
        self.last_write = 0.0
        self.tty = CONSOLE.mode == "progress" and CONSOLE.stream.isatty()
        self._write(f"{stage}: {total} {unit} to do", final=not self.tty)

    @property
    def start_up_s(self) -> Optional[float]:
        """Seconds from the start to the first unit (an engine's or a training run's start-up included)."""
        return None if self.first is None else self.first - self.t0

    def line(self) -> str:
        now = time.monotonic()
        parts = [f"{self.stage}: {self.done}/{self.total} {self.unit}"]
        if self.first is not None and self.done > self.done_at_first and now - self.first >= 1.0:
            rate = (self.done - self.done_at_first) / (now - self.first)
            parts.append(f"{rate:.2f} {self.unit}/s")
            if self.done < self.total and rate > 0:
                parts.append(f"{duration((self.total - self.done) / rate)} left")
        parts.append(f"{duration(now - self.t0)} so far")
        if self.start_up_s is not None:
            parts.append(f"started up in {duration(self.start_up_s)}")
        return ", ".join(parts) + (f"; {self.note}" if self.note else "")

    def update(self, done: int, note: str = "") -> None:
        now = time.monotonic()
        if done and self.first is None:
            self.first, self.done_at_first = now, done
        self.done, self.note = done, note or self.note
        if now - self.last_write >= (0.5 if self.tty else self.every_s):
            self.last_write = now
            self._write(self.line())

    def close(self, note: str = "") -> str:
        """The stage's last line, written whatever the interval; returned for the run's summary."""
        if note:
            self.note = note
        line = self.line().replace(" so far", "")
        self._write(line, final=True)
        CONSOLE.finished.append({"part": self.stage, "done": self.done, "total": self.total, "unit": self.unit,
                                 "seconds": round(time.monotonic() - self.t0, 3),
                                 "start_up_s": None if self.start_up_s is None else round(self.start_up_s, 3)})
        return line

    def _write(self, text: str, final: bool = False) -> None:
        log.info("%s", text)  # full mode: the console's line; progress mode: the file log keeps every line
        if CONSOLE.mode != "progress":
            return
        if self.tty:
            CONSOLE.stream.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            CONSOLE.stream.write(text + "\n")
        CONSOLE.stream.flush()


class Watching:
    """Update `progress` from `poll` (returning units done and a note) every `every_s` seconds on a daemon thread
    while the block runs: for work that reports through a file rather than to this process (Ray Train workers
    writing OUT/metrics.jsonl)."""

    def __init__(self, progress: Progress, poll, every_s: float = 2.0):
        import threading

        self.progress, self.poll, self.every_s = progress, poll, every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="distill-progress")

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            try:
                done, note = self.poll()
            except Exception:  # a half-written line or a storage hiccup: the next poll reads it again
                continue
            if done:
                self.progress.update(done, note)

    def __enter__(self) -> Progress:
        self.thread.start()
        return self.progress

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=self.every_s + 1)
        try:
            self.progress.done, note = self.poll()
            self.progress.note = note or self.progress.note
        except Exception:
            pass  # the stage's own error (if any) is what the caller sees
        self.progress.close()
