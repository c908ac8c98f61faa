"""Progressive Teacher (tasks/pt/method.py): the paper's formulas, the routing of selected
samples between pairs, and the mechanism on a small noisy set (noisy labels are filtered out far
more often than clean ones)."""

from __future__ import annotations

import json
import os
import math

import numpy as np
import pytest
import torch
from torch import nn

from storage.artifact import Artifact, ArtifactWriter
from storage.images import encode
from storage.schema import IMAGE_SCHEMA, image_row
from tasks.data import normalize
from tasks.engine import ResumeMismatch
from tasks.pt.label_noise import inject_noise
from tasks.models import FERNet
from tasks.pt.method import (PTConfig, PTNet, consistency_weight, ema_alpha, ema_update,
                                       mean_teacher_config, pt_step, resolve_forget_rate, routing, selection_ratio,
                                       small_loss_selection, train_pt)

# ---------------------------------------------------------------- formulas


def test_ema_alpha_follows_the_paper_schedule():
    assert ema_alpha(1) == pytest.approx(0.5)
    assert ema_alpha(9) == pytest.approx(0.9)
    assert ema_alpha(99) == pytest.approx(0.99)
    assert ema_alpha(10_000) == pytest.approx(0.999)  # capped
    assert ema_alpha(10_000, ema_max=0.99) == pytest.approx(0.99)


def test_ema_update_averages_parameters_and_optionally_buffers():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    student(torch.randn(8, 3))  # moves the student's BN running stats and counter
    for buffers in (False, True):
        torch.manual_seed(1)
        teacher = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
        before = {k: v.clone() for k, v in teacher.state_dict().items()}
        ema_update(teacher, student, 0.75, buffers=buffers)
        params = {k for k, _ in teacher.named_parameters()}
        for k, v in teacher.state_dict().items():
            s = student.state_dict()[k]
            if k in params or (buffers and v.dtype.is_floating_point):
                assert torch.allclose(v, 0.75 * before[k] + 0.25 * s), k
            elif buffers:
                assert torch.equal(v, s), k  # num_batches_tracked is copied
            else:
                assert torch.equal(v, before[k]), k  # PT's teachers keep BN statistics of their own


def test_selection_ratio_progressive_and_fixed():
    r, T = 0.4, 300
    assert selection_ratio(0, r, T) == 1.0
    assert selection_ratio(150, r, T) == pytest.approx(0.8)
    assert selection_ratio(300, r, T) == pytest.approx(0.6)
    assert selection_ratio(5000, r, T) == pytest.approx(0.6)  # stays at 1 - r after T
    assert all(selection_ratio(t, r, T, "fixed") == pytest.approx(0.6) for t in (0, 1, 150, 5000))
    with pytest.raises(ValueError):
        selection_ratio(1, r, T, "linear")


def test_consistency_weight_ramps_up_to_ten():
    assert consistency_weight(0, 6) == pytest.approx(10 * math.exp(-5))
    assert consistency_weight(3, 6) == pytest.approx(10 * math.exp(-5 * 0.25))
    assert consistency_weight(6, 6) == pytest.approx(10.0)
    ws = [consistency_weight(e / 4, 6) for e in range(25)]
    assert all(a < b for a, b in zip(ws, ws[1:]))


def test_small_loss_selection_keeps_the_smallest_ceil_fraction():
    losses = torch.tensor([0.9, 0.1, 0.5, 0.3, 2.0, 0.2, 0.7, 1.1, 0.05, 0.6])
    m = small_loss_selection(losses, 0.7)  # 0.7 * 10 is 7, not 8, despite floating point
    assert m.sum() == 7
    assert set(torch.nonzero(m).flatten().tolist()) == {1, 2, 3, 5, 6, 8, 9}
    assert small_loss_selection(losses, 0.65).sum() == 7  # ceil: |B'| >= R |B|
    assert small_loss_selection(losses, 1.0).all()
    assert not small_loss_selection(losses, 0.0).any()
    ties = small_loss_selection(torch.ones(4), 0.5)
    assert ties.tolist() == [True, True, False, False]  # stable: deterministic on ties
    assert small_loss_selection(torch.zeros(0), 0.5).numel() == 0


