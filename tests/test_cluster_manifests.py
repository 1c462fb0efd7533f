"""Each cluster manifest, with the config it runs, works as deployed: every URI it and its config name is in one
store (one scheme, one bucket), its pods or nodes carry the credentials for that store (a GKE Workload Identity
ServiceAccount; an AWS IAM instance profile), and the Hugging Face cache sits on a node-local volume that all
processes of a node share, so model weights are downloaded once per node.

The configs are read the way `distill run` reads them: its own parser and RunConfig, with the command line's
overrides applied, and the stage configs the run derives from them. Offline: nothing is applied or started."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
RAYJOB = KUBERAY / "rayjob-pipeline.yaml"
RAYSERVICE = KUBERAY / "rayservice-serve.yaml"
LAUNCHER = CLUSTER / "aws-spot-gpu.yaml"
CLUSTER_README = CLUSTER / "README.md"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"

WORKLOAD_IDENTITY_ANNOTATION = "iam.gke.io/gcp-service-account"
# NAME@PROJECT.iam.gserviceaccount.com (PROJECT may still be the placeholder).
GOOGLE_SERVICE_ACCOUNT = re.compile(r"^[^@\s]+@[^@\s.]+\.iam\.gserviceaccount\.com$")
URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Fewer restarts than this and a handful of spot reclaims during a multi-hour training run fails the stage.
MIN_SPOT_TRAIN_RESTARTS = 3


# ---------------------------------------------------------------------------------------------------------------
# The checker: pure functions over loaded YAML, unit-tested at the bottom with today's mistakes
# ---------------------------------------------------------------------------------------------------------------

def find_uris(value: Any, where: str) -> list[tuple[str, str]]:
    """(where, uri) for every string in a nested dict/list that is a URI (scheme://...)."""
    if isinstance(value, dict):
        return [hit for k, v in value.items() for hit in find_uris(v, f"{where}.{k}")]
    if isinstance(value, (list, tuple)):
        return [hit for i, v in enumerate(value) for hit in find_uris(v, f"{where}[{i}]")]
    if isinstance(value, str) and URI.match(value):
        return [(where, value)]
    return []


def store_of(uri: str) -> str:
    """scheme://bucket of a URI: what must be the same for everything one deployment reads and writes."""
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.netloc}"


def mixed_store_problem(uris: list[tuple[str, str]]) -> str:
    """'' when every URI is in one store, else a message listing, per store, where each URI came from."""
    by_store: dict[str, list[str]] = {}
    for where, uri in uris:
        by_store.setdefault(store_of(uri), []).append(f"{where} = {uri}")
    if len(by_store) <= 1:
        return ""
    listing = "; ".join(f"{store}: {', '.join(places)}" for store, places in sorted(by_store.items()))
    return f"{len(by_store)} stores where one is expected ({listing})"


def run_command_uris(command: str, where: str) -> list[tuple[str, str]]:
    """Every URI a `distill run ...` command line reads or writes: its config file with the command line's
    overrides, through the CLI's own parser and RunConfig, plus the stage configs the run derives (generate/,
    train/, eval/ under the output, the adapter, extra data)."""
    from distill.config import config_from_args
    from pipelines.cli import build_parser
    from pipelines.run import RunConfig

    argv = shlex.split(command)
    assert argv[:2] == ["distill", "run"], f"{where}: {command!r} is not a `distill run` command"
    args = build_parser().parse_args(argv[1:])
    if args.config:
        args.config = str(REPO / args.config)  # the job's working_dir is the repository root
    config = config_from_args(RunConfig, args)
    return (find_uris(config.model_dump(), f"{where}:run")
            + find_uris(config.generate_config().model_dump(), f"{where}:generate")
            + find_uris(config.train_config().model_dump(), f"{where}:train")
            + find_uris(config.eval_config().model_dump(), f"{where}:eval"))


def run_train_config(command: str):
    from distill.config import config_from_args
    from pipelines.cli import build_parser
    from pipelines.run import RunConfig

    args = build_parser().parse_args(shlex.split(command)[1:])
    args.config = str(REPO / args.config)
    return config_from_args(RunConfig, args).train_config()


