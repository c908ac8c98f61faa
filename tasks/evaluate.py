"""Evaluate a checkpoint on any image table and split: inner- and cross-data-set evaluation alike.

Reports accuracy, per-class accuracy, mean class accuracy (over the classes present in the test set;
absent classes are nan and listed) and the confusion matrix. The test table is streamed record batch
by record batch, so its size is not bounded by memory.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from storage.artifact import Artifact
from tasks import metrics as M
from tasks.data import MEAN, STD, batch_to_imageset, normalize
from tasks.models import FERNet

__all__ = ["EvalResult", "evaluate", "evaluate_images", "predict_logits", "save_confusion_png"]


@dataclass
class EvalResult:
    accuracy: float
    mean_class_accuracy: float  # over classes with test samples
    per_class: list[float]  # nan where the class has no test sample
    confusion: list[list[int]]  # [true][predicted]
    n: int
    classes: list[str] = field(default_factory=list)
    support: list[int] = field(default_factory=list)
    absent_classes: list[str] = field(default_factory=list)
    loss: float = float("nan")  # mean cross-entropy
    unlabeled_skipped: int = 0
    checkpoint_uri: str | None = None
    test_uri: str | None = None
    splits: list[str] | None = None

    @classmethod
    def from_confusion(cls, conf: np.ndarray, classes: Sequence[str], loss: float = float("nan"),
                       **extra: Any) -> "EvalResult":
        conf = np.asarray(conf, dtype=np.int64)
        pc_acc = M.per_class_accuracy(conf)
        sup = M.support(conf)
        return cls(
            accuracy=M.accuracy(conf),
            mean_class_accuracy=M.mean_class_accuracy(conf),
            per_class=[float(v) for v in pc_acc],
            confusion=conf.tolist(),
            n=int(conf.sum()),
            classes=list(classes),
            support=[int(s) for s in sup],
            absent_classes=[c for c, s in zip(classes, sup) if s == 0],
            loss=loss,
            **extra,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: nan becomes None; per-class accuracies also keyed by class name."""

        def clean(v: float) -> float | None:
            return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

        return {
            "accuracy": clean(self.accuracy),
            "mean_class_accuracy": clean(self.mean_class_accuracy),
            "per_class": [clean(v) for v in self.per_class],
            "per_class_by_name": {c: clean(v) for c, v in zip(self.classes, self.per_class)},
            "confusion": self.confusion,
            "n": self.n,
            "classes": self.classes,
            "support": self.support,
            "absent_classes": self.absent_classes,
            "loss": clean(self.loss),
            "unlabeled_skipped": self.unlabeled_skipped,
            "checkpoint_uri": self.checkpoint_uri,
            "test_uri": self.test_uri,
            "splits": self.splits,
        }


