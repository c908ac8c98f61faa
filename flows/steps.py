"""Stage bodies for the flows: each returns ``fn(out_uri)`` that calls one tasks/workers function.

Keeping these closures separate from the flow wiring keeps flows/round.py a readable DAG and
lets every pipeline reuse the same stage bodies.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence

import fsspec

from flows.config import ConfigError, DataSource, RaySection, build_dataclass
from storage.artifact import join

StageFn = Callable[[str], Any]
TABLE = "table"  # DataSource.format of a finished image table used as is (no ingest, no align stage)


# ---- configs --------------------------------------------------------------------------------
def train_config(overrides: Mapping[str, Any], seed: int, section: str):
    from tasks.train import TrainConfig

    return build_dataclass(TrainConfig, {"seed": seed, **overrides}, section)


def align_config(overrides: Mapping[str, Any], section: str = "align"):
    from tasks.align import AlignConfig

    return build_dataclass(AlignConfig, dict(overrides), section)


def attack_config(overrides: Mapping[str, Any], seed: int):
    from tasks.pasm.attack import AttackConfig

    return build_dataclass(AttackConfig, {"seed": seed, **overrides}, "attack").validate()


def pasm_config(overrides: Mapping[str, Any], teacher_cfg: Any, attack_cfg: Any):
    """PASM's settings; its training and attack recipes are the run's teacher and attack sections."""
    from tasks.pasm.student import PasmConfig

    for nested in ("train", "attack"):
        if nested in overrides:
            raise ConfigError(f"pasm.{nested}: set these in the run config's `{'teacher' if nested == 'train' else nested}` section")
    cfg = build_dataclass(PasmConfig, dict(overrides), "pasm")
    return replace(cfg, train=teacher_cfg, attack=attack_cfg).validate()


def round_attack_config(attack_cfg: Any, r: int):
    """Round r's attack: its own seed (round 1 keeps the run's), so rounds do not replay one search."""
    return replace(attack_cfg, seed=attack_cfg.seed + r - 1)


def baseline_config(teacher_cfg: Any, seed: int, random_erasing: float = 0.0):
    from tasks.pasm.student import baseline_train_config

    return baseline_train_config(teacher_cfg, seed, random_erasing)


def cam_config(splits: Sequence[str]):
    from tasks.pasm.cam import CamConfig

    return CamConfig(splits=tuple(splits))


def erase_config(pasm_cfg: Any, *, random_position: bool, seed: int):
    from tasks.pasm.student import erase_config_for

    return erase_config_for(pasm_cfg, random_position=random_position, seed=seed,
                            image_size=pasm_cfg.train.input_size)


def student_config(teacher_cfg: Any, pasm_cfg: Any, seed: int):
    from tasks.pasm.student import student_train_config

    return student_train_config(teacher_cfg, pasm_cfg, seed=seed)


def centroid_config(overrides: Mapping[str, Any]):
    from tasks.omni.centroids import CentroidConfig

    return build_dataclass(CentroidConfig, dict(overrides), "centroids")


def mine_config(overrides: Mapping[str, Any]):
    from tasks.omni.mine import MineConfig

    return build_dataclass(MineConfig, dict(overrides), "mine")


def run_mine_config(cfg: Any):
    """The run's mining settings. Without a pool of its own, the labeled source's "pool" split is mined
    (never its train or test rows) unless ``mine.splits`` names others."""
    return mine_config(cfg.mine if cfg.pool is not None else {"splits": ["pool"], **cfg.mine})


def run_distill_config(cfg: Any, retrain_cfg: Any):
    """DAS are distilled for the network and input size they are retrained with, unless the run's
    ``distill`` section names others: images learned for another network teach this one little."""
    return distill_config({"arch": retrain_cfg.arch, "image_size": retrain_cfg.input_size, **cfg.distill}, cfg.seed)


def distill_config(overrides: Mapping[str, Any], seed: int):
    from tasks.omni.distill import DistillConfig

    return build_dataclass(DistillConfig, {"seed": seed, **overrides}, "distill")


def check_source(src: DataSource, where: str, check_paths: bool = True) -> None:
    """A data source's format, options and (``check_paths``) ROOT, checked before any stage runs (ConfigError)."""
    import os

    from storage.readers import check_options, get_reader

    if src.format == TABLE:
        from storage.artifact import is_finished

        if src.options or src.align:
            raise ConfigError(f"{where}: a table source is used as it is: drop its options/align "
                              "(align it with `fermine align` first if it needs it)")
        if not src.root:
            raise ConfigError(f"{where}.root: format table needs the image table's folder")
        if check_paths and not is_finished(src.root):
            raise ConfigError(f"{where}.root: no finished image table at {src.root}; check the path, or make it "
                              "with `fermine ingest` / `fermine align`")
        return
    try:
        get_reader(src.format)
        check_options(src.format, src.options)
    except KeyError as e:
        raise ConfigError(f"{where}.format: {e.args[0]}") from None
    except ValueError as e:
        raise ConfigError(f"{where}.options: {e}") from None
    if src.format != "synthetic" and check_paths:
        if not src.root:
            raise ConfigError(f"{where}.root: format {src.format} needs the data set's folder or file")
        if "://" not in src.root and not os.path.exists(src.root):
            raise ConfigError(f"{where}.root: {src.root} does not exist (format {src.format})")


