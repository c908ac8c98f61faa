"""The results table of a run: a row per model, a column per test set and metric.

Published three ways: files in the run folder (results.json, results.md), Prefect artifacts
(a table and a markdown summary in the UI), and the run's HTML report.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping

import fsspec

from flows.stage import Run
from storage.artifact import join

log = logging.getLogger("fermine.results")

# The metric shown per test set: classification accuracy, or CCC for valence/arousal models.
HEADLINE = ("accuracy", "mean_class_accuracy")


class ResultsTable:
    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    def add(self, name: str, metrics: Mapping[str, Any]) -> None:
        self.rows[name] = dict(metrics)

    def columns(self) -> list[tuple[str, str]]:
        cols: list[tuple[str, str]] = []
        for metrics in self.rows.values():
            for test_set, m in metrics.items():
                for key in HEADLINE:
                    if isinstance(m, Mapping) and key in m and (test_set, key) not in cols:
                        cols.append((test_set, key))
        return cols

    def records(self) -> list[dict[str, Any]]:
        out = []
        for name, metrics in self.rows.items():
            rec: dict[str, Any] = {"model": name}
            for test_set, key in self.columns():
                v = metrics.get(test_set, {}).get(key)
                rec[f"{test_set} {key.replace('_', ' ')}"] = None if v is None else round(float(v), 4)
            out.append(rec)
        return out

    def summary(self, name: str) -> str:
        m = self.rows.get(name, {})
        return ", ".join(f"{ts} acc {v.get('accuracy', float('nan')):.3f}" for ts, v in m.items() if isinstance(v, Mapping))

    def markdown(self) -> str:
        recs = self.records()
        if not recs:
            return "_no results_"
        keys = list(recs[0])
        lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in recs:
            lines.append("| " + " | ".join("" if r[k] is None else (f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k])) for k in keys) + " |")
        return "\n".join(lines)


def publish_results(run: Run, cfg: Any, results: ResultsTable, figures: Mapping[str, str | None],
                    uris: Mapping[str, str]) -> dict[str, Any]:
    summary = {
        "name": cfg.name,
        "run": run.root,
        "results": results.records(),
        "metrics": results.rows,
        "figures": {k: v for k, v in figures.items() if v},
        "artifacts": dict(uris),
    }
    with fsspec.open(join(run.root, "results.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    with fsspec.open(join(run.root, "results.md"), "w") as f:
        f.write(f"# {cfg.name}\n\n{results.markdown()}\n")
    _prefect_artifacts(cfg.name, results)
    if getattr(cfg, "report", True):
        from flows.report import build_report

        summary["report"] = build_report(run.root)
    return summary


def _prefect_artifacts(name: str, results: ResultsTable) -> None:
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact
        from prefect.context import FlowRunContext

        if FlowRunContext.get() is None:
            return  # called outside a flow run: files only
        key = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "run"
        create_table_artifact(key=f"{key}-results", table=results.records(), description=f"{name}: results")
        create_markdown_artifact(key=f"{key}-summary", markdown=f"# {name}\n\n{results.markdown()}")
    except Exception as e:  # the UI is a convenience; the files above are the record
        log.warning("could not publish Prefect artifacts: %s", e)
