"""The seeds' cluster shape on one machine: a Ray head that takes no work (`--num-cpus 0`, as the cluster launcher
starts it) and a worker node in its own mount namespace with a private /tmp, both on 127.0.0.1, outputs in a
local S3 server (moto). Jobs are submitted as users submit them (`ray job submit`, token auth); the driver runs
on the head, every task and actor on the worker. Anything a stage wrote to one node's disk and read by path on
another would fail here: the worker cannot see the head's /tmp (only the installation, this checkout with its
environment and the prepared models, is mounted back when it lies under /tmp, as a clone made there does).

Then a spot-style loss: the worker node is killed mid-generation, a new one joins, the job is submitted again and
finishes with every id exactly once; what was lost is bounded by `flush_seconds`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from distill.processes import kill_session
from distill.storage import join, list_files, read_columns, read_json, resolve, write_text

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "distill-cluster"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
               "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

pytestmark = pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")


def cluster_env(endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # The cluster's token, given to every node and client as a secret is: nothing read from or left in ~/.ray (a
    # fresh machine has none there, and a worker started beside a head must not race it to create one).
    env.update(CREDENTIALS, AWS_ENDPOINT_URL=endpoint, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               RAY_DASHBOARD_STARTUP_TIMEOUT_S="300")
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"  # `distill` and `ray` of this environment, for the driver too
    return env


def installation_under_tmp() -> list[Path]:
    """What a worker node needs from this machine's disk that lies under /tmp (a checkout cloned there, as CI
    may do, carries the environment): hidden by the node's private /tmp, it is mounted back. Outermost paths only."""
    from distill.local_models import models_home

    needed = {p.resolve() for p in (REPO, Path(sys.prefix), Path(sys.base_prefix), models_home()) if p.exists()}
    tmp = Path("/tmp").resolve()
    under = {p for p in needed if tmp in p.parents}
    return sorted(p for p in under if not any(q in p.parents for q in under))


def private_tmp_script() -> str:
    """Shell lines run inside the node's mount namespace: an empty tmpfs on /tmp, with the installation's paths
    under /tmp bound back through a holding tmpfs on /mnt (private to the namespace, like everything here)."""
    keep = installation_under_tmp()
    lines = ["mount -t tmpfs tmpfs /mnt"] if keep else []
    lines += [f"mkdir -p /mnt/keep{i} && mount --bind {shlex.quote(str(p))} /mnt/keep{i}" for i, p in enumerate(keep)]
    lines.append("mount -t tmpfs tmpfs /tmp")
    lines += [f"mkdir -p {shlex.quote(str(p))} && mount --bind /mnt/keep{i} {shlex.quote(str(p))}"
              for i, p in enumerate(keep)]
    return "; ".join(lines)


class Cluster:
    """A head (no CPUs) and worker nodes in private mount namespaces, each its own process session."""

    def __init__(self, root: Path, endpoint: str, free_port):
        self.root, self.endpoint, self.free_port = root, endpoint, free_port
        self.env = cluster_env(endpoint)
        self.port, dashboard = free_port(), free_port()
        self.address = f"http://127.0.0.1:{dashboard}"
        log = open(root / "head.log", "wb")
        self.head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={self.port}", "--node-ip-address=127.0.0.1",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=0",
             "--object-store-memory=300000000", "--include-dashboard=true", "--disable-usage-stats",
             *self._ports()], stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.workers: list[subprocess.Popen] = []

    def _ports(self) -> list[str]:
        # Every listener on a free port: two nodes share 127.0.0.1, and another Ray may run on this machine.
        return [f"--{name}={self.free_port()}" for name in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
            "runtime-env-agent-port", "node-manager-port", "object-manager-port")]

    def add_worker(self, cpus: int = 4) -> subprocess.Popen:
        """A worker node whose /tmp is a fresh tmpfs nobody else sees (its own Ray session files, downloads,
        vLLM's temporaries); the installation (this environment, the prepared models) is shared, like a machine
        image and a model store."""
        n = len(self.workers)
        start = " ".join(shlex.quote(a) for a in [
            str(BIN / "ray"), "start", f"--address=127.0.0.1:{self.port}", "--block", "--node-ip-address=127.0.0.1",
            f"--num-cpus={cpus}", "--object-store-memory=400000000", "--disable-usage-stats", *self._ports()])
        log = open(self.root / f"worker-{n}.log", "wb")
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "bash", "-c",
                                 f"set -e; {private_tmp_script()}; exec {start}"],
                                stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.workers.append(proc)
        return proc

    def worker_logs(self) -> str:
        return "".join(f"--- worker-{i}.log (exit {proc.poll()}) ---\n"
                       + (self.root / f"worker-{i}.log").read_text(errors="replace")[-2000:]
                       for i, proc in enumerate(self.workers))

    def ray(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True, check=check)

    def wait_ready(self, cpus: float, timeout: float = 300) -> None:
        """The job API answers and exactly one live worker node offers `cpus` CPUs (a killed node is gone)."""
        probe = ("import ray; ray.init(); nodes = [n for n in ray.nodes() if n['Alive'] and n['Resources'].get('CPU')]; "
                 "print('WORKERS', len(nodes), sum(n['Resources']['CPU'] for n in nodes))")
        deadline = time.monotonic() + timeout
        while True:
            done = self.ray("job", "submit", "--address", self.address, "--", "python", "-c", probe)
            found = re.findall(r"WORKERS (\d+) ([0-9.]+)", done.stdout + done.stderr)
            if found and int(found[-1][0]) == 1 and float(found[-1][1]) >= cpus:
                return
            assert self.head.poll() is None, (self.root / "head.log").read_text()[-3000:]
            assert self.workers[-1].poll() is None, self.worker_logs()
            assert time.monotonic() < deadline, (done.stdout + done.stderr)[-3000:] + self.worker_logs()
            time.sleep(3)

    def submit(self, config: Path, submission_id: str) -> None:
        runtime_env = {"excludes": [".venv/", ".git/", "runs/", "bench/results/", "**/__pycache__/"],
                       "env_vars": {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}}
        done = self.ray("job", "submit", "--address", self.address, "--submission-id", submission_id, "--no-wait",
                        "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env),
                        "--", "distill", "run", "--config", str(config))
        assert done.returncode == 0, done.stderr[-3000:]

    def status(self, submission_id: str) -> str:
        out = self.ray("job", "status", "--address", self.address, submission_id)
        text = (out.stdout + out.stderr).upper()
        for word in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING", "PENDING"):
            if word in text:
                return word
        raise AssertionError(text)

    def logs(self, submission_id: str) -> str:
        out = self.ray("job", "logs", "--address", self.address, submission_id)
        return out.stdout + out.stderr

    def wait_for(self, submission_id: str, until: set[str], timeout: float = 1200) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.status(submission_id)
            if state in until:
                return state
            time.sleep(5)
        raise AssertionError(f"{submission_id} still not {until}:\n{self.logs(submission_id)[-4000:]}")

    def close(self) -> None:
        for proc in [*self.workers, self.head]:
            kill_session(proc.pid)
            proc.wait()


