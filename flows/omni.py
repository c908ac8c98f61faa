"""The Omni-supervised FER pipeline (Liu et al., Sec. 3-4) end to end without Prefect (`fermine omni`).

    primitive learner (labeled set)  ->  centroids (Eq. 4)  ->  mine the pool (Eq. 5-6) = VAS
        ->  distil VAS (Eq. 8) = DAS  ->  retrain on labeled + VAS and on labeled + DAS
        ->  evaluate baseline / VAS / DAS, inner and cross data set: one table (the paper's Tables 1 and 4)

Every stage writes an artifact or checkpoint under ``out_uri`` and is skipped when it is already
finished with the same inputs and settings (artifacts by identity, checkpoints by the trainer's own
resume), so a rerun after a crash redoes only what did not finish.

Layout of ``out_uri``: primitive/ (baseline checkpoint), centroids/, vas/ (auxiliary samples; an image
table), das/ (distilled images + distilled.png), retrain_vas/, retrain_das/, mined.png (Fig. 3),
results.json and results.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Mapping

from storage.artifact import _fs, join
from tasks.omni.centroids import CentroidConfig
from tasks.omni.distill import DistillConfig
from tasks.omni.mine import MineConfig
from tasks.train import TrainConfig

METHODS = ("baseline", "VAS", "DAS")


@dataclass(frozen=True)
class OmniConfig:
    train: TrainConfig = TrainConfig()  # primitive learner and both retrainings (same recipe: a fair comparison)
    centroids: CentroidConfig = CentroidConfig()
    mine: MineConfig = MineConfig()
    distill: DistillConfig = DistillConfig()
    distill_image_size: int | None = None  # None: the training input size (DAS are then used at full size)
    inner_splits: tuple[str, ...] = ("test",)  # labeled table's rows for the inner-data-set column
    cross_splits: tuple[str, ...] | None = None  # cross data sets: None = every labeled row (e.g. all of CK+)
    workers: int | None = None  # mining actors (default: one per GPU, else one per 2 CPUs)
    ray_address: str | None = None  # None: a local Ray instance
    figure_per_class: int = 8  # faces per row of the Fig. 3 grid
    eval_batch_size: int = 256


@dataclass
class OmniResult:
    out_uri: str
    rows: list[dict[str, Any]]  # one per method: {"method", "train_rows", <test name>: {accuracy, mean_class_accuracy}}
    tests: list[str]
    mined: dict[str, Any]  # counts, kept, examined
    distilled: dict[str, Any]  # step sizes, hold-out score
    checkpoints: dict[str, str]
    figures: dict[str, str] = field(default_factory=dict)

    def markdown(self) -> str:
        return results_markdown(self.rows, self.tests)


def results_markdown(rows: list[dict[str, Any]], tests: list[str]) -> str:
    """Accuracy / mean class accuracy per method and test set, like the paper's Tables 1 and 4."""
    head = "| method | " + " | ".join(f"{t} acc | {t} mean class acc" for t in tests) + " |"
    sep = "|---|" + "---|---|" * len(tests)
    lines = [head, sep]
    for r in rows:
        cells = []
        for t in tests:
            m = r.get(t) or {}
            cells += [_pct(m.get("accuracy")), _pct(m.get("mean_class_accuracy"))]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def run_omni(
    cfg: OmniConfig,
    labeled_uri: str,
    pool_uri: str,
    out_uri: str,
    *,
    cross: Mapping[str, str] | None = None,
    primitive_checkpoint: str | None = None,
    log: Callable[[str], None] | None = None,
    on_shard: Callable[[int, Any, int], None] | None = None,
) -> OmniResult:
    """Run (or resume) the whole pipeline; ``cross`` maps a test name to an image table (cross data set).

    ``primitive_checkpoint``: use this trained model as primitive learner and baseline instead of
    training one (it must have been trained on ``labeled_uri`` for the comparison to mean anything).
    """
    from tasks.omni.centroids import compute_centroids
    from tasks.engine.checkpoint import atomic_write_bytes, dumps_json
    from tasks.omni.distill import distill
    from tasks.evaluate import evaluate
    from tasks.omni.figure import mined_grid
    from tasks.train import train
    from workers.cluster import RayConfig
    from workers.mine import mine_pool

    say = log or (lambda msg: None)
    cross = dict(cross or {})
    paths = {k: join(out_uri, k) for k in ("primitive", "centroids", "vas", "das", "retrain_vas", "retrain_das")}

    # 1. Primitive learner = the baseline.
    if primitive_checkpoint is None:
        say("training the primitive learner on the labeled set")
        primitive_checkpoint = train(cfg.train, [labeled_uri], paths["primitive"]).checkpoint_uri
    # 2. Centroids (Eq. 4).
    say("class centroids of the primitive learner's features (Eq. 4)")
    compute_centroids(primitive_checkpoint, labeled_uri, paths["centroids"], cfg.centroids)
    # 3. Mining (Eq. 5-6) on Ray.
    say("mining the pool (Eq. 5-6)")
    mined = mine_pool(primitive_checkpoint, paths["centroids"], pool_uri, paths["vas"], cfg.mine,
                      workers=cfg.workers, ray_cfg=RayConfig(address=cfg.ray_address), on_shard=on_shard)
    if mined.kept == 0:
        raise ValueError(
            f"mining kept none of the {mined.examined} pool faces at margin {cfg.mine.margin}"
            + (f" and floor {cfg.mine.floor}" if cfg.mine.floor is not None else "")
            + f": delete {paths['vas']} and rerun with a lower margin (or floor, or with centring); the primitive "
            "learner and the centroids are reused"
        )
    figures = {"mined": join(out_uri, "mined.png")}
    mined_grid(paths["vas"], figures["mined"], per_class=cfg.figure_per_class, size=cfg.train.input_size)
    # 4. Distillation (Eq. 8) of the mined samples.
    say("distilling the mined samples (Eq. 8)")
    dcfg = replace(cfg.distill, image_size=cfg.distill_image_size or cfg.train.input_size,
                   num_classes=cfg.train.num_classes)
    dres = distill(paths["vas"], paths["das"], dcfg)
    figures["distilled"] = dres.grid_uri
    # 5. Retraining with labeled + VAS and labeled + DAS, same recipe as the baseline.
    ckpts = {"baseline": primitive_checkpoint}
    for method, extra_uri, key in (("VAS", paths["vas"], "retrain_vas"), ("DAS", paths["das"], "retrain_das")):
        say(f"retraining on labeled + {method}")
        ckpts[method] = train(cfg.train, [labeled_uri, extra_uri], paths[key]).checkpoint_uri
    # 6. Evaluation: inner (the labeled set's test split) and cross data set.
    tests = {"inner": (labeled_uri, cfg.inner_splits)}
    tests.update({name: (uri, cfg.cross_splits) for name, uri in cross.items()})
    rows = []
    for method in METHODS:
        row: dict[str, Any] = {"method": method, "checkpoint": ckpts[method]}
        for name, (uri, splits) in tests.items():
            say(f"evaluating {method} on {name}")
            r = evaluate(ckpts[method], uri, splits=splits, batch_size=cfg.eval_batch_size, device=cfg.train.device)
            row[name] = {"accuracy": r.accuracy, "mean_class_accuracy": r.mean_class_accuracy, "n": r.n,
                         "per_class": dict(zip(r.classes, r.per_class))}
        rows.append(row)
    result = OmniResult(
        out_uri=out_uri, rows=rows, tests=list(tests),
        mined={"counts": mined.counts, "kept": mined.kept, "examined": mined.examined,
               "undecodable": mined.rejected},
        distilled={"step_sizes": dres.step_sizes, "holdout": dres.holdout},
        checkpoints=ckpts, figures=figures,
    )
    report = {"config": asdict(cfg), "labeled": labeled_uri, "pool": pool_uri, "cross": cross, "results": rows,
              "mined": result.mined, "distilled": result.distilled, "figures": figures}
    atomic_write_bytes(join(out_uri, "results.json"), dumps_json(report).encode())
    atomic_write_bytes(join(out_uri, "results.md"), result.markdown().encode())
    return result


def load_results(out_uri: str) -> dict[str, Any]:
    fs, path = _fs(join(out_uri, "results.json"))
    return json.loads(fs.cat_file(path))
