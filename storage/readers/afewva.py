"""AFEW-VA, as shipped: ``<clip>/<clip>.json`` + ``<clip>/<frame>.png`` per clip (600 clips).

The JSON holds ``{"actor": ..., "video_id": ..., "frames": {"00000": {"valence": v, "arousal": a,
"landmarks": [[x, y] x 68]}, ...}}`` with valence/arousal integers on -10..10, scaled here to
[-1, 1]. There are no expression labels (label null): the table feeds valence-arousal training
(CAF). Split: "train" by default, or with folds=N ``fold-k`` by actor (sorted actors, actor i ->
fold i % N), so no actor is in two folds.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

from storage.readers import register
from storage.readers._common import IMAGE_EXTS, as_int, five_from_68, fold_of, load_image, require_dir, subdirs
from storage.readers.base import DatasetFormatError, Record, Reject

SOURCE = "afewva"
SCALE = 10.0


def _clip_json(root: str, clip: str) -> str:
    return os.path.join(root, clip, f"{clip}.json")


@register("afewva")
def read(root: str, *, split: Any = "train", folds: Any = 0) -> Iterator[Record]:
    """Options: split (split name for every frame, default train), folds (N > 0: fold-k by actor instead)."""
    require_dir(root, "the AFEW-VA folder")
    folds = as_int(folds, "folds", minimum=0)
    clips = [c for c in subdirs(root) if os.path.isfile(_clip_json(root, c))]
    if not clips:
        raise DatasetFormatError(f"expected AFEW-VA clip folders <clip>/<clip>.json (e.g. 001/001.json) in {root}")
    return _records(root, clips, str(split), folds)


def _load(path: str) -> dict:
    with open(path) as f:
        meta = json.load(f)
    if not isinstance(meta, dict) or not isinstance(meta.get("frames"), dict):
        raise ValueError("no 'frames' object")
    return meta


def _records(root: str, clips: list[str], split: str, folds: int) -> Iterator[Record]:
    actor_fold: dict[str, str] = {}
    if folds:
        actors = set()
        for clip in clips:  # a first pass over the small JSON files only, for a deterministic fold map
            try:
                actors.add(str(_load(_clip_json(root, clip)).get("actor", clip)))
            except (OSError, ValueError):
                pass  # reported below, when the clip is read
        actor_fold = {a: fold_of(i, folds) for i, a in enumerate(sorted(actors))}
    for clip in clips:
        path = _clip_json(root, clip)
        try:
            meta = _load(path)
        except (OSError, ValueError) as e:
            yield Reject(f"{SOURCE}/{clip}", f"bad annotation: {path}: {e}")
            continue
        clip_split = actor_fold.get(str(meta.get("actor", clip)), split) if folds else split
        images = {os.path.splitext(n)[0]: n for n in os.listdir(os.path.join(root, clip))
                  if n.lower().endswith(IMAGE_EXTS)}
        for frame in sorted(meta["frames"]):
            rid = f"{SOURCE}/{clip}/{frame}"
            ann = meta["frames"][frame]
            try:
                v, a = float(ann["valence"]) / SCALE, float(ann["arousal"]) / SCALE
                if not (-1.0 <= v <= 1.0 and -1.0 <= a <= 1.0):
                    raise ValueError("outside -10..10")
            except (KeyError, TypeError, ValueError) as e:
                yield Reject(rid, f"bad label: valence/arousal of frame {frame}: {e}")
                continue
            if frame not in images:
                yield Reject(rid, f"missing: no image for frame {frame} in {os.path.join(root, clip)}")
                continue
            got = load_image(rid, os.path.join(root, clip, images[frame]))
            if isinstance(got, Reject):
                yield got
                continue
            lm = None
            if ann.get("landmarks"):
                try:
                    lm = five_from_68(ann["landmarks"])
                except (TypeError, ValueError) as e:
                    yield Reject(rid, f"bad landmarks: frame {frame}: {e}")
                    continue
            yield dict(id=rid, image=got[0], label=None, split=clip_split, source=SOURCE, valence=v, arousal=a,
                       landmarks=lm)
