"""`cluster/`: the KubeRay manifests, the cluster-launcher file and the image recipe, read as files (no
Kubernetes, cloud or Docker here). They must agree with each other, with the pipeline config they run,
with Ray's own schemas and with the installed Ray."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from rebase.config import PipelineConfig, ServeConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"


def _manifest(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _dockerfile() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (CLUSTER / "Dockerfile").read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _instruction(keyword: str) -> list[str]:
    return [line.split(None, 1)[1] for line in _dockerfile() if line.split(None, 1)[0] == keyword]


WORKDIR = _instruction("WORKDIR")[-1]  # where the image holds the project (and its jobs/)
IMAGE = _manifest("raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
CLAIM = _manifest("storage.yaml")["metadata"]["name"]


def _cluster_specs() -> dict[str, dict]:
    return {
        "raycluster": _manifest("raycluster.yaml")["spec"],
        "rayjob": _manifest("rayjob.yaml")["spec"]["rayClusterSpec"],
        "rayservice": _manifest("rayservice.yaml")["spec"]["rayClusterConfig"],
    }


def _gpus_per_pod(group: dict) -> int:
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return int(limits.get("nvidia.com/gpu", 0))


def _gpu_group(spec: dict) -> dict:
    [group] = [g for g in spec["workerGroupSpecs"] if _gpus_per_pod(g) > 0]
    return group


def _in_repo(image_path: str) -> Path:
    """The repository file that the image holds at `image_path`."""
    assert image_path.startswith(WORKDIR + "/"), image_path
    return ROOT / image_path.removeprefix(WORKDIR + "/")


def _serve_config() -> dict:
    return yaml.safe_load(_manifest("rayservice.yaml")["spec"]["serveConfigV2"])


def _entrypoint() -> list[str]:
    return shlex.split(_manifest("rayjob.yaml")["spec"]["entrypoint"])


def _pipeline() -> PipelineConfig:
    return load_config(PipelineConfig, ROOT / _entrypoint()[2])


def test_storage_is_shared_by_every_node():
    storage = _manifest("storage.yaml")
    assert storage["kind"] == "PersistentVolumeClaim" and storage["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("name", ["raycluster", "rayjob", "rayservice"])
def test_every_cluster_runs_the_image_on_the_installed_ray_with_data_mounted(name):
    spec = _cluster_specs()[name]
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no work scheduled on the head
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
        }
        [container] = pod["containers"]
        assert container["image"] == IMAGE
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert claims[mounts["/data"]] == CLAIM
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["REBASE_CACHE"] == "/data/cache" and env["HF_HOME"].startswith("/data/")


@pytest.mark.parametrize("name", ["raycluster", "rayjob", "rayservice"])
def test_each_worker_group_offers_ray_the_gpus_kubernetes_gives_it(name):
    spec = _cluster_specs()[name]
    for group in spec["workerGroupSpecs"]:
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert resources["limits"].get("nvidia.com/gpu") == resources["requests"].get("nvidia.com/gpu")
        assert int(group["rayStartParams"].get("num-gpus", 0)) == _gpus_per_pod(group)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    gpu = _gpu_group(spec)
    assert gpu["maxReplicas"] > gpu["minReplicas"]  # the autoscaler adds GPU pods
    assert _gpus_per_pod(gpu) == 1


def test_the_job_creates_the_long_lived_cluster_and_ends():
    job = _manifest("rayjob.yaml")["spec"]
    assert job["rayClusterSpec"] == _manifest("raycluster.yaml")["spec"]
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert runtime_env.pop("working_dir") == WORKDIR  # the entrypoint's relative paths resolve there
    assert runtime_env == yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())  # as every rebase job


def test_the_job_entrypoint_names_files_of_this_repository():
    python, script, config, flag, run_dir = _entrypoint()
    assert python == "python" and flag == "--run-dir" and run_dir.startswith("/data/")
    assert (ROOT / config).is_file()
    assert (ROOT / script).is_file(), f"{script} is the job entrypoint"
    assert (ROOT / _pipeline().task).is_file()


def test_the_pipeline_fits_the_gpu_group_and_ends():
    pipeline = _pipeline()
    run_dir = Path(_entrypoint()[4])
    gpu = _gpu_group(_manifest("rayjob.yaml")["spec"]["rayClusterSpec"])
    capacity = gpu["maxReplicas"] * _gpus_per_pod(gpu)
    datastore = pipeline.stage_config("datastore", run_dir)
    transform = pipeline.stage_config("transform", run_dir)
    train = pipeline.stage_config("train", run_dir)
    evaluate = pipeline.stage_config("evaluate", run_dir)
    assert str(datastore.out).startswith("/data/")
    assert transform.engine == "vllm" and train.device == "gpu"
    # One GPU per embedding actor, vLLM actor, Train worker and evaluation actor (rebase asks for one each).
    assert datastore.embed_concurrency[1] <= capacity
    assert transform.concurrency[1] <= capacity
    assert train.workers <= capacity
    assert evaluate.concurrency[1] <= capacity
    # rebase reads the cluster's GPUs when a stage starts: with no GPU pod up, vllm refuses to run.
    assert gpu["minReplicas"] >= 1
    assert "serve" not in pipeline.stages()  # the serve stage blocks until Ctrl-C; a RayJob must end


def test_the_service_config_passes_rays_schema_and_builds_the_app():
    from ray.serve.schema import ServeDeploySchema

    from rebase.serve import build_app

    schema = ServeDeploySchema.model_validate(_serve_config())  # what a RayService hands to Serve
    [application] = schema.applications
    assert application.import_path == "rebase.serve:build_app"
    config = ServeConfig.model_validate(application.args)
    assert config.model == [str(Path(_entrypoint()[4]) / "train")]  # the student the job leaves
    assert _in_repo(str(config.task)).is_file()
    app = build_app({**application.args, "task": str(_in_repo(str(config.task)))})
    # Serve refuses overrides of deployments the app does not have.
    assert {d.name for d in application.deployments} == {app._bound_deployment.name}


def test_the_service_replicas_fit_its_gpu_group():
    application = _serve_config()["applications"][0]
    [deployment] = application["deployments"]
    gpus_per_replica = deployment["ray_actor_options"]["num_gpus"]
    assert gpus_per_replica == 1
    gpu = _gpu_group(_manifest("rayservice.yaml")["spec"]["rayClusterConfig"])
    assert application["args"]["max_replicas"] * gpus_per_replica <= gpu["maxReplicas"] * _gpus_per_pod(gpu)
    assert 1 <= application["args"]["min_replicas"] <= application["args"]["max_replicas"]
    assert _serve_config()["http_options"]["host"] == "0.0.0.0"  # reachable through the Kubernetes service


def test_the_aws_launcher_file_passes_rays_cluster_schema():
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    launcher = _manifest("launcher-aws.yaml")
    validate_config(prepare_config(copy.deepcopy(launcher)))  # what `ray up` does before launching
    assert launcher["provider"]["type"] == "aws" and launcher["docker"]["image"] == IMAGE
    assert "--volume /data:/data" in launcher["docker"]["run_options"]
    types = launcher["available_node_types"]
    assert types[launcher["head_node_type"]]["resources"] == {"CPU": 0}
    [gpu] = [t for t in types.values() if t["resources"].get("GPU")]
    assert gpu["resources"]["GPU"] == 1 and gpu["min_workers"] >= 1
    pipeline = _pipeline()
    assert max(pipeline.train["workers"], pipeline.transform["concurrency"][1]) <= gpu["max_workers"]
    assert launcher["max_workers"] >= sum(t.get("max_workers", 0) for t in types.values())


def test_the_image_is_built_on_the_installed_ray_with_the_gpu_extras():
    arguments = dict(a.split("=", 1) for a in _instruction("ARG") if "=" in a)
    [base] = _instruction("FROM")
    assert base.replace("${RAY_VERSION}", arguments["RAY_VERSION"]) == f"rayproject/ray:{ray.__version__}-py311-gpu"
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert IMAGE.endswith(f"rebase:{version}-gpu")
    commands = " ".join(_instruction("RUN"))
    project = commands.index('pip install --no-cache-dir ".[builtin,gpu]"')
    # faiss-cpu comes with the base dependencies: it goes after, then faiss-gpu's files are put back.
    uninstall = commands.index("pip uninstall -y faiss-cpu")
    reinstall = commands.index("--force-reinstall", uninstall)
    assert project < uninstall < reinstall and "faiss-gpu-cu12" in commands[reinstall:]
    assert '"ray[data,train,serve,llm]==${RAY_VERSION}"' in commands  # pip keeps the image's Ray, with Serve LLM
    assert "REBASE_CACHE=/data/cache" in " ".join(_instruction("ENV"))
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "out", ".git"} <= set(ignored)  # not copied into the image or the job's working_dir
