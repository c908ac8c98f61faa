"""Benchmark: the batched point attack vs per-image scipy differential evolution (PASM Eq. 2-3).

In one run, on the same teacher, images, objective and budget (popsize x (generations + 1) candidate
evaluations per image):

* attacked images/s of the batched search (all images and candidates in shared forward passes) and of
  ``scipy.optimize.differential_evolution`` per image with ``vectorized=True`` (one forward pass per
  generation: the strongest per-image baseline), their ratio, and each one's mean final fitness
  (teacher's true-class probability after the perturbation; lower is better);
* the batched search's candidate evaluations/s as a fraction of the model's plain inference
  throughput at its best batch size;
* the saliency-seeded start: how many evaluations per image it needs to reach scipy's mean fitness
  (its gradient pass counted as 3 evaluations: one forward + a backward of about twice the cost).

The teacher is trained here for a few epochs on the synthetic data set (a random network's outputs are
nearly uniform, which would make every search look alike), or loaded with --checkpoint.

    .venv/bin/python bench/attack.py                          # small_cnn, 64 px, CPU
    .venv/bin/python bench/attack.py --arch resnet18 --images 8
    .venv/bin/python bench/attack.py --arch resnet34 --size 224 --device cuda --images 256 --generations 25
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tasks.pasm.attack import AttackConfig, PointAttacker, measure_throughput  # noqa: E402
from tasks.data import load_image_set  # noqa: E402

SALIENCY_COST = 3  # evaluation-equivalents of the one forward + backward pass of the saliency start


def _teacher(args, workdir):
    """(model, image set of the attacked images) on args.device."""
    from storage.ingest import write_image_table
    from storage.synthetic import SyntheticConfig, generate

    from storage.artifact import is_finished

    table = os.path.join(workdir, "synthetic")
    if not is_finished(table):
        write_image_table(generate(SyntheticConfig(size=args.size, train_per_class=args.train_per_class,
                                               test_per_class=0, pool_size=0, seed=args.seed)),
                      table, stage="bench", config={})
    if args.checkpoint:
        from tasks.engine.checkpoint import load_checkpoint

        model, meta = load_checkpoint(args.checkpoint, device=args.device)
        size = int(meta.get("input_size") or args.size)
    else:
        from tasks.train import TrainConfig, train

        cfg = TrainConfig(arch=args.arch, input_size=args.size, epochs=args.train_epochs, batch_size=32,
                          device=args.device, seed=args.seed, lr_step=max(10, args.train_epochs))
        t0 = time.perf_counter()
        # A finished run in --workdir is returned as is by train(): later benchmark runs reuse it.
        res = train(cfg, [table], os.path.join(workdir, "teacher"))
        print(f"trained {args.arch} teacher: {args.train_epochs} epochs in {time.perf_counter() - t0:.0f} s, "
              f"train acc {res.metrics['train_acc']:.3f}", file=sys.stderr)
        from tasks.engine.checkpoint import load_checkpoint

        model, _ = load_checkpoint(res.checkpoint_uri, device=args.device)
        size = args.size
    # PASM attacks the training images (its learning materials); spread the picks over the classes.
    data = load_image_set(table, size, splits=("train",))
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:args.images]
    data = data.subset(pick)
    return model.eval(), data


def _scipy(attacker: PointAttacker, images, labels, popsize, generations, seed):
    from scipy.optimize import differential_evolution

    h, w = images.shape[2:]
    base = images.to(attacker.device)
    lab = labels.to(attacker.device)
    fits, nfev = [], 0
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(len(images)):
        zero = torch.zeros(popsize, dtype=torch.long, device=attacker.device)

        def f(z, i=i, zero=zero):
            c = torch.from_numpy(np.asarray(z, dtype=np.float32).T.copy()).to(attacker.device)
            return attacker.fitness(base[i:i + 1], lab[i:i + 1], zero[:len(c)], c).cpu().numpy()

        res = differential_evolution(f, [(0, w), (0, h), (0, 255), (0, 255), (0, 255)], strategy="rand1bin",
                                     popsize=max(1, popsize // 5), maxiter=generations, mutation=0.5,
                                     recombination=1.0, polish=False, vectorized=True, updating="deferred",
                                     tol=0, atol=0, seed=seed * 100003 + i)
        fits.append(float(res.fun))
        nfev += (generations + 1) * max(1, popsize // 5) * 5
    return np.array(fits), time.perf_counter() - t0, nfev, time.process_time() - c0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="small_cnn")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--popsize", type=int, default=40, help="candidates per image (a multiple of 5 matches scipy)")
    ap.add_argument("--generations", type=int, default=25)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--checkpoint", default=None, help="teacher checkpoint folder (default: train one here)")
    ap.add_argument("--workdir", default=None, help="keep the synthetic table and teacher here (reused by later runs)")
    ap.add_argument("--train-epochs", type=int, default=10)
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--skip-scipy", action="store_true", help="GPU runs: per-image scipy takes very long at 224 px")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each search (median counts)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args(argv)
    if args.popsize % 5:
        ap.error("--popsize must be a multiple of 5 so scipy (popsize x 5 parameters) gets the same population")
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        model, data = _teacher(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-attack-") as work:
            model, data = _teacher(args, work)
    images, labels = data.images, data.labels
    n = len(images)
    shape = tuple(images.shape[1:])
    cfg = AttackConfig(popsize=args.popsize, generations=args.generations, seed=args.seed, device=args.device)

    # Plain inference of the same prepared model (device, memory format, autocast): the ceiling for
    # candidate evaluations/s. The model as given (NCHW) is measured too, for reference.
    attacker = PointAttacker(model, cfg)
    sizes = (1, 8, 16, 24, 32, 40, 48, 64, 96, 128, 256) if dev.type == "cpu" else (32, 64, 128, 256, 512, 1024, 2048)
    plain = measure_throughput(attacker.model, shape, dev, sizes, amp=cfg.amp, min_seconds=0.5,
                               channels_last=attacker.channels_last)
    best_bs = max(plain, key=plain.get)
    nchw = measure_throughput(model, shape, dev, (best_bs,), amp=cfg.amp, min_seconds=0.5)[best_bs]

    # Batched search (chunk size measured once, like a Ray actor on its first shard).
    t0 = time.perf_counter()
    chunk = attacker.resolve_chunk(shape)
    tune_s = time.perf_counter() - t0
    # The two searches alternate, --repeats times each, and the median time counts: the CPU is shared
    # and its speed drifts, alternating spreads the drift over both.
    sp_att = PointAttacker(model, cfg)
    sp_att.chunk_size = max(chunk, args.popsize)  # scipy's one call per generation = one forward pass
    ours_times, sp_times, plain_rates, ours_cpu, sp_cpu = [], [], [], [], []
    ours = sp_fit = None
    for _ in range(args.repeats):
        # Plain inference right next to the search, so the fraction compares like with like.
        plain_rates.append(measure_throughput(attacker.model, shape, dev, (best_bs,), amp=cfg.amp, min_seconds=2.0,
                                              channels_last=attacker.channels_last)[best_bs])
        t0, c0 = time.perf_counter(), time.process_time()
        ours = attacker(images, labels, track_history=True)
        ours_times.append(time.perf_counter() - t0)
        ours_cpu.append(time.process_time() - c0)
        if not args.skip_scipy:
            sp_fit, sp_s, sp_nfev, sp_c = _scipy(sp_att, images, labels, args.popsize, args.generations, args.seed)
            sp_times.append(sp_s)
            sp_cpu.append(sp_c)
    ours_s = float(np.median(ours_times))
    ours_evals = int(ours.evals.sum())

    result = {
        "device": str(dev), "arch": args.arch, "size": args.size, "images": n, "popsize": args.popsize,
        "generations": args.generations, "threads": torch.get_num_threads(), "load_avg": os.getloadavg(),
        "repeats": args.repeats, "batched_seconds_all": ours_times, "scipy_seconds_all": sp_times,
        "batched_cpu_seconds_all": ours_cpu, "scipy_cpu_seconds_all": sp_cpu,
        "plain_images_per_s": {str(k): v for k, v in plain.items()}, "plain_best_batch": best_bs,
        "plain_best_images_per_s": plain[best_bs], "plain_nchw_images_per_s_at_best_batch": nchw, "chunk_size": chunk,
        "chunk_tuning_s": tune_s,
        "batched_images_per_s": n / ours_s, "batched_seconds": ours_s,
        "batched_evals_per_s": ours_evals / ours_s,
        "plain_interleaved_images_per_s": float(np.median(plain_rates)),
        "batched_fraction_of_plain": ours_evals / ours_s / float(np.median(plain_rates)),
        "batched_mean_fitness": float(ours.fitness.mean()), "mean_clean_prob": float(ours.clean_prob.mean()),
        "evals_per_image": ours_evals / n,
    }
    if not args.skip_scipy:
        sp_s = float(np.median(sp_times))
        result.update({"scipy_images_per_s": n / sp_s, "scipy_seconds": sp_s,
                       "scipy_mean_fitness": float(sp_fit.mean()),
                       "speedup_vs_scipy": sp_s / ours_s, "scipy_evals_per_image": sp_nfev / n,
                       # CPU seconds of this process: far less sensitive than wall time to other jobs on a
                       # shared machine (with --threads 1 it is the work each search needs).
                       "speedup_vs_scipy_cpu_time": float(np.median(sp_cpu) / np.median(ours_cpu))})
        target = float(sp_fit.mean())
    else:
        target = float(ours.fitness.mean())

    # Saliency-seeded start: evaluations needed to reach the reference fitness (scipy's mean).
    sal_att = PointAttacker(model, AttackConfig(**{**cfg.__dict__, "init": "saliency"}))
    sal_att.chunk_size = chunk
    t0 = time.perf_counter()
    sal = sal_att(images, labels, track_history=True)
    sal_s = time.perf_counter() - t0
    per_gen = sal.history.mean(0).numpy()  # mean best fitness after init and each generation
    reached = np.nonzero(per_gen <= target + 1e-9)[0]
    full_budget = args.popsize * (args.generations + 1)
    lhs_gen = np.nonzero(ours.history.mean(0).numpy() <= target + 1e-9)[0]
    result.update({
        "saliency_mean_fitness": float(sal.fitness.mean()), "saliency_images_per_s": n / sal_s,
        "saliency_mean_fitness_per_generation": per_gen.tolist(),
        "saliency_evals_to_reach_reference": (int(args.popsize * (reached[0] + 1) + SALIENCY_COST)
                                              if len(reached) else None),
        "batched_evals_to_reach_reference": int(args.popsize * (lhs_gen[0] + 1)) if len(lhs_gen) else None,
        "reference_evals": full_budget, "reference": "scipy" if not args.skip_scipy else "batched",
    })
    e = result["saliency_evals_to_reach_reference"]
    result["saliency_evals_fraction"] = e / full_budget if e is not None else None
    _print(result)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _print(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"point attack: {r['arch']} {r['size']} px on {r['device']} ({r['threads']} threads, load "
                    f"{r['load_avg'][0]:.1f}), {r['images']} images, popsize {r['popsize']} x {r['generations']} gen.")
    t.add_column("")
    t.add_column("images/s", justify="right")
    t.add_column("mean fitness", justify="right")
    t.add_column("evals/image", justify="right")
    t.add_column("note")
    t.add_row("clean (no attack)", "", f"{r['mean_clean_prob']:.4f}", "", "")
    t.add_row("batched DE (ours)", f"{r['batched_images_per_s']:.2f}", f"{r['batched_mean_fitness']:.4f}",
              f"{r['evals_per_image']:.0f}",
              f"chunk {r['chunk_size']} (tuned in {r['chunk_tuning_s']:.1f} s); "
              f"{r['batched_evals_per_s']:.0f} evals/s = {100 * r['batched_fraction_of_plain']:.0f}% of plain "
              f"inference ({r['plain_interleaved_images_per_s']:.0f} img/s at its best batch, {r['plain_best_batch']})")
    if "scipy_images_per_s" in r:
        t.add_row("scipy DE per image", f"{r['scipy_images_per_s']:.2f}", f"{r['scipy_mean_fitness']:.4f}",
                  f"{r['scipy_evals_per_image']:.0f}",
                  f"vectorized=True; ours is {r['speedup_vs_scipy']:.2f}x by wall time, "
                  f"{r['speedup_vs_scipy_cpu_time']:.2f}x by CPU time")
    e = r["saliency_evals_to_reach_reference"]
    t.add_row("batched DE, saliency start", f"{r['saliency_images_per_s']:.2f}", f"{r['saliency_mean_fitness']:.4f}",
              f"{r['reference_evals']}",
              f"reaches {r['reference']}'s mean fitness after {e} evals/image "
              f"({100 * r['saliency_evals_fraction']:.0f}% of its budget)" if e is not None
              else f"does not reach {r['reference']}'s mean fitness")
    Console(width=150).print(t)


if __name__ == "__main__":
    main()
