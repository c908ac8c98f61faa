"""Fidelity: each paper's headline comparison on the synthetic data, over seeds, next to the paper's figure.

What runs (every model trained on the same data; seeds change initialisation, batches, attacks):

* PASM + omni: the round pipeline (flows/round.py, the same DAG as `fermine run`), one run folder per
  seed: teacher, PASM rounds 1-3, Table VII's one-round conditions without teacher (random erasing,
  adversarial erasing, PASM w/o teacher), VAS and DAS retraining; evaluated on the inner test split,
  the Table III-like occlusion and pose (> 30, > 45 degrees) splits and a cross-style test set.
  Distilled vs random real images: the distill stage's own held-out score.
* Progressive Teacher: the pt pipeline (flows/pt.py; fine-tune, Mean Teacher, PT) at 0/10/20/30%
  symmetric noise, one run folder per seed.
* CAF: the caf pipeline (flows/caf.py; critic-free baseline vs CAF), one run folder per seed.
* Feature losses: the featloss pipeline (flows/featloss.py; none vs fixed vs adaptive), one run folder per seed.

Every section runs the method's declared pipeline (a RunConfig with ``pipeline: ...`` through
flows.round.FLOWS, what `fermine run` runs): each step is a stage, recorded in the run folder's ledger
(`fermine status RUN` lists them) and reused by a rerun.

Each (section, seed) is a job (bench/jobs.py): a child process with its own Prefect server, Ray instance
and torch threads, ``--jobs`` at once (default one per core), each with cores / jobs threads, longest first;
its output goes to ``<out>/logs/<section>-s<seed>.log`` and its figures to ``<out>/jobs/``. The numbers
depend on the threads a job gets (CPU reductions), so the same --jobs on the same machine repeats them.

Each comparison reports mean +- std over seeds and the paired (same seed) difference to its reference
with its standard error; a claim "holds" when the paired difference is above 2 standard errors in the
paper's direction. Every run folder is kept under --out: a rerun reuses finished stages (resume).

    .venv/bin/python bench/fidelity.py --out runs/fidelity --json fidelity.json          # < 60 min, 2 cores
    .venv/bin/python bench/fidelity.py --out runs/fidelity-quick --quick                 # < 10 min
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from jobs import Job, run_parallel, write_figures  # noqa: E402

PASM_MODELS = ("teacher", "pasm-r1", "pasm-r2", "pasm-r3", "random-erasing", "adversarial-erasing",
               "pasm-no-teacher", "pasm-no-erasing")
OMNI_MODELS = ("teacher", "vas", "das")
TEST_SETS = ("inner", "occlusion", "pose30", "pose45", "cross0")


def round_config(out: str, seed: int, quick: bool) -> dict[str, Any]:
    """The PASM + omni run of one seed: the demo's recipe, larger test sets, the Table III splits.

    --quick is a smoke run (smaller data, one PASM round, a shorter teacher, a smaller attack, and the PASM
    pipeline without the omni branch): it checks that every PASM comparison runs; its figures are not the
    measurement.
    """
    n_test, n_hard = (30, 15) if quick else (300, 150)
    return {
        "name": f"fidelity-s{seed}", "out": out, "seed": seed, "pipeline": "pasm" if quick else "round",
        "report": False,
        "labeled": {"format": "synthetic", "rows_per_shard": 256,
                    "options": {"size": 48, "train_per_class": 100 if quick else 150, "test_per_class": n_test,
                                "occlusion_test_per_class": n_hard, "pose_test_per_class": n_hard,
                                "pool_size": 0 if quick else 700}},
        "cross": [{"format": "synthetic", "rows_per_shard": 256,
                   "options": {"size": 48, "style": "b", "seed": 1, "train_per_class": 0, "test_per_class": n_hard,
                               "pool_size": 0}}],
        "extra_test_splits": ["test_occlusion", "test_pose30", "test_pose45"],
        "align": {"size": 48},
        "teacher": {"arch": "small_cnn", "input_size": 48, "epochs": 8 if quick else 15, "batch_size": 32,
                    "lr": 0.02, "lr_step": 6 if quick else 12},
        "attack": {"popsize": 8 if quick else 16, "generations": 3 if quick else 6},
        # The student refines for fewer epochs than the teacher: its own step schedule anneals it as the
        # teacher's did (without, it ends at the teacher's initial lr; see bench/pasm_student.py).
        "pasm": {"rounds": 1 if quick else 3, "beta": 0.1, "student_epochs": 2 if quick else 6,
                 "student_lr_step": 1 if quick else 4,
                 "compare": ["random_erasing", "adversarial_erasing", "no_teacher", "no_erasing"]},
        "mine": {"margin": 0.05},
        "distill": {"outer_steps": 20 if quick else 100, "inner_steps": 5, "real_batch": 64, "n_inits": 2,
                    "image_lr": 0.05, "arch": "convnet_s", "image_size": 32},
    }


# ---- statistics -------------------------------------------------------------------------------
def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan"))


def compare(per_seed: dict[str, list[float]], row: str, ref: str) -> dict[str, Any]:
    """mean +- std of ``row`` and its paired (same seed) difference to ``ref`` with the standard error."""
    from tasks.metrics import paired_seed_differences

    a, b = per_seed[ref], per_seed[row]
    mean, std = _mean_std(b)
    out: dict[str, Any] = {"values": b, "mean": mean, "std": std}
    if row != ref and len(a) == len(b) and len(b) > 1:
        d = paired_seed_differences(a, b)
        out.update(diff=d.mean, diff_se=d.se, diffs=list(d.diffs))
    return out


def _holds(c: dict[str, Any], sign: int) -> str:
    if "diff" not in c or not math.isfinite(c.get("diff_se", float("nan"))):
        return "n/a"
    if sign * c["diff"] > 2 * c["diff_se"]:
        return "yes"
    return "no (opposite)" if sign * c["diff"] < -2 * c["diff_se"] else "within noise"


def report_timing_and_json(seeds: list[int], seconds: dict[str, float], started: float, what: str,
                           json_path: str | None, payload: dict[str, Any]) -> float:
    """Print a bench's time (in all, per part over all seeds) and write ``payload`` + the times to ``json_path``."""
    total = time.time() - started
    print(f"\n{len(seeds)} seeds, {total / 60:.1f} min; per {what} (all seeds): "
          + ", ".join(f"{k} {s / 60:.1f} min" for k, s in seconds.items()))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"seeds": seeds, **payload, "seconds": seconds, "total_seconds": total}, f, indent=2,
                      default=str)
    return total


