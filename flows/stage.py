"""Stage identity, reuse and the run ledger: what makes a rerun redo only unfinished stages.

A stage's output folder is named by its identity, the digest of (stage, config, input
digests, code version). When the stage's function returns, a ``_stage.json`` record with the
output's content digest is written atomically; its presence is the "done" marker, so a
rerun reuses the folder and a killed stage (no record) is resumed inside the same folder,
where the stage's own mechanisms (finished shards, last.pt) avoid redoing work.

The code version is per stage (``code_version(fn)``): the stage body's own source plus the
computing modules it can reach, so editing one stage's module recomputes that stage and its
dependents only. ``reruns.json`` in the run folder forces a fresh result of named stages
(``fermine run CONFIG --rerun STAGE``) and, through the inputs' records, of their dependents.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from flows.code_version import code_version
from storage.artifact import MANIFEST, Manifest, _atomic_put, _fs, identity, join

log = logging.getLogger("fermine.stage")
progress = logging.getLogger("fermine.progress")  # one record per stage event (flows.console prints them)

STAGE_RECORD = "_stage.json"
LEDGER = "ledger.jsonl"
RERUNS = "reruns.json"  # {stage name: times a fresh result was asked for (`fermine run --rerun`)}


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
    # Forced recomputations in this output's lineage, {stage: n}: its own (`--rerun`) and its inputs'.
    # They enter the identity, so a rerun stage's dependents recompute even when its output's
    # content came out the same (content digests alone would reuse them).
    reruns: dict[str, int] = field(default_factory=dict)
    # Where the computation ran (workers.placement.Placement): host, Ray node id, device, pid, and its
    # own start/end (a placed stage may wait for resources after ``started``).
    placement: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.finished - self.started


_LOCKS: dict[str, threading.Lock] = {}  # one per stage output folder being computed in this process
_LOCKS_GUARD = threading.Lock()


def _lock_for(out: str) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(out, threading.Lock())


# Runs a stage body (fn, out) somewhere and returns where it ran (flows/placement.py: on Ray workers).
Placer = Callable[[Callable[[str], Any], str], dict[str, Any]]


def _here(fn: Callable[[str], Any], out: str) -> dict[str, Any]:
    """Run a stage body in this process (orchestration-only stages, plain runs without a placer)."""
    import os
    import socket

    started = time.time()
    fn(out)
    return {"host": socket.gethostname(), "node_id": None, "device": "driver", "pid": os.getpid(),
            "started": started, "finished": time.time()}


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

    def __init__(self, root: str, placer: Placer | None = None):
        self.root = root.rstrip("/")
        self.placer = placer  # where compute stages run (None: in this process)
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
        placer: Placer | None = None,
    ) -> StageRecord:
        """Run ``fn(out_uri)`` unless an output with the same identity is already finished.

        ``inputs`` maps input names to stage output URIs (their digests enter the identity). The
        code version is that of ``fn``'s own computation (``code_version(fn)``); a rerun count of
        this stage or of any stage upstream (``--rerun``) enters it too. ``placer`` runs ``fn``
        elsewhere (a Ray worker with the stage's resources) and says where; without one it runs here.
        Where it ran is not part of the identity: the same stage computed on another node is reused.
        """
        cfg = config_dict(config)
        digests: dict[str, str] = {}
        lineage: dict[str, int] = {}
        for k, uri in inputs.items():
            rec = read_record(uri)
            digests[k] = rec.digest if rec else output_digest(uri)
            for s, n in (rec.reruns if rec else {}).items():
                lineage[s] = max(lineage.get(s, 0), int(n))
        own = self.reruns().get(name, 0)
        if own:
            lineage[name] = own
        code = code_version(fn)
        if lineage:  # absent when nothing was rerun: identities stay those of plain runs
            code += "+reruns=" + json.dumps(sorted(lineage.items()))
        ident = identity(name, cfg, digests, code)
        out = join(self.root, f"{name}-{ident[:12]}")
        # Two chains of a round may reach the same stage at once (PASM w/o teacher reuses round 1's
        # attack): the second waits for the first and then reuses its record.
        with _lock_for(out):
            return self._run_or_reuse(name, ident, out, cfg, inputs, lineage, fn, placer)

    def _run_or_reuse(self, name: str, ident: str, out: str, cfg: dict[str, Any], inputs: Mapping[str, str],
                      lineage: dict[str, int], fn: Callable[[str], Any], placer: Placer | None) -> StageRecord:
        rec = read_record(out)
        if rec is not None and rec.identity == ident:
            log.info("stage %s: reusing %s", name, out)
            self._log({"event": "reused", "stage": name, "uri": out, "time": time.time()})
            progress.info("reused %s", name, extra={"event": "reused", "stage": name})
            return dataclasses.replace(rec, reused=True)
        started = time.time()
        self._log({"event": "started", "stage": name, "uri": out, "time": started})
        try:
            placement = placer(fn, out) if placer is not None else _here(fn, out)
        except BaseException as e:
            self._log({"event": "failed", "stage": name, "uri": out, "time": time.time(), "error": repr(e)[:500]})
            progress.info("failed %s", name, extra={"event": "failed", "stage": name, "error": str(e)[:300]})
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
            reruns=dict(sorted(lineage.items())),
            placement=placement,
        )
        fs, path = _fs(out)
        fs.makedirs(path, exist_ok=True)
        _atomic_put(fs, f"{path}/{STAGE_RECORD}", json.dumps(dataclasses.asdict(rec), indent=2).encode())
        self._log({"event": "finished", "stage": name, "uri": out, "time": rec.finished, "seconds": rec.seconds,
                   "started": started, "placement": placement})
        # A placed stage may first wait for a worker with its resources: the line says both.
        ran_from = float((placement or {}).get("started", started))
        ran_from = ran_from if started <= ran_from <= rec.finished else started  # another node's clock
        progress.info("finished %s", name, extra={"event": "finished", "stage": name, "seconds": rec.finished - ran_from,
                                                  "waited": max(0.0, ran_from - started)})
        return rec

    # ---- forced recomputation (`fermine run CONFIG --rerun STAGE`) ---------------------------
    def reruns(self) -> dict[str, int]:
        """{stage name: rerun count} of this run; {} when none was asked for."""
        p = f"{self.path}/{RERUNS}"
        if not self.fs.exists(p):
            return {}
        try:
            data = json.loads(self.fs.cat_file(p))
        except ValueError as e:  # written atomically, so only a hand edit gets here
            raise ValueError(f"{self.root}/{RERUNS} is not valid JSON ({e}); fix or delete it") from None
        return {str(k): int(v) for k, v in data.items()}

    def stage_names(self) -> list[str]:
        """Every stage name the ledger records, in the order they first ran."""
        return list(dict.fromkeys(ev["stage"] for ev in self.events() if "stage" in ev))

    def request_rerun(self, names: Iterable[str]) -> dict[str, int]:
        """Bump the rerun count of each named stage: its next run computes a fresh output in a new
        folder, so everything downstream recomputes too, and later plain runs reuse the new results.

        A name is a stage name the ledger records (``attack-r1``) or a glob over them
        (``'attack-r*'``). A name that matches no recorded stage is refused (ValueError listing the
        recorded ones): a stage that has not run yet computes anyway, and a typo must not pass
        silently. Returns the new counts of the named stages.
        """
        recorded = self.stage_names()
        chosen: list[str] = []
        for pat in names:
            hits = fnmatch.filter(recorded, pat) if any(c in pat for c in "*?[") else [pat] * (pat in recorded)
            if not hits:
                listed = ", ".join(recorded) if recorded else "none"
                raise ValueError(f"--rerun {pat}: no stage of run {self.root} is named so; its stages: {listed}")
            chosen.extend(hits)
        counts = self.reruns()
        for s in dict.fromkeys(chosen):
            counts[s] = counts.get(s, 0) + 1
        _atomic_put(self.fs, f"{self.path}/{RERUNS}", json.dumps(dict(sorted(counts.items())), indent=2).encode())
        log.info("rerun requested: %s", ", ".join(f"{s} (#{counts[s]})" for s in dict.fromkeys(chosen)))
        return {s: counts[s] for s in dict.fromkeys(chosen)}

    def status(self) -> list[dict[str, Any]]:
        """One row per stage name (latest event wins): state, output, duration."""
        rows: dict[str, dict[str, Any]] = {}
        for ev in self.events():
            row = rows.setdefault(ev["stage"], {"stage": ev["stage"]})
            row["uri"] = ev.get("uri")
            row["state"] = ev["event"]
            if ev["event"] == "finished":
                row["seconds"] = ev.get("seconds")
                row["placement"] = ev.get("placement") or {}
            if ev["event"] == "failed":
                row["error"] = ev.get("error")
            elif ev["event"] in ("finished", "reused"):
                row.pop("error", None)  # an earlier attempt's failure is history once the stage is done
        for row in rows.values():
            if row["state"] == "started":
                # No finish event: either still running or killed; the record tells which is safe to reuse.
                row["state"] = "finished" if read_record(row["uri"]) else "running or interrupted"
        return list(rows.values())


def request_reruns(root: str, names: Iterable[str]) -> dict[str, int]:
    """``Run(root).request_rerun(names)``, refusing (ValueError) a folder with no recorded stages
    without creating it."""
    fs, path = _fs(root)
    if not fs.exists(f"{path.rstrip('/')}/{LEDGER}"):
        raise ValueError(f"--rerun: {root} has no recorded stages yet; a first run computes every stage anyway")
    return Run(root).request_rerun(names)


def fs_size(uri: str) -> int:
    fs, path = _fs(uri)
    try:
        return int(sum(fs.du(path, total=False).values()))
    except FileNotFoundError:
        return 0


__all__ = ["Run", "StageRecord", "code_version", "config_dict", "fs_size", "output_digest", "read_record",
           "request_reruns"]
