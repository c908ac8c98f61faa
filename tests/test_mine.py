"""Omni-supervised mining: Eq. 4 centroids, Eq. 5-6 selection, the streaming Ray job, its CLI."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from storage.artifact import Artifact, ArtifactWriter, _fs
from storage.images import encode
from storage.schema import CLASSES, IMAGE_SCHEMA, image_row
from tasks.omni.centroids import CentroidConfig, compute_centroids, load_centroids
from tasks.engine.checkpoint import save_checkpoint
from tasks.omni.mine import AUX_SCHEMA, MineConfig, build_processor, select, similarities
from tasks.models import build_model

SIZE = 32


def bar_image(k: int, rng: np.random.Generator, size: int = SIZE, noise: float = 20.0) -> np.ndarray:
    """Class k = a bar at angle k*pi/7 through (roughly) the centre; colour, width, offset and noise vary."""
    img = np.full((size, size, 3), rng.integers(0, 90), np.uint8)
    a = k * math.pi / len(CLASSES)
    cx, cy = size / 2 + rng.uniform(-3, 3), size / 2 + rng.uniform(-3, 3)
    dx, dy = math.cos(a) * size, math.sin(a) * size
    colour = tuple(int(c) for c in rng.integers(150, 256, 3))
    cv2.line(img, (int(cx - dx), int(cy - dy)), (int(cx + dx), int(cy + dy)), colour, int(rng.integers(2, 5)))
    img = img.astype(np.float32) + rng.normal(0, noise, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_table(uri: str, rows: list[dict], rows_per_shard: int = 16) -> str:
    with ArtifactWriter(uri, stage="unit", rows_per_shard=rows_per_shard, schema=IMAGE_SCHEMA) as w:
        w.write_rows(rows)
    return uri


def labeled_rows(n_per_class: int, rng, split: str = "train", prefix: str = "l") -> list[dict]:
    return [image_row(f"{prefix}{k}-{i}", encode(bar_image(k, rng)), label=k, split=split, source="bars")
            for k in range(len(CLASSES)) for i in range(n_per_class)]


def untrained_checkpoint(uri: str, seed: int = 0) -> str:
    torch.manual_seed(seed)
    save_checkpoint(uri, build_model("small_cnn", 7), {"input_size": SIZE})
    return uri


def train_quick(uri: str, rows: list[dict], epochs: int = 6, seed: int = 0) -> str:
    """A few epochs of plain SGD (the test must not depend on the trainer's defaults)."""
    from tasks.data import decode_resized, normalize

    torch.manual_seed(seed)
    model = build_model("small_cnn", 7)
    x = torch.from_numpy(np.stack([decode_resized(r["image"], SIZE) for r in rows])).permute(0, 3, 1, 2)
    y = torch.tensor([r["label"] for r in rows])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for s in range(0, len(y), 32):
            idx = perm[s:s + 32]
            loss = torch.nn.functional.cross_entropy(model(normalize(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    save_checkpoint(uri, model, {"input_size": SIZE})
    return uri


# ---------------------------------------------------------------- pure functions


def test_select_against_hand_made_similarities():
    sims = torch.tensor([
        [0.90, 0.50, 0.10],  # clear winner: margin 0.40
        [0.70, 0.68, 0.10],  # too close: margin 0.02
        [0.20, 0.25, 0.40],  # winner class 2, margin 0.15, but below a 0.5 floor
        [0.55, 0.10, 0.45],  # margin exactly 0.10 -> kept at m = 0.10 (>=)
    ])
    keep, label, best, gap = select(sims, margin=0.10)
    assert keep.tolist() == [True, False, True, True]
    assert label.tolist() == [0, 0, 2, 0]
    assert torch.allclose(best, torch.tensor([0.90, 0.70, 0.40, 0.55]))
    assert torch.allclose(gap, torch.tensor([0.40, 0.02, 0.15, 0.10]), atol=1e-6)
    keep, *_ = select(sims, margin=0.10, floor=0.5)
    assert keep.tolist() == [True, False, False, True]
    keep, *_ = select(sims, margin=0.0)
    assert keep.all()
    with pytest.raises(ValueError, match="K >= 2"):
        select(torch.ones(3, 1), 0.1)


def test_similarities_are_cosines():
    f = torch.tensor([[1.0, 0.0], [3.0, 3.0], [0.0, -2.0]])
    c = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    s = similarities(f, c)
    want = torch.tensor([[1.0, 0.0], [math.sqrt(0.5), math.sqrt(0.5)], [0.0, -1.0]])
    assert torch.allclose(s, want, atol=1e-6)
    with pytest.raises(ValueError, match="same D"):
        similarities(f, torch.ones(2, 3))


class _MeanColour(torch.nn.Module):
    """features(x) = the mean of each channel: a model whose features we can compute by hand."""

    def features(self, x):
        return x.mean(dim=(2, 3))


def test_processor_scores_match_hand_computation(rng):
    from tasks.omni.mine import MineProcessor

    cents = np.array([[1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.2, 0.2, 1.0]], np.float32)
    imgs = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    f = (imgs.astype(np.float64) / 255 - 0.5) / 0.5
    f = f.mean(axis=(1, 2))
    for center in (False, True):
        c = cents - cents.mean(0) if center else cents
        g = f - cents.mean(0) if center else f
        sims = (g / np.linalg.norm(g, axis=1, keepdims=True)) @ (c / np.linalg.norm(c, axis=1, keepdims=True)).T
        proc = MineProcessor(_MeanColour(), cents, [4, 5, 6], MineConfig(margin=0.05, center=center), input_size=4)
        keep, label, best, gap = proc.score(imgs)
        srt = np.sort(sims, axis=1)
        np.testing.assert_allclose(best, srt[:, -1], atol=1e-5)
        np.testing.assert_allclose(gap, srt[:, -1] - srt[:, -2], atol=1e-5)
        assert label.tolist() == [4 + int(i) for i in sims.argmax(1)]  # centroid rows map to their class labels
        assert keep.tolist() == (srt[:, -1] - srt[:, -2] >= 0.05).tolist()


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="margin"):
        MineConfig(margin=5)
    with pytest.raises(ValueError, match="floor"):
        MineConfig(floor=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        MineConfig(batch_size=0)


# ---------------------------------------------------------------- centroids (Eq. 4)


def test_centroids_equal_numpy_class_means(tmp_path, rng):
    from tasks.data import load_image_set, normalize

    rows = labeled_rows(4, rng) + labeled_rows(2, rng, split="test", prefix="t")
    rows[0]["label"] = None  # an unlabeled row is ignored
    lab = write_table(str(tmp_path / "lab"), rows, rows_per_shard=10)
    ck = untrained_checkpoint(str(tmp_path / "ck"))
    m = compute_centroids(ck, lab, str(tmp_path / "cent"), CentroidConfig(batch_size=7))
    labels, cents = load_centroids(str(tmp_path / "cent"))

    from tasks.engine.checkpoint import load_checkpoint

    model, _ = load_checkpoint(ck)
    data = load_image_set(lab, SIZE, splits=["train"])
    with torch.no_grad():
        feats = model.features(normalize(data.images)).numpy().astype(np.float64)
    y = data.labels.numpy()
    assert labels.tolist() == list(range(7))
    for k in range(7):
        want = feats[y == k].mean(axis=0)
        np.testing.assert_allclose(cents[k], want, rtol=1e-4, atol=1e-5)
    assert m.extra["counts"]["neutral"] == 3 and m.extra["counts"]["anger"] == 4
    # Same inputs and settings: the finished artifact is reused, not recomputed or overwritten.
    assert compute_centroids(ck, lab, str(tmp_path / "cent"), CentroidConfig(batch_size=7)).digest == m.digest
    with pytest.raises(FileExistsError, match="other inputs or settings"):
        compute_centroids(ck, lab, str(tmp_path / "cent"), CentroidConfig(normalize_features=True))


def test_centroids_need_two_classes(tmp_path, rng):
    rows = [r for r in labeled_rows(2, rng) if r["label"] == 3]
    lab = write_table(str(tmp_path / "lab"), rows)
    with pytest.raises(ValueError, match="at least 2"):
        compute_centroids(untrained_checkpoint(str(tmp_path / "ck")), lab, str(tmp_path / "c"))


# ---------------------------------------------------------------- the Ray job


def _pool(tmp_path, rng, n=56, corrupt=True) -> tuple[str, list[dict]]:
    rows = [image_row(f"p{i}", encode(bar_image(int(rng.integers(7)), rng)), split="pool", source="ms1m")
            for i in range(n)]
    rows.insert(5, image_row("zz-unlabeled-not-pool", encode(bar_image(1, rng)), split="test", source="x"))
    if corrupt:
        rows.insert(9, image_row("broken", b"not an image", split="pool", source="ms1m"))
    return write_table(str(tmp_path / "pool"), rows, rows_per_shard=16), rows


def test_mine_rows_exactly_once_and_resume(tmp_path, rng, ray_local):
    from tasks.data import load_image_set
    from workers.mine import mine_pool

    lab = write_table(str(tmp_path / "lab"), labeled_rows(3, rng))
    ck = untrained_checkpoint(str(tmp_path / "ck"))
    cent = str(tmp_path / "cent")
    compute_centroids(ck, lab, cent)
    pool, rows = _pool(tmp_path, rng)
    cfg = MineConfig(margin=0.002, splits=("pool",), batch_size=8)

    # What a single process computes over the whole pool: the reference.
    proc = build_processor(ck, cent, cfg)
    ref, ref_rej = proc(Artifact(pool).read())
    assert ref.num_rows > 0 and ref_rej.column("id").to_pylist() == ["broken"]

    out = str(tmp_path / "aux")
    seen: list[int] = []
    res = mine_pool(ck, cent, pool, out, cfg, workers=2, cpus_per_worker=1, on_shard=lambda i, info, r: seen.append(i))
    art = Artifact(out)
    assert sorted(seen) == list(range(Artifact(pool).num_shards))
    t = art.read()
    ids = t.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "a row was written twice"
    assert sorted(ids) == sorted(ref.column("id").to_pylist())
    assert "zz-unlabeled-not-pool" not in ids  # split filter
    assert art.schema.names == AUX_SCHEMA.names
    assert set(t.column("split").to_pylist()) == {"train"}
    assert set(t.column("source").to_pylist()) == {"mined:ms1m"}
    assert min(t.column("margin").to_pylist()) >= 0.002 - 1e-6
    # Exactly what the reference computed, per row.
    by_id = dict(zip(ref.column("id").to_pylist(), ref.column("label").to_pylist()))
    assert all(by_id[i] == lab_ for i, lab_ in zip(ids, t.column("label").to_pylist()))
    assert Artifact(out + "/rejects").read().column("id").to_pylist() == ["broken"]
    assert res.examined == 57 and res.rejected == 1 and res.kept == len(ids)
    assert sum(res.counts.values()) == len(ids)
    assert res.counts == {c: t.column("label").to_pylist().count(k) for k, c in enumerate(CLASSES)}
    # The output is an image table: trainers read it like the labeled set.
    data = load_image_set(out, SIZE)
    assert len(data) == len(ids) and (data.labels >= 0).all()

    # Rerun with the same settings: reused as is.
    assert mine_pool(ck, cent, pool, out, cfg).reused

    # A crash after shard 1 was written: only the other shards are redone, result identical.
    fs, path = _fs(out)
    fs.rm(f"{path}/_manifest.json")
    for name in ("part-00000.parquet", "part-00002.parquet"):
        fs.rm(f"{path}/{name}")
        fs.rm(f"{path}/{name}.json")
    seen.clear()
    res2 = mine_pool(ck, cent, pool, out, cfg, workers=1, on_shard=lambda i, info, r: seen.append(i))
    assert 1 not in seen and sorted(seen) == [0, 2]
    assert sorted(Artifact(out).read().column("id").to_pylist()) == sorted(ids)
    assert res2.counts == res.counts and Artifact(out).digest == art.digest

    # Partial output made with other settings is refused, never mixed in.
    fs.rm(f"{path}/_manifest.json")
    with pytest.raises(FileExistsError, match="other inputs or settings"):
        mine_pool(ck, cent, pool, out, MineConfig(margin=0.5, splits=("pool",)))


def test_mine_refuses_mismatched_centroids(tmp_path, rng):
    lab = write_table(str(tmp_path / "lab"), labeled_rows(2, rng))
    cent = str(tmp_path / "cent")
    with ArtifactWriter(cent, stage="centroids") as w:
        w.write_rows([{"label": k, "count": 1, "centroid": [1.0, 2.0, 3.0]} for k in range(7)])
    ck = untrained_checkpoint(str(tmp_path / "ck"))
    with pytest.raises(ValueError, match="same checkpoint"):
        build_processor(ck, cent, MineConfig())
    assert lab


@pytest.mark.slow
def test_trained_model_keeps_faces_and_rejects_noise(tmp_path, ray_local):
    from workers.mine import mine_pool

    rng = np.random.default_rng(1)
    train_rows = labeled_rows(40, rng)
    lab = write_table(str(tmp_path / "lab"), train_rows, rows_per_shard=128)
    ck = train_quick(str(tmp_path / "ck"), train_rows)
    cent = str(tmp_path / "cent")
    compute_centroids(ck, lab, cent)
    truth = {}
    rows = []
    for i in range(140):
        k = i % 7
        truth[f"f{i}"] = k
        rows.append(image_row(f"f{i}", encode(bar_image(k, rng)), split="pool", source="pool"))
    for i in range(140):
        rows.append(image_row(f"n{i}", encode(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)),
                              split="pool", source="pool"))
    order = rng.permutation(len(rows))
    pool = write_table(str(tmp_path / "pool"), [rows[i] for i in order], rows_per_shard=64)
    res = mine_pool(ck, cent, pool, str(tmp_path / "aux"), MineConfig(margin=0.15), workers=1)
    t = Artifact(res.uri).read()
    ids = t.column("id").to_pylist()
    labels = t.column("label").to_pylist()
    faces = [(i, y) for i, y in zip(ids, labels) if i.startswith("f")]
    noise = [i for i in ids if i.startswith("n")]
    assert len(faces) >= 0.5 * 140, f"kept only {len(faces)} of 140 class images"
    assert len(noise) <= 0.1 * 140, f"kept {len(noise)} of 140 noise images"
    assert sum(truth[i] == y for i, y in faces) >= 0.95 * len(faces)


# ---------------------------------------------------------------- figure, CLI, pipeline


def test_mined_grid_rows_sorted_by_confidence(tmp_path, rng):
    from tasks.omni.figure import mined_grid, pick

    sims = np.array([0.2, 0.9, 0.5, 0.7, 0.1])
    assert pick(sims, 2, "top").tolist() == [1, 3]
    assert pick(sims, 3, "spread").tolist() == [1, 2, 4]  # best, middle rank, worst kept
    rows = []
    for i in range(20):
        r = image_row(f"a{i}", encode(bar_image(i % 3, rng)), label=i % 3, split="train", source="mined:x")
        rows.append({**r, "best_similarity": 0.5 + i / 100, "margin": 0.1})
    aux = str(tmp_path / "aux")
    with ArtifactWriter(aux, stage="mine", rows_per_shard=8, schema=AUX_SCHEMA) as w:
        w.write_rows(rows)
    shown = mined_grid(aux, str(tmp_path / "fig.png"), per_class=4, mode="top")
    assert list(shown) == ["neutral", "anger", "disgust"]
    s = [c["similarity"] for c in shown["neutral"]]
    assert s == sorted(s, reverse=True) and len(s) == 4 and s[0] == pytest.approx(0.68)
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_mine_prints_counts_and_kept_fraction(tmp_path, rng, ray_local, capsys):
    from flows.cli import main

    lab = write_table(str(tmp_path / "lab"), labeled_rows(2, rng))
    ck = untrained_checkpoint(str(tmp_path / "ck"))
    pool, _ = _pool(tmp_path, rng, n=30, corrupt=False)
    out = str(tmp_path / "aux")
    main(["mine", ck, lab, pool, out, "--margin", "0.001", "--split", "pool", "--workers", "1",
          "--batch-size", "16"])
    text = capsys.readouterr().out
    kept = len(Artifact(out))
    assert f"{kept} / 30" in text and "neutral" in text and "surprise" in text
    assert (tmp_path / "aux" / "mined.png").exists() == (kept > 0)
    assert len(Artifact(out + "/centroids")) == 7
    with pytest.raises(SystemExit) as e:  # a user mistake: one line, exit 2
        main(["mine", ck, lab, str(tmp_path / "nope"), str(tmp_path / "o2")])
    assert e.value.code == 2 and "no finished image table" in capsys.readouterr().err

    # The MS-Celeb-1M face.evoLVe release as POOL, directly: ingested once into OUT/pool.
    from storage.images import decode, encode

    release = tmp_path / "faces_emore"
    faces = Artifact(pool).read(columns=["image"])["image"].to_pylist()[:12]
    for i, img in enumerate(faces):
        (release / f"id{i % 3}").mkdir(parents=True, exist_ok=True)
        (release / f"id{i % 3}" / f"{i}.jpg").write_bytes(encode(decode(img), ".jpg"))
    (release / "id0" / "broken.jpg").write_bytes(b"not a jpeg")
    out2 = str(tmp_path / "aux2")
    main(["mine", ck, lab, str(release), out2, "--margin", "0.001", "--workers", "1", "--centroids",
          out + "/centroids", "--figure", "none"])
    assert "/ 12" in capsys.readouterr().out
    assert len(Artifact(out2 + "/pool")) == 12 and len(Artifact(out2 + "/pool/rejects")) == 1
    neither = tmp_path / "notes"  # a folder, but neither a finished table nor a release
    neither.mkdir()
    (neither / "readme.txt").write_text("not faces")
    with pytest.raises(SystemExit) as e:
        main(["mine", ck, lab, str(neither), str(tmp_path / "o3")])
    assert e.value.code == 2 and "neither a finished image table nor an MS-Celeb-1M release" in capsys.readouterr().err


@pytest.mark.slow
def test_omni_cli_runs_the_omni_pipeline_end_to_end_and_reuses_it(tmp_path, capsys):
    """`fermine omni LABELED POOL OUT`: centroids -> mine -> distil -> retrain (labeled + VAS, labeled + DAS),
    one results table over the inner and the named cross test set, every stage reused on a rerun."""
    import json

    from flows.cli import main
    from flows.stage import Run
    from storage.ingest import write_image_table
    from storage.synthetic import SyntheticConfig, generate

    a = SyntheticConfig(size=32, train_per_class=20, test_per_class=6, pool_size=84, n_identities=8)
    b = SyntheticConfig(size=32, train_per_class=0, test_per_class=6, pool_size=0, style="b", n_identities=8)
    lab, cross = str(tmp_path / "lab"), str(tmp_path / "b")
    write_image_table(generate(a), lab, stage="synthetic", config={})
    write_image_table(generate(b), cross, stage="synthetic", config={})
    out = str(tmp_path / "omni")
    args = ["omni", lab, lab, out, "--cross", f"synthetic-b={cross}", "--epochs", "1", "--size", "32",
            "--margin", "0.02", "--center", "--pool-split", "pool", "--distill-steps", "3",
            "--distill-arch", "convnet_s", "--workers", "1", "--device", "cpu"]
    main(args)
    assert "vas" in capsys.readouterr().out
    summary = json.loads((tmp_path / "omni" / "results.json").read_text())
    assert [r["model"] for r in summary["results"]] == ["teacher", "vas", "das"]
    for name in ("teacher", "vas", "das"):
        assert summary["metrics"][name]["inner"]["n"] == 42 and summary["metrics"][name]["synthetic-b"]["n"] == 42
    stages = {r["stage"]: r["uri"] for r in Run(out).status()}
    vas = Artifact(stages["mine"])
    assert vas.manifest.extra["examined"] == 84 and len(vas) == vas.manifest.extra["kept"]
    assert len(Artifact(stages["distill"])) == 7
    md = (tmp_path / "omni" / "results.md").read_text()
    assert "| das |" in md
    main(args)  # everything finished: reused
    assert {r["state"] for r in Run(out).status()} == {"reused"}


# ---------------------------------------------------------------- the pool never holds test rows


def test_default_pool_rows_leave_evaluation_splits_out():
    import pyarrow as pa

    from tasks.omni.mine import mined_rows

    split = pa.array(["train", "pool", "test", "test_occlusion", "val", "validation", None, "unlabeled"])
    assert mined_rows(split, None).to_pylist() == [True, True, False, False, False, False, True, True]
    assert mined_rows(split, ["pool"]).to_pylist() == [False, True, False, False, False, False, False, False]
    assert mined_rows(split, ["test"]).to_pylist()[2] is True  # a split the user names is mined


def test_processor_skips_test_rows_by_default(rng):
    from tasks.omni.mine import MineProcessor

    cents = np.eye(3, dtype=np.float32)
    rows = labeled_rows(1, rng, split="test", prefix="t") + labeled_rows(1, rng, split="pool", prefix="p")
    import pyarrow as pa

    table = pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA)
    proc = MineProcessor(_MeanColour(), cents, [0, 1, 2], MineConfig(margin=-2.0), input_size=SIZE)
    kept, _ = proc(table)
    assert kept.num_rows == 7 and all(i.startswith("p") for i in kept.column("id").to_pylist())


def test_mining_refuses_a_pool_that_shares_ids_with_a_test_set(tmp_path, rng):
    from tasks.omni.mine import check_disjoint

    table = write_table(str(tmp_path / "t"), labeled_rows(1, rng, "test", "x") + labeled_rows(1, rng, "pool", "p"))
    check_disjoint(table, None, {"inner": (table, ("test",))})  # default splits: no test row is mined
    with pytest.raises(ValueError, match="shares 7 ids with test set 'inner'"):
        check_disjoint(table, ("pool", "test"), {"inner": (table, ("test",))})
    other = write_table(str(tmp_path / "o"), labeled_rows(1, rng, "test", "p"))  # a cross set with pool's ids
    with pytest.raises(ValueError, match="cross0"):
        check_disjoint(table, None, {"cross0": (other, None)})
