"""Readers for public FER data sets, each mapping its labels to storage.schema.CLASSES.

Each reader is ``read(root, **options) -> Iterator[Record]`` and is looked up by name.
"""

from __future__ import annotations

from storage.readers.base import DatasetFormatError, Reader, Record, Reject

READERS: dict[str, Reader] = {}


def register(name: str):
    def deco(fn: Reader) -> Reader:
        READERS[name] = fn
        return fn

    return deco


def get_reader(name: str) -> Reader:
    _load_all()
    if name not in READERS:
        raise KeyError(f"unknown data set format {name!r}; choose one of: {', '.join(sorted(READERS))}")
    return READERS[name]


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


__all__ = ["READERS", "DatasetFormatError", "Reader", "Record", "Reject", "available", "get_reader", "register"]
