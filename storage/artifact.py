"""Artifacts: a folder (any fsspec URI) of Parquet shards plus a manifest written last.

The manifest is the commit marker. Shards are written under temporary names and renamed
into place; a per-shard marker (``part-NNNNN.parquet.json``) records rows and sha256 once a shard is
in place, so a stage that is killed resumes by skipping finished shards. Readers refuse an
artifact without a manifest and any shard whose checksum does not match.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
MANIFEST = "_manifest.json"
_TMP_PREFIX = "_tmp-"


class ArtifactError(RuntimeError):
    """An artifact is missing, unfinished or corrupt. The message says which and what to do."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    rows: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    stage: str
    config: dict[str, Any]
    inputs: dict[str, str]
    shards: list[ShardInfo]
    schema_version: int = SCHEMA_VERSION
    created: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def digest(self) -> str:
        """Content digest: identical shards in identical order give the same digest."""
        h = hashlib.sha256(f"v{self.schema_version}".encode())
        for s in self.shards:
            h.update(s.sha256.encode())
        return h.hexdigest()

    def to_json(self) -> str:
        d = asdict(self)
        d["rows"] = self.rows
        d["digest"] = self.digest
        return json.dumps(d, indent=2, sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        d = json.loads(text)
        return cls(
            stage=d["stage"],
            config=d.get("config", {}),
            inputs=d.get("inputs", {}),
            shards=[ShardInfo(**s) for s in d["shards"]],
            schema_version=d.get("schema_version", SCHEMA_VERSION),
            created=d.get("created", 0.0),
            extra=d.get("extra", {}),
        )


def _fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path.rstrip("/")


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _atomic_put(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write to a temporary sibling, then rename: a reader never sees a partial file."""
    parent = path.rsplit("/", 1)[0]
    tmp = f"{parent}/{_TMP_PREFIX}{uuid.uuid4().hex}"
    fs.makedirs(parent, exist_ok=True)
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def is_finished(uri: str) -> bool:
    fs, path = _fs(uri)
    return fs.exists(f"{path}/{MANIFEST}")


def _is_ours(name: str) -> bool:
    return name.startswith(("part-", _TMP_PREFIX)) or name == MANIFEST


def clear_unfinished(uri: str, subfolders: Sequence[str] = ()) -> None:
    """Remove what an interrupted write left at ``uri`` before it is written again from scratch.

    Only shards, shard markers, temporary files and the named ``subfolders`` (themselves
    artifacts) are removed. A folder holding anything else is refused, not emptied: a mistyped
    output path must never cost a user their files.
    """
    fs, path = _fs(uri)
    if not fs.exists(path):
        return
    if not fs.isdir(path):
        raise ArtifactError(f"{uri} exists and is a file, not an artifact folder; choose another output")
    foreign = []
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name in subfolders:
            foreign += [f"{name}/{n.rstrip('/').rsplit('/', 1)[-1]}" for n in fs.ls(entry, detail=False)
                        if not _is_ours(n.rstrip("/").rsplit("/", 1)[-1])]
        elif not _is_ours(name):
            foreign.append(name)
    if foreign:
        shown = ", ".join(sorted(foreign)[:5]) + (" ..." if len(foreign) > 5 else "")
        raise ArtifactError(
            f"{uri} exists and holds files that are not an unfinished artifact's ({shown}); "
            "refusing to clear it. Choose a new or empty output folder."
        )
    fs.rm(path, recursive=True)


def reopen(uri: str) -> None:
    """Drop the manifest of a committed artifact so its shards can be completed and committed again.

    For the rejects a sharded stage commits just before its main table: a crash between the two
    commits leaves finished rejects, whose shards are kept and whose manifest is rewritten.
    """
    fs, path = _fs(uri)
    if fs.exists(f"{path}/{MANIFEST}"):
        fs.rm(f"{path}/{MANIFEST}")


CLAIM = "_claim.json"


def claim(uri: str, key: Mapping[str, Any]) -> Manifest | None:
    """Make ``uri`` the output of the computation described by ``key`` (stage, settings, inputs).

    Returns the manifest when ``uri`` is already finished by that same computation (nothing to
    do), None when it is new or an unfinished attempt of it (resume: its finished shards are
    kept). Raises FileExistsError when it holds the output of anything else, finished or not:
    resuming into it would mix shards that disagree on what was computed.
    """
    want = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    fs, path = _fs(uri)
    marker = f"{path}/{CLAIM}"
    have = None
    if fs.exists(marker):
        try:
            have = json.loads(fs.cat_file(marker)).get("key")
        except ValueError:
            have = None  # torn by a crash while it was written: nothing was computed after it
    if is_finished(uri):
        if have == want:
            return Manifest.from_json(fs.cat_file(f"{path}/{MANIFEST}").decode())
        raise FileExistsError(f"{uri} is a finished artifact made from other inputs or settings; "
                              "write to another location or delete it first")
    if have is not None and have != want:
        raise FileExistsError(f"{uri} holds an unfinished run with other inputs or settings; resume it with "
                              "the same ones, or write to another location")
    if have is None:
        if fs.exists(path) and fs.glob(f"{path}/part-*"):
            raise FileExistsError(f"{uri} already holds shards not written by this stage; choose another output")
        _atomic_put(fs, marker, json.dumps({"key": want, "stage": key.get("stage")}).encode())
    return None


class ShardedWriter:
    """Writes shards one at a time (possibly from many processes) and commits a manifest.

    Each shard is independent and atomic, which is what lets a Ray stage resume: ``done()``
    lists the shards already in place, the stage computes only the others.
    """

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.path = _fs(self.uri)
        if self.fs.exists(f"{self.path}/{MANIFEST}"):
            raise ArtifactError(
                f"{self.uri} is already a finished artifact; refusing to overwrite it. "
                "Delete it or write to another location."
            )
        self.fs.makedirs(self.path, exist_ok=True)

    def write_shard(self, name: str, table: pa.Table) -> ShardInfo:
        data = table_to_parquet_bytes(table)
        info = ShardInfo(name=name, rows=table.num_rows, sha256=hashlib.sha256(data).hexdigest())
        _atomic_put(self.fs, f"{self.path}/{name}", data)
        # The marker goes in after the shard: marker present => shard complete.
        _atomic_put(self.fs, f"{self.path}/{name}.json", json.dumps(asdict(info)).encode())
        return info

    def done(self) -> dict[str, ShardInfo]:
        """Shards already written (by this or an earlier, interrupted attempt)."""
        out: dict[str, ShardInfo] = {}
        for p in self.fs.glob(f"{self.path}/*.parquet.json"):
            try:
                info = ShardInfo(**json.loads(self.fs.cat_file(p)))
            except (ValueError, TypeError):
                continue  # a torn marker from a crash: the shard is redone
            if self.fs.exists(f"{self.path}/{info.name}"):
                out[info.name] = info
        return out

    def commit(
        self,
        stage: str,
        config: Mapping[str, Any],
        inputs: Mapping[str, str] | None = None,
        order: Sequence[str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Manifest:
        done = self.done()
        names = list(order) if order is not None else sorted(done)
        missing = [n for n in names if n not in done]
        if missing:
            raise ArtifactError(f"cannot commit {self.uri}: shards not written: {missing[:5]}")
        manifest = Manifest(
            stage=stage,
            config=dict(config),
            inputs=dict(inputs or {}),
            shards=[done[n] for n in names],
            created=time.time(),
            extra=dict(extra or {}),
        )
        for p in self.fs.glob(f"{self.path}/{_TMP_PREFIX}*"):
            self.fs.rm(p)
        _atomic_put(self.fs, f"{self.path}/{MANIFEST}", manifest.to_json().encode())
        return manifest


class ArtifactWriter:
    """Streaming writer: append rows or tables, shards are cut every ``rows_per_shard`` rows.

    Use as a context manager; the manifest is written by ``commit()`` only. A writer that
    exits with an exception leaves no manifest, so the folder never reads as finished.
    """

    def __init__(
        self,
        uri: str,
        stage: str,
        config: Mapping[str, Any] | None = None,
        inputs: Mapping[str, str] | None = None,
        rows_per_shard: int = 1024,
        schema: pa.Schema | None = None,
    ):
        if rows_per_shard < 1:
            raise ValueError("rows_per_shard must be >= 1")
        self._sharded = ShardedWriter(uri)
        # A fresh streaming write starts over: leftovers of an interrupted attempt are removed.
        for p in self._sharded.fs.glob(f"{self._sharded.path}/part-*"):
            self._sharded.fs.rm(p)
        self.uri = self._sharded.uri
        self.stage = stage
        self.config = dict(config or {})
        self.inputs = dict(inputs or {})
        self.rows_per_shard = rows_per_shard
        self.schema = schema
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._names: list[str] = []
        self.manifest: Manifest | None = None

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.manifest is None:
            self.commit()

    def write_rows(self, rows: Iterable[Mapping[str, Any]]) -> None:
        batch = list(rows)
        if batch:
            self.write(pa.Table.from_pylist(batch, schema=self.schema))

    def write(self, table: pa.Table | pa.RecordBatch) -> None:
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        if self.schema is None:
            self.schema = table.schema
        elif table.schema != self.schema:
            table = table.select(self.schema.names).cast(self.schema)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, n: int) -> None:
        merged = pa.concat_tables(self._pending)
        head, tail = merged.slice(0, n), merged.slice(n)
        name = shard_name(len(self._names))
        self._sharded.write_shard(name, head)
        self._names.append(name)
        self._pending = [tail] if tail.num_rows else []
        self._pending_rows = tail.num_rows

    def commit(self, extra: Mapping[str, Any] | None = None) -> Manifest:
        if self._pending_rows:
            self._flush(self._pending_rows)
        if not self._names and self.schema is not None:
            # An empty table is still a valid artifact: one empty shard keeps the schema.
            name = shard_name(0)
            self._sharded.write_shard(name, self.schema.empty_table())
            self._names.append(name)
        self.manifest = self._sharded.commit(self.stage, self.config, self.inputs, self._names, extra)
        return self.manifest


class Artifact:
    """A finished artifact. Construction fails with ArtifactError if there is no manifest."""

    def __init__(self, uri: str, verify: bool = True):
        self.uri = uri.rstrip("/")
        self.fs, self.path = _fs(self.uri)
        self.verify = verify
        mpath = f"{self.path}/{MANIFEST}"
        if not self.fs.exists(mpath):
            if self.fs.exists(self.path):
                raise ArtifactError(
                    f"{self.uri} has no manifest: the stage that writes it did not finish. "
                    "Rerun that stage (finished shards are reused) before reading it."
                )
            raise ArtifactError(f"no artifact at {self.uri}: check the path or run the stage that makes it")
        self.manifest = Manifest.from_json(self.fs.cat_file(mpath).decode())
        if self.manifest.schema_version > SCHEMA_VERSION:
            raise ArtifactError(
                f"{self.uri} has schema version {self.manifest.schema_version}; this fermine reads "
                f"up to {SCHEMA_VERSION}. Upgrade fermine."
            )

    def __len__(self) -> int:
        return self.manifest.rows

    def __repr__(self) -> str:
        return f"Artifact({self.uri!r}, stage={self.manifest.stage!r}, rows={len(self)})"

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def num_shards(self) -> int:
        return len(self.manifest.shards)

    def shard_uri(self, index: int) -> str:
        return join(self.uri, self.manifest.shards[index].name)

    def _open_shard(self, index: int) -> pq.ParquetFile:
        info = self.manifest.shards[index]
        path = f"{self.path}/{info.name}"
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            raise ArtifactError(f"shard {info.name} of {self.uri} is missing; rerun the stage that makes it") from None
        if self.verify and hashlib.sha256(data).hexdigest() != info.sha256:
            raise ArtifactError(
                f"shard {info.name} of {self.uri} does not match its manifest checksum (corrupt or "
                "modified); delete the artifact and rerun the stage that makes it"
            )
        return pq.ParquetFile(io.BytesIO(data))

    @property
    def schema(self) -> pa.Schema:
        return self._open_shard(0).schema_arrow

    def read_shard(self, index: int, columns: Sequence[str] | None = None) -> pa.Table:
        return self._open_shard(index).read(columns=list(columns) if columns else None)

    def iter_batches(
        self, columns: Sequence[str] | None = None, batch_size: int = 256, shards: Iterable[int] | None = None
    ) -> Iterator[pa.RecordBatch]:
        """Stream record batches shard by shard; at most one shard is held in memory."""
        for i in shards if shards is not None else range(self.num_shards):
            pf = self._open_shard(i)
            yield from pf.iter_batches(batch_size=batch_size, columns=list(columns) if columns else None)

    def read(self, columns: Sequence[str] | None = None) -> pa.Table:
        tables = [self.read_shard(i, columns) for i in range(self.num_shards)]
        return pa.concat_tables(tables) if tables else pa.table({})


def open_artifact(uri: str, verify: bool = True) -> Artifact:
    return Artifact(uri, verify=verify)


def identity(stage: str, config: Mapping[str, Any], inputs: Mapping[str, str], code_version: str) -> str:
    """A stage's identity: same stage, config, input digests and code => same artifact."""
    payload = json.dumps(
        {"stage": stage, "config": config, "inputs": dict(sorted(inputs.items())), "code": code_version},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()
