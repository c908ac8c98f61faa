"""What every data set reader yields: image rows, or rejects that say why an entry was skipped."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Union


@dataclass(frozen=True)
class Reject:
    id: str
    reason: str


# A record is an image-table row (see storage.schema.image_row) or a Reject.
Record = Union[dict[str, Any], Reject]
Reader = Callable[..., Iterator[Record]]


class DatasetFormatError(ValueError):
    """The data set on disk is not laid out as its publisher ships it; the message says what is missing."""
