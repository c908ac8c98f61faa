"""Stage identity, reuse and the run ledger: what makes a rerun redo only unfinished stages.

A stage's output folder is named by its identity, the digest of (stage, config, input
digests, code version). When the stage's function returns, a ``_stage.json`` record with the
output's content digest is written atomically; its presence is the "done" marker, so a
rerun reuses the folder and a killed stage (no record) is resumed inside the same folder,
where the stage's own mechanisms (finished shards, last.pt) avoid redoing work.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import logging
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping

from storage.artifact import MANIFEST, Manifest, _atomic_put, _fs, identity, join

log = logging.getLogger("fermine.stage")

STAGE_RECORD = "_stage.json"
LEDGER = "ledger.jsonl"


# The packages whose code computes stage outputs; flows only wires them.
COMPUTING_PACKAGES = ("storage", "tasks", "workers")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The installed version plus a digest of the computing packages' source.

    The version alone would let an edited stage (editable installs, a hot-fixed image) reuse
    outputs of the old code; the digest makes any change to a computation recompute.
    """
    try:
        version = metadata.version("fermine")
    except metadata.PackageNotFoundError:  # running from a source tree without install
        version = "dev"
    h = hashlib.sha256()
    for pkg in COMPUTING_PACKAGES:
        root = Path(importlib.import_module(pkg).__file__).parent
        for f in sorted(root.rglob("*.py")):
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return f"{version}+{h.hexdigest()[:12]}"


def config_dict(cfg: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(cfg):
        return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    if hasattr(cfg, "model_dump"):
        return cfg.model_dump(mode="json")
    return dict(cfg)


def output_digest(uri: str) -> str:
    """Content digest of a stage output: the manifest digest for artifacts, file hashes otherwise."""
    fs, path = _fs(uri)
    if fs.exists(f"{path}/{MANIFEST}"):
        return Manifest.from_json(fs.cat_file(f"{path}/{MANIFEST}").decode()).digest
    h = hashlib.sha256()
    for p in sorted(fs.find(path)):
        rel = p[len(path):]
        if rel.endswith(STAGE_RECORD) or rel.endswith("last.pt") or "/_tmp-" in rel:
            continue
        h.update(rel.encode())
        h.update(hashlib.sha256(fs.cat_file(p)).digest())
    return h.hexdigest()


@dataclass(frozen=True)
class StageRecord:
    stage: str
    identity: str
    uri: str
    digest: str
    config: dict[str, Any]
    inputs: dict[str, str]
    started: float
    finished: float
    reused: bool = False

    @property
    def seconds(self) -> float:
        return self.finished - self.started


def read_record(uri: str) -> StageRecord | None:
    fs, path = _fs(uri)
    p = f"{path}/{STAGE_RECORD}"
    if not fs.exists(p):
        return None
    try:
        return StageRecord(**json.loads(fs.cat_file(p)))
    except (ValueError, TypeError):
        return None  # torn record: treat the stage as unfinished


class Run:
    """A run folder: one sub-folder per stage output plus an append-only ledger of stage events."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.fs, self.path = _fs(self.root)
        self.fs.makedirs(self.path, exist_ok=True)

    def _log(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, default=str) + "\n"
        # Append-only; a torn last line is skipped by readers.
        with self.fs.open(f"{self.path}/{LEDGER}", "ab") as f:
            f.write(line.encode())

    def events(self) -> list[dict[str, Any]]:
        p = f"{self.path}/{LEDGER}"
        if not self.fs.exists(p):
            return []
        out = []
        for line in self.fs.cat_file(p).decode().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def stage(
        self,
        name: str,
        config: Any,
        inputs: Mapping[str, str],
        fn: Callable[[str], Any],
    ) -> StageRecord:
        """Run ``fn(out_uri)`` unless an output with the same identity is already finished.

        ``inputs`` maps input names to stage output URIs (their digests enter the identity).
        """
        cfg = config_dict(config)
        digests = {}
        for k, uri in inputs.items():
            rec = read_record(uri)
            digests[k] = rec.digest if rec else output_digest(uri)
        ident = identity(name, cfg, digests, code_version())
        out = join(self.root, f"{name}-{ident[:12]}")
        rec = read_record(out)
        if rec is not None and rec.identity == ident:
            log.info("stage %s: reusing %s", name, out)
            self._log({"event": "reused", "stage": name, "uri": out, "time": time.time()})
            return dataclasses.replace(rec, reused=True)
        started = time.time()
        self._log({"event": "started", "stage": name, "uri": out, "time": started})
        try:
            fn(out)
        except BaseException as e:
            self._log({"event": "failed", "stage": name, "uri": out, "time": time.time(), "error": repr(e)[:500]})
            raise
        rec = StageRecord(
            stage=name,
            identity=ident,
            uri=out,
            digest=output_digest(out),
            config=cfg,
            inputs={k: inputs[k] for k in inputs},
            started=started,
            finished=time.time(),
        )
        fs, path = _fs(out)
        fs.makedirs(path, exist_ok=True)
        _atomic_put(fs, f"{path}/{STAGE_RECORD}", json.dumps(dataclasses.asdict(rec), indent=2).encode())
        self._log({"event": "finished", "stage": name, "uri": out, "time": rec.finished, "seconds": rec.seconds})
        return rec

    def status(self) -> list[dict[str, Any]]:
        """One row per stage name (latest event wins): state, output, duration."""
        rows: dict[str, dict[str, Any]] = {}
        for ev in self.events():
            row = rows.setdefault(ev["stage"], {"stage": ev["stage"]})
            row["uri"] = ev.get("uri")
            row["state"] = ev["event"]
            if ev["event"] == "finished":
                row["seconds"] = ev.get("seconds")
            if ev["event"] == "failed":
                row["error"] = ev.get("error")
            elif ev["event"] in ("finished", "reused"):
                row.pop("error", None)  # an earlier attempt's failure is history once the stage is done
        for row in rows.values():
            if row["state"] == "started":
                # No finish event: either still running or killed; the record tells which is safe to reuse.
                row["state"] = "finished" if read_record(row["uri"]) else "running or interrupted"
        return list(rows.values())


def fs_size(uri: str) -> int:
    fs, path = _fs(uri)
    try:
        return int(sum(fs.du(path, total=False).values()))
    except FileNotFoundError:
        return 0


__all__ = ["Run", "StageRecord", "code_version", "config_dict", "output_digest", "read_record", "fs_size"]
