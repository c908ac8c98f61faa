"""PASM Table VII's conditions: online random erasing (Zhong et al.), attention erasing (Wei et al.),
PASM w/o teacher; their recipe; ImageNet normalisation for ImageNet weights; a seed per round."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from storage.artifact import Artifact
from storage.images import decode, encode
from storage.ingest import write_image_table
from tasks.pasm.cam import CamConfig, cam_table, grad_cam, peak_positions
from tasks.engine.checkpoint import read_meta
from tasks.data import IMAGENET_MEAN, IMAGENET_STD, MEAN, STD
from tasks.pasm.erase import EraseConfig, erase_table, random_erasing_batch
from tasks.models import build_model
from tasks.pasm.student import PasmConfig, baseline_train_config, student_train_config
from tasks.train import TrainConfig, train

SIZE = 32


def _spot_rows(n: int, split: str, seed: int):
    """Class c in {0, 1}: a bright 6 x 6 spot in the left (0) or right (1) half; the rest is noise."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        for c in (0, 1):
            img = (rng.random((SIZE, SIZE, 3)) * 60).astype(np.uint8)
            y, x = int(rng.integers(4, SIZE - 10)), int(rng.integers(2, 10)) + (16 if c else 0)
            img[y:y + 6, x:x + 6] = 250
            yield dict(id=f"{split}-{c}-{i}", image=encode(img), label=c, split=split, source="spots",
                       landmarks=None)


@pytest.fixture(scope="module")
def spots(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("t7") / "spots")
    write_image_table(list(_spot_rows(24, "train", 0)) + list(_spot_rows(8, "test", 1)), uri, stage="test",
                      config={}, rows_per_shard=32)
    return uri


@pytest.fixture(scope="module")
def teacher(spots, tmp_path_factory):
    torch.set_num_threads(1)
    out = str(tmp_path_factory.mktemp("t7") / "teacher")
    train(TrainConfig(num_classes=2, input_size=SIZE, epochs=4, batch_size=16, lr=0.05, seed=0, hflip=False,
                      device="cpu"), [spots], out)
    return out


# ---- online random erasing ----------------------------------------------------------------------
def test_random_erasing_batch_follows_zhong():
    images = torch.zeros((64, 3, 40, 40), dtype=torch.uint8)
    out = random_erasing_batch(images, torch.Generator().manual_seed(0), p=1.0, area=(0.1, 0.2), aspect=0.5)
    erased = (out != 0).any(1)  # random fill: almost every erased pixel differs from 0
    frac = erased.flatten(1).float().mean(1)
    assert (frac > 0.08).all() and (frac < 0.21).all()  # one rectangle of 10-20% of the image each
    rows, cols = erased.any(2).sum(1).float(), erased.any(1).sum(1).float()
    assert ((rows / cols) >= 0.5 - 0.1).all() and ((rows / cols) <= 2 + 0.2).all()  # aspect in [0.5, 2]
    assert torch.equal(out, random_erasing_batch(images, torch.Generator().manual_seed(0), 1.0, (0.1, 0.2), 0.5))
    assert torch.equal(random_erasing_batch(images, torch.Generator().manual_seed(0), p=0.0), images)
    some = random_erasing_batch(images, torch.Generator().manual_seed(1), p=0.5)
    hit = (some != 0).flatten(1).any(1).float().mean()
    assert 0.25 < hit < 0.75  # each image erased with probability p


def test_trainer_erases_online_and_records_it(spots, tmp_path):
    cfg = TrainConfig(num_classes=2, input_size=SIZE, epochs=1, batch_size=16, seed=0, device="cpu",
                      random_erasing=0.5)
    train(cfg, [spots], str(tmp_path / "re"))
    plain = train(replace(cfg, random_erasing=0.0), [spots], str(tmp_path / "plain"))
    meta = read_meta(str(tmp_path / "re"))
    assert meta["config"]["random_erasing"] == 0.5
    assert meta["metrics"]["loss"] != pytest.approx(plain.metrics["loss"])  # the batches were erased
    with pytest.raises(ValueError, match="random_erasing"):
        TrainConfig(random_erasing=1.5)


