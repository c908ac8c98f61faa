"""Evaluation: metrics against hand-computed confusions, absent classes, any table and split, the CLI."""

import json
import math

import numpy as np
import pytest
import torch

from storage.images import decode, encode
from storage.ingest import write_image_table
from tasks import metrics as M
from tasks.engine.checkpoint import save_checkpoint
from tasks.data import normalize
from tasks.evaluate import EvalResult, evaluate, evaluate_images, save_confusion_png
from tasks.models import build_model

SIZE = 32


@pytest.fixture(autouse=True)
def one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_metrics_match_a_hand_computed_confusion():
    y_true = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    y_pred = [0, 1, 0, 1, 1, 2, 0, 2, 1]
    conf = M.confusion_matrix(y_true, y_pred, 4)
    assert conf.tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 1, 2, 0], [0, 0, 0, 0]]
    assert M.accuracy(conf) == pytest.approx(6 / 9)
    pc = M.per_class_accuracy(conf)
    assert pc[:3].tolist() == pytest.approx([2 / 3, 1.0, 0.5]) and math.isnan(pc[3])
    # class 3 has no sample: excluded from the mean, not counted as 0 or 1
    assert M.mean_class_accuracy(conf) == pytest.approx((2 / 3 + 1.0 + 0.5) / 3)
    with pytest.raises(ValueError, match="outside 0..3"):
        M.confusion_matrix([0, 4], [0, 0], 4)
    with pytest.raises(ValueError, match="9 entries"):
        M.confusion_matrix(y_true, y_pred[:-1], 4)


def test_eval_result_json_has_no_nan():
    r = EvalResult.from_confusion(np.array([[3, 1], [0, 0]]), ["neutral", "anger"])
    assert r.absent_classes == ["anger"] and r.support == [4, 0] and r.accuracy == 0.75
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["per_class"] == [0.75, None] and d["per_class_by_name"]["anger"] is None
    assert d["mean_class_accuracy"] == 0.75


