"""Data-parallel training (``workers: N``): the engine's batch slicing and gradient averaging, and Ray Train.

The engine-level tests run two gloo processes on this machine without Ray; the Ray Train tests (slow)
train the supervised method on 2 CPU workers and kill one mid-run.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from storage.ingest import write_image_table
from storage.synthetic import SyntheticConfig, generate
from tasks.engine import Method, Schedule, StepContext, build_optimizer, fit
from tasks.engine.distributed import World, shard_batch
from tasks.engine.seeding import ORDER
from tasks.train import TrainConfig, train


def test_shard_batch_partitions_every_tensor_of_a_batch():
    x, y = torch.arange(10), torch.arange(5)
    parts = [shard_batch({"x": x, "pair": (y, "tag")}, World(r, 3)) for r in range(3)]
    assert torch.cat([p["x"] for p in parts]).tolist() == x.tolist()
    assert torch.cat([p["pair"][0] for p in parts]).tolist() == y.tolist()
    assert all(p["pair"][1] == "tag" for p in parts)


class Regression(Method):
    """y = Xw on 3 batches of 12 rows an epoch; the loss is a mean, so an update is the batch's whatever the
    worker count."""

    name = "regression"
    data_parallel = True
    norm = False

    def setup(self, ctx: StepContext) -> None:
        mid = nn.BatchNorm1d(4) if self.norm else nn.Tanh()
        self.net = ctx.prepare(nn.Sequential(nn.Linear(4, 4), mid, nn.Linear(4, 1)))
        self.optimizers = [build_optimizer("sgd", self.net.parameters(), 0.1, momentum=0.5)]

    def steps_per_epoch(self) -> int:
        return 3

    def batches(self, epoch: int, ctx: StepContext):
        g = ctx.generator(ORDER)
        w = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
        for _ in range(3):
            x = torch.randn(12, 4, generator=g)
            yield x, x @ w

    def training_step(self, batch, ctx: StepContext):
        x, y = batch
        return {"loss": ((self.net(x) - y) ** 2).mean(), "samples": len(x)}

    def state_dict(self):
        return {"net": self.net.state_dict()}

    def load_state_dict(self, state):
        self.net.load_state_dict(state["net"])

    def export(self, ctx: StepContext):
        return self.net, {"model": {"builder": "test_engine:line_from_meta"}, "num_classes": 1, "classes": None,
                          "task": "regression"}


class NormedRegression(Regression):
    norm = True


class PerSample(Regression):
    name = "per_sample"
    data_parallel = False


def _fit_worker(rank: int, size: int, port: int, out: str, method_cls: type, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        method = method_cls()
        res = fit(method, out, config={"lr": 0.1}, inputs={}, epochs=3, schedule=Schedule("constant"),
                  device="cpu", seed=5)
        weights = {k: v.tolist() for k, v in method.net.state_dict().items()}
        with open(f"{result}.{rank}", "w") as f:
            json.dump({"loss": res.metrics["loss"], "weights": weights, "files": sorted(os.listdir(out))}, f)
    except ValueError as e:
        with open(f"{result}.{rank}", "w") as f:
            json.dump({"error": str(e)}, f)
    finally:
        dist.barrier()  # worker 0 writes the checkpoint last: no worker leaves the group before it is done
        dist.destroy_process_group()


def _spawn(tmp_path, method_cls, size: int, port: int) -> list[dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    out, result = str(tmp_path / f"run{size}"), str(tmp_path / f"result{size}")
    mp.start_processes(_fit_worker, args=(size, port, out, method_cls, result), nprocs=size, start_method="spawn")
    return [json.loads(open(f"{result}.{r}").read()) for r in range(size)]


def _weights(r: dict) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in r["weights"].items()}


def test_two_workers_take_the_updates_of_one(tmp_path):
    one, = _spawn(tmp_path / "a", Regression, 1, 29631)
    two = _spawn(tmp_path / "b", Regression, 2, 29632)
    # Without batch norm the mean loss over two half batches, gradients averaged, is the whole batch's:
    # 9 updates later both workers hold one worker's weights, and the epoch's loss is the whole batch's.
    for k, w in _weights(one).items():
        assert torch.allclose(w, _weights(two[0])[k], atol=1e-5), k
        assert torch.allclose(w, _weights(two[1])[k], atol=1e-5), k
    assert one["loss"] == pytest.approx(two[0]["loss"], rel=1e-4)
    assert "model.json" in two[0]["files"]


def test_workers_hold_the_same_batch_norm_statistics(tmp_path):
    two = _spawn(tmp_path, NormedRegression, 2, 29634)
    a, b = _weights(two[0]), _weights(two[1])
    assert "1.running_var" in a
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_a_method_that_cannot_split_its_batches_is_refused(tmp_path):
    res = _spawn(tmp_path, PerSample, 2, 29633)
    assert all("does not train data-parallel" in r["error"] for r in res)


def test_only_data_parallel_stages_take_workers(tmp_path):
    from flows.config import RaySection
    from flows.placement import RayPlacer
    from flows.prefect_tasks import stage
    from flows.stage import Run
    from flows.steps import train as train_stage

    def plain(out: str) -> None:
        raise AssertionError("must not run")

    from tasks.caf.method import CAFConfig

    placed = Run(str(tmp_path / "run"), placer=RayPlacer(RaySection()))
    with pytest.raises(ValueError, match="this stage trains on one worker"):
        stage(placed, "caf.train-caf", CAFConfig(workers=2), {}, plain, compute=True)
    assert train_stage(TrainConfig(workers=2), ["t"]).workers == 2
    with pytest.raises(ValueError, match="ray.place_compute: true"):
        stage(Run(str(tmp_path / "run")), "teacher", {"train": 1}, {}, train_stage(TrainConfig(workers=2), ["t"]),
              compute=True)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        TrainConfig(workers=0)


# -- Ray Train (slow): the supervised method on 2 CPU workers


def _table(path) -> str:
    cfg = SyntheticConfig(seed=11, size=40, train_per_class=100, val_per_class=0, test_per_class=40, pool_size=0)
    write_image_table(generate(cfg), str(path), stage="test", config={}, rows_per_shard=128)
    return str(path)


RECIPE = dict(input_size=40, batch_size=32, lr=0.05, epochs=12, lr_step=9, seed=2, num_workers=0, data="memory")


def _accuracy(ckpt: str, table: str) -> float:
    from tasks.evaluate import evaluate

    return evaluate(ckpt, table, splits=("test",)).accuracy


def _train_fn(cfg: TrainConfig, table: str):
    def fn(out: str) -> None:
        train(cfg, [table], out)

    return fn


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_train_two_workers_match_one_and_survive_a_killed_worker(tmp_path, ray_local):
    from workers.placement import Resources
    from workers.train import run_data_parallel

    table = _table(tmp_path / "faces")
    cfg = TrainConfig(**RECIPE)
    torch.set_num_threads(1)
    train(cfg, [table], str(tmp_path / "one"))
    acc_one = _accuracy(str(tmp_path / "one"), table)

    res = Resources(cpus=1)
    placed = run_data_parallel(_train_fn(TrainConfig(**RECIPE, workers=2), table), str(tmp_path / "two"), 2, res)
    acc_two = _accuracy(str(tmp_path / "two"), table)
    assert placed.device == "cpu x2 (DDP)" and placed.node_id
    # Two workers train the same recipe on the same batches (batch norm over half batches and the flips
    # differ), so on 280 test faces (a point is 3 faces) they land within the noise of one worker.
    assert acc_one > 0.4 and abs(acc_two - acc_one) < 0.1, (acc_one, acc_two)
    meta = json.loads((tmp_path / "two" / "model.json").read_text())
    assert meta["config"]["workers"] == 2

    # Kill a training worker once the run has a checkpoint: Ray Train restarts the group, which resumes
    # from last.pt and finishes the run.
    out = tmp_path / "killed"
    killed: list[int] = []

    def kill_one_worker() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            state = out / "last.pt"
            if state.exists() and torch.load(state, weights_only=False)["epoch"] >= 3:
                for pid in _train_worker_pids():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    break
            time.sleep(0.2)

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    run_data_parallel(_train_fn(TrainConfig(**RECIPE, workers=2), table), str(out), 2, res)
    killer.join(5)
    assert killed, "no training worker was found to kill"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] >= 3 and len(metrics["history"]) == RECIPE["epochs"]
    assert abs(_accuracy(str(out), table) - acc_two) < 0.1


def _train_worker_pids() -> list[int]:
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            cmd = open(f"/proc/{p}/cmdline", "rb").read()
        except OSError:
            continue
        if cmd.startswith(b"ray::RayTrainWorker"):
            pids.append(int(p))
    return pids
