"""Training throughput: images/s when the trainer streams from artifact shards vs when it is fed
pre-decoded in-memory tensors, same model, batch size and input size. Goal: ratio >= 0.8 (loading
is never the bottleneck).

Both runs are the real trainer (tasks.train.train) on the same synthetic image table written to a
temporary artifact: "memory" decodes the table once before training (decode time reported apart),
"stream" decodes PNG shards in DataLoader workers while the model trains. Throughput is taken over
the epochs after the first of each run (steady state; the first includes worker start-up), and
reported for all epochs too. Runs of the two feeds alternate (--repeats) so that load drifting on a
shared machine does not bias one of them.

    .venv/bin/python bench/train_throughput.py --images 2048 --size 64 --epochs 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_table(uri: str, images: int, size: int, rows_per_shard: int, seed: int) -> float:
    from storage.ingest import write_image_table
    from storage.synthetic import SyntheticConfig, generate

    cfg = SyntheticConfig(seed=seed, size=size, train_per_class=-(-images // 7), val_per_class=0, test_per_class=0,
                          pool_size=0)
    t0 = time.perf_counter()
    write_image_table(generate(cfg), uri, stage="bench.synthetic", config={"images": images, "size": size},
                      rows_per_shard=rows_per_shard)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="small_cnn")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="alternating memory/stream runs of each feed")
    ap.add_argument("--workers", type=int, default=None, help="stream decode workers (default: trainer's)")
    ap.add_argument("--rows-per-shard", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads for both runs (default on CPU: cores left by the stream workers)")
    ap.add_argument("--table", default=None, help="use this image table instead of writing a synthetic one")
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args(argv)

    import torch

    from tasks.device import resolve_device
    from tasks.train import TrainConfig, load_labeled, train

    workers = args.workers if args.workers is not None else min(8, max(1, (os.cpu_count() or 2) - 1))
    if args.threads:
        torch.set_num_threads(args.threads)
    elif resolve_device(args.device).type == "cpu":
        # The trainer gives torch the cores its stream workers leave free; give the in-memory run the same
        # number of threads so that the two runs differ by their feed only.
        torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - workers)))
    tmp = tempfile.mkdtemp(prefix="fermine-bench-")
    table = args.table or os.path.join(tmp, "table")
    gen_s = None
    if args.table is None:
        gen_s = make_table(table, args.images, args.size, args.rows_per_shard, seed=0)

    t0 = time.perf_counter()
    x, y, _ = load_labeled(table, args.size, ("train",), 7)
    decode_s = time.perf_counter() - t0
    n = len(y)
    del x, y

    # Runs alternate memory, stream, memory, stream ...: on a shared machine the load drifts, and
    # alternating spreads that drift over both feeds instead of biasing one of them.
    runs: dict[str, list[list[dict]]] = {"memory": [], "stream": []}
    for r in range(args.repeats):
        for mode in ("memory", "stream"):
            cfg = TrainConfig(arch=args.arch, input_size=args.size, epochs=args.epochs, batch_size=args.batch_size,
                              device=args.device, data=mode, num_workers=workers, seed=0)
            runs[mode].append(train(cfg, [table], os.path.join(tmp, f"run-{mode}-{r}")).history)
    results = {}
    for mode, histories in runs.items():
        steady = [e for h in histories for e in (h[1:] or h)]
        every = [e for h in histories for e in h]
        results[mode] = {
            "images_per_s_steady": sum(e["samples"] for e in steady) / sum(e["seconds"] for e in steady),
            "images_per_s_all": sum(e["samples"] for e in every) / sum(e["seconds"] for e in every),
            "per_epoch": [round(e["images_per_s"], 1) for e in every],
        }
    out = {
        "arch": args.arch, "size": args.size, "images": n, "batch_size": args.batch_size, "epochs": args.epochs,
        "repeats": args.repeats,
        "device": str(resolve_device(args.device)), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "stream_workers": workers, "rows_per_shard": args.rows_per_shard,
        "synthetic_generation_s": gen_s, "decode_once_s": decode_s, "decode_images_per_s": n / decode_s,
        "memory": results["memory"], "stream": results["stream"],
        "ratio_steady": results["stream"]["images_per_s_steady"] / results["memory"]["images_per_s_steady"],
        "ratio_all": results["stream"]["images_per_s_all"] / results["memory"]["images_per_s_all"],
    }
    print(f"\ntraining throughput: {args.arch} @ {args.size}px, batch {args.batch_size}, {n} images, "
          f"{out['device']}, {workers} stream worker(s), {out['torch_threads']} torch thread(s)")
    print(f"{'feed':<34}{'img/s (epochs 2+)':>18}{'img/s (all)':>14}   per epoch")
    for mode, label in (("memory", "in-memory uint8 tensors"), ("stream", "artifact shards (decode in workers)")):
        r = results[mode]
        print(f"{label:<34}{r['images_per_s_steady']:>18.1f}{r['images_per_s_all']:>14.1f}   {r['per_epoch']}")
    print(f"{'ratio stream / memory':<34}{out['ratio_steady']:>18.3f}{out['ratio_all']:>14.3f}   (goal >= 0.8)")
    print(f"decode once (memory path, before training): {decode_s:.2f}s = {n / decode_s:.0f} img/s")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
