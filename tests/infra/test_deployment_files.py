"""The deployment files in infra/ (KubeRay manifests, the `ray up` cluster YAML, the Dockerfiles) against what
KubeRay, Ray and the project expect. No cluster, no Docker: the files are parsed and checked field by field.

- KubeRay: apiVersion ray.io/v1, the kinds, the required fields and only the fields KubeRay's v1 types define
  (a misspelt field is silently ignored by `kubectl apply` with a lenient server), replica bounds, the Ray
  version, volumes that exist for every mount, Serve config and entrypoint that name real things.
- `ray up`: the cluster YAML against Ray's own JSON schema (ray/autoscaler/ray-schema.json) and Ray's
  validate_config after its defaults are filled in; the start commands bind the dashboard to loopback.
- Dockerfiles: every image a manifest names is built by one of them (LABEL looplm.image, the project version);
  torch is installed from PyTorch's CPU index before the project; Transformer Engine only in the CUDA image.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
DOCKERFILES = {"cpu": INFRA / "docker" / "Dockerfile.cpu", "cuda": INFRA / "docker" / "Dockerfile.cuda"}

# The fields of KubeRay's v1 API types (ray-operator/apis/ray/v1) that these manifests may use.
RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
    "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode", "submitterConfig",
    "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished",
}  # fmt: skip
RAYSERVICE_SPEC = {
    "deploymentUnhealthySecondThreshold", "excludeHeadPodFromServeSvc", "rayClusterConfig", "serveConfigV2",
    "serveService", "serviceUnhealthySecondThreshold", "upgradeStrategy",
}  # fmt: skip
CLUSTER_SPEC = {
    "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec",
    "headServiceAnnotations", "managedBy", "rayVersion", "suspend", "workerGroupSpecs",
}  # fmt: skip
HEAD_GROUP = {"enableIngress", "headService", "rayStartParams", "serviceType", "template"}
WORKER_GROUP = {
    "groupName", "idleTimeoutSeconds", "maxReplicas", "minReplicas", "numOfHosts", "rayStartParams", "replicas",
    "scaleStrategy", "suspend", "template",
}  # fmt: skip
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


# ---------------------------------------------------------------- helpers


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: comments dropped, backslash continuations joined."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, rest = pending.strip().partition(" ")
        instructions.append((keyword.upper(), " ".join(rest.split())))
        pending = ""
    assert not pending, f"{path}: a continuation line runs off the end"
    return instructions


def image_labels() -> dict[str, str]:
    """image reference -> the Dockerfile that builds it (its LABEL looplm.image)."""
    labels = {}
    for path in DOCKERFILES.values():
        steps = dockerfile(path)
        found = [m for kw, args in steps if kw == "LABEL" for m in re.findall(r'looplm\.image="([^"]+)"', args)]
        assert len(found) == 1, f"{path}: one LABEL looplm.image=... expected, found {found}"
        labels[found[0]] = path.name
    return labels


def manifests(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / "kuberay" / name).read_text()) if d is not None]


def manifest(name: str) -> dict:
    documents = manifests(name)
    assert len(documents) == 1, f"{name}: one YAML document expected"
    return documents[0]


def by_kind(name: str) -> dict[str, dict]:
    documents = manifests(name)
    kinds = {d["kind"]: d for d in documents}
    assert len(kinds) == len(documents), f"{name}: one document per kind expected"
    return kinds


def ray_pin() -> str:
    for dependency in PROJECT["dependencies"]:
        requirement = Requirement(dependency)
        if requirement.name == "ray":
            (spec,) = requirement.specifier
            assert spec.operator == "==", "ray is pinned exactly: cluster and client must run one version"
            return spec.version
    raise AssertionError("pyproject.toml does not depend on ray")


def pod_specs(cluster: dict) -> list[tuple[str, dict]]:
    groups = [("head", cluster["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    return [(name, group["template"]["spec"]) for name, group in groups]


def check_ray_cluster_spec(cluster: dict, where: str) -> None:
    assert set(cluster) <= CLUSTER_SPEC, f"{where}: unknown fields {set(cluster) - CLUSTER_SPEC}"
    assert cluster["rayVersion"] == ray_pin(), f"{where}: rayVersion must be pyproject's ray pin"
    head = cluster["headGroupSpec"]
    assert set(head) <= HEAD_GROUP, f"{where}.headGroupSpec: unknown fields {set(head) - HEAD_GROUP}"
    assert isinstance(head.get("rayStartParams", {}), dict)
    for group in cluster.get("workerGroupSpecs", []):
        assert set(group) <= WORKER_GROUP, f"{where}: worker group fields {set(group) - WORKER_GROUP}"
        assert DNS_LABEL.match(group["groupName"]), group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        # KubeRay passes rayStartParams as `ray start --key=value`: every value must be a string.
        assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values())
    assert all(isinstance(v, str) for v in head.get("rayStartParams", {}).values())
    images = image_labels()
    for name, spec in pod_specs(cluster):
        containers = spec["containers"]
        assert containers, f"{where}/{name}: no containers"
        # KubeRay runs Ray in the first container of each pod.
        image = containers[0]["image"]
        assert image in images, f"{where}/{name}: image {image} is built by no Dockerfile"
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for container in containers:
            mounts = {m["name"] for m in container.get("volumeMounts", [])}
            assert mounts <= volumes, f"{where}/{name}: mounts {mounts - volumes} have no volume"
            for port in container.get("ports", []):
                assert len(port["name"]) <= 15 and DNS_LABEL.match(port["name"]), port  # an IANA_SVC_NAME


def skip_unless_exists(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path.relative_to(REPO)} does not exist on this branch yet (added by the platform/serving work)")


# ---------------------------------------------------------------- KubeRay


def test_rayjob_runs_an_experiment_on_a_kuberay_cluster():
    job = manifest("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert DNS_LABEL.match(job["metadata"]["name"])
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC, f"unknown RayJob fields {set(spec) - RAYJOB_SPEC}"
    from ray.runtime_env import RuntimeEnv

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) <= RuntimeEnv.known_fields, "Ray would take an unknown key for a plugin's"
    RuntimeEnv(**runtime_env)  # Ray's own checks of the known fields' types
    assert spec["shutdownAfterJobFinishes"] is True  # the cluster goes when the job ends
    check_ray_cluster_spec(spec["rayClusterSpec"], "rayjob.spec.rayClusterSpec")
    submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
    assert submitter["image"] in image_labels()  # the submitter runs `ray job submit`: it needs ray


def test_rayjob_entrypoint_is_the_looplm_command_in_the_images_working_folder():
    entrypoint = manifest("rayjob.yaml")["spec"]["entrypoint"]
    cd, command = (shlex.split(part) for part in entrypoint.split("&&"))
    workdirs = {args for kw, args in dockerfile(DOCKERFILES["cpu"]) if kw == "WORKDIR"}
    assert cd[0] == "cd" and cd[1] in workdirs, "the entrypoint runs where the image keeps configs/"
    assert command[0] in PROJECT["scripts"], f"{command[0]} is not a console script of pyproject.toml"
    target = PROJECT["scripts"][command[0]]
    module, function = target.split(":")
    # The console script is looplm.platform.cli:main; `run` must be one of its subcommands.
    assert (module, function) == ("looplm.platform.cli", "main")
    assert command[1] == "run"
    copied = {args.split()[0] for kw, args in dockerfile(DOCKERFILES["cpu"]) if kw == "COPY"}
    assert Path(command[2]).parts[0] in copied, f"{command[2]} is not in the image"
    commands = importlib.import_module(module).COMMANDS
    if "run" not in commands:
        pytest.skip("`looplm run` is not on this branch yet (the executor's work)")
    skip_unless_exists(REPO / command[2])


def test_rayservice_serves_the_looplm_serve_app():
    service = manifest("rayservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    spec = service["spec"]
    assert set(spec) <= RAYSERVICE_SPEC, f"unknown RayService fields {set(spec) - RAYSERVICE_SPEC}"
    check_ray_cluster_spec(spec["rayClusterConfig"], "rayservice.spec.rayClusterConfig")
    serve = yaml.safe_load(spec["serveConfigV2"])
    from ray.serve.schema import ServeDeploySchema  # the schema `serve deploy` and KubeRay's config go through

    ServeDeploySchema.model_validate(serve)  # raises, naming the field, when the config is not one Serve takes
    (app,) = serve["applications"]
    module, _, attribute = app["import_path"].partition(":")
    assert module == "looplm.serving.app" and attribute, app["import_path"]
    serve_port = serve["http_options"]["port"]
    head_ports = {p["containerPort"] for p in pod_specs(spec["rayClusterConfig"])[0][1]["containers"][0]["ports"]}
    assert serve_port in head_ports
    serve_yaml = REPO / "configs" / "serve.yaml"
    skip_unless_exists(serve_yaml)
    local = yaml.safe_load(serve_yaml.read_text())
    assert {a["import_path"] for a in local["applications"]} == {app["import_path"]}


def test_networkpolicy_selects_the_pods_kuberay_labels():
    ray_pods, tracking = manifests("networkpolicy.yaml")
    policy = ray_pods
    assert (policy["apiVersion"], policy["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    dashboard = [r for r in policy["spec"]["ingress"] if {"port": 8265, "protocol": "TCP"} in r.get("ports", [])]
    assert dashboard and all("ports" in r or r["from"][0]["podSelector"] for r in policy["spec"]["ingress"])
    pod_labels = by_kind("mlflow.yaml")["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selected = tracking["spec"]["podSelector"]["matchLabels"]
    assert selected.items() <= pod_labels.items(), "the tracking policy selects the MLflow pod"


def test_mlflow_server_is_where_the_ray_pods_log_to():
    from mlflow.cli import server as mlflow_server_command

    documents = by_kind("mlflow.yaml")
    deployment, service = documents["Deployment"], documents["Service"]
    assert (deployment["apiVersion"], service["apiVersion"]) == ("apps/v1", "v1")
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert container["image"] in image_labels()
    assert container["command"][:2] == ["mlflow", "server"]
    # The arguments are options `mlflow server` knows (click raises NoSuchOption for one it does not).
    options = mlflow_server_command.make_context("server", container["command"][2:]).params
    (port,) = service["spec"]["ports"]
    assert options["port"] == port["targetPort"] == container["ports"][0]["containerPort"]
    assert options["host"] == "0.0.0.0"  # in a pod: the Service reaches the pod's interface
    url = f"http://{service['metadata']['name']}:{port['port']}"
    allowed = options["allowed_hosts"].split(",")
    assert service["metadata"]["name"] in allowed and f"{service['metadata']['name']}:{port['port']}" in allowed
    assert {"name": "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "value": "false"} in container["env"]
    job_env = yaml.safe_load(manifest("rayjob.yaml")["spec"]["runtimeEnvYAML"])["env_vars"]
    serve_apps = yaml.safe_load(manifest("rayservice.yaml")["spec"]["serveConfigV2"])["applications"]
    assert job_env["MLFLOW_TRACKING_URI"] == url
    assert all(app["runtime_env"]["env_vars"]["MLFLOW_TRACKING_URI"] == url for app in serve_apps)


def test_every_volume_claim_is_defined_and_the_shared_one_is_read_write_many():
    claims = {d["metadata"]["name"]: d for d in manifests("volumes.yaml")}
    assert all(d["kind"] == "PersistentVolumeClaim" for d in claims.values())
    pods = pod_specs(manifest("rayjob.yaml")["spec"]["rayClusterSpec"])
    pods.append(("mlflow", by_kind("mlflow.yaml")["Deployment"]["spec"]["template"]["spec"]))
    used = {
        v["persistentVolumeClaim"]["claimName"]
        for _, spec in pods
        for v in spec.get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    assert used and used <= set(claims), f"claims used but not defined: {used - set(claims)}"
    assert claims["looplm-runs"]["spec"]["accessModes"] == ["ReadWriteMany"]  # every Ray pod mounts it


# ---------------------------------------------------------------- ray up


def test_cluster_yaml_validates_against_rays_own_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "cluster" / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # what `ray up` runs: the schema and Ray's extra checks
    assert config["docker"]["image"] in image_labels()
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head, "the Jobs API runs any command: reach it through `ray dashboard`"
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        for flag in ("--object-manager-port", "--node-manager-port", "--min-worker-port", "--max-worker-port"):
            assert flag in start, f"{flag}: fixed ports, so that a firewall can admit exactly them"


def test_cluster_yaml_with_a_misspelt_field_is_refused():
    """The schema check above can fail: Ray's schema admits no unknown top-level field."""
    import jsonschema
    import ray.autoscaler

    config = yaml.safe_load((INFRA / "cluster" / "cluster.yaml").read_text())
    config["max_worker"] = config.pop("max_workers")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(config, schema)


