"""PASM point attack: the batched DE search (vs scipy), its exactness and the Ray attack stage."""

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

from storage.artifact import Artifact, ArtifactWriter, ShardedWriter, join
from storage.images import encode
from storage.schema import IMAGE_SCHEMA, image_row
from tasks.pasm.attack import (
    POSITIONS_SCHEMA,
    AttackConfig,
    PointAttacker,
    _distinct_others,
    apply_probe,
    attack_images,
    attack_table,
    tune_chunk_size,
)
from tasks.data import normalize


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The CI box has 2 cores shared with other jobs: 2 OpenMP threads spin against each other.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Tiny(nn.Module):
    """Random conv features, global max pool: a rugged one-pixel landscape like a real CNN's."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 7)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return 12 * self.fc(x.amax((2, 3)))


class Bowl(nn.Module):
    """True class 0 is supported by pixels far from a target colour, weighted by a Gaussian around a peak:
    a smooth landscape whose optimum (peak position, target colour) is known."""

    def __init__(self, size, peak, target, base):
        super().__init__()
        yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
        self.register_buffer("w", torch.exp(-((xx - peak[0]) ** 2 + (yy - peak[1]) ** 2) / (2 * (size / 4) ** 2)))
        self.register_buffer("t", torch.tensor(target, dtype=torch.float).view(1, 3, 1, 1) / 127.5 - 1)
        self.off = 0.0
        with torch.no_grad():
            self.off = self(normalize(base[:1]))[0, 0].item() - 3.0  # clean logit 3: p(true) ~ 0.77

    def forward(self, x):
        l0 = 0.4 * (self.w * ((x - self.t) ** 2).sum(1)).sum((1, 2)) - self.off
        return torch.stack([l0] + [torch.zeros_like(l0)] * 6, 1)


def _noise_images(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((n, 3, size, size), generator=g) * 255).to(torch.uint8)


def _labels(model, images):
    with torch.no_grad():
        return model(normalize(images)).argmax(1)


def _bowl(size=24):
    base = torch.zeros((8, 3, size, size), dtype=torch.uint8)
    base[:, 2] = 255
    return Bowl(size, (17.0, 6.0), (200, 40, 90), base).eval(), base, torch.zeros(8, dtype=torch.long)


def _scipy_fitness(attacker, images, labels, popsize, generations, seed) -> np.ndarray:
    """Per-image best fitness of scipy's differential_evolution at our budget (vectorized=True)."""
    from scipy.optimize import differential_evolution

    h, w = images.shape[2:]
    out = []
    for i in range(len(images)):
        def f(z, i=i):
            c = torch.from_numpy(np.asarray(z, dtype=np.float32).T.copy())
            return attacker.fitness(images[i:i + 1], labels[i:i + 1], torch.zeros(len(c), dtype=torch.long), c).numpy()

        res = differential_evolution(f, [(0, w), (0, h), (0, 255), (0, 255), (0, 255)], strategy="rand1bin",
                                     popsize=popsize // 5, maxiter=generations, mutation=0.5, recombination=1.0,
                                     polish=False, vectorized=True, updating="deferred", tol=0, atol=0,
                                     seed=seed * 1000 + i)
        assert res.nfev == generations + 1  # vectorized: one call per generation, the same budget as ours
        out.append(res.fun)
    return np.asarray(out, dtype=np.float64)


@pytest.mark.parametrize("kind", ["rugged", "smooth"])
def test_batched_search_at_least_as_good_as_scipy(kind):
    """Same model, images, objective and budget (40 candidates x (1 + 10) generations): on average the
    batched search finds true-class probabilities at least as low as scipy's differential_evolution.

    Both searches are random, so "at least as good" is judged on paired per-image differences: ours
    may not be worse on average by more than two standard errors of that mean (a systematic gap of
    the size of the noise fails; the seeds' luck does not).
    """
    diffs, clean, ref = [], [], []
    for seed in range(4 if kind == "rugged" else 2):
        if kind == "rugged":
            model = Tiny(seed).eval()
            images = _noise_images(16, 24, seed)
            labels = _labels(model, images)
        else:
            model, images, labels = _bowl()
        att = PointAttacker(model, AttackConfig(popsize=40, generations=10, chunk_size=64, seed=seed))
        res = att(images, labels)
        theirs = _scipy_fitness(att, images, labels, 40, 10, seed)
        diffs.append(res.fitness.double().numpy() - theirs)
        clean.append(res.clean_prob.mean().item())
        ref.append(theirs.mean())
    d = np.concatenate(diffs)
    assert np.mean(clean) - np.mean(ref) > 0.03, "the objective must leave room to search"
    se = d.std(ddof=1) / np.sqrt(len(d))
    assert d.mean() <= 2 * se, f"batched worse than scipy by {d.mean():.4f} on average (2 SE = {2 * se:.4f})"


