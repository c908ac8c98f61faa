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
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

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


# ---- the sections -------------------------------------------------------------------------------
def pasm_and_omni(out: str, seeds: list[int], quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from storage.artifact import Artifact

    metrics: dict[int, dict[str, Any]] = {}
    distill: dict[int, dict[str, Any]] = {}
    for s in seeds:
        t = time.time()
        summary = _run_pipeline(round_config(os.path.join(out, f"round-s{s}"), s, quick))
        metrics[s] = summary["metrics"]
        if "distill" in summary["artifacts"]:
            distill[s] = Artifact(summary["artifacts"]["distill"]).manifest.extra.get("holdout", {})
        log(f"round seed {s}: {time.time() - t:.0f} s")
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
    dist = {"distilled": [distill.get(s, {}).get("distilled_acc") for s in seeds],
            "random-real": [distill.get(s, {}).get("random_real_acc") for s in seeds]}
    if all(v is not None for v in dist["distilled"] + dist["random-real"]):
        rows.append({"paper": "omni", "model": "distilled", "test": "holdout", "reference": "random-real",
                     **compare(dist, "distilled", "random-real")})
    return {"rows": rows}


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
    SYNTHETIC_RECIPE and its pretrained backbone (pretrained in the run folder, with this seed).

    The test set ("big_test" in the rows): ``synthetic_options`` {test_per_class: 300}, so the run's own
    test split is the large test set (2100 faces of people not in training) that this section used to
    generate as a table of its own: every generated face has its own random stream, so the training and
    pool splits stay the default ones and the test faces are exactly the former big test's. The backbone
    is pretrained per seed by the pipeline (flows.pt.synthetic_backbone, 15 epochs). --quick: 2 epochs (lr
    step after 1), 30% noise only, the default 50 test faces per class; its figures are not the
    measurement.
    """
    return {"name": f"fidelity-pt-s{seed}", "out": out, "seed": seed, "pipeline": "pt", "report": False,
            "pt": {"noise_rates": _noises(quick), "compare": True,
                   "synthetic_options": {"test_per_class": 50 if quick else 300},
                   "config": {"seed": seed, **({"epochs": 2, "lr_milestones": [1]} if quick else {})}}}


# flows.pt's model names -> the bench's (bench/paper_figures.py resolves these).
PT_MODELS = {"Fine-tune (baseline)": "finetune", "Mean Teacher": "mean_teacher", "PT": "pt"}


def progressive_teacher(out: str, seeds: list[int], quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    res: dict[tuple[str, float], list[float]] = {}
    for s in seeds:
        t = time.time()
        summary = _run_pipeline(pt_config(os.path.join(out, "pt", f"seed-{s}"), s, quick))
        for r in summary["rows"]:
            res.setdefault((PT_MODELS[r["method"]], round(float(r["noise"]), 4)), []).append(r["accuracy"])
        log(f"PT seed {s}: {time.time() - t:.0f} s")
    rows = []
    for n in _noises(quick):
        acc = {m: res[(m, n)] for m in PT_MODELS.values()}
        for m in acc:
            rows.append({"paper": "pt", "model": m, "test": f"big_test, {n:.0%} noise", "reference": "finetune",
                         **compare(acc, m, "finetune")})
        rows.append({"paper": "pt", "model": "pt", "test": f"big_test, {n:.0%} noise", "reference": "mean_teacher",
                     **compare(acc, "pt", "mean_teacher")})
    return {"rows": rows}


def caf_config(out: str, seed: int, quick: bool) -> dict[str, Any]:
    """CAF's run of one seed: the caf pipeline (baseline and CAF) on its synthetic data and recipe
    (tasks.caf.method SYNTHETIC_DATA, SYNTHETIC_RECIPE); --quick: fewer faces and epochs (a smoke run)."""
    quick_data = {"synthetic_options": {"train_per_class": 150, "test_per_class": 40}} if quick else {}
    return {"name": f"fidelity-caf-s{seed}", "out": out, "seed": seed, "pipeline": "caf", "report": False,
            "caf": {"compare": True, **quick_data,
                    "config": {"seed": seed, **({"epochs": 3, "lr_step": 20} if quick else {})}}}


def caf(out: str, seeds: list[int], quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """CAF's Table 1/4 comparison: the critic-free baseline vs CAF, one caf pipeline run per seed."""
    from tasks.caf.va_metrics import VA_METRICS

    per_seed: dict[str, list[dict[str, Any]]] = {"baseline": [], "caf": []}
    for s in seeds:
        t = time.time()
        summary = _run_pipeline(caf_config(os.path.join(out, "caf", f"seed-{s}"), s, quick))
        for key in per_seed:
            per_seed[key].append(summary["rows"][key])
        log(f"CAF seed {s}: {time.time() - t:.0f} s")
    rows = []
    for metric in VA_METRICS:
        vals = {name: [m[metric] for m in per_seed[key]] for name, key in
                (("critic-free", "baseline"), ("caf", "caf"))}
        for name in vals:
            rows.append({"paper": "caf", "model": name, "test": metric, "reference": "critic-free",
                         **compare(vals, name, "critic-free")})
    return {"rows": rows}


def featloss_config(out: str, seed: int, quick: bool) -> dict[str, Any]:
    """The feature losses' run of one seed: the featloss pipeline with none, fixed and adaptive weighting
    (tasks.featloss.method.COMPARE_VARIANTS) on its synthetic data and recipe; --quick: fewer faces, 2 epochs."""
    from tasks.featloss.method import COMPARE_VARIANTS

    quick_data = {"synthetic": {"train_per_class": 150, "test_per_class": 40}} if quick else {}
    return {"name": f"fidelity-featloss-s{seed}", "out": out, "seed": seed, "pipeline": "featloss", "report": False,
            "featloss": {"variants": list(COMPARE_VARIANTS), "report": False, **quick_data,
                         "config": {"seed": seed, **({"epochs": 2} if quick else {})}}}


def featloss(out: str, seeds: list[int], quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """The feature-loss comparison (none vs fixed vs adaptive weights), one featloss pipeline run per seed."""
    vals: dict[str, list[float]] = {}
    for s in seeds:
        t = time.time()
        summary = _run_pipeline(featloss_config(os.path.join(out, "featloss", f"seed-{s}"), s, quick))
        for v, m in summary["metrics"].items():  # the variants in the config's order
            vals.setdefault(v, []).append(m["test (5-crop + mirror vote)"]["accuracy"])
        log(f"feature losses seed {s}: {time.time() - t:.0f} s")
    rows = [{"paper": "featloss", "model": v, "test": "test accuracy", "reference": "none",
             **compare(vals, v, "none")} for v in vals]
    rows += [{"paper": "featloss", "model": "adaptive", "test": "test accuracy", "reference": "fixed",
              **compare(vals, "adaptive", "fixed")}] if {"adaptive", "fixed"} <= set(vals) else []
    return {"rows": rows}


SECTIONS = {"pasm": pasm_and_omni, "pt": progressive_teacher, "caf": caf, "featloss": featloss}

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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/fidelity", help="work folder; finished runs in it are reused")
    ap.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 (--quick: 0 1)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: smaller data, fewer rounds, epochs and noise levels, 2 seeds (< 10 min)")
    ap.add_argument("--json", help="write the figures here too")
    ap.add_argument("--markdown", help="write the table as Markdown here too (the README's results table)")
    args = ap.parse_args(argv)
    from flows.runtime_env import apply_defaults

    apply_defaults()
    if args.seeds is None:
        args.seeds = [0, 1] if args.quick else [0, 1, 2]
    if len(args.seeds) < 2:
        ap.error("a paired difference needs at least 2 seeds")
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = sorted(set(only) - set(SECTIONS))
    if bad:
        ap.error(f"unknown section(s) {bad}; choose from {', '.join(SECTIONS)}")
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f} s] {msg}", flush=True)

    rows: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    for name in only:
        t = time.time()
        rows += SECTIONS[name](args.out, args.seeds, args.quick, log)["rows"]
        seconds[name] = round(time.time() - t, 1)
    for r in rows:
        r["holds"] = _holds(r, _direction(r))
        r["paper_figure"] = _paper_value(r) or None
    print_table(rows)
    result = {"seeds": args.seeds, "quick": args.quick, "rows": rows, "seconds": seconds,
              "total_seconds": round(time.time() - t0, 1)}
    print(f"total {result['total_seconds'] / 60:.1f} min: " + ", ".join(f"{k} {v / 60:.1f}" for k, v in seconds.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown_table(rows))
    return result


if __name__ == "__main__":
    main()