@pytest.fixture(scope="module")
def s3(free_port) -> str:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="testing",
                      secret_key="testing", session_token="testing", region="us-east-1",
                      allow_bucket_creation=True).create_dir(BUCKET)
    env = pytest.MonkeyPatch()
    env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    for k, v in CREDENTIALS.items():
        env.setenv(k, v)
    yield f"http://127.0.0.1:{port}"
    env.undo()
    server.stop()


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory, free_port):
    cluster = Cluster(tmp_path_factory.mktemp("cluster"), s3, free_port)
    try:
        cluster.add_worker()
        cluster.wait_ready(cpus=4)
        yield cluster
    finally:
        cluster.close()


def sample_rows(n: int, copies: int = 1, step: int = 1) -> list[dict]:
    from distill.local_models import sample_data_path

    rows = [json.loads(line) for line in sample_data_path().open(encoding="utf-8")][::step][:n]
    return [{"id": f"{r['id']}-{c}", "text": r["text"], "label": r["label"]} for c in range(copies) for r in rows]


def write_run(tmp: Path, name: str, tiny_model: str, rows: list[dict], stages: list[str]) -> tuple[Path, str]:
    """Queries uploaded to the bucket, a run config whose every path is a URI; returns (config path, output)."""
    queries = f"s3://{BUCKET}/{name}/queries.jsonl"
    write_text(queries, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    output = f"s3://{BUCKET}/{name}/run"
    config = tmp / f"{name}.yaml"
    config.write_text(json.dumps({
        "output": output, "teacher": tiny_model, "student": tiny_model, "input": queries, "stages": stages,
        # Every log line in the job's log: the spot test reads the driver's timed progress lines, and a failure
        # shows the engines' and Ray's own lines.
        "console": "full",
        "generate": {"rows_per_shard": 1000, "flush_seconds": 2, "progress_seconds": 1,
                     "engine": {"batch_size": 8, "max_concurrent_batches": 2}},
        "train": {"workers": 2, "per_device_batch_size": 2, "gradient_accumulation": 1, "max_steps": 6, "epochs": 2,
                  "learning_rate": 1e-3, "eval_every": 3, "checkpoint_every": 3, "lora": {"rank": 8},
                  "max_length": 512, "validation_fraction": 0.2, "test_fraction": 0.2, "merge": True},
        "eval": {"limit": 4},
    }))
    return config, output


def objects(uri: str) -> dict[str, int]:
    fs, path = resolve(uri)
    return {f.path[len(path) + 1:]: f.mtime_ns for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
            if f.type == pafs.FileType.File}


def test_submitted_run_works_across_nodes_with_a_head_that_takes_no_work(cluster, tiny_model, tmp_path):
    config, out = write_run(tmp_path, "full", tiny_model, sample_rows(30, step=40), ["generate", "train", "eval"])
    cluster.submit(config, "full")
    assert cluster.wait_for("full", {"SUCCEEDED", "FAILED", "STOPPED"}) == "SUCCEEDED", cluster.logs("full")[-6000:]

    manifest = read_json(join(out, "generate", "manifest.json"))
    assert manifest["complete"] and manifest["rows_in"] == 30 == manifest["rows_written"] + manifest["rows_rejected"]
    assert manifest["engine"]["cpu_kind"] != "other"
    summary = read_json(join(out, "train", "train_summary.json"))
    assert summary["complete"] and summary["steps"] == 6 and summary["workers"] == 2
    stored = objects(join(out, "train"))
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "split.parquet", "metrics.jsonl",
                 "merged/config.json", "_tokens/train-rank000-of002.parquet", "_tokens/train-rank001-of002.parquet"):
        assert name in stored, name
    report = read_json(join(out, "eval", "report.json"))
    assert report["inputs"]["rows"] == 4 and report["inputs"]["student_serving"] == "merged"
    assert all(report["runs"][r]["errors"] == 0 and report["runs"][r]["requests"] == 4
               for r in ("teacher", "student", "base"))
    assert report["nll"]["rows_scored"] == 4
    # The engines served the merged student the training run wrote into the bucket: nothing by local path.
    assert report["config"]["student_serving"] == "auto"
    assert "report.html" in objects(join(out, "eval"))
    run = read_json(join(out, "run.json"))
    assert run["complete"] and set(run["stages"]) == {"generate", "train", "eval"}

    # Submitted again: every stage is found complete, nothing but run.json (and the attempt clocks) is rewritten.
    before = objects(out)
    cluster.submit(config, "full-again")
    assert cluster.wait_for("full-again", {"SUCCEEDED", "FAILED", "STOPPED"}) == "SUCCEEDED"
    after = objects(out)
    changed = {k for k in after if before.get(k) != after[k]}
    assert all(k == "run.json" or "/_attempts/" in f"/{k}" for k in changed), sorted(changed)


