"""Where Progressive Teacher's gain comes from on the synthetic data: schedule, selection and consistency.

The paper (Table 4) has PT above fine-tuning and Mean Teacher under label noise, trained for 6 epochs.
This bench takes that apart at 30% symmetric noise on `bench/fidelity.py`'s PT data (`fidelity.pt_config`:
the pt pipeline, flows/pt.py, the pretrained backbone), paired over seeds:

* finetune, mean_teacher, pt: the paper's schedule, 6 epochs (lr x0.1 after 3). 1050 labeled faces at 16
  a step make that ~400 iterations, against the paper's ~1,500 on RAF-DB;
* the same three at SYNTHETIC_RECIPE's 10 epochs (x0.1 after 5; ``-10ep``): fidelity's own rows (its run
  folders are reused with --fidelity-out). ``turn_iters`` 130 puts R(t)'s turn at 20% of training, as
  the paper's T = 300 of ~1,500 iterations does, against 33% at 6 epochs;
* pt-turn80: PT at 6 epochs with ``turn_iters`` 80, the turn at 20% of its ~400 iterations: the turn's
  share alone, at the 6-epoch cost;
* pt-no-consistency: PT without the consistency term (``consistency_max`` 0): the selection alone;
* pt-same-guidance: ONE pair whose own teacher selects (Mean Teacher + selection; the paper's Section 4.5
  ablation "same guidance", 87.84% against PT's 88.69% on RAF-DB): PT - this row is the cross guidance's
  share, this row - mean_teacher the selection's.

Each row also reports how much of the injected noise the selection filtered out and how much of the clean
labels it dropped (PT's own record). One job per seed (every setting in that seed's pt folder, so its
data, backbone and noisy table are built once), ``--jobs`` at once (bench/jobs.py).

    .venv/bin/python bench/pt_ablation.py --fidelity-out runs/fidelity --json pt_ablation.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fidelity import PT_MODELS, SECTIONS, _holds, _run_pipeline, compare, pt_config, report_timing_and_json  # noqa: E402
from jobs import Job, run_parallel, write_figures  # noqa: E402

NOISE = 0.3
# A recipe's three models (fine-tune, Mean Teacher, PT: one run with ``compare``), named <model><suffix>.
# "": the paper's schedule (6 epochs, lr x0.1 after 3); "-10ep": SYNTHETIC_RECIPE's, fidelity's rows.
PAPER_SCHEDULE: dict[str, Any] = {"epochs": 6, "lr_milestones": [3]}
RECIPES: dict[str, dict[str, Any]] = {"": PAPER_SCHEDULE, "-10ep": {}}
# PT alone at the paper's schedule with these PTConfig overrides.
VARIANTS: dict[str, dict[str, Any]] = {
    "pt-turn80": {**PAPER_SCHEDULE, "turn_iters": 80},
    "pt-no-consistency": {**PAPER_SCHEDULE, "consistency_max": 0.0},
    "pt-same-guidance": {**PAPER_SCHEDULE, "n_pairs": 1, "guidance": "same"},
}
SETTINGS = [*(m + r for r in RECIPES for m in PT_MODELS.values()), *VARIANTS]
KEPT = ("accuracy", "noisy_filtered_rate", "clean_filtered_rate")


def references(setting: str) -> list[str]:
    """The rows a setting is compared with: the three models of its own recipe."""
    suffix = next((r for r in RECIPES if r and setting.endswith(r)), "")
    return [m + suffix for m in PT_MODELS.values() if m + suffix != setting]


def setting_config(folder: str, seed: int, overrides: dict[str, Any], compare: bool) -> dict[str, Any]:
    """fidelity's PT run of this seed at NOISE only, with ``overrides``; all three models or PT alone."""
    config = pt_config(folder, seed, quick=False)
    config["pt"].update(noise_rates=[NOISE], compare=compare)
    config["pt"]["config"] = {**config["pt"]["config"], **overrides}
    return config


def seed_job(fidelity_out: str, seed: int) -> dict[str, dict[str, Any]]:
    """Every setting of one seed, in fidelity's pt folder of that seed; returns each setting's figures."""
    folder = os.path.join(fidelity_out, SECTIONS["pt"].folder(seed))
    figures: dict[str, dict[str, Any]] = {}
    for suffix, overrides in RECIPES.items():
        for r in _run_pipeline(setting_config(folder, seed, overrides, compare=True))["rows"]:
            figures[PT_MODELS[r["method"]] + suffix] = {k: r.get(k) for k in KEPT}
    for name, overrides in VARIANTS.items():
        (r,) = _run_pipeline(setting_config(folder, seed, overrides, compare=False))["rows"]
        figures[name] = {k: r.get(k) for k in KEPT}
    return figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fidelity-out", default="runs/fidelity",
                    help="bench/fidelity.py's --out: its PT run folders are used (and made when missing)")
    ap.add_argument("--out", default="runs/pt-ablation", help="this bench's logs and per-seed figures")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="seeds at once (default: one per core)")
    ap.add_argument("--json", help="write the figures here too")
    ap.add_argument("--job", type=int, help=argparse.SUPPRESS)  # SEED: one seed's job (what run_parallel starts)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--figures", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from flows.runtime_env import apply_defaults

    apply_defaults()
    if args.job is not None:
        import torch

        torch.set_num_threads(args.threads)
        write_figures(args.figures, seed_job(args.fidelity_out, args.job))
        return 0
    if len(args.seeds) < 2:
        ap.error("a paired difference needs at least 2 seeds")
    t0 = time.time()
    jobs = [Job(f"pt-ablation-s{s}", [os.path.abspath(__file__), "--fidelity-out", args.fidelity_out,
                                      "--job", str(s)], minutes=12) for s in args.seeds]
    parallel = max(1, min(args.jobs, len(jobs)))
    per_job, seconds = run_parallel(jobs, args.out, parallel,
                                    lambda m: print(f"[{time.time() - t0:6.0f} s] {m}", flush=True))
    per_seed = {s: per_job[f"pt-ablation-s{s}"] for s in args.seeds}
    acc = {name: [per_seed[s][name]["accuracy"] for s in args.seeds] for name in SETTINGS}
    rows = []
    for name in SETTINGS:
        row: dict[str, Any] = {"setting": name, **compare(acc, name, name)}
        for k in KEPT[1:]:
            vals = [per_seed[s][name][k] for s in args.seeds]
            row[k] = sum(vals) / len(vals) if all(v is not None for v in vals) else None
        row["vs"] = {}
        for ref in references(name):
            c = compare(acc, name, ref)
            row["vs"][ref] = {"diff": c["diff"], "se": c["diff_se"], "above": _holds(c, +1)}
        rows.append(row)
    lines = ["| setting | big_test accuracy, mean +- std | noisy labels filtered | clean labels filtered | "
             "paired differences (+- se) |", "|" + "---|" * 5]
    for r in rows:
        rates = [f"{r[k]:.1%}" if r[k] is not None else "" for k in KEPT[1:]]
        diffs = "; ".join(f"vs {ref} {d['diff']:+.4f} +- {d['se']:.4f} ({d['above']})" for ref, d in r["vs"].items())
        lines.append(f"| {r['setting']} | {r['mean']:.4f} +- {r['std']:.4f} | " + " | ".join(rates) + f" | {diffs} |")
    print("\n".join(lines))
    report_timing_and_json(args.seeds, {f"seed {s}": seconds[f"pt-ablation-s{s}"] for s in args.seeds}, t0,
                           "seed job", args.json, {"noise": NOISE, "jobs": parallel, "recipes": RECIPES, "variants": VARIANTS,
                                                   "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
