"""The deploy/ files stay in step with the code: entrypoints exist, parameters match, no secret committed."""

import importlib
import inspect
import re
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_every_prefect_deployment_points_at_a_flow_that_takes_its_parameters():
    spec = yaml.safe_load((DEPLOY / "prefect.yaml").read_text())
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


def test_cluster_configs_keep_token_auth_on_and_commit_no_token():
    for name in ("ray-cluster.yaml", "kuberay-raycluster.yaml", "prefect.yaml", "Dockerfile"):
        text = (DEPLOY / name).read_text()
        assert "RAY_AUTH_MODE=disabled" not in text and "value: disabled" not in text
        # a literal token would be a long hex/base64 string assigned to RAY_AUTH_TOKEN
        assert not re.search(r"RAY_AUTH_TOKEN[=:]\s*['\"]?[A-Za-z0-9+/_-]{20,}", text), name
    for name in ("ray-cluster.yaml", "kuberay-raycluster.yaml"):
        assert "RAY_AUTH_MODE" in (DEPLOY / name).read_text()
    kuberay = list(yaml.safe_load_all((DEPLOY / "kuberay-raycluster.yaml").read_text()))
    groups = kuberay[0]["spec"]["workerGroupSpecs"]
    gpu = [g for g in groups if "nvidia.com/gpu" in str(g)]
    assert gpu, "the KubeRay manifest needs a GPU worker group"
