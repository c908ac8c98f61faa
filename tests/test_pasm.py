"""PASM erasing (Section III-C), the rounds of Algorithm 1 end to end, the figure and the CLI."""

import json
import os

import numpy as np
import pytest
import torch

from storage.artifact import Artifact, ArtifactWriter
from storage.images import decode, encode
from storage.schema import IMAGE_SCHEMA, image_row
from tasks.pasm.attack import POSITIONS_SCHEMA
from tasks.pasm.erase import EraseConfig, erase, erase_batch, erase_table, region, side_pixels


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: OpenMP threads spinning against each other cost 10x
    yield
    torch.set_num_threads(n)


def test_region_is_centred_and_clipped():
    assert region(10, 10, 5, 32, 32) == (8, 13, 8, 13)
    assert region(0, 31, 5, 32, 32) == (29, 32, 0, 3)
    assert region(10, 10, 4, 32, 32) == (8, 12, 8, 12)  # even side: the extra pixel goes up-left
    assert side_pixels(0.14, 224) == 31 and side_pixels(0.14, 64) == 9 and side_pixels(7, 64) == 7
    assert side_pixels(100, 64) == 64


@pytest.mark.parametrize("fill", ["rgb", "random", "constant"])
def test_erase_fills_only_the_region(fill):
    img = np.full((20, 20, 3), 50, np.uint8)
    out = erase(img, 18, 3, 5, fill, rgb=(1, 2, 3), rng=np.random.default_rng(0), constant=(9, 9, 9))
    inside = np.zeros((20, 20), bool)
    inside[1:6, 16:20] = True
    assert (out[~inside] == 50).all() and (img == 50).all()  # the input is not modified
    if fill == "rgb":
        assert (out[inside] == [1, 2, 3]).all()
    elif fill == "constant":
        assert (out[inside] == 9).all()
    else:
        assert len(np.unique(out[inside])) > 10
    batch = erase_batch(torch.from_numpy(img).permute(2, 0, 1)[None].repeat(2, 1, 1, 1), torch.tensor([18, 0]),
                        torch.tensor([3, 0]), 5, fill, rgb=torch.tensor([[1, 2, 3], [4, 5, 6]]),
                        generator=torch.Generator().manual_seed(0), constant=(9, 9, 9))
    assert ((batch[0].permute(1, 2, 0).numpy() != 50).any(2) == inside).all() or fill == "random"
    assert (batch[0].permute(1, 2, 0).numpy()[~inside] == 50).all()


def _table(path, n=10, size=40):
    rng = np.random.default_rng(1)
    rows = [image_row(f"r{i}", encode(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)), label=i % 7,
                      split="train" if i < n - 2 else "test",
                      landmarks=[10.0, 10.0, 30.0, 10.0, 20.0, 20.0, 12.0, 30.0, 28.0, 30.0]) for i in range(n)]
    with ArtifactWriter(str(path), stage="unit", rows_per_shard=4, schema=IMAGE_SCHEMA) as w:
        w.write_rows(rows)
    return str(path)


def _positions(path, ids, size=32):
    rows = [{"id": i, "x": 3 * k % size, "y": 5 * k % size, "r": 10 * k, "g": 7, "b": 200, "fitness": 0.1,
             "clean_prob": 0.5, "evals": 40, "label": k % 7, "size": size} for k, i in enumerate(ids)]
    with ArtifactWriter(str(path), stage="attack", schema=POSITIONS_SCHEMA) as w:
        w.write_rows(rows)
    return str(path), rows


def test_erase_table_uses_the_attacked_positions(tmp_path):
    table = _table(tmp_path / "t")
    pos_uri, pos = _positions(tmp_path / "p", [f"r{i}" for i in range(8)])
    out = str(tmp_path / "e")
    m = erase_table(table, pos_uri, out, EraseConfig(size=5))
    t = Artifact(out).read()
    assert t.schema == IMAGE_SCHEMA and sorted(t["id"].to_pylist()) == [f"r{i}" for i in range(8)]
    assert m.extra == {"rows_erased": 8, "not_erased": 2}
    by_id = {r["id"]: r for r in t.to_pylist()}
    for p in pos:
        img = decode(by_id[p["id"]]["image"])
        assert img.shape == (32, 32, 3)  # written at the attack's resolution, PNG: exact values
        y0, y1, x0, x1 = region(p["x"], p["y"], 5, 32, 32)
        assert (img[y0:y1, x0:x1] == [p["r"], p["g"], p["b"]]).all()
        assert by_id[p["id"]]["label"] == p["label"] and by_id[p["id"]]["split"] == "train"
    assert by_id["r0"]["landmarks"][2] == pytest.approx(30.0 * 32 / 40)  # landmarks follow the resize
    # Positions computed on another table are an error, not silently dropped rows.
    other, _ = _positions(tmp_path / "p2", ["r0", "zzz"])
    with pytest.raises(ValueError, match="another table"):
        erase_table(table, other, str(tmp_path / "e2"), EraseConfig(size=5))


