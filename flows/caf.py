"""The CAF flow: train the critic-free baseline and CAF on a valence/arousal table, evaluate both.

train-baseline -> eval-baseline, train-caf -> eval-caf, then results.json (the paper's Table 1 columns).
Every box is a stage (flows.prefect_tasks.stage): a rerun after a failure or a kill reuses the finished
stages and resumes an interrupted training from its last.pt.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import fsspec
from prefect import flow

from flows.config import build_dataclass
from flows.prefect_tasks import stage
from flows.stage import Run
from storage.artifact import join


def _train(cfg: Any, train_uri: str):
    def fn(out: str) -> None:
        from tasks.caf import train_caf

        train_caf(cfg, train_uri, out)

    return fn


def _evaluate(model_uri: str, test_uri: str, splits: Sequence[str] | None, device: str):
    def fn(out: str) -> None:
        from tasks.caf import evaluate_va
        from tasks.checkpoint import atomic_write_bytes, dumps_json

        m = evaluate_va(model_uri, test_uri, splits, device=device, scatter_png=join(out, "scatter.png"))
        atomic_write_bytes(join(out, "metrics.json"), dumps_json(m).encode())

    return fn


@flow(name="caf")
def caf_flow(
    train_uri: str,
    out: str,
    test_uri: str | None = None,
    test_splits: list[str] | None = None,
    config: dict[str, Any] | None = None,
    compare: bool = True,
) -> dict[str, Any]:
    """Baseline vs CAF (``compare``) or one model; ``config`` overrides tasks.caf.CAFConfig fields.

    ``test_uri`` defaults to ``train_uri`` and ``test_splits`` to ["test"]; returns and writes
    ``<out>/results.json`` with the 8 metrics per model.
    """
    from tasks.caf import CAFConfig

    cfg = build_dataclass(CAFConfig, dict(config or {}), "caf")
    test_uri = test_uri or train_uri
    splits = list(test_splits) if test_splits is not None else ["test"]
    run = Run(out)
    variants = ([("baseline", dataclasses.replace(cfg, critic=False)), ("caf", dataclasses.replace(cfg, critic=True))]
                if compare else [("caf" if cfg.critic else "baseline", cfg)])
    rows: dict[str, Any] = {}
    for name, c in variants:
        tr = stage(run, f"train-{name}", c, {"train": train_uri}, _train(c, train_uri))
        ev = stage(run, f"eval-{name}", {"splits": splits, "device": c.device}, {"model": tr.uri, "test": test_uri},
                   _evaluate(tr.uri, test_uri, splits, c.device))
        with fsspec.open(join(ev.uri, "metrics.json"), "r") as f:
            rows[name] = {**json.load(f), "checkpoint": tr.uri, "scatter_png": join(ev.uri, "scatter.png")}
    result = {"train_uri": train_uri, "test_uri": test_uri, "test_splits": splits, "rows": rows}
    with fsspec.open(join(run.root, "results.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    return result