def kuberay_cluster_spec(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterSpec" if manifest["kind"] == "RayJob" else "rayClusterConfig"]


def pod_templates(manifest: dict) -> Iterator[tuple[str, dict, bool]]:
    """(group name, pod spec, runs GPU work) for the head and every worker group of a RayJob/RayService."""
    spec = kuberay_cluster_spec(manifest)
    yield "head", spec["headGroupSpec"]["template"]["spec"], False
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        gpus = any(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in pod["containers"])
        yield group["groupName"], pod, gpus


def manifest_uris(manifest: dict) -> list[tuple[str, str]]:
    """The URIs a KubeRay manifest uses: the RayJob's runtime env and the config its entrypoint runs; the
    RayService's Serve applications (runtime envs and builder args: adapters, rollout state)."""
    name = f"{manifest['kind']} {manifest['metadata']['name']}"
    if manifest["kind"] == "RayJob":
        spec = manifest["spec"]
        return (find_uris(yaml.safe_load(spec.get("runtimeEnvYAML") or "{}"), f"{name}:runtimeEnv")
                + run_command_uris(spec["entrypoint"], f"{name}:entrypoint"))
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    return find_uris(serve_config, f"{name}:serveConfigV2")


def service_account_problems(manifest: dict, service_accounts: dict[str, dict]) -> list[str]:
    """Every pod template runs as a ServiceAccount that exists and is bound to a Google service account."""
    problems = []
    name = f"{manifest['kind']} {manifest['metadata']['name']}"
    for group, pod, _ in pod_templates(manifest):
        account = pod.get("serviceAccountName")
        if not account:
            problems.append(f"{name} {group}: no serviceAccountName (the pod would run as `default`, which has no "
                            f"access to the bucket)")
            continue
        sa = service_accounts.get(account)
        if sa is None:
            problems.append(f"{name} {group}: ServiceAccount {account!r} is defined in no manifest under {KUBERAY}")
            continue
        bound = (sa.get("metadata", {}).get("annotations") or {}).get(WORKLOAD_IDENTITY_ANNOTATION, "")
        if not GOOGLE_SERVICE_ACCOUNT.match(bound):
            problems.append(f"{name} {group}: ServiceAccount {account!r} lacks the Workload Identity annotation "
                            f"{WORKLOAD_IDENTITY_ANNOTATION}: NAME@PROJECT.iam.gserviceaccount.com (has {bound!r})")
    return problems


def _env_value(container: dict, key: str) -> str | None:
    return next((e.get("value") for e in container.get("env", []) if e["name"] == key), None)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def kuberay_cache_problems(manifest: dict) -> list[str]:
    """HF_HOME is set for every Ray container (its env, or the runtime env of the work it runs), lies on a mounted
    volume, and on GPU workers (which load the weights) that volume is a hostPath: one directory per node that
    every pod on it shares and that outlives a pod. Both set must agree (the runtime env's wins for its job)."""
    problems = []
    name = f"{manifest['kind']} {manifest['metadata']['name']}"
    runtime_envs = []
    if manifest["kind"] == "RayJob":
        runtime_envs.append(yaml.safe_load(manifest["spec"].get("runtimeEnvYAML") or "{}"))
    else:
        runtime_envs += [app.get("runtime_env", {})
                         for app in yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"]]
    for group, pod, gpus in pod_templates(manifest):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            where = f"{name} {group}/{container['name']}"
            from_runtime_envs = {(env.get("env_vars") or {}).get("HF_HOME") for env in runtime_envs} - {None}
            hf_home = _env_value(container, "HF_HOME") or min(from_runtime_envs, default=None)
            if not hf_home:
                problems.append(f"{where}: HF_HOME is not set: downloads go to ~/.cache inside the container, "
                                f"one copy per pod, lost with it")
                continue
            if from_runtime_envs - {hf_home}:
                problems.append(f"{where}: HF_HOME {hf_home} but a runtime env sets {sorted(from_runtime_envs)}")
            mount = next((m for m in container.get("volumeMounts", []) if _under(hf_home, m["mountPath"])), None)
            if mount is None:
                problems.append(f"{where}: HF_HOME {hf_home} is on no mounted volume (the container's own layer)")
                continue
            volume = volumes.get(mount["name"], {})
            if gpus and "hostPath" not in volume:
                kind = next((k for k in volume if k != "name"), "no volume")
                problems.append(f"{where}: HF_HOME {hf_home} is on {mount['name']!r} ({kind}), not a hostPath: each "
                                f"pod downloads the model again instead of once per node")
            elif not gpus and not ({"hostPath", "emptyDir"} & set(volume)):
                problems.append(f"{where}: HF_HOME {hf_home} is on {mount['name']!r}, neither hostPath nor emptyDir")
    return problems


def launcher_credential_problems(launcher: dict) -> list[str]:
    problems = []
    for node_type, spec in launcher["available_node_types"].items():
        profile = spec.get("node_config", {}).get("IamInstanceProfile") or {}
        if not (profile.get("Arn") or profile.get("Name")):
            problems.append(f"{LAUNCHER.name} {node_type}: no node_config.IamInstanceProfile (Arn or Name): its "
                            f"processes cannot read or write the s3:// bucket")
    return problems


def _docker_option(options: list[str], flags: tuple[str, ...]) -> list[str]:
    values = []
    for option in options:
        words = shlex.split(option)
        for i, word in enumerate(words):
            for flag in flags:
                if word == flag and i + 1 < len(words):
                    values.append(words[i + 1])
                elif word.startswith(flag + "="):
                    values.append(word.split("=", 1)[1])
    return values


def launcher_cache_problems(launcher: dict, runtime_env: dict) -> list[str]:
    """HF_HOME is set for the whole container (so every process of the node has it) and lies on a volume mounted
    from the host's disk: one Ray node per machine, so that is one cache per node."""
    options = launcher.get("docker", {}).get("run_options", [])
    envs = dict(e.split("=", 1) for e in _docker_option(options, ("--env", "-e")) if "=" in e)
    hf_home = envs.get("HF_HOME")
    if not hf_home:
        return [f"{LAUNCHER.name}: docker.run_options set no HF_HOME (--env HF_HOME=...): engines and Train workers "
                f"started without cluster/runtime_env.yaml download into ~/.cache on the container layer"]
    problems = []
    mounts = [v.split(":")[:2] for v in _docker_option(options, ("--volume", "-v")) if ":" in v]
    if not any(_under(hf_home, inside) and host.startswith("/") for host, inside in mounts):
        problems.append(f"{LAUNCHER.name}: HF_HOME {hf_home} is on no --volume from the host's disk")
    other = (runtime_env.get("env_vars") or {}).get("HF_HOME")
    if other and other != hf_home:
        problems.append(f"{RUNTIME_ENV.name} sets HF_HOME {other}, the launcher's containers {hf_home}")
    return problems


def readme_section(text: str, heading: str) -> str:
    """The text of a `## heading` section of a Markdown file, continuation backslashes joined."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"{CLUSTER_README}: no section '## {heading}'"
    return re.sub(r"\\\n\s*", " ", match.group(1))


def aws_run_commands() -> list[str]:
    """The `distill run` commands cluster/README.md documents for the launcher cluster: the configs it runs."""
    section = readme_section(CLUSTER_README.read_text(), "AWS with the cluster launcher")
    return [m.strip() for m in re.findall(r"(distill run [^\n`]*)", section)]


# ---------------------------------------------------------------------------------------------------------------
# The manifests as they are
# ---------------------------------------------------------------------------------------------------------------

def load_documents(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


@pytest.fixture(scope="module")
def kuberay_documents() -> list[dict]:
    return [d for path in sorted(KUBERAY.glob("*.yaml")) for d in load_documents(path)]


@pytest.fixture(scope="module")
def service_accounts(kuberay_documents) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in kuberay_documents if d.get("kind") == "ServiceAccount"}


@pytest.fixture(scope="module")
def ray_manifests(kuberay_documents) -> list[dict]:
    manifests = [d for d in kuberay_documents if d.get("kind") in ("RayJob", "RayService", "RayCluster")]
    assert {m["kind"] for m in manifests} >= {"RayJob", "RayService"}
    return manifests


@pytest.fixture(scope="module")
def launcher() -> dict:
    (config,) = load_documents(LAUNCHER)
    return config


def test_each_kuberay_manifest_uses_one_gcs_bucket(ray_manifests):
    """GKE pods get credentials for Google Cloud Storage only: the input, the working_dir, every output and
    adapter, and the rollout state of one manifest (and of the config it runs) are in one gs:// bucket."""
    for manifest in ray_manifests:
        uris = manifest_uris(manifest)
        assert uris, f"{manifest['metadata']['name']}: no URI found (the walk is broken)"
        stores = sorted({store_of(uri) for _, uri in uris})
        print(f"{manifest['kind']} {manifest['metadata']['name']}: {len(uris)} URIs in {stores}")
        problem = mixed_store_problem(uris)
        assert not problem, f"{manifest['kind']} {manifest['metadata']['name']}: {problem}"
        not_gcs = [f"{where} = {uri}" for where, uri in uris if not uri.startswith("gs://")]
        assert not not_gcs, f"GKE manifest {manifest['metadata']['name']} names non-gs:// URIs: {not_gcs}"


def test_the_rayjob_passes_its_input_on_the_command_line(ray_manifests):
    """The config names s3:// for the AWS launcher: a GKE job must override the input as well as the output."""
    (job,) = [m for m in ray_manifests if m["kind"] == "RayJob"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert "--input" in argv and "--output" in argv, job["spec"]["entrypoint"]


def test_kuberay_pods_run_as_a_workload_identity_service_account(ray_manifests, service_accounts):
    problems = [p for m in ray_manifests for p in service_account_problems(m, service_accounts)]
    assert not problems, "\n".join(problems)


def test_kuberay_model_cache_is_node_local_and_shared(ray_manifests):
    problems = [p for m in ray_manifests for p in kuberay_cache_problems(m)]
    assert not problems, "\n".join(problems)


def test_spot_job_retries_training_from_checkpoints(ray_manifests):
    """The RayJob runs on spot GPUs: a reclaim during training restarts the worker group from its last
    checkpoint, and the config allows enough restarts for a multi-hour run."""
    (job,) = [m for m in ray_manifests if m["kind"] == "RayJob"]
    train = run_train_config(job["spec"]["entrypoint"])
    assert train.max_failures >= MIN_SPOT_TRAIN_RESTARTS, \
        f"{job['spec']['entrypoint']}: train.max_failures {train.max_failures} < {MIN_SPOT_TRAIN_RESTARTS}"


def test_launcher_jobs_use_one_s3_bucket():
    """What the launcher cluster runs (the commands cluster/README.md gives for it) reads and writes one s3://
    bucket: the store its instance profiles grant."""
    commands = aws_run_commands()
    assert commands, f"{CLUSTER_README}: the AWS section documents no `distill run` command"
    for command in commands:
        uris = run_command_uris(command, command)
        assert uris, f"{command}: its config names no URI: a local path is not shared by the nodes"
        print(f"{command}: {len(uris)} URIs in {sorted({store_of(u) for _, u in uris})}")
        problem = mixed_store_problem(uris)
        assert not problem, f"{command}: {problem}"
        not_s3 = [f"{where} = {uri}" for where, uri in uris if not uri.startswith("s3://")]
        assert not not_s3, f"{command} on the AWS launcher names non-s3:// URIs: {not_s3}"
        assert run_train_config(command).max_failures >= MIN_SPOT_TRAIN_RESTARTS, \
            f"{command}: trains on spot GPUs with too few restarts"


def test_launcher_nodes_have_an_instance_profile(launcher):
    problems = launcher_credential_problems(launcher)
    assert not problems, "\n".join(problems)


def test_launcher_model_cache_is_the_nodes_disk(launcher):
    with open(RUNTIME_ENV) as f:
        runtime_env = yaml.safe_load(f)
    problems = launcher_cache_problems(launcher, runtime_env)
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------------
# The checker catches the mistakes these manifests used to have
# ---------------------------------------------------------------------------------------------------------------

def test_checker_reports_the_rayjob_that_overrode_only_the_output():
    """The RayJob's old entrypoint: the output in gs://, the input still the config's s3://."""
    old = "distill run --config configs/qwen3-30b-a3b.yaml --output gs://distill-artifacts/runs/qwen3-30b-a3b"
    problem = mixed_store_problem(run_command_uris(old, "old entrypoint"))
    assert "s3://distill-artifacts" in problem and "gs://distill-artifacts" in problem
    assert "old entrypoint:run.input = s3://distill-artifacts/queries/language-id/" in problem


def test_checker_reports_a_second_bucket_of_the_same_scheme():
    uris = [("a", "gs://one/x"), ("b", "gs://one/y/z"), ("c", "gs://two/x")]
    assert "gs://two: c = gs://two/x" in mixed_store_problem(uris)
    assert mixed_store_problem(uris[:2]) == ""


def test_checker_reports_pods_without_workload_identity(ray_manifests, service_accounts):
    job = copy.deepcopy(next(m for m in ray_manifests if m["kind"] == "RayJob"))
    del kuberay_cluster_spec(job)["workerGroupSpecs"][0]["template"]["spec"]["serviceAccountName"]
    kuberay_cluster_spec(job)["headGroupSpec"]["template"]["spec"]["serviceAccountName"] = "missing"
    problems = service_account_problems(job, service_accounts)
    assert any("gpu-spot: no serviceAccountName" in p for p in problems)
    assert any("head: ServiceAccount 'missing' is defined in no manifest" in p for p in problems)
    unannotated = {name: {"metadata": {"name": name}} for name in service_accounts}
    original = next(m for m in ray_manifests if m["kind"] == "RayJob")
    assert any("lacks the Workload Identity annotation" in p for p in service_account_problems(original, unannotated))


def test_checker_reports_a_per_pod_model_cache(ray_manifests):
    """The old worker cache: an emptyDir (one download per pod), HF_HOME set only in the runtime env."""
    job = copy.deepcopy(next(m for m in ray_manifests if m["kind"] == "RayJob"))
    pod = kuberay_cluster_spec(job)["workerGroupSpecs"][0]["template"]["spec"]
    pod["volumes"] = [{"name": "cache", "emptyDir": {"sizeLimit": "500Gi"}} if v["name"] == "cache" else v
                      for v in pod["volumes"]]
    assert any("(emptyDir), not a hostPath" in p for p in kuberay_cache_problems(job))
    for container in pod["containers"]:
        container["env"] = [e for e in container.get("env", []) if e["name"] != "HF_HOME"]
    assert any("gpu-spot/ray-worker: HF_HOME is not set" in p for p in kuberay_cache_problems(job))
    job["spec"]["runtimeEnvYAML"] = "env_vars: {HF_HOME: /mnt/cache/huggingface}"
    assert any("gpu-spot/ray-worker: HF_HOME /mnt/cache/huggingface is on 'cache' (emptyDir), not a hostPath" in p
               for p in kuberay_cache_problems(job))
    job["spec"]["runtimeEnvYAML"] = "env_vars: {HF_HOME: /root/.cache/huggingface}"
    kuberay_cluster_spec(job)["headGroupSpec"]["template"]["spec"]["containers"][0]["env"] = [
        {"name": "HF_HOME", "value": "/mnt/cache/huggingface"}]
    assert any("head/ray-head: HF_HOME /mnt/cache/huggingface but a runtime env sets" in p
               for p in kuberay_cache_problems(job))


def test_checker_reports_launcher_nodes_without_credentials_or_cache(launcher):
    old = copy.deepcopy(launcher)
    for spec in old["available_node_types"].values():
        spec["node_config"].pop("IamInstanceProfile", None)
    old["docker"]["run_options"] = [o for o in old["docker"]["run_options"] if "HF_HOME" not in o]
    assert len(launcher_credential_problems(old)) == len(old["available_node_types"])
    assert "set no HF_HOME" in launcher_cache_problems(old, {})[0]
