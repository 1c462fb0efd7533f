"""The cluster configs under cluster/ are checked with Ray's own validators where Ray has one, and for the fields a
spot-GPU distill cluster depends on everywhere else. No Ray cluster is started; everything runs offline."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "aws-spot-gpu.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob-pipeline.yaml"
RAYSERVICE = CLUSTER / "kuberay" / "rayservice-serve.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"

# Node labels that mark spot / preemptible capacity, and labels that mark GPU nodes, on the common platforms.
SPOT_NODE_LABELS = {
    "cloud.google.com/gke-spot": "true",
    "cloud.google.com/gke-preemptible": "true",
    "karpenter.sh/capacity-type": "spot",
    "eks.amazonaws.com/capacityType": "SPOT",
    "kubernetes.azure.com/scalesetpriority": "spot",
}
GPU_NODE_LABELS = {"cloud.google.com/gke-accelerator", "nvidia.com/gpu.present", "nvidia.com/gpu.product",
                   "karpenter.k8s.aws/instance-gpu-name", "node.kubernetes.io/instance-type"}


def load(path: Path):
    with open(path) as f:
        return yaml.safe_load(f)


# ---------------------------------------------------------------------------------------------------------------
# Cluster launcher (AWS)
# ---------------------------------------------------------------------------------------------------------------

def ray_validate_launcher(config: dict) -> dict:
    """What `ray up` does before it talks to the cloud: merge the provider defaults, then validate against
    ray/autoscaler/ray-schema.json plus Ray's cross-field checks. (The AWS-specific step after it needs boto3 and
    credentials.)"""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def launcher() -> dict:
    return load(LAUNCHER)


def test_launcher_passes_ray_schema_validation(launcher):
    prepared = ray_validate_launcher(launcher)
    assert prepared["provider"]["type"] == "aws"
    assert set(prepared["available_node_types"]) == set(launcher["available_node_types"])


def _misspelled_top_level_key(c):
    c["idle_timeout_minute"] = c.pop("idle_timeout_minutes")


def _node_type_without_resources(c):
    del c["available_node_types"]["gpu_spot"]["resources"]


def _misspelled_node_type_key(c):
    c["available_node_types"]["gpu_spot"]["max_worker"] = c["available_node_types"]["gpu_spot"].pop("max_workers")


def _fractional_resource(c):
    c["available_node_types"]["gpu_spot"]["resources"]["GPU"] = 0.5


def _string_max_workers(c):
    c["max_workers"] = "8"


def _head_type_not_defined(c):
    c["head_node_type"] = "head_gpu"


def _min_workers_above_global_max(c):
    c["available_node_types"]["gpu_ondemand"]["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize("mutate, error", [
    (_misspelled_top_level_key, jsonschema.ValidationError),
    (_node_type_without_resources, jsonschema.ValidationError),
    (_misspelled_node_type_key, jsonschema.ValidationError),
    (_fractional_resource, jsonschema.ValidationError),
    (_string_max_workers, jsonschema.ValidationError),
    (_head_type_not_defined, ValueError),
    (_min_workers_above_global_max, ValueError),
], ids=lambda v: getattr(v, "__name__", "").lstrip("_"))
def test_launcher_validation_rejects_broken_configs(launcher, mutate, error):
    broken = copy.deepcopy(launcher)
    mutate(broken)
    with pytest.raises(error):
        ray_validate_launcher(broken)


def _gpu_types(config: dict) -> dict:
    return {name: t for name, t in config["available_node_types"].items() if t["resources"].get("GPU", 0) > 0}


def _is_spot(node_type: dict) -> bool:
    return node_type["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"


def test_launcher_head_is_on_demand_cpu_and_takes_no_work(launcher):
    head = launcher["available_node_types"][launcher["head_node_type"]]
    assert not _is_spot(head)
    assert head["resources"].get("CPU") == 0
    assert head["resources"].get("GPU", 0) == 0


def test_launcher_has_spot_gpu_group_and_on_demand_fallback(launcher):
    gpu = _gpu_types(launcher)
    spot = [t for t in gpu.values() if _is_spot(t)]
    on_demand = [t for t in gpu.values() if not _is_spot(t)]
    assert spot and on_demand, "need a spot GPU group and an on-demand GPU fallback group"
    for t in gpu.values():
        assert t.get("min_workers", 0) == 0, "GPU groups scale from zero"
        assert t.get("min_workers", 0) <= t["max_workers"]
    # The fallback must fit whatever was sized for spot, and the autoscaler must prefer spot.
    assert all(o["resources"] == s["resources"] for s in spot for o in on_demand)
    assert min(s.get("priority", 0) for s in spot) > max(o.get("priority", 0) for o in on_demand)
    assert sum(t.get("max_workers", 0) for t in launcher["available_node_types"].values()) <= launcher["max_workers"]


def test_launcher_installs_distill_and_enables_token_auth(launcher):
    assert launcher["docker"]["image"]
    assert launcher["idle_timeout_minutes"] > 0
    assert any("pip install" in cmd and "distill[gpu]" in cmd for cmd in launcher["setup_commands"])
    assert "." in launcher["file_mounts"].values(), "the working directory is mounted on the nodes"
    assert ".venv" in launcher["rsync_exclude"]
    for cmd in launcher["head_start_ray_commands"][-1:] + launcher["worker_start_ray_commands"][-1:]:
        assert "RAY_AUTH_MODE=token" in cmd


# ---------------------------------------------------------------------------------------------------------------
# KubeRay
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rayjob() -> dict:
    return load(RAYJOB)


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return load(RAYSERVICE)


def _cluster_spec(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterSpec" if manifest["kind"] == "RayJob" else "rayClusterConfig"]


def _containers(group: dict) -> list:
    return group["template"]["spec"]["containers"]


def _gpu_groups(spec: dict) -> list:
    return [g for g in spec["workerGroupSpecs"]
            if int(_containers(g)[0]["resources"].get("limits", {}).get("nvidia.com/gpu", 0)) > 0]


def test_manifest_kinds(rayjob, rayservice):
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    assert (rayservice["apiVersion"], rayservice["kind"]) == ("ray.io/v1", "RayService")


@pytest.mark.parametrize("path", [RAYJOB, RAYSERVICE], ids=lambda p: p.name)
def test_ray_autoscaler_accepts_the_cluster_spec(path):
    """The KubeRay autoscaler sidecar turns the RayCluster spec into an autoscaler config with this very function
    and validates it against the same schema; a spec it rejects would leave the cluster unable to scale."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    manifest = load(path)
    spec = _cluster_spec(manifest)
    derived = _derive_autoscaling_config_from_ray_cr(
        {"metadata": {"name": manifest["metadata"]["name"], "namespace": "default"}, "spec": spec})
    assert derived["available_node_types"]["headgroup"]["resources"].get("CPU") == 0
    for group in _gpu_groups(spec):
        node_type = derived["available_node_types"][group["groupName"]]
        assert node_type["resources"]["GPU"] == int(_containers(group)[0]["resources"]["limits"]["nvidia.com/gpu"])
        assert (node_type["min_workers"], node_type["max_workers"]) == (group["minReplicas"], group["maxReplicas"])