def test_routing_cross_sends_each_selection_to_the_other_pair():
    assert routing(2, "cross") == [1, 0]
    assert routing(2, "same") == [0, 1]
    assert routing(1, "same") == [0]
    assert routing(3, "cross") == [1, 2, 0]
    with pytest.raises(ValueError, match="at least 2"):
        routing(1, "cross")


def test_config_validation_and_forget_rate_rule():
    with pytest.raises(ValueError, match="cross guidance needs n_pairs >= 2"):
        PTConfig(n_pairs=1)
    with pytest.raises(ValueError, match="ratio"):
        PTConfig(ratio="linear")
    assert PTConfig().labeled_per_batch == 50  # 200 * 1/4, the paper's batch
    mt = mean_teacher_config(PTConfig())
    assert (mt.n_pairs, mt.guidance, mt.forget_rate) == (1, "same", 0.0)
    assert resolve_forget_rate(None, None) == 0.05
    assert resolve_forget_rate(None, {"kind": "symmetric", "rate": 0.3}) == pytest.approx(0.4)
    assert resolve_forget_rate(None, {"kind": "symmetric", "rate": 0.3}, margin=0.0) == pytest.approx(0.3)
    assert resolve_forget_rate(None, {"kind": "asymmetric", "rate": 0.1}) == pytest.approx(0.05)
    assert resolve_forget_rate(None, {"kind": "asymmetric", "rate": 0.3}) == pytest.approx(0.1)
    assert resolve_forget_rate(0.2, {"kind": "symmetric", "rate": 0.3}) == 0.2


def test_finetune_baseline_is_matched_to_the_pt_recipe():
    from tasks.pt.method import finetune_config

    t = finetune_config(PTConfig())
    assert (t.epochs, t.batch_size, t.lr, t.lr_schedule, t.lr_milestones, t.lr_gamma, t.weight_decay) == \
        (6, 50, 0.01, "multistep", (3,), 0.1, 5e-4)
    assert finetune_config(PTConfig(epochs=12, lr_milestones=(8,))).lr_milestones == (8,)
    # Both are Recipes: the baseline runs PT's own schedule, whatever it is (no StepLR approximation).
    t = finetune_config(PTConfig(epochs=6, lr_milestones=(2, 5), optimizer="adam"))
    assert (t.lr_milestones, t.optimizer) == ((2, 5), "adam")
    assert [t.schedule().factor(e + 0.5, 6) for e in range(6)] == \
        pytest.approx([PTConfig(lr_milestones=(2, 5)).schedule().factor(e + 0.5, 6) for e in range(6)])


# ---------------------------------------------------------------- one step, controlled networks


