"""Artifacts and data sets. Depends on nothing else of fermine."""

from storage.artifact import (
    Artifact,
    ArtifactError,
    ArtifactWriter,
    Manifest,
    ShardedWriter,
    ShardInfo,
    identity,
    is_finished,
    join,
    open_artifact,
    shard_name,
)
from storage.schema import CLASSES, IMAGE_SCHEMA, NUM_CLASSES, REJECTS_SCHEMA, image_row, reject_row

__all__ = [
    "Artifact",
    "ArtifactError",
    "ArtifactWriter",
    "Manifest",
    "ShardedWriter",
    "ShardInfo",
    "identity",
    "is_finished",
    "join",
    "open_artifact",
    "shard_name",
    "CLASSES",
    "IMAGE_SCHEMA",
    "NUM_CLASSES",
    "REJECTS_SCHEMA",
    "image_row",
    "reject_row",
]
