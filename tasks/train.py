"""The supervised method: teacher, PASM student, primitive learner and every retraining use it.

Recipe (PASM Sec. IV-B, torchvision's classification reference): SGD with momentum 0.9, lr 0.01
multiplied by 0.1 every 10 epochs, weight decay 5e-4, random horizontal flip. With a teacher the loss
is PASM Eq. 4: ``alpha * CE(student(x), y) + beta * MSE(student logits, teacher logits)`` on the same
(augmented) batch, the teacher frozen in eval mode.

The loop, resume, schedule and checkpoint are the engine's (tasks.engine.fit); this module is the
plug-in (:class:`Supervised`) and :func:`train`, its entry point. Data: tasks.engine.loaders (decoded
once into memory when the uint8 images fit, else streamed from the shards by DataLoader workers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from storage.artifact import Artifact
from tasks.data import MEAN, STD, normalize
from tasks.engine import Recipe, StepContext, build_optimizer, fit
from tasks.engine.checkpoint import module_digest, weights_digest
from tasks.engine.distributed import current_world
from tasks.engine.loaders import labeled_source, load_labeled
from tasks.engine.method import Method
from tasks.engine.seeding import FLIP, TRANSFORM
from tasks.models import FERNet, build_model, load_pretrained
from tasks.pasm.erase import random_erasing_batch

__all__ = ["Supervised", "TrainConfig", "TrainResult", "load_labeled", "train", "training_loss"]

NORMALIZATIONS = ("auto", "imagenet", "half")


@dataclass(frozen=True)
class TrainConfig(Recipe):
    """Everything that defines a supervised run. Defaults: the PASM recipe, small_cnn at 64 px for CPU runs."""

    num_classes: int = 7
    hflip: bool = True  # random horizontal flip, p = 0.5 per image
    # Zhong et al.'s random erasing, online (per image, per batch): probability (0 = off), area range as a
    # fraction of the image, smallest aspect ratio (log-uniform in [aspect, 1/aspect]); random fill.
    random_erasing: float = 0.0
    random_erasing_area: tuple[float, float] = (0.02, 0.4)
    random_erasing_aspect: float = 0.3
    # Input normalisation: "auto" = what the starting weights were trained with (a fermine checkpoint's
    # mean/std, ImageNet's for torchvision weights), else 0.5/0.5; "imagenet" or "half" to force one.
    normalization: str = "auto"
    class_balanced: bool = False  # CE weights n / (k * n_c) over the k classes present
    alpha: float = 1.0  # PASM Eq. 4 weight of the CE term
    beta: float = 0.0  # PASM Eq. 4 weight of MSE(student logits, teacher logits); needs a teacher
    train_splits: tuple[str, ...] = ("train",)
    val_splits: tuple[str, ...] = ("test",)  # splits of the validation table evaluated after each epoch
    data: str = "auto"  # "memory" (decode once), "stream" (DataLoader workers over shards), "auto"
    memory_limit_mb: int = 4096  # "auto" decodes into memory when the uint8 images fit in this
    num_workers: int | None = None  # streaming decode workers; None = min(8, cpus - 1)
    shuffle_buffer: int = 4096  # streaming: images per worker shuffled together
    eval_batch_size: int = 256
    log_every: int = 10  # steps between on_batch callbacks (each costs a device sync)

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (self.num_classes >= 2, "num_classes must be >= 2"),
            (self.batch_size >= 2, "batch_size must be >= 2 (batch norm needs 2 samples)"),
            (self.alpha >= 0 and self.beta >= 0, "alpha and beta must be >= 0"),
            (self.data in ("auto", "memory", "stream"), "data must be 'auto', 'memory' or 'stream'"),
            (len(self.train_splits) > 0, "train_splits must name at least one split"),
            (self.shuffle_buffer >= 1, "shuffle_buffer must be >= 1"),
            (0 <= self.random_erasing <= 1, "random_erasing is a probability in [0, 1]"),
            (0 < self.random_erasing_area[0] <= self.random_erasing_area[1] < 1,
             "random_erasing_area must be (low, high) with 0 < low <= high < 1"),
            (0 < self.random_erasing_aspect <= 1, "random_erasing_aspect must be in (0, 1]"),
            (self.normalization in NORMALIZATIONS, f"normalization must be one of {NORMALIZATIONS}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"{msg} (TrainConfig)")

    def normalization_for(self, init_from: str | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) of this run's inputs; ``init_from`` is the checkpoint the weights start from."""
        from tasks.data import IMAGENET_MEAN, IMAGENET_STD

        if self.normalization == "imagenet":
            return IMAGENET_MEAN, IMAGENET_STD
        start = init_from or self.pretrained
        if self.normalization == "half" or not start:
            return MEAN, STD
        from tasks.models import weights_normalization

        return weights_normalization(start)