class _Ones(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_ones(x.shape[0], 1)


def _const_net(bias: tuple[float, float], confidence: bool = False, conf_bias: float = 0.0) -> PTNet:
    """A 2-class net whose logits are its head bias, whatever the image: its CE ranks samples by label."""
    net = PTNet(FERNet("const", _Ones(), 1, 2), confidence)
    with torch.no_grad():
        net.net.head.weight.zero_()
        net.net.head.bias.copy_(torch.tensor(bias))
        if confidence:
            net.conf.weight.zero_()
            net.conf.bias.fill_(conf_bias)
    return net


def _step(guidance: str, teachers: list[PTNet], cfg_kw: dict | None = None):
    cfg = PTConfig(guidance=guidance, num_classes=2, turn_iters=1, consistency_max=0.0, momentum=0.0,
                   weight_decay=0.0, lr=0.5, hflip=False, **(cfg_kw or {}))
    students = [_const_net((0.0, 0.0)) for _ in range(2)]
    opts = [torch.optim.SGD(s.parameters(), lr=cfg.lr) for s in students]
    xl = torch.zeros(4, 3, 4, 4, dtype=torch.uint8)
    yl = torch.tensor([0, 0, 1, 1])
    info = pt_step(students, teachers, opts, xl, yl, None, t=5, epoch_pos=0.0, cfg=cfg, forget_rate=0.5,
                   gen=torch.Generator().manual_seed(0), conf_lambda=[0.1, 0.1])
    return info, students


@pytest.mark.parametrize("guidance", ["cross", "same"])
def test_selected_samples_train_the_routed_student(guidance):
    # Teacher 0 believes class 0, teacher 1 class 1: each keeps (R = 0.5) the samples labeled with its class.
    teachers = [_const_net((3.0, 0.0)), _const_net((0.0, 3.0))]
    info, students = _step(guidance, teachers)
    assert info.selected[0].tolist() == [True, True, False, False]
    assert info.selected[1].tolist() == [False, False, True, True]
    learned = [int(s.net.head.bias.argmax()) for s in students]  # the class each student was taught
    if guidance == "cross":
        assert info.selector_of_student == [1, 0]
        assert info.used_by_student[0].tolist() == [False, False, True, True]
        assert learned == [1, 0]  # student 0 learned teacher 1's selection, and vice versa
    else:
        assert learned == [0, 1]


def test_teachers_follow_students_by_ema_after_the_step():
    teachers = [_const_net((3.0, 0.0)), _const_net((0.0, 3.0))]
    info, students = _step("cross", teachers)
    assert info.alpha == pytest.approx(ema_alpha(5))
    for t, s, b in zip(teachers, students, [(3.0, 0.0), (0.0, 3.0)]):
        want = info.alpha * torch.tensor(b) + (1 - info.alpha) * s.net.head.bias
        assert torch.allclose(t.net.head.bias, want)


@pytest.mark.parametrize("conf_bias,kept", [(10.0, 2), (-10.0, 0)])
def test_confidence_estimator_keeps_confident_large_loss_samples(conf_bias, kept):
    teachers = [_const_net((3.0, 0.0), True, conf_bias), _const_net((0.0, 3.0), True, conf_bias)]
    cfg_kw = {"confidence_estimator": True, "confidence_threshold": 0.9}
    info, _ = _step("cross", teachers, cfg_kw)
    for k in range(2):
        assert int(info.small_loss[k].sum()) == 2
        assert int(info.conf_kept[k].sum()) == kept
        assert torch.equal(info.selected[k], info.small_loss[k] | info.conf_kept[k])


def test_step_through_the_engines_backward_step_is_the_same_update():
    # The engine routes each student's update through ctx.backward_step (AMP scaling, clipping); without
    # either it must be exactly pt_step's own zero_grad / backward / step.
    import copy

    from tasks.engine import StepContext

    cfg = PTConfig(num_classes=2, batch_size=8, labeled_fraction=0.5, turn_iters=1, hflip=True, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    xl = torch.randint(0, 256, (4, 3, 4, 4), generator=g, dtype=torch.uint8)
    xu = torch.randint(0, 256, (4, 3, 4, 4), generator=g, dtype=torch.uint8)
    yl = torch.tensor([0, 1, 0, 1])
    nets = [_bn_net(0), _bn_net(1)], [_bn_net(2), _bn_net(3)]
    ctx = StepContext(torch.device("cpu"), 0, False, None, 1)
    results = []
    for backward_step in (None, lambda loss, opt: ctx.backward_step(loss, [opt])):
        students, teachers = copy.deepcopy(nets)
        opts = [torch.optim.SGD(s.parameters(), lr=0.1, momentum=0.9) for s in students]
        for t in (1, 2):  # two steps: momentum buffers too
            pt_step(students, teachers, opts, xl, yl, xu, t=t, epoch_pos=0.5, cfg=cfg, forget_rate=0.5,
                    gen=torch.Generator().manual_seed(t), backward_step=backward_step)
        results.append([p.detach().clone() for n in (*students, *teachers) for p in n.state_dict().values()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def _bn_net(seed: int) -> PTNet:
    """A net whose train-mode outputs depend on the batch's BatchNorm statistics."""
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 4), nn.BatchNorm1d(4))
    return PTNet(FERNet("bn", body, 4, 2), False)


@pytest.mark.parametrize("split_bn", [False, True])
def test_split_bn_keeps_pool_statistics_out_of_the_labeled_pass(split_bn):
    # The teachers' losses on the labeled images (what the selection ranks) must not depend on which pool
    # images share the batch when split_bn is on; with one joint pass they do.
    cfg = PTConfig(num_classes=2, batch_size=8, labeled_fraction=0.5, turn_iters=1, hflip=False, split_bn=split_bn)
    g = torch.Generator().manual_seed(0)
    xl = torch.randint(0, 256, (4, 3, 4, 4), generator=g, dtype=torch.uint8)
    yl = torch.tensor([0, 1, 0, 1])
    pools = [torch.randint(0, 60, (4, 3, 4, 4), generator=g, dtype=torch.uint8),
             torch.randint(190, 256, (4, 3, 4, 4), generator=g, dtype=torch.uint8)]
    losses = []
    for xu in pools:
        students, teachers = [_bn_net(0), _bn_net(1)], [_bn_net(0), _bn_net(1)]
        opts = [torch.optim.SGD(s.parameters(), lr=0.01) for s in students]
        info = pt_step(students, teachers, opts, xl, yl, xu, t=1, epoch_pos=0.0, cfg=cfg, forget_rate=0.5,
                       gen=torch.Generator().manual_seed(0))
        losses.append(torch.stack(info.teacher_losses))
    if split_bn:
        assert torch.allclose(losses[0], losses[1])
        teacher = _bn_net(0).train()
        assert torch.allclose(losses[0][0], nn.functional.cross_entropy(
            teacher(normalize(xl))[0], yl, reduction="none"), atol=1e-6)  # = a labeled-only pass
    else:
        assert not torch.allclose(losses[0], losses[1])


def test_split_bn_needs_two_images_in_each_part():
    with pytest.raises(ValueError, match="split_bn needs >= 2 labeled"):
        PTConfig(batch_size=4, labeled_fraction=0.25, split_bn=True)  # 1 labeled image per batch
    assert PTConfig(batch_size=8, labeled_fraction=0.25, split_bn=True).split_bn


# ---------------------------------------------------------------- end to end on a tiny learnable set

COLORS = np.array([[220, 40, 40], [40, 200, 40], [40, 60, 220], [220, 210, 40], [210, 40, 210], [40, 210, 210],
                   [128, 128, 128]], dtype=np.float64)
K = len(COLORS)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # On a shared 2-core machine, two intra-op threads spin against each other and other processes and
    # run these tiny convolutions ~20x slower than one thread; restore the setting for other modules.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _color_table(uri: str, per_class: int = 20, test_per_class: int = 6, pool: int = 140, size: int = 16,
                 seed: int = 0) -> None:
    """7 classes told apart by colour (plus pixel noise): learnable in a few dozen SGD steps."""
    rng = np.random.default_rng(seed)

    def img(c: int) -> bytes:
        a = COLORS[c][None, None, :] + rng.normal(0, 25, (size, size, 3))
        return encode(np.clip(a, 0, 255).astype(np.uint8))

    rows = []
    for split, n in (("train", per_class), ("test", test_per_class)):
        for i in range(n * K):
            rows.append(image_row(f"{split}/{i:04d}", img(i % K), label=i % K, split=split, source="colors"))
    rows += [image_row(f"pool/{i:04d}", img(int(rng.integers(K))), split="pool", source="colors")
             for i in range(pool)]
    with ArtifactWriter(uri, stage="ingest", rows_per_shard=64, schema=IMAGE_SCHEMA) as w:
        w.write_rows(rows)


def _tiny_cfg(**kw) -> PTConfig:
    base = dict(input_size=16, epochs=3, batch_size=32, lr_milestones=(2,), turn_iters=20, pool_splits=("pool",),
                seed=0)
    base.update(kw)
    return PTConfig(**base)


@pytest.fixture(scope="module")
def noisy_colors(tmp_path_factory):
    d = tmp_path_factory.mktemp("colors")
    clean, noisy = str(d / "clean"), str(d / "noisy")
    _color_table(clean)
    inject_noise(clean, noisy, "symmetric", 0.3, seed=0)
    return clean, noisy


def test_pt_filters_noisy_labels_far_more_than_clean_ones(noisy_colors, tmp_path):
    clean, noisy = noisy_colors
    out = str(tmp_path / "pt")
    events = []
    res = train_pt(_tiny_cfg(), noisy, clean, out, progress=events.append)
    m = res.metrics
    assert res.forget_rate == pytest.approx(0.4)  # the paper's rule: 30% symmetric noise + 0.1
    assert m["noisy_labels"] == 42  # round(0.3 * 20) in each of 7 classes
    # The core claim: large-loss samples are the mislabeled ones.
    assert m["noisy_filtered_rate"] >= 0.7, m
    assert m["clean_filtered_rate"] <= 0.25, m
    assert m["noisy_filter_rate_all_epochs"] > 2 * m["clean_filter_rate_all_epochs"], m
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2, 3]
    assert res.history[-1]["ratio"] == pytest.approx(0.6)

    # The saved teacher is an ordinary checkpoint: tasks.evaluate reads it, and it learned the classes.
    from tasks.engine.checkpoint import load_checkpoint
    from tasks.evaluate import evaluate

    model, meta = load_checkpoint(res.checkpoint_uri)
    assert meta["input_size"] == 16 and meta["method"] == "progressive_teacher"
    assert meta["label_noise"]["rate"] == 0.3 and meta["forget_rate"] == pytest.approx(0.4)
    ev = evaluate(res.checkpoint_uri, clean, splits=("test",), device="cpu")
    assert ev.accuracy >= 0.9

    # The per-sample record and the run summary.
    f = Artifact(res.filtered_uri).read()
    assert f.num_rows == 140 and set(f.column("id").to_pylist()) == {f"train/{i:04d}" for i in range(140)}
    assert sum(f.column("filtered_out").to_pylist()) == m["filtered_out"]
    summary = json.loads(open(f"{out}/pt.json").read())
    assert summary["label_noise"]["kind"] == "symmetric" and summary["metrics"]["config"]["n_pairs"] == 2

    # Report: per class counts add up, and a figure is drawn.
    from tasks.pt.report import write_report

    rep = write_report(out, noisy, size=16)
    total = rep.rows[-1]
    assert total["class"] == "all" and total["filtered"] == m["filtered_out"]
    assert sum(r["filtered"] for r in rep.rows[:-1]) == total["filtered"]
    assert total["noisy_filtered"] + total["clean_filtered"] == total["filtered"]
    assert rep.png_uri is not None and open(rep.png_uri, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "noisy filt." in rep.table

    # Rerunning the finished run returns it; a different config or table into the same folder is refused,
    # naming what differs.
    assert train_pt(_tiny_cfg(), noisy, clean, out).metrics["filtered_out"] == m["filtered_out"]
    with pytest.raises(ResumeMismatch, match="seed"):
        train_pt(_tiny_cfg(seed=1), noisy, clean, out)
    with pytest.raises(ResumeMismatch, match="labeled"):
        train_pt(_tiny_cfg(), clean, clean, out)  # the same folder, another labeled table


def test_large_pools_stream_through_a_bounded_shuffle_buffer(noisy_colors):
    from tasks.pt.method import _Pool

    clean, _ = noisy_colors
    streamed = _Pool(clean, 16, ["pool"], buffer_rows=32)  # 140 pool rows > 32: streamed, not cached
    cached = _Pool(clean, 16, ["pool"], buffer_rows=1000)
    assert streamed.cached is None and cached.cached is not None and streamed.rows == cached.rows == 140
    key = lambda x: x.flatten(1)[:, :48].numpy().tobytes()  # an image's identity (first pixels)
    everything = {bytes(key(cached.cached[i:i + 1])) for i in range(140)}
    for pool in (streamed, cached):
        it = pool.batches(24, torch.Generator().manual_seed(0))
        seen = [bytes(key(b[i:i + 1])) for b in (next(it) for _ in range(12)) for i in range(24)]
        assert all(s in everything for s in seen)
        assert len(set(seen[:140])) >= 120  # a pass covers (nearly) the whole pool, in random order
        again = pool.batches(24, torch.Generator().manual_seed(0))
        assert torch.equal(next(again), next(pool.batches(24, torch.Generator().manual_seed(0))))


def test_mean_teacher_is_one_pair_without_filtering(noisy_colors, tmp_path):
    clean, noisy = noisy_colors
    res = train_pt(mean_teacher_config(_tiny_cfg(epochs=1)), noisy, clean, str(tmp_path / "mt"))
    assert res.metrics["method"] == "mean_teacher" and res.metrics["filtered_out"] == 0
    assert Artifact(res.filtered_uri).read().column("filtered").to_pylist() == [0] * 140


class _Stop(Exception):
    pass


def test_interrupted_run_resumes_to_identical_result(noisy_colors, tmp_path):
    clean, noisy = noisy_colors
    cfg = _tiny_cfg(epochs=2)
    full = train_pt(cfg, noisy, clean, str(tmp_path / "full"))

    def stop_after_first_epoch(e):
        if e["event"] == "epoch" and e["epoch"] == 1:
            raise _Stop

    part = str(tmp_path / "part")
    with pytest.raises(_Stop):
        train_pt(cfg, noisy, clean, part, progress=stop_after_first_epoch)
    resumed = train_pt(cfg, noisy, clean, part)
    from tasks.engine.checkpoint import load_checkpoint

    a, _ = load_checkpoint(full.checkpoint_uri)
    b, _ = load_checkpoint(resumed.checkpoint_uri)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    fa, fb = Artifact(full.filtered_uri).read(), Artifact(resumed.filtered_uri).read()
    for name in fa.schema.names:  # column by column: last_loss is nan for samples unseen in the last epoch
        np.testing.assert_array_equal(np.array(fa.column(name).to_pylist(), dtype=object if name == "id" else None),
                                      np.array(fb.column(name).to_pylist(), dtype=object if name == "id" else None))
    # An unfinished run is resumed only with the same settings.
    other = str(tmp_path / "other")
    with pytest.raises(_Stop):
        train_pt(cfg, noisy, clean, other, progress=stop_after_first_epoch)
    with pytest.raises(ResumeMismatch, match="different configuration.*lr: 0.01 -> 0.02"):
        train_pt(_tiny_cfg(epochs=2, lr=0.02), noisy, clean, other)
    with pytest.raises(ResumeMismatch, match="other contents of labeled"):
        train_pt(cfg, clean, clean, other)  # same settings, another labeled table


def test_resume_keeps_the_validation_choice_and_confidence_state(noisy_colors, tmp_path):
    # With a validation table the best (epoch, pair) teacher's weights live in the method's state, and
    # the confidence penalties' lambdas too: a run killed after epoch 1 still ends bit-identical.
    from tasks.engine.checkpoint import load_checkpoint

    clean, noisy = noisy_colors
    cfg = _tiny_cfg(epochs=2, val_splits=("test",), confidence_estimator=True)
    full = train_pt(cfg, noisy, clean, str(tmp_path / "full"), val_uri=clean)

    def stop_after_first_epoch(e):
        if e["event"] == "epoch" and e["epoch"] == 1:
            raise _Stop

    part = str(tmp_path / "part")
    with pytest.raises(_Stop):
        train_pt(cfg, noisy, clean, part, progress=stop_after_first_epoch, val_uri=clean)
    resumed = train_pt(cfg, noisy, clean, part, val_uri=clean)
    (a, meta), (b, _) = load_checkpoint(full.checkpoint_uri), load_checkpoint(resumed.checkpoint_uri)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert [h["val_accuracy"] for h in resumed.history] == [h["val_accuracy"] for h in full.history]
    best = max((acc, -e, k) for e, h in enumerate(full.history) for k, acc in enumerate(h["val_accuracy"]))
    chosen = meta["chosen_teacher"]
    assert chosen["val_accuracy"] == best[0] and full.metrics["teacher"] == chosen
    with pytest.raises(ResumeMismatch, match="inputs"):
        train_pt(cfg, noisy, clean, part)  # the finished run had a validation table; this one has none


def test_bad_inputs_are_clear_errors(noisy_colors, tmp_path):
    clean, noisy = noisy_colors
    with pytest.raises(ValueError, match="no labeled rows|no rows"):
        train_pt(_tiny_cfg(train_splits=("nope",)), noisy, clean, str(tmp_path / "a"))
    with pytest.raises(ValueError, match="no rows"):
        train_pt(_tiny_cfg(pool_splits=("nope",)), noisy, clean, str(tmp_path / "b"))


# ---------------------------------------------------------------- CLI


def test_cli_compare_prints_a_table_4_like_comparison(noisy_colors, tmp_path, capsys):
    from flows.cli import main
    from flows.stage import Run

    clean, _ = noisy_colors
    out = str(tmp_path / "cli")
    args = ["pt", clean, clean, clean, out, "--compare", "--noise", "0.3", "--epochs", "1", "--size", "16",
            "--batch-size", "32", "-T", "10", "--pool-split", "pool", "--device", "cpu"]
    main(args)
    text = capsys.readouterr().out
    for name in ("Fine-tune (baseline)", "Mean Teacher", "PT", "acc"):
        assert name in text
    res = json.loads(open(f"{out}/results.json").read())["rows"]
    assert [r["method"] for r in res] == ["Fine-tune (baseline)", "Mean Teacher", "PT"]
    assert all(r["noise"] == 0.3 and 0 <= r["accuracy"] <= 1 for r in res)
    assert res[2]["forget_rate"] == pytest.approx(0.4)
    # The command runs the pt pipeline: its stages are in the run's ledger, and a rerun reuses them all.
    assert {"noise-symmetric-30", "finetune-30", "mean-teacher-30", "pt-30", "pt-report-30", "eval-pt-30"} <= {
        r["stage"] for r in Run(out).status()}
    main(args)
    assert {r["state"] for r in Run(out).status()} == {"reused"}


def test_cli_reports_user_mistakes_without_a_traceback(tmp_path, capsys):
    from flows.cli import main

    with pytest.raises(SystemExit) as e:
        main(["pt", str(tmp_path / "missing"), "-", str(tmp_path / "missing"), str(tmp_path / "o")])
    assert e.value.code == 2
    assert "no finished image table" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["pt", "x", "-", "x", str(tmp_path / "o"), "--noise", "1.5"])
    assert e.value.code == 2
    # Settings are checked before any data is generated: nothing is written for a bad one.
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["pt", "synthetic", "synthetic", "synthetic", str(tmp_path / "s"), "--consistency-max", "-1"])
    assert e.value.code == 2 and "consistency_max" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_prefect_flow_builds_table_4_and_reuses_finished_stages(noisy_colors, tmp_path):
    from flows.pt import pt_flow

    clean, _ = noisy_colors
    out = str(tmp_path / "flow")
    cfg = {"input_size": 16, "epochs": 1, "batch_size": 32, "turn_iters": 10, "pool_splits": ["pool"], "device": "cpu"}
    first = pt_flow(clean, out, pool_uri=clean, noise_rates=[0.3], config=cfg)
    assert [r["method"] for r in first["rows"]] == ["Fine-tune (baseline)", "Mean Teacher", "PT"]
    pt_row = first["rows"][-1]
    assert pt_row["forget_rate"] == pytest.approx(0.4) and "report" in pt_row
    assert json.load(open(f"{out}/results.json"))["rows"] == first["rows"]
    again = pt_flow(clean, out, pool_uri=clean, noise_rates=[0.3], config=cfg)  # all finished: reused
    assert again["rows"] == first["rows"]
    events = [json.loads(line)["event"] for line in open(f"{out}/ledger.jsonl")]
    assert events.count("reused") == 8  # noise, 3 trainings, 3 evaluations, the PT report


