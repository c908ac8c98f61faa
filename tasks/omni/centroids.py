"""Class centroids of the primitive model's penultimate features (Omni-supervised FER, Eq. 4).

    center_k = sum_i [y_i == k] f_i / sum_i [y_i == k]

Eq. 4 averages the *raw* features f_i (no normalisation); only the comparison (Eq. 5) is a cosine.
``CentroidConfig.normalize_features`` averages unit-length features instead, an option for backbones
whose feature norm varies a lot between images (then every labeled face weighs the same).

The labeled table is streamed batch by batch and only per-class sums are kept (float64), so the
memory needed does not depend on the size of the labeled set.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from storage.artifact import Artifact, ArtifactWriter, Manifest, identity, is_finished
from storage.schema import CLASSES
from tasks.device import resolve_device

STAGE = "centroids"
CODE_VERSION = "centroids-1"

CENTROID_SCHEMA = pa.schema(
    [
        pa.field("label", pa.int8(), nullable=False),
        pa.field("name", pa.string()),
        pa.field("count", pa.int64(), nullable=False),
        pa.field("centroid", pa.list_(pa.float32())),
    ]
)


@dataclass(frozen=True)
class CentroidConfig:
    splits: tuple[str, ...] | None = ("train",)  # rows of the labeled table to average; None = all labeled rows
    batch_size: int = 256  # images per forward pass
    normalize_features: bool = False  # Eq. 4 averages raw features; True averages unit-length ones
    input_size: int | None = None  # None: the checkpoint's input size
    device: str = "auto"  # "auto" = cuda when available, else cpu

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def checkpoint_digest(checkpoint_uri: str) -> str:
    """A stable digest of a checkpoint: the sha256 of model.pt recorded in model.json (hashed if absent)."""
    from tasks.engine.checkpoint import MODEL_FILE, read_meta

    meta = read_meta(checkpoint_uri)
    if meta.get("model_sha256"):
        return str(meta["model_sha256"])
    import fsspec

    fs, path = fsspec.core.url_to_fs(checkpoint_uri)
    return hashlib.sha256(fs.cat_file(path.rstrip("/") + "/" + MODEL_FILE)).hexdigest()


def input_size_of(meta: dict[str, Any], override: int | None) -> int:
    size = override or meta.get("input_size")
    if not size:
        raise ValueError(
            "the checkpoint does not record its input size (model.json input_size is empty); "
            "pass the size the model was trained at (--input-size)"
        )
    return int(size)


def reuse_or_refuse(out_uri: str, ident: str) -> Manifest | None:
    """A finished artifact with the same identity is reused; one made differently is never overwritten."""
    if not is_finished(out_uri):
        return None
    m = Artifact(out_uri).manifest
    if m.extra.get("identity") == ident:
        return m
    raise FileExistsError(
        f"{out_uri} is a finished artifact made from other inputs or settings; "
        "write to another location or delete it first"
    )


@torch.inference_mode()
def class_feature_sums(
    model: torch.nn.Module,
    labeled_uri: str,
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    splits: Sequence[str] | None,
    batch_size: int,
    normalize_features: bool,
    num_classes: int,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class feature sums (K x D, float64) and counts (K) over the labeled rows, streamed."""
    from tasks.data import batch_to_imageset, normalize

    art = Artifact(labeled_uri)
    cols = [c for c in ("id", "image", "label", "split") if c in art.schema.names]
    if "label" not in cols:
        raise ValueError(f"{labeled_uri} has no label column: centroids need a labeled table")
    sums: np.ndarray | None = None
    counts = np.zeros(num_classes, np.int64)
    for batch in art.iter_batches(columns=cols, batch_size=batch_size):
        mask = pc.is_valid(batch.column("label"))
        if splits is not None and "split" in cols:
            mask = pc.and_(mask, pc.is_in(batch.column("split"), value_set=pa.array(list(splits))))
        batch = batch.filter(mask)
        if batch.num_rows == 0:
            continue
        data = batch_to_imageset(batch, size)
        labels = data.labels.numpy()
        if labels.max() >= num_classes:
            raise ValueError(f"{labeled_uri} has label {labels.max()} but the model has {num_classes} classes")
        feats = model.features(normalize(data.images.to(device), mean, std)).float()
        if normalize_features:
            feats = torch.nn.functional.normalize(feats, dim=1)
        feats = feats.double().cpu()
        if sums is None:
            sums = np.zeros((num_classes, feats.shape[1]), np.float64)
        # index_add: one pass per batch, no per-class Python loop over rows.
        s = torch.zeros((num_classes, feats.shape[1]), dtype=torch.float64)
        s.index_add_(0, torch.from_numpy(labels), feats)
        sums += s.numpy()
        counts += np.bincount(labels, minlength=num_classes)
        if progress is not None:
            progress(batch.num_rows)
    if sums is None:
        raise ValueError(
            f"{labeled_uri} has no labeled rows" + (f" in split(s) {list(splits)}" if splits else "")
            + ": centroids need the labeled training set"
        )
    return sums, counts