@dataclass
class TrainResult:
    checkpoint_uri: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def training_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 0.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """PASM Eq. 4: alpha * CE(logits, y) + beta * MSE(logits, teacher logits); CE alone without a teacher."""
    loss = alpha * F.cross_entropy(logits.float(), labels, weight=weight)
    if teacher_logits is not None and beta > 0:
        loss = loss + beta * F.mse_loss(logits.float(), teacher_logits.float())
    return loss


def _class_weights(counts: torch.Tensor) -> torch.Tensor:
    """n / (k * n_c) for the k classes present (mean weight per sample = 1); absent classes get 0."""
    counts = counts.double()
    present = counts > 0
    w = torch.zeros_like(counts)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w.float()


BatchTransform = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


class Supervised(Method):
    """Cross-entropy on labeled tables, optionally with PASM Eq. 4's frozen teacher term."""

    name = "supervised"
    data_parallel = True

    def __init__(self, cfg: TrainConfig, train_uris: Sequence[str], *, teacher: FERNet | None = None,
                 init_from: str | None = None, val_uri: str | None = None,
                 batch_transform: BatchTransform | None = None, loss_hook: Callable[..., torch.Tensor] | None = None):
        self.cfg, self.uris = cfg, list(train_uris)
        self.teacher, self.init_from, self.val_uri = teacher, init_from, val_uri
        self.batch_transform, self.loss_hook = batch_transform, loss_hook
        self.mean, self.std = cfg.normalization_for(init_from)
        self.init_report: str | None = None
        self._threads = torch.get_num_threads()

    # -- engine hooks
    def setup(self, ctx: StepContext) -> None:
        cfg = self.cfg
        self.model = build_model(cfg.arch, cfg.num_classes)
        start = self.init_from or cfg.pretrained
        if start:
            self.init_report = load_pretrained(self.model, start).summary()
        ctx.prepare(self.model)
        if self.teacher is not None:
            self.teacher = self.teacher.to(ctx.device).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.source, self.unlabeled = labeled_source(cfg, self.uris, ctx.device)
        counts = self.source.class_counts
        if counts is not None and int(counts.sum()) == 0:
            raise ValueError(f"no labeled rows in split(s) {list(cfg.train_splits)} of {self.uris}; check the split "
                             "names (`fermine inspect`) or --split")
        self.weight = _class_weights(counts).to(ctx.device) if cfg.class_balanced else None
        self.val = None
        if self.val_uri is not None:
            vx, vy, _ = load_labeled(self.val_uri, cfg.input_size, cfg.val_splits, cfg.num_classes)
            if len(vy) == 0:
                raise ValueError(f"validation table {self.val_uri} has no labeled rows in split(s) "
                                 f"{list(cfg.val_splits)}")
            self.val = (vx, vy)
        self.optimizers = [build_optimizer(cfg.optimizer, self.model.parameters(), cfg.lr, cfg.weight_decay,
                                           cfg.momentum)]
        # Decode workers and torch's intra-op threads share the CPU: give torch the cores the workers do
        # not use, or OpenMP threads spin against the workers (5x slower seen on 2 cores).
        if ctx.device.type == "cpu" and self.source.mode == "stream" and self.source.num_workers:
            torch.set_num_threads(max(1, min(self._threads, (os.cpu_count() or 1) - self.source.num_workers)))

    def teardown(self, ctx: StepContext) -> None:
        torch.set_num_threads(self._threads)

    def steps_per_epoch(self) -> int:
        return self.source.steps()

    def batches(self, epoch: int, ctx: StepContext) -> Iterable[Any]:
        self.model.train()
        self._flip, self._tf = ctx.sample_generator(FLIP), ctx.sample_generator(TRANSFORM)
        return self.source.batches(epoch)

    def training_step(self, batch: Any, ctx: StepContext) -> dict[str, Any]:
        cfg = self.cfg
        images, labels = batch
        images = images.to(ctx.device, non_blocking=True)
        labels = labels.to(ctx.device, non_blocking=True)
        n = len(labels)
        if cfg.hflip:
            flip = (torch.rand(n, generator=self._flip) < 0.5).to(ctx.device).view(-1, 1, 1, 1)
            images = torch.where(flip, images.flip(3), images)
        if cfg.random_erasing > 0:
            images = random_erasing_batch(images, self._tf, cfg.random_erasing, cfg.random_erasing_area,
                                          cfg.random_erasing_aspect)
        if self.batch_transform is not None:
            images = self.batch_transform(images, labels, self._tf)
        x = ctx.prepare_input(normalize(images, self.mean, self.std))
        feats = self.model.features(x)
        logits = self.model.head(feats)
        t_logits = None
        if self.teacher is not None and cfg.beta > 0:
            with torch.no_grad():
                t_logits = self.teacher(x)
        loss = training_loss(logits, labels, t_logits, cfg.alpha, cfg.beta, self.weight)
        if self.loss_hook is not None:
            loss = loss + self.loss_hook(model=self.model, x=x, features=feats, logits=logits, labels=labels)
        acc = (logits.detach().argmax(1) == labels).float().mean()
        return {"loss": loss, "train_acc": acc, "samples": n}

    def _evaluate(self, ctx: StepContext):
        from tasks.evaluate import evaluate_images

        return evaluate_images(self.model, self.val[0], self.val[1], self.cfg.num_classes, device=ctx.device,
                               batch_size=self.cfg.eval_batch_size, amp=ctx.amp, mean=self.mean, std=self.std)

    def validate(self, ctx: StepContext) -> dict[str, Any] | None:
        if self.val is None:
            return None
        ev = self._evaluate(ctx)
        return {"val_loss": ev.loss, "val_accuracy": ev.accuracy, "val_mean_class_accuracy": ev.mean_class_accuracy}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "init_report": self.init_report}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.init_report = state.get("init_report")

    def final_metrics(self, history: list[dict[str, Any]], ctx: StepContext) -> dict[str, Any]:
        counts = self.source.class_counts
        final = dict(history[-1])
        final.update({
            "epochs": self.cfg.epochs,
            "samples_per_epoch": int(counts.sum()) if counts is not None else history[-1]["samples"],
            "class_counts": counts.tolist() if counts is not None else None,
            "unlabeled_skipped": int(self.unlabeled),
            "data_mode": self.source.mode,
            "init": self.init_report,
        })
        if self.val is not None:
            ev = self._evaluate(ctx)
            final["val"] = ev.to_dict()
            self.val_confusion = ev.confusion
        return final

    def export(self, ctx: StepContext) -> tuple[torch.nn.Module, dict[str, Any]]:
        return self.model, {"task": "classification", "classes": class_names(self.cfg.num_classes),
                            "input_size": self.cfg.input_size, "mean": list(self.mean), "std": list(self.std),
                            "train_uris": self.uris, "teacher": self.teacher is not None,
                            "init_from": self.init_from}