TINY_PRETRAIN = {"train_per_class": 4, "test_per_class": 1, "n_identities": 3}


@pytest.fixture
def tiny_pretraining(monkeypatch):
    """The synthetic pretraining at test size (the real one is 2100 images x 15 epochs)."""
    import flows.pt

    monkeypatch.setattr(flows.pt, "SYNTHETIC_PRETRAIN_OPTIONS", {**flows.pt.SYNTHETIC_PRETRAIN_OPTIONS, **TINY_PRETRAIN})
    monkeypatch.setattr(flows.pt, "SYNTHETIC_PRETRAIN_EPOCHS", 1)


def test_synthetic_backbone_is_headless_reused_and_pairs_get_their_own_heads(tmp_path):
    from flows.pt import synthetic_backbone
    from tasks.pt.method import _build_pair_nets

    w = synthetic_backbone(str(tmp_path), 16, epochs=1, device="cpu", options=TINY_PRETRAIN)
    assert w.endswith("backbone.pt")
    state = torch.load(w, weights_only=True)
    assert state and not any(k.startswith("head.") for k in state)  # no expression head: like a face backbone
    mtime = (tmp_path / w.split(str(tmp_path) + "/")[1]).stat().st_mtime_ns
    assert synthetic_backbone(str(tmp_path), 16, epochs=1, device="cpu", options=TINY_PRETRAIN) == w
    assert (tmp_path / w.split(str(tmp_path) + "/")[1]).stat().st_mtime_ns == mtime  # reused, not retrained
    students, _ = _build_pair_nets(PTConfig(input_size=16, pretrained=w), torch.device("cpu"))
    for s in students:
        for k, v in s.net.state_dict().items():
            if not k.startswith("head."):
                assert torch.equal(v, state[k]), k
    # Different initialisations (the paper's two pairs): same pretrained backbone, different heads.
    assert not torch.equal(students[0].net.head.weight, students[1].net.head.weight)