def test_de_converges_to_the_known_optimum():
    model, images, labels = _bowl()
    res = attack_images(model, images, labels, AttackConfig(popsize=20, generations=30, chunk_size=64, seed=1))
    assert (res.x - 17).abs().max() <= 1 and (res.y - 6).abs().max() <= 1
    assert (res.rgb.float() - torch.tensor([200.0, 40.0, 90.0])).abs().max() <= 40
    # Random search with the same budget does clearly worse: the generations do real work.
    rnd = attack_images(model, images, labels, AttackConfig(popsize=620, generations=0, chunk_size=64, seed=1))
    assert res.fitness.mean() < rnd.fitness.mean() - 0.01


@pytest.mark.parametrize("probe", ["pixel", "patch"])
def test_fitness_equals_reevaluating_the_perturbed_image(probe):
    model = Tiny(3).eval()
    images = _noise_images(6, 20, 3)
    labels = _labels(model, images)
    cfg = AttackConfig(popsize=12, generations=3, probe=probe, patch=5, chunk_size=8, seed=2)
    res = attack_images(model, images, labels, cfg)
    adv = images.clone()
    for i in range(len(images)):
        x, y = int(res.x[i]), int(res.y[i])
        if probe == "pixel":
            adv[i, :, y, x] = res.rgb[i]
        else:
            adv[i, :, max(0, y - 2):y + 3, max(0, x - 2):x + 3] = res.rgb[i][:, None, None]
    with torch.no_grad():
        p = torch.softmax(model(normalize(adv)), 1).gather(1, labels[:, None])[:, 0]
        p0 = torch.softmax(model(normalize(images)), 1).gather(1, labels[:, None])[:, 0]
    torch.testing.assert_close(res.fitness, p, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(res.clean_prob, p0, atol=1e-5, rtol=1e-4)
    assert (res.evals == 12 * 4).all()


def test_patch_probe_is_clipped_at_the_borders():
    img = torch.zeros((2, 3, 10, 10), dtype=torch.uint8)
    out = apply_probe(img.clone(), torch.tensor([0, 9]), torch.tensor([0, 5]),
                      torch.tensor([[255, 1, 2], [7, 8, 9]], dtype=torch.uint8), "patch", 5)
    assert (out[0, 0, :3, :3] == 255).all() and out[0, 0].sum() == 255 * 9  # 3x3 left in the corner
    assert (out[1, :, 3:8, 7:] == torch.tensor([7, 8, 9]).view(3, 1, 1)).all()
    assert int((out[1, 0] > 0).sum()) == 15


def test_seeded_search_is_deterministic_and_chunking_does_not_change_it():
    model = Tiny(1).eval()
    images = _noise_images(5, 16, 1)
    labels = _labels(model, images)
    a = attack_images(model, images, labels, AttackConfig(popsize=10, generations=4, chunk_size=7, seed=5))
    b = attack_images(model, images, labels, AttackConfig(popsize=10, generations=4, chunk_size=50, seed=5))
    c = attack_images(model, images, labels, AttackConfig(popsize=10, generations=4, chunk_size=7, seed=6))
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.rgb, b.rgb)
    torch.testing.assert_close(a.fitness, b.fitness)
    assert not (torch.equal(a.x, c.x) and torch.equal(a.rgb, c.rgb))


def test_early_stop_drops_finished_images():
    model = Tiny(2).eval()
    images = _noise_images(8, 16, 2)
    labels = _labels(model, images)
    cfg = AttackConfig(popsize=10, generations=6, chunk_size=32, seed=0)
    full = attack_images(model, images, labels, cfg, track_history=True)
    assert (full.evals == 70).all()
    # Every image is below 1.0 after the initial population: nothing more is spent.
    none = attack_images(model, images, labels, AttackConfig(popsize=10, generations=6, chunk_size=32, early_stop=1.0))
    assert (none.evals == 10).all()
    # A threshold between the images' results: those below it stop early, the others run on.
    thr = float(full.history[:, 2].median()) + 1e-6
    part = attack_images(model, images, labels, AttackConfig(popsize=10, generations=6, chunk_size=32, early_stop=thr),
                         track_history=True)
    stopped = part.evals < 70
    assert stopped.any() and (~stopped).any()
    assert (part.fitness[stopped] < thr).all()
    # Stopping leaves the others' search unchanged (same random stream is not guaranteed, the budget is).
    assert (part.evals[~stopped] == 70).all()