def train(
    cfg: TrainConfig,
    train_uris: Sequence[str],
    out_uri: str,
    *,
    teacher: FERNet | None = None,
    init_from: str | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    val_uri: str | None = None,
    resume: bool = True,
    on_batch: Callable[[dict[str, Any]], None] | None = None,
    batch_transform: BatchTransform | None = None,
    loss_hook: Callable[..., torch.Tensor] | None = None,
) -> TrainResult:
    """Train ``cfg.arch`` on the labeled ``train_splits`` rows of the union of ``train_uris``.

    Writes ``out_uri`` (the engine's layout, tasks.engine.loop): ``model.pt`` + ``model.json``,
    ``last.pt`` (every epoch), ``metrics.json``, and ``curves.png`` (+ ``val_confusion.png`` with a
    validation table).

    teacher: frozen network for the PASM Eq. 4 MSE term (weight ``cfg.beta``).
    init_from: checkpoint folder (or weights file) to start from, e.g. the PASM teacher for the student.
    progress: called after every epoch with {epoch, epochs, loss, train_acc, lr, images_per_s, seconds,
        [val_loss, val_accuracy, val_mean_class_accuracy]}.
    val_uri: image table evaluated after each epoch on ``cfg.val_splits``.
    resume: continue from ``out_uri/last.pt`` when present (same config and tables required; a finished
        run is extended when ``epochs`` grew); False starts over.
    on_batch: called every ``cfg.log_every`` steps with {epoch, step, steps, loss, images_per_s}.
    batch_transform: ``f(uint8 images on device, labels, generator) -> uint8 images`` applied after the
        flip (e.g. random erasing); draw randomness from ``generator`` only, so resume stays exact.
    loss_hook: ``f(model=, x=, features=, logits=, labels=) -> scalar`` added to the loss (feature losses).
    """
    uris = [str(u) for u in train_uris]
    if not uris:
        raise ValueError("no training table given")
    if cfg.beta > 0 and teacher is None:
        raise ValueError("beta > 0 needs a teacher (PASM Eq. 4); pass --teacher or set beta = 0")
    if teacher is not None and teacher.num_classes != cfg.num_classes:
        raise ValueError(f"teacher has {teacher.num_classes} classes, the student {cfg.num_classes}")
    inputs = {f"train[{i}]": Artifact(u).digest for i, u in enumerate(uris)}
    if val_uri is not None:
        inputs["val"] = Artifact(val_uri).digest
    if init_from or cfg.pretrained:
        inputs["init"] = weights_digest(init_from or cfg.pretrained)
    if teacher is not None:  # another teacher makes another run: never resumed into this one
        inputs["teacher"] = module_digest(teacher)
    method = Supervised(cfg, uris, teacher=teacher, init_from=init_from, val_uri=val_uri,
                        batch_transform=batch_transform, loss_hook=loss_hook)

    def events(d: dict[str, Any]) -> None:
        kind = d.pop("event")
        if kind == "epoch" and progress is not None:
            progress(d)
        elif kind == "step" and on_batch is not None:
            on_batch(d)

    res = fit(method, out_uri, config=cfg.to_dict(), inputs=inputs, log_every=cfg.log_every, resume=resume,
              progress=events if (progress or on_batch) else None, **cfg.fit_options())
    if not res.reused and current_world().primary:
        _draw(method, cfg, uris, res.history, out_uri.rstrip("/"))
    return TrainResult(out_uri, res.metrics, res.history)


def _draw(method: Supervised, cfg: TrainConfig, uris: list[str], history: list[dict[str, Any]], out: str) -> None:
    from tasks.figures import draw_safely
    from tasks.plots import plot_confusion, plot_curves

    if getattr(method, "val_confusion", None) is not None:
        acc = history[-1].get("val_accuracy", float("nan"))
        draw_safely("validation confusion", plot_confusion, method.val_confusion, class_names(cfg.num_classes),
                    f"{out}/val_confusion.png", title=f"validation ({', '.join(cfg.val_splits)}) acc {acc:.3f}")
    draw_safely("training curves", plot_curves, history, f"{out}/curves.png",
                title=f"{cfg.arch} on {', '.join(uris)}"[:120])


def class_names(k: int) -> list[str]:
    from storage.schema import CLASSES

    return list(CLASSES[:k]) if k <= len(CLASSES) else [str(i) for i in range(k)]
