"""Progressive Teacher (Jiang & Deng): semi-supervised FER training that filters noisy labels.

Two teacher-student pairs of one architecture, initialised differently (Section 3, Algorithm 1):

* every mini-batch holds labeled and unlabeled images (1/4 labeled by default);
* each teacher (an EMA of its student, Eq. 7, alpha = min(1 - 1/(1 + t), 0.999)) ranks the
  labeled samples of the batch by its cross-entropy and keeps the ``R(t) = 1 - r * min(t/T, 1)``
  fraction with the smallest loss (Eq. 8); the *other* pair's student learns their labels (Eq. 1, 5:
  cross guidance) -- large-loss samples are presumed noisy and contribute only to consistency;
* each student also matches the other teacher's softmax on every image of the batch (Eq. 2, 6:
  sum of squared differences over classes, mean over the batch), weighted by the ramp-up
  ``w = 10 * exp(-5 (1 - epoch/N)^2)`` (Eq. 3, 4);
* SGD momentum 0.9, weight decay 5e-4, lr 0.01 -> 0.001 after 3 of 6 epochs.

Teachers run in train mode (BatchNorm with batch statistics, as in Mean Teacher's reference code)
and keep BatchNorm running statistics of their own, which the saved teacher uses at test time.

The paper's schedule assumes a pretrained backbone: T = 300 iterations is ~1 epoch of RAF-DB, after
which the teachers are already good. From scratch, a teacher that has not learned yet ranks losses
mostly by the classes it happens to favour, so R(t) < 1 early can starve whole classes (on the
synthetic data with T = 100 of 520 iterations, 88-96% of fear and surprise were filtered out); give
such runs a T of about half the iterations and an EMA cap ``ema_max`` of 0.99 (alpha = 1 - 1/(1+t)
is a plain average of every student so far until the cap is reached).

Variants for the paper's ablations (Section 4.5): ``guidance="same"`` (a teacher feeds its own
student), ``consistency_guidance`` (which teacher is the consistency target, independently),
``ratio="fixed"`` (R = 1 - r throughout), ``n_pairs=1`` (one pair; with ``forget_rate=0`` this is
Mean Teacher, see :func:`mean_teacher_config`), and the confidence-estimator extension of
Section 4.6 (``confidence_estimator=True``): a confidence head (DeVries & Taylor 2018, the paper's
[55]) lets large-loss samples whose teacher confidence exceeds ``confidence_threshold`` be kept.

Outputs under ``out_uri``: ``teacher/`` (checkpoint of the chosen teacher, readable by
tasks.checkpoint / tasks.evaluate), ``filtered/`` (per labeled sample: how often the teachers
filtered it out, with its clean label when the table has one), ``pt.json`` (config, label-noise
spec, history, metrics), and ``last.pt`` (the resumable state, rewritten after every epoch).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch import nn

from storage.artifact import Artifact, ArtifactWriter, _fs, join
from tasks.checkpoint import (atomic_write_bytes, dumps_json, load_training_state, save_checkpoint,
                              save_training_state)
from tasks.data import MEAN, STD, batch_to_imageset, load_image_set, normalize
from tasks.label_noise import CLEAN_LABEL, noise_spec
from tasks.models import FERNet, build_model, load_pretrained

GUIDANCE = ("cross", "same")
RATIOS = ("progressive", "fixed")
TEACHER_DIR = "teacher"
FILTERED_DIR = "filtered"
SUMMARY_FILE = "pt.json"

__all__ = [
    "PTConfig", "PTResult", "StepInfo", "consistency_weight", "ema_alpha", "ema_update", "finetune_config",
    "mean_teacher_config",
    "resolve_forget_rate", "routing", "selection_ratio", "small_loss_selection", "pt_step", "train_pt",
    "load_result",
]


@dataclass(frozen=True)
class PTConfig:
    """Progressive Teacher settings. Defaults are the paper's (Section 4.2) unless marked otherwise.

    arch / input_size: network and image side. The paper uses an ImageNet/face-pretrained ResNet-18 at
        112 px; fermine's default is the CPU-sized ``small_cnn`` at 64 px, like tasks.train.
    pretrained: local weights file or checkpoint folder for both pairs' backbones (optional).
    epochs (N): 6. batch_size: 200 images per mini-batch, ``labeled_fraction`` = 1/4 of them labeled,
        the rest drawn from the unlabeled pool (all labeled when no pool is given).
    lr, lr_steps, lr_gamma: 0.01, multiplied by 0.1 after epoch 3.
    momentum, weight_decay: SGD, 0.9 and 5e-4.
    forget_rate (r): fraction of each batch's labeled samples that is finally filtered out. None = the
        paper's rule from the labeled table's label-noise record: 0.05 for tables without injected
        noise, noise rate + ``forget_margin`` for symmetric noise, 0.05 (rate <= 10%) or 0.1 for
        asymmetric noise.
    forget_margin: 0.1, what the rule adds to a symmetric noise rate: the paper's allowance for the
        noise RAF-DB's own labels carry. Labels that are clean but for the injected noise (the
        synthetic data) call for 0.
    turn_iters (T): 300; R(t) reaches 1 - r at iteration T and stays there.
    ratio: "progressive" (Eq. 8) or "fixed" (R = 1 - r from the first iteration; ablation Fig. 11).
    ema_max: 0.999, the cap of the EMA coefficient alpha = min(1 - 1/(1 + t), ema_max).
    consistency_max, consistency_shape: w = consistency_max * exp(-shape * (1 - epoch/N)^2), 10 and 5;
        ``epoch`` runs continuously from 0 to N over training (fractional within an epoch).
    guidance: "cross" (teacher k selects samples for the other pair's student; PT) or "same".
    consistency_guidance: "cross" | "same" | None (None = as ``guidance``): whose teacher output the
        student matches. ``guidance="cross"`` + ``consistency_guidance="same"`` is the paper's
        "two groups, consistency with the own teacher" ablation.
    n_pairs: 2 (PT). 1 = a single teacher-student pair (needs "same" guidance); with forget_rate=0 this is
        Mean Teacher.
    confidence_estimator: Section 4.6 extension; ``confidence_threshold`` 0.9 (paper);
        ``confidence_budget`` is the budget beta of DeVries & Taylor's confidence penalty (0.3).
    hflip: random horizontal flip, drawn independently for every network's view (the paper's only
        augmentation; teacher and student see different noise eta' and eta).
    split_bn: forward the labeled and the unlabeled images of a batch in two separate passes (every
        network, teachers included), so BatchNorm normalises each part with its own batch statistics
        instead of statistics mixed from both (fermine's option, not the paper's: useful when the pool's
        distribution differs from the labeled set's; both parts then need >= 2 images).
    seed: pair k is initialised from ``seed + k``; batches, flips and pool order derive from it.
    device: "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
    train_splits: splits of the labeled table used for training. pool_splits: splits of the pool table
        used as unlabeled data (None = every row; any labels there are ignored).
    val_splits: splits of the validation table (``val_uri`` of :func:`train_pt`), when one is given.
    pool_cache_rows: pools up to this many rows are decoded once and kept in memory; larger pools are
        streamed shard by shard through a shuffle buffer of this many images.
    """

    arch: str = "small_cnn"
    num_classes: int = 7
    input_size: int = 64
    pretrained: str | None = None
    epochs: int = 6
    batch_size: int = 200
    labeled_fraction: float = 0.25
    lr: float = 0.01
    lr_steps: tuple[int, ...] = (3,)
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    forget_rate: float | None = None
    forget_margin: float = 0.1
    turn_iters: int = 300
    ratio: str = "progressive"
    ema_max: float = 0.999
    consistency_max: float = 10.0
    consistency_shape: float = 5.0
    guidance: str = "cross"
    consistency_guidance: str | None = None
    n_pairs: int = 2
    confidence_estimator: bool = False
    confidence_threshold: float = 0.9
    confidence_budget: float = 0.3
    hflip: bool = True
    split_bn: bool = False
    seed: int = 0
    device: str = "auto"
    train_splits: tuple[str, ...] = ("train",)
    pool_splits: tuple[str, ...] | None = None
    val_splits: tuple[str, ...] = ("val",)
    pool_cache_rows: int = 20000

    def __post_init__(self) -> None:
        problems = []
        if self.guidance not in GUIDANCE:
            problems.append(f"guidance={self.guidance!r} must be one of {', '.join(GUIDANCE)}")
        if self.consistency_guidance not in (None, *GUIDANCE):
            problems.append(f"consistency_guidance={self.consistency_guidance!r} must be None, 'cross' or 'same'")
        if self.ratio not in RATIOS:
            problems.append(f"ratio={self.ratio!r} must be one of {', '.join(RATIOS)}")
        if self.n_pairs < 1:
            problems.append(f"n_pairs={self.n_pairs} must be >= 1")
        if self.n_pairs == 1 and "cross" in (self.guidance, self.consistency_guidance or self.guidance):
            problems.append("cross guidance needs n_pairs >= 2 (use guidance='same' for a single pair)")
        if self.forget_rate is not None and not 0.0 <= self.forget_rate < 1.0:
            problems.append(f"forget_rate={self.forget_rate} must be in [0, 1)")
        if not 0.0 <= self.forget_margin < 1.0:
            problems.append(f"forget_margin={self.forget_margin} must be in [0, 1)")
        if not 0.0 < self.labeled_fraction <= 1.0:
            problems.append(f"labeled_fraction={self.labeled_fraction} must be in (0, 1]")
        if self.batch_size < 2:
            problems.append(f"batch_size={self.batch_size} must be >= 2")
        elif self.split_bn and self.labeled_fraction < 1.0 and (
                self.labeled_per_batch < 2 or self.batch_size - self.labeled_per_batch < 2):
            problems.append(f"split_bn needs >= 2 labeled and >= 2 unlabeled images per batch (BatchNorm statistics "
                            f"of each part); batch_size={self.batch_size} with labeled_fraction="
                            f"{self.labeled_fraction} gives {self.labeled_per_batch} and "
                            f"{self.batch_size - self.labeled_per_batch}")
        if self.epochs < 1:
            problems.append(f"epochs={self.epochs} must be >= 1")
        if self.turn_iters < 1:
            problems.append(f"turn_iters (T)={self.turn_iters} must be >= 1")
        if not 0.0 <= self.ema_max < 1.0:
            problems.append(f"ema_max={self.ema_max} must be in [0, 1)")
        if not 0.0 < self.confidence_threshold < 1.0:
            problems.append(f"confidence_threshold={self.confidence_threshold} must be in (0, 1)")
        if self.lr <= 0:
            problems.append(f"lr={self.lr} must be > 0")
        if self.consistency_max < 0 or self.consistency_shape < 0:
            problems.append(f"consistency_max={self.consistency_max} and consistency_shape={self.consistency_shape} "
                            "must be >= 0")
        if problems:
            raise ValueError("invalid Progressive Teacher config: " + "; ".join(problems))

    @property
    def labeled_per_batch(self) -> int:
        return max(1, min(self.batch_size, int(round(self.batch_size * self.labeled_fraction))))


def mean_teacher_config(cfg: PTConfig) -> PTConfig:
    """The Mean Teacher baseline of Tables 2/4: one pair, no sample selection, own-teacher consistency."""
    return dataclasses.replace(cfg, n_pairs=1, guidance="same", consistency_guidance=None, forget_rate=0.0,
                               confidence_estimator=False)


def finetune_config(cfg: PTConfig):
    """The fine-tune baseline matched to ``cfg`` (tasks.train): same network, epochs, lr schedule and labeled
    images per step, without the pool, the teachers or the sample selection."""
    from tasks.train import TrainConfig

    # tasks.train decays every lr_step epochs (StepLR); PT decays after each epoch listed in lr_steps.
    step = cfg.lr_steps[0] if cfg.lr_steps else cfg.epochs
    pt_decays = sorted(s for s in cfg.lr_steps if s < cfg.epochs)
    if pt_decays != list(range(step, cfg.epochs, step)):
        raise ValueError(f"the fine-tune baseline decays the lr every {step} epochs, which does not match PT's lr steps "
                         f"{list(cfg.lr_steps)} over {cfg.epochs} epochs; use one step s with 2 * s >= epochs")
    return TrainConfig(arch=cfg.arch, num_classes=cfg.num_classes, input_size=cfg.input_size, epochs=cfg.epochs,
                       batch_size=cfg.labeled_per_batch, lr=cfg.lr, momentum=cfg.momentum,
                       weight_decay=cfg.weight_decay, lr_step=step,
                       lr_gamma=cfg.lr_gamma, hflip=cfg.hflip, seed=cfg.seed, device=cfg.device,
                       pretrained=cfg.pretrained, train_splits=tuple(cfg.train_splits))


# ---------------------------------------------------------------- the paper's formulas


def ema_alpha(t: int, ema_max: float = 0.999) -> float:
    """EMA coefficient at iteration t (1-based, counted before the update): min(1 - 1/(1 + t), ema_max)."""
    return min(1.0 - 1.0 / (1.0 + t), ema_max)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float, buffers: bool = False) -> None:
    """theta' <- alpha theta' + (1 - alpha) theta (Eq. 7) for the parameters.

    Buffers (BatchNorm running statistics) are left alone by default: PT's teachers run in train mode and
    keep statistics of their own. ``buffers=True`` averages float buffers the same way and copies integer
    ones (num_batches_tracked), for teachers that only ever run in eval mode.
    """
    for tp, sp in zip(teacher.parameters(), student.parameters()):
        tp.mul_(alpha).add_(sp.detach(), alpha=1.0 - alpha)
    if buffers:
        for tb, sb in zip(teacher.buffers(), student.buffers()):
            if tb.dtype.is_floating_point:
                tb.mul_(alpha).add_(sb, alpha=1.0 - alpha)
            else:
                tb.copy_(sb)


def selection_ratio(t: int, forget_rate: float, turn_iters: int = 300, mode: str = "progressive") -> float:
    """R(t) = 1 - r * min(t/T, 1) (Eq. 8); ``mode="fixed"``: 1 - r at every iteration."""
    if mode not in RATIOS:
        raise ValueError(f"ratio mode {mode!r} must be one of {', '.join(RATIOS)}")
    if mode == "fixed":
        return 1.0 - forget_rate
    return 1.0 - forget_rate * min(t / turn_iters, 1.0)


def consistency_weight(epoch: float, total_epochs: int, max_weight: float = 10.0, shape: float = 5.0) -> float:
    """Ramp-up w = max * exp(-shape * (1 - epoch/N)^2); epoch in [0, N] (clipped)."""
    x = min(max(epoch / total_epochs, 0.0), 1.0)
    return max_weight * math.exp(-shape * (1.0 - x) ** 2)


def small_loss_selection(losses: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask of the ceil(ratio * n) smallest losses (Algorithm 1: |B'| >= R(t)|B|).

    Ties are broken by position (stable sort), so the selection is deterministic.
    """
    losses = losses.detach().reshape(-1)
    n = losses.numel()
    # The epsilon keeps 0.7 * 10 = 7.000000000000001 from rounding up to 8.
    k = min(n, max(0, math.ceil(min(max(ratio, 0.0), 1.0) * n - 1e-9)))
    mask = torch.zeros(n, dtype=torch.bool, device=losses.device)
    if k:
        order = torch.sort(losses.float().cpu(), stable=True).indices[:k].to(losses.device)
        mask[order] = True
    return mask


def routing(n_pairs: int, guidance: str) -> list[int]:
    """For each student j, the index of the teacher whose output guides it.

    "cross": the next pair's teacher (for two pairs: student 0 <- teacher 1, student 1 <- teacher 0);
    "same": its own teacher.
    """
    if guidance not in GUIDANCE:
        raise ValueError(f"guidance {guidance!r} must be one of {', '.join(GUIDANCE)}")
    if guidance == "cross":
        if n_pairs < 2:
            raise ValueError("cross guidance needs at least 2 teacher-student pairs")
        return [(j + 1) % n_pairs for j in range(n_pairs)]
    return list(range(n_pairs))


def resolve_forget_rate(forget_rate: float | None, spec: dict[str, Any] | None, margin: float = 0.1) -> float:
    """The forget rate r: explicit, or the paper's rule (Section 4.2) from the table's noise record
    (symmetric: the noise rate + ``margin``)."""
    if forget_rate is not None:
        return float(forget_rate)
    if not spec or spec.get("kind") in (None, "none") or not float(spec.get("rate") or 0):
        return 0.05
    rate = float(spec["rate"])
    if spec["kind"] == "asymmetric":
        return 0.05 if rate <= 0.1 + 1e-9 else 0.1
    return min(0.95, rate + margin)


# ---------------------------------------------------------------- networks


class PTNet(nn.Module):
    """A FERNet plus, for the confidence-estimator extension, a confidence head on its features.

    The head sees detached features, so the estimator never changes what the classifier learns.
    """

    def __init__(self, net: FERNet, confidence: bool):
        super().__init__()
        self.net = net
        self.conf = nn.Linear(net.feature_dim, 1) if confidence else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        f = self.net.features(x)
        logits = self.net.head(f)
        conf = torch.sigmoid(self.conf(f.detach())).squeeze(1) if self.conf is not None else None
        return logits, conf


def _build_pair_nets(cfg: PTConfig, device: torch.device) -> tuple[list[PTNet], list[PTNet]]:
    students, teachers = [], []
    for k in range(cfg.n_pairs):
        torch.manual_seed(cfg.seed + k)  # different initialisation per pair
        net = build_model(cfg.arch, cfg.num_classes)
        if cfg.pretrained:
            # A backbone without a (7-class) head is the expected case -- each pair keeps its own freshly
            # initialised head, which is what makes the pairs differ -- so no warning about the reset head.
            load_pretrained(net, cfg.pretrained)
        s = PTNet(net, cfg.confidence_estimator).to(device)
        t = copy.deepcopy(s)
        for p in t.parameters():
            p.requires_grad_(False)
        t.eval()
        students.append(s)
        teachers.append(t)
    return students, teachers


def _make_optimizer(cfg: PTConfig, student: PTNet) -> torch.optim.Optimizer:
    return torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_at(cfg: PTConfig, epoch: int) -> float:
    """Step schedule: lr * gamma^(number of lr_steps <= epoch), epoch 0-based."""
    return cfg.lr * cfg.lr_gamma ** sum(1 for s in cfg.lr_steps if epoch >= s)


def _forward(net: PTNet, x: torch.Tensor, nl: int, split_bn: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``net(x)``; with ``split_bn`` the first ``nl`` (labeled) and the remaining (unlabeled) images go through
    in separate passes, so in train mode BatchNorm never mixes the two parts' statistics. A part of one image
    (a labeled table of a single row) cannot have batch statistics of its own: then one joint pass."""
    if not split_bn or nl < 2 or x.shape[0] - nl < 2:
        return net(x)
    logits_l, conf_l = net(x[:nl])
    logits_u, conf_u = net(x[nl:])
    return torch.cat([logits_l, logits_u]), (None if conf_l is None else torch.cat([conf_l, conf_u]))


def _augment(x: torch.Tensor, gen: torch.Generator, hflip: bool) -> torch.Tensor:
    if not hflip:
        return x
    flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


# ---------------------------------------------------------------- one iteration


@dataclass
class StepInfo:
    """What one iteration did (for logs, records and tests)."""

    t: int
    ratio: float
    weight: float
    alpha: float
    small_loss: list[torch.Tensor]  # per teacher: mask over the labeled samples, small-loss selection
    selected: list[torch.Tensor]  # per teacher: small-loss | confidence-kept
    conf_kept: list[torch.Tensor]  # per teacher: large-loss samples kept by the confidence estimator
    used_by_student: list[torch.Tensor]  # per student: the labeled samples whose labels it learned
    selector_of_student: list[int]
    teacher_losses: list[torch.Tensor]  # per teacher: CE per labeled sample
    teacher_correct: list[torch.Tensor]  # per teacher: prediction == given label, per labeled sample
    sup_loss: list[float]
    cons_loss: list[float]
    conf_loss: list[float] = field(default_factory=list)


def pt_step(
    students: Sequence[PTNet],
    teachers: Sequence[PTNet],
    optimizers: Sequence[torch.optim.Optimizer],
    xl: torch.Tensor,
    yl: torch.Tensor,
    xu: torch.Tensor | None,
    *,
    t: int,
    epoch_pos: float,
    cfg: PTConfig,
    forget_rate: float,
    gen: torch.Generator,
    conf_lambda: list[float] | None = None,
) -> StepInfo:
    """One iteration of Algorithm 1 (lines 3-9) on uint8 images ``xl`` (labeled, labels ``yl``) + ``xu``.

    ``t`` is the iteration number after incrementing (1 for the first batch).
    """
    x = xl if xu is None or xu.shape[0] == 0 else torch.cat([xl, xu])
    nl = xl.shape[0]
    ratio = selection_ratio(t, forget_rate, cfg.turn_iters, cfg.ratio)
    weight = consistency_weight(epoch_pos, cfg.epochs, cfg.consistency_max, cfg.consistency_shape)

    # Lines 4-5: each teacher scores the labeled samples on its own view (eta').
    t_probs, t_losses, small, selected, kept, correct = [], [], [], [], [], []
    with torch.no_grad():
        for teacher in teachers:
            # Train mode, as in Mean Teacher's reference implementation: BatchNorm normalises with the
            # batch's statistics, the same way as the student whose outputs are compared with these, and
            # the teacher's running statistics (used at test time) come from its own forward passes, so
            # they match its averaged weights. Eval mode here made the consistency targets systematically
            # off and the teachers far worse than their students on the synthetic data.
            teacher.train()
            logits, conf = _forward(teacher, normalize(_augment(x, gen, cfg.hflip)), nl, cfg.split_bn)
            logits = logits.float()
            loss = F.cross_entropy(logits[:nl], yl, reduction="none")
            mask = small_loss_selection(loss, ratio)
            extra = torch.zeros_like(mask)
            if conf is not None:
                # Section 4.6: large-loss samples the teacher is confident about are clean but hard.
                extra = (~mask) & (conf[:nl] > cfg.confidence_threshold)
            t_probs.append(F.softmax(logits, dim=1))
            t_losses.append(loss)
            small.append(mask)
            kept.append(extra)
            selected.append(mask | extra)
            correct.append(logits[:nl].argmax(1) == yl)

    selector = routing(len(students), cfg.guidance)
    target = routing(len(students), cfg.consistency_guidance or cfg.guidance)
    sup_l, cons_l, conf_l, used = [], [], [], []
    for j, (student, opt) in enumerate(zip(students, optimizers)):
        student.train()
        logits, conf = _forward(student, normalize(_augment(x, gen, cfg.hflip)), nl, cfg.split_bn)
        logits = logits.float()
        m = selected[selector[j]]
        # Eq. 1/5: CE over the labeled samples the guiding teacher selected.
        ls = F.cross_entropy(logits[:nl][m], yl[m]) if bool(m.any()) else logits.sum() * 0.0
        # Eq. 2/6: squared distance between softmax outputs, summed over classes, mean over the batch.
        lu = (F.softmax(logits, dim=1) - t_probs[target[j]]).pow(2).sum(1).mean()
        loss = ls + weight * lu
        if conf is not None and conf_lambda is not None:
            # DeVries & Taylor: NLL of the confidence-interpolated prediction + lambda * -log c, on the
            # labeled samples; c learns how far the prediction can be trusted. lambda tracks the budget.
            p = F.softmax(logits[:nl].detach(), dim=1).gather(1, yl.view(-1, 1)).squeeze(1)
            c = conf[:nl].clamp(1e-6, 1 - 1e-6)
            l_task = -torch.log(c * p + (1 - c) + 1e-12).mean()
            l_pen = -torch.log(c).mean()
            loss = loss + l_task + conf_lambda[j] * l_pen
            conf_l.append(float(l_task))
            conf_lambda[j] = conf_lambda[j] / 0.99 if float(l_pen) > cfg.confidence_budget else conf_lambda[j] / 1.01
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sup_l.append(float(ls.detach()))
        cons_l.append(float(lu.detach()))
        used.append(m)

    # Lines 8-9: teachers follow their students.
    alpha = ema_alpha(t, cfg.ema_max)
    for teacher, student in zip(teachers, students):
        ema_update(teacher, student, alpha)
    return StepInfo(t=t, ratio=ratio, weight=weight, alpha=alpha, small_loss=small, selected=selected,
                    conf_kept=kept, used_by_student=used, selector_of_student=selector, teacher_losses=t_losses,
                    teacher_correct=correct, sup_loss=sup_l, cons_loss=cons_l, conf_loss=conf_l)


# ---------------------------------------------------------------- data


class _Pool:
    """Unlabeled images in a seeded random order; large pools stream through a shuffle buffer.

    A small pool is decoded once. A large one is read shard by shard (shards in a random order each
    pass), so memory stays at ``buffer_rows`` images whatever the pool size.
    """

    def __init__(self, uri: str, size: int, splits: Sequence[str] | None, buffer_rows: int):
        self.uri, self.size, self.buffer_rows = uri, size, max(1, buffer_rows)
        self.splits = list(splits) if splits is not None else None
        self.art = Artifact(uri)
        self.cols = ["id", "image"] + (["split"] if "split" in self.art.schema.names else [])
        if self.splits is not None and "split" not in self.cols:
            raise ValueError(f"pool {uri} has no 'split' column; pass pool_splits=None to use every row")
        if self.splits is None:
            self.rows = len(self.art)
        else:
            sp = self.art.read(["split"]).column("split")
            self.rows = int(pc.sum(pc.is_in(sp, value_set=pa.array(self.splits))).as_py() or 0)
        if self.rows == 0:
            where = f" in split(s) {self.splits}" if self.splits is not None else ""
            raise ValueError(f"the unlabeled pool {uri} has no rows{where}; check --pool-split")
        self.cached: torch.Tensor | None = None
        if self.rows <= self.buffer_rows:
            self.cached = load_image_set(uri, size, splits=self.splits).images

    def batches(self, n: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
        """Endless stream of uint8 batches of ``n`` images (with replacement across passes)."""
        buf = torch.zeros((0, 3, self.size, self.size), dtype=torch.uint8)
        for chunk in self._chunks(gen):
            buf = torch.cat([buf, chunk])
            if self.cached is None and buf.shape[0] < min(self.buffer_rows, self.rows):
                continue  # keep filling the shuffle buffer
            buf = buf[torch.randperm(buf.shape[0], generator=gen)]
            while buf.shape[0] >= n:
                yield buf[:n]
                buf = buf[n:]

    def _chunks(self, gen: torch.Generator) -> Iterator[torch.Tensor]:
        while True:
            if self.cached is not None:
                yield self.cached
                continue
            for i in torch.randperm(self.art.num_shards, generator=gen).tolist():
                for b in self.art.iter_batches(columns=self.cols, batch_size=512, shards=[i]):
                    if self.splits is not None:
                        b = b.filter(pc.is_in(b.column("split"), value_set=pa.array(self.splits)))
                    if b.num_rows:
                        yield batch_to_imageset(b, self.size).images


def _clean_labels(uri: str, splits: Sequence[str], ids: Sequence[str]) -> np.ndarray | None:
    """The ``clean_label`` column aligned with ``ids`` (-1 where null), or None when the table has none."""
    art = Artifact(uri)
    if CLEAN_LABEL not in art.schema.names:
        return None
    cols = ["id", CLEAN_LABEL] + (["split"] if "split" in art.schema.names else [])
    t = art.read(cols)
    if "split" in cols:
        t = t.filter(pc.is_in(t.column("split"), value_set=pa.array(list(splits))))
    m = {i: (-1 if c is None else int(c)) for i, c in zip(t.column("id").to_pylist(), t.column(CLEAN_LABEL).to_pylist())}
    return np.array([m.get(i, -1) for i in ids], dtype=np.int64)


# ---------------------------------------------------------------- training


@dataclass
class PTResult:
    checkpoint_uri: str
    filtered_uri: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    forget_rate: float
    label_noise: dict[str, Any] | None


def _config_dict(cfg: PTConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _filter_stats(filtered: np.ndarray, noisy: np.ndarray) -> dict[str, float]:
    """How well the filtered-out set matches the truly noisy samples (one decision per sample)."""
    n_noisy, n_clean = int(noisy.sum()), int((~noisy).sum())
    f_noisy, f_clean = int((filtered & noisy).sum()), int((filtered & ~noisy).sum())
    return {
        "noisy_filtered_rate": f_noisy / n_noisy if n_noisy else float("nan"),
        "clean_filtered_rate": f_clean / n_clean if n_clean else float("nan"),
        "filtered_precision": f_noisy / (f_noisy + f_clean) if f_noisy + f_clean else float("nan"),
    }


def train_pt(
    cfg: PTConfig,
    labeled_uri: str,
    unlabeled_uri: str | None,
    out_uri: str,
    progress: Callable[[dict[str, Any]], None] | None = None,
    *,
    val_uri: str | None = None,
) -> PTResult:
    """Train Progressive Teacher and save the chosen teacher (see the module docstring for outputs).

    The teacher saved is the best (epoch, pair) by accuracy on ``val_uri`` when one is given;
    otherwise the final teacher with the higher accuracy on the labeled samples that every teacher
    kept in the last epoch (the samples PT itself believes clean), so no test data is ever used for
    the choice. A run interrupted between epochs resumes from ``last.pt`` with identical results.
    """
    from tasks.evaluate import evaluate_images
    from tasks.device import resolve_device

    device = resolve_device(cfg.device)
    out_uri = out_uri.rstrip("/")
    fs, out_path = _fs(out_uri)
    summary_path = f"{out_path}/{SUMMARY_FILE}"
    if fs.exists(summary_path):
        done = load_result(out_uri)
        if done.metrics.get("config") == _config_dict(cfg) and done.metrics.get("inputs", {}).get("labeled") == \
                Artifact(labeled_uri).digest:
            return done
        raise FileExistsError(f"{out_uri} holds a finished Progressive Teacher run with another config or data; "
                              "choose another output or delete it")

    labeled = load_image_set(labeled_uri, cfg.input_size, splits=list(cfg.train_splits))
    keep = (labeled.labels >= 0) & (labeled.labels < cfg.num_classes)
    n_unusable = int((~keep).sum())
    if not bool(keep.any()):
        raise ValueError(f"{labeled_uri} has no labeled rows in split(s) {list(cfg.train_splits)} "
                         f"(labels 0..{cfg.num_classes - 1}); PT needs labeled training data")
    labeled = labeled.subset(torch.nonzero(keep).flatten())
    clean = _clean_labels(labeled_uri, cfg.train_splits, labeled.ids)
    spec = noise_spec(labeled_uri)
    r = resolve_forget_rate(cfg.forget_rate, spec, cfg.forget_margin)
    pool = _Pool(unlabeled_uri, cfg.input_size, cfg.pool_splits, cfg.pool_cache_rows) if unlabeled_uri else None
    val = load_image_set(val_uri, cfg.input_size, splits=list(cfg.val_splits)) if val_uri else None
    if val is not None:
        val = val.subset(torch.nonzero(val.labels >= 0).flatten())

    NL = len(labeled)
    nl = min(cfg.labeled_per_batch, NL)
    nu = (cfg.batch_size - nl) if pool is not None else 0
    iters = max(1, NL // nl)
    inputs = {"labeled": Artifact(labeled_uri).digest}
    if unlabeled_uri:
        inputs["unlabeled"] = Artifact(unlabeled_uri).digest
    if val_uri:
        inputs["val"] = Artifact(val_uri).digest

    students, teachers = _build_pair_nets(cfg, device)
    opts = [_make_optimizer(cfg, s) for s in students]
    P = cfg.n_pairs
    rec = {k: np.zeros((P, NL), dtype=np.int64) for k in ("decisions", "filtered", "conf_kept")}
    last = {k: np.zeros((P, NL), dtype=np.int64) for k in ("decisions", "filtered")}
    last_loss = np.zeros((P, NL), dtype=np.float64)
    state: dict[str, Any] = {"epoch": 0, "t": 0, "history": [], "conf_lambda": [0.1] * P, "best": None}

    saved = load_training_state(out_uri)
    if saved is not None:
        if saved.get("config") != _config_dict(cfg) or saved.get("inputs") != inputs:
            raise FileExistsError(f"{out_uri} holds an unfinished Progressive Teacher run with another config or "
                                  "data; rerun with the same settings to resume it, or choose another output")
        for k in range(P):
            students[k].load_state_dict(saved["students"][k])
            teachers[k].load_state_dict(saved["teachers"][k])
            opts[k].load_state_dict(saved["optimizers"][k])
        for k in rec:
            rec[k] = np.asarray(saved["records"][k], dtype=np.int64)
        for k in last:
            last[k] = np.asarray(saved["last"][k], dtype=np.int64)
        last_loss = np.asarray(saved["last_loss"], dtype=np.float64)
        state.update({k: saved[k] for k in ("epoch", "t", "history", "conf_lambda", "best")})

    index = torch.arange(NL)
    agree_correct = np.zeros(P, dtype=np.int64)
    agree_n = 0
    for epoch in range(state["epoch"], cfg.epochs):
        t0 = time.time()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        torch.manual_seed(cfg.seed * 1_000_003 + epoch)  # dropout in VGG-style heads
        lr = lr_at(cfg, epoch)
        for o in opts:
            for g in o.param_groups:
                g["lr"] = lr
        final_epoch = epoch == cfg.epochs - 1
        if final_epoch:
            last = {k: np.zeros((P, NL), dtype=np.int64) for k in last}
            last_loss = np.zeros((P, NL), dtype=np.float64)
            agree_correct[:] = 0
            agree_n = 0
        perm = torch.randperm(NL, generator=gen)
        pool_it = pool.batches(nu, gen) if pool is not None and nu > 0 else None
        sums = {"sup": 0.0, "cons": 0.0, "filtered": 0, "seen": 0}
        for it in range(iters):
            idx = perm[it * nl:(it + 1) * nl]
            xl = labeled.images[idx].to(device, non_blocking=True)
            yl = labeled.labels[idx].to(device)
            xu = next(pool_it).to(device, non_blocking=True) if pool_it is not None else None
            state["t"] += 1
            info = pt_step(students, teachers, opts, xl, yl, xu, t=state["t"], epoch_pos=epoch + it / iters,
                           cfg=cfg, forget_rate=r, gen=gen,
                           conf_lambda=state["conf_lambda"] if cfg.confidence_estimator else None)
            ids = index[idx].numpy()
            for k in range(P):
                sel = info.selected[k].cpu().numpy()
                rec["decisions"][k, ids] += 1
                rec["filtered"][k, ids] += ~sel
                rec["conf_kept"][k, ids] += info.conf_kept[k].cpu().numpy()
                if final_epoch:
                    last["decisions"][k, ids] += 1
                    last["filtered"][k, ids] += ~sel
                    last_loss[k, ids] += info.teacher_losses[k].cpu().numpy()
            if final_epoch:
                agreed = torch.stack(info.selected).all(0)
                agree_n += int(agreed.sum())
                for k in range(P):
                    agree_correct[k] += int((info.teacher_correct[k] & agreed).sum())
            sums["sup"] += float(np.mean(info.sup_loss))
            sums["cons"] += float(np.mean(info.cons_loss))
            sums["filtered"] += int(sum(int((~s).sum()) for s in info.selected))
            sums["seen"] += P * len(idx)
            if progress is not None:
                progress({"event": "step", "epoch": epoch + 1, "epochs": cfg.epochs, "step": it + 1, "steps": iters,
                          "t": state["t"], "sup_loss": info.sup_loss, "cons_loss": info.cons_loss,
                          "ratio": info.ratio, "weight": info.weight, "lr": lr})
        entry: dict[str, Any] = {
            "epoch": epoch + 1, "lr": lr, "iterations": state["t"], "sup_loss": sums["sup"] / iters,
            "cons_loss": sums["cons"] / iters, "ratio": selection_ratio(state["t"], r, cfg.turn_iters, cfg.ratio),
            "weight": consistency_weight(epoch + 1, cfg.epochs, cfg.consistency_max, cfg.consistency_shape),
            "filtered_fraction": sums["filtered"] / max(1, sums["seen"]), "seconds": time.time() - t0,
        }
        if clean is not None:
            # Cumulative over training so far: mean fraction of its decisions in which a sample was dropped.
            noisy = (clean >= 0) & (clean != labeled.labels.numpy())
            frac = rec["filtered"].sum(0) / np.maximum(1, rec["decisions"].sum(0))
            entry["noisy_filter_rate"] = float(frac[noisy].mean()) if noisy.any() else float("nan")
            entry["clean_filter_rate"] = float(frac[~noisy].mean()) if (~noisy).any() else float("nan")
        if val is not None:
            accs = [evaluate_images(tn.net, val.images, val.labels, cfg.num_classes, device=device).accuracy
                    for tn in teachers]
            entry["val_accuracy"] = accs
            k = int(np.argmax(accs))
            if state["best"] is None or accs[k] > state["best"]["val_accuracy"]:
                state["best"] = {"epoch": epoch + 1, "pair": k, "val_accuracy": accs[k]}
                _save_teacher(out_uri, teachers[k], cfg, spec, r, state["best"])
        state["history"].append(entry)
        state["epoch"] = epoch + 1
        if final_epoch:
            state["agree"] = {"n": agree_n, "correct": agree_correct.tolist()}
        save_training_state(out_uri, {
            "config": _config_dict(cfg), "inputs": inputs, "epoch": state["epoch"], "t": state["t"],
            "history": state["history"], "conf_lambda": state["conf_lambda"], "best": state["best"],
            "students": [s.state_dict() for s in students], "teachers": [t.state_dict() for t in teachers],
            "optimizers": [o.state_dict() for o in opts],
            "records": {k: v.tolist() for k, v in rec.items()}, "last": {k: v.tolist() for k, v in last.items()},
            "last_loss": last_loss.tolist(), "agree": state.get("agree"),
        })
        if progress is not None:
            progress({"event": "epoch", **entry, "epochs": cfg.epochs})

    # Choose and save the teacher.
    if state["best"] is None:
        agree = state.get("agree") or (saved or {}).get("agree") or {"n": 0, "correct": [0] * P}
        accs = [c / agree["n"] if agree["n"] else float("nan") for c in agree["correct"]]
        k = int(np.nanargmax(accs)) if agree["n"] else 0
        state["best"] = {"epoch": cfg.epochs, "pair": k, "agreed_clean_accuracy": accs[k], "agreed_n": agree["n"]}
        _save_teacher(out_uri, teachers[k], cfg, spec, r, state["best"])

    # Per-sample filter record (the paper's Table 6 / Fig. 9 come from it).
    labels_np = labeled.labels.numpy()
    filtered_out = (last["decisions"].sum(0) > 0) & (last["filtered"].sum(0) == last["decisions"].sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_last_loss = np.where(last["decisions"].sum(0) > 0, last_loss.sum(0) / last["decisions"].sum(0), np.nan)
    filtered_uri = join(out_uri, FILTERED_DIR)
    ffs, fpath = _fs(filtered_uri)
    if ffs.exists(fpath):
        ffs.rm(fpath, recursive=True)  # our own output, rebuilt from the saved state
    table = pa.table({
        "id": pa.array(labeled.ids, pa.string()),
        "label": pa.array(labels_np, pa.int8()),
        CLEAN_LABEL: pa.array([None if c < 0 else int(c) for c in clean] if clean is not None else [None] * NL,
                              pa.int8()),
        "decisions": pa.array(rec["decisions"].sum(0), pa.int32()),
        "filtered": pa.array(rec["filtered"].sum(0), pa.int32()),
        "conf_kept": pa.array(rec["conf_kept"].sum(0), pa.int32()),
        "last_decisions": pa.array(last["decisions"].sum(0), pa.int32()),
        "last_filtered": pa.array(last["filtered"].sum(0), pa.int32()),
        "last_loss": pa.array(mean_last_loss, pa.float32()),
        "filtered_out": pa.array(filtered_out, pa.bool_()),
    })
    with ArtifactWriter(filtered_uri, stage="pt.filtered", config=_config_dict(cfg), inputs=inputs,
                        rows_per_shard=65536) as w:
        w.write(table)

    metrics: dict[str, Any] = {
        "method": _method_name(cfg), "forget_rate": r, "labeled": NL, "unusable_labeled_rows": n_unusable,
        "iterations": state["t"], "iterations_per_epoch": iters, "labeled_per_batch": nl, "unlabeled_per_batch": nu,
        "teacher": state["best"], "filtered_out": int(filtered_out.sum()),
        "filtered_out_per_class": {str(c): int((filtered_out & (labels_np == c)).sum()) for c in range(cfg.num_classes)},
        "config": _config_dict(cfg), "inputs": inputs, "label_noise": spec,
    }
    if clean is not None:
        noisy = (clean >= 0) & (clean != labels_np)
        metrics["noisy_labels"] = int(noisy.sum())
        metrics.update(_filter_stats(filtered_out, noisy))
        frac = rec["filtered"].sum(0) / np.maximum(1, rec["decisions"].sum(0))
        metrics["noisy_filter_rate_all_epochs"] = float(frac[noisy].mean()) if noisy.any() else float("nan")
        metrics["clean_filter_rate_all_epochs"] = float(frac[~noisy].mean()) if (~noisy).any() else float("nan")
    result = PTResult(checkpoint_uri=join(out_uri, TEACHER_DIR), filtered_uri=filtered_uri, metrics=metrics,
                      history=state["history"], forget_rate=r, label_noise=spec)
    atomic_write_bytes(join(out_uri, SUMMARY_FILE), dumps_json({
        "checkpoint_uri": result.checkpoint_uri, "filtered_uri": filtered_uri, "metrics": metrics,
        "history": state["history"], "forget_rate": r, "label_noise": spec,
    }).encode())
    return result


def _method_name(cfg: PTConfig) -> str:
    if cfg.n_pairs == 1 and cfg.forget_rate == 0:
        return "mean_teacher"
    return "progressive_teacher"


def _save_teacher(out_uri: str, teacher: PTNet, cfg: PTConfig, spec: dict | None, r: float,
                  best: dict[str, Any]) -> None:
    save_checkpoint(join(out_uri, TEACHER_DIR), teacher.net, {
        "input_size": cfg.input_size, "mean": list(MEAN), "std": list(STD),
        "metrics": {k: v for k, v in best.items()},
        "config": _config_dict(cfg), "method": _method_name(cfg), "label_noise": spec, "forget_rate": r,
    })


def load_result(out_uri: str) -> PTResult:
    """Read a finished run's ``pt.json``."""
    import json

    fs, path = _fs(out_uri)
    p = f"{path}/{SUMMARY_FILE}"
    if not fs.exists(p):
        raise FileNotFoundError(f"{out_uri} has no {SUMMARY_FILE}: the Progressive Teacher run there did not finish")
    d = json.loads(fs.cat_file(p).decode())
    return PTResult(checkpoint_uri=d["checkpoint_uri"], filtered_uri=d["filtered_uri"], metrics=d["metrics"],
                    history=d["history"], forget_rate=d["forget_rate"], label_noise=d.get("label_noise"))
