"""Handcrafted feature losses: the equations, the network, a tiny end-to-end training, CLI and flow."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from storage.ingest import write_image_table
from storage.synthetic import SyntheticConfig, generate
from tasks.featloss.method import (
    SYNTHETIC_RECIPE,
    FeatLossConfig,
    FeatLossNet,
    amplify_weights,
    center_loss,
    class_balance_weights,
    crop_views,
    decayed_weight,
    evaluate_featloss,
    feature_loss,
    five_crop_offsets,
    load_featloss_model,
    softmax_loss,
    sparsity_objective,
    train_featloss,
    update_centers,
    variant_config,
    vote,
)
from tasks.featloss.handcrafted import HandcraftedConfig, compute_features


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Shared cores: one intra-op thread is several times faster than two here.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fl")
    table = str(root / "table")
    cfg = SyntheticConfig(size=32, train_per_class=6, val_per_class=2, test_per_class=2, pool_size=0, n_identities=12)
    write_image_table(generate(cfg), table, stage="ingest", config={"tiny": 1})
    feats = str(root / "features")
    compute_features(table, feats, HandcraftedConfig(size=32, gabor_grid=2, gsf_grid=2, sift_grid=2))
    return table, feats


def _tiny(**kw):
    base = dict(input_size=28, load_size=32, epochs=2, round_epochs=1, batch_size=16, device="cpu", fc1_dim=16)
    return FeatLossConfig(**{**base, **kw})


# ---------------------------------------------------------------- equations


def test_class_balance_weights_eq13_and_balanced_softmax_eq14():
    w = class_balance_weights([10, 20, 0, 40])
    np.testing.assert_allclose(w, np.array([1 / 10, 1 / 20, 0, 1 / 40]) / (1 / 10 + 1 / 20 + 1 / 40))
    assert w.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(class_balance_weights([5, 5, 5]), [1 / 3] * 3)
    logits = torch.randn(8, 3)
    y = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])
    # balanced weights: identical to plain cross-entropy
    bal = torch.tensor(class_balance_weights([5, 5, 5]), dtype=torch.float32)
    assert softmax_loss(logits, y, bal).item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    # imbalanced: mean_i K w_{y_i} CE_i, rare classes weigh more
    wt = torch.tensor(class_balance_weights(np.bincount(y.numpy())), dtype=torch.float32)
    ce = F.cross_entropy(logits, y, reduction="none")
    assert softmax_loss(logits, y, wt).item() == pytest.approx((3 * wt[y] * ce).mean().item(), rel=1e-5)
    assert wt[2] > wt[1] > wt[0]
    with pytest.raises(ValueError, match="no class"):
        class_balance_weights([0, 0])


def test_feature_loss_eq1_value_and_eq7_gradient():
    torch.manual_seed(0)
    v = torch.randn(4, 6, requires_grad=True)
    e = torch.rand(4, 6) + 0.1
    h = e / e.norm(dim=1, keepdim=True)  # Eq. 2
    r = (v - v.norm(dim=1, keepdim=True) * h).detach()
    loss = feature_loss(v, e, p=2)
    assert loss.item() == pytest.approx(0.5 * (r ** 2).sum(1).mean().item(), rel=1e-5)
    loss.backward()
    torch.testing.assert_close(v.grad, r / 4)  # Eq. 7, p = 2 (batch mean)
    v.grad = None
    feature_loss(v, e, p=1).backward()
    torch.testing.assert_close(v.grad, torch.sign(r) / 4)  # Eq. 7, p = 1
    # a deep feature pointing along the handcrafted one has no loss, whatever its length
    assert feature_loss(3.7 * h, e).item() == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match="differ in shape"):
        feature_loss(v, torch.rand(4, 5))


def test_center_loss_and_center_update():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 0, 1])
    c = torch.zeros(3, 2)
    assert center_loss(x, y, c).item() == pytest.approx(0.5 * (1 + 9 + 4) / 3)
    update_centers(c, x, y, alpha=0.5)
    # c_j -= alpha * sum(c_j - x_i) / (1 + n_j): class 0 -> 0.5 * 4/3, class 1 -> 0.5 * 2/2, class 2 untouched
    torch.testing.assert_close(c, torch.tensor([[2 / 3, 0.0], [0.0, 0.5], [0.0, 0.0]]))


def test_weight_decay_eq6():
    assert decayed_weight(0.05, 0.9, 0) == 0.05
    assert decayed_weight(0.05, 0.9, 3) == pytest.approx(0.05 * 0.9 ** 3)
    # unrolled recursion lambda^(t+1) = rho lambda^(t)
    lam = 1.0
    for t in range(5):
        assert decayed_weight(1.0, 0.98, t) == pytest.approx(lam)
        lam *= 0.98


def test_amplification_and_renormalisation_eq10():
    l1, l2 = amplify_weights((1.0, 1.0), 0.6, 0.5, gamma=1.2)
    assert (l1, l2) == pytest.approx((2 * 1.2 / 2.2, 2 / 2.2)) and l1 + l2 == pytest.approx(2.0)
    assert amplify_weights((1.0, 1.0), 0.5, 0.6, gamma=1.2) == pytest.approx((2 / 2.2, 2 * 1.2 / 2.2))
    assert amplify_weights((0.7, 1.3), 0.5, 0.5 + 1e-9, gamma=1.2) == pytest.approx((0.7, 1.3))  # within eps: kept
    lam = (1.0, 1.0)
    for _ in range(60):  # a loss that keeps winning takes over, the sum stays 2
        lam = amplify_weights(lam, 0.9, 0.1, gamma=1.2)
        assert sum(lam) == pytest.approx(2.0)
    assert lam[0] > 1.99 and 0 <= lam[1] < 0.01


def test_sparsity_objective_eq11():
    one_hot = torch.zeros(3, 16)
    one_hot[:, 2] = 5.0
    assert sparsity_objective(0.8, one_hot, kappa=0.1) == pytest.approx(0.8 - 0.1 / 4 * 1.0)
    dense = torch.ones(3, 16)  # ||x / ||x|| ||_1 = sqrt(16)
    assert sparsity_objective(0.8, dense, kappa=0.1) == pytest.approx(0.8 - 0.1)
    # with equal accuracy the sparser feature wins
    assert sparsity_objective(0.5, one_hot, 1e-5) > sparsity_objective(0.5, dense, 1e-5)


def test_five_crops_mirrors_and_voting_eq12():
    assert five_crop_offsets(54, 48) == [(3, 3), (0, 0), (0, 6), (6, 0), (6, 6)]
    imgs = torch.arange(2 * 3 * 8 * 8).reshape(2, 3, 8, 8)
    v = crop_views(imgs, 6)
    assert v.shape == (10, 2, 3, 6, 6)
    torch.testing.assert_close(v[0], imgs[..., 1:7, 1:7])  # centre first
    torch.testing.assert_close(v[4], imgs[..., 2:8, 2:8])  # low right
    torch.testing.assert_close(v[5], v[0].flip(-1))  # then the mirrors
    # probabilities are summed, not argmax-voted: class 1 wins although 2 of 3 views prefer class 0
    p = torch.tensor([[[0.5, 0.4, 0.1]], [[0.5, 0.4, 0.1]], [[0.0, 1.0, 0.0]]])
    assert vote(p).tolist() == [1]


def test_mirrored_views_are_guided_by_the_mirrored_images_features():
    from tasks.featloss.method import _pick

    orig, mirrored = torch.eye(3), -torch.eye(3)
    out = _pick({"gsf": (orig, mirrored)}, "gsf", torch.tensor([2, 0]), torch.tensor([True, False]), torch.device("cpu"))
    assert out.tolist() == [[0.0, 0.0, -1.0], [1.0, 0.0, 0.0]]


def test_network_structures_and_masks():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    alt = FeatLossNet("small_cnn", 7, [6, 4], "alternative", z_dim=20).eval()
    out = alt(x)
    assert out.z.shape == (3, alt.feature_dim) and out.zp.shape == (3, 20)
    assert len(out.xs) == 1 and out.xs[0].shape == (3, 10) and out.logits[0].shape == (3, 7)
    masked = alt(x, mask=1).logits[0]
    keep = torch.cat([torch.zeros(6), torch.ones(4)])
    torch.testing.assert_close(masked, alt.fc2[0](out.xs[0] * keep))
    assert alt.component(out.xs[0], 1).shape == (3, 4)
    br = FeatLossNet("small_cnn", 7, [6, 4], "branched").eval()
    o = br(x)
    assert [t.shape[1] for t in o.xs] == [6, 4] and len(o.logits) == 2
    torch.testing.assert_close(br.probs(x), (F.softmax(o.logits[0], 1) + F.softmax(o.logits[1], 1)) / 2)
    with pytest.raises(ValueError, match="alternative structure only"):
        br(x, mask=0)


def test_config_validation_and_variants():
    assert variant_config("gabor").z_feature == "gabor"
    assert variant_config("adaptive").structure == "alternative" and variant_config("adaptive").adaptive
    with pytest.raises(ValueError, match="exactly two x features"):
        FeatLossConfig(structure="branched", x_features=("gsf",))
    with pytest.raises(ValueError, match="adaptive weighting balances two"):
        FeatLossConfig(adaptive=True)
    with pytest.raises(ValueError, match="unknown handcrafted feature"):
        FeatLossConfig(x_features=("hog",))
    with pytest.raises(ValueError, match="unknown variant"):
        variant_config("lbp")
    cfg = variant_config("fixed", _tiny())
    assert FeatLossConfig(**cfg.to_dict()) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0


# ---------------------------------------------------------------- training


def test_adaptive_alternative_training_end_to_end(data, tmp_path):
    table, feats = data
    cfg = variant_config("adaptive", _tiny())
    out = str(tmp_path / "alaw")
    res = train_featloss(cfg, table, feats, out)
    assert len(res.history) == 2 and res.n_train == 42
    lam = res.lambdas
    assert sum(lam) == pytest.approx(2.0)
    for h in res.history:  # every round ran two trials and recorded their objectives
        assert len(h["obj"]) == 2 and all(math.isfinite(o) for o in h["obj"])
        o1, o2 = h["obj"]
        before = h["lambdas_before"]
        assert h["lambdas"] == pytest.approx(list(amplify_weights(tuple(before), o1, o2, cfg.gamma, cfg.eps)))
        assert math.isfinite(h["feature_x1"]) and math.isfinite(h["feature_x2"])
    model, meta = load_featloss_model(out)
    assert meta["x_dims"] == [24, 24] and meta["structure"] == "alternative"
    m = evaluate_featloss(out, table, ("test",), device="cpu")
    conf = np.asarray(m["confusion"])
    assert m["n"] == 14 == conf.sum() and conf.shape == (7, 7)
    assert m["accuracy"] == pytest.approx(np.trace(conf) / conf.sum())  # the voted predictions' accuracy
    # a rerun finds the finished run (nothing left to train) and returns it with the same results
    again = train_featloss(cfg, table, feats, out)
    assert again.lambdas == pytest.approx(lam) and len(again.history) == 2
    assert again.history == res.history and again.val == res.val
    with pytest.raises(ValueError, match="different configuration"):
        train_featloss(dataclasses.replace(cfg, lr=0.5), table, feats, out)


def test_branched_gabor_and_plain_runs(data, tmp_path):
    table, feats = data
    br = train_featloss(variant_config("branched-adaptive", _tiny(epochs=1)), table, feats, str(tmp_path / "b"))
    assert sum(br.lambdas) == pytest.approx(2.0) and len(br.history[0]["obj"]) == 2
    gb = train_featloss(variant_config("gabor", _tiny(epochs=1)), table, feats, str(tmp_path / "g"))
    assert "feature_z" in gb.history[0] and gb.lambdas is None
    plain = train_featloss(variant_config("none", _tiny(epochs=1, class_balanced=False, five_crop=False)), table,
                           None, str(tmp_path / "n"))
    assert "feature_z" not in plain.history[0] and "feature_x" not in plain.history[0]
    with pytest.raises(ValueError, match="give the handcrafted-features artifact"):
        train_featloss(variant_config("gsf", _tiny()), table, None, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="needs labeled validation rows"):
        train_featloss(variant_config("adaptive", _tiny(val_splits=("nope",))), table, feats, str(tmp_path / "y"))


def test_learning_rate_warms_up_then_follows_the_cosine_per_step():
    """The engine sets the rate of each step at its midpoint, epoch + (s + 0.5) / steps, from cfg.schedule()."""

    def rates(**kw):
        cfg = _tiny(**kw)
        sched = cfg.schedule()
        return cfg, [cfg.lr * sched.factor(e + (s + 0.5) / 4, cfg.epochs) for e in range(cfg.epochs) for s in range(4)]

    cfg, r = rates(epochs=4, lr=0.1, warmup=1)
    assert (cfg.lr_schedule, cfg.lr_unit) == ("cosine", "epoch")
    cos = [0.1 * 0.5 * (1 + math.cos(math.pi * t / 4)) for t in np.arange(16) / 4 + 1 / 8]
    assert r[4:] == pytest.approx(cos[4:])  # after the warm-up: the cosine, step by step
    assert r[:4] == pytest.approx([c * (s + 0.5) / 4 for s, c in enumerate(cos[:4])])  # linear ramp, never 0
    assert r[3] < r[4] and r[-1] < 0.002 and max(r) <= 0.1
    _, plain = rates(epochs=4, lr=0.1)  # no warm-up (the paper's schedule): cosine from the first step
    assert plain == pytest.approx(cos)
    with pytest.raises(ValueError, match="warmup"):
        _tiny(epochs=2, warmup=3)


def test_training_uses_the_per_step_rates(data, tmp_path):
    """The rates a run records are the schedule's at the step midpoints (the last step of each epoch)."""
    table, _ = data
    cfg = _tiny(epochs=2, lr=0.1, warmup=1, class_balanced=False)
    res = train_featloss(variant_config("none", cfg), table, None, str(tmp_path / "lr"))
    steps = res.epoch_records[0]["steps"]
    assert steps == 42 // 16
    want = [0.1 * cfg.schedule().factor(e + (steps - 0.5) / steps, 2) for e in range(2)]
    assert [h["lr"] for h in res.epoch_records] == pytest.approx(want)


