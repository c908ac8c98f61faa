"""The one supervised trainer: teacher, PASM student, primitive learner and every retraining use it.

Recipe (PASM Sec. IV-B, torchvision's classification reference loop): SGD with momentum 0.9, lr 0.01
multiplied by 0.1 every 10 epochs, weight decay 5e-4, random horizontal flip. With a teacher the loss
is PASM Eq. 4: ``alpha * CE(student(x), y) + beta * MSE(student logits, teacher logits)`` on the same
(augmented) batch, the teacher frozen in eval mode.

Data: the image tables are decoded once into uint8 tensors when they fit in memory (the default), or
streamed from the artifact shards by DataLoader workers that decode and shuffle through a buffer.
Images stay uint8 until the device, where they are flipped and normalised (4x less to copy).

Resume: ``<out>/last.pt`` (model, optimiser, scheduler, scaler, epoch, RNG state, history) is written
atomically after every epoch. Every random choice of an epoch (order, flips, transforms) comes from
generators seeded by (seed, epoch), and the global torch RNG (dropout) is restored, so a run resumed
after epoch k ends bit-identical (on CPU) to one that was never interrupted.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from storage.artifact import Artifact
from tasks.checkpoint import (
    META_FILE,
    _fs,
    atomic_write_bytes,
    dumps_json,
    load_training_state,
    save_checkpoint,
    save_training_state,
)
from tasks.data import MEAN, STD, batch_to_imageset, normalize
from tasks.device import resolve_device
from tasks.erase import random_erasing_batch
from tasks.models import FERNet, build_model, load_pretrained

__all__ = ["TrainConfig", "TrainResult", "train", "training_loss"]

NORMALIZATIONS = ("auto", "imagenet", "half")

# Config fields that do not change what is computed: they may differ between a run and its resume.
_RUNTIME_FIELDS = {"epochs", "device", "num_workers", "memory_limit_mb", "eval_batch_size", "log_every"}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Defaults: the PASM recipe, small_cnn at 64 px for CPU runs."""

    arch: str = "small_cnn"  # tasks.models registry name: small_cnn, resnet18/34/50, vgg16
    num_classes: int = 7
    input_size: int = 64  # images are resized to input_size x input_size when decoded
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_step: int = 10  # StepLR: lr *= lr_gamma every lr_step epochs
    lr_gamma: float = 0.1
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
    seed: int = 0
    device: str = "auto"  # "auto" = cuda when available, else cpu; or "cpu", "cuda", "cuda:1"
    amp: bool = True  # mixed precision (fp16 autocast + GradScaler) on CUDA; ignored on CPU
    pretrained: str | None = None  # local weights file or checkpoint folder (never downloaded)
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
        checks = [
            (self.num_classes >= 2, "num_classes must be >= 2"),
            (self.input_size >= 16, "input_size must be >= 16 pixels"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 2, "batch_size must be >= 2 (batch norm needs 2 samples)"),
            (self.lr > 0, "lr must be > 0"),
            (self.lr_step >= 1, "lr_step must be >= 1"),
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
        # Splits given as a list (YAML, CLI) are kept hashable and comparable.
        object.__setattr__(self, "train_splits", tuple(self.train_splits))
        object.__setattr__(self, "val_splits", tuple(self.val_splits))
        object.__setattr__(self, "random_erasing_area", tuple(self.random_erasing_area))

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names})

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


