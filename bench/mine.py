"""Mining throughput and memory: the streaming Ray mining job vs the model's plain inference.

For each pool size (default 10,000 and 100,000 faces at 112 px, the MS1M release's resolution) the
bench writes a synthetic pool in Parquet shards, mines it with workers.mine.mine_pool (Ray actors,
one shard per task, output written by the actors) and reports:

* images/s of the mining job: steady state (between the first and the last shard to finish, i.e.
  without actor start-up and model loading) and end to end (the whole call);
* the ratio of the steady-state rate to the model's plain inference throughput on pre-decoded,
  pre-normalised tensors at the same batch size and thread count (goal >= 0.7: decoding, Parquet
  I/O and bookkeeping cost under 30%); the plain rate is measured right before and right after each
  mining run and averaged, so load drifting on a shared machine biases neither;
* the peak memory (VmHWM, peak resident set) of the mining actor processes, sampled from /proc
  (goal: the larger pool within 15% of the smaller: memory does not grow with the pool).

The larger pools are the unique faces (``--unique``, rendered by storage.synthetic) tiled with fresh
ids: decoding and inference cost per face are the same as for distinct faces, and building a 100k
pool takes seconds instead of the ~12 minutes rendering would take on this CPU. The model is a
randomly initialised ``--arch`` (throughput does not depend on the weights); centroids come from a
small labeled synthetic set.

    .venv/bin/python bench/mine.py --json out.json           # 10k and 100k (the issue's sizes)
    .venv/bin/python bench/mine.py --sizes 2000 10000        # a few minutes on 2 CPUs
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------- memory of the actor processes


def _status_kb(pid: str, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _actor_pids(marker: bytes = b"ray::ShardActor") -> list[str]:
    out = []
    for p in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(p, "rb") as f:
                if f.read(64).startswith(marker):
                    out.append(p.split("/")[2])
        except OSError:
            continue
    return out


class ActorMemory(threading.Thread):
    """Samples the peak RSS (VmHWM) of every mining actor process until stopped."""

    def __init__(self, every: float = 0.25):
        super().__init__(daemon=True)
        self.every = every
        self.peak_kb: dict[str, int] = {}
        self.peak_sum_rss_kb = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            total = 0
            for pid in _actor_pids():
                self.peak_kb[pid] = max(self.peak_kb.get(pid, 0), _status_kb(pid, "VmHWM"))
                total += _status_kb(pid, "VmRSS")
            self.peak_sum_rss_kb = max(self.peak_sum_rss_kb, total)
            self._halt.wait(self.every)

    def stop(self) -> dict:
        self._halt.set()
        self.join()
        return {"actors": len(self.peak_kb), "peak_actor_mb": max(self.peak_kb.values(), default=0) / 1024,
                "peak_all_actors_rss_mb": self.peak_sum_rss_kb / 1024}


# ---------------------------------------------------------------- inputs


def unique_faces(n: int, size: int, seed: int) -> list[dict]:
    from storage.synthetic import SyntheticConfig, generate

    cfg = SyntheticConfig(seed=seed, size=size, train_per_class=0, test_per_class=0, pool_size=n)
    return list(generate(cfg))


def write_pool(uri: str, base: list[dict], n: int, rows_per_shard: int) -> None:
    from storage.artifact import ArtifactWriter
    from storage.schema import IMAGE_SCHEMA, image_row

    with ArtifactWriter(uri, stage="bench.pool", config={"n": n}, rows_per_shard=rows_per_shard,
                        schema=IMAGE_SCHEMA) as w:
        buf = []
        for i in range(n):
            r = base[i % len(base)]
            buf.append(image_row(f"pool-{i:08d}", r["image"], split="pool", source="bench",
                                 landmarks=r.get("landmarks")))
            if len(buf) == rows_per_shard:
                w.write_rows(buf)
                buf = []
        w.write_rows(buf)


def make_model(root: str, arch: str, input_size: int, size: int, seed: int) -> tuple[str, str]:
    import torch

    from storage.ingest import write_image_table
    from storage.synthetic import SyntheticConfig, generate
    from tasks.omni.centroids import CentroidConfig, compute_centroids
    from tasks.engine.checkpoint import save_checkpoint
    from tasks.models import build_model

    torch.manual_seed(seed)
    ck = os.path.join(root, "model")
    save_checkpoint(ck, build_model(arch, 7), {"input_size": input_size})
    lab = os.path.join(root, "labeled")
    write_image_table(generate(SyntheticConfig(seed=seed + 1, size=size, train_per_class=8, test_per_class=0,
                                               pool_size=0)), lab, stage="bench.labeled", config={})
    cent = os.path.join(root, "centroids")
    compute_centroids(ck, lab, cent, CentroidConfig())
    return ck, cent


def plain_inference(ck: str, base: list[dict], batch: int, threads: int, seconds: float, device: str) -> float:
    """images/s of model.features on pre-decoded, pre-normalised tensors (the ceiling for mining)."""
    import numpy as np
    import torch

    from tasks.device import resolve_device
    from tasks.engine.checkpoint import load_checkpoint
    from tasks.data import decode_resized, normalize

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    dev = resolve_device(device)
    model, meta = load_checkpoint(ck, device=dev)
    size = int(meta["input_size"])
    imgs = np.stack([decode_resized(base[i % len(base)]["image"], size) for i in range(batch)])
    x = normalize(torch.from_numpy(imgs).permute(0, 3, 1, 2).to(dev))
    amp = dev.type == "cuda"
    try:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            model.features(x)  # warm-up
            if amp:
                torch.cuda.synchronize()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds or n < 3 * batch:
                model.features(x)
                n += batch
            if amp:
                torch.cuda.synchronize()
            return n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)


def mine_once(ck: str, cent: str, pool: str, out: str, args) -> dict:
    from storage.artifact import Artifact
    from tasks.omni.mine import MineConfig
    from workers.mine import mine_pool

    rows = [s.rows for s in Artifact(pool).manifest.shards]
    done: list[tuple[float, int]] = []
    cfg = MineConfig(margin=args.margin, batch_size=args.batch_size, torch_threads=args.threads,
                     decode_threads=args.decode_threads, device=args.device)
    mem = ActorMemory()
    mem.start()
    t0 = time.perf_counter()
    try:
        res = mine_pool(ck, cent, pool, out, cfg, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                        on_shard=lambda i, info, r: done.append((time.perf_counter(), rows[i])))
    finally:
        memory = mem.stop()
    wall = time.perf_counter() - t0
    done.sort()
    # Steady state: the shards finished after the first one, over the time since the first finished.
    steady = (sum(n for _, n in done[1:]) / (done[-1][0] - done[0][0])) if len(done) > 2 else float("nan")
    return {"images": res.examined, "kept": res.kept, "seconds": wall, "e2e_images_per_s": res.examined / wall,
            "steady_images_per_s": steady, "shards": len(rows), **memory}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000], help="pool sizes (faces)")
    ap.add_argument("--unique", type=int, default=500, help="distinct rendered faces, tiled to each size")
    ap.add_argument("--size", type=int, default=112, help="pool image side in pixels")
    ap.add_argument("--input-size", type=int, default=None, help="model input side (default: --size)")
    ap.add_argument("--arch", default="small_cnn")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rows-per-shard", type=int, default=500)
    ap.add_argument("--workers", type=int, default=1, help="mining actors")
    ap.add_argument("--cpus-per-worker", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per actor, and for the plain run")
    ap.add_argument("--decode-threads", type=int, default=1, help="background decode threads per actor (0: inline)")
    ap.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray instance")
    ap.add_argument("--margin", type=float, default=0.001)
    ap.add_argument("--plain-seconds", type=float, default=8.0, help="duration of each plain-inference measurement")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where pools are written and kept (default: a temporary "
                    "folder, removed at the end)")
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args(argv)
    root = args.workdir or tempfile.mkdtemp(prefix="bench-mine-")
    try:
        return _run(args, root)
    finally:
        if not args.workdir:
            import shutil

            shutil.rmtree(root, ignore_errors=True)


def _run(args, root: str) -> dict:
    import torch

    from workers.cluster import RayConfig, connect

    t0 = time.perf_counter()
    base = unique_faces(args.unique, args.size, args.seed)
    gen_s = time.perf_counter() - t0
    ck, cent = make_model(root, args.arch, args.input_size or args.size, args.size, args.seed)
    connect(RayConfig(num_cpus=args.ray_cpus))
    import ray

    res = ray.cluster_resources()
    results = []
    for n in args.sizes:
        pool = os.path.join(root, f"pool-{n}")
        t0 = time.perf_counter()
        write_pool(pool, base, n, args.rows_per_shard)
        build_s = time.perf_counter() - t0
        plain_before = plain_inference(ck, base, args.batch_size, args.threads, args.plain_seconds, args.device)
        mined = mine_once(ck, cent, pool, os.path.join(root, f"aux-{n}"), args)
        plain_after = plain_inference(ck, base, args.batch_size, args.threads, args.plain_seconds, args.device)
        plain = (plain_before + plain_after) / 2
        results.append({"pool": n, "build_seconds": build_s, "plain_images_per_s": plain,
                        "plain_before": plain_before, "plain_after": plain_after, **mined,
                        "ratio_steady": mined["steady_images_per_s"] / plain,
                        "ratio_e2e": mined["e2e_images_per_s"] / plain})
    small, large = results[0], results[-1]
    report = {
        "config": vars(args), "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cluster": {k: res[k] for k in ("CPU", "GPU") if k in res}, "unique_render_seconds": gen_s,
        "results": results,
        "memory_growth": large["peak_actor_mb"] / small["peak_actor_mb"] - 1 if small["peak_actor_mb"] else None,
        "goals": {"ratio_steady>=0.7": all(r["ratio_steady"] >= 0.7 for r in results),
                  "memory_growth<=0.15": (large["peak_actor_mb"] <= 1.15 * small["peak_actor_mb"])},
    }
    print(f"mining bench: {args.arch} at {args.input_size or args.size} px, batch {args.batch_size}, "
          f"{args.workers} actor(s) x {args.threads} torch thread(s) + {args.decode_threads} decode thread(s), "
          f"device {report['device']}")
    head = (f"{'pool':>8} {'shards':>6} {'kept':>7} {'mine img/s':>10} {'e2e img/s':>9} {'plain img/s':>11} "
            f"{'ratio':>6} {'ratio e2e':>9} {'peak actor MB':>13}")
    print(head)
    for r in results:
        print(f"{r['pool']:>8} {r['shards']:>6} {r['kept']:>7} {r['steady_images_per_s']:>10.1f} "
              f"{r['e2e_images_per_s']:>9.1f} {r['plain_images_per_s']:>11.1f} {r['ratio_steady']:>6.2f} "
              f"{r['ratio_e2e']:>9.2f} {r['peak_actor_mb']:>13.0f}")
    if report["memory_growth"] is not None:
        print(f"peak actor memory, largest vs smallest pool: {100 * report['memory_growth']:+.1f}% (goal <= +15%)")
    print("goals:", ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in report["goals"].items()))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