def test_distinct_donors():
    r1, r2, r3 = _distinct_others(50, 6, torch.Generator().manual_seed(0))
    i = torch.arange(6)[None, :]
    for a, b in ((r1, r2), (r1, r3), (r2, r3), (r1, i), (r2, i), (r3, i)):
        assert not (a == b).any()
    assert set(r1.flatten().tolist()) == set(range(6))


def test_saliency_start_begins_nearer_the_optimum():
    model, images, labels = _bowl()
    cfg = AttackConfig(popsize=20, generations=2, chunk_size=64, seed=0)
    lhs = attack_images(model, images, labels, cfg, track_history=True)
    sal = attack_images(model, images, labels, AttackConfig(**{**cfg.__dict__, "init": "saliency"}), track_history=True)
    assert sal.history[:, 0].mean() < lhs.history[:, 0].mean() - 0.02
    assert ((sal.x - 17).abs() <= 3).float().mean() > 0.7


def test_chunk_tuner_picks_a_measured_size():
    size = tune_chunk_size(Tiny(0).eval(), (3, 16, 16), torch.device("cpu"), max_size=16)
    assert size in (8, 16)


def test_bad_configs_and_inputs_are_refused():
    with pytest.raises(ValueError, match="popsize"):
        AttackConfig(popsize=3).validate()
    with pytest.raises(ValueError, match="probe"):
        AttackConfig(probe="square").validate()
    model = Tiny(0).eval()
    with pytest.raises(ValueError, match="label"):
        attack_images(model, _noise_images(2, 8, 0), torch.tensor([0, -1]), AttackConfig(chunk_size=8))
    with pytest.raises(ValueError, match="uint8"):
        attack_images(model, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), AttackConfig(chunk_size=8))


# ---------------------------------------------------------------------------------- tables and Ray


def _teacher(path, size=32):
    from tasks.engine.checkpoint import save_checkpoint
    from tasks.models import build_model

    torch.manual_seed(0)
    save_checkpoint(str(path), build_model("small_cnn"), {"input_size": size})
    return str(path)


def _table(path, n=12, per_shard=4, extra_rows=()):
    rng = np.random.default_rng(0)
    rows = [image_row(f"img{i:02d}", encode(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)), label=i % 7,
                      split="train" if i % 6 else "test") for i in range(n)]
    rows += list(extra_rows)
    with ArtifactWriter(str(path), stage="unit", rows_per_shard=per_shard, schema=IMAGE_SCHEMA) as w:
        w.write_rows(rows)
    return str(path)


TINY = AttackConfig(popsize=8, generations=2, chunk_size=16, seed=0)


def test_attack_table_writes_positions_and_rejects(tmp_path):
    bad = [image_row("nolabel", encode(np.zeros((40, 40, 3), np.uint8)), label=None, split="train"),
           {**image_row("corrupt", b"not an image", label=1, split="train")}]
    table = _table(tmp_path / "t", extra_rows=bad)
    out = str(tmp_path / "pos")
    m = attack_table(_teacher(tmp_path / "teacher"), table, out, TINY)
    pos = Artifact(out).read()
    assert pos.schema == POSITIONS_SCHEMA
    ids = pos["id"].to_pylist()
    assert sorted(ids) == sorted(f"img{i:02d}" for i in range(12) if i % 6)  # train rows only
    assert set(pos["size"].to_pylist()) == {32} and max(pos["x"].to_pylist()) < 32
    assert all(f <= c + 1e-6 for f, c in zip(pos["fitness"].to_pylist(), pos["clean_prob"].to_pylist()))
    rej = {r["id"]: r["reason"] for r in Artifact(join(out, "rejects")).read().to_pylist()}
    assert set(rej) == {"nolabel", "corrupt"} and "label" in rej["nolabel"] and "decode" in rej["corrupt"]
    assert m.extra["rejects"] == 2
    # A finished output with the same settings is returned as is; other settings are refused.
    assert attack_table(str(tmp_path / "teacher"), table, out, TINY).digest == m.digest
    with pytest.raises(FileExistsError, match="other inputs or settings"):
        attack_table(str(tmp_path / "teacher"), table, out, AttackConfig(popsize=9, generations=2, chunk_size=16))


