"""A generic class-per-folder image tree: ``root/<split>/<class>/*.jpg`` or ``root/<class>/*.jpg``.

Class folder names match the 7 classes case-insensitively, plus common aliases (angry,
happiness, sadness, surprised, fearful, disgusted, ...). A ``contempt`` folder is not an error:
its images become rejects (contempt is not a basic class). Any other folder name is an error that
lists the valid names, unless ``unlabeled=true``: then every image under ROOT is an unlabeled
pool (split "pool"). Images may sit in nested folders below a class folder.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from storage.readers import register
from storage.readers._common import IMAGE_EXTS, as_bool, list_images, load_image, require_dir, subdirs
from storage.readers.base import DatasetFormatError, Record, Reject
from storage.schema import CLASS_INDEX, CLASSES

ALIASES = {
    **{c: c for c in CLASSES},
    "neutrality": "neutral",
    "angry": "anger",
    "disgusted": "disgust",
    "fearful": "fear", "afraid": "fear", "scared": "fear",
    "happiness": "happy", "joy": "happy",
    "sadness": "sad",
    "surprised": "surprise",
}
NOT_BASIC = ("contempt", "contemptuous")
SPLIT_ALIASES = {"training": "train", "validation": "val", "valid": "val", "testing": "test"}


def class_of(name: str) -> str | None:
    return ALIASES.get(name.strip().lower())


def _is_class_dir(name: str) -> bool:
    return class_of(name) is not None or name.strip().lower() in NOT_BASIC


def _valid_names() -> str:
    return ", ".join(sorted(set(ALIASES) | set(NOT_BASIC)))


@register("folder")
def read(root: str, *, split: Any = "train", unlabeled: Any = False, source: Any = "folder") -> Iterator[Record]:
    """Options: split (split name for the flat root/<class>/ layout, default train), unlabeled
    (every image under ROOT is an unlabeled pool image, split "pool"), source (data set name, default folder)."""
    require_dir(root, "an image folder tree")
    source = str(source)
    if as_bool(unlabeled, "unlabeled"):
        return _walk(root, root, source, None, "pool")
    top = subdirs(root)
    if top and all(_is_class_dir(d) for d in top):
        jobs = [(os.path.join(root, d), d, str(split)) for d in top]
    elif top and all(subdirs(os.path.join(root, d)) and all(_is_class_dir(c) for c in subdirs(os.path.join(root, d)))
                     for d in top):
        jobs = [(os.path.join(root, d, c), c, SPLIT_ALIASES.get(d.lower(), d.lower()))
                for d in top for c in subdirs(os.path.join(root, d))]
    else:
        if any(_is_class_dir(d) for d in top):  # looks like ROOT/<class>/: name the odd top folders
            bad = [d for d in top if not _is_class_dir(d)]
        else:  # looks like ROOT/<split>/<class>/: name the odd class folders
            bad = [f"{d}/{c}" for d in top for c in subdirs(os.path.join(root, d)) if not _is_class_dir(c)]
            bad += [f"{d}/ (no class folders)" for d in top if not subdirs(os.path.join(root, d))]
        what = f"unknown class folder(s) {', '.join(bad[:10])}" if top else "no class folders"
        raise DatasetFormatError(
            f"{root}: {what}. Expected ROOT/<class>/*.jpg or ROOT/<split>/<class>/*.jpg with class folders named "
            f"one of: {_valid_names()}. For images without labels pass the option unlabeled=true"
        )
    return _labeled(root, jobs, source)


def _labeled(root: str, jobs: list[tuple[str, str, str]], source: str) -> Iterator[Record]:
    # Images lying next to the class folders have no class: say so instead of skipping them.
    for name in list_images(root):
        yield Reject(f"{source}/{os.path.splitext(name)[0]}", "unlabeled: image is not inside a class folder")
    for path, cls, split in jobs:
        name = class_of(cls)
        if name is None:  # a known non-basic class such as contempt: no need to decode
            for rid, _ in _files(root, path, source):
                yield Reject(rid, f"{cls.lower()}: not a basic class")
            continue
        yield from _walk(root, path, source, CLASS_INDEX[name], split)


def _files(root: str, folder: str, source: str) -> Iterator[tuple[str, str]]:
    """(id, path) of every image file below ``folder``, in a stable (sorted) order."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in sorted(filenames):
            if fname.startswith(".") or not fname.lower().endswith(IMAGE_EXTS):
                continue
            rel = os.path.relpath(os.path.join(dirpath, fname), root)
            yield f"{source}/{os.path.splitext(rel)[0].replace(os.sep, '/')}", os.path.join(dirpath, fname)


def _walk(root: str, folder: str, source: str, label: int | None, split: str) -> Iterator[Record]:
    for rid, path in _files(root, folder, source):
        got = load_image(rid, path)
        if isinstance(got, Reject):
            yield got
            continue
        yield dict(id=rid, image=got[0], label=label, split=split, source=source)
