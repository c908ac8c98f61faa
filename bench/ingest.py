"""Ingest throughput: one process (storage.ingest.write_image_table) vs parts on Ray (workers.ingest).

The bench writes a synthetic insightface RecordIO pool (``train.rec`` + ``train.idx``, the MS1M
release's layout) of ``--images`` JPEG faces at ``--size`` px, with one corrupt record in every
``--corrupt-every`` and one malformed .idx line, then ingests it with the ms1m reader:

* ``1-process``: the reader streamed through write_image_table, as `fermine ingest` does;
* ``parallel``: the .idx listed once, parts of ``--part-size`` entries as Ray tasks, ``--workers``
  at once (each with 1 CPU), one shard per part.

rows/s is image-table rows written per second of the whole call (listing the entries and the
commit included; the local Ray instance is started before the clock starts, its worker processes
are not), best and median of ``--repeat`` runs, the modes interleaved. CPU ms/row is the CPU time
of the bench process and of the Ray processes it started (median run) per row: on a shared machine,
what the work costs whatever the neighbours do; rows/s on N free cores is at most
N * 1000 / (CPU ms/row). Both outputs are checked to hold the same rows and rejects. The pool is ``--unique``
rendered faces (storage.synthetic) tiled with fresh keys: decoding cost per face is the same and
the pool takes seconds to build.

    .venv/bin/python bench/ingest.py --json out.json                  # 20k faces, 2 workers
    .venv/bin/python bench/ingest.py --images 100000 --workers 1 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile
import time
from typing import Any, BinaryIO

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MAGIC = 0xCED7230A
_MAGIC = struct.pack("<I", MAGIC)


# ---------------------------------------------------------------- a RecordIO pool


def pack_ir(flag: int, label: float, key: int, labels: tuple[float, ...] = (), data: bytes = b"") -> bytes:
    """mxnet.recordio.pack: IRHeader '<IfQQ', ``flag`` float32 labels when flag > 0, then the data."""
    head = struct.pack("<IfQQ", flag, label, key, 0)
    return head + (struct.pack(f"<{len(labels)}f", *labels) if flag > 0 else b"") + data


def write_record(f: BinaryIO, payload: bytes) -> int:
    """dmlc-core RecordIOWriter::WriteRecord: split where the magic word sits at an aligned offset."""
    offset, n, start = f.tell(), len(payload), 0
    for i in range(0, n - n % 4, 4):
        if payload[i:i + 4] == _MAGIC:
            f.write(_MAGIC + struct.pack("<I", ((1 if start == 0 else 2) << 29) | (i - start)) + payload[start:i])
            start = i + 4
    f.write(_MAGIC + struct.pack("<I", ((3 if start else 0) << 29) | (n - start)) + payload[start:])
    f.write(b"\0" * ((-n) % 4))
    return offset


def write_pool(root: str, faces: list[bytes], n: int, corrupt_every: int) -> int:
    """train.rec + train.idx with ``n`` images (keys 1..n); returns how many records are corrupt."""
    os.makedirs(root, exist_ok=True)
    offsets: list[tuple[int, int]] = []
    corrupt = 0
    with open(os.path.join(root, "train.rec"), "wb") as f:
        offsets.append((0, write_record(f, pack_ir(2, 0.0, 0, (n + 1.0, n + 1.0)))))
        for k in range(1, n + 1):
            bad = corrupt_every > 0 and k % corrupt_every == 0
            corrupt += bad
            data = b"not a jpeg" if bad else faces[k % len(faces)]
            offsets.append((k, write_record(f, pack_ir(0, 0.0, k, data=data))))
    with open(os.path.join(root, "train.idx"), "w") as f:
        for i, (k, o) in enumerate(offsets):
            f.write(f"{k}\t{o}\n")
            if i == len(offsets) // 2:
                f.write("a line that is no 'key<TAB>offset'\n")
    return corrupt


def unique_faces(n: int, size: int, seed: int) -> list[bytes]:
    from storage.synthetic import SyntheticConfig, generate

    cfg = SyntheticConfig(seed=seed, size=size, train_per_class=0, test_per_class=0, pool_size=n, fmt=".jpg")
    return [r["image"] for r in generate(cfg)]


# ---------------------------------------------------------------- CPU time


def _descendants(pid: int) -> list[int]:
    """Processes below ``pid``: the local Ray instance this bench started (GCS, raylet, its workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # exited while listed
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and every process below it, so far.

    On a shared machine wall time measures the neighbours too; CPU time per row does not.
    """
    tick = os.sysconf("SC_CLK_TCK")
    total = time.process_time()
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total


# ---------------------------------------------------------------- the two ingests


def one_process(root: str, out: str, rows_per_shard: int) -> tuple[Any, float]:
    from storage.ingest import write_image_table
    from storage.readers import get_reader

    t0 = time.perf_counter()
    m = write_image_table(get_reader("ms1m")(root), out, stage="ingest.ms1m", config={"bench": root},
                          rows_per_shard=rows_per_shard)
    return m, time.perf_counter() - t0


def parallel(root: str, out: str, part_size: int, workers: int) -> tuple[Any, float, float]:
    from storage.readers import get_splittable
    from workers.ingest import ingest_parts
    from workers.sharded import PoolConfig

    t0 = time.perf_counter()
    sp = get_splittable("ms1m")
    entries = sp.entries(root)
    list_s = time.perf_counter() - t0
    m = ingest_parts(sp.read_entries, entries, out, stage="ingest.ms1m", config={"bench": root},
                     part_size=part_size, pool=PoolConfig(num_actors=workers, num_cpus=1.0))
    return m, time.perf_counter() - t0, list_s


def _summary(mode: str, workers: int, runs: list[dict]) -> dict:
    """Best and median rows/s over the repeats of one mode."""
    import statistics

    m = runs[0]["manifest"]
    secs = sorted(r["seconds"] for r in runs)
    best = min(runs, key=lambda r: r["seconds"])
    return {"mode": mode, "workers": workers, "rows": m.rows, "rejects": m.extra["rejects"], "shards": len(m.shards),
            "seconds": secs[0], "seconds_all": [r["seconds"] for r in runs], "list_seconds": best["list_seconds"],
            "rows_per_s": m.rows / secs[0], "rows_per_s_median": m.rows / statistics.median(secs),
            "cpu_ms_per_row": 1000 * statistics.median(r["cpu_seconds"] for r in runs) / max(1, m.rows)}


def same_table(a: str, b: str) -> bool:
    """The same rows (ids and image bytes, in order) and the same rejects."""
    from storage.artifact import Artifact
    from storage.ingest import rejects_uri

    cols = ["id", "image", "label", "split", "source"]
    return (Artifact(a).read(cols).equals(Artifact(b).read(cols))
            and Artifact(rejects_uri(a)).read().equals(Artifact(rejects_uri(b)).read()))


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20000, help="images in the pool")
    ap.add_argument("--unique", type=int, default=300, help="distinct rendered faces, tiled to --images")
    ap.add_argument("--size", type=int, default=112, help="face side in pixels (MS1M: 112)")
    ap.add_argument("--corrupt-every", type=int, default=1000, help="one corrupt record per this many (0: none)")
    ap.add_argument("--workers", type=int, nargs="+", default=[2], help="parallel tasks at once (one run each)")
    ap.add_argument("--part-size", type=int, default=1024, help="entries per part (parallel), rows per shard (1-process)")
    ap.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each mode; the best and the median are reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where the pool and tables go (default: a temporary folder, removed)")
    ap.add_argument("--json", dest="json_path", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    root = args.workdir or tempfile.mkdtemp(prefix="bench-ingest-")
    try:
        return _run(args, root)
    finally:
        if not args.workdir:
            import shutil

            shutil.rmtree(root, ignore_errors=True)


def _run(args: argparse.Namespace, root: str) -> dict:
    from workers.cluster import RayConfig, connect

    load = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    t0 = time.perf_counter()
    faces = unique_faces(args.unique, args.size, args.seed)
    pool = os.path.join(root, "pool")
    corrupt = write_pool(pool, faces, args.images, args.corrupt_every)
    build_s = time.perf_counter() - t0
    mb = os.path.getsize(os.path.join(pool, "train.rec")) / 2**20
    t0 = time.perf_counter()
    connect(RayConfig(num_cpus=args.ray_cpus))
    ray_s = time.perf_counter() - t0
    import ray

    runs: dict[tuple[str, int], list[dict]] = {}
    for rep in range(args.repeat):  # modes interleaved: load drifting on a shared machine hits them alike
        c0 = cpu_seconds()
        m, secs = one_process(pool, os.path.join(root, f"seq-{rep}"), args.part_size)
        runs.setdefault(("1-process", 1), []).append({"manifest": m, "seconds": secs, "list_seconds": 0.0,
                                                      "cpu_seconds": cpu_seconds() - c0})
        for w in args.workers:
            out = os.path.join(root, f"par-{w}-{rep}")
            c0 = cpu_seconds()
            pm, psecs, list_s = parallel(pool, out, args.part_size, w)
            cpu = cpu_seconds() - c0
            if not same_table(os.path.join(root, f"seq-{rep}"), out) or pm.extra != m.extra:
                raise SystemExit(f"the parallel ingest with {w} workers differs from the 1-process ingest: a bug")
            runs.setdefault(("parallel", w), []).append({"manifest": pm, "seconds": psecs, "list_seconds": list_s,
                                                         "cpu_seconds": cpu})
    results = [_summary(mode, w, rs) for (mode, w), rs in runs.items()]
    base = results[0]["rows_per_s"]
    for r in results:
        r["speedup"] = r["rows_per_s"] / base
        r["speedup_median"] = r["rows_per_s_median"] / results[0]["rows_per_s_median"]
    report = {"config": vars(args), "pool_mb": mb, "corrupt_records": corrupt, "build_seconds": build_s,
              "ray_start_seconds": ray_s, "load_before": load, "load_after": os.getloadavg()[0], "cluster_cpus": ray.cluster_resources().get("CPU"),
              "cpu_count": os.cpu_count(), "results": results}
    print(f"ingest bench: RecordIO pool of {args.images} JPEG faces at {args.size} px ({mb:.0f} MB, {corrupt} corrupt "
          f"records, 1 bad .idx line), part size {args.part_size}, {os.cpu_count()} CPUs")
    print(f"best of {args.repeat} runs (median in brackets); load average {load:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    print(f"{'mode':>10} {'workers':>7} {'rows':>7} {'rejects':>7} {'shards':>6} {'list s':>6} {'seconds':>7} "
          f"{'rows/s':>16} {'speedup':>12} {'CPU ms/row':>10}")
    for r in results:
        print(f"{r['mode']:>10} {r['workers']:>7} {r['rows']:>7} {r['rejects']:>7} {r['shards']:>6} "
              f"{r['list_seconds']:>6.2f} {r['seconds']:>7.2f} {r['rows_per_s']:>7.0f} [{r['rows_per_s_median']:>6.0f}] "
              f"{r['speedup']:>5.2f} [{r['speedup_median']:>4.2f}] {r['cpu_ms_per_row']:>10.3f}")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