def _seed(*parts: int) -> int:
    """An independent 63-bit seed per (run seed, epoch, purpose): epochs replay identically on resume."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


_FLIP, _ORDER, _TRANSFORM, _WORKER = 1, 2, 3, 4


# ---------------------------------------------------------------- data


def _labeled_mask(batch: pa.RecordBatch, splits: Sequence[str] | None) -> pa.Array:
    """Rows in ``splits`` with a label >= 0 (null = unlabeled)."""
    label = batch.column("label")
    mask = pc.fill_null(pc.greater_equal(label, 0), False)
    if splits is not None:
        mask = pc.and_(mask, pc.is_in(batch.column("split"), value_set=pa.array(list(splits))))
    return mask


def _check_table(uri: str) -> Artifact:
    art = Artifact(uri)
    missing = [c for c in ("image", "label", "split") if c not in art.schema.names]
    if missing:
        raise ValueError(f"{uri} is not an image table (no column(s) {missing}); train on the output of ingest/align")
    return art


def load_labeled(uri: str, size: int, splits: Sequence[str] | None, num_classes: int,
                 threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Decode the labeled rows of ``splits`` into (uint8 N x 3 x size x size, int64 labels, unlabeled count).

    Decoding runs on a thread pool (OpenCV releases the GIL), one record batch per task, in order.
    """
    art = _check_table(uri)
    cols = ["id", "image", "label", "split"]
    unlabeled = 0
    batches: list[pa.RecordBatch] = []
    for b in art.iter_batches(columns=cols, batch_size=256):
        in_split = b if splits is None else b.filter(pc.is_in(b.column("split"), value_set=pa.array(list(splits))))
        kept = in_split.filter(_labeled_mask(in_split, None))
        unlabeled += in_split.num_rows - kept.num_rows
        if kept.num_rows:
            batches.append(kept)
    threads = threads or max(1, min(16, os.cpu_count() or 1))
    with ThreadPoolExecutor(threads) as pool:
        sets = list(pool.map(lambda b: batch_to_imageset(b, size), batches))
    if not sets:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8), torch.zeros(0, dtype=torch.long), unlabeled
    images = torch.cat([s.images for s in sets])
    labels = torch.cat([s.labels for s in sets])
    if (labels >= num_classes).any():
        raise ValueError(f"{uri} has labels up to {int(labels.max())} but the model has {num_classes} classes")
    return images, labels, unlabeled


