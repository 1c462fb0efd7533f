"""Object-store outputs: the storage helpers and a training run whose output lives in s3://, against a real S3
server (moto) on 127.0.0.1.

The server speaks the S3 protocol over loopback; nothing here talks to AWS. pyarrow finds it through
AWS_ENDPOINT_URL, which only the test's driver process has: Ray starts before the endpoint is set, so its workers
reach the bucket only through the filesystem objects the driver resolved and handed to them, as they would on
another node of a real cluster.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from distill.storage import (join, list_files, local_dir, read_columns, read_json, read_text, resolve, staged_dir,
                             write_json, write_table)

# Ray's worker processes keep the environment the cluster started with, and another test module may start it
# before any fixture here runs: the dummy credentials are set at import so that every worker has them (without
# credentials the AWS SDK would go looking for an instance-metadata service off this machine).
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_SESSION_TOKEN="testing",
                  AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")

BUCKET = "distill-test"


@pytest.fixture(scope="module")
def s3(ray_cluster, free_port) -> str:
    """A bucket on a local S3 server; returns its s3:// root. Depends on ray_cluster so that Ray is up first."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = pytest.MonkeyPatch()
    env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                      allow_bucket_creation=True).create_dir(BUCKET)
    yield f"s3://{BUCKET}"
    env.undo()
    server.stop()


def objects(uri: str) -> dict[str, tuple[int, int]]:
    """Every object under `uri`: path -> (size, modification time)."""
    fs, path = resolve(uri)
    return {f.path: (f.size, f.mtime_ns) for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
            if f.type == pafs.FileType.File}


# ----------------------------------------------------------------------------------------------------------------
def test_storage_helpers_round_trip_through_s3(s3, tmp_path):
    root = join(s3, "helpers")
    write_table(join(root, "t.parquet"), pa.table({"id": ["a", "b"]}))
    assert read_columns(join(root, "t.parquet"), ["id"]).column("id").to_pylist() == ["a", "b"]
    write_json(join(root, "j.json"), {"x": 1})
    assert read_json(join(root, "j.json")) == {"x": 1} and read_text(join(root, "missing")) is None

    folder = join(root, "folder")
    with staged_dir(folder) as staging:
        os.makedirs(os.path.join(staging, "sub"))
        for name in ("a.txt", "sub/b.txt"):
            with open(os.path.join(staging, name), "w") as f:
                f.write(name)
    with staged_dir(folder) as staging:  # a new version replaces the old one, stale files included
        with open(os.path.join(staging, "c.txt"), "w") as f:
            f.write("c")
    assert list_files(folder, suffixes=(".txt",)) == [join(folder, "c.txt")]
    with pytest.raises(RuntimeError):
        with staged_dir(folder) as staging:
            raise RuntimeError("a failed export leaves the folder as it was")
    assert list_files(folder, suffixes=(".txt",)) == [join(folder, "c.txt")]

    with local_dir(folder) as local:
        assert os.listdir(local) == ["c.txt"] and open(os.path.join(local, "c.txt")).read() == "c"
    assert not os.path.exists(local)  # the download is temporary
    with local_dir(str(tmp_path)) as local:  # a local folder is used in place
        assert local == str(tmp_path)


def test_metrics_log_rewrites_the_object_and_a_resumed_run_keeps_lines_up_to_its_checkpoint(s3):
    from distill.checkpoints import MetricsLog, read_metrics

    uri = join(s3, "metrics", "metrics.jsonl")
    fs, path = resolve(uri)
    log = MetricsLog(fs, path, active=True, resume_step=0)
    for step in (1, 2, 3):
        log.write({"step": step})
    assert read_metrics(uri) == []  # no append on an object store: nothing until a flush
    log.flush()
    log.write({"step": 4})
    assert [m["step"] for m in read_metrics(uri)] == [1, 2, 3]
    resumed = MetricsLog(fs, path, active=True, resume_step=2)
    assert [m["step"] for m in read_metrics(uri)] == [1, 2]
    resumed.write({"step": 3})
    resumed.flush()
    assert [m["step"] for m in read_metrics(uri)] == [1, 2, 3]
    MetricsLog(fs, path, active=False, resume_step=0).write({"step": 99})  # other ranks write nothing
    assert [m["step"] for m in read_metrics(uri)] == [1, 2, 3]


@pytest.fixture(scope="module")
def generated(tiny_generation) -> str:
    """Teacher data on local disk, the session's tiny-teacher generation (this cluster's workers have no S3
    endpoint: `distill run` into s3:// end to end runs on a two-node cluster whose nodes do,
    tests/test_cluster.py)."""
    return tiny_generation


@pytest.mark.timeout(300)
def test_training_into_s3_resumes_after_a_crash_and_after_a_lost_worker(generated, s3, tiny_model):
    """The driver-crash and worker-loss paths of test_train_ray, with OUT in the bucket: the rerun finds Ray
    Train's run and checkpoints there, rank 0 finds its metrics there and drops the lines past the checkpoint."""
    from distill.checkpoints import read_metrics
    from distill.train.config import TrainConfig
    from pipelines.train import main

    out = join(s3, "crash")
    crashing = TrainConfig(data=generated, output=out, student=tiny_model, workers=1,
                           per_device_batch_size=2, gradient_accumulation=1, max_steps=6, eval_every=2,
                           checkpoint_every=2, validation_limit=2, lora={"rank": 8, "alpha": 16},
                           fail_at_step=4, max_failures=0)
    with pytest.raises(Exception):
        main(crashing)
    assert read_json(join(out, "train_summary.json")) is None
    assert [m["step"] for m in read_metrics(join(out, "metrics.jsonl"))] == [1, 2]  # rewritten at step 2

    summary = main(crashing.model_copy(update={"fail_at_step": 6, "max_failures": 1}))
    assert summary["complete"] and summary["steps"] == 6 and summary["adapter_step"] in (2, 4, 6)
    for step in (4, 6):
        assert read_text(join(out, "_chaos", f"failed_at_step_{step}")) is not None
    metrics = read_metrics(join(out, "metrics.jsonl"))
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]  # no duplicated steps
    assert [m["step"] for m in metrics if "val_loss" in m] == [2, 4, 6]
    assert list_files(join(out, "adapter"), suffixes=(".safetensors",))