# ---- attention (adversarial) erasing ------------------------------------------------------------
def test_grad_cam_peaks_on_the_evidence():
    """A net whose only evidence for class 1 is brightness: the map peaks where the image is bright."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 1, 3, padding=1, bias=False), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(1, 2))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[3].weight.copy_(torch.tensor([[-1.0], [1.0]]))
    x = torch.zeros(2, 3, 24, 24)
    x[0, :, 3:6, 15:18] = 1.0  # spot centred at x = 16, y = 4
    x[1, :, 18:21, 2:5] = 1.0  # x = 3, y = 19
    px, py = peak_positions(grad_cam(net, x, torch.tensor([1, 1])), 24)
    assert [(int(a), int(b)) for a, b in zip(px, py)] == [(16, 4), (3, 19)]


def test_cam_positions_feed_the_eraser(spots, teacher, tmp_path):
    from tasks.engine.checkpoint import load_checkpoint
    from tasks.data import normalize

    pos = str(tmp_path / "cam")
    m = cam_table(teacher, spots, pos, CamConfig(device="cpu"))
    t = Artifact(pos).read().to_pylist()
    assert m.rows == len(t) == 48 and {r["size"] for r in t} == {SIZE}  # the train rows only
    # Each position is the teacher's Grad-CAM peak of the true class; its colour the image's mean.
    model, meta = load_checkpoint(teacher)
    src = {r["id"]: r for r in Artifact(spots).read().to_pylist()}
    imgs = np.stack([decode(src[r["id"]]["image"]) for r in t])
    x = normalize(torch.from_numpy(imgs).permute(0, 3, 1, 2), meta["mean"], meta["std"])
    px, py = peak_positions(grad_cam(model, x, torch.tensor([r["label"] for r in t])), SIZE)
    assert [(r["x"], r["y"]) for r in t] == list(zip(px.tolist(), py.tolist()))
    assert [r["r"] for r in t] == [int(round(float(v))) for v in imgs[..., 0].reshape(len(t), -1).mean(1)]
    erased = str(tmp_path / "erased")
    erase_table(spots, pos, erased, EraseConfig(size=6))
    out = {r["id"]: decode(r["image"]) for r in Artifact(erased).read().to_pylist()}
    r0 = t[0]
    patch = out[r0["id"]][r0["y"] - 3:r0["y"] + 3, r0["x"] - 3:r0["x"] + 3]
    assert (patch == [r0["r"], r0["g"], r0["b"]]).all()  # erased at the peak with the mean colour


# ---- the recipe of the conditions ---------------------------------------------------------------
def test_table7_recipe_is_the_teachers_without_teacher_term():
    teacher = TrainConfig(epochs=15, lr=0.02, pretrained="w.pt", seed=0)
    base = baseline_train_config(teacher, seed=1, random_erasing=0.5)
    assert (base.epochs, base.lr, base.pretrained, base.beta, base.random_erasing) == (15, 0.02, "w.pt", 0.0, 0.5)
    pasm = PasmConfig(student_epochs=6, beta=0.1)
    assert student_train_config(teacher, pasm).epochs == 6 and student_train_config(teacher, pasm).beta == 0.1
    no_teacher = replace(pasm, no_teacher=True)
    s = student_train_config(teacher, no_teacher)
    assert (s.epochs, s.beta) == (15, 0.0) and not no_teacher.student_from_teacher
    # The student's learning rate is the teacher's unless student_lr names one; Table VII's conditions keep
    # the teacher's recipe whatever it says.
    assert student_train_config(teacher, pasm).lr == 0.02
    assert student_train_config(teacher, replace(pasm, student_lr=0.002)).lr == 0.002
    assert student_train_config(teacher, replace(pasm, student_lr=0.002, no_teacher=True)).lr == 0.02
    with pytest.raises(ValueError, match="student_lr"):
        PasmConfig(student_lr=0.0).validate()
    # Likewise its step schedule: the teacher's lr_step unless student_lr_step names one.
    assert student_train_config(teacher, pasm).lr_step == teacher.lr_step
    assert student_train_config(teacher, replace(pasm, student_lr_step=4)).lr_step == 4
    assert student_train_config(teacher, replace(pasm, student_lr_step=4, no_teacher=True)).lr_step == teacher.lr_step
    with pytest.raises(ValueError, match="student_lr_step"):
        PasmConfig(student_lr_step=0).validate()
    with pytest.raises(ValueError, match="compare"):
        PasmConfig(compare=("mixup",)).validate()


def test_each_round_attacks_with_its_own_seed():
    from flows.steps import round_attack_config
    from tasks.pasm.attack import AttackConfig

    a = AttackConfig(seed=7)
    assert [round_attack_config(a, r).seed for r in (1, 2, 3)] == [7, 8, 9]


# ---- normalisation follows the weights ----------------------------------------------------------
def test_imagenet_weights_get_imagenet_normalisation(spots, tmp_path):
    weights = tmp_path / "tv.pt"
    torch.save(build_model("small_cnn", 2).state_dict(), weights)  # a plain state_dict, as torchvision's
    cfg = TrainConfig(num_classes=2, input_size=SIZE, epochs=1, batch_size=16, device="cpu", pretrained=str(weights))
    train(cfg, [spots], str(tmp_path / "a"))
    meta = read_meta(str(tmp_path / "a"))
    assert tuple(meta["mean"]) == IMAGENET_MEAN and tuple(meta["std"]) == IMAGENET_STD
    # Starting from a fermine checkpoint keeps that checkpoint's statistics; scratch keeps 0.5 / 0.5.
    train(replace(cfg, pretrained=str(tmp_path / "a")), [spots], str(tmp_path / "b"))
    assert tuple(read_meta(str(tmp_path / "b"))["mean"]) == IMAGENET_MEAN
    train(replace(cfg, pretrained=None), [spots], str(tmp_path / "c"))
    assert tuple(read_meta(str(tmp_path / "c"))["mean"]) == MEAN
    train(replace(cfg, normalization="half"), [spots], str(tmp_path / "d"))
    assert tuple(read_meta(str(tmp_path / "d"))["std"]) == STD
    assert json.loads((tmp_path / "a" / "model.json").read_text())["config"]["normalization"] == "auto"


# ---- Table III: extra test sets of the labeled table --------------------------------------------
def test_extra_test_splits_become_their_own_test_sets(tmp_path):
    from flows.config import RunConfig
    from flows.round import Round

    r = Round(RunConfig(out=str(tmp_path / "run"), extra_test_splits=["test_occlusion", "test_pose30"]))
    r.uris["labeled"] = "LAB"
    assert r.test_sets() == {"inner": ("LAB", ("test",)), "occlusion": ("LAB", ("test_occlusion",)),
                             "pose30": ("LAB", ("test_pose30",))}