# ---- the sections: one job per seed (config -> pipeline -> figures), then the rows over seeds ----------
def pasm_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """One round run's figures: every model's metrics per test set and the distill stage's held-out scores."""
    from storage.artifact import Artifact

    holdout = {}
    if "distill" in summary["artifacts"]:
        holdout = Artifact(summary["artifacts"]["distill"]).manifest.extra.get("holdout", {})
    return {"metrics": summary["metrics"], "distill": holdout}


def pasm_rows(per_seed: dict[int, dict[str, Any]], seeds: list[int]) -> list[dict[str, Any]]:
    metrics = {s: per_seed[s]["metrics"] for s in seeds}
    models = [m for m in PASM_MODELS + OMNI_MODELS[1:] if all(m in metrics[s] for s in seeds)]
    rows = []
    for ts in TEST_SETS:
        acc = {m: [metrics[s][m][ts]["accuracy"] for s in seeds] for m in models if ts in metrics[seeds[0]][m]}
        for m in acc:
            rows.append({"paper": "omni" if m in ("vas", "das") else "pasm", "model": m, "test": ts,
                         "reference": "teacher", **compare(acc, m, "teacher")})
        if "pasm-no-erasing" in acc:  # the erasing's own effect: each round vs refining without it
            for m in (m for m in acc if m.startswith("pasm-r")):
                rows.append({"paper": "pasm", "model": m, "test": ts, "reference": "pasm-no-erasing",
                             **compare(acc, m, "pasm-no-erasing")})
        if "pasm-no-teacher" in acc:  # Table VII's order: random < adversarial < PASM w/o teacher
            for ref in ("random-erasing", "adversarial-erasing"):
                rows.append({"paper": "pasm", "model": "pasm-no-teacher", "test": ts, "reference": ref,
                             **compare(acc, "pasm-no-teacher", ref)})
    dist = {"distilled": [per_seed[s]["distill"].get("distilled_acc") for s in seeds],
            "random-real": [per_seed[s]["distill"].get("random_real_acc") for s in seeds]}
    if all(v is not None for v in dist["distilled"] + dist["random-real"]):
        rows.append({"paper": "omni", "model": "distilled", "test": "holdout", "reference": "random-real",
                     **compare(dist, "distilled", "random-real")})
    return rows