def resolve_configs(cfg: Any, check_paths: bool = True) -> dict[str, Any]:
    """Every stage config of a run, defaults filled in; raises ConfigError/ValueError before any work starts.

    ``check_paths=False`` skips the data sets' ROOTs (validating a config written for another machine).
    """
    sources = {"labeled": cfg.labeled, **({"pool": cfg.pool} if cfg.pool is not None else {}),
               **{f"cross[{i}]": src for i, src in enumerate(cfg.cross)}}
    for where, src in sources.items():
        check_source(src, where, check_paths)
        if src.align:
            align_config({**cfg.align, **src.align}, f"{where}.align")
    if cfg.teacher_checkpoint and check_paths:
        from tasks.engine.checkpoint import checkpoint_exists

        if not checkpoint_exists(cfg.teacher_checkpoint):
            raise ConfigError(f"teacher_checkpoint: no finished checkpoint at {cfg.teacher_checkpoint} "
                              "(model.json + model.pt); train one with `fermine train`")
    teacher = train_config(cfg.teacher, cfg.seed, "teacher")
    retrain = train_config({**cfg.teacher, **cfg.retrain}, cfg.seed, "retrain")
    attack = attack_config(cfg.attack, cfg.seed)
    if cfg.pipeline == "evaluate" and not cfg.model:
        raise ConfigError("pipeline 'evaluate' needs `model`: a checkpoint folder (--set model=PATH)")
    from flows.methods import METHODS, method_options, round_options

    in_round = cfg.round_methods()  # `methods` outside pipeline round is refused here
    methods = {name: round_options(cfg, name) if name in in_round and cfg.pipeline != name
               else method_options(cfg, name)
               for name in METHODS if cfg.pipeline == name or name in in_round or getattr(cfg, name)}
    return {**methods,
        "align": align_config(cfg.align),
        "teacher": teacher,
        "retrain": retrain,
        "attack": attack,
        "pasm": pasm_config(cfg.pasm, teacher, attack),
        "centroids": centroid_config({}),
        "mine": run_mine_config(cfg),
        "distill": run_distill_config(cfg, retrain),
    }


# ---- helpers --------------------------------------------------------------------------------
def read_json(uri: str, name: str) -> dict[str, Any]:
    with fsspec.open(join(uri, name), "r") as f:
        return json.load(f)


def write_json(uri: str, name: str, data: Any) -> None:
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(path, exist_ok=True)
    with fsspec.open(join(uri, name), "w") as f:
        json.dump(data, f, indent=2, default=str)


def first_png(uri: str) -> str | None:
    fs, path = fsspec.core.url_to_fs(uri)
    pngs = sorted(fs.glob(f"{path}/*.png"))
    return pngs[0] if pngs else None


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect task-run logger inside a flow (lines show in the terminal and the UI), else ours."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # called outside a task run (tests, plain scripts)
        return logging.getLogger("fermine.stage")