def _states(run: str) -> dict[str, str]:
    """`fermine status RUN`'s state per stage."""
    from flows.stage import Run

    return {r["stage"]: r["state"] for r in Run(run).status()}


@pytest.mark.slow
def test_cli_compare_runs_the_featloss_pipeline_and_a_rerun_reuses_every_stage(data, tmp_path, capsys):
    from flows.cli import main

    table, _ = data
    out = str(tmp_path / "cmp")
    argv = ["featloss", "compare", out, "--table", table, "--variants", "none,fixed", "--size", "28", "--load-size",
            "32", "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--no-report"]
    main(argv)
    printed = capsys.readouterr()
    assert "Acc. vote" in printed.out and "none" in printed.out and "fixed" in printed.out
    assert "done    train-fixed" in printed.err  # the calm console of `fermine run`: a line per stage
    res = json.load(open(f"{out}/results.json"))
    assert [r["model"] for r in res["results"]] == ["none", "fixed"]
    m = res["metrics"]
    assert all(0 <= m[v]["test (5-crop + mirror vote)"]["accuracy"] <= 1 for v in ("none", "fixed"))
    assert m["fixed"]["lambdas"] == [1.0, 1.0] and m["none"]["lambdas"] is None
    states = _states(out)
    assert {"features", "train-none", "eval-none", "train-fixed", "eval-fixed"} <= set(states)
    assert set(states.values()) == {"finished"}
    main(argv)  # the same command again: every stage (the features included) reused, the same numbers
    assert set(_states(out).values()) == {"reused"}
    assert json.load(open(f"{out}/results.json"))["metrics"] == m


