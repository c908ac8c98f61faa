"""What makes PASM's students beat their teacher or not: the student recipe, the mask and the attack, one at a time.

With a student that never annealed, `bench/fidelity.py` found every PASM round below its teacher on the
synthetic data; with fidelity's annealed recipe (the default here) the rounds beat it. This bench runs the
PASM pipeline (flows/round.py, `pipeline: pasm`, two rounds, no Table VII conditions) on fidelity's data
and recipe, once per variant and seed, and compares each variant's rounds with the same seed's teacher,
with the same recipe's student on the original images (``pasm-no-erasing``: what refining alone gives,
so the difference is the erasing's effect) and with the default recipe (paired differences over seeds
with their standard errors):

* default: fidelity's recipe: the student refines the teacher's weights for 6 epochs on the erased images only,
  at the teacher's initial lr (0.02) decayed x0.1 after 4 epochs (``pasm.student_lr_step``), as the teacher's
  own schedule decays;
* no-anneal: the same without the decay (the teacher's lr_step, 12, is longer than the student's 6 epochs):
  the student ends at the teacher's initial rate (fidelity's recipe before this bench);
* student-lr: the default at the teacher's final lr (0.002, ``pasm.student_lr``);
* scratch: the student starts where the teacher started, for the teacher's 15 epochs (``student_init``);
* both-data: the originals beside the erased images (``student_data: both``);
* small-mask / large-mask: the erased region at half / 1.5x the default side (``pasm.erase.size``);
* attack-x4: four times the attack budget (population 32, 12 generations).

All variants of a seed share one run folder, so the teacher and the stages a variant does not change
(round 1's attack and erasing) are computed once and reused (the stage identities say which).

    .venv/bin/python bench/pasm_student.py --out runs/pasm-student --json pasm_student.json
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fidelity import _holds, _run_pipeline, compare, report_timing_and_json, round_config  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "student-lr": {"pasm": {"student_lr": 0.002}},
    "no-anneal": {"pasm": {"student_lr_step": None}},
    "scratch": {"pasm": {"student_init": "scratch", "student_epochs": 15}},
    "both-data": {"pasm": {"student_data": "both"}},
    "small-mask": {"pasm": {"erase": {"size": 0.07}}},
    "large-mask": {"pasm": {"erase": {"size": 0.21}}},
    "attack-x4": {"attack": {"popsize": 32, "generations": 12}},
}
TESTS = ("inner", "occlusion", "pose45", "cross0")
ROUNDS = ("pasm-r1", "pasm-r2")
CONTROL = "pasm-no-erasing"  # round 1's student recipe on the original images (pasm.compare: no_erasing)


def variant_config(out: str, seed: int, variant: str) -> dict[str, Any]:
    """fidelity's PASM recipe and data (two rounds, no Table VII conditions) with ``variant``'s changes."""
    cfg = round_config(out, seed, quick=False)
    cfg.update(name=f"pasm-student-{variant}-s{seed}", pipeline="pasm")
    cfg["labeled"]["options"]["pool_size"] = 0  # no omni branch here
    cfg["pasm"] = {**cfg["pasm"], "rounds": len(ROUNDS), "compare": ["no_erasing"]}
    for section, changes in copy.deepcopy(VARIANTS[variant]).items():
        cfg[section] = {**cfg.get(section, {}), **changes}
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/pasm-student", help="work folder; finished stages in it are reused")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if "default" not in variants:
        variants.insert(0, "default")  # every variant is compared with it

    t0 = time.time()
    acc: dict[tuple[str, str, str], list[float]] = {}  # (variant, model, test) -> per seed
    seconds: dict[str, float] = {}
    for seed in args.seeds:
        out = os.path.join(args.out, f"seed-{seed}")
        for v in variants:
            t = time.time()
            metrics = _run_pipeline(variant_config(out, seed, v))["metrics"]
            seconds[v] = seconds.get(v, 0.0) + time.time() - t
            for model in ("teacher", *ROUNDS, CONTROL):
                for ts in TESTS:
                    acc.setdefault((v, model, ts), []).append(metrics[model][ts]["accuracy"])
            print(f"seed {seed} {v}: {time.time() - t:.0f} s", flush=True)

    rows = []
    for ts in TESTS:
        for v in variants:
            for model in (*ROUNDS, CONTROL):
                per = {"teacher": acc[("default", "teacher", ts)], "this": acc[(v, model, ts)],
                       "default": acc[("default", model, ts)], "control": acc[(v, CONTROL, ts)]}
                vs_teacher = compare(per, "this", "teacher")
                row = {"test": ts, "variant": v, "model": model, "mean": vs_teacher["mean"], "std": vs_teacher["std"],
                       "values": vs_teacher["values"], "vs_teacher": vs_teacher.get("diff"),
                       "vs_teacher_se": vs_teacher.get("diff_se"), "beats_teacher": _holds(vs_teacher, +1)}
                if model != CONTROL:  # the erasing's own effect: the same recipe without it
                    vs_control = compare(per, "this", "control")
                    row.update(vs_control=vs_control.get("diff"), vs_control_se=vs_control.get("diff_se"),
                               beats_control=_holds(vs_control, +1))
                if v != "default":
                    vs_default = compare(per, "this", "default")
                    row.update(vs_default=vs_default.get("diff"), vs_default_se=vs_default.get("diff_se"),
                               beats_default=_holds(vs_default, +1))
                rows.append(row)
    teacher = {ts: compare({"t": acc[("default", "teacher", ts)]}, "t", "t") for ts in TESTS}

    def pm(d: float | None, se: float | None) -> str:
        return "" if d is None else f"{d:+.4f} +- {se:.4f}"

    lines = ["| test | variant | model | mean +- std | vs teacher | beats teacher | vs no-erasing | beats it "
             "| vs default | beats default |", "|---|---|---|---|---|---|---|---|---|---|"]
    for ts in TESTS:
        lines.append(f"| {ts} | | teacher | {teacher[ts]['mean']:.4f} +- {teacher[ts]['std']:.4f} | | | | | | |")
        for r in (r for r in rows if r["test"] == ts):
            lines.append(f"| {ts} | {r['variant']} | {r['model']} | {r['mean']:.4f} +- {r['std']:.4f} | "
                         f"{pm(r['vs_teacher'], r['vs_teacher_se'])} | {r['beats_teacher']} | "
                         f"{pm(r.get('vs_control'), r.get('vs_control_se'))} | {r.get('beats_control', '')} | "
                         f"{pm(r.get('vs_default'), r.get('vs_default_se'))} | {r.get('beats_default', '')} |")
    print("\n".join(lines))
    report_timing_and_json(args.seeds, seconds, t0, "variant", args.json,
                           {"variants": {v: VARIANTS[v] for v in variants}, "teacher": teacher, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