@pytest.mark.parametrize("path", [RAYJOB, RAYSERVICE], ids=lambda p: p.name)
def test_cluster_spec_groups(path):
    spec = _cluster_spec(load(path))
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"].startswith("2.")
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0"
    groups = [head, *spec["workerGroupSpecs"]]
    for group in groups:
        # KubeRay's CRD types rayStartParams as map[string]string: numbers would be rejected by the API server.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        for container in _containers(group):
            assert container.get("image"), f"{container['name']} has no image"
            requests = container.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= set(requests), f"{container['name']} lacks cpu/memory requests"
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
    gpu_groups = _gpu_groups(spec)
    assert gpu_groups, "no GPU worker group"
    for group in gpu_groups:
        pod = group["template"]["spec"]
        res = _containers(group)[0]["resources"]
        assert res["requests"].get("nvidia.com/gpu") == res["limits"]["nvidia.com/gpu"], "GPU request must equal limit"
        assert set(pod.get("nodeSelector", {})) & GPU_NODE_LABELS, "GPU workers must select GPU nodes"
        assert any(t.get("key") == "nvidia.com/gpu" and t.get("effect") == "NoSchedule"
                   for t in pod.get("tolerations", [])), "GPU workers must tolerate the nvidia.com/gpu taint"


def test_rayjob_runs_the_pipeline_on_spot_gpus(rayjob):
    spec = rayjob["spec"]
    entrypoint = spec["entrypoint"].split()
    assert entrypoint[:2] == ["distill", "run"]
    assert entrypoint[entrypoint.index("--config") + 1] == "configs/qwen3-30b-a3b.yaml"
    output = entrypoint[entrypoint.index("--output") + 1]
    assert output.startswith(("s3://", "gs://")), "outputs must go to shared storage every node can reach"
    assert spec["shutdownAfterJobFinishes"] is True

    from ray.runtime_env import RuntimeEnv

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)  # Ray's own checks, e.g. a remote working_dir must be an archive URI
    assert runtime_env["working_dir"].startswith(("s3://", "gs://", "https://"))

    cluster = spec["rayClusterSpec"]
    spot_groups = []
    for group in _gpu_groups(cluster):
        pod = group["template"]["spec"]
        selector = pod.get("nodeSelector", {})
        spot_keys = {k for k, v in SPOT_NODE_LABELS.items() if selector.get(k) == v}
        if spot_keys:
            spot_groups.append(group)
            assert any(t.get("key") in spot_keys for t in pod.get("tolerations", [])), "spot taint not tolerated"
    assert spot_groups, "the pipeline's GPU workers run on spot nodes"
    head_affinity = yaml.safe_dump(cluster["headGroupSpec"]["template"]["spec"].get("affinity", {}))
    assert "DoesNotExist" in head_affinity and any(k in head_affinity for k in SPOT_NODE_LABELS), \
        "the head must stay off spot nodes"


