"""A generic class-per-folder image tree: ``root/<split>/<class>/*.jpg`` or ``root/<class>/*.jpg``.

Class folder names match the 7 classes case-insensitively, plus common aliases (angry,
happiness, sadness, surprised, fearful, disgusted, ...). A ``contempt`` folder is not an error:
its images become rejects (contempt is not a basic class). Any other folder name is an error that
lists the valid names, unless ``unlabeled=true``: then every image under ROOT is an unlabeled
pool (split "pool"). Images may sit in nested folders below a class folder. Splittable: the file
list is made once, any slice of it is read on its own (parallel ingest).
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Iterator

import numpy as np

from storage.readers import register, register_splittable
from storage.readers._common import IMAGE_EXTS, as_bool, list_images, load_image, require_dir, subdirs
from storage.readers.base import DatasetFormatError, Entries, PackedStrings, Record, Reject
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


# What an entry of a folder tree becomes: (label, split, reason); a reason makes every image of the
# group a Reject without reading it (loose images next to the class folders, contempt/).
_Group = tuple[int | None, str, str | None]
_LOOSE: _Group = (None, "", "unlabeled: image is not inside a class folder")


@register("folder")
def read(root: str, *, split: Any = "train", unlabeled: Any = False, source: Any = "folder") -> Iterator[Record]:
    """Options: split (split name for the flat root/<class>/ layout, default train), unlabeled
    (every image under ROOT is an unlabeled pool image, split "pool"), source (data set name, default folder)."""
    source = str(source)
    folders, groups = _layout(root, split, unlabeled, source)
    return _read(root, source, groups, _plan(root, folders))


def entries(root: str, *, split: Any = "train", unlabeled: Any = False, source: Any = "folder") -> Entries:
    """Every image file ``read`` reads, in its order: the path below ROOT and the index of its group."""
    source = str(source)
    folders, groups = _layout(root, split, unlabeled, source)
    plan = list(_plan(root, folders))
    group = np.fromiter((g for g, _ in plan), dtype=np.int32, count=len(plan))
    rels = PackedStrings.from_iter(rel for _, rel in plan)
    return Entries({"group": group, "rel": rels}, {"root": root, "source": source, "groups": groups})


def read_entries(part: Entries) -> Iterator[Record]:
    ctx = part.context
    return _read(ctx["root"], ctx["source"], ctx["groups"], part.rows())


register_splittable("folder", entries, read_entries)


def _layout(root: str, split: Any, unlabeled: Any, source: str) -> tuple[list[str | None], list[_Group]]:
    """(folder of each group, what its images become); folder None = the images directly in ROOT.

    Checked eagerly: a wrong layout fails before any output is written.
    """
    require_dir(root, "an image folder tree")
    if as_bool(unlabeled, "unlabeled"):
        return [root], [(None, "pool", None)]
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
    # Images lying next to the class folders have no class: say so instead of skipping them.
    folders: list[str | None] = [None]
    groups: list[_Group] = [_LOOSE]
    for path, cls, split_name in jobs:
        name = class_of(cls)
        folders.append(path)
        # A known non-basic class such as contempt: rejected without decoding.
        groups.append((None, split_name, f"{cls.lower()}: not a basic class") if name is None
                      else (CLASS_INDEX[name], split_name, None))
    return folders, groups


def _plan(root: str, folders: list[str | None]) -> Iterator[tuple[int, str]]:
    """(group index, path below ROOT) of every image file, group by group, in a stable order."""
    for g, folder in enumerate(folders):
        if folder is None:
            for name in list_images(root):
                yield g, name
        else:
            for rel in _files(root, folder):
                yield g, rel


def _files(root: str, folder: str) -> Iterator[str]:
    """The path below ``root`` of every image file below ``folder``, in a stable (sorted) order."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in sorted(filenames):
            if fname.startswith(".") or not fname.lower().endswith(IMAGE_EXTS):
                continue
            yield os.path.relpath(os.path.join(dirpath, fname), root)


def _read(root: str, source: str, groups: list[_Group], plan: Iterable[tuple[int, str]]) -> Iterator[Record]:
    for g, rel in plan:
        label, split, reason = groups[g]
        rid = f"{source}/{os.path.splitext(rel)[0].replace(os.sep, '/')}"
        if reason is not None:
            yield Reject(rid, reason)
            continue
        got = load_image(rid, os.path.join(root, rel))
        if isinstance(got, Reject):
            yield got
            continue
        yield dict(id=rid, image=got[0], label=label, split=split, source=source)