@pytest.mark.slow  # a few seconds, but the first flow test of a session pays Prefect's ~20 s server start
def test_prefect_flow_defaults_to_the_synthetic_data(tmp_path, tiny_pretraining):
    from flows.pt import pt_flow

    out = str(tmp_path / "flow")
    cfg = {"input_size": 16, "epochs": 1, "batch_size": 16, "turn_iters": 5, "device": "cpu"}
    res = pt_flow(out=out, noise_rates=[0.25], config=cfg, compare=False,
                  synthetic_options={"train_per_class": 4, "test_per_class": 2, "pool_size": 24, "n_identities": 3})
    assert "/data/synthetic-" in res["labeled_uri"] and res["pool_uri"] == res["labeled_uri"]
    assert list(res["config"]["pool_splits"]) == ["pool"] and res["test_splits"] == ["test"]
    assert [r["method"] for r in res["rows"]] == ["PT"] and res["rows"][0]["noise"] == 0.25
    # The synthetic recipe: r = the noise rate (its labels are clean but for the injected noise), the
    # recipe's EMA cap; settings given in `config` win over the recipe.
    assert res["rows"][0]["forget_rate"] == pytest.approx(0.25)
    assert res["config"]["ema_max"] == 0.99 and res["config"]["turn_iters"] == 5
    assert res["config"]["pretrained"].endswith("backbone.pt") and "/data/pretrain-" in res["config"]["pretrained"]


