"""Process-tree helpers for the things that start whole Ray clusters and vLLM engines in a child process
(benchmarks, kill-and-resume tests)."""

from __future__ import annotations

import os
import time


def session_processes(sid: int) -> list:
    import psutil

    procs = []
    for p in psutil.process_iter():
        try:
            # A zombie is already dead: it only waits for its parent to read its exit status.
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                procs.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return procs


def kill_session(sid: int, timeout: float = 10.0) -> None:
    """SIGKILL every process of a session (start the child with `start_new_session=True`). vLLM's engine
    processes leave the driver's process group, so `os.killpg` alone would leave them running."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs = session_processes(sid)
        if not procs:
            return
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        time.sleep(0.1)
    raise RuntimeError(f"processes of session {sid} survived SIGKILL")
