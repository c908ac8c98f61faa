"""Face alignment: MTCNN detection + 5-point similarity warp to a canonical template.

Both PASM (224 x 224) and the omni-supervised paper (112 x 112) detect and align every face with
MTCNN before anything else. Here:

* ``detect_faces`` runs an MTCNN detector (the ``mtcnn`` package, TensorFlow on CPU) and returns
  every face with its box, confidence and 5 landmarks, in input-image pixels;
* ``align_face`` estimates the least-squares similarity transform (rotation + uniform scale +
  translation, Umeyama 1991 -- what insightface's ``norm_crop`` does) from 5 landmarks to the
  ArcFace template scaled to the output size and warps with OpenCV;
* ``detect_and_align`` does both for ALL faces of a photo (``fermine predict`` reuses it);
* ``align_record`` / ``align_table`` are the stage: one face per input image (the most confident
  large one), or a reject with a reason: "no face", "too small", "low confidence", "corrupt",
  "bad landmarks". A reject reason is ``"<category>: <detail>"``; group by the part before ':'.

Data sets that ship landmarks (synthetic, RAF-DB manual landmarks) are warped from them without
detection; already-aligned data sets (MS1M 112 x 112, FER2013 48 x 48) are only resized
(``detect="never"``).

Everything here is a plain function of its arguments; the detector is passed in, built once by
the caller (``make_detector``), because loading TensorFlow + MTCNN takes seconds.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import cv2
import numpy as np
import pyarrow as pa

from storage.images import ImageDecodeError, decode, encode
from storage.schema import IMAGE_SCHEMA, REJECTS_SCHEMA

# The ArcFace / insightface 5-point template for a 112 x 112 crop (x, y in pixels): left eye,
# right eye, nose tip, left mouth corner, right mouth corner ("left" = image-left), the same
# point order as the image table's `landmarks` column and as MTCNN's keypoints.
TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)

DETECT_MODES = ("auto", "always", "never")
IMAGE_FORMATS = (".png", ".jpg")

# Reject categories (the part of a reject reason before ':').
NO_FACE = "no face"
TOO_SMALL = "too small"
LOW_CONFIDENCE = "low confidence"
CORRUPT = "corrupt"
BAD_LANDMARKS = "bad landmarks"
REJECT_CATEGORIES = (NO_FACE, TOO_SMALL, LOW_CONFIDENCE, CORRUPT, BAD_LANDMARKS)

# How each output row was aligned.
METHOD_DETECTED = "detected"  # MTCNN landmarks -> similarity warp
METHOD_LANDMARKS = "landmarks"  # landmarks shipped with the data set -> similarity warp
METHOD_RESIZE = "resize"  # already aligned: plain resize

# The image table plus what the detector decided, so a user can audit (and filter) the choice.
ALIGNED_SCHEMA = pa.schema(
    list(IMAGE_SCHEMA)
    + [
        pa.field("detected", pa.bool_(), nullable=False),  # True when MTCNN found the face
        pa.field("n_faces", pa.int16()),  # faces MTCNN found in the input image; null if not run
        pa.field("det_confidence", pa.float32()),  # MTCNN confidence of the kept face
        pa.field("det_box", pa.list_(pa.float32(), 4)),  # kept face: x, y, w, h in input pixels
        pa.field("align_method", pa.string(), nullable=False),  # detected / landmarks / resize
    ]
)


@dataclass(frozen=True)
class AlignConfig:
    """Options of the align stage. Every field changes the output, so all are part of its identity.

    size: output side in pixels (square); the template is scaled from 112 to it (PASM: 224).
    detect: "auto" = detect only rows without landmarks; "always" = detect every row, ignoring
        shipped landmarks; "never" = warp from shipped landmarks, plainly resize rows without.
    min_face_size: a face whose box's shorter side is below this many INPUT pixels is not kept
        ("too small"): blowing a 20 px face up to 224 px gives a blur that only adds noise.
    min_confidence: faces MTCNN scores lower are not kept ("low confidence"). MTCNN's own last
        stage already drops faces below 0.8.
    detect_min_face: the smallest face MTCNN looks for (the bottom of its image pyramid), in
        pixels of the image it sees; smaller faces are not found at all. 20 is MTCNN's default.
    detect_upscale_to: if > 0, images whose shorter side is below it are upscaled to it for
        detection only (coordinates are mapped back; the warp reads the original pixels). MTCNN
        misses faces that fill a tiny image (e.g. 25 x 25 LFW crops); upscaling finds them.
    image_format: ".png" (lossless) or ".jpg" for the re-encoded aligned image.
    jpeg_quality: JPEG quality when image_format is ".jpg".
    """

    size: int = 112
    detect: str = "auto"
    min_face_size: int = 32
    min_confidence: float = 0.9
    detect_min_face: int = 20
    detect_upscale_to: int = 0
    image_format: str = ".png"
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError(f"size must be at least 16 pixels, got {self.size}")
        if self.detect not in DETECT_MODES:
            raise ValueError(f"detect must be one of {', '.join(DETECT_MODES)}, got {self.detect!r}")
        if self.min_face_size < 0:
            raise ValueError(f"min_face_size must be >= 0, got {self.min_face_size}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {self.min_confidence}")
        if self.detect_min_face < 4:
            raise ValueError(f"detect_min_face must be >= 4 pixels, got {self.detect_min_face}")
        if self.detect_upscale_to < 0:
            raise ValueError(f"detect_upscale_to must be >= 0, got {self.detect_upscale_to}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {', '.join(IMAGE_FORMATS)}, got {self.image_format!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")


class Detector(Protocol):
    """What we need from a face detector: mtcnn.MTCNN's ``detect_faces`` (mtcnn >= 1.0)."""

    def detect_faces(self, image: Any, **kwargs: Any) -> Any: ...