# ---------------------------------------------------------------- Dockerfiles


def test_manifest_images_carry_the_project_version():
    for image in image_labels():
        name, tag = image.split(":")
        assert name == PROJECT["name"] and tag.startswith(PROJECT["version"] + "-"), image


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_dockerfile_installs_torch_before_the_project_and_copies_every_package(flavour):
    steps = dockerfile(DOCKERFILES[flavour])
    runs = [args for kw, args in steps if kw == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if re.search(r"pip install \S*torch==", r))
    project_at = next(i for i, r in enumerate(runs) if re.search(r'pip install (--\S+ )*"?\.(\[\w+\])?"?( |&|$)', r))
    assert torch_at < project_at, "torch first: the project's torch range is then satisfied by the wheel we chose"
    index = re.search(r"--index-url \"?(\$\{TORCH_INDEX\}|\S+)", runs[torch_at]).group(1)
    args = {m.group(1): m.group(2) for kw, a in steps if kw == "ARG" for m in [re.match(r"(\w+)=(\S+)", a)] if m}
    index = args.get("TORCH_INDEX", index) if "TORCH_INDEX" in index else index
    expected_index = (
        "https://download.pytorch.org/whl/cpu" if flavour == "cpu" else "https://download.pytorch.org/whl/cu"
    )
    assert index.startswith(expected_index), index
    torch_requirement = next(Requirement(d) for d in PROJECT["dependencies"] if Requirement(d).name == "torch")
    assert args["TORCH_VERSION"] in torch_requirement.specifier, "the image's torch must satisfy pyproject's range"
    copied = {a.split()[0] for kw, a in steps if kw == "COPY"}
    packages = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    assert packages | {"pyproject.toml", "configs"} <= copied, f"not copied: {packages - copied}"


