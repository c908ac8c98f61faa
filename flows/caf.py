"""The CAF flow: train the critic-free baseline and CAF on a valence/arousal table, evaluate both.

train-baseline -> eval-baseline, train-caf -> eval-caf, then results.json / results.md (the paper's
Table 1 columns) and, inside a flow run, the same table as Prefect artifacts (flows.results). The table
defaults to ``"synthetic"``: the embedded synthetic data set, generated once under ``<out>/data`` and
reused. Every box is a stage (flows.prefect_tasks.stage): a rerun after a failure or a kill reuses the
finished stages and resumes an interrupted training from its last.pt.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import fsspec
from prefect import flow

from flows.config import build_dataclass
from flows.prefect_tasks import stage
from flows.results import markdown_table, publish_artifacts
from flows.stage import Run
from storage.artifact import is_finished, join

SYNTHETIC = "synthetic"  # the word that stands for the embedded synthetic data set (as in flows.pt)


def synthetic_table(out: str, size: int, options: dict[str, Any] | None = None) -> str:
    """The synthetic valence/arousal table of a CAF run: tasks.caf.method.synthetic_table (tasks.caf.method.SYNTHETIC_DATA
    over ``options``, storage.synthetic.SyntheticConfig fields), generated once under ``<out>/data`` (the
    folder is named by the generator's config) and then reused. ValueError for unknown or mistyped options.
    """
    from tasks.caf.method import synthetic_table as generate_once

    return generate_once(out, size, options)


def metric_label(key: str) -> str:
    """'rmse_v' -> 'RMSE V': the column names of the paper's Table 1."""
    metric, _, dim = key.partition("_")
    return f"{metric.upper()} {dim.upper()}"


def results_records(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per model (the 8 metrics, 4 decimals, and n): the rows of the results artifacts."""
    from tasks.caf.va_metrics import VA_METRICS

    out = []
    for name, m in rows.items():
        rec: dict[str, Any] = {"model": name}
        for k in VA_METRICS:
            v = m.get(k)
            rec[metric_label(k)] = None if v is None else round(float(v), 4)
        rec["n"] = m.get("n")
        out.append(rec)
    return out


def _train(cfg: Any, train_uri: str):
    def fn(out: str) -> None:
        from tasks.caf.method import train_caf

        train_caf(cfg, train_uri, out)

    return fn


def _evaluate(model_uri: str, test_uri: str, splits: Sequence[str] | None, device: str):
    def fn(out: str) -> None:
        from tasks.caf.method import evaluate_va
        from tasks.engine.checkpoint import atomic_write_bytes, dumps_json

        m = evaluate_va(model_uri, test_uri, splits, device=device, scatter_png=join(out, "scatter.png"))
        atomic_write_bytes(join(out, "metrics.json"), dumps_json(m).encode())

    return fn


def caf_stages(run: Run, cfg: Any, train_uri: str, test_uri: str, splits: Sequence[str] | None, *,
               compare: bool = True, prefix: str = "") -> dict[str, dict[str, Any]]:
    """CAF's stages in ``run`` (names prefixed by ``prefix`` inside a round): train and evaluate the
    critic-free baseline and CAF (``compare``), or the one model ``cfg`` describes; metrics per model."""
    variants = ([("baseline", dataclasses.replace(cfg, critic=False)), ("caf", dataclasses.replace(cfg, critic=True))]
                if compare else [("caf" if cfg.critic else "baseline", cfg)])
    rows: dict[str, dict[str, Any]] = {}
    for name, c in variants:
        tr = stage(run, f"{prefix}train-{name}", c, {"train": train_uri}, _train(c, train_uri), compute=True)
        ev = stage(run, f"{prefix}eval-{name}", {"splits": None if splits is None else list(splits), "device": c.device},
                   {"model": tr.uri, "test": test_uri}, _evaluate(tr.uri, test_uri, splits, c.device), compute=True)
        with fsspec.open(join(ev.uri, "metrics.json"), "r") as f:
            rows[name] = {**json.load(f), "checkpoint": tr.uri, "scatter_png": join(ev.uri, "scatter.png")}
    return rows


@flow(name="caf")
def caf_flow(
    train_uri: str = SYNTHETIC,
    out: str = "runs/caf",
    test_uri: str | None = None,
    test_splits: list[str] | None = None,
    config: dict[str, Any] | None = None,
    compare: bool = True,
    synthetic_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Baseline vs CAF (``compare``) or one model; ``config`` overrides tasks.caf.method.CAFConfig fields.

    ``train_uri="synthetic"`` (the default; also accepted as ``test_uri``) generates the embedded
    synthetic data set under ``<out>/data`` at the config's input size (``synthetic_options``:
    storage.synthetic.SyntheticConfig fields over tasks.caf.method.SYNTHETIC_DATA); training on it, ``config``
    overrides tasks.caf.method.SYNTHETIC_RECIPE (what `fermine caf OUT --compare` and benchmarks run).
    ``test_uri`` defaults to ``train_uri`` and ``test_splits`` to ["test"]; returns and writes ``<out>/results.json`` with the
    8 metrics per model, ``<out>/results.md``, and the Prefect artifacts ``caf-results`` (table) and
    ``caf-summary`` (markdown).
    """
    from tasks.caf.method import SYNTHETIC_RECIPE, CAFConfig

    recipe = SYNTHETIC_RECIPE if train_uri == SYNTHETIC else {}
    cfg = build_dataclass(CAFConfig, {**recipe, **dict(config or {})}, "caf")  # a mistyped setting fails first
    if is_finished(out):
        raise ValueError(f"out {out} is a finished artifact (an image table?); give a folder for the run")
    synth = None
    if SYNTHETIC in (train_uri, test_uri):
        synth = synthetic_table(out, cfg.input_size, synthetic_options)
    train_uri = synth if train_uri == SYNTHETIC else train_uri
    test_uri = synth if test_uri == SYNTHETIC else (test_uri or train_uri)
    splits = list(test_splits) if test_splits is not None else ["test"]
    run = Run(out)
    rows = caf_stages(run, cfg, train_uri, test_uri, splits, compare=compare)
    what = "baseline (no critic) vs CAF" if compare else next(iter(rows))
    result = {"train_uri": train_uri, "test_uri": test_uri, "test_splits": splits, "rows": rows}
    with fsspec.open(join(run.root, "results.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    records = results_records(rows)
    where = f"{test_uri} [{', '.join(splits) if splits else 'all rows'}]"
    md = f"# caf\n\nValence/arousal, {what}: tested on {where}, trained on {train_uri}.\n\n{markdown_table(records)}\n"
    with fsspec.open(join(run.root, "results.md"), "w") as f:
        f.write(md)
    publish_artifacts("caf", records, md, description=f"valence/arousal on {where}")
    return result