def make_detector(threads: int = 1) -> Detector:
    """Build an MTCNN detector on the CPU. Slow (TensorFlow import + weights): build one per process.

    TensorFlow's thread pools can only be sized before it first runs, so call this before any
    other TensorFlow use in the process; later calls keep whatever pools exist.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    _load_triton_before_tensorflow()
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(max(1, threads))
        tf.config.threading.set_inter_op_parallelism_threads(max(1, threads))
    except RuntimeError:
        pass  # TensorFlow already initialised in this process: its pools are fixed now
    from mtcnn import MTCNN

    return MTCNN(device="CPU:0")


def _load_triton_before_tensorflow() -> None:
    """Import triton (torch's compiler backend) ahead of TensorFlow when it is installed.

    Both bundle LLVM; once TensorFlow is loaded, the first ``import triton`` (which torch does
    lazily, e.g. when an optimizer is built) segfaults the process. Loaded first, both coexist,
    so detection and training can share one process (``fermine predict``, the test suite).
    """
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401


def template(size: int) -> np.ndarray:
    """The 5-point template (5 x 2, pixels) for a size x size crop."""
    return TEMPLATE_112 * (size / 112.0)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src onto dst.

    Umeyama's closed form (the estimator insightface uses via scikit-image). Returns a 2 x 3
    matrix for cv2.warpAffine. Raises ValueError for degenerate points (all coincident, NaN).
    """
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"need matching point sets of at least 2 points, got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("landmarks contain NaN or infinite values")
    n = len(src)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    var_s = (sc**2).sum() / n
    if var_s < 1e-6:
        raise ValueError("landmarks are all at the same point")
    cov = dc.T @ sc / n
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0  # a proper rotation, never a reflection
    rot = u @ np.diag(d) @ vt
    scale = float((s * d).sum() / var_s)
    t = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, t[:, None]])


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts @ matrix[:, :2].T + matrix[:, 2]


