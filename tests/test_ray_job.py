"""`distill run` as users run it: `ray job submit` to a Ray head on 127.0.0.1 with token auth.

The head is a real `ray start --head` (its own session, killed at the end: never `ray stop`, which would end every
Ray on the machine); jobs upload this repository as their working dir. Tiny model, small settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from distill.processes import kill_session

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def job_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"  # `distill` and `ray` of this environment, for the driver too
    return env


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory, free_port):
    """A Ray head on 127.0.0.1 with token auth; yields the job API address."""
    port, dashboard = free_port(), free_port()
    # Every listening port of the head is picked free: the defaults (e.g. the dashboard agent's 52365) are taken
    # when another Ray cluster runs on this machine, such as the session's own `ray_cluster`, and a head whose
    # agent cannot bind never accepts a job.
    ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "ray-client-server-port", "node-manager-port", "object-manager-port")]
    temp = tmp_path_factory.mktemp("ray-head")
    log = open(temp / "head.log", "wb")
    # A loaded 2-core machine can take over the default 60 s to bring the dashboard (the job API) up.
    head_env = {**job_env(), "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300"}
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=4",
         "--object-store-memory=400000000", "--include-dashboard=true", "--disable-usage-stats", *ports],
        stdout=log, stderr=subprocess.STDOUT, env=head_env, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            ok = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=job_env(),
                                capture_output=True, text=True)
            if ok.returncode == 0:
                break
            assert head.poll() is None, (temp / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, ok.stderr[-2000:]
            time.sleep(2)
        # Ready means a job with a working dir runs to the end: the job API answers before the head's agents
        # can take jobs and unpack packages.
        probe = temp / "probe"
        probe.mkdir()
        (probe / "probe.py").write_text("print('ready')\n")
        for attempt in range(3):
            done = subprocess.run(
                [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", f"probe-{attempt}",
                 "--working-dir", str(probe), "--", "python", "probe.py"],
                env=job_env(), capture_output=True, text=True)
            if done.returncode == 0:
                break
            time.sleep(5)
        else:
            pytest.fail(f"the Ray head never ran a probe job:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        yield address
    finally:
        kill_session(head.pid)
        head.wait()


def submit(address: str, config: Path, submission_id: str) -> None:
    runtime_env = {"excludes": [".venv/", ".git/", "runs/", "bench/results/", "**/__pycache__/"]}
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", submission_id, "--no-wait",
           "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env),
           "--", "distill", "run", "--config", str(config)]
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run(cmd, env=job_env(), capture_output=True, text=True)
        # A head that just started may answer the job API before its agent can take jobs: try again.
        if done.returncode == 0 or "No available agent" not in done.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert done.returncode == 0, done.stderr[-3000:]


def status(address: str, submission_id: str) -> str:
    done = subprocess.run([str(BIN / "ray"), "job", "status", "--address", address, submission_id],
                          env=job_env(), check=True, capture_output=True, text=True)
    # The CLI says "Status for job ...: RUNNING" while a job runs and "Job '...' succeeded" once it is over.
    out = (done.stdout + done.stderr).upper()
    for word in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING", "PENDING"):
        if word in out:
            return word
    raise AssertionError(out)


def logs(address: str, submission_id: str) -> str:
    done = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", address, submission_id],
                          env=job_env(), capture_output=True, text=True)
    return done.stdout + done.stderr  # the CLI prints the driver's log on either, depending on the version


def wait_for(address: str, submission_id: str, until: set[str], timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = status(address, submission_id)
        if state in until:
            return state
        time.sleep(3)
    raise AssertionError(f"{submission_id} still not {until}:\n{logs(address, submission_id)[-4000:]}")


def write_config(path: Path, output: Path, tiny_model: str, rows: list[dict], stages: list[str]) -> Path:
    source = path.parent / "queries.jsonl"
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    path.write_text(json.dumps({
        "output": str(output), "teacher": tiny_model, "student": tiny_model, "input": str(source),
        "stages": stages,
        "generate": {"rows_per_shard": 4, "flush_seconds": 1, "engine": {"batch_size": 4, "max_concurrent_batches": 1}},
        "train": {"per_device_batch_size": 4, "gradient_accumulation": 1, "max_steps": 6, "learning_rate": 1e-3,
                  "eval_every": 3, "checkpoint_every": 3, "lora": {"rank": 8}, "max_length": 512},
        "eval": {"limit": 6},
    }))
    return path


def sample_rows(n: int, step: int = 3) -> list[dict]:
    from distill.models import sample_data_path

    rows = [json.loads(line) for line in sample_data_path().open(encoding="utf-8")]
    return [{"id": r["id"], "text": r["text"], "label": r["label"]} for r in rows[::step][:n]]


def test_submitted_pipeline_succeeds_and_writes_every_stage(tmp_path, ray_head, tiny_model):
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", out, tiny_model, sample_rows(24), ["generate", "train", "eval"])
    submit(ray_head, config, "distill-full")
    assert wait_for(ray_head, "distill-full", {"SUCCEEDED", "FAILED", "STOPPED"}) == "SUCCEEDED", \
        logs(ray_head, "distill-full")[-4000:]

    manifest = json.loads((out / "generate" / "manifest.json").read_text())
    assert manifest["rows_in"] == 24 == manifest["rows_written"] + manifest["rows_rejected"]
    summary = json.loads((out / "train" / "train_summary.json").read_text())
    assert summary["complete"] and summary["steps"] == 6
    assert (out / "train" / "adapter" / "adapter_model.safetensors").is_file()
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["headline"]["agreement"] is not None
    run = json.loads((out / "run.json").read_text())
    assert run["complete"] and set(run["stages"]) == {"generate", "train", "eval"}
    assert run["stages"]["eval"]["report"] == str(out / "eval" / "report.html")
    assert (out / "eval" / "report.html").is_file()


def test_killed_job_resubmitted_finishes_with_each_id_once(tmp_path, ray_head, tiny_model):
    # The whole sample, eight times over under distinct ids: the tiny model labels ~100 rows/s on 2 cores, so
    # generation runs for well over a minute after its first shard, and the stop cannot miss it on a faster machine.
    rows = [{**r, "id": f"{r['id']}-{copy}"} for copy in range(8) for r in sample_rows(1299, step=1)]
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", out, tiny_model, rows, ["generate", "train"])
    submit(ray_head, config, "distill-killed")
    data_dir = out / "generate" / "data"
    deadline = time.monotonic() + 300
    checked = time.monotonic()
    while not (data_dir.exists() and list(data_dir.glob("*.parquet"))):
        assert time.monotonic() < deadline, logs(ray_head, "distill-killed")[-4000:]
        if time.monotonic() - checked > 10:  # the CLI takes seconds: ask it now and then, watch the folder often
            assert status(ray_head, "distill-killed") in {"PENDING", "RUNNING"}, logs(ray_head, "distill-killed")[-4000:]
            checked = time.monotonic()
        time.sleep(0.2)
    subprocess.run([str(BIN / "ray"), "job", "stop", "--address", ray_head, "distill-killed"], env=job_env(),
                   check=True, capture_output=True)
    assert wait_for(ray_head, "distill-killed", {"STOPPED", "FAILED", "SUCCEEDED"}) == "STOPPED"
    assert not (out / "generate" / "manifest.json").exists(), "the stop must land mid-generation"
    assert len(pq.read_table(data_dir)) < len(rows) / 2, "the stop must land mid-generation"

    submit(ray_head, config, "distill-resubmitted")
    assert wait_for(ray_head, "distill-resubmitted", {"SUCCEEDED", "FAILED", "STOPPED"}) == "SUCCEEDED", \
        logs(ray_head, "distill-resubmitted")[-4000:]
    data = pq.read_table(out / "generate" / "data")
    rejects = pq.read_table(out / "generate" / "rejects") if any((out / "generate" / "rejects").iterdir()) else None
    ids = data.column("id").to_pylist() + (rejects.column("id").to_pylist() if rejects is not None else [])
    assert max(Counter(ids).values()) == 1 and set(ids) == {r["id"] for r in rows}
    assert json.loads((out / "train" / "train_summary.json").read_text())["complete"]