def epoch_logger(name: str, total: int) -> Callable[[dict], None]:
    """Progress for training stages: one line per finished epoch."""
    log = _logger()

    def cb(rec: dict) -> None:
        extra = f", val acc {rec['val_accuracy']:.3f}" if "val_accuracy" in rec else ""
        log.info("%s: epoch %d/%d, loss %.3f%s (%.0f s)", name, rec.get("epoch", 0), total,
                 rec.get("loss", float("nan")), extra, rec.get("seconds", 0.0))

    return cb


def shard_logger(name: str, total: int) -> Callable[[int, Any, int], None]:
    """Progress for Ray stages: one line per finished shard, with rows kept and rejected."""
    log = _logger()
    done = [0]

    def cb(index: int, info: Any, rejected: int) -> None:
        done[0] += 1
        log.info("%s: shard %d done (%d/%d this run), %d rows, %d rejected", name, index, done[0], total,
                 getattr(info, "rows", 0), rejected)

    return cb


def connect_ray(section: RaySection) -> None:
    from workers.cluster import RayConfig, connect

    connect(RayConfig(address=section.address, num_cpus=section.num_cpus, log_to_driver=section.log_to_driver))


def _pool(section: RaySection, gpu: bool):
    from workers.sharded import PoolConfig

    return PoolConfig(num_actors=section.workers, num_cpus=section.cpus_per_worker,
                      num_gpus=section.gpus_per_worker if gpu else 0.0, wait_s=section.wait_for_resources_s)


# ---- stage bodies ---------------------------------------------------------------------------
def _committed(out: str) -> bool:
    """True when an earlier attempt committed ``out`` and was killed before its stage record.

    The folder is named by the stage's identity, so what it holds was made from the same inputs,
    settings and code: it is kept, not refused and not recomputed.
    """
    from storage.artifact import is_finished

    return is_finished(out)


def ingest(src: DataSource, ray_section: RaySection | None = None) -> StageFn:
    """Read a data set into an image table. With ``ray_section`` and a source with random access
    (storage.readers.Splittable: an indexed RecordIO, a folder tree, a csv), in parts of
    ``rows_per_shard`` entries on the run's Ray workers, resumable part by part; else in this process."""
    def fn(out: str) -> None:
        from storage.ingest import write_image_table
        from storage.readers import get_reader, get_splittable

        if _committed(out):
            return
        stage, config = f"ingest.{src.format}", src.ingest_config()
        split = get_splittable(src.format) if ray_section is not None and src.parallel else None
        entries = split.entries(src.root, **src.options) if split is not None else None
        if entries is None:
            records = get_reader(src.format)(src.root, **src.options)
            write_image_table(records, out, stage=stage, config=config, rows_per_shard=src.rows_per_shard)
            return
        from workers.ingest import ingest_parts, part_count

        connect_ray(ray_section)
        ingest_parts(split.read_entries, entries, out, stage=stage, config=config, part_size=src.rows_per_shard,
                     pool=_pool(ray_section, gpu=False),
                     on_part=shard_logger(stage, part_count(len(entries), src.rows_per_shard)))

    return fn


def align(cfg: Any, in_uri: str, ray_section: RaySection) -> StageFn:
    def fn(out: str) -> None:
        from workers.align import align_artifact

        from storage.artifact import Artifact

        connect_ray(ray_section)
        align_artifact(in_uri, out, cfg, pool=_pool(ray_section, gpu=False),
                       on_shard=shard_logger("align", Artifact(in_uri).num_shards))

    return fn


def train(cfg: Any, uris: Sequence[str], teacher_uri: str | None = None) -> StageFn:
    def fn(out: str) -> None:
        from tasks.train import train as run_train

        run_train(cfg, list(uris), out, progress=epoch_logger("train", cfg.epochs))

    fn.workers = cfg.workers  # type: ignore[attr-defined]  # the supervised method trains data-parallel
    return fn


def evaluate(checkpoint_uri: str, sets: Mapping[str, tuple[str, tuple[str, ...] | None]]) -> StageFn:
    def fn(out: str) -> None:
        from tasks.evaluate import evaluate as run_eval
        from tasks.evaluate import save_confusion_png
        from tasks.figures import draw_safely

        metrics: dict[str, Any] = {}
        results = {}
        for name, (uri, splits) in sets.items():
            res = results[name] = run_eval(checkpoint_uri, uri, splits=splits)
            metrics[name] = res.to_dict()
        write_json(out, "metrics.json", metrics)
        for name in sets:  # figures after the metrics: a figure error never loses them
            draw_safely(f"confusion {name}", save_confusion_png, results[name], join(out, f"confusion-{name}.png"),
                        title=name)

    return fn


