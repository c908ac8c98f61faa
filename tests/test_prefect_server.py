"""Against a real Prefect server, by configuration alone: PREFECT_API_URL is all `fermine run` needs."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
ALIGN_ONLY = {
    "name": "server-check", "pipeline": "align", "report": False,
    "labeled": {"format": "synthetic", "rows_per_shard": 32,
                "options": {"size": 32, "train_per_class": 3, "test_per_class": 1, "pool_size": 0}},
    "align": {"size": 32}, "ray": {"workers": 1, "num_cpus": 1},
}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prefect_server(tmp_path):
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "server-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    import httpx

    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the Prefect server did not come up within 120 s")
    yield api
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


def test_run_reports_to_a_configured_prefect_server(tmp_path, prefect_server):
    import httpx

    cfg = {**ALIGN_ONLY, "out": str(tmp_path / "run")}
    path = tmp_path / "align.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / "client-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_USAGE_STATS_ENABLED": "0", "TF_CPP_MIN_LOG_LEVEL": "3"}
    res = subprocess.run([str(BIN / "fermine"), "run", str(path)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    # The flow run, its stage task runs and their states are on that server (not a temporary one).
    runs = httpx.post(f"{prefect_server}/flow_runs/filter", json={}, timeout=10).json()
    assert [(r["name"] != "", r["state_type"]) for r in runs] == [(True, "COMPLETED")]
    flows = {f["id"]: f["name"] for f in httpx.post(f"{prefect_server}/flows/filter", json={}, timeout=10).json()}
    assert flows[runs[0]["flow_id"]] == "fermine-align"
    tasks = httpx.post(f"{prefect_server}/task_runs/filter", json={}, timeout=10).json()
    assert {t["name"] for t in tasks} >= {"ingest", "align"} and all(t["state_type"] == "COMPLETED" for t in tasks)
    ledger = [json.loads(x) for x in (tmp_path / "run" / "ledger.jsonl").read_text().splitlines()]
    assert {e["stage"] for e in ledger if e["event"] == "finished"} == {"ingest", "align"}
