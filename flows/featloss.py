"""The handcrafted-feature-loss flow: features once -> one training per variant -> evaluation -> results table.

Stages (each a flows.prefect_tasks.stage, so a rerun reuses finished ones and resumes an interrupted
training from its last.pt): ``data-synthetic`` (only without a table), ``features`` (GABOR, GSF and
SIFT of every image, tasks.featloss.handcrafted: computed once and shared by every variant), ``train-<variant>``
and ``eval-<variant>`` (five-crop + mirror voting, Eq. 12). The table compares the variants of
tasks.featloss.method.VARIANTS (default: no feature loss, GABOR, GSF, SIFT, fixed and adaptive weighting)
and is published as results.json / results.md and Prefect artifacts (flows.results).
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any, Sequence

import fsspec
from prefect import flow

from flows.config import build_dataclass
from flows.prefect_tasks import stage
from flows.results import ResultsTable, publish_results
from flows.stage import Run
from storage.artifact import join



def synthetic_options(options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The generator options of the default data set: tasks.featloss.method.SYNTHETIC_DATA (the generator's default
    faces, a validation split for adaptive weighting, generated at the load size so that the five crops
    need no resize) under ``options``."""
    from tasks.featloss.method import SYNTHETIC_DATA

    return {**SYNTHETIC_DATA, **(options or {})}


def _synthetic(options: dict[str, Any]):
    def fn(out: str) -> None:
        import dataclasses

        from storage.ingest import write_image_table
        from storage.synthetic import config_from_options, generate

        cfg = config_from_options(**options)
        write_image_table(generate(cfg), out, stage="ingest", config={"format": "synthetic", **dataclasses.asdict(cfg)})

    return fn


def _features(table_uri: str, cfg: Any, num_classes: int):
    def fn(out: str) -> None:
        from tasks.featloss.handcrafted import compute_features

        compute_features(table_uri, out, cfg, num_classes=num_classes)

    return fn


def _train(cfg: Any, table_uri: str, features_uri: str):
    def fn(out: str) -> None:
        from tasks.featloss.method import train_featloss

        train_featloss(cfg, table_uri, features_uri if cfg.features else None, out)

    return fn


def _evaluate(model_uri: str, test_uri: str, splits: Sequence[str], device: str):
    def fn(out: str) -> None:
        from tasks.engine.checkpoint import atomic_write_bytes, dumps_json
        from tasks.featloss.method import evaluate_featloss

        m = evaluate_featloss(model_uri, test_uri, splits, device=device)
        atomic_write_bytes(join(out, "metrics.json"), dumps_json(m).encode())

    return fn


def synthetic_table(run: Run, options: dict[str, Any] | None = None) -> str:
    """The default synthetic data set as a stage of ``run`` (generated once, then reused)."""
    opts = synthetic_options(options)
    return stage(run, "data-synthetic", opts, {}, _synthetic(opts)).uri


def featloss_configs(config: dict[str, Any], variants: Sequence[str] | None = None,
                     features_config: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any], Any]:
    """(the base FeatLossConfig, one config per variant, the HandcraftedConfig), validated (ConfigError)
    before any work: unknown variant names and mistyped settings fail here. ``variants`` defaults to
    tasks.featloss.method.DEFAULT_VARIANTS; the features' size and fit splits to the training's."""
    from tasks.featloss.handcrafted import HandcraftedConfig
    from tasks.featloss.method import DEFAULT_VARIANTS, FeatLossConfig, variant_config

    base = build_dataclass(FeatLossConfig, config, "featloss.config")
    cfgs = {n: variant_config(n, base) for n in (list(variants) if variants else list(DEFAULT_VARIANTS))}
    hcfg = build_dataclass(HandcraftedConfig, {"size": base.input_size, "fit_splits": list(base.train_splits),
                                                **(features_config or {})}, "featloss.features_config")
    return base, cfgs, hcfg


