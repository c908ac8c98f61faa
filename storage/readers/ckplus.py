"""CK+ (Extended Cohn-Kanade), as shipped: ``cohn-kanade-images/``, ``Emotion/``, ``Landmarks/``.

Frames: ``cohn-kanade-images/S005/001/S005_001_00000001.png``; a labeled sequence has
``Emotion/S005/001/S005_001_<last frame>_emotion.txt`` holding one float code (0 neutral, 1 anger,
2 contempt, 3 disgust, 4 fear, 5 happy, 6 sadness, 7 surprise). The usual protocol (327 labeled
sequences -> 1,308 images): the first frame is neutral, the last three frames carry the label.
Splits are ``fold-k``, 10 folds by subject: the labeled subjects sorted, subject ``i`` -> fold
``i % 10``, so no subject is in two folds. Contempt and unlabeled sequences become rejects.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from storage.readers import register
from storage.readers._common import as_bool, as_int, five_from_68, fold_of, list_images, load_image, require_dir, subdirs
from storage.readers.base import Record, Reject
from storage.schema import CLASS_INDEX

SOURCE = "ckplus"
CK_CODES = {0: "neutral", 1: "anger", 3: "disgust", 4: "fear", 5: "happy", 6: "sad", 7: "surprise"}
CK_TO_CLASS = {code: CLASS_INDEX[name] for code, name in CK_CODES.items()}
CONTEMPT = 2


@register("ckplus")
def read(root: str, *, folds: Any = 10, peak_frames: Any = 3, landmarks: Any = True) -> Iterator[Record]:
    """Options: folds (subject folds, default 10), peak_frames (last frames taking the label,
    default 3), landmarks (5 points derived from Landmarks/ 68-point files when present, default true)."""
    images = require_dir(os.path.join(root, "cohn-kanade-images"), "CK+'s cohn-kanade-images folder")
    emotion = require_dir(os.path.join(root, "Emotion"), "CK+'s Emotion folder (the sequence labels)")
    folds = as_int(folds, "folds", minimum=1)
    peak_frames = as_int(peak_frames, "peak_frames", minimum=1)
    lm_dir = os.path.join(root, "Landmarks")
    lm_dir = lm_dir if as_bool(landmarks, "landmarks") and os.path.isdir(lm_dir) else None
    return _records(images, emotion, lm_dir, folds, peak_frames)


def _label_file(emotion: str, subject: str, seq: str) -> str | None:
    d = os.path.join(emotion, subject, seq)
    if not os.path.isdir(d):
        return None
    files = sorted(n for n in os.listdir(d) if n.endswith("_emotion.txt"))
    return os.path.join(d, files[-1]) if files else None


def _landmarks(path: str) -> list[float]:
    with open(path) as f:
        vals = [float(v) for v in f.read().split()]
    return five_from_68(vals)


def _records(images: str, emotion: str, lm_dir: str | None, folds: int, peak_frames: int) -> Iterator[Record]:
    # Folds are assigned over the subjects that have at least one label, sorted: deterministic.
    labeled_subjects = [s for s in subdirs(emotion)
                        if any(_label_file(emotion, s, q) for q in subdirs(os.path.join(emotion, s)))]
    fold = {s: fold_of(i, folds) for i, s in enumerate(labeled_subjects)}
    for subject in subdirs(images):
        for seq in subdirs(os.path.join(images, subject)):
            sid = f"{SOURCE}/{subject}_{seq}"
            label_path = _label_file(emotion, subject, seq)
            if label_path is None:
                yield Reject(sid, "unlabeled: sequence has no Emotion/ file")
                continue
            try:
                with open(label_path) as f:
                    value = float(f.read().split()[0])
                if value != int(value):
                    raise ValueError
                code = int(value)
            except (ValueError, IndexError, OSError):
                yield Reject(sid, f"bad label: {label_path} does not hold a CK+ code 0..7")
                continue
            if code == CONTEMPT:
                yield Reject(sid, "contempt: not a basic class")
                continue
            if code not in CK_TO_CLASS:
                yield Reject(sid, f"bad label: {code} in {label_path} is not a CK+ code 0..7")
                continue
            frames = list_images(os.path.join(images, subject, seq))
            if len(frames) < 2:
                yield Reject(sid, f"too short: {len(frames)} frame(s); need a neutral first frame and a peak")
                continue
            picks = [(frames[0], CLASS_INDEX["neutral"])]
            picks += [(fr, CK_TO_CLASS[code]) for fr in frames[max(1, len(frames) - peak_frames):]]
            for fname, label in picks:
                stem = os.path.splitext(fname)[0]
                rid = f"{SOURCE}/{stem}"
                got = load_image(rid, os.path.join(images, subject, seq, fname))
                if isinstance(got, Reject):
                    yield got
                    continue
                lm = None
                if lm_dir is not None:
                    lm_path = os.path.join(lm_dir, subject, seq, f"{stem}_landmarks.txt")
                    if os.path.isfile(lm_path):
                        try:
                            lm = _landmarks(lm_path)
                        except (OSError, ValueError) as e:
                            yield Reject(rid, f"bad landmarks: {lm_path}: {e}")
                            continue
                yield dict(id=rid, image=got[0], label=label, split=fold[subject], source=SOURCE, landmarks=lm)