def test_cli_compare_on_the_synthetic_data_trains_with_the_recipe(tmp_path, capsys):
    """Without --table the comparison generates its data set and trains every variant with SYNTHETIC_RECIPE
    (warm-up + lr 0.05: the plain baseline then reaches the supervised trainer's accuracy instead of 40%)."""
    from flows.cli import main
    from storage.artifact import Artifact
    from tasks.engine.checkpoint import read_meta

    tiny = {"train_per_class": 6, "val_per_class": 2, "test_per_class": 2, "n_identities": 8}
    out = tmp_path / "syn"
    main(["featloss", "compare", str(out), "--variants", "none", "--epochs", "1", "--warmup", "0.5", "--device",
          "cpu", "--no-report", *[a for k, v in tiny.items() for a in ("--synthetic-option", f"{k}={v}")]])
    capsys.readouterr()
    res = json.load(open(out / "results.json"))
    config = read_meta(res["metrics"]["none"]["checkpoint"])["config"]
    assert {k: config[k] for k in SYNTHETIC_RECIPE} == {**SYNTHETIC_RECIPE, "epochs": 1, "warmup": 0.5}
    man = Artifact(res["artifacts"]["table"]).manifest
    assert man.config["size"] == SYNTHETIC_RECIPE["load_size"] and man.rows == 7 * 10  # five crops cut, no resize
    assert 0 <= res["metrics"]["none"]["test (5-crop + mirror vote)"]["accuracy"] <= 1