def _rows(seed):
    rng = np.random.default_rng(seed)
    labels = [0, 0, 1, 1, 1, 2, 4, 4, 5, 5, 6, 6]  # disgust only in train, no fear at all
    for i, c in enumerate(labels):
        img = (rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
        yield dict(id=f"t{i}", image=encode(img), label=c, split="test" if c != 2 else "train", source="x")
    yield dict(id="u", image=encode(np.zeros((SIZE, SIZE, 3), np.uint8)), label=None, split="test", source="x")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    table = str(root / "table")
    write_image_table(_rows(0), table, stage="test", config={}, rows_per_shard=5)
    torch.manual_seed(0)
    model = build_model("small_cnn").eval()
    ckpt = str(root / "ckpt")
    save_checkpoint(ckpt, model, {"input_size": SIZE})
    return table, ckpt, model, root


def _by_hand(model, table, splits):
    from storage.artifact import Artifact

    rows = Artifact(table).read().to_pylist()
    conf = np.zeros((7, 7), dtype=int)
    for r in rows:
        if r["label"] is None or (splits and r["split"] not in splits):
            continue
        x = torch.from_numpy(decode(r["image"])).permute(2, 0, 1)[None]
        with torch.no_grad():
            pred = int(model(normalize(x)).argmax())
        conf[r["label"], pred] += 1
    return conf


def test_evaluate_matches_predictions_made_by_hand(setup):
    table, ckpt, model, _ = setup
    res = evaluate(ckpt, table, splits=("test",), batch_size=4, device="cpu")
    conf = _by_hand(model, table, ("test",))
    assert res.confusion == conf.tolist()
    assert res.n == 11 and res.unlabeled_skipped == 1
    assert res.accuracy == pytest.approx(np.trace(conf) / 11)
    # disgust (2) and fear (3) are absent from the test split: nan, listed, excluded from the mean
    assert res.absent_classes == ["disgust", "fear"]
    assert math.isnan(res.per_class[2]) and math.isnan(res.per_class[3])
    present = [np.diag(conf)[c] / conf[c].sum() for c in (0, 1, 4, 5, 6)]
    assert res.mean_class_accuracy == pytest.approx(np.mean(present))
    assert res.classes[0] == "neutral" and res.checkpoint_uri == ckpt and res.splits == ["test"]


def test_evaluate_all_splits_and_in_memory(setup):
    table, ckpt, model, _ = setup
    res = evaluate(ckpt, table, splits=None, device="cpu")
    assert res.n == 12 and res.confusion == _by_hand(model, table, None).tolist()
    from tasks.train import load_labeled

    x, y, unlabeled = load_labeled(table, SIZE, None, 7)
    mem = evaluate_images(model, x, y)
    assert mem.confusion == res.confusion and unlabeled == 1


def test_evaluate_reports_bad_requests(setup):
    table, ckpt, _, root = setup
    with pytest.raises(ValueError, match=r"no labeled rows in split\(s\) \['val'\]"):
        evaluate(ckpt, table, splits=("val",), device="cpu")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        evaluate(str(root / "nope"), table)


def test_confusion_png(setup, tmp_path):
    table, ckpt, _, _ = setup
    res = evaluate(ckpt, table, device="cpu")
    save_confusion_png(res, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_evaluate(setup, tmp_path, capsys):
    from flows.cli import main

    table, ckpt, model, _ = setup
    main(["evaluate", ckpt, table, "--json", str(tmp_path / "e.json"), "--confusion", str(tmp_path / "c.png"),
          "--device", "cpu"])
    d = json.loads((tmp_path / "e.json").read_text())
    assert d["confusion"] == _by_hand(model, table, ("test",)).tolist() and d["n"] == 11
    assert d["per_class_by_name"]["disgust"] is None
    assert (tmp_path / "c.png").exists()
    assert "mean class" in capsys.readouterr().out
    main(["evaluate", ckpt, table, "--split", "all", "--json", str(tmp_path / "all.json"), "--device", "cpu"])
    assert json.loads((tmp_path / "all.json").read_text())["n"] == 12
    for argv, msg in ((["evaluate", ckpt, str(tmp_path / "missing")], "no finished image table"),
                      (["evaluate", ckpt, table, "--device", "gpu"], "bad --device"),
                      (["evaluate", str(tmp_path / "nock"), table], "no finished checkpoint"),
                      (["evaluate", ckpt, table, "--split", "val"], "no labeled rows")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert msg in capsys.readouterr().err


def test_cli_evaluate_writes_default_json(setup, tmp_path, capsys):
    """Without --json every run writes CHECKPOINT/eval-<table>-<split>.json and names it; another table
    with the same folder name gets its own file instead of replacing the first."""
    import shutil

    from flows.cli import main

    table, ckpt, model, _ = setup
    ck = str(tmp_path / "ck")
    shutil.copytree(ckpt, ck)
    main(["evaluate", ck, table, "--device", "cpu"])
    captured = capsys.readouterr()
    path = tmp_path / "ck" / "eval-table-test.json"
    assert path.exists()
    assert f"metrics: {path}" in captured.err
    assert "acc" in captured.err and "img/s" in captured.err
    d = json.loads(path.read_text())
    assert d["accuracy"] == pytest.approx(np.trace(_by_hand(model, table, ("test",))) / 11)
    assert isinstance(d["mean_class_accuracy"], float)
    assert d["confusion"] == _by_hand(model, table, ("test",)).tolist() and d["splits"] == ["test"]

    main(["evaluate", ck, table, "--split", "all", "--device", "cpu"])
    assert json.loads((tmp_path / "ck" / "eval-table-all.json").read_text())["n"] == 12
    # same table again: the file is replaced; a different table also called "table": a new file
    main(["evaluate", ck, table + "/", "--device", "cpu"])
    other = tmp_path / "other" / "table"
    shutil.copytree(table, other)
    main(["evaluate", ck, str(other), "--device", "cpu"])
    err = capsys.readouterr().err
    evals = sorted(p.name for p in (tmp_path / "ck").glob("eval-*.json"))
    assert len(evals) == 3 and "eval-table-test.json" in evals
    assert json.loads(path.read_text())["test_uri"] == table + "/"
    new = next(n for n in evals if n not in ("eval-table-test.json", "eval-table-all.json"))
    assert new.startswith("eval-table-test-") and f"metrics: {tmp_path / 'ck' / new}" in err
    assert json.loads((tmp_path / "ck" / new).read_text())["test_abs_uri"] == str(other)
