"""Readers for public FER data sets, each mapping its labels to storage.schema.CLASSES.

Each reader is ``read(root, **options) -> Iterator[Record]`` and is looked up by name.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

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


__all__ = ["READERS", "DatasetFormatError", "Reader", "Record", "Reject", "available", "check_options", "get_reader",
           "reader_options", "register"]
