"""Readers for public FER data sets, each mapping its labels to storage.schema.CLASSES.

Each reader is ``read(root, **options) -> Iterator[Record]`` and is looked up by name. A reader whose
source has random access (an indexed RecordIO, an image folder tree, a csv file) also registers a
``Splittable``: its entries listed once, read a slice at a time, for ingesting a source in parallel parts.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

from storage.readers.base import DatasetFormatError, Entries, Reader, Record, Reject

READERS: dict[str, Reader] = {}


@dataclass(frozen=True)
class Splittable:
    """How to read a source in parts.

    ``entries(root, **options)`` lists what the reader would read, in its order (None when this
    particular source has no random access, e.g. a RecordIO file without its .idx: read it with the
    plain reader). ``read_entries(entries[a:b])`` yields the records of entries a..b-1. Reading every
    slice in order yields exactly what ``read(root, **options)`` yields: the same rows and rejects in
    the same order. Both are module-level functions, so they pickle by reference to other processes.
    """

    entries: Callable[..., Entries | None]
    read_entries: Callable[[Entries], Iterator[Record]]


SPLITTABLE: dict[str, Splittable] = {}


def register(name: str):
    def deco(fn: Reader) -> Reader:
        READERS[name] = fn
        return fn

    return deco


def register_splittable(name: str, entries: Callable[..., Entries | None],
                        read_entries: Callable[[Entries], Iterator[Record]]) -> None:
    """Declare that reader ``name`` can list its entries and read slices of them (see Splittable)."""
    SPLITTABLE[name] = Splittable(entries, read_entries)


def get_splittable(name: str) -> Splittable | None:
    """The Splittable of reader ``name``, or None when it only streams (KeyError for an unknown name)."""
    get_reader(name)
    return SPLITTABLE.get(name)


def get_reader(name: str) -> Reader:
    _load_all()
    if name not in READERS:
        raise KeyError(f"unknown data set format {name!r}; choose one of: {', '.join(sorted(READERS))}")
    return READERS[name]


def reader_options(reader: Reader) -> dict[str, Any] | None:
    """The keyword options a reader takes (name -> default), or None if it takes any (**options)."""
    params = list(inspect.signature(reader).parameters.values())[1:]  # the first is ROOT
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name: p.default for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Refuse options the reader ``name`` does not take (ValueError listing the valid ones)."""
    known = reader_options(get_reader(name))
    if known is None:
        return
    unknown = sorted(set(options) - set(known))
    if unknown:
        valid = ", ".join(f"{k} (default {v!r})" for k, v in known.items()) or "none"
        raise ValueError(f"format {name} has no option {', '.join(unknown)}; its options: {valid}")


def available() -> list[str]:
    _load_all()
    return sorted(READERS)


def _load_all() -> None:
    # Import for the registration side effect; each module registers its reader(s).
    import importlib
    import pkgutil

    import storage.readers as pkg

    for m in pkgutil.iter_modules(pkg.__path__):
        if m.name not in ("base",):
            importlib.import_module(f"storage.readers.{m.name}")
    # Readers that live outside this package (the synthetic generator) register when imported.
    for name in ("storage.synthetic",):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise


__all__ = ["READERS", "SPLITTABLE", "DatasetFormatError", "Entries", "Reader", "Record", "Reject", "Splittable",
           "available", "check_options", "get_reader", "get_splittable", "reader_options", "register",
           "register_splittable"]
