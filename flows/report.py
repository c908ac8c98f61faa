"""One self-contained HTML page per run, built from the run folder alone.

Everything comes from files the stages already wrote (ledger, stage records, results.json,
PNG figures); images are embedded as data URIs so the page can be mailed or archived.
"""

from __future__ import annotations

import base64
import html
import json
import time
from typing import Any

import fsspec

from flows.stage import Run, fs_size, read_record
from storage.artifact import join

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222}
h1{margin-bottom:.2rem} h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0} td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
.figs{display:flex;flex-wrap:wrap;gap:1rem} figure{margin:0} figcaption{font-size:.85rem;color:#555}
img{max-width:520px;border:1px solid #eee} pre{background:#f7f7f7;padding:.6rem;overflow-x:auto;font-size:.8rem}
.muted{color:#777;font-size:.9rem}
"""


def _img(fs: Any, path: str) -> str:
    data = base64.b64encode(fs.cat_file(path)).decode()
    return f'<img alt="{html.escape(path.rsplit("/", 1)[-1])}" src="data:image/png;base64,{data}">'


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return '<p class="muted">none</p>'
    keys = list(rows[0])
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in keys)
    body = []
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            if isinstance(v, float):
                cells.append(f'<td class="num">{v:.4f}</td>')
            else:
                cells.append(f"<td>{html.escape('' if v is None else str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f} TB"


def build_report(run_root: str, out: str | None = None) -> str:
    """Write ``<run>/report.html`` (or ``out``) and return its path."""
    run = Run(run_root)
    fs, root = fsspec.core.url_to_fs(run.root)
    if not run.events():
        raise FileNotFoundError(f"{run_root} is not a fermine run folder (no ledger.jsonl); pass the run's `out` folder")
    parts = [f"<h1>fermine run: {html.escape(root.rsplit('/', 1)[-1])}</h1>",
             f'<p class="muted">{html.escape(run.root)} &middot; report written {time.strftime("%Y-%m-%d %H:%M:%S")}</p>']

    results_path = f"{root}/results.json"
    summary: dict[str, Any] = json.loads(fs.cat_file(results_path)) if fs.exists(results_path) else {}
    parts.append("<h2>Results</h2>" + _table(summary.get("results", [])))

    stages = []
    for row in run.status():
        rec = read_record(row["uri"]) if row.get("uri") else None
        stages.append({
            "stage": row["stage"],
            "state": row["state"],
            "seconds": round(rec.seconds, 1) if rec else row.get("seconds"),
            "size": _human(fs_size(row["uri"])) if row.get("uri") else "",
            "output": row.get("uri", "").rsplit("/", 1)[-1],
        })
    parts.append("<h2>Stages</h2>" + _table(stages))

    sections: list[tuple[str, list[str]]] = []
    for row in run.status():
        uri = row.get("uri")
        if not uri:
            continue
        _, path = fsspec.core.url_to_fs(uri)
        pngs = sorted(fs.glob(f"{path}/*.png"))
        if pngs:
            sections.append((row["stage"], pngs))
    figs = []
    for stage_name, pngs in sections:
        for p in pngs:
            figs.append(f"<figure>{_img(fs, p)}<figcaption>{html.escape(stage_name)}: "
                        f"{html.escape(p.rsplit('/', 1)[-1])}</figcaption></figure>")
    parts.append('<h2>Figures</h2><div class="figs">' + ("".join(figs) or '<p class="muted">none</p>') + "</div>")

    cfg_path = f"{root}/config.json"
    if fs.exists(cfg_path):
        parts.append("<h2>Config</h2><pre>" + html.escape(fs.cat_file(cfg_path).decode()) + "</pre>")

    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>fermine report</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")
    target = out or join(run.root, "report.html")
    with fsspec.open(target, "w") as f:
        f.write(page)
    return target
