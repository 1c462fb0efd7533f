"""The flywheel: every teacher answer that serving produces for the routed model (its teacher share, cascade
fallbacks, shadow comparisons), with its query, kept as training data in the generation data format.

`capture: URI` (off by default) writes `URI/data/*.parquet` with `distill.formats.DATA_SCHEMA`, the columns
`distill generate` writes, and `URI/manifest.json` with the task spec: `distill train --data URI` reads it as it
reads a generation output. Rules:

- Ids come from the query text (`distill.inputs.content_id` of the stripped text, as generation derives them), and
  each query is written once: the ids already under URI/data are read at start-up, so a restarted gateway does not
  write a query again either.
- Only single-turn requests (one user message, no system message) are captured: the data format is the bare query
  and the answer, and the teacher of a longer conversation saw more than the query.
- Nothing is written for a request that failed, nor for a teacher answer the task cannot parse (generation would
  have rejected it); each is counted in /stats `capture.skipped`.
- Shards are written by `distill.storage.ShardWriter` (atomic, at most `capture_flush_seconds` after a row came);
  a gateway killed before that loses its buffered rows, and their queries can be captured again later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Optional

from distill.formats import DATA_SCHEMA
from distill.inputs import content_id
from distill.storage import ShardWriter, join, read_ids, read_json, write_json
from distill.tasks import TaskSpec
from serve.arm_messages import ArmAnswer

log = logging.getLogger("distill.serve.capture")

SKIP_REASONS = ("duplicate", "conversation", "unparsable", "write_failed")


class Capture:
    """Opened once per gateway replica (blocking I/O: call `open` off the event loop)."""

    def __init__(self, uri: str, task: TaskSpec, teacher: str, rows_per_shard: int, flush_seconds: float):
        self.uri, self.task, self.teacher = uri, task, teacher
        self.rows_per_shard, self.flush_seconds = rows_per_shard, flush_seconds
        self.seen: set[str] = set()
        self.on_disk_at_start = 0
        self.accepted = 0
        self.skipped: Counter[str] = Counter()
        self.last_error: Optional[str] = None
        self.writer: Optional[ShardWriter] = None
        self.lock = asyncio.Lock()

    @property
    def data_uri(self) -> str:
        return join(self.uri, "data")

    def open(self) -> "Capture":
        self.seen = read_ids(self.data_uri)
        self.on_disk_at_start = len(self.seen)
        manifest_uri = join(self.uri, "manifest.json")
        manifest = read_json(manifest_uri)
        if manifest is not None and manifest.get("task") != self.task.name:
            raise ValueError(f"capture {self.uri} holds data of task {manifest.get('task')!r}, not "
                             f"{self.task.name!r}: capture another task into another folder")
        if manifest is None:
            # What training needs to know the task of the data (distill.tasks.task_of_data), even for a task
            # file that does not exist where training runs.
            write_json(manifest_uri, {"source": "distill serve capture", "task": self.task.name,
                                      "task_spec": self.task.model_dump(), "teacher": self.teacher,
                                      "created_at": time.time()})
        self.writer = ShardWriter(self.data_uri, "serve", DATA_SCHEMA, self.rows_per_shard, self.flush_seconds)
        log.info("capturing teacher answers into %s (%d queries there already)", self.data_uri, len(self.seen))
        return self

    def row(self, messages: list[dict], teacher: ArmAnswer) -> Optional[dict]:
        """The training example for a teacher answer, or None (counted) when it is not one to write. Marks the
        query as seen, so a second answer to it is a duplicate even before the first is written."""
        if len(messages) != 1 or messages[0]["role"] != "user":
            self.skipped["conversation"] += 1
            return None
        text = messages[0]["content"].strip()
        parsed = self.task.parse(teacher.raw)
        if parsed.answer is None:
            self.skipped["unparsable"] += 1
            return None
        rid = content_id(text)
        if rid in self.seen:
            self.skipped["duplicate"] += 1
            return None
        self.seen.add(rid)
        self.accepted += 1
        return {
            "id": rid, "text": text, "messages": TaskSpec.student_messages(text, parsed.answer),
            "answer": parsed.answer, "label": self.task.label_of(parsed.answer), "gold": None,
            "teacher_output": parsed.raw, "reasoning": parsed.reasoning,
            "prompt_tokens": teacher.prompt_tokens, "output_tokens": teacher.completion_tokens,
            "teacher": self.teacher, "task": self.task.name, "attempt": 0, "samples": 1, "agreement": 1.0,
            "teacher_token_ids": None, "reasoning_token_ids": None, "topk_ids": None, "topk_logprobs": None,
        }

    async def write(self, row: dict) -> None:
        """Write a row `row` made (a failure is logged and counted, never raised: serving goes on)."""
        async with self.lock:  # one writer call at a time; the write may flush a shard, off the event loop
            try:
                await asyncio.to_thread(self.writer.write, row)
            except Exception as err:
                self.skipped["write_failed"] += 1
                self.last_error = f"{type(err).__name__}: {err}"
                log.exception("could not capture a teacher answer into %s", self.data_uri)

    def snapshot(self) -> dict:
        written = self.writer.rows_written if self.writer else 0
        return {"uri": self.uri, "data": self.data_uri, "on_disk_at_start": self.on_disk_at_start,
                "accepted": self.accepted, "written": written, "pending": self.accepted - written
                - self.skipped["write_failed"], "queries": len(self.seen),
                "skipped": {r: self.skipped[r] for r in SKIP_REASONS}, "last_error": self.last_error,
                "flush_seconds": self.flush_seconds}

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