def test_cli_runs_on_the_embedded_synthetic_data(tmp_path, capsys, tiny_pretraining):
    from flows.cli import main
    from tasks.engine.checkpoint import load_checkpoint

    out = str(tmp_path / "syn")
    opts = [x for kv in ("train_per_class=4", "test_per_class=2", "pool_size=24", "n_identities=3")
            for x in ("--synthetic-option", kv)]
    main(["pt", "synthetic", "synthetic", "synthetic", out, "--noise", "0.25", "--epochs", "1", "--size", "32",
          "--batch-size", "8", "--device", "cpu", *opts])
    res = json.loads(open(f"{out}/results.json").read())["rows"]
    assert len(res) == 1 and res[0]["method"] == "PT" and res[0]["noise"] == 0.25
    assert os.path.exists(os.path.join(res[0]["report"], "filtered_per_class.csv"))  # the report stage
    assert "PT" in capsys.readouterr().out
    # Every method starts from the synthetic pretraining by default; --split-bn reaches the config.
    meta = load_checkpoint(res[0]["checkpoint"])[1]
    assert meta["config"]["pretrained"].endswith("backbone.pt") and meta["config"]["split_bn"] is False
    # Settings not given come from the synthetic recipe; given ones stay.
    assert (meta["config"]["turn_iters"], meta["config"]["ema_max"], meta["config"]["forget_margin"]) == (130, 0.99, 0.0)
    assert (meta["config"]["epochs"], meta["config"]["input_size"], meta["config"]["lr_milestones"]) == (1, 32, [5])
    assert res[0]["forget_rate"] == pytest.approx(0.25)
    out2 = str(tmp_path / "syn2")
    main(["pt", "synthetic", "synthetic", "synthetic", out2, "--noise", "0.25", "--epochs", "1", "--size", "32",
          "--batch-size", "8", "--device", "cpu", "--no-synthetic-pretrain", "--split-bn", *opts])
    meta = load_checkpoint(json.loads(open(f"{out2}/results.json").read())["rows"][0]["checkpoint"])[1]
    assert meta["config"]["pretrained"] is None and meta["config"]["split_bn"] is True