class _MemorySource:
    """Pre-decoded uint8 images (on the device when they fit there): batches are index gathers."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, device: torch.device):
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if images.numel() < 0.25 * free:
                images, labels = images.to(device), labels.to(device)
            else:
                images, labels = images.pin_memory(), labels.pin_memory()
        self.images, self.labels = images, labels
        self.batch_size, self.seed = batch_size, seed
        self.n = len(labels)
        self.class_counts: torch.Tensor | None = None  # set by _build_source, which knows num_classes
        self.mode = "memory"

    def steps(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(self.n, generator=_generator(self.seed, epoch, _ORDER))
        order = order.to(self.images.device)
        for i in range(0, self.n, self.batch_size):
            idx = order[i: i + self.batch_size]
            if len(idx) < 2:  # batch norm cannot train on a single sample
                break
            yield self.images[idx], self.labels[idx]


class ShardStream(torch.utils.data.IterableDataset):
    """Labeled rows of image-table shards, decoded in DataLoader workers, shuffled through a buffer.

    Yields whole uint8 batches (DataLoader ``batch_size=None``): collating single images in Python
    would cost more than decoding them. Each epoch permutes the shard order; worker w takes every
    nw-th shard; each worker shuffles with its own (seed, epoch, w) generator. The DataLoader
    interleaves workers in a fixed order, so an epoch is a function of (seed, epoch, num_workers).
    """

    def __init__(self, shards: Sequence[tuple[str, int]], size: int, splits: Sequence[str] | None,
                 batch_size: int, seed: int, shuffle_buffer: int, num_classes: int):
        self.shards = list(shards)
        self.size, self.splits = size, splits
        self.batch_size, self.seed = batch_size, seed
        self.shuffle_buffer, self.num_classes = shuffle_buffer, num_classes
        self.epoch = 0
        self.shared_epoch = None  # multiprocessing.Value when workers persist across epochs

    def _decode(self, uri: str, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        table = Artifact(uri).read_shard(index, ["id", "image", "label", "split"])
        parts_x, parts_y = [], []
        for b in table.to_batches(max_chunksize=256):
            b = b.filter(_labeled_mask(b, self.splits))
            if b.num_rows:
                s = batch_to_imageset(b, self.size)
                parts_x.append(s.images)
                parts_y.append(s.labels)
        if not parts_x:
            return torch.zeros((0, 3, self.size, self.size), dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
        y = torch.cat(parts_y)
        if (y >= self.num_classes).any():
            raise ValueError(f"{uri} has labels up to {int(y.max())} but the model has {self.num_classes} classes")
        return torch.cat(parts_x), y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        import cv2

        cv2.setNumThreads(1)  # one decode thread per worker: the workers are the parallelism
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.shared_epoch.value if self.shared_epoch is not None else self.epoch
        order = torch.randperm(len(self.shards), generator=_generator(self.seed, epoch, _ORDER)).tolist()
        mine = [self.shards[i] for i in order[wid::nw]]
        gen = _generator(self.seed, epoch, _WORKER, wid)
        buf_x = torch.zeros((0, 3, self.size, self.size), dtype=torch.uint8)
        buf_y = torch.zeros(0, dtype=torch.long)
        bs = self.batch_size
        for uri, index in mine:
            x, y = self._decode(uri, index)
            buf_x, buf_y = torch.cat([buf_x, x]), torch.cat([buf_y, y])
            if len(buf_y) >= self.shuffle_buffer:
                perm = torch.randperm(len(buf_y), generator=gen)
                buf_x, buf_y = buf_x[perm], buf_y[perm]
                # Emit down to half a buffer: every image is copied about twice, yet each batch mixes
                # images from several shards.
                k = max(1, (len(buf_y) - self.shuffle_buffer // 2) // bs)
                for i in range(k):
                    yield buf_x[i * bs:(i + 1) * bs].clone(), buf_y[i * bs:(i + 1) * bs].clone()
                buf_x, buf_y = buf_x[k * bs:], buf_y[k * bs:]
        perm = torch.randperm(len(buf_y), generator=gen)
        buf_x, buf_y = buf_x[perm], buf_y[perm]
        for i in range(0, len(buf_y), bs):
            if len(buf_y) - i >= 2:
                yield buf_x[i:i + bs], buf_y[i:i + bs]


class _StreamSource:
    """DataLoader over :class:`ShardStream`; workers persist across epochs (no re-spawn per epoch).

    Persistent workers keep their copy of the dataset, so the epoch reaches them through a value in
    shared memory, read when each epoch's iteration starts in the worker.
    """

    def __init__(self, uris: Sequence[str], cfg: TrainConfig, num_workers: int, device: torch.device,
                 class_counts: torch.Tensor | None, rows: int):
        shards = [(u, i) for u in uris for i in range(Artifact(u).num_shards)]
        self.dataset = ShardStream(shards, cfg.input_size, cfg.train_splits, cfg.batch_size, cfg.seed,
                                   cfg.shuffle_buffer, cfg.num_classes)
        self.num_workers = num_workers
        # Spawned, not forked: a child forked from a process whose OpenCV, TensorFlow or Ray threads
        # are running inherits their locks held and hangs in its first cv2 call (seen with cv2's pool).
        ctx = torch.multiprocessing.get_context("spawn") if num_workers else None
        if ctx is not None:
            self.dataset.shared_epoch = ctx.Value("q", 0)
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, num_workers=num_workers, pin_memory=device.type == "cuda",
            prefetch_factor=4 if num_workers else None, persistent_workers=num_workers > 0,
            multiprocessing_context=ctx,
        )
        self.batch_size = cfg.batch_size
        self.n = rows
        self.class_counts = class_counts
        self.mode = "stream"

    def steps(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.dataset.epoch = epoch
        if self.dataset.shared_epoch is not None:
            self.dataset.shared_epoch.value = epoch
        yield from self.loader


def _count_labels(uris: Sequence[str], splits: Sequence[str], num_classes: int) -> tuple[torch.Tensor, int]:
    counts = torch.zeros(num_classes, dtype=torch.long)
    unlabeled = 0
    for u in uris:
        for b in Artifact(u).iter_batches(columns=["label", "split"], batch_size=65536):
            b = b.filter(pc.is_in(b.column("split"), value_set=pa.array(list(splits))))
            m = _labeled_mask(b, None)
            lab = b.filter(m).column("label").to_numpy(zero_copy_only=False).astype(np.int64)
            unlabeled += b.num_rows - len(lab)
            if len(lab) and lab.max() >= num_classes:
                raise ValueError(f"{u} has labels up to {int(lab.max())} but the model has {num_classes} classes")
            counts += torch.bincount(torch.from_numpy(lab), minlength=num_classes)
    return counts, unlabeled


def _build_source(cfg: TrainConfig, uris: Sequence[str], device: torch.device):
    arts = [_check_table(u) for u in uris]
    rows = sum(len(a) for a in arts)
    mode = cfg.data
    if mode == "auto":
        mode = "memory" if rows * 3 * cfg.input_size ** 2 <= cfg.memory_limit_mb * 2 ** 20 else "stream"
    if mode == "memory":
        parts = [load_labeled(u, cfg.input_size, cfg.train_splits, cfg.num_classes) for u in uris]
        images = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        unlabeled = sum(p[2] for p in parts)
        src = _MemorySource(images, labels, cfg.batch_size, cfg.seed, device)
        src.class_counts = torch.bincount(labels, minlength=cfg.num_classes)
        return src, unlabeled
    workers = cfg.num_workers if cfg.num_workers is not None else min(8, max(1, (os.cpu_count() or 2) - 1))
    # One cheap pass over the label/split columns: exact counts for class weights and progress totals.
    counts, unlabeled = _count_labels(uris, cfg.train_splits, cfg.num_classes)
    src = _StreamSource(uris, cfg, workers, device, counts, int(counts.sum()))
    return src, unlabeled


# ---------------------------------------------------------------- training


def _class_weights(counts: torch.Tensor) -> torch.Tensor:
    """n / (k * n_c) for the k classes present (mean weight per sample = 1); absent classes get 0."""
    counts = counts.double()
    present = counts > 0
    w = torch.zeros_like(counts)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w.float()


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_finite(loss_sum: torch.Tensor, epoch: int, step: int) -> None:
    # Checked at log points and epoch ends only: a per-step check would sync the GPU every step.
    if not torch.isfinite(loss_sum):
        raise FloatingPointError(
            f"the training loss diverged (non-finite by epoch {epoch}, step {step}); lower --lr or check the data")


def _check_resumable(saved: dict[str, Any], cfg: TrainConfig, uris: Sequence[str], digests: Sequence[str],
                     out_uri: str) -> None:
    old = {k: v for k, v in saved["config"].items() if k not in _RUNTIME_FIELDS}
    new = {k: v for k, v in cfg.to_dict().items() if k not in _RUNTIME_FIELDS}
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        pairs = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise ValueError(
            f"{out_uri} holds a run with a different configuration ({pairs}); resume needs the same settings. "
            "Use another output folder, or --no-resume to start over there."
        )
    if list(saved.get("train_uris", [])) != list(uris):
        raise ValueError(
            f"{out_uri} was trained on {saved.get('train_uris')}, not {list(uris)}; use another output folder "
            "or --no-resume"
        )
    if "train_digests" in saved and list(saved["train_digests"]) != list(digests):
        # Same paths, other contents (e.g. the mined samples were remade with another margin).
        raise ValueError(
            f"{out_uri} was trained on other contents of {list(uris)} (the tables were rewritten since); "
            "use another output folder or --no-resume"
        )


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
    batch_transform: Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    loss_hook: Callable[..., torch.Tensor] | None = None,
) -> TrainResult:
    """Train ``cfg.arch`` on the labeled ``train_splits`` rows of the union of ``train_uris``.

    Writes ``out_uri``: ``model.pt`` + ``model.json`` (the checkpoint, written when training ends),
    ``last.pt`` (every epoch), ``metrics.json`` (final metrics + per-epoch history), ``curves.png``.

    teacher: frozen network for the PASM Eq. 4 MSE term (weight ``cfg.beta``).
    init_from: checkpoint folder (or weights file) to start from, e.g. the PASM teacher for the student.
    progress: called after every epoch with {epoch, epochs, loss, train_acc, lr, images_per_s, seconds,
        [val_loss, val_accuracy, val_mean_class_accuracy]}.
    val_uri: image table evaluated after each epoch on ``cfg.val_splits``.
    resume: continue from ``out_uri/last.pt`` when present (same config required); False starts over.
    on_batch: called every ``cfg.log_every`` steps with {epoch, step, steps, loss, train_acc, images_per_s}.
    batch_transform: ``f(uint8 images on device, labels, generator) -> uint8 images`` applied after the
        flip (e.g. random erasing); draw randomness from ``generator`` only, so resume stays exact.
    loss_hook: ``f(model=, x=, features=, logits=, labels=) -> scalar`` added to the loss (feature losses).
    """
    from tasks.evaluate import evaluate_images

    uris = [str(u) for u in train_uris]
    if not uris:
        raise ValueError("no training table given")
    if cfg.beta > 0 and teacher is None:
        raise ValueError("beta > 0 needs a teacher (PASM Eq. 4); pass --teacher or set beta = 0")
    if teacher is not None and teacher.num_classes != cfg.num_classes:
        raise ValueError(f"teacher has {teacher.num_classes} classes, the student {cfg.num_classes}")
    device = resolve_device(cfg.device)
    use_amp = cfg.amp and device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels

    digests = [Artifact(u).digest for u in uris]
    saved = load_training_state(out_uri) if resume else None
    if saved is not None:
        _check_resumable(saved, cfg, uris, digests, out_uri)
        if saved["epoch"] > cfg.epochs:
            raise ValueError(f"{out_uri} already holds {saved['epoch']} epochs, more than the {cfg.epochs} asked; "
                             "use another output folder or --no-resume")
        fs, path = _fs(out_uri)
        if saved["epoch"] == cfg.epochs and fs.exists(f"{path}/{META_FILE}") and fs.exists(f"{path}/metrics.json"):
            import json

            metrics = json.loads(fs.cat_file(f"{path}/metrics.json").decode())
            return TrainResult(out_uri, metrics["final"], metrics["history"])

    torch.manual_seed(cfg.seed)
    mean, std = cfg.normalization_for(init_from)
    model = build_model(cfg.arch, cfg.num_classes)
    init_report = None
    if saved is None:
        if init_from:
            init_report = load_pretrained(model, init_from).summary()
        elif cfg.pretrained:
            init_report = load_pretrained(model, cfg.pretrained).summary()
    model.to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if teacher is not None:
        teacher = teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    source, unlabeled = _build_source(cfg, uris, device)
    counts = source.class_counts
    if counts is not None and int(counts.sum()) == 0:
        raise ValueError(
            f"no labeled rows in split(s) {list(cfg.train_splits)} of {uris}; check the split names "
            "(`fermine inspect`) or --split"
        )
    weight = _class_weights(counts).to(device) if cfg.class_balanced else None

    val = None
    if val_uri is not None:
        vx, vy, _ = load_labeled(val_uri, cfg.input_size, cfg.val_splits, cfg.num_classes)
        if len(vy) == 0:
            raise ValueError(f"validation table {val_uri} has no labeled rows in split(s) {list(cfg.val_splits)}")
        val = (vx, vy)

    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    history: list[dict[str, Any]] = []
    start = 0
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        if saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        _set_rng_state(saved["rng"])
        history = list(saved["history"])
        start = int(saved["epoch"])
        init_report = saved.get("init_report")

    # A model.json from an earlier (shorter or other) run must not pass for this one while it trains.
    fs, path = _fs(out_uri)
    if fs.exists(f"{path}/{META_FILE}"):
        fs.rm(f"{path}/{META_FILE}")

    steps = source.steps()
    # Decode workers and torch's intra-op threads share the CPU: when both run on it, give torch the
    # cores the workers do not use, or OpenMP threads spin against the workers (5x slower seen on 2 cores).
    threads = torch.get_num_threads()
    if device.type == "cpu" and source.mode == "stream" and source.num_workers:
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - source.num_workers)))
    try:
        for epoch in range(start + 1, cfg.epochs + 1):
            model.train()
            lr = opt.param_groups[0]["lr"]
            flip_gen = _generator(cfg.seed, epoch, _FLIP)
            tf_gen = _generator(cfg.seed, epoch, _TRANSFORM)
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen = step = 0
            t0 = time.perf_counter()
            for step, (images, labels) in enumerate(source.batches(epoch), 1):
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                n = len(labels)
                if cfg.hflip:
                    flip = (torch.rand(n, generator=flip_gen) < 0.5).to(device).view(-1, 1, 1, 1)
                    images = torch.where(flip, images.flip(3), images)
                if cfg.random_erasing > 0:
                    images = random_erasing_batch(images, tf_gen, cfg.random_erasing, cfg.random_erasing_area,
                                                  cfg.random_erasing_aspect)
                if batch_transform is not None:
                    images = batch_transform(images, labels, tf_gen)
                x = normalize(images, mean, std)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                    feats = model.features(x)
                    logits = model.head(feats)
                    t_logits = None
                    if teacher is not None and cfg.beta > 0:
                        with torch.no_grad():
                            t_logits = teacher(x)
                    loss = training_loss(logits, labels, t_logits, cfg.alpha, cfg.beta, weight)
                    if loss_hook is not None:
                        loss = loss + loss_hook(model=model, x=x, features=feats, logits=logits, labels=labels)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                loss_sum += loss.detach().double() * n
                correct += (logits.detach().argmax(1) == labels).sum()
                seen += n
                if on_batch is not None and (step % cfg.log_every == 0 or step == 1):
                    _check_finite(loss_sum, epoch, step)
                    el = time.perf_counter() - t0
                    on_batch({"epoch": epoch, "epochs": cfg.epochs, "step": step, "steps": steps,
                              "loss": float(loss_sum) / seen, "train_acc": int(correct) / seen,
                              "images_per_s": seen / el if el > 0 else 0.0})
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            if seen == 0:
                raise ValueError(f"epoch {epoch} saw no labeled training rows in split(s) {list(cfg.train_splits)}")
            _check_finite(loss_sum, epoch, step)
            sched.step()
            rec: dict[str, Any] = {"epoch": epoch, "epochs": cfg.epochs, "loss": float(loss_sum) / seen,
                                   "train_acc": int(correct) / seen, "lr": lr, "images_per_s": seen / seconds,
                                   "seconds": seconds, "samples": seen}
            if val is not None:
                ev = evaluate_images(model, val[0], val[1], cfg.num_classes, device=device,
                                     batch_size=cfg.eval_batch_size, amp=use_amp, mean=mean, std=std)
                rec.update({"val_loss": ev.loss, "val_accuracy": ev.accuracy,
                            "val_mean_class_accuracy": ev.mean_class_accuracy})
            history.append(rec)
            save_training_state(out_uri, {
                "epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "rng": _rng_state(),
                "history": history, "config": cfg.to_dict(), "train_uris": uris, "train_digests": digests,
                "init_report": init_report,
            })
            if progress is not None:
                progress(dict(rec))
    finally:
        torch.set_num_threads(threads)

    final: dict[str, Any] = dict(history[-1])
    final.update({
        "epochs": cfg.epochs,
        "samples_per_epoch": int(counts.sum()) if counts is not None else history[-1]["samples"],
        "class_counts": counts.tolist() if counts is not None else None,
        "unlabeled_skipped": int(unlabeled),
        "data_mode": source.mode,
        "device": str(device),
        "amp": use_amp,
        "train_seconds": sum(h["seconds"] for h in history),
        "init": init_report,
    })
    if val is not None:
        ev = evaluate_images(model, val[0], val[1], cfg.num_classes, device=device,
                             batch_size=cfg.eval_batch_size, amp=use_amp, mean=mean, std=std)
        final["val"] = ev.to_dict()
        from tasks.figures import draw_safely
        from tasks.plots import plot_confusion

        classes = _class_names(cfg.num_classes)
        draw_safely("validation confusion", plot_confusion, ev.confusion, classes,
                    f"{out_uri.rstrip('/')}/val_confusion.png",
                    title=f"validation ({', '.join(cfg.val_splits)}) acc {ev.accuracy:.3f}")
    metrics = {"final": final, "history": history, "config": cfg.to_dict(), "train_uris": uris,
               "resumed_from_epoch": int(saved["epoch"]) if saved is not None else 0,
               "val_uri": val_uri, "teacher": teacher is not None, "init_from": init_from}
    atomic_write_bytes(f"{out_uri.rstrip('/')}/metrics.json", dumps_json(metrics).encode())
    from tasks.figures import draw_safely
    from tasks.plots import plot_curves

    draw_safely("training curves", plot_curves, history, f"{out_uri.rstrip('/')}/curves.png",
                title=f"{cfg.arch} on {', '.join(uris)}"[:120])
    # model.json last: its presence marks a finished run.
    save_checkpoint(out_uri, model, {
        "classes": _class_names(cfg.num_classes), "input_size": cfg.input_size, "mean": list(mean),
        "std": list(std), "metrics": final, "config": cfg.to_dict(), "train_uris": uris,
    })
    return TrainResult(out_uri, final, history)


def _class_names(k: int) -> list[str]:
    from storage.schema import CLASSES

    return list(CLASSES[:k]) if k <= len(CLASSES) else [str(i) for i in range(k)]