def _run_pipeline(config: dict[str, Any]) -> dict[str, Any]:
    """Run one config's pipeline (flows.round.FLOWS, as `fermine run` does); returns its summary."""
    from flows.config import RunConfig
    from flows.round import FLOWS

    cfg = RunConfig.model_validate(config)
    return FLOWS[cfg.pipeline](cfg=cfg)


def _noises(quick: bool) -> list[float]:
    return [0.3] if quick else [0.0, 0.1, 0.2, 0.3]


def pt_config(out: str, seed: int, quick: bool) -> dict[str, Any]:
    """The Progressive Teacher run of one seed: the pt pipeline on the synthetic data with flows.pt's
    SYNTHETIC_RECIPE (10 epochs) and its pretrained backbone (pretrained in the run folder, with this seed).

    Not the paper's 6 epochs: 1050 labeled faces at 16 a step make 6 epochs ~400 iterations, against the
    paper's ~1,500, and every model there ends 2-3 points below its 10-epoch self (bench/pt_ablation.py).

    The test set ("big_test" in the rows): ``synthetic_options`` {test_per_class: 300}, so the run's own
    test split is the large test set (2100 faces of people not in training) that this section used to
    generate as a table of its own: every generated face has its own random stream, so the training and
    pool splits stay the default ones and the test faces are exactly the former big test's. The backbone
    is pretrained per seed by the pipeline (flows.pt.synthetic_backbone, 15 epochs). --quick: 2 epochs (lr
    step after 1), 30% noise only, the default 50 test faces per class; its figures are not the
    measurement.
    """
    schedule = {"epochs": 2, "lr_milestones": [1]} if quick else {}
    return {"name": f"fidelity-pt-s{seed}", "out": out, "seed": seed, "pipeline": "pt", "report": False,
            "pt": {"noise_rates": _noises(quick), "compare": True,
                   "synthetic_options": {"test_per_class": 50 if quick else 300},
                   "config": {"seed": seed, **schedule}}}


# flows.pt's model names -> the bench's (bench/paper_figures.py resolves these).
PT_MODELS = {"Fine-tune (baseline)": "finetune", "Mean Teacher": "mean_teacher", "PT": "pt"}