def test_cpu_image_never_installs_transformer_engine_and_the_cuda_image_does():
    def mentions_te(path: Path) -> bool:
        text = " ".join(args for kw, args in dockerfile(path) if kw in ("RUN", "ENV", "ARG"))
        return bool(re.search(r"transformer[-_]engine|\[gpu\]", text, re.IGNORECASE))

    assert not mentions_te(DOCKERFILES["cpu"])
    assert mentions_te(DOCKERFILES["cuda"])
    gpu_extra = [Requirement(r).name for r in PROJECT["optional-dependencies"]["gpu"]]
    assert "transformer-engine" in gpu_extra  # what `.[gpu]` in the CUDA image installs
    base = next(args for kw, args in dockerfile(DOCKERFILES["cuda"]) if kw == "FROM")
    assert re.match(r"nvidia/cuda:[\d.]+-cudnn-devel-", base), "TE's torch extension builds against nvcc and cuDNN"


def test_cpu_image_python_satisfies_requires_python():
    from packaging.specifiers import SpecifierSet

    base = next(args for kw, args in dockerfile(DOCKERFILES["cpu"]) if kw == "FROM")
    version = re.match(r"python:(\d+\.\d+)", base).group(1)
    assert version in SpecifierSet(PROJECT["requires-python"])
