"""The shared trainer: learning, resume bit-identical to an uninterrupted run, PASM Eq. 4, data paths, CLI."""

import json

import numpy as np
import pytest
import torch

from storage.images import encode
from storage.ingest import write_image_table
from tasks.engine.checkpoint import load_checkpoint, load_training_state, save_checkpoint, save_training_state
from tasks.models import build_model
from tasks.train import TrainConfig, _class_weights, train, training_loss


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests share 2 cores with other jobs: one intra-op thread avoids OpenMP oversubscription (5-10x here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

SIZE = 32


def stripe_rows(n_per_class: int, split: str, seed: int, unlabeled: int = 0, classes=range(7)):
    """Class c = a bright horizontal band at rows 4c..4c+4 over noise: separable, and flip invariant."""
    rng = np.random.default_rng(seed)
    for i in range(n_per_class):
        for c in classes:
            img = (rng.random((SIZE, SIZE, 3)) * 80).astype(np.uint8)
            img[c * 4: c * 4 + 5] += 150
            yield dict(id=f"{split}-{c}-{i}", image=encode(img), label=c, split=split, source="stripes")
    for i in range(unlabeled):
        img = (rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
        yield dict(id=f"{split}-u{i}", image=encode(img), label=None, split=split, source="stripes")


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("tables") / "stripes")

    def rows():
        yield from stripe_rows(16, "train", 0, unlabeled=6)
        yield from stripe_rows(6, "test", 1)

    write_image_table(rows(), uri, stage="test", config={}, rows_per_shard=40)
    return uri


FAST = dict(input_size=SIZE, batch_size=16, lr=0.05, seed=3)


def _same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _strip_timing(history):
    return [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s", "epochs")} for h in history]


def test_training_learns_and_writes_its_outputs(table, tmp_path):
    out = str(tmp_path / "run")
    seen = []
    res = train(TrainConfig(epochs=3, **FAST), [table], out, val_uri=table, progress=seen.append)
    assert [d["epoch"] for d in seen] == [1, 2, 3]
    assert {"loss", "train_acc", "lr", "images_per_s", "val_accuracy", "val_mean_class_accuracy"} <= seen[0].keys()
    assert res.metrics["val"]["accuracy"] > 0.6  # chance is 1/7
    assert seen[-1]["loss"] < seen[0]["loss"]
    assert res.metrics["samples_per_epoch"] == 16 * 7 and res.metrics["unlabeled_skipped"] == 6
    assert res.metrics["class_counts"] == [16] * 7
    for name in ("model.pt", "model.json", "last.pt", "metrics.json", "curves.png", "val_confusion.png"):
        assert (tmp_path / "run" / name).exists(), name
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(saved["history"]) == 3 and saved["config"]["arch"] == "small_cnn"
    model, meta = load_checkpoint(out)
    assert meta["input_size"] == SIZE and meta["metrics"]["epochs"] == 3 and meta["config"]["lr"] == 0.05
    # running again with the same settings finds the finished run and does not train
    again = train(TrainConfig(epochs=3, **FAST), [table], out, val_uri=table,
                  progress=lambda d: pytest.fail("a finished run was retrained"))
    assert again.metrics["loss"] == res.metrics["loss"]


class Killed(Exception):
    pass


def test_resume_is_identical_to_an_uninterrupted_run(table, tmp_path):
    # lr_step=1: the learning rate changes between epochs, so a resume that restarted the schedule would differ
    cfg = TrainConfig(epochs=2, lr_step=1, **FAST)
    full = train(cfg, [table], str(tmp_path / "full"))

    def kill_after_first(d):
        if d["epoch"] == 1:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, [table], str(tmp_path / "killed"), progress=kill_after_first)
    assert load_training_state(str(tmp_path / "killed"))["epoch"] == 1
    assert not (tmp_path / "killed" / "model.json").exists()  # not a finished checkpoint
    epochs_run = []
    resumed = train(cfg, [table], str(tmp_path / "killed"), progress=lambda d: epochs_run.append(d["epoch"]))
    assert epochs_run == [2]
    assert json.loads((tmp_path / "killed" / "metrics.json").read_text())["resumed_from_epoch"] == 1
    assert json.loads((tmp_path / "full" / "metrics.json").read_text())["resumed_from_epoch"] == 0
    _same_weights(load_checkpoint(str(tmp_path / "full"))[0].state_dict(),
                  load_checkpoint(str(tmp_path / "killed"))[0].state_dict())
    assert _strip_timing(resumed.history) == _strip_timing(full.history)
    assert [h["lr"] for h in full.history] == [0.05, pytest.approx(0.005)]

    # a 1-epoch run extended to 2 epochs follows the same schedule as well
    train(TrainConfig(epochs=1, lr_step=1, **FAST), [table], str(tmp_path / "short"))
    extended = train(cfg, [table], str(tmp_path / "short"))
    assert _strip_timing(extended.history) == _strip_timing(full.history)
    _same_weights(load_checkpoint(str(tmp_path / "full"))[0].state_dict(),
                  load_checkpoint(str(tmp_path / "short"))[0].state_dict())


def test_resume_refuses_other_settings_and_no_resume_starts_over(table, tmp_path):
    out = str(tmp_path / "run")
    train(TrainConfig(epochs=1, **FAST), [table], out)
    with pytest.raises(ValueError, match=r"different configuration \(lr: 0.05 -> 0.1\)"):
        train(TrainConfig(epochs=2, **{**FAST, "lr": 0.1}), [table], out)
    # a state with more epochs than asked (e.g. --epochs lowered) is not silently truncated
    state = load_training_state(out)
    state["epoch"] = 5
    save_training_state(out, state)
    with pytest.raises(ValueError, match="already holds 5 epochs, more than the 1 asked"):
        train(TrainConfig(epochs=1, **FAST), [table], out)
    res = train(TrainConfig(epochs=1, **{**FAST, "lr": 0.1}), [table], out, resume=False)
    assert res.history[0]["lr"] == 0.1 and load_training_state(out)["epoch"] == 1


def test_resume_refuses_a_table_rewritten_under_the_same_path(tmp_path):
    """E.g. the mined samples remade with another margin: the old model must not be reused as if new."""
    import shutil

    aux = str(tmp_path / "aux")
    write_image_table(stripe_rows(4, "train", 0), aux, stage="test", config={})
    out = str(tmp_path / "run")
    train(TrainConfig(epochs=1, **FAST), [aux], out)
    assert train(TrainConfig(epochs=1, **FAST), [aux], out).history  # unchanged: the finished run is reused
    shutil.rmtree(aux)
    write_image_table(stripe_rows(4, "train", 7), aux, stage="test", config={})
    with pytest.raises(ValueError, match="other contents"):
        train(TrainConfig(epochs=1, **FAST), [aux], out)


def test_training_loss_is_pasm_eq4():
    torch.manual_seed(0)
    logits, teacher = torch.randn(8, 7), torch.randn(8, 7)
    y = torch.randint(0, 7, (8,))
    ce = torch.nn.functional.cross_entropy(logits, y)
    mse = ((logits - teacher) ** 2).mean()
    assert torch.equal(training_loss(logits, y), ce)
    assert torch.equal(training_loss(logits, y, teacher, alpha=1.0, beta=0.0), ce)
    torch.testing.assert_close(training_loss(logits, y, teacher, alpha=0.7, beta=0.5), 0.7 * ce + 0.5 * mse)


def test_teacher_term_changes_training_and_beta_zero_equals_plain_ce(table, tmp_path):
    torch.manual_seed(9)
    teacher = build_model("small_cnn")
    plain = train(TrainConfig(epochs=1, **FAST), [table], str(tmp_path / "plain"))
    train(TrainConfig(epochs=1, beta=0.0, **FAST), [table], str(tmp_path / "zero"), teacher=teacher)
    guided = train(TrainConfig(epochs=1, beta=0.5, **FAST), [table], str(tmp_path / "guided"), teacher=teacher)
    w = {k: load_checkpoint(str(tmp_path / k))[0].state_dict() for k in ("plain", "zero", "guided")}
    _same_weights(w["plain"], w["zero"])
    assert not torch.equal(w["plain"]["head.weight"], w["guided"]["head.weight"])
    assert guided.history[0]["loss"] != plain.history[0]["loss"]
    # the teacher is frozen: training the student never touches it
    assert all(not p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="needs a teacher"):
        train(TrainConfig(epochs=1, beta=0.5, **FAST), [table], str(tmp_path / "x"))


def test_resume_refuses_another_teacher(table, tmp_path):
    """A student trained with one teacher is never reused or resumed as if trained with another."""
    torch.manual_seed(3)
    first, second = build_model("small_cnn"), build_model("small_cnn")
    out = str(tmp_path / "student")
    train(TrainConfig(epochs=1, beta=0.5, **FAST), [table], out, teacher=first)
    assert train(TrainConfig(epochs=1, beta=0.5, **FAST), [table], out, teacher=first).history  # reused
    with pytest.raises(ValueError, match="other contents of teacher"):
        train(TrainConfig(epochs=1, beta=0.5, **FAST), [table], out, teacher=second)


def test_init_from_a_checkpoint(table, tmp_path):
    torch.manual_seed(5)
    start = build_model("small_cnn")
    save_checkpoint(str(tmp_path / "start"), start, {"input_size": SIZE})
    seen = {}

    def snapshot(**kw):
        # the loss hook sees the model before its first update: it must hold the initial weights
        if not seen:
            seen["w"] = kw["model"].head.weight.detach().clone()
        return torch.zeros((), device=kw["logits"].device)

    res = train(TrainConfig(epochs=1, **FAST), [table], str(tmp_path / "run"), init_from=str(tmp_path / "start"),
                loss_hook=snapshot)
    assert torch.equal(seen["w"], start.head.weight)
    assert "tensors loaded" in res.metrics["init"]


def test_streaming_loader_sees_every_row_once_and_resumes_identically(table, tmp_path):
    cfg = TrainConfig(epochs=2, data="stream", num_workers=2, shuffle_buffer=32, **FAST)
    res = train(cfg, [table], str(tmp_path / "s"))
    assert res.metrics["data_mode"] == "stream"
    assert [h["samples"] for h in res.history] == [16 * 7, 16 * 7]  # the 6 unlabeled rows are skipped
    assert res.metrics["class_counts"] == [16] * 7

    def kill(d):
        raise Killed

    with pytest.raises(Killed):
        train(cfg, [table], str(tmp_path / "k"), progress=kill)
    resumed = train(cfg, [table], str(tmp_path / "k"))
    assert _strip_timing(resumed.history) == _strip_timing(res.history)
    _same_weights(load_checkpoint(str(tmp_path / "s"))[0].state_dict(),
                  load_checkpoint(str(tmp_path / "k"))[0].state_dict())


def test_union_of_tables_and_class_balanced_weights(table, tmp_path):
    other = str(tmp_path / "other")
    write_image_table(stripe_rows(4, "train", 7, classes=[0, 1]), other, stage="test", config={})
    res = train(TrainConfig(epochs=1, class_balanced=True, **FAST), [table, other], str(tmp_path / "u"))
    assert res.metrics["class_counts"] == [20, 20, 16, 16, 16, 16, 16]
    w = _class_weights(torch.tensor([10, 30, 0]))
    torch.testing.assert_close(w, torch.tensor([2.0, 2 / 3, 0.0]))


def test_bad_inputs_are_reported(table, tmp_path):
    with pytest.raises(ValueError, match=r"no labeled rows in split\(s\) \['nosuch'\]"):
        train(TrainConfig(epochs=1, train_splits=("nosuch",), **FAST), [table], str(tmp_path / "a"))
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=1)
    from storage.artifact import ArtifactError

    with pytest.raises(ArtifactError, match="no artifact"):
        train(TrainConfig(epochs=1, **FAST), [str(tmp_path / "missing")], str(tmp_path / "b"))