def compute_centroids(
    checkpoint_uri: str,
    labeled_uri: str,
    out_uri: str,
    cfg: CentroidConfig = CentroidConfig(),
    progress: Callable[[int], None] | None = None,
) -> Manifest:
    """Eq. 4 over ``labeled_uri`` with the model in ``checkpoint_uri``; writes the centroid artifact.

    One row per class present in the labeled set: label, name, count, centroid (float32 list).
    Classes without labeled rows get no centroid (they cannot be mined) and are listed in
    ``manifest.extra["missing_classes"]``. Fewer than two classes is an error: Eq. 6 needs a runner-up.
    """
    from tasks.engine.checkpoint import load_checkpoint

    config = asdict(cfg)
    inputs = {"checkpoint": checkpoint_digest(checkpoint_uri), "labeled": Artifact(labeled_uri).digest}
    ident = identity(STAGE, config, inputs, CODE_VERSION)
    if (m := reuse_or_refuse(out_uri, ident)) is not None:
        return m
    device = resolve_device(cfg.device)
    model, meta = load_checkpoint(checkpoint_uri, device=device)
    size = input_size_of(meta, cfg.input_size)
    sums, counts = class_feature_sums(
        model, labeled_uri, size=size, mean=meta.get("mean", (0.5, 0.5, 0.5)), std=meta.get("std", (0.5, 0.5, 0.5)),
        splits=cfg.splits, batch_size=cfg.batch_size, normalize_features=cfg.normalize_features,
        num_classes=model.num_classes, device=device, progress=progress,
    )
    names = list(meta.get("classes") or CLASSES[: model.num_classes])
    present = [k for k in range(model.num_classes) if counts[k] > 0]
    if len(present) < 2:
        raise ValueError(
            f"{labeled_uri} has labeled rows of {len(present)} class(es) only; mining needs centroids of at least 2"
        )
    rows = [
        {"label": k, "name": names[k] if k < len(names) else str(k), "count": int(counts[k]),
         "centroid": (sums[k] / counts[k]).astype(np.float32).tolist()}
        for k in present
    ]
    with ArtifactWriter(out_uri, stage=STAGE, config=config, inputs=inputs, schema=CENTROID_SCHEMA) as w:
        w.write_rows(rows)
        return w.commit(extra={
            "identity": ident, "checkpoint": checkpoint_uri, "arch": meta.get("arch"),
            "feature_dim": int(sums.shape[1]), "input_size": size,
            "counts": {names[k] if k < len(names) else str(k): int(counts[k]) for k in range(model.num_classes)},
            "missing_classes": [names[k] if k < len(names) else str(k) for k in range(model.num_classes) if counts[k] == 0],
        })


def load_centroids(uri: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels int64 (K,), centroids float32 (K, D)) from a centroid artifact."""
    t = Artifact(uri).read()
    missing = {"label", "centroid"} - set(t.schema.names)
    if missing:
        raise ValueError(f"{uri} is not a centroid artifact (no {', '.join(sorted(missing))} column); "
                         "make one with `fermine centroids`")
    labels = np.asarray(t["label"].to_pylist(), np.int64)
    cents = np.asarray(t["centroid"].to_pylist(), np.float32)
    if cents.ndim != 2 or len(labels) < 2:
        raise ValueError(f"{uri} holds {len(labels)} centroid(s); mining needs at least 2")
    return labels, cents
