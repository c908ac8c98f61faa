"""Fine-tune vs Mean Teacher vs Progressive Teacher on the synthetic data, from a pretrained backbone.

Reproduces the Table 4-style comparison of issue 8 on a CPU in minutes (one torch thread):

1. the target data: flows.pt.synthetic_table (style "a": train 150/class, test 50/class, pool 2100);
2. the pretrained start, as in the paper (Section 4.1: a backbone pretrained on a face data set), with
   flows.pt.synthetic_backbone: small_cnn trained on the clean style-"b" synthetic set of other people,
   saved without its classifier head (``--scratch`` skips it: every method starts from random weights);
3. per noise rate (symmetric, tasks.pt.label_noise, seed 0): fine-tune (tasks.train), Mean Teacher and PT
   (tasks.pt.method) with the same network, epochs, lr schedule and labeled images per step;
4. test accuracy on the data's test split and, with ``--big-test N``, on an extra test set of N images
   per class (new people, same style), whose standard error is smaller (350 test images give +-2.5%).

    .venv/bin/python bench/pt_compare.py --out /tmp/ptc --noise 0.3 --noise 0 --json /tmp/ptc.json

Prints a table and the per-class counts of labeled samples the teachers filtered out (last epoch), and
writes the same figures as JSON with ``--json``. Timings are wall-clock on whatever machine runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

METHODS = ("finetune", "mean_teacher", "pt")
# The defaults are PT's synthetic recipe, the one `fermine pt synthetic ...` uses.
from flows.pt import SYNTHETIC_RECIPE as RECIPE  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="work folder (data, pretraining and runs are reused from it)")
    ap.add_argument("--noise", type=float, action="append", help="symmetric noise rate(s); default 0.3")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    ap.add_argument("--size", type=int, default=RECIPE["input_size"])
    ap.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    ap.add_argument("--lr-step", type=int, default=RECIPE["lr_milestones"][0],
                    help="epoch after which the lr is multiplied by 0.1 (PTConfig.lr_milestones)")
    ap.add_argument("--batch-size", type=int, default=RECIPE["batch_size"])
    ap.add_argument("--turn-iters", type=int, default=RECIPE["turn_iters"])
    ap.add_argument("--ema-max", type=float, default=RECIPE["ema_max"])
    ap.add_argument("--split-bn", action="store_true", help="PTConfig.split_bn for Mean Teacher and PT")
    ap.add_argument("--forget-rate", type=float, default=None,
                    help="PT's final forget rate r (default: the rule, noise + --forget-margin)")
    ap.add_argument("--forget-margin", type=float, default=RECIPE["forget_margin"],
                    help="what the rule adds to the noise rate (paper on RAF-DB: 0.1)")
    ap.add_argument("--scratch", action="store_true", help="no pretrained backbone")
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0, help="initialisation/batch seed of every method")
    ap.add_argument("--big-test", type=int, default=300, help="extra test images per class (0: none)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from flows.pt import synthetic_backbone, synthetic_table
    from storage.artifact import join
    from tasks.evaluate import evaluate
    from tasks.pt.label_noise import inject_noise
    from tasks.pt.method import PTConfig, finetune_config, mean_teacher_config, train_pt
    from tasks.train import train

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    rates = args.noise or [0.3]
    t0 = time.time()
    data = synthetic_table(args.out, args.size)
    tests = {"test": data}
    if args.big_test:
        # Test faces only (train/pool empty): other people than the training split, same style.
        tests["big_test"] = synthetic_table(join(args.out, "big-test"), args.size,
                                            {"train_per_class": 0, "pool_size": 0, "test_per_class": args.big_test})
    pretrained = None
    if not args.scratch:
        pretrained = synthetic_backbone(args.out, args.size, epochs=args.pretrain_epochs, device="cpu")
    cfg = PTConfig(input_size=args.size, epochs=args.epochs, lr_milestones=(args.lr_step,), batch_size=args.batch_size,
                   turn_iters=args.turn_iters, ema_max=args.ema_max, split_bn=args.split_bn, pretrained=pretrained,
                   forget_rate=args.forget_rate, forget_margin=args.forget_margin,
                   seed=args.seed, device="cpu", pool_splits=("pool",))
    print(f"data + pretraining: {time.time() - t0:.0f} s ({'pretrained: ' + pretrained if pretrained else 'scratch'})",
          flush=True)
    tag = f"{'scratch' if args.scratch else 'pre'}-e{args.epochs}-b{args.batch_size}-T{args.turn_iters}" \
          f"-ema{args.ema_max}{'-splitbn' if args.split_bn else ''}" \
          f"{'' if args.forget_rate is None else f'-r{args.forget_rate:g}'}-m{args.forget_margin:g}-s{args.seed}"
    rows = []
    for rate in rates:
        train_uri = data
        if rate > 0:
            train_uri = join(args.out, f"noisy-sym-{100 * rate:g}")
            inject_noise(data, train_uri, "symmetric", rate, 0)
        for method in methods:
            out = join(args.out, "runs", tag, f"{method}-{100 * rate:g}")
            t = time.time()
            row: dict = {"method": method, "noise": rate}
            if method == "finetune":
                ckpt = train(finetune_config(cfg), [train_uri], out).checkpoint_uri
            else:
                c = cfg if method == "pt" else mean_teacher_config(cfg)
                res = train_pt(c, train_uri, data, out)
                ckpt = res.checkpoint_uri
                m = res.metrics
                row.update({k: m.get(k) for k in ("forget_rate", "noisy_filtered_rate", "clean_filtered_rate",
                                                  "filtered_precision", "filtered_out", "filtered_out_per_class",
                                                  "teacher")})
            row["seconds"] = round(time.time() - t, 1)
            for name, uri in tests.items():
                ev = evaluate(ckpt, uri, splits=("test",), device="cpu")
                row[name] = {"accuracy": ev.accuracy, "mean_class_accuracy": ev.mean_class_accuracy, "n": ev.n}
            rows.append(row)
            print(f"{method:>12} noise {rate:.0%}: " + ", ".join(f"{n} {row[n]['accuracy']:.4f}" for n in tests) +
                  f" ({row['seconds']:.0f} s)", flush=True)

    from storage.schema import CLASSES

    sizes = ", ".join(f"{n} n={rows[0][n]['n']}" for n in tests)
    print(f"\nsynthetic data, symmetric noise, {tag} (test: {sizes})")
    head = f"{'method':>12} {'noise':>6} " + " ".join(f"{n:>10}" for n in tests) + "  filtered noisy/clean"
    print(head)
    for r in rows:
        f = (f"  {r['noisy_filtered_rate']:.0%} / {r['clean_filtered_rate']:.0%}"
             if r.get("noisy_filtered_rate") is not None and r.get("forget_rate") else "")
        print(f"{r['method']:>12} {r['noise']:>6.0%} " + " ".join(f"{r[n]['accuracy']:>10.4f}" for n in tests) + f)
    for r in rows:
        if r["method"] == "pt" and r.get("filtered_out_per_class"):
            counts = r["filtered_out_per_class"]
            print(f"PT filtered out at {r['noise']:.0%} noise (last epoch, per given label): " +
                  ", ".join(f"{CLASSES[int(c)]} {n}" for c, n in counts.items()))
    result = {"tag": tag, "args": vars(args), "config": dataclasses.asdict(cfg), "rows": rows,
              "seconds": round(time.time() - t0, 1)}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2, default=str)
    return result


if __name__ == "__main__":
    main()