def test_cli_train(table, tmp_path, capsys):
    from flows.cli import main

    out = str(tmp_path / "cli")
    main(["train", table, out, "--size", str(SIZE), "--epochs", "1", "--batch-size", "16", "--val", table,
          "--json", str(tmp_path / "m.json"), "--device", "cpu"])
    assert (tmp_path / "cli" / "model.json").exists()
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["final"]["epochs"] == 1 and "val" in m["final"]
    with pytest.raises(SystemExit) as e:
        main(["train", str(tmp_path / "nope"), out])
    assert e.value.code == 2
    assert "no finished image table" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", table, str(tmp_path / "c2"), "--arch", "resnet7"])
    assert e.value.code == 2
    assert "unknown --arch 'resnet7'" in capsys.readouterr().err


def test_stream_epochs_reshuffle_and_replay(table):
    """Persistent workers must see each new epoch (new order) and replay an epoch exactly."""
    from tasks.engine.loaders import StreamSource as _StreamSource

    cfg = TrainConfig(data="stream", shuffle_buffer=32, **FAST)
    src = _StreamSource([table], cfg, num_workers=2, device=torch.device("cpu"), class_counts=None, rows=112)

    def epoch(e):
        xs, ys = zip(*src.batches(e))
        return torch.cat(xs), torch.cat(ys)

    x1, y1 = epoch(1)
    x2, y2 = epoch(2)
    x1b, y1b = epoch(1)
    assert len(y1) == len(y2) == 112
    assert not torch.equal(y1, y2)
    assert torch.equal(x1, x1b) and torch.equal(y1, y1b)
    assert sorted(y1.tolist()) == sorted(y2.tolist())