def test_random_erasing_ablation(tmp_path):
    table = _table(tmp_path / "t")
    with pytest.raises(ValueError, match="image_size"):
        erase_table(table, None, str(tmp_path / "x"), EraseConfig(random_position=True))
    outs = []
    for k, seed in enumerate((0, 0, 1)):
        out = str(tmp_path / f"r{k}")
        erase_table(table, None, out, EraseConfig(size=0.25, random_position=True, seed=seed, image_size=32,
                                                  fill="constant", constant=(255, 0, 255)))
        outs.append({r["id"]: decode(r["image"]) for r in Artifact(out).read().to_pylist()})
    assert sorted(outs[0]) == [f"r{i}" for i in range(8)]  # labeled train rows
    masks = [{i: (im == [255, 0, 255]).all(2) for i, im in o.items()} for o in outs]
    assert all(int(m.sum()) in range(9, 65) for m in masks[0].values())  # an 8x8 region, maybe clipped
    assert all((masks[0][i] == masks[1][i]).all() for i in masks[0])  # same seed, same positions
    assert any((masks[0][i] != masks[2][i]).any() for i in masks[0])


def _synthetic_table(path, size=32):
    from storage.ingest import write_image_table
    from storage.synthetic import SyntheticConfig, generate

    cfg = SyntheticConfig(size=size, train_per_class=3, test_per_class=2, pool_size=0, n_identities=3)
    write_image_table(generate(cfg), str(path), stage="ingest", config={}, rows_per_shard=8)
    return str(path)


@pytest.mark.slow
def test_pasm_cli_runs_the_pasm_pipeline_and_a_rerun_recomputes_only_what_changed(tmp_path, capsys):
    """`fermine pasm TABLE OUT` is the pasm pipeline: its stages in the ledger, the results table printed,
    a rerun reuses everything, and another beta retrains only the student (the attack is reused)."""
    from flows.cli import main
    from flows.stage import Run

    table = _synthetic_table(tmp_path / "t")
    out = tmp_path / "pasm"
    args = ["pasm", table, str(out), "--rounds", "1", "--size", "32", "--epochs", "1", "--batch-size", "16",
            "--popsize", "8", "--generations", "2", "--chunk-size", "16", "--mask-size", "8", "--workers", "1",
            "--device", "cpu", "--json", str(tmp_path / "summary.json")]
    main(args)
    printed = capsys.readouterr().out
    assert "pasm-r1" in printed and "teacher" in printed and "report:" in printed
    states = {r["stage"]: r for r in Run(str(out)).status()}
    assert {"teacher", "attack-r1", "erase-r1", "student-r1", "evaluate-teacher", "evaluate-pasm-r1",
            "figure-pasm"} <= set(states)
    assert "ingest" not in states  # a finished table is used as it is
    s = json.loads((tmp_path / "summary.json").read_text())
    from tasks.evaluate import evaluate

    student = states["student-r1"]["uri"]
    r1 = next(r for r in s["results"] if r["model"] == "pasm-r1")
    assert r1["inner accuracy"] == pytest.approx(evaluate(student, table, device="cpu").accuracy, abs=1e-4)
    assert len(Artifact(states["erase-r1"]["uri"])) == 21
    sm = json.loads(open(os.path.join(student, "metrics.json")).read())
    assert sm["teacher"] is True and sm["init_from"] == states["teacher"]["uri"]  # Eq. 4, refined from the teacher
    assert sm["config"]["beta"] == 0.1 and sm["train_uris"] == [states["erase-r1"]["uri"]]  # erased images only
    main(args)  # a rerun: every stage reused
    assert {r["state"] for r in Run(str(out)).status()} == {"reused"}
    main(args[:-2] + ["--beta", "0.5"])
    states = {r["stage"]: r["state"] for r in Run(str(out)).status()}
    assert states["attack-r1"] == "reused" and states["student-r1"] == "finished"
    with pytest.raises(SystemExit) as e:
        main(["pasm", str(tmp_path / "nosuch"), str(out)])
    assert e.value.code == 2 and "no finished image table" in capsys.readouterr().err


def test_pasm_figure_rows(tmp_path):
    from tasks.pasm.figure import pasm_figure

    table = _table(tmp_path / "t")
    erased = []
    for r in range(2):
        pos_uri, _ = _positions(tmp_path / f"p{r}", [f"r{i}" for i in range(8)])
        erased.append(str(tmp_path / f"e{r}"))
        erase_table(table, pos_uri, erased[-1], EraseConfig(size=5))
    path = pasm_figure(table, erased, str(tmp_path / "fig.png"), n=4)
    assert os.path.getsize(path) > 1000
    # Any fsspec URI (a run on s3:// writes its figures there): the same PNG, one row per round + original.
    import fsspec

    from storage.images import decode

    uri = pasm_figure(table, erased, "memory://pasm-fig/fig.png", n=4)
    with fsspec.open(uri, "rb") as f:
        assert decode(f.read()).shape == decode(open(path, "rb").read()).shape
    with pytest.raises(ValueError, match="lacks ids"):
        pasm_figure(None, erased, str(tmp_path / "f2.png"), ids=["r0", "r9"])


def test_pasm_config_is_validated():
    from tasks.pasm.student import PasmConfig

    with pytest.raises(ValueError, match="rounds"):
        PasmConfig(rounds=0).validate()
    with pytest.raises(ValueError, match="student_init"):
        PasmConfig(student_init="imagenet").validate()
    with pytest.raises(ValueError, match="fill"):
        from tasks.pasm.erase import EraseConfig as E

        PasmConfig(erase=E(fill="blur")).validate()