def test_features_of_another_table_are_refused(data, tmp_path):
    table, feats = data
    other = _other_table(tmp_path)
    with pytest.raises(ValueError, match="another image table"):
        train_featloss(variant_config("gsf", _tiny()), other, feats, str(tmp_path / "z"))


def _other_table(tmp_path) -> str:
    other = str(tmp_path / "other")
    write_image_table(generate(SyntheticConfig(size=32, seed=5, train_per_class=3, test_per_class=1, pool_size=0,
                                               n_identities=4)), other, stage="ingest", config={"o": 1})
    return other


class _Killed(Exception):
    pass


def _no_timing(history):
    return [{k: v for k, v in h.items() if k not in ("seconds", "trial_seconds", "images_per_s")} for h in history]


@pytest.mark.parametrize("variant", ["adaptive", "branched-adaptive"])
def test_killed_run_resumes_to_the_same_result(data, tmp_path, variant):
    """Killed after epoch 1 (mid-round) and again after epoch 2 (before a round's trials), the run resumes from
    last.pt to the very weights, lambdas and history of an uninterrupted one."""
    table, feats = data
    cfg = variant_config(variant, _tiny(epochs=3, round_epochs=2))
    whole = train_featloss(cfg, table, feats, str(tmp_path / "whole"))
    out = str(tmp_path / "killed")
    for kill_after in (1, 2):
        def cb(d, _k=kill_after):
            if d["event"] == "epoch" and d["epoch"] == _k:
                raise _Killed

        with pytest.raises(_Killed):
            train_featloss(cfg, table, feats, out, progress=cb)
        assert not os.path.exists(f"{out}/model.json") and os.path.exists(f"{out}/last.pt")
    resumed = train_featloss(cfg, table, feats, out)
    assert resumed.lambdas == whole.lambdas and sum(whole.lambdas) == pytest.approx(2.0)
    assert _no_timing(resumed.epoch_records) == _no_timing(whole.epoch_records)
    assert [h["obj"] for h in resumed.history] == [h["obj"] for h in whole.history]
    a, _ = load_featloss_model(str(tmp_path / "whole"))
    b, _ = load_featloss_model(out)
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k
    assert json.load(open(f"{out}/metrics.json"))["resumed_from_epoch"] == 2