@torch.no_grad()
def predict_logits(model: FERNet, images: Iterable[torch.Tensor] | torch.Tensor, *, device: str | torch.device = "cpu",
                   mean: Sequence[float] = MEAN, std: Sequence[float] = STD, batch_size: int = 256,
                   amp: bool = False) -> torch.Tensor:
    """Logits (float32, CPU) for uint8 NCHW images: one tensor (batched here) or an iterable of batches."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    if isinstance(images, torch.Tensor):
        whole = images
        images = (whole[i:i + batch_size] for i in range(0, len(whole), batch_size))
    out = []
    for batch in images:
        x = normalize(batch.to(device, non_blocking=True), mean, std)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
            out.append(model(x).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros((0, model.num_classes))


def _result(logits: torch.Tensor, labels: torch.Tensor, num_classes: int, classes: Sequence[str] | None,
            **extra: Any) -> EvalResult:
    if classes is None:
        from storage.schema import CLASSES

        classes = list(CLASSES[:num_classes]) if num_classes <= len(CLASSES) else [str(i) for i in range(num_classes)]
    labels = labels.cpu().long()
    loss = float(F.cross_entropy(logits, labels)) if len(labels) else float("nan")
    conf = M.confusion_matrix(labels.numpy(), logits.argmax(1).numpy(), num_classes)
    return EvalResult.from_confusion(conf, classes, loss=loss, **extra)


def evaluate_images(model: FERNet, images: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None, *,
                    classes: Sequence[str] | None = None, device: str | torch.device = "cpu",
                    batch_size: int = 256, amp: bool = False, mean: Sequence[float] = MEAN,
                    std: Sequence[float] = STD) -> EvalResult:
    """Evaluate ``model`` on in-memory uint8 images with labels in 0..num_classes-1."""
    k = num_classes or model.num_classes
    logits = predict_logits(model, images, device=device, batch_size=batch_size, amp=amp, mean=mean, std=std)
    return _result(logits, labels, k, classes)


def _labeled_batches(uri: str, size: int, splits: Sequence[str] | None, batch_size: int,
                     counter: dict[str, int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    art = Artifact(uri)
    missing = [c for c in ("image", "label") + (("split",) if splits else ()) if c not in art.schema.names]
    if missing:
        raise ValueError(f"{uri} is not an image table (no column(s) {missing})")
    cols = ["id", "image", "label"] + (["split"] if splits else [])
    for b in art.iter_batches(columns=cols, batch_size=batch_size):
        if splits:
            b = b.filter(pc.is_in(b.column("split"), value_set=pa.array(list(splits))))
        counter["rows"] += b.num_rows
        b = b.filter(pc.fill_null(pc.greater_equal(b.column("label"), 0), False))
        counter["labeled"] += b.num_rows
        if b.num_rows:
            s = batch_to_imageset(b, size)
            yield s.images, s.labels


def evaluate(checkpoint_uri: str, test_uri: str, splits: Sequence[str] | None = ("test",), batch_size: int = 256,
             device: str = "auto", progress: Callable[[dict[str, Any]], None] | None = None) -> EvalResult:
    """Evaluate a checkpoint folder on the labeled rows of ``splits`` (None = every split) of an image table.

    ``progress`` gets ``{"rows", "labeled", "total_rows", "images_per_s"}`` after each batch the model has
    seen (rows read so far, of them labeled in ``splits``, rows in the table, labeled images per second).
    """
    from tasks.engine.checkpoint import load_checkpoint
    from tasks.device import resolve_device

    dev = resolve_device(device)
    model, meta = load_checkpoint(checkpoint_uri, device=dev)
    size = int(meta.get("input_size") or 64)
    k = int(meta["num_classes"])
    counter = {"rows": 0, "labeled": 0}
    labels: list[torch.Tensor] = []

    total = len(Artifact(test_uri))
    t0 = time.perf_counter()

    def batches() -> Iterator[torch.Tensor]:
        for x, y in _labeled_batches(test_uri, size, splits, batch_size, counter):
            if (y >= k).any():
                raise ValueError(f"{test_uri} has label {int(y.max())}, outside the model's {k} classes")
            labels.append(y)
            yield x
            if progress is not None:  # resumed: the model has been through this batch
                secs = time.perf_counter() - t0
                progress({**counter, "total_rows": total,
                          "images_per_s": counter["labeled"] / secs if secs > 0 else float("nan")})

    logits = predict_logits(model, batches(), device=dev, mean=meta.get("mean", MEAN), std=meta.get("std", STD),
                            amp=dev.type == "cuda")
    if counter["labeled"] == 0:
        where = f"split(s) {list(splits)}" if splits else "any split"
        raise ValueError(
            f"{test_uri} has no labeled rows in {where} ({counter['rows']} rows there); check the split names "
            "(`fermine inspect`) or use --split all"
        )
    return _result(logits, torch.cat(labels), k, meta.get("classes"),
                   unlabeled_skipped=counter["rows"] - counter["labeled"], checkpoint_uri=checkpoint_uri,
                   test_uri=test_uri, splits=list(splits) if splits else None)


def save_confusion_png(result: EvalResult, path: str, title: str | None = None) -> None:
    from tasks.plots import plot_confusion

    if title is None:
        title = (f"{result.test_uri or 'test'} [{', '.join(result.splits or ['all'])}]\n"
                 f"acc {result.accuracy:.3f}, mean class acc {result.mean_class_accuracy:.3f}, n={result.n}")
    plot_confusion(result.confusion, result.classes, path, title=title)