def durable_rows(out: str) -> int:
    data = join(out, "generate", "data")
    return read_columns(data, ["id"]).num_rows if list_files(data) else 0


def test_worker_node_lost_mid_generation_then_a_new_node_and_a_resubmit_finish_each_id_once(
        cluster, tiny_model, tmp_path):
    """Kill the only worker node while the teacher answers (a spot reclaim): answers the driver had received by
    `flush_seconds` before the kill are in durable shards; a new node joins, the job is submitted again, and every
    id ends up exactly once."""
    # 2,000 queries: the kill comes 3 s after the first 100 are durable and must land with queries still to do;
    # at 600 the tiny teacher had answered them all by then on 2 AVX-512 cores, and once at 1,000 (4 s wait).
    rows = sample_rows(1000, copies=2)
    config, out = write_run(tmp_path, "spot", tiny_model, rows, ["generate"])
    cluster.submit(config, "spot")
    deadline = time.monotonic() + 600
    while durable_rows(out) < 100:
        assert time.monotonic() < deadline, cluster.logs("spot")[-4000:]
        assert cluster.status("spot") in {"PENDING", "RUNNING"}, cluster.logs("spot")[-4000:]
        time.sleep(1)
    time.sleep(3)  # the first progress line that counted written rows is now at least 3 s old
    killed_at = time.time()
    lost_node = cluster.workers[-1]
    kill_session(lost_node.pid)
    lost_node.wait()
    time.sleep(3)  # anything still flushing from the dead node would have landed by now
    durable = durable_rows(out)
    assert 0 < durable < len(rows), "the loss must land mid-generation"

    # Bounded loss: every answer the driver had received flush_seconds (2 s) + 1 s before the kill is durable.
    received = [(time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000,
                 int(m.group(3)))
                for m in re.finditer(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d+) distill.progress INFO generate: "
                                     r"\d+/\d+ queries, .*?; written (\d+)", cluster.logs("spot"))]
    before_kill = [written for t, written in received if t <= killed_at - 3]
    assert before_kill, "the driver logged no progress before the kill"
    assert durable >= before_kill[-1]

    cluster.ray("job", "stop", "--address", cluster.address, "spot")
    assert cluster.wait_for("spot", {"STOPPED", "FAILED", "SUCCEEDED"}, timeout=120) != "SUCCEEDED"
    cluster.add_worker()
    cluster.wait_ready(cpus=4)
    cluster.submit(config, "spot-resubmitted")
    assert cluster.wait_for("spot-resubmitted", {"SUCCEEDED", "FAILED", "STOPPED"}) == "SUCCEEDED", \
        cluster.logs("spot-resubmitted")[-4000:]
    ids = read_columns(join(out, "generate", "data"), ["id"]).column("id").to_pylist()
    rejects = join(out, "generate", "rejects")
    ids += read_columns(rejects, ["id"]).column("id").to_pylist() if list_files(rejects) else []
    assert max(Counter(ids).values()) == 1 and set(ids) == {r["id"] for r in rows}
    assert read_json(join(out, "generate", "manifest.json"))["timings"]["total_s_all_attempts"] > 0