def warp(rgb: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """cv2.warpAffine to size x size, low-pass filtering first when the warp shrinks the image.

    Bilinear warping alone aliases when a large face is shrunk (a 600 px face to 112 px): the
    image is first resized with INTER_AREA by the warp's scale and the matrix adjusted, so the
    remaining warp is (nearly) scale 1. Outside the image is black, as in insightface.
    """
    scale = math.sqrt(abs(np.linalg.det(matrix[:, :2])))
    m = matrix
    if scale < 0.8:
        h, w = rgb.shape[:2]
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        rx, ry = nw / w, nh / h
        rgb = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA)
        # cv2.resize maps pixel centres: x = (x' + 0.5) / rx - 0.5 in the original image.
        to_orig = np.array([[1 / rx, 0, 0.5 / rx - 0.5], [0, 1 / ry, 0.5 / ry - 0.5], [0, 0, 1]])
        m = matrix @ to_orig
    return cv2.warpAffine(rgb, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def align_face(rgb: np.ndarray, landmarks: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Warp the face with these 5 landmarks onto the template.

    Returns (aligned size x size x 3 image, 2 x 3 matrix, the landmarks in the aligned image).
    Raises ValueError for degenerate landmarks.
    """
    pts = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    if pts.shape != (5, 2):
        raise ValueError(f"need 5 (x, y) landmarks, got {pts.size} values")
    matrix = similarity_transform(pts, template(size))
    return warp(rgb, matrix, size), matrix, apply_transform(matrix, pts)


@dataclass(frozen=True)
class Detection:
    """One face found by the detector, in input-image pixels."""

    box: tuple[float, float, float, float]  # x, y, w, h
    confidence: float
    landmarks: np.ndarray  # 5 x 2: left eye, right eye, nose, left mouth, right mouth (image-left)

    @property
    def min_side(self) -> float:
        return min(self.box[2], self.box[3])

    @property
    def score(self) -> float:
        """Which face to keep: confidence times the box's linear size, so the big face in front
        wins over a confident tiny face in the background."""
        return self.confidence * math.sqrt(max(self.box[2], 0.0) * max(self.box[3], 0.0))

    def problem(self, cfg: AlignConfig) -> str | None:
        """Why this face is not kept under cfg (a reject reason), or None."""
        if self.confidence < cfg.min_confidence:
            return f"{LOW_CONFIDENCE}: {self.confidence:.3f} < min_confidence {cfg.min_confidence}"
        if self.min_side < cfg.min_face_size:
            return f"{TOO_SMALL}: face {self.min_side:.0f} px < min_face_size {cfg.min_face_size}"
        return None


@dataclass(frozen=True)
class AlignedFace:
    detection: Detection
    image: np.ndarray  # size x size x 3 RGB uint8
    matrix: np.ndarray  # 2 x 3, input pixels -> aligned pixels
    landmarks: np.ndarray  # 5 x 2 in aligned pixels
    problem: str | None  # None when the face passes cfg's size/confidence thresholds

    @property
    def box(self) -> tuple[float, float, float, float]:
        return self.detection.box

    @property
    def confidence(self) -> float:
        return self.detection.confidence


# MTCNN's numpy output, one row per face: image index, x1, y1, x2, y2, confidence, then the 5
# landmark x's and the 5 landmark y's (left eye, right eye, nose, mouth left, mouth right).
_MTCNN_COLUMNS = 16


def detect_faces(rgb: np.ndarray, detector: Detector, cfg: AlignConfig) -> list[Detection]:
    """All faces the detector finds in an RGB uint8 image, best score first."""
    h, w = rgb.shape[:2]
    factor = 1.0
    image = rgb
    if cfg.detect_upscale_to and min(h, w) < cfg.detect_upscale_to:
        factor = cfg.detect_upscale_to / min(h, w)
        image = cv2.resize(rgb, (round(w * factor), round(h * factor)), interpolation=cv2.INTER_CUBIC)
    # numpy output keeps sub-pixel landmarks (the json output rounds them to integers).
    raw = np.asarray(
        detector.detect_faces(np.ascontiguousarray(image), output_type="numpy", box_format="xyxy",
                              min_face_size=cfg.detect_min_face),
        dtype=np.float64,
    )
    if raw.size == 0:
        return []
    if raw.ndim != 2 or raw.shape[1] != _MTCNN_COLUMNS:
        raise RuntimeError(f"unexpected MTCNN output of shape {raw.shape}; fermine expects mtcnn >= 1.0 with landmarks")
    faces = []
    for r in raw:
        # Box corners are pixel edges (scale directly); landmarks are points in pixel-centre
        # coordinates, which is what cv2.resize and cv2.warpAffine use.
        x1, y1, x2, y2 = r[1:5] / factor
        pts = (np.stack([r[6:11], r[11:16]], axis=1) + 0.5) / factor - 0.5
        faces.append(Detection(box=(float(x1), float(y1), float(x2 - x1), float(y2 - y1)),
                               confidence=float(r[5]), landmarks=pts))
    faces.sort(key=lambda f: f.score, reverse=True)
    return faces


def detect_and_align(rgb: np.ndarray, detector: Detector, cfg: AlignConfig) -> list[AlignedFace]:
    """Every face in the photo, aligned to cfg.size, best score first.

    Faces failing cfg's thresholds are included with ``problem`` set, so a caller can show them;
    ``[f for f in faces if f.problem is None]`` are the usable ones.
    """
    out = []
    for det in detect_faces(rgb, detector, cfg):
        image, matrix, pts = align_face(rgb, det.landmarks, cfg.size)
        out.append(AlignedFace(det, image, matrix, pts, det.problem(cfg)))
    return out


def choose_face(faces: Sequence[Detection], cfg: AlignConfig) -> tuple[Detection | None, str | None]:
    """The face to keep (best score among those passing cfg), or (None, reject reason)."""
    if not faces:
        return None, f"{NO_FACE}: the detector found no face"
    usable = [f for f in faces if f.problem(cfg) is None]
    if usable:
        return max(usable, key=lambda f: f.score), None
    # Report the most informative failure: a confident face that is too small beats "unsure".
    confident = [f for f in faces if f.confidence >= cfg.min_confidence]
    best = max(confident or faces, key=lambda f: f.score)
    return None, best.problem(cfg)


def _reject(id: str, reason: str, source: str) -> dict[str, Any]:
    return {"id": id, "reason": reason, "source": source}


def _resize(rgb: np.ndarray, size: int) -> np.ndarray:
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    interp = cv2.INTER_AREA if min(rgb.shape[:2]) > size else cv2.INTER_LINEAR
    return cv2.resize(rgb, (size, size), interpolation=interp)


def align_record(
    row: Mapping[str, Any], detector: Detector | None, cfg: AlignConfig
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Align one image-table row: (aligned row, None) or (None, reject row).

    ``detector`` may be None when no row needs detection (detect="never", or "auto" with
    landmarks); a row that needs it then raises ValueError.
    """
    id_ = str(row["id"])
    source = row.get("source") or ""
    try:
        rgb = decode(row.get("image"))
    except ImageDecodeError as e:
        return None, _reject(id_, f"{CORRUPT}: {e}", source)
    given = row.get("landmarks")
    det: Detection | None = None
    n_faces: int | None = None
    if given is not None and cfg.detect != "always":
        method = METHOD_LANDMARKS
        try:
            image, _, pts = align_face(rgb, np.asarray(given, dtype=np.float64), cfg.size)
        except ValueError as e:
            return None, _reject(id_, f"{BAD_LANDMARKS}: {e}", source)
    elif cfg.detect == "never":
        method, image, pts = METHOD_RESIZE, _resize(rgb, cfg.size), None
    else:
        if detector is None:
            raise ValueError(f"row {id_} needs face detection (no landmarks, detect={cfg.detect!r}) but no detector was given")
        faces = detect_faces(rgb, detector, cfg)
        n_faces = len(faces)
        det, reason = choose_face(faces, cfg)
        if det is None:
            return None, _reject(id_, reason or NO_FACE, source)
        method = METHOD_DETECTED
        image, _, pts = align_face(rgb, det.landmarks, cfg.size)
    return {
        "id": id_,
        "image": encode(image, cfg.image_format, cfg.jpeg_quality),
        "label": row.get("label"),
        "split": row.get("split"),
        "source": source,
        "valence": row.get("valence"),
        "arousal": row.get("arousal"),
        "landmarks": None if pts is None else [float(v) for v in pts.reshape(-1)],
        "detected": det is not None,
        "n_faces": n_faces,
        "det_confidence": None if det is None else det.confidence,
        "det_box": None if det is None else list(det.box),
        "align_method": method,
    }, None


def needs_detector(table: pa.Table, cfg: AlignConfig) -> bool:
    """Whether some row of this table will be detected (so a detector must be built)."""
    if cfg.detect == "never":
        return False
    if cfg.detect == "always" or "landmarks" not in table.column_names:
        return table.num_rows > 0
    return table.column("landmarks").null_count > 0


def align_table(table: pa.Table, detector: Detector | None, cfg: AlignConfig) -> tuple[pa.Table, pa.Table]:
    """Align every row of an image-table shard: (ALIGNED_SCHEMA table, REJECTS_SCHEMA table)."""
    missing = [c for c in ("id", "image") if c not in table.column_names]
    if missing:
        raise ValueError(f"input table lacks column(s) {missing}: align reads an image table (fermine ingest output)")
    rows, rejects = [], []
    for row in table.to_pylist():
        out, rej = align_record(row, detector, cfg)
        if out is not None:
            rows.append(out)
        else:
            rejects.append(rej)
    return (pa.Table.from_pylist(rows, schema=ALIGNED_SCHEMA),
            pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA))


def reject_category(reason: str) -> str:
    return reason.split(":", 1)[0]
