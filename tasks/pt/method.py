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

The loop, schedule, seeding, resume and checkpoint are the engine's (tasks.engine.fit); this module
holds the paper's step (:func:`pt_step` and the pure functions it uses), the plug-in
(:class:`ProgressiveTeacher`) and :func:`train_pt`, its entry point.

Outputs under ``out_uri`` (the engine's layout, tasks.engine.loop): ``model.pt`` + ``model.json``
(the chosen teacher, an ordinary checkpoint readable by tasks.engine.checkpoint / tasks.evaluate),
``last.pt`` (the resumable state, rewritten after every epoch), ``metrics.json``; and PT's own
``filtered/`` (per labeled sample: how often the teachers filtered it out, with its clean label when
the table has one) and ``pt.json`` (label-noise spec, history, metrics: :func:`load_result`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch import nn

from storage.artifact import Artifact, ArtifactWriter, _fs, join
from tasks.engine.checkpoint import atomic_write_bytes, dumps_json, weights_digest
from tasks.data import MEAN, STD, batch_to_imageset, load_image_set, normalize
from tasks.engine import Recipe, StepContext, build_optimizer, fit
from tasks.engine.method import Method
from tasks.engine.seeding import FLIP, ORDER
from tasks.pt.label_noise import CLEAN_LABEL, noise_spec
from tasks.models import FERNet, build_model, load_pretrained

GUIDANCE = ("cross", "same")
RATIOS = ("progressive", "fixed")
FILTERED_DIR = "filtered"
SUMMARY_FILE = "pt.json"
POOL = 16  # seeding purpose of the unlabeled pool's order (tasks.engine.seeding: methods pick from 16 up)

__all__ = [
    "PTConfig", "PTResult", "ProgressiveTeacher", "StepInfo", "consistency_weight", "ema_alpha", "ema_update",
    "finetune_config", "mean_teacher_config",
    "resolve_forget_rate", "routing", "selection_ratio", "small_loss_selection", "pt_step", "train_pt",
    "load_result",
]


@dataclass(frozen=True)
class PTConfig(Recipe):
    """Progressive Teacher settings. Defaults are the paper's (Section 4.2) unless marked otherwise.

    The shared fields are tasks.engine.Recipe's (same names in every method's config):
    arch / input_size: network and image side. The paper uses an ImageNet/face-pretrained ResNet-18 at
        112 px; fermine's default is the CPU-sized ``small_cnn`` at 64 px, like tasks.train.
    pretrained: local weights file or checkpoint folder for both pairs' backbones (optional).
    epochs (N): 6. batch_size: 200 images per mini-batch, ``labeled_fraction`` = 1/4 of them labeled,
        the rest drawn from the unlabeled pool (all labeled when no pool is given).
    lr, lr_schedule, lr_milestones, lr_gamma: 0.01, multiplied by 0.1 after epoch 3 ("multistep").
    optimizer, momentum, weight_decay: SGD, 0.9 and 5e-4.
    seed: the run's seed: initialisation, batches, flips and pool order derive from it (tasks.engine.seeding);
        the pairs are built one after the other from it, so they start from different initialisations.
    device: "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ... amp: fp16 autocast on CUDA.

    PT's own fields:
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
    train_splits: splits of the labeled table used for training. pool_splits: splits of the pool table
        used as unlabeled data (None = every row; any labels there are ignored).
    val_splits: splits of the validation table (``val_uri`` of :func:`train_pt`), when one is given.
    pool_cache_rows: pools up to this many rows are decoded once and kept in memory; larger pools are
        streamed shard by shard through a shuffle buffer of this many images.
    log_every: steps between progress events (each costs a device sync).
    """

    epochs: int = 6
    batch_size: int = 200
    lr: float = 0.01
    lr_schedule: str = "multistep"
    lr_milestones: tuple[int, ...] = (3,)
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    num_classes: int = 7
    labeled_fraction: float = 0.25
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
    train_splits: tuple[str, ...] = ("train",)
    pool_splits: tuple[str, ...] | None = None
    val_splits: tuple[str, ...] = ("val",)
    pool_cache_rows: int = 20000
    log_every: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
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
        if self.turn_iters < 1:
            problems.append(f"turn_iters (T)={self.turn_iters} must be >= 1")
        if not 0.0 <= self.ema_max < 1.0:
            problems.append(f"ema_max={self.ema_max} must be in [0, 1)")
        if not 0.0 < self.confidence_threshold < 1.0:
            problems.append(f"confidence_threshold={self.confidence_threshold} must be in (0, 1)")
        if self.consistency_max < 0 or self.consistency_shape < 0:
            problems.append(f"consistency_max={self.consistency_max} and consistency_shape={self.consistency_shape} "
                            "must be >= 0")
        if self.log_every < 1:
            problems.append(f"log_every={self.log_every} must be >= 1")
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
    """The fine-tune baseline matched to ``cfg`` (tasks.train): same network, epochs, optimiser, lr schedule
    and labeled images per step, without the pool, the teachers or the sample selection."""
    from tasks.train import TrainConfig

    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(Recipe)}
    return TrainConfig(**{**shared, "batch_size": cfg.labeled_per_batch}, num_classes=cfg.num_classes,
                       hflip=cfg.hflip, train_splits=tuple(cfg.train_splits))


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
    """The pairs' students and their teachers (frozen copies), built one after the other from torch's
    generator (seeded by the engine), so every pair starts from its own initialisation."""
    students, teachers = [], []
    for _ in range(cfg.n_pairs):
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
    backward_step: Callable[[torch.Tensor, torch.optim.Optimizer], None] | None = None,
) -> StepInfo:
    """One iteration of Algorithm 1 (lines 3-9) on uint8 images ``xl`` (labeled, labels ``yl``) + ``xu``.

    ``t`` is the iteration number after incrementing (1 for the first batch). ``backward_step(loss, opt)``
    updates one student (zero_grad, backward, step; default: exactly that, unscaled); the engine passes
    ``ctx.backward_step`` so AMP's loss scaling and gradient clipping apply.
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
            conf_l.append(float(l_task.detach()))
            over_budget = float(l_pen.detach()) > cfg.confidence_budget
            conf_lambda[j] = conf_lambda[j] / 0.99 if over_budget else conf_lambda[j] / 1.01
        if backward_step is None:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            backward_step(loss, opt)
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
    checkpoint_uri: str  # the run folder: model.pt + model.json hold the chosen teacher
    filtered_uri: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    forget_rate: float
    label_noise: dict[str, Any] | None


def _filter_stats(filtered: np.ndarray, noisy: np.ndarray) -> dict[str, float]:
    """How well the filtered-out set matches the truly noisy samples (one decision per sample)."""
    n_noisy, n_clean = int(noisy.sum()), int((~noisy).sum())
    f_noisy, f_clean = int((filtered & noisy).sum()), int((filtered & ~noisy).sum())
    return {
        "noisy_filtered_rate": f_noisy / n_noisy if n_noisy else float("nan"),
        "clean_filtered_rate": f_clean / n_clean if n_clean else float("nan"),
        "filtered_precision": f_noisy / (f_noisy + f_clean) if f_noisy + f_clean else float("nan"),
    }


def _method_name(cfg: PTConfig) -> str:
    if cfg.n_pairs == 1 and cfg.forget_rate == 0:
        return "mean_teacher"
    return "progressive_teacher"


class ProgressiveTeacher(Method):
    """Algorithm 1 on the engine: ``n_pairs`` students (the optimised networks) and their EMA teachers.

    Method state (``last.pt``): the networks, the per-sample filter records (all epochs, and the last
    epoch's with the teachers' losses), the teachers' agreement on the last epoch, the confidence
    penalties' lambdas and the chosen teacher (with its weights when it is chosen on validation data).
    """

    # The consistency ramp and the last epoch's filter records depend on the run's length.
    extendable = False

    automatic_optimization = False  # pt_step updates each student in turn (through ctx.backward_step)

    def __init__(self, cfg: PTConfig, labeled_uri: str, unlabeled_uri: str | None, out_uri: str, *,
                 val_uri: str | None = None, inputs: dict[str, str] | None = None):
        self.cfg, self.labeled_uri, self.unlabeled_uri, self.val_uri = cfg, labeled_uri, unlabeled_uri, val_uri
        self.out_uri, self.inputs = out_uri.rstrip("/"), dict(inputs or {})  # filtered/ is written there
        self.name = _method_name(cfg)
        self.last_info: StepInfo | None = None

    # -- engine hooks
    def setup(self, ctx: StepContext) -> None:
        cfg = self.cfg
        self.students, self.teachers = _build_pair_nets(cfg, ctx.device)
        for net in (*self.students, *self.teachers):
            ctx.prepare(net)
        self.optimizers = [build_optimizer(cfg.optimizer, s.parameters(), cfg.lr, cfg.weight_decay, cfg.momentum)
                           for s in self.students]
        labeled = load_image_set(self.labeled_uri, cfg.input_size, splits=list(cfg.train_splits))
        keep = (labeled.labels >= 0) & (labeled.labels < cfg.num_classes)
        self.n_unusable = int((~keep).sum())
        if not bool(keep.any()):
            raise ValueError(f"{self.labeled_uri} has no labeled rows in split(s) {list(cfg.train_splits)} "
                             f"(labels 0..{cfg.num_classes - 1}); PT needs labeled training data")
        self.labeled = labeled.subset(torch.nonzero(keep).flatten())
        self.clean = _clean_labels(self.labeled_uri, cfg.train_splits, self.labeled.ids)
        self.spec = noise_spec(self.labeled_uri)
        self.r = resolve_forget_rate(cfg.forget_rate, self.spec, cfg.forget_margin)
        self.pool = (_Pool(self.unlabeled_uri, cfg.input_size, cfg.pool_splits, cfg.pool_cache_rows)
                     if self.unlabeled_uri else None)
        self.val = None
        if self.val_uri:
            val = load_image_set(self.val_uri, cfg.input_size, splits=list(cfg.val_splits))
            self.val = val.subset(torch.nonzero(val.labels >= 0).flatten())
        NL, P = len(self.labeled), cfg.n_pairs
        self.nl = min(cfg.labeled_per_batch, NL)
        self.nu = (cfg.batch_size - self.nl) if self.pool is not None else 0
        self.iters = max(1, NL // self.nl)
        self.rec = {k: np.zeros((P, NL), dtype=np.int64) for k in ("decisions", "filtered", "conf_kept")}
        self._reset_last()
        self.conf_lambda = [0.1] * P
        self.best: dict[str, Any] | None = None  # the chosen teacher: {"epoch", "pair", ...}
        self.best_state: dict[str, torch.Tensor] | None = None  # its FERNet weights, when chosen on val

    def _reset_last(self) -> None:
        P, NL = self.cfg.n_pairs, len(self.labeled)
        self.last = {k: np.zeros((P, NL), dtype=np.int64) for k in ("decisions", "filtered")}
        self.last_loss = np.zeros((P, NL), dtype=np.float64)
        self.agree_correct = np.zeros(P, dtype=np.int64)
        self.agree_n = 0

    def steps_per_epoch(self) -> int:
        return self.iters

    def _final_epoch(self, epoch: int) -> bool:
        return epoch == self.cfg.epochs - 1

    def on_epoch_start(self, epoch: int, ctx: StepContext) -> dict[str, Any] | None:
        self._filtered = self._seen = 0
        if self._final_epoch(epoch):
            self._reset_last()
        return None

    def batches(self, epoch: int, ctx: StepContext) -> Iterable[Any]:
        self._flip = ctx.generator(FLIP)  # every network's view: its own flips, in pt_step's order
        perm = torch.randperm(len(self.labeled), generator=ctx.generator(ORDER))
        pool_it = self.pool.batches(self.nu, ctx.generator(POOL)) if self.pool is not None and self.nu > 0 else None
        return self._batches(perm, pool_it)

    def _batches(self, perm: torch.Tensor, pool_it: Iterator[torch.Tensor] | None) -> Iterator[Any]:
        for it in range(self.iters):
            idx = perm[it * self.nl:(it + 1) * self.nl]
            xu = next(pool_it) if pool_it is not None else None
            yield idx, self.labeled.images[idx], self.labeled.labels[idx], xu

    def training_step(self, batch: Any, ctx: StepContext) -> dict[str, Any]:
        cfg, P = self.cfg, self.cfg.n_pairs
        idx, xl, yl, xu = batch
        dev = ctx.device
        xl = ctx.prepare_input(xl.to(dev, non_blocking=True))
        yl = yl.to(dev)
        xu = ctx.prepare_input(xu.to(dev, non_blocking=True)) if xu is not None else None
        info = pt_step(self.students, self.teachers, self.optimizers, xl, yl, xu, t=ctx.global_step + 1,
                       epoch_pos=ctx.epoch + ctx.step / ctx.steps_per_epoch, cfg=cfg, forget_rate=self.r,
                       gen=self._flip, conf_lambda=self.conf_lambda if cfg.confidence_estimator else None,
                       backward_step=lambda loss, opt: ctx.backward_step(loss, [opt]))
        self.last_info = info
        ids = idx.numpy()
        final = self._final_epoch(ctx.epoch)
        for k in range(P):
            sel = info.selected[k].cpu().numpy()
            self.rec["decisions"][k, ids] += 1
            self.rec["filtered"][k, ids] += ~sel
            self.rec["conf_kept"][k, ids] += info.conf_kept[k].cpu().numpy()
            if final:
                self.last["decisions"][k, ids] += 1
                self.last["filtered"][k, ids] += ~sel
                self.last_loss[k, ids] += info.teacher_losses[k].cpu().numpy()
        if final:
            agreed = torch.stack(info.selected).all(0)
            self.agree_n += int(agreed.sum())
            for k in range(P):
                self.agree_correct[k] += int((info.teacher_correct[k] & agreed).sum())
        self._filtered += int(sum(int((~s).sum()) for s in info.selected))
        self._seen += P * len(idx)
        loss = float(np.mean([s + info.weight * c for s, c in zip(info.sup_loss, info.cons_loss)]))
        return {"loss": loss, "sup_loss": float(np.mean(info.sup_loss)), "cons_loss": float(np.mean(info.cons_loss)),
                "ratio": info.ratio, "weight": info.weight, "samples": len(idx) + (0 if xu is None else len(xu))}

    def on_epoch_end(self, epoch: int, ctx: StepContext) -> dict[str, Any] | None:
        cfg, t = self.cfg, ctx.global_step
        entry: dict[str, Any] = {
            "iterations": t, "ratio": selection_ratio(t, self.r, cfg.turn_iters, cfg.ratio),
            "weight": consistency_weight(epoch + 1, cfg.epochs, cfg.consistency_max, cfg.consistency_shape),
            "filtered_fraction": self._filtered / max(1, self._seen),
        }
        if self.clean is not None:
            # Cumulative over training so far: mean fraction of its decisions in which a sample was dropped.
            noisy = self._noisy()
            frac = self.rec["filtered"].sum(0) / np.maximum(1, self.rec["decisions"].sum(0))
            entry["noisy_filter_rate"] = float(frac[noisy].mean()) if noisy.any() else float("nan")
            entry["clean_filter_rate"] = float(frac[~noisy].mean()) if (~noisy).any() else float("nan")
        if self.val is not None:
            from tasks.evaluate import evaluate_images

            accs = [evaluate_images(tn.net, self.val.images, self.val.labels, cfg.num_classes,
                                    device=ctx.device).accuracy for tn in self.teachers]
            entry["val_accuracy"] = accs
            k = int(np.argmax(accs))
            if self.best is None or accs[k] > self.best["val_accuracy"]:
                self.best = {"epoch": epoch + 1, "pair": k, "val_accuracy": accs[k]}
                self.best_state = {n: v.detach().cpu().clone() for n, v in self.teachers[k].net.state_dict().items()}
        return entry

    def _noisy(self) -> np.ndarray:
        return (self.clean >= 0) & (self.clean != self.labeled.labels.numpy())

    def state_dict(self) -> dict[str, Any]:
        return {
            "students": [s.state_dict() for s in self.students], "teachers": [t.state_dict() for t in self.teachers],
            "records": {k: torch.from_numpy(v.copy()) for k, v in self.rec.items()},
            "last": {k: torch.from_numpy(v.copy()) for k, v in self.last.items()},
            "last_loss": torch.from_numpy(self.last_loss.copy()),
            "agree": {"n": self.agree_n, "correct": self.agree_correct.tolist()},
            "conf_lambda": list(self.conf_lambda), "best": self.best, "best_state": self.best_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in range(self.cfg.n_pairs):
            self.students[k].load_state_dict(state["students"][k])
            self.teachers[k].load_state_dict(state["teachers"][k])
        self.rec = {k: v.numpy().astype(np.int64) for k, v in state["records"].items()}
        self.last = {k: v.numpy().astype(np.int64) for k, v in state["last"].items()}
        self.last_loss = state["last_loss"].numpy().astype(np.float64)
        self.agree_n = int(state["agree"]["n"])
        self.agree_correct = np.asarray(state["agree"]["correct"], dtype=np.int64)
        self.conf_lambda = [float(v) for v in state["conf_lambda"]]
        self.best, self.best_state = state["best"], state["best_state"]

    def _choose_teacher(self) -> None:
        """Without validation data: the final teacher with the higher accuracy on the labeled samples every
        teacher kept in the last epoch (the samples PT itself believes clean); no test data is used."""
        if self.best is not None:
            return
        n = self.agree_n
        accs = [c / n if n else float("nan") for c in self.agree_correct.tolist()]
        k = int(np.nanargmax(accs)) if n else 0
        self.best = {"epoch": self.cfg.epochs, "pair": k, "agreed_clean_accuracy": accs[k], "agreed_n": n}

    def final_metrics(self, history: list[dict[str, Any]], ctx: StepContext) -> dict[str, Any]:
        """Choose the teacher, write ``filtered/`` (the paper's Table 6 / Fig. 9 come from it) and return
        the run's metrics."""
        cfg = self.cfg
        self._choose_teacher()
        labels_np = self.labeled.labels.numpy()
        NL = len(labels_np)
        decisions = self.last["decisions"].sum(0)
        filtered_out = (decisions > 0) & (self.last["filtered"].sum(0) == decisions)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_last_loss = np.where(decisions > 0, self.last_loss.sum(0) / decisions, np.nan)
        filtered_uri = join(self.out_uri, FILTERED_DIR)
        ffs, fpath = _fs(filtered_uri)
        if ffs.exists(fpath):
            ffs.rm(fpath, recursive=True)  # our own output, rebuilt from the saved state
        clean = self.clean
        table = pa.table({
            "id": pa.array(self.labeled.ids, pa.string()),
            "label": pa.array(labels_np, pa.int8()),
            CLEAN_LABEL: pa.array([None if c < 0 else int(c) for c in clean] if clean is not None else [None] * NL,
                                  pa.int8()),
            "decisions": pa.array(self.rec["decisions"].sum(0), pa.int32()),
            "filtered": pa.array(self.rec["filtered"].sum(0), pa.int32()),
            "conf_kept": pa.array(self.rec["conf_kept"].sum(0), pa.int32()),
            "last_decisions": pa.array(decisions, pa.int32()),
            "last_filtered": pa.array(self.last["filtered"].sum(0), pa.int32()),
            "last_loss": pa.array(mean_last_loss, pa.float32()),
            "filtered_out": pa.array(filtered_out, pa.bool_()),
        })
        with ArtifactWriter(filtered_uri, stage="pt.filtered", config=cfg.to_dict(), inputs=self.inputs,
                            rows_per_shard=65536) as w:
            w.write(table)
        metrics: dict[str, Any] = {
            "method": self.name, "forget_rate": self.r, "labeled": NL, "unusable_labeled_rows": self.n_unusable,
            "iterations": ctx.global_step, "iterations_per_epoch": self.iters, "labeled_per_batch": self.nl,
            "unlabeled_per_batch": self.nu, "teacher": self.best, "filtered_out": int(filtered_out.sum()),
            "filtered_out_per_class": {str(c): int((filtered_out & (labels_np == c)).sum())
                                       for c in range(cfg.num_classes)},
            "config": cfg.to_dict(), "inputs": dict(self.inputs), "label_noise": self.spec,
        }
        if clean is not None:
            noisy = self._noisy()
            metrics["noisy_labels"] = int(noisy.sum())
            metrics.update(_filter_stats(filtered_out, noisy))
            frac = self.rec["filtered"].sum(0) / np.maximum(1, self.rec["decisions"].sum(0))
            metrics["noisy_filter_rate_all_epochs"] = float(frac[noisy].mean()) if noisy.any() else float("nan")
            metrics["clean_filter_rate_all_epochs"] = float(frac[~noisy].mean()) if (~noisy).any() else float("nan")
        return metrics

    def export(self, ctx: StepContext) -> tuple[nn.Module, dict[str, Any]]:
        """The chosen teacher's FERNet (without the confidence head) and its model.json fields."""
        self._choose_teacher()
        net = self.teachers[self.best["pair"]].net
        if self.best_state is not None:
            net = copy.deepcopy(net)
            net.load_state_dict(self.best_state)
        from tasks.train import class_names

        return net, {"task": "classification", "classes": class_names(self.cfg.num_classes),
                     "input_size": self.cfg.input_size, "mean": list(MEAN), "std": list(STD),
                     "label_noise": self.spec, "forget_rate": self.r, "chosen_teacher": self.best,
                     "labeled_uri": self.labeled_uri, "unlabeled_uri": self.unlabeled_uri, "val_uri": self.val_uri}


def train_pt(
    cfg: PTConfig,
    labeled_uri: str,
    unlabeled_uri: str | None,
    out_uri: str,
    progress: Callable[[dict[str, Any]], None] | None = None,
    *,
    val_uri: str | None = None,
    resume: bool = True,
) -> PTResult:
    """Train Progressive Teacher into ``out_uri`` and save the chosen teacher there (module docstring: outputs).

    The teacher saved is the best (epoch, pair) by accuracy on ``val_uri`` when one is given;
    otherwise the final teacher with the higher accuracy on the labeled samples that every teacher
    kept in the last epoch (the samples PT itself believes clean), so no test data is ever used for
    the choice. A run interrupted between epochs resumes from ``last.pt`` with identical results (the
    same config and tables required: tasks.engine.ResumeMismatch names what differs); a finished run is
    returned as it is. ``progress`` receives the engine's events: {"event": "step", ...} every
    ``cfg.log_every`` steps (with the step's R(t) ``ratio``, consistency ``weight`` and iteration ``t``)
    and {"event": "epoch", ...} with the epoch's record after each epoch. ``resume=False`` starts over.
    """
    out_uri = out_uri.rstrip("/")
    inputs = {"labeled": Artifact(labeled_uri).digest}
    if unlabeled_uri:
        inputs["unlabeled"] = Artifact(unlabeled_uri).digest
    if val_uri:
        inputs["val"] = Artifact(val_uri).digest
    if cfg.pretrained:
        inputs["pretrained"] = weights_digest(cfg.pretrained)
    method = ProgressiveTeacher(cfg, labeled_uri, unlabeled_uri, out_uri, val_uri=val_uri, inputs=inputs)

    def events(d: dict[str, Any]) -> None:
        info = method.last_info
        if d["event"] == "step" and info is not None:
            d = {**d, "t": info.t, "ratio": info.ratio, "weight": info.weight}  # the step's, not the running mean
        progress(d)

    res = fit(method, out_uri, config=cfg.to_dict(), inputs=inputs, log_every=cfg.log_every, resume=resume,
              progress=events if progress is not None else None, **cfg.fit_options())
    m = res.metrics
    result = PTResult(checkpoint_uri=out_uri, filtered_uri=join(out_uri, FILTERED_DIR), metrics=m,
                      history=res.history, forget_rate=float(m["forget_rate"]), label_noise=m.get("label_noise"))
    atomic_write_bytes(join(out_uri, SUMMARY_FILE), dumps_json({
        "checkpoint_uri": result.checkpoint_uri, "filtered_uri": result.filtered_uri, "metrics": m,
        "history": res.history, "forget_rate": result.forget_rate, "label_noise": result.label_noise,
    }).encode())
    return result


def load_result(out_uri: str) -> PTResult:
    """Read a finished run's ``pt.json``."""
    fs, path = _fs(out_uri)
    p = f"{path}/{SUMMARY_FILE}"
    if not fs.exists(p):
        raise FileNotFoundError(f"{out_uri} has no {SUMMARY_FILE}: the Progressive Teacher run there did not finish")
    d = json.loads(fs.cat_file(p).decode())
    return PTResult(checkpoint_uri=d["checkpoint_uri"], filtered_uri=d["filtered_uri"], metrics=d["metrics"],
                    history=d["history"], forget_rate=d["forget_rate"], label_noise=d.get("label_noise"))
