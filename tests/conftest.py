"""Shared fixtures: one real local Ray cluster per test session, the prepared models, and clean-up of the shared
memory files vLLM leaves behind."""

from __future__ import annotations

import glob
import os
import socket

import pytest

from distill.local_models import build_tiny_model, default_model_dir, is_prepared, tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """A random-init Llama with a locally trained tokenizer (built once; seconds)."""
    return str(build_tiny_model(tiny_model_dir()))


@pytest.fixture(scope="session")
def tiny_thinking() -> str:
    """The tiny model with a chat template that opens the think block, as the seeds' Thinking-2507 teacher's does."""
    return str(build_tiny_model(tiny_model_dir(thinking=True), thinking=True))


@pytest.fixture(scope="session")
def tiny_moe() -> str:
    """A random-init Qwen3-MoE (4 experts, fused expert weights) with the tiny model's tokenizer."""
    return str(build_tiny_model(tiny_model_dir(moe=True), moe=True))


@pytest.fixture(scope="session")
def smollm2() -> str:
    """The real SmolLM2-135M-Instruct, prepared by `make setup` (`distill models prepare`)."""
    path = default_model_dir()
    if not is_prepared(path):
        pytest.fail(f"{path} is not prepared: run `make setup` (or `distill models prepare`)")
    return path


@pytest.fixture(scope="session")
def free_port():
    """A function returning a TCP port on 127.0.0.1 that is free right now."""
    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick


@pytest.fixture(scope="session")
def ray_cluster():
    """A real, private local Ray cluster (never an existing one) for the whole session."""
    import ray

    from distill.ray_init import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray(object_store_memory=512 * 1024**2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_generation(ray_cluster, tiny_model, tmp_path_factory) -> str:
    """Teacher data from the real generation pipeline (the tiny teacher, 24 rows, its top-5 logprobs kept for soft
    labels), generated once and read by the training tests of several modules. Read-only: a test that writes
    next to it uses its own folder."""
    from distill.generate.config import GenerateConfig
    from pipelines.generate import main as run_generation

    out = str(tmp_path_factory.mktemp("tiny-generation"))
    manifest = run_generation(GenerateConfig(teacher=tiny_model, output=out, limit=24, logprobs=5))
    assert manifest["rows_written"] >= 20, manifest
    return out


def _mapped_shared_memory() -> set[str]:
    """Shared-memory files some living process still maps (another test session's engines, for one)."""
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                mapped.update(line.split()[-1] for line in f if "/dev/shm/psm_" in line)
        except OSError:
            continue
    return mapped


@pytest.fixture(scope="session", autouse=True)
def _clean_shared_memory():
    """vLLM leaves /dev/shm/psm_* segments behind when its processes are killed; remove the ones this session
    created and nobody maps any more."""
    before = set(glob.glob("/dev/shm/psm_*"))
    yield
    in_use = _mapped_shared_memory()
    for path in set(glob.glob("/dev/shm/psm_*")) - before - in_use:
        try:
            os.remove(path)
        except OSError:
            pass