def featloss_stages(run: Run, cfgs: dict[str, Any], hcfg: Any, table: str, test: str, splits: Sequence[str], *,
                    prefix: str = "") -> tuple[ResultsTable, dict[str, str]]:
    """The feature-loss stages in ``run`` (names prefixed by ``prefix`` inside a round): the handcrafted
    features once, then a training and an evaluation per variant of ``cfgs``; the results and artifacts."""
    from tasks.engine.checkpoint import read_meta
    from tasks.featloss.method import VARIANT_TITLES

    num_classes = next(iter(cfgs.values())).num_classes
    feats = None
    if any(c.features for c in cfgs.values()):
        feats = stage(run, f"{prefix}features", hcfg, {"table": table}, _features(table, hcfg, num_classes), compute=True).uri
    results = ResultsTable()
    uris: dict[str, str] = {"table": table, **({"features": feats} if feats else {})}
    for name, c in cfgs.items():
        inputs = {"table": table, **({"features": feats} if c.features and feats else {})}
        tr = stage(run, f"{prefix}train-{name}", c, inputs, _train(c, table, feats or ""), compute=True)
        ev = stage(run, f"{prefix}eval-{name}", {"splits": splits, "device": c.device}, {"model": tr.uri, "test": test},
                   _evaluate(tr.uri, test, splits, c.device), compute=True)
        with fsspec.open(join(ev.uri, "metrics.json"), "r") as f:
            m = json.load(f)
        meta = read_meta(tr.uri)  # the engine's model.json
        results.add(name, {
            "test (5-crop + mirror vote)": {"accuracy": m["accuracy"], "mean_class_accuracy": m["mean_class_accuracy"]},
            "test (centre crop)": {"accuracy": m["accuracy_center"],
                                   "mean_class_accuracy": m["mean_class_accuracy_center"]},
            "val (vote)": {"accuracy": (meta["metrics"].get("val") or {}).get("accuracy")},
            "method": VARIANT_TITLES.get(name, name),
            "lambdas": meta.get("lambdas"),
            "train_seconds": meta["metrics"].get("train_seconds"),
            "checkpoint": tr.uri,
        })
        uris[f"model-{name}"] = tr.uri
    return results, uris


@flow(name="featloss")
def featloss_flow(
    out: str,
    table_uri: str | None = None,
    test_uri: str | None = None,
    test_splits: list[str] | None = None,
    variants: list[str] | None = None,
    config: dict[str, Any] | None = None,
    features_config: dict[str, Any] | None = None,
    synthetic: dict[str, Any] | None = None,
    report: bool = True,
) -> dict[str, Any]:
    """Compare feature-loss variants on ``table_uri`` (default: the synthetic data set, generated under OUT).

    ``config`` overrides tasks.featloss.method.FeatLossConfig training fields (the variant fixes the
    feature/structure/weighting fields), on top of tasks.featloss.method.SYNTHETIC_RECIPE when the data is the
    synthetic set; ``features_config`` overrides tasks.featloss.handcrafted.HandcraftedConfig (its size defaults to
    the config's input_size); ``synthetic`` overrides synthetic_options() (its size defaults to the load
    size). bench/fidelity.py runs it once per seed (pipeline: featloss).
    ``test_uri`` defaults to the table and ``test_splits`` to ["test"]. Returns the published summary.
    """
    from tasks.featloss.method import SYNTHETIC_RECIPE

    recipe = SYNTHETIC_RECIPE if table_uri is None else {}
    base, cfgs, hcfg = featloss_configs({**recipe, **dict(config or {})}, variants, features_config)
    run = Run(out)
    table = table_uri or synthetic_table(run, {"size": base.load_size, **(synthetic or {})})
    test = test_uri or table
    splits = list(test_splits) if test_splits is not None else ["test"]
    results, uris = featloss_stages(run, cfgs, hcfg, table, test, splits)
    summary = publish_results(run, SimpleNamespace(name="featloss", report=report), results, {}, uris)
    summary.update(test_uri=test, test_splits=splits, config=base.to_dict(), features_config=hcfg.to_dict())
    return summary
