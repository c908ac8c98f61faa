"""Encoding and decoding of the image column (OpenCV; RGB uint8 arrays in memory)."""

from __future__ import annotations

import cv2
import numpy as np


class ImageDecodeError(ValueError):
    pass


def encode(rgb: np.ndarray, fmt: str = ".png", quality: int = 95) -> bytes:
    """Encode an HxWx3 RGB (or HxW gray) uint8 array."""
    arr = np.ascontiguousarray(rgb)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if fmt in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(fmt, arr, params)
    if not ok:
        raise ImageDecodeError(f"could not encode image of shape {rgb.shape} as {fmt}")
    return buf.tobytes()


def decode(data: bytes) -> np.ndarray:
    """Decode JPEG/PNG/BMP/... bytes to an HxWx3 RGB uint8 array; raises ImageDecodeError."""
    if not data:
        raise ImageDecodeError("empty image bytes")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ImageDecodeError("not a decodable image (corrupt or unsupported format)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