def _serve_app(rayservice: dict) -> dict:
    (app,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    return app


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydantic deprecations inside ray.serve, not ours
def test_rayservice_serves_the_distill_app(rayservice):
    from ray.serve.schema import ServeDeploySchema

    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    app = _serve_app(rayservice)
    assert app["name"] == "distill"
    assert app["import_path"] == "serve.app:build_app"
    assert app["route_prefix"] == "/"
    # The builder's own config model: a misspelled or misplaced field fails here, not at deploy time.
    from serve.config import ServeConfig

    args = ServeConfig.model_validate(app["args"])
    assert args.teacher.model and args.student.model and args.task
    assert args.student.adapters, "the student is served with its trained LoRA adapter"
    assert args.teacher.engine.device == args.student.engine.device == "gpu"
    head_ports = {p["containerPort"] for p in _containers(rayservice["spec"]["rayClusterConfig"]["headGroupSpec"])[0]["ports"]}
    assert 8000 in head_ports, "the Serve HTTP proxy port must be exposed on the head"
    # A rollout that outlives the RayCluster: an upgrade that replaces the cluster keeps the share and rollbacks.
    assert args.rollout.state_uri.startswith(("gs://", "s3://"))
    # The build task that reads $DISTILL_API_KEY may run on any node.
    spec = rayservice["spec"]["rayClusterConfig"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        env = {e["name"]: e for e in _containers(group)[0].get("env", [])}
        assert "secretKeyRef" in env["DISTILL_API_KEY"]["valueFrom"], group.get("groupName", "head")


def test_rayservice_serves_what_the_pipeline_job_trains(rayjob, rayservice):
    """The RayJob trains with a config; the RayService must serve that config's task, teacher and student, with
    the adapter the job writes (its --output, train/adapter), named after the task."""
    from distill.storage import join
    from distill.tasks import load_task
    from serve.config import ServeConfig

    entrypoint = rayjob["spec"]["entrypoint"].split()
    run_config = load(REPO / entrypoint[entrypoint.index("--config") + 1])
    output = entrypoint[entrypoint.index("--output") + 1]
    args = ServeConfig.model_validate(_serve_app(rayservice)["args"])
    assert args.task == run_config["task"]
    assert (args.teacher.model, args.student.model) == (run_config["teacher"], run_config["student"])
    task = load_task(str(REPO / args.task))
    assert args.student.adapters == {task.name: join(output, "train", "adapter")}
    # Contexts at least as long as the ones the pipeline generated and trained with.
    assert args.teacher.engine.max_model_len >= run_config["generate"]["engine"]["max_model_len"]
    assert args.student.engine.max_model_len >= run_config["train"]["max_length"]
    # The thinking teacher's arm holds the task's reasoning and answer budgets beside a ~1.5k-token prompt and a query.
    assert task.teacher.reasoning_tokens > 0
    assert args.teacher.engine.max_model_len >= task.teacher_budget() + 2048


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_rayservice_builds_through_serves_own_builder(rayservice, tmp_path, monkeypatch):
    """What `serve run` and KubeRay do with import_path and args: import the builder and hand it the args through
    Serve's own call. The adapter's bucket cannot be reached here, so a local adapter folder stands in for it."""
    from ray._common.utils import import_attr
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from serve.config import ServeConfig

    app = _serve_app(rayservice)
    args = copy.deepcopy(app["args"])
    (name, uri), = args["student"]["adapters"].items()
    (tmp_path / "adapter_config.json").write_text('{"r": 32}')
    args["student"]["adapters"][name] = str(tmp_path)
    monkeypatch.chdir(REPO)  # KubeRay's working_dir: the repository
    monkeypatch.setenv("DISTILL_API_KEY", "from-the-secret")

    built = call_user_app_builder_with_args_if_necessary(import_attr(app["import_path"]), args)
    assert isinstance(built, Application)
    gateway = built._bound_deployment
    config = ServeConfig.model_validate(gateway.init_args[0])
    assert gateway.name == "gateway" and config.api_key == "from-the-secret"
    assert config.teacher.model == args["teacher"]["model"] and config.student.adapters == {name: str(tmp_path)}
    assert config.task == str(REPO / args["task"]) and config.rollout.state_uri == args["rollout"]["state_uri"]
    for arm, bound in (("teacher", gateway.init_args[1]), ("student", gateway.init_args[2])):
        deployment = bound._bound_deployment
        assert deployment.name == arm
        assert deployment.init_args[0] == arm and deployment.init_args[3] == "gpu"
        # Tensor parallel 2: one placement group per replica, a CPU bundle and one bundle per GPU, on one node.
        assert deployment._replica_config.placement_group_bundles == [{"CPU": 1}, {"GPU": 1}, {"GPU": 1}]
    bad = copy.deepcopy(args)
    bad["student"]["adapter"] = bad["student"].pop("adapters")
    with pytest.raises(Exception, match="student.adapter"):
        call_user_app_builder_with_args_if_necessary(import_attr(app["import_path"]), bad)


# ---------------------------------------------------------------------------------------------------------------
# runtime_env for `ray job submit`
# ---------------------------------------------------------------------------------------------------------------

def test_runtime_env_is_valid_and_keeps_the_upload_small():
    from ray._private.runtime_env.packaging import _get_excludes
    from ray.runtime_env import RuntimeEnv

    runtime_env = load(RUNTIME_ENV)
    RuntimeEnv(**runtime_env)
    assert "working_dir" not in runtime_env, "the working dir comes from `--working-dir .`"
    # Ray's own matcher for `excludes`, applied to paths that must never be uploaded and ones that must be.
    excluded = _get_excludes(REPO, runtime_env["excludes"])
    for path in [".venv/lib/python3.11/site-packages/torch/__init__.py", "runs/demo/generate/part-0.parquet",
                 "models/SmolLM2/model.safetensors", "distill/__pycache__/cli.cpython-311.pyc"]:
        assert excluded(REPO / path), f"{path} would be uploaded"
    for path in ["pipelines/cli.py", "pipelines/generate.py", "serve/__init__.py", "pyproject.toml"]:
        assert not excluded(REPO / path), f"{path} would be left out"