def test_rerun_on_another_table_or_features_is_refused(data, tmp_path):
    from tasks.engine import ResumeMismatch

    table, feats = data
    out = str(tmp_path / "run")
    cfg = variant_config("none", _tiny(epochs=1))
    train_featloss(cfg, table, None, out)
    with pytest.raises(ResumeMismatch, match="contents of table"):
        train_featloss(cfg, _other_table(tmp_path), None, out)
    gsf = variant_config("gsf", _tiny(epochs=1))
    train_featloss(gsf, table, feats, str(tmp_path / "gsf"))
    feats2 = str(tmp_path / "features2")
    compute_features(table, feats2, HandcraftedConfig(size=32, gabor_grid=2, gsf_grid=2, sift_grid=2, mirror=False))
    with pytest.raises(ResumeMismatch, match="contents of features"):
        train_featloss(gsf, table, feats2, str(tmp_path / "gsf"))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_checkpoint_is_the_common_format(data, tmp_path):
    """model.pt + model.json: tasks.engine.checkpoint rebuilds the network as a classifier, so the generic evaluate
    (and predict / export) take it; a fermine 0.1 featloss.json folder is refused with how to convert."""
    from tasks.engine.checkpoint import load_checkpoint
    from tasks.evaluate import evaluate

    table, feats = data
    out = str(tmp_path / "b")
    train_featloss(variant_config("branched-fixed", _tiny(epochs=1)), table, feats, out)
    meta = json.load(open(f"{out}/model.json"))
    assert meta["model"] == {"builder": "tasks.featloss.method:network_from_meta"} and meta["method"] == "featloss"
    assert meta["task"] == "classification" and meta["structure"] == "branched" and meta["lambdas"] == [1.0, 1.0]
    assert (meta["input_size"], meta["load_size"], meta["num_classes"]) == (28, 32, 7) and len(meta["classes"]) == 7
    assert not os.path.exists(f"{out}/featloss.json")
    clf, _ = load_checkpoint(out)
    parts, _ = load_featloss_model(out)
    x = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(torch.softmax(clf(x), 1), parts.probs(x))  # log of the branch-mean probs
        assert isinstance(parts(x).logits, list)
    ev = evaluate(out, table, ("test",), device="cpu")
    assert ev.n == 14 and 0 <= ev.accuracy <= 1
    from tasks.export import export_model

    ts = torch.jit.load(export_model(out, str(tmp_path / "ts"), "torchscript"))
    with torch.no_grad():
        torch.testing.assert_close(ts(x), parts.probs(x))
    old = tmp_path / "old"
    old.mkdir()
    (old / "featloss.json").write_text("{}")
    (old / "model.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="featloss.json"):
        load_featloss_model(str(old))
    with pytest.raises(ValueError, match="not a feature-loss one"):
        from tasks.train import TrainConfig, train

        sup = str(tmp_path / "sup")
        train(TrainConfig(input_size=28, epochs=1, batch_size=16, device="cpu"), [table], sup)
        load_featloss_model(sup)


# ---------------------------------------------------------------- CLI and flow


def test_cli_features_train_and_user_errors(data, tmp_path, capsys):
    from flows.cli import main

    table, feats = data
    main(["featloss", "features", table, feats, "--size", "32", "--gabor-grid", "2", "--gsf-grid", "2",
          "--sift-grid", "2"])
    assert "reused" in capsys.readouterr().out
    out = str(tmp_path / "cli")
    main(["featloss", "train", table, out, "--features", feats, "--variant", "gsf", "--size", "28", "--load-size",
          "32", "--epochs", "1", "--batch-size", "16", "--device", "cpu"])
    text = capsys.readouterr().out
    assert "gsf" in text and "Acc. vote" in text
    assert json.load(open(f"{out}/test_metrics.json"))["n"] == 14
    assert json.load(open(f"{out}/model.json"))["method"] == "featloss"
    cases = [
        (["featloss", "train", table, str(tmp_path / "a"), "--variant", "sift"], "give --features"),
        (["featloss", "train", table, str(tmp_path / "b"), "--variant", "lbp", "--features", feats], "unknown variant"),
        (["featloss", "train", str(tmp_path / "missing"), str(tmp_path / "c")], "no finished image table"),
        (["featloss", "train", table, str(tmp_path / "d"), "--features", table], "not handcrafted features"),
        (["featloss", "train", table, str(tmp_path / "e"), "--norm", "3", "--features", feats], "norm must be 1 or 2"),
        (["featloss", "features", table, str(tmp_path / "f"), "--gabor-grid", "50"], "gabor_grid must be between"),
        (["featloss", "compare", str(tmp_path / "g"), "--variants", "none,hog"], "unknown ['hog']"),
    ]
    for argv, msg in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (argv, err)


@pytest.mark.slow
def test_prefect_flow_compares_variants_and_reuses_stages(data, tmp_path):
    from flows.featloss import featloss_flow

    table, _ = data
    out = str(tmp_path / "flow")
    cfg = {"input_size": 28, "load_size": 32, "epochs": 1, "batch_size": 16, "device": "cpu", "fc1_dim": 16}
    fcfg = {"gabor_grid": 2, "gsf_grid": 2, "sift_grid": 2, "size": 32}
    state = featloss_flow(out, table_uri=table, variants=["none", "gsf"], config=cfg, features_config=fcfg,
                          report=False, return_state=True)
    first = state.result()
    assert [r["model"] for r in first["results"]] == ["none", "gsf"]
    # the results table is in the Prefect UI too: a table artifact and a markdown one, of this flow run
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))}
    assert {"featloss-results", "featloss-summary"} <= set(arts), sorted(arts)
    rows = arts["featloss-results"].data
    assert (json.loads(rows) if isinstance(rows, str) else rows) == first["results"]
    assert "| gsf |" in arts["featloss-summary"].data
    saved = json.load(open(f"{out}/results.json"))
    assert saved["results"] == first["results"] and os.path.exists(f"{out}/results.md")
    again = featloss_flow(out, table_uri=table, variants=["none", "gsf"], config=cfg, features_config=fcfg,
                          report=False)
    assert again["results"] == first["results"]
    events = [json.loads(line)["event"] for line in open(f"{out}/ledger.jsonl")]
    assert events.count("reused") == 5  # features + 2 x (train, eval)
