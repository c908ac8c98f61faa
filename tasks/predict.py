"""Use a trained checkpoint on photos: detect every face (MTCNN), align it exactly as training data
was aligned, classify it.

"Exactly as training": the align stage warped faces at its own ``size`` (AlignConfig.size) and
training resized them to the model's ``input_size`` (tasks.data.decode_resized). Here a face is
warped at the align size recorded in the manifest of the table the model was trained on (found via
model.json's ``train_uris``; ``PredictConfig.align_size`` overrides it, and when the table cannot be
read the face is warped at ``input_size`` directly), then resized with the same rule.

* ``predict_photos`` returns one :class:`FaceResult` per detected face; a photo without a face, or
  one that cannot be decoded, gets one row whose ``problem`` says so -- reported, never an error,
  so one bad photo in a folder of thousands does not stop the run.
* Faces the detector finds but that fail the size/confidence thresholds are listed with their
  ``problem`` and no prediction: a 20 px face blown up to the input size gives a guess, not a result.
* Classifiers give a label and the softmax probability of every class; valence/arousal models
  (model.json ``task: valence_arousal``, e.g. CAF) give the two tanh outputs instead.
* ``write_results`` writes the rows as CSV or JSON; ``annotate`` draws boxes and labels on a photo.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import cv2
import numpy as np

from storage.images import ImageDecodeError, decode

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VA_TASK = "valence_arousal"

# Row problems (the part before ':'), matching tasks.align's reject categories where they overlap.
NO_FACE = "no face"
CORRUPT = "corrupt"
# The stage name workers.align writes into its manifests (tasks may not import workers).
ALIGN_STAGE = "align"

__all__ = [
    "FaceResult",
    "IMAGE_EXTENSIONS",
    "PredictConfig",
    "annotate",
    "find_photos",
    "predict_photos",
    "summarize",
    "training_align_size",
    "write_results",
]


@dataclass(frozen=True)
class PredictConfig:
    """Options of ``fermine predict``.

    min_face_size: faces whose box's shorter side is below this many photo pixels are listed but not
        classified (as in the align stage: tiny faces upscaled to the input size are mostly blur).
    min_confidence: faces MTCNN is less sure of are listed but not classified.
    detect_min_face: the smallest face MTCNN looks for, in pixels (the bottom of its image pyramid).
    detect_upscale_to: if > 0, photos whose shorter side is below it are upscaled for detection only.
    align_size: side of the aligned face before it is resized to the model's input size; 0 = as in
        training (see the module doc), else this many pixels.
    batch_size: faces per classifier batch.
    device: torch device for the classifier ("cpu", "cuda", or "auto" = cuda when available).
    threads: TensorFlow threads for MTCNN (only used when predict_photos builds the detector).
    """

    min_face_size: int = 32
    min_confidence: float = 0.9
    detect_min_face: int = 20
    detect_upscale_to: int = 0
    align_size: int = 0
    batch_size: int = 64
    device: str = "cpu"
    threads: int = 1

    def __post_init__(self) -> None:
        if self.align_size and self.align_size < 16:
            raise ValueError(f"align_size must be 0 (as in training) or at least 16 pixels, got {self.align_size}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.device not in ("cpu", "auto") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be cpu, cuda[:N] or auto, got {self.device!r}")


@dataclass
class FaceResult:
    """One detected face of one photo, or one row for a photo with no usable result.

    face: index of the face in the photo (best detection first), None for a photo-level row.
    box: x, y, w, h in photo pixels. problem: why there is no prediction ("no face: ...",
    "corrupt: ...", "too small: ...", "low confidence: ..."), None when predicted.
    """

    photo: str
    face: int | None = None
    box: tuple[float, float, float, float] | None = None
    confidence: float | None = None
    label: str | None = None
    score: float | None = None  # probability of ``label``
    probabilities: dict[str, float] | None = None
    valence: float | None = None
    arousal: float | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["box"] = None if self.box is None else [round(float(v), 2) for v in self.box]
        return d

    def to_row(self, classes: Sequence[str] = ()) -> dict[str, Any]:
        """Flat row for CSV: box_x..box_h and one p_<class> column per class."""
        box = self.box or (None, None, None, None)
        row: dict[str, Any] = {
            "photo": self.photo,
            "face": self.face,
            "box_x": box[0], "box_y": box[1], "box_w": box[2], "box_h": box[3],
            "confidence": self.confidence,
            "label": self.label,
            "score": self.score,
        }
        for c in classes:
            row[f"p_{c}"] = None if self.probabilities is None else self.probabilities.get(c)
        row["valence"] = self.valence
        row["arousal"] = self.arousal
        row["problem"] = self.problem
        return row


def find_photos(paths: Iterable[str]) -> list[str]:
    """Files given directly (any extension: a non-image is reported as corrupt) plus every file with
    an image extension under given folders, recursively, in sorted order.

    Raises FileNotFoundError for a path that does not exist (a typo, not a bad photo).
    """
    out: list[str] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            out.extend(str(f) for f in sorted(path.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            out.append(str(path))
        else:
            raise FileNotFoundError(f"{p} does not exist: pass photo files or folders of photos")
    return out


def _read_photo(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        data = f.read()
    return decode(data)  # RGB uint8; ImageDecodeError (a ValueError) when not an image


def training_align_size(meta: dict[str, Any]) -> int | None:
    """The ``size`` the align stage used for the first aligned table in model.json's ``train_uris``,
    or None when there is none or it cannot be read (e.g. the checkpoint was copied without its data)."""
    from storage.artifact import Artifact

    for uri in meta.get("train_uris") or []:
        try:
            manifest = Artifact(uri).manifest
        except Exception:  # missing, unfinished or unreachable: the checkpoint must still be usable
            continue
        size = manifest.config.get("size")
        if manifest.stage == ALIGN_STAGE and isinstance(size, int) and size > 0:
            return size
    return None


def _resize_like_training(img: np.ndarray, size: int) -> np.ndarray:
    # The rule of tasks.data.decode_resized, which fed the aligned faces to training.
    if img.shape[0] == size and img.shape[1] == size:
        return img
    interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def predict_photos(
    checkpoint_uri: str,
    paths: Sequence[str],
    cfg: PredictConfig = PredictConfig(),
    *,
    detector: Any | None = None,
    on_photo: Callable[[str, list[FaceResult]], None] | None = None,
) -> list[FaceResult]:
    """Detect, align and classify every face in the photos (files or folders) with a checkpoint.

    ``detector``: an MTCNN from tasks.align.make_detector, built here when None (it takes seconds,
    so pass one when calling repeatedly). ``on_photo(path, rows)`` is called after each photo.
    """
    import torch

    from tasks.align import AlignConfig, detect_and_align, make_detector
    from tasks.engine.checkpoint import load_checkpoint
    from tasks.data import MEAN, STD, normalize

    photos = find_photos(paths)
    from tasks.device import resolve_device

    device = resolve_device(cfg.device)
    model, meta = load_checkpoint(checkpoint_uri, device=device)
    size = meta.get("input_size")
    if not size:
        raise ValueError(f"{checkpoint_uri}/model.json has no input_size: cannot tell how to align faces for it")
    is_va = meta.get("task") == VA_TASK
    classes = list(meta.get("classes") or [str(i) for i in range(model.num_classes)])
    mean, std = meta.get("mean") or MEAN, meta.get("std") or STD
    size = int(size)
    align_size = cfg.align_size or training_align_size(meta) or size
    align_cfg = AlignConfig(size=align_size, detect="always", min_face_size=cfg.min_face_size,
                            min_confidence=cfg.min_confidence, detect_min_face=cfg.detect_min_face,
                            detect_upscale_to=cfg.detect_upscale_to)
    if detector is None and photos:
        detector = make_detector(cfg.threads)

    results: list[FaceResult] = []
    for photo in photos:
        rows: list[FaceResult] = []
        try:
            rgb = _read_photo(photo)
        except (ImageDecodeError, OSError) as e:
            rows.append(FaceResult(photo=photo, problem=f"{CORRUPT}: {e}"))
        else:
            faces = detect_and_align(rgb, detector, align_cfg)
            if not faces:
                rows.append(FaceResult(photo=photo, problem=f"{NO_FACE}: the detector found no face"))
            usable = []
            for i, f in enumerate(faces):
                row = FaceResult(photo=photo, face=i, box=tuple(float(v) for v in f.box),
                                 confidence=float(f.confidence), problem=f.problem)
                rows.append(row)
                if f.problem is None:
                    usable.append((row, _resize_like_training(f.image, size)))
            for start in range(0, len(usable), cfg.batch_size):
                chunk = usable[start:start + cfg.batch_size]
                x = torch.from_numpy(np.stack([img for _, img in chunk])).permute(0, 3, 1, 2).contiguous()
                with torch.no_grad():
                    out = model(normalize(x.to(device), mean, std)).float().cpu()
                if is_va:
                    va = torch.tanh(out).numpy()
                    for (row, _), (v, a) in zip(chunk, va[:, :2]):
                        row.valence, row.arousal = float(v), float(a)
                else:
                    probs = torch.softmax(out, dim=1).numpy()
                    for (row, _), p in zip(chunk, probs):
                        k = int(p.argmax())
                        row.label, row.score = classes[k], float(p[k])
                        row.probabilities = {c: float(v) for c, v in zip(classes, p)}
        results.extend(rows)
        if on_photo is not None:
            on_photo(photo, rows)
    return results


def summarize(results: Sequence[FaceResult]) -> dict[str, Any]:
    """Counts for a summary: photos, faces predicted, photos without a face, corrupt photos, skipped
    faces, and predicted faces per label."""
    photos = {r.photo for r in results}
    labels: dict[str, int] = {}
    for r in results:
        if r.ok and r.label is not None:
            labels[r.label] = labels.get(r.label, 0) + 1
    return {
        "photos": len(photos),
        "faces": sum(1 for r in results if r.ok),
        "no_face": sum(1 for r in results if r.problem and r.problem.startswith(NO_FACE)),
        "corrupt": sum(1 for r in results if r.problem and r.problem.startswith(CORRUPT)),
        "skipped_faces": sum(1 for r in results if r.face is not None and not r.ok),
        "labels": dict(sorted(labels.items(), key=lambda kv: -kv[1])),
    }


def write_results(results: Sequence[FaceResult], path: str, classes: Sequence[str] | None = None) -> str:
    """Write rows to ``path``: ``.json`` (a list of objects, probabilities nested) or ``.csv`` (one
    column per class probability). Returns ``path``."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".csv", ".json"):
        raise ValueError(f"results file must end in .csv or .json, got {path!r}")
    if classes is None:
        seen: dict[str, None] = {}
        for r in results:
            for c in r.probabilities or {}:
                seen[c] = None
        classes = list(seen)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        if ext == ".json":
            json.dump([r.to_dict() for r in results], f, indent=1)
        else:
            rows = [r.to_row(classes) for r in results]
            fields = list(FaceResult(photo="").to_row(classes))
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
    os.replace(tmp, path)  # a reader never sees half a results file
    return path


