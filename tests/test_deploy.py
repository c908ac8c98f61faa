"""The deploy/ files stay in step with the code: entrypoints exist, parameters match, no secret committed."""

import importlib
import inspect
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
IMAGE_ROOT = "/opt/fermine/"  # deploy/Dockerfile's WORKDIR: the repository's files live under it


def _prefect():
    return yaml.safe_load((DEPLOY / "prefect.yaml").read_text())


def _kuberay():
    docs = list(yaml.safe_load_all((DEPLOY / "kuberay-raycluster.yaml").read_text()))
    return next(d for d in docs if d and d.get("kind") == "RayCluster")


def _dockerfile_ray_pin() -> tuple[set[str], str]:
    m = re.search(r'"ray\[([a-z,]+)\]==([0-9][0-9.]*)"', (DEPLOY / "Dockerfile").read_text())
    assert m, "deploy/Dockerfile must pip install a pinned ray[...]==X.Y.Z"
    return set(m.group(1).split(",")), m.group(2)


def _readme_cluster_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Running on a Ray cluster")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def test_every_prefect_deployment_points_at_a_flow_that_takes_its_parameters():
    spec = _prefect()
    names = {d["name"] for d in spec["deployments"]}
    assert {"full-round", "pasm", "omni", "align", "evaluate", "progressive-teacher", "caf", "featloss"} <= names
    for d in spec["deployments"]:
        path, func = d["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), func)
        params = inspect.signature(flow.fn).parameters
        unknown = set(d.get("parameters", {})) - set(params)
        assert not unknown, f"{d['name']}: {flow.name} takes no {sorted(unknown)}"
        required = {n for n, p in params.items() if p.default is inspect.Parameter.empty}
        assert required <= set(d.get("parameters", {})), f"{d['name']}: missing {sorted(required)}"
        assert d["work_pool"]["job_variables"]["env"]["RAY_AUTH_MODE"] == "token"


def test_prefect_config_paths_are_files_the_image_ships():
    spec = _prefect()
    for step in spec.get("pull", []):
        wd = step.get("prefect.deployments.steps.set_working_directory")
        if wd:
            assert wd["directory"].rstrip("/") + "/" == IMAGE_ROOT
    for d in spec["deployments"]:
        path = d.get("parameters", {}).get("config_path")
        if path is None:
            continue
        if path.startswith(IMAGE_ROOT):
            assert (ROOT / path.removeprefix(IMAGE_ROOT)).is_file(), f"{d['name']}: the image has no {path}"
        else:
            assert path.startswith("/configs/"), f"{d['name']}: {path} is neither shipped nor under /configs"


def test_readme_lists_exactly_the_deployments_prefect_yaml_defines():
    section = _readme_cluster_section()
    spec = _prefect()
    listed = set(re.findall(r"^\| `([a-z0-9-]+)/([a-z0-9-]+)` \|", section, flags=re.M))
    defined = set()
    for d in spec["deployments"]:
        path, func = d["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), func)
        defined.add((flow.name, d["name"]))
        assert f"`{d['entrypoint']}`" in section, f"README does not give {d['name']}'s entrypoint"
    assert listed == defined, f"README table {sorted(listed)} != deploy/prefect.yaml {sorted(defined)}"
    for path in {d["parameters"]["config_path"] for d in spec["deployments"] if "config_path" in d.get("parameters", {})}:
        assert path in section, f"README does not say the deployments read {path}"


def test_cluster_configs_keep_token_auth_on_and_commit_no_token():
    for name in ("ray-cluster.yaml", "kuberay-raycluster.yaml", "prefect.yaml", "Dockerfile"):
        text = (DEPLOY / name).read_text()
        assert "RAY_AUTH_MODE=disabled" not in text and "value: disabled" not in text
        # a literal token would be a long hex/base64 string assigned to RAY_AUTH_TOKEN
        assert not re.search(r"RAY_AUTH_TOKEN[=:]\s*['\"]?[A-Za-z0-9+/_-]{20,}", text), name
    for name in ("ray-cluster.yaml", "kuberay-raycluster.yaml"):
        assert "RAY_AUTH_MODE" in (DEPLOY / name).read_text()
    groups = _kuberay()["spec"]["workerGroupSpecs"]
    gpu = [g for g in groups if "nvidia.com/gpu" in str(g)]
    assert gpu, "the KubeRay manifest needs a GPU worker group"


def _assert_token_env(env: list[dict], where: str) -> None:
    by_name = {e["name"]: e for e in env}
    assert by_name.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE=token"
    token = by_name.get("RAY_AUTH_TOKEN")
    assert token and "value" not in token, f"{where}: RAY_AUTH_TOKEN must come from a Secret, not a literal"
    assert token["valueFrom"]["secretKeyRef"]["key"] == "auth_token", where


def test_kuberay_lets_the_operator_write_ray_start_and_gives_every_container_the_token():
    spec = _kuberay()["spec"]
    head = spec["headGroupSpec"]
    pods = [("head", head)] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    for name, group in pods:
        assert isinstance(group.get("rayStartParams", {}), dict), name
        ray_container = group["template"]["spec"]["containers"][0]
        # KubeRay generates `ray start` from rayStartParams (+ --no-monitor, --block, metrics port)
        # unless the container overrides command/args.
        assert "command" not in ray_container and "args" not in ray_container, (
            f"{name}: let KubeRay write the ray start command (use rayStartParams)")
        _assert_token_env(ray_container.get("env", []), name)
    assert head["rayStartParams"].get("num-cpus") == "0"
    if spec.get("enableInTreeAutoscaling"):
        _assert_token_env(spec.get("autoscalerOptions", {}).get("env", []), "autoscaler sidecar")
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        if "nvidia.com/gpu" in str(group):
            assert int(limits["nvidia.com/gpu"]) >= 1, group["groupName"]


def test_image_pins_the_ray_the_manifests_name_and_has_the_cluster_extras():
    extras, version = _dockerfile_ray_pin()
    assert {"default", "data"} <= extras, "KubeRay probes and `ray up` need ray[default]"
    assert _kuberay()["spec"]["rayVersion"] == version
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    pip_lines = [line for line in dockerfile.splitlines() if re.match(r"\s*RUN pip install", line)]
    assert any("boto3" in line and "s3fs" in line and "ray[" in line for line in pip_lines), (
        "install ray, boto3 and s3fs in one pip resolve")
    # `ray up` starts the container as `docker run IMAGE bash`; an ENTRYPOINT would swallow that.
    assert not re.search(r"^\s*ENTRYPOINT", dockerfile, flags=re.M)
    assert "wget" in dockerfile, "KubeRay's exec probes run wget in the Ray container"
    # One image everywhere: the two cluster configs name the same one.
    ray_up = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    images = {c["image"] for g in [_kuberay()["spec"]["headGroupSpec"], *_kuberay()["spec"]["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"]}
    assert images == {ray_up["docker"]["image"]}
