"""Image tables in memory: decode the encoded image column into uint8 tensors.

Stages work on uint8 NCHW tensors (compact, 4x smaller than float) and normalise on the
device right before the model, with the mean/std recorded in the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from storage.artifact import Artifact
from storage.images import decode

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
# torchvision's ImageNet weights were trained on inputs normalised with these: fine-tuning them on
# other statistics shifts every first-layer response.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageSet:
    ids: list[str]
    images: torch.Tensor  # N x 3 x H x W, uint8 RGB
    labels: torch.Tensor  # N int64; -1 where unlabeled
    valence: torch.Tensor  # N float32; nan where missing
    arousal: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: Sequence[int] | torch.Tensor) -> "ImageSet":
        idx = torch.as_tensor(index, dtype=torch.long)
        return ImageSet([self.ids[i] for i in idx.tolist()], self.images[idx], self.labels[idx],
                        self.valence[idx], self.arousal[idx])

    @staticmethod
    def concat(sets: Iterable["ImageSet"]) -> "ImageSet":
        sets = list(sets)
        return ImageSet(
            [i for s in sets for i in s.ids],
            torch.cat([s.images for s in sets]),
            torch.cat([s.labels for s in sets]),
            torch.cat([s.valence for s in sets]),
            torch.cat([s.arousal for s in sets]),
        )


def decode_resized(data: bytes, size: int) -> np.ndarray:
    img = decode(data)
    if img.shape[0] != size or img.shape[1] != size:
        interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_LINEAR
        img = cv2.resize(img, (size, size), interpolation=interp)
    return img


def _column(batch: pa.RecordBatch | pa.Table, name: str, fill: float) -> np.ndarray:
    if name not in batch.schema.names:
        return np.full(batch.num_rows, fill, dtype=np.float64)
    return np.array([fill if v is None else v for v in batch.column(name).to_pylist()], dtype=np.float64)


def batch_to_imageset(batch: pa.RecordBatch | pa.Table, size: int) -> ImageSet:
    """Decode one record batch. Images that fail to decode raise: artifacts hold decodable images only."""
    images = np.stack([decode_resized(b, size) for b in batch.column("image").to_pylist()]) if batch.num_rows \
        else np.zeros((0, size, size, 3), np.uint8)
    return ImageSet(
        ids=[str(i) for i in batch.column("id").to_pylist()],
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        labels=torch.from_numpy(_column(batch, "label", -1)).long(),
        valence=torch.from_numpy(_column(batch, "valence", np.nan)).float(),
        arousal=torch.from_numpy(_column(batch, "arousal", np.nan)).float(),
    )


def load_image_set(uri: str, size: int, splits: Sequence[str] | None = None, limit: int | None = None) -> ImageSet:
    """Load (and decode) an image table, optionally only some splits, into memory."""
    art = Artifact(uri)
    cols = [c for c in ("id", "image", "label", "split", "valence", "arousal") if c in art.schema.names]
    parts: list[ImageSet] = []
    n = 0
    for batch in art.iter_batches(columns=cols, batch_size=512):
        if splits is not None:
            mask = pc.is_in(batch.column("split"), value_set=pa.array(list(splits)))
            batch = batch.filter(mask)
        if limit is not None:
            batch = batch.slice(0, max(0, limit - n))
        if batch.num_rows:
            parts.append(batch_to_imageset(batch, size))
            n += batch.num_rows
        if limit is not None and n >= limit:
            break
    if not parts:
        raise ValueError(
            f"{uri} has no rows" + (f" in split(s) {list(splits)}" if splits else "")
            + ": check the split names with `fermine inspect`"
        )
    return ImageSet.concat(parts)


def normalize(images: torch.Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> torch.Tensor:
    """uint8 NCHW -> normalised float NCHW, on the images' device."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s