def _caption(r: FaceResult) -> str:
    if r.problem is not None:
        return r.problem.split(":", 1)[0]
    if r.label is not None:
        return f"{r.label} {r.score:.2f}"
    if r.valence is not None:
        return f"V{r.valence:+.2f} A{r.arousal:+.2f}"
    return ""


def annotate(photo: str | np.ndarray, faces: Sequence[FaceResult], out_path: str) -> str:
    """Draw each face's box and label on the photo (path or RGB array) and write it to ``out_path``
    (format from the extension). Predicted faces in green, skipped ones in orange. Returns out_path."""
    rgb = _read_photo(photo) if isinstance(photo, str) else np.asarray(photo)
    img = cv2.cvtColor(np.ascontiguousarray(rgb, dtype=np.uint8), cv2.COLOR_RGB2BGR)
    h, w = img.shape[:2]
    thick = max(1, round(min(h, w) / 250))
    scale = max(0.4, min(h, w) / 800)
    for r in faces:
        if r.box is None:
            continue
        x, y, bw, bh = (int(round(v)) for v in r.box)
        color = (60, 200, 60) if r.ok else (0, 140, 255)  # BGR
        cv2.rectangle(img, (x, y), (x + bw, y + bh), color, thick)
        text = _caption(r)
        if text:
            (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
            ty = y - 4 if y - th - base - 4 >= 0 else y + bh + th + 4  # above the box unless off the top
            cv2.rectangle(img, (x, ty - th - base), (x + tw + 2, ty + base), color, -1)
            cv2.putText(img, text, (x + 1, ty), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick, cv2.LINE_AA)
    parent = os.path.dirname(out_path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    if not cv2.imwrite(out_path, img):
        raise ValueError(f"could not write {out_path}: use a .jpg or .png file name in a writable folder")
    return out_path