def test_ray_stage_matches_in_process_and_resumes(tmp_path, ray_local):
    from workers.attack import run_attack

    table = _table(tmp_path / "t", n=12, per_shard=4)
    teacher = _teacher(tmp_path / "teacher")
    local = str(tmp_path / "local")
    attack_table(teacher, table, local, TINY)
    out = str(tmp_path / "ray")
    # A previous, interrupted run finished shard 1: it must be kept, not recomputed.
    from tasks.pasm.attack import resume_guard, stage_config

    resume_guard(out, stage_config(TINY, teacher), {"table": Artifact(table).digest})
    sentinel = Artifact(local).read_shard(1)
    sentinel = sentinel.set_column(sentinel.schema.get_field_index("evals"), "evals",
                                   pa.array([-1] * sentinel.num_rows, pa.int32()))
    ShardedWriter(out).write_shard("part-00001.parquet", sentinel)
    seen = []
    run = run_attack(teacher, table, out, TINY, on_shard=lambda i, info, rej: seen.append(i), workers=2)
    assert sorted(seen) == [0, 2] and not run.reused
    got = Artifact(out).read()
    want = Artifact(local).read()
    assert got["id"].to_pylist() == want["id"].to_pylist()  # every row once, in shard order
    assert got["evals"].to_pylist().count(-1) == sentinel.num_rows  # shard 1 was not redone
    keep = [e != -1 for e in got["evals"].to_pylist()]
    for col in ("x", "y", "r", "g", "b"):
        redone = [v for v, k in zip(got[col].to_pylist(), keep) if k]
        assert redone == [v for v, k in zip(want[col].to_pylist(), keep) if k]
    again = run_attack(teacher, table, out, TINY)
    assert again.reused and again.manifest.digest == run.manifest.digest


def _dying_attack_factory(checkpoint_uri, cfg, marker):
    """The real attack processor, in a worker that SIGKILLs itself once, mid-shard (work done, nothing written)."""
    import os
    import signal
    from pathlib import Path

    from workers.attack import attack_factory

    attack = attack_factory(checkpoint_uri, cfg, threads=1)

    def fn(table):
        out = attack(table)
        if not Path(marker).exists():
            Path(marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    return fn


def test_killed_ray_worker_mid_shard_leaves_every_row_exactly_once(tmp_path, ray_local):
    import functools

    from tasks.pasm.attack import REJECTS_TABLE_SCHEMA
    from workers.sharded import PoolConfig, run_sharded

    table = _table(tmp_path / "t", n=12, per_shard=4)
    teacher = _teacher(tmp_path / "teacher")
    local = str(tmp_path / "local")
    attack_table(teacher, table, local, TINY)
    marker = tmp_path / "killed.pid"
    out = str(tmp_path / "ray")
    run_sharded(table, out, functools.partial(_dying_attack_factory, teacher, TINY, str(marker)), stage="attack",
                config={}, pool=PoolConfig(num_actors=2), columns=["id", "image", "label", "split"],
                with_rejects=True, rejects_schema=REJECTS_TABLE_SCHEMA)
    assert marker.exists()  # a worker really died mid-shard
    got, want = Artifact(out).read(), Artifact(local).read()
    assert got["id"].to_pylist() == want["id"].to_pylist()  # every row once, none lost, none twice
    for col in ("x", "y", "r", "g", "b"):
        assert got[col].to_pylist() == want[col].to_pylist()


def test_cli_attack(tmp_path, capsys):
    from flows.cli import main

    table = _table(tmp_path / "t", n=6, per_shard=3)
    teacher = _teacher(tmp_path / "teacher")
    out = str(tmp_path / "pos")
    main(["attack", teacher, table, out, "--popsize", "8", "--generations", "1", "--chunk-size", "16", "--local",
          "--json", str(tmp_path / "s.json")])
    assert "images attacked" in capsys.readouterr().out
    assert len(Artifact(out)) == 5
    with pytest.raises(SystemExit) as e:
        main(["attack", teacher, table, str(tmp_path / "p2"), "--probe", "blob", "--local"])
    assert e.value.code == 2
