"""The image table: the one schema every reader writes and every stage reads.

Class order is the PASM paper's Fig. 4 order, shared by all readers and models.
"""

from __future__ import annotations

from typing import Any, Mapping

import pyarrow as pa

CLASSES: tuple[str, ...] = ("neutral", "anger", "disgust", "fear", "happy", "sad", "surprise")
NUM_CLASSES = len(CLASSES)
CLASS_INDEX: dict[str, int] = {c: i for i, c in enumerate(CLASSES)}

IMAGE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # encoded JPEG/PNG bytes
        pa.field("label", pa.int8()),  # index into CLASSES, null when unlabeled
        pa.field("split", pa.string()),  # train / test / val / pool / fold-k
        pa.field("source", pa.string()),  # data set name, e.g. "rafdb", "synthetic"
        pa.field("valence", pa.float32()),
        pa.field("arousal", pa.float32()),
        pa.field("landmarks", pa.list_(pa.float32(), 10)),  # x1,y1,...,x5,y5 in pixels
    ]
)

REJECTS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("source", pa.string()),
    ]
)


def image_row(
    id: str,
    image: bytes,
    *,
    label: int | None = None,
    split: str = "train",
    source: str = "",
    valence: float | None = None,
    arousal: float | None = None,
    landmarks: Any = None,
) -> dict[str, Any]:
    """A row of the image table, validated: a bad label is a ValueError, not a silent drop."""
    if label is not None and not 0 <= int(label) < NUM_CLASSES:
        raise ValueError(f"label {label!r} of {id} is outside 0..{NUM_CLASSES - 1} ({', '.join(CLASSES)})")
    if landmarks is not None:
        landmarks = [float(v) for v in list(landmarks)]
        if len(landmarks) != 10:
            raise ValueError(f"landmarks of {id} must be 5 (x, y) points, got {len(landmarks)} values")
    return {
        "id": id,
        "image": image,
        "label": None if label is None else int(label),
        "split": split,
        "source": source,
        "valence": None if valence is None else float(valence),
        "arousal": None if arousal is None else float(arousal),
        "landmarks": landmarks,
    }


def reject_row(id: str, reason: str, source: str = "") -> Mapping[str, Any]:
    return {"id": id, "reason": reason, "source": source}
