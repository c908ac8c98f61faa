"""Integration: the full round on a local multi-node Ray cluster, kill-and-resume, through the CLI."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TINY = {
    "name": "tiny",
    "seed": 0,
    "pipeline": "round",
    "labeled": {"format": "synthetic", "rows_per_shard": 64,
                "options": {"size": 32, "train_per_class": 16, "test_per_class": 6, "pool_size": 60}},
    "cross": [{"format": "synthetic", "rows_per_shard": 64,
               "options": {"size": 32, "style": "b", "seed": 1, "train_per_class": 0, "test_per_class": 5, "pool_size": 0}}],
    "align": {"size": 32},
    # 6 epochs: the kill below lands after the first epoch with the next five still to go, never after the last.
    "teacher": {"arch": "small_cnn", "input_size": 32, "epochs": 6, "batch_size": 32},
    "attack": {"popsize": 8, "generations": 2},
    "pasm": {"rounds": 1},
    "mine": {"margin": 0.0, "splits": ["pool"]},
    "distill": {"outer_steps": 5},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp: Path) -> dict:
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: the drivers keep 127.0.0.1 too (see tests/ray_loopback.py).
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(tmp / "prefect"),
            "TF_CPP_MIN_LOG_LEVEL": "3"}


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """`ray start --head` (no GPU) plus one worker node declaring a GPU, both on 127.0.0.1, as separate processes."""
    import ray

    ray.shutdown()  # the in-process test instance, if any: the CLI runs below connect to this cluster
    tmp = tmp_path_factory.mktemp("cluster")
    env = _env(tmp)
    port = _free_port()
    ray_start = [sys.executable, str(Path(__file__).parent / "ray_loopback.py"), "start"]
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    try:
        subprocess.run([*ray_start, "--head", f"--port={port}", "--include-dashboard=false", *common],
                       env=env, check=True, capture_output=True)
        # A worker node refuses to start with Ray's loopback switch set; the wrapper alone keeps it on 127.0.0.1.
        worker_env = {k: v for k, v in env.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
        # The worker node declares one logical GPU (CPU torch): GPU stages must be placed there.
        subprocess.run([*ray_start, f"--address=127.0.0.1:{port}", "--num-gpus=1", *common], env=worker_env,
                       check=True, capture_output=True)
        yield f"127.0.0.1:{port}"
    finally:
        _stop_cluster(port)


def _cmdlines() -> dict[int, str]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                pass  # the process ended meanwhile
    return out


def _stop_cluster(port: int) -> None:
    """End this cluster's processes only (`ray stop` would end every Ray instance on the machine).

    Its processes all name the cluster's session folder, which the GCS on ``port`` gives away.
    """
    cmds = _cmdlines()
    sessions = {m.group(0) for c in cmds.values() if f"--gcs_server_port={port}" in c
                for m in [re.search(r"session_\d{4}-[\d_-]+_\d+", c)] if m}
    pids = [pid for pid, c in cmds.items() if any(s in c for s in sessions) and pid != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(3)


def _write_config(tmp: Path, address: str, out: Path) -> Path:
    cfg = {**TINY, "out": str(out), "ray": {"address": address, "workers": 2}}
    p = tmp / "tiny.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _ledger(out: Path) -> list[dict]:
    p = out / "ledger.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def test_full_round_on_multinode_cluster_then_kill_and_resume(tmp_path, ray_cluster):
    env = _env(tmp_path)
    out = tmp_path / "run"
    cfg = _write_config(tmp_path, ray_cluster, out)

    # (b) start the round, kill it in the middle of the teacher's training, rerun.
    console = tmp_path / "first-run.txt"
    with console.open("w") as sink:
        proc = subprocess.Popen([str(BIN / "fermine"), "run", str(cfg)], env=env, start_new_session=True,
                                stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    teacher_dir = None
    while time.time() < deadline and proc.poll() is None:
        started = [e for e in _ledger(out) if e["stage"] == "teacher" and e["event"] == "started"]
        if started:
            teacher_dir = Path(started[0]["uri"])
            if (teacher_dir / "last.pt").exists():
                break
        time.sleep(0.2)
    assert teacher_dir is not None and proc.poll() is None, \
        f"the run ended before it could be killed (exit {proc.poll()}):\n{console.read_text()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (teacher_dir / "_stage.json").exists()  # the killed stage does not look finished

    done = subprocess.run([str(BIN / "fermine"), "run", str(cfg)], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    events = _ledger(out)
    reused = {e["stage"] for e in events if e["event"] == "reused"}
    assert {"ingest", "align"} <= reused  # finished stages were not redone
    teacher_starts = [e for e in events if e["stage"] == "teacher" and e["event"] == "started"]
    assert len(teacher_starts) == 2 and (teacher_dir / "_stage.json").exists()
    hist = json.loads((teacher_dir / "metrics.json").read_text())
    assert hist.get("resumed_from_epoch", 0) >= 1  # the killed stage resumed, it did not start over

    # (a) the whole round ran on the cluster and produced its results table and report.
    summary = json.loads((out / "results.json").read_text())
    models = [r["model"] for r in summary["results"]]
    for m in ("teacher", "pasm-r1", "random-erasing", "vas", "das"):
        assert m in models
    assert (out / "report.html").exists()
    assert "teacher" in done.stdout and "report" in done.stdout

    # A third run reuses everything.
    again = subprocess.run([str(BIN / "fermine"), "run", str(cfg)], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    new = _ledger(out)[len(events):]
    assert new and all(e["event"] == "reused" for e in new)


COMPUTE = ("teacher", "student-", "retrain-", "distill", "centroids", "evaluate-", "cam", "erase-")


def _gpu_node(address: str, env: dict) -> str:
    """The id of the cluster's node with a GPU, asked by a separate driver (this process stays off Ray)."""
    code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(next(n['NodeID'] for n in ray.nodes() if n['Alive'] and n['Resources'].get('GPU')))")
    out = subprocess.run([sys.executable, "-c", code, address], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_gpu_stages_run_on_the_gpu_node_concurrently_and_match_a_local_sequential_run(tmp_path, ray_cluster):
    """The flow process only orchestrates: with gpus_per_worker 1, every training/distillation/evaluation
    stage runs on the worker node that has the (logical) GPU, independent stages overlap in time, and the
    numbers are those of the same round run locally, one stage at a time."""
    env = _env(tmp_path)
    tiny = {**TINY, "teacher": {**TINY["teacher"], "epochs": 2}, "report": False}
    runs = {}
    for name, ray_section in (("cluster", {"address": ray_cluster, "workers": 1, "gpus_per_worker": 1}),
                              ("local", {"workers": 1, "max_parallel": 1})):
        out = tmp_path / name
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump({**tiny, "out": str(out), "ray": ray_section}))
        done = subprocess.run([str(BIN / "fermine"), "run", str(p)], env=env, capture_output=True, text=True,
                              timeout=1200)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = out
    gpu_node = _gpu_node(ray_cluster, env)
    finished = [e for e in _ledger(runs["cluster"]) if e["event"] == "finished"]
    compute = [e for e in finished if e["stage"].startswith(COMPUTE)]
    assert len(compute) >= 10
    for e in compute:  # on the GPU node, in a Ray worker, never in the flow's process
        assert e["placement"]["node_id"] == gpu_node and e["placement"]["device"] != "driver", e["stage"]
    for e in finished:
        if not e["stage"].startswith(COMPUTE):
            assert e["placement"]["device"] == "driver", e["stage"]  # orchestration (actor stages, ingest)
    spans = sorted((e["started"], e["time"], e["stage"]) for e in finished)
    overlaps = [(a[2], b[2]) for i, a in enumerate(spans) for b in spans[i + 1:] if b[0] < a[1] - 0.05]
    assert overlaps, "no two stages ran at the same time"
    def numbers(out: Path) -> dict:  # every figure of every model and test set (paths aside)
        metrics = json.loads((out / "results.json").read_text())["metrics"]
        return {model: {ts: {k: v for k, v in m.items() if not k.endswith("_uri")} for ts, m in sets.items()}
                for model, sets in metrics.items()}

    assert numbers(runs["cluster"]) == numbers(runs["local"])
    status = subprocess.run([str(BIN / "fermine"), "status", str(runs["cluster"])], env=env, capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0 and "where" in status.stdout and "flow" in status.stdout
