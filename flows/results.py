"""The results table of a run: a row per model, a column per test set and metric.

Published three ways: files in the run folder (results.json, results.md), Prefect artifacts
(a table and a markdown summary in the UI), and the run's HTML report.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping, Sequence

import fsspec

from flows.stage import Run
from storage.artifact import join

log = logging.getLogger("fermine.results")

# The metric shown per test set: classification accuracy, or CCC for valence/arousal models.
HEADLINE = ("accuracy", "mean_class_accuracy")


SHARED = "teacher"  # the section of a row every section shows (the round's teacher: PASM's and omni's baseline)


class ResultsTable:
    """Models' metrics per test set; a row may belong to a section (the method it reports on)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.section_of: dict[str, str | None] = {}

    def add(self, name: str, metrics: Mapping[str, Any], section: str | None = None) -> None:
        self.rows[name] = dict(metrics)
        self.section_of[name] = section

    def reorder(self, names: Sequence[str]) -> None:
        """Put the rows in the order of ``names`` (rows not named keep their order, after them)."""
        rank = {n: i for i, n in enumerate(names)}
        order = sorted(self.rows, key=lambda n: (rank.get(n, len(rank)), list(self.rows).index(n)))
        self.rows = {n: self.rows[n] for n in order}
        self.section_of = {n: self.section_of.get(n) for n in order}

    def sections(self) -> list[str]:
        """The sections of the rows, first seen first (SHARED is not one of its own)."""
        seen: list[str] = []
        for s in self.section_of.values():
            if s and s != SHARED and s not in seen:
                seen.append(s)
        return seen

    def _names(self, section: str | None) -> list[str]:
        return [n for n in self.rows if section is None or self.section_of.get(n) in (section, SHARED)]

    def columns(self, section: str | None = None) -> list[tuple[str, str]]:
        cols: list[tuple[str, str]] = []
        for name in self._names(section):
            for test_set, m in self.rows[name].items():
                for key in HEADLINE:
                    if isinstance(m, Mapping) and key in m and (test_set, key) not in cols:
                        cols.append((test_set, key))
        return cols

    def records(self, section: str | None = None) -> list[dict[str, Any]]:
        """One record per model (of ``section`` and the shared rows, or every model)."""
        out = []
        columns = self.columns(section)
        for name in self._names(section):
            metrics = self.rows[name]
            rec: dict[str, Any] = {"model": name}
            for test_set, key in columns:
                v = metrics.get(test_set, {}).get(key)
                rec[f"{test_set} {key.replace('_', ' ')}"] = None if v is None else round(float(v), 4)
            out.append(rec)
        return out

    def summary(self, name: str) -> str:
        m = self.rows.get(name, {})
        return ", ".join(f"{ts} acc {v.get('accuracy', float('nan')):.3f}" for ts, v in m.items() if isinstance(v, Mapping))

    def markdown(self) -> str:
        return markdown_table(self.records())


def markdown_table(records: Sequence[Mapping[str, Any]], digits: int = 4) -> str:
    """One dict per row -> a markdown table (columns: the keys of every row, first seen first; floats
    with ``digits`` decimals; None and missing cells empty)."""
    if not records:
        return "_no results_"
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in keys]

    def cell(v: Any) -> str:
        if v is None:
            return ""
        text = f"{v:.{digits}f}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in records]
    return "\n".join(lines)


SECTION_TITLES = {"pasm": "PASM (point adversarial self-mining)", "omni": "Omni-supervised (mining + distillation)",
                  "pt": "Progressive Teacher (label noise)", "caf": "CAF (valence/arousal)",
                  "featloss": "Handcrafted feature losses"}


def publish_results(run: Run, cfg: Any, results: ResultsTable, figures: Mapping[str, str | None],
                    uris: Mapping[str, str], sections: Mapping[str, Sequence[Mapping[str, Any]]] | None = None
                    ) -> dict[str, Any]:
    """results.json / results.md, the Prefect artifacts and the HTML report of a finished run.

    ``results`` in the summary is the classification table of every evaluated model; ``sections`` (when
    given) holds each method's own table (a round of several methods: one per method).
    """
    summary = {
        "name": cfg.name,
        "run": run.root,
        "results": results.records(),
        "metrics": results.rows,
        "figures": {k: v for k, v in figures.items() if v},
        "artifacts": dict(uris),
    }
    if sections:
        summary["sections"] = {k: [dict(r) for r in v] for k, v in sections.items()}
    with fsspec.open(join(run.root, "results.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    with fsspec.open(join(run.root, "results.md"), "w") as f:
        if sections:
            parts = [f"## {SECTION_TITLES.get(k, k)}\n\n{markdown_table(v)}\n" for k, v in sections.items()]
            f.write(f"# {cfg.name}\n\n" + "\n".join(parts))
        else:
            f.write(f"# {cfg.name}\n\n{results.markdown()}\n")
    _prefect_artifacts(cfg.name, results)
    for k, v in (sections or {}).items():
        publish_artifacts(f"{cfg.name} {k}", list(v), description=f"{cfg.name}: {SECTION_TITLES.get(k, k)}")
    if getattr(cfg, "report", True):
        from flows.report import build_report
        from tasks.figures import draw_safely

        # The report is a view of committed results: an error drawing it is logged, the run still ends well.
        summary["report"] = draw_safely("report", build_report, run.root)
    return summary


def _prefect_artifacts(name: str, results: ResultsTable) -> None:
    publish_artifacts(name, results.records(), f"# {name}\n\n{results.markdown()}", description=f"{name}: results")


def artifact_key(name: str) -> str:
    """A Prefect artifact key from a run or table name (lowercase letters, digits and dashes only)."""
    key = "".join(c if c.isascii() and c.isalnum() else "-" for c in name.lower())
    return "-".join(p for p in key.split("-") if p) or "run"


def publish_artifacts(name: str, records: Sequence[Mapping[str, Any]], markdown: str | None = None,
                      description: str | None = None) -> bool:
    """Show a results table in the Prefect UI: ``records`` (one dict per row, JSON-able values) as the
    table artifact ``<key>-results`` and ``markdown`` (default: ``# name`` and the records as a markdown
    table) as the markdown artifact ``<key>-summary``, where ``key = artifact_key(name)``.

    Only inside a flow run (or a task of one); elsewhere it does nothing. Returns whether the artifacts
    were created. Never raises: the UI is a convenience, the run folder's files are the record.
    """
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact
        from prefect.context import FlowRunContext, TaskRunContext

        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return False  # called outside a flow run: files only
        key = artifact_key(name)
        rows = [dict(r) for r in records]
        create_table_artifact(key=f"{key}-results", table=rows, description=description or f"{name}: results")
        create_markdown_artifact(key=f"{key}-summary", markdown=markdown or f"# {name}\n\n{markdown_table(rows)}",
                                 description=description or f"{name}: summary")
        return True
    except Exception as e:  # noqa: BLE001 - see the docstring
        log.warning("could not publish Prefect artifacts: %s", e)
        return False