def pt_figures(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One pt run's figures: each model's test accuracy at each noise rate."""
    return [{"model": PT_MODELS[r["method"]], "noise": round(float(r["noise"]), 4), "accuracy": r["accuracy"]}
            for r in summary["rows"]]


def pt_rows(per_seed: dict[int, list[dict[str, Any]]], seeds: list[int]) -> list[dict[str, Any]]:
    res: dict[tuple[str, float], dict[int, float]] = {}
    for s in seeds:
        for r in per_seed[s]:
            res.setdefault((r["model"], r["noise"]), {})[s] = r["accuracy"]
    rows = []
    for n in sorted({n for _, n in res}):
        acc = {m: [res[(m, n)][s] for s in seeds] for m in PT_MODELS.values()}
        for m in acc:
            rows.append({"paper": "pt", "model": m, "test": f"big_test, {n:.0%} noise", "reference": "finetune",
                         **compare(acc, m, "finetune")})
        rows.append({"paper": "pt", "model": "pt", "test": f"big_test, {n:.0%} noise", "reference": "mean_teacher",
                     **compare(acc, "pt", "mean_teacher")})
    return rows


def caf_config(out: str, seed: int, quick: bool) -> dict[str, Any]:
    """CAF's run of one seed: the caf pipeline (baseline and CAF) on its synthetic data and recipe
    (tasks.caf.method SYNTHETIC_DATA, SYNTHETIC_RECIPE); --quick: fewer faces and epochs (a smoke run)."""
    quick_data = {"synthetic_options": {"train_per_class": 150, "test_per_class": 40}} if quick else {}
    return {"name": f"fidelity-caf-s{seed}", "out": out, "seed": seed, "pipeline": "caf", "report": False,
            "caf": {"compare": True, **quick_data,
                    "config": {"seed": seed, **({"epochs": 3, "lr_step": 20} if quick else {})}}}


def caf_figures(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """One caf run's figures: the critic-free baseline's and CAF's valence/arousal metrics."""
    return {key: summary["rows"][key] for key in ("baseline", "caf")}


def caf_rows(per_seed: dict[int, dict[str, dict[str, float]]], seeds: list[int]) -> list[dict[str, Any]]:
    """CAF's Table 1/4 comparison: the critic-free baseline vs CAF."""
    from tasks.caf.va_metrics import VA_METRICS

    rows = []
    for metric in VA_METRICS:
        vals = {name: [per_seed[s][key][metric] for s in seeds] for name, key in
                (("critic-free", "baseline"), ("caf", "caf"))}
        for name in vals:
            rows.append({"paper": "caf", "model": name, "test": metric, "reference": "critic-free",
                         **compare(vals, name, "critic-free")})
    return rows


def featloss_config(out: str, seed: int, quick: bool) -> dict[str, Any]:
    """The feature losses' run of one seed: the featloss pipeline with none, fixed and adaptive weighting
    (tasks.featloss.method.COMPARE_VARIANTS) on its synthetic data and recipe; --quick: fewer faces, 2 epochs."""
    from tasks.featloss.method import COMPARE_VARIANTS

    quick_data = {"synthetic": {"train_per_class": 150, "test_per_class": 40}} if quick else {}
    return {"name": f"fidelity-featloss-s{seed}", "out": out, "seed": seed, "pipeline": "featloss", "report": False,
            "featloss": {"variants": list(COMPARE_VARIANTS), "report": False, **quick_data,
                         "config": {"seed": seed, **({"epochs": 2} if quick else {})}}}


def featloss_figures(summary: dict[str, Any]) -> dict[str, float]:
    """One featloss run's figures: each variant's test accuracy (5-crop + mirror vote), in the config's order."""
    return {v: m["test (5-crop + mirror vote)"]["accuracy"] for v, m in summary["metrics"].items()}


def featloss_rows(per_seed: dict[int, dict[str, float]], seeds: list[int]) -> list[dict[str, Any]]:
    """The feature-loss comparison: none vs fixed vs adaptive weights."""
    vals = {v: [per_seed[s][v] for s in seeds] for v in per_seed[seeds[0]]}
    rows = [{"paper": "featloss", "model": v, "test": "test accuracy", "reference": "none",
             **compare(vals, v, "none")} for v in vals]
    rows += [{"paper": "featloss", "model": "adaptive", "test": "test accuracy", "reference": "fixed",
              **compare(vals, "adaptive", "fixed")}] if {"adaptive", "fixed"} <= set(vals) else []
    return rows


@dataclass(frozen=True)
class Section:
    """One paper's comparison: the run config of a seed (in its folder under --out), the figures taken from
    that run's summary (JSON, what a job hands back), and the table rows over every seed's figures."""

    folder: Callable[[int], str]
    config: Callable[[str, int, bool], dict[str, Any]]
    figures: Callable[[dict[str, Any]], Any]
    rows: Callable[[dict[int, Any], list[int]], list[dict[str, Any]]]
    minutes: float  # about one seed's job on one core here (measured); orders the jobs, longest first


# Run folders are those of earlier releases (a rerun with --out of one reuses its finished stages).
SECTIONS: dict[str, Section] = {
    "pasm": Section(lambda s: f"round-s{s}", round_config, pasm_figures, pasm_rows, 8.3),
    "pt": Section(lambda s: os.path.join("pt", f"seed-{s}"), pt_config, pt_figures, pt_rows, 19.2),
    "caf": Section(lambda s: os.path.join("caf", f"seed-{s}"), caf_config, caf_figures, caf_rows, 1.2),
    "featloss": Section(lambda s: os.path.join("featloss", f"seed-{s}"), featloss_config, featloss_figures,
                        featloss_rows, 2.7),
}

# Which way each comparison should go (+1: the row above its reference; RMSE: lower is better).
LOWER_IS_BETTER = ("rmse",)


def _direction(row: dict[str, Any]) -> int:
    return -1 if any(k in row["test"].lower() for k in LOWER_IS_BETTER) else 1


def _paper_value(row: dict[str, Any]) -> str:
    try:
        from paper_figures import paper_value
    except ImportError:
        return ""
    fig = paper_value(row["paper"], row["model"], row["test"])
    return "" if fig is None else f"{fig.fraction:.4f} ({fig.source}, {fig.dataset})"


def print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="fidelity: measured (synthetic data) next to the paper")
    for c in ("paper", "model", "test set", "mean +- std", "vs", "paired diff +- se", "holds", "paper's figure"):
        t.add_column(c, justify="left" if c in ("paper", "model", "test set", "vs", "holds") else "right")
    for r in rows:
        diff = f"{r['diff']:+.4f} +- {r['diff_se']:.4f}" if "diff" in r else ""
        t.add_row(r["paper"], r["model"], r["test"], f"{r['mean']:.4f} +- {r['std']:.4f}",
                  r["reference"] if "diff" in r else "", diff, r["holds"] if "diff" in r else "", _paper_value(r))
    Console(width=160).print(t)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The table as Markdown (for the README): the same columns as the printed one."""
    head = "| paper | model | test set | mean +- std | vs | paired diff +- se | holds | paper's figure |"
    out = [head, "|" + "---|" * 8]
    for r in rows:
        diff = f"{r['diff']:+.4f} +- {r['diff_se']:.4f}" if "diff" in r else ""
        out.append(f"| {r['paper']} | {r['model']} | {r['test']} | {r['mean']:.4f} +- {r['std']:.4f} | "
                   f"{r['reference'] if 'diff' in r else ''} | {diff} | {r.get('holds', '') if 'diff' in r else ''} | "
                   f"{r.get('paper_figure') or ''} |")
    return "\n".join(out) + "\n"


def run_job(section: str, seed: int, out: str, quick: bool, threads: int) -> Any:
    """One seed of one section, in this process with ``threads`` CPU threads; returns its figures."""
    import torch

    from flows.config import RaySection

    torch.set_num_threads(threads)
    sec = SECTIONS[section]
    config = sec.config(os.path.join(out, sec.folder(seed)), seed, quick)
    # A round's local Ray instance gets this job's share of the machine: its stages take 1 CPU each, and
    # no more actors per sharded stage than it has CPUs (the shards, not the actors, fix the results).
    ray = config.setdefault("ray", {})
    ray.setdefault("num_cpus", threads)
    ray.setdefault("workers", min(RaySection().workers, threads))
    return sec.figures(_run_pipeline(config))


def section_jobs(names: list[str], seeds: list[int], out: str, quick: bool) -> list[Job]:
    """One child process per (section, seed): this script with ``--job SECTION:SEED`` (run_job)."""
    return [Job(f"{n}-s{s}", [os.path.abspath(__file__), "--out", out, "--job", f"{n}:{s}"] + (["--quick"] if quick else []),
                minutes=SECTIONS[n].minutes) for n in names for s in seeds]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/fidelity", help="work folder; finished runs in it are reused")
    ap.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 (--quick: 0 1)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: smaller data, fewer rounds, epochs and noise levels, 2 seeds (< 10 min)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="(section, seed) jobs at once, each with cores / jobs threads (default: one per core)")
    ap.add_argument("--json", help="write the figures here too")
    ap.add_argument("--markdown", help="write the table as Markdown here too (the README's results table)")
    ap.add_argument("--job", help=argparse.SUPPRESS)  # SECTION:SEED: one job (what run_jobs starts)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--figures", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from flows.runtime_env import apply_defaults

    apply_defaults()
    if args.job:
        section, seed = args.job.split(":")
        figs = run_job(section, int(seed), args.out, args.quick, args.threads)
        write_figures(args.figures, figs)
        return {"figures": figs}
    if args.seeds is None:
        args.seeds = [0, 1] if args.quick else [0, 1, 2]
    if len(args.seeds) < 2:
        ap.error("a paired difference needs at least 2 seeds")
    if args.jobs < 1:
        ap.error("--jobs must be at least 1")
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = sorted(set(only) - set(SECTIONS))
    if bad:
        ap.error(f"unknown section(s) {bad}; choose from {', '.join(SECTIONS)}")
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f} s] {msg}", flush=True)

    jobs = min(args.jobs, len(only) * len(args.seeds))
    per_job, job_seconds = run_parallel(section_jobs(only, args.seeds, args.out, args.quick), args.out, jobs, log)
    figures = {n: {s: per_job[f"{n}-s{s}"] for s in args.seeds} for n in only}
    seconds = {n: round(sum(job_seconds[f"{n}-s{s}"] for s in args.seeds), 1) for n in only}
    rows = [r for name in only for r in SECTIONS[name].rows(figures[name], args.seeds)]
    for r in rows:
        r["holds"] = _holds(r, _direction(r))
        r["paper_figure"] = _paper_value(r) or None
    print_table(rows)
    result = {"seeds": args.seeds, "quick": args.quick, "jobs": jobs, "rows": rows, "seconds": seconds,
              "total_seconds": round(time.time() - t0, 1)}
    print(f"total {result['total_seconds'] / 60:.1f} min, {jobs} jobs at once; each section's jobs: "
          + ", ".join(f"{k} {v / 60:.1f}" for k, v in seconds.items()) + " min")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown_table(rows))
    return result


if __name__ == "__main__":
    main()