def attack(cfg: Any, teacher_uri: str, table_uri: str, ray_section: RaySection) -> StageFn:
    def fn(out: str) -> None:
        from workers.attack import attack_artifact

        from storage.artifact import Artifact

        connect_ray(ray_section)
        attack_artifact(teacher_uri, table_uri, out, cfg, pool=_pool(ray_section, gpu=True),
                        on_shard=shard_logger("attack", Artifact(table_uri).num_shards))

    return fn


def erase(cfg: Any, table_uri: str, positions_uri: str | None) -> StageFn:
    """Erase at the attack's positions, or at random positions when ``positions_uri`` is None."""
    def fn(out: str) -> None:
        from tasks.pasm.erase import erase_table

        if not _committed(out):
            erase_table(table_uri, positions_uri, out, cfg)

    return fn


def student(train_cfg: Any, pasm_cfg: Any, erased_uri: str, images_uri: str, teacher_uri: str) -> StageFn:
    def fn(out: str) -> None:
        from tasks.pasm.student import train_student

        train_student(train_cfg, pasm_cfg, erased_uri, images_uri, teacher_uri, out,
                      progress=epoch_logger("student", train_cfg.epochs))

    fn.workers = train_cfg.workers  # type: ignore[attr-defined]  # the supervised method, as train
    return fn


def cam(cfg: Any, teacher_uri: str, table_uri: str) -> StageFn:
    def fn(out: str) -> None:
        from tasks.pasm.cam import cam_table

        if not _committed(out):
            cam_table(teacher_uri, table_uri, out, cfg)

    return fn


def pasm_figure(rows: list[dict[str, str]], images_uri: str) -> StageFn:
    def fn(out: str) -> None:
        from tasks.figures import draw_safely
        from tasks.pasm.figure import pasm_figure as draw

        draw_safely("PASM rounds", draw, images_uri, [r["erased"] for r in rows], join(out, "pasm-rounds.png"))

    return fn


def centroids(cfg: Any, model_uri: str, labeled_uri: str) -> StageFn:
    def fn(out: str) -> None:
        from tasks.omni.centroids import compute_centroids

        compute_centroids(model_uri, labeled_uri, out, cfg)

    return fn


def mine(cfg: Any, model_uri: str, centroids_uri: str, pool_uri: str, ray_section: RaySection,
         tests: Mapping[str, tuple[str, tuple[str, ...] | None]]) -> StageFn:
    """Mine the pool; refused before any work when its mined rows share ids with a test set."""
    def fn(out: str) -> None:
        from tasks.figures import draw_safely
        from tasks.omni.mine import check_disjoint
        from tasks.omni.figure import mined_grid
        from workers.mine import mine_pool

        from storage.artifact import Artifact

        check_disjoint(pool_uri, cfg.splits, dict(tests))
        connect_ray(ray_section)
        mine_pool(model_uri, centroids_uri, pool_uri, out, cfg, workers=ray_section.workers,
                  cpus_per_worker=ray_section.cpus_per_worker,
                  gpus_per_worker=ray_section.gpus_per_worker,  # 0 = CPU actors, as the config says
                  on_shard=shard_logger("mine", Artifact(pool_uri).num_shards))
        draw_safely("mined samples", mined_grid, out, join(out, "mined-samples.png"))

    return fn


def distill(cfg: Any, table_uri: str) -> StageFn:
    def fn(out: str) -> None:
        from tasks.omni.distill import distill as run_distill

        log, every = _logger(), max(1, cfg.outer_steps // 10)

        def progress(rec: dict) -> None:
            if rec["step"] % every == 0:
                log.info("distill: step %d, loss %.3f, real acc %.3f", rec["step"], rec["loss"], rec["real_acc"])

        run_distill(table_uri, out, cfg, progress=progress)

    return fn

