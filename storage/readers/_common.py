"""Helpers shared by the data set readers (not a reader: registers nothing).

Readers validate the layout eagerly (so a wrong path fails before an output artifact is
created) and then stream records from a generator, one image in memory at a time.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

import numpy as np

from storage.images import ImageDecodeError, decode, encode
from storage.readers.base import DatasetFormatError, Reject

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# The image column promises JPEG/PNG bytes; other formats (TIFF, BMP, ...) are re-encoded losslessly.
_KEEP_AS_IS = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")


def require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise DatasetFormatError(f"expected {what} at {path}, but it is not a folder")
    return path


def require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise DatasetFormatError(f"expected {what} at {path}, but there is no such file")
    return path


def as_bool(value: Any, name: str) -> bool:
    """Options arrive from the CLI as strings; accept the usual spellings, refuse anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"option {name} must be true or false, got {value!r}")


def as_int(value: Any, name: str, minimum: int | None = None, allow_none: bool = False) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        if allow_none:
            return None
        raise ValueError(f"option {name} needs an integer value")
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"option {name} must be an integer, got {value!r}") from None
    if minimum is not None and out < minimum:
        raise ValueError(f"option {name} must be >= {minimum}, got {out}")
    return out


def as_float(value: Any, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"option {name} must be a number, got {value!r}") from None


def check_image(rid: str, data: bytes) -> np.ndarray | Reject:
    """Decode once to prove the bytes are an image; a Reject says why not."""
    try:
        return decode(data)
    except ImageDecodeError as e:
        return Reject(rid, f"corrupt: {e}")


def _is_gray(rgb: np.ndarray) -> bool:
    return bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))


def image_bytes(rid: str, data: bytes) -> tuple[bytes, np.ndarray] | Reject:
    """Validated bytes for the image column: JPEG/PNG kept byte for byte, other formats -> PNG."""
    rgb = check_image(rid, data)
    if isinstance(rgb, Reject):
        return rgb
    if data.startswith(_KEEP_AS_IS):
        return data, rgb
    return encode(rgb[..., 0] if _is_gray(rgb) else rgb, ".png"), rgb


def load_image(rid: str, path: str) -> tuple[bytes, np.ndarray] | Reject:
    """Read and validate an image file; missing or unreadable files become rejects, not crashes."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return Reject(rid, f"missing: no image file at {path}")
    except OSError as e:
        return Reject(rid, f"unreadable: {path}: {e.strerror or e}")
    return image_bytes(rid, data)


def five_from_68(points: Sequence[Sequence[float]] | np.ndarray) -> list[float]:
    """The schema's 5 points from the iBUG 68-point scheme (0-based indices).

    Points 36-41 outline the eye on the image-left side, 42-47 the image-right eye, 30 is the
    nose tip, 48 and 54 the mouth corners (image-left, image-right).
    """
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if p.shape[0] != 68:
        raise ValueError(f"expected 68 landmark points, got {p.shape[0]}")
    pts = [p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]]
    return [float(v) for xy in pts for v in xy]


def fold_of(index: int, folds: int) -> str:
    return f"fold-{index % folds}"


def list_images(folder: str) -> list[str]:
    """Image files directly in ``folder`` (sorted for stable order; hidden files ignored)."""
    return sorted(
        n for n in os.listdir(folder)
        if not n.startswith(".") and n.lower().endswith(IMAGE_EXTS) and os.path.isfile(os.path.join(folder, n))
    )


def subdirs(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if not n.startswith(".") and os.path.isdir(os.path.join(folder, n)))


def one_of(value: Any, name: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    v = str(value).strip().lower()
    if v not in choices:
        raise ValueError(f"option {name} must be one of {', '.join(choices)}; got {value!r}")
    return v
