"""One self-contained HTML page per run, built from the run folder alone.

Everything comes from files the stages already wrote (ledger, stage records, results.json,
config.json, PNG figures); images are embedded as data URIs so the page can be mailed or archived.

Figures are grouped by what they show, recognised by the file names the stages write:
``curves.png`` (tasks.train), ``*confusion*.png`` (tasks.train / flows.steps.evaluate),
``pasm-rounds.png`` / ``erased_samples.png`` (the attack figure), ``mined*.png`` (mined samples per
class), ``distilled*.png`` (distilled images), ``scatter*.png`` (valence/arousal, tasks.caf.method); anything else lands in "Other figures".

The page carries a tiny self-check script: after loading it marks every image ``data-rendered="1"``
or ``"0"``, and records the count on ``<html data-images-rendered="ok/total">`` and any script or
resource error on ``<html data-errors>``. Headless-browser tests read these from the dumped DOM; a
reader never sees them.
"""

from __future__ import annotations

import base64
import html
import json
import time
from typing import Any, Callable

import fsspec

from flows.stage import LEDGER, Run, fs_size, read_record
from storage.artifact import join

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222}
h1{margin-bottom:.2rem} h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0} td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
.figs{display:flex;flex-wrap:wrap;gap:1rem} figure{margin:0} figcaption{font-size:.85rem;color:#555}
img{max-width:520px;border:1px solid #eee} .wide img{max-width:100%} pre{background:#f7f7f7;padding:.6rem;overflow-x:auto;font-size:.8rem}
.muted{color:#777;font-size:.9rem} nav a{margin-right:.8rem} td.err{color:#a00;font-size:.85rem}
"""

# Runs before anything else on the page (in <head>) so that it sees every error. Images may
# finish before or after this script; the window "load" event fires after all of them settled.
_SELF_CHECK = """
(function(){var d=document.documentElement,n=0;
window.addEventListener("error",function(){n++;d.setAttribute("data-errors",String(n));},true);
window.addEventListener("load",function(){var ok=0,im=document.images;
for(var i=0;i<im.length;i++){var g=im[i].complete&&im[i].naturalWidth>0;im[i].setAttribute("data-rendered",g?"1":"0");if(g)ok++;}
d.setAttribute("data-images-rendered",ok+"/"+im.length);});})();
"""

_MIME = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg"}

# (anchor, title, what it shows, matches(file name)) in page order; a figure goes to the first match.
FIGURE_SECTIONS: tuple[tuple[str, str, str, Callable[[str], bool]], ...] = (
    ("curves", "Training curves", "loss, accuracy and learning rate per epoch of each training stage",
     lambda n: n.startswith("curves")),
    ("confusion", "Confusion matrices", "rows = true class, columns = predicted; row-normalised rate and count",
     lambda n: "confusion" in n),
    ("attack", "Attack: erased samples per round",
     "the same faces with the s x s region at the attack's most sensitive position erased, round by round",
     lambda n: n.startswith(("pasm-rounds", "erased"))),
    ("mined", "Mined samples per class", "unlabeled faces given each pseudo label, one row per class",
     lambda n: n.startswith("mined")),
    ("distilled", "Distilled images", "the learned synthetic images, per class",
     lambda n: n.startswith("distilled")),
    ("va", "Valence/arousal", "predicted against true valence and arousal", lambda n: n.startswith("scatter")),
    ("other", "Other figures", "", lambda n: True),
)
_WIDE = {"curves", "attack", "mined"}  # wide figures get the page's width


def _img(fs: Any, path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    mime = _MIME.get(name.rsplit(".", 1)[-1].lower(), "image/png")
    data = base64.b64encode(fs.cat_file(path)).decode()
    return f'<img alt="{html.escape(name)}" src="data:{mime};base64,{data}">'


def _cell(v: Any, decimals: int = 4) -> str:
    if isinstance(v, float):
        return f'<td class="num">{v:.{decimals}f}</td>'
    if isinstance(v, int) and not isinstance(v, bool):
        return f'<td class="num">{v}</td>'
    return f"<td>{html.escape('' if v is None else str(v))}</td>"


def _table(rows: list[dict[str, Any]], decimals: dict[str, int] | None = None) -> str:
    """An HTML table of ``rows``; floats get 4 decimals unless ``decimals`` says otherwise per column."""
    if not rows:
        return '<p class="muted">none</p>'
    keys: list[str] = []
    for r in rows:  # union of keys, first-seen order: rows of different models may differ
        keys.extend(k for k in r if k not in keys)
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in keys)
    body = []
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            if k == "error" and v:
                cells.append(f'<td class="err">{html.escape(str(v))}</td>')
            else:
                cells.append(_cell(v, (decimals or {}).get(k, 4)))
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _per_class_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (model, test set): n, accuracy, mean class accuracy, accuracy of each class."""
    rows = []
    for model, sets in metrics.items():
        if not isinstance(sets, dict):
            continue
        for test_set, m in sets.items():
            if not isinstance(m, dict) or "per_class_by_name" not in m:
                continue
            row: dict[str, Any] = {"model": model, "test set": test_set, "n": m.get("n"),
                                   "accuracy": m.get("accuracy"), "mean class acc.": m.get("mean_class_accuracy")}
            row.update(m["per_class_by_name"])
            rows.append(row)
    return rows


def where_label(p: dict[str, Any]) -> str:
    """'host / cpu' for a stage placed on a Ray worker, 'host / flow process' for one run by the flow."""
    if not p:
        return ""
    return f"{p.get('host', '?')} / {'flow process' if p.get('device') == 'driver' else p.get('device')}"


def _stage_rows(run: Run) -> tuple[list[dict[str, Any]], list[tuple[str, str]], int]:
    """The stages table, (stage, output path) of every stage with an output folder, total bytes."""
    rows, outputs, total = [], [], 0
    for row in run.status():
        uri = row.get("uri")
        rec = read_record(uri) if uri else None
        size = fs_size(uri) if uri else 0
        total += size
        out: dict[str, Any] = {
            "stage": row["stage"],
            "state": row["state"],
            # A reused stage has no duration of its own: show what computing it took.
            "seconds": rec.seconds if rec else row.get("seconds"),
            "size": _human(size) if uri else "",
            "where": where_label(row.get("placement") or (rec.placement if rec else {})),
            "output": (uri or "").rsplit("/", 1)[-1],
        }
        if row.get("error"):
            out["error"] = row["error"]
        rows.append(out)
        if uri:
            outputs.append((row["stage"], fsspec.core.url_to_fs(uri)[1]))
    return rows, outputs, total


def timeline_rows(run: Run) -> list[dict[str, Any]]:
    """Each stage computed in this run folder: name, lane (where it ran), start and end (s after the first)."""
    done = [e for e in run.events() if e.get("event") == "finished" and e.get("started") is not None]
    if not done:
        return []
    t0 = min(float(e["started"]) for e in done)
    rows = []
    for e in done:
        p = e.get("placement") or {}
        lane = p.get("host") or "?"
        lane += f" / {p['device']}" if p.get("device") not in (None, "driver") else " / flow process"
        if p.get("node_id"):
            lane += f" (node {str(p['node_id'])[:8]})"
        start = float(p.get("started", e["started"]))
        rows.append({"stage": e["stage"], "lane": lane, "start": start - t0, "end": float(e["time"]) - t0,
                     "waited": start - float(e["started"])})
    return rows


def _timeline_svg(rows: list[dict[str, Any]]) -> str:
    """The run's stages as bars over time, one band per node/device, overlapping stages stacked."""
    if not rows:
        return ""
    lanes: dict[str, list[list[dict[str, Any]]]] = {}
    for r in sorted(rows, key=lambda r: r["start"]):
        tracks = lanes.setdefault(r["lane"], [])
        for track in tracks:  # the first track free at this start (greedy interval colouring)
            if track[-1]["end"] <= r["start"] + 1e-6:
                track.append(r)
                break
        else:
            tracks.append([r])
    span = max(r["end"] for r in rows) or 1.0
    label_w, width, row_h = 230, 760, 16
    height = sum(len(t) for t in lanes.values()) * row_h + len(lanes) * 8 + 24
    parts, y = [], 4
    for lane, tracks in lanes.items():
        parts.append(f'<text x="2" y="{y + 12}" font-size="11">{html.escape(lane)}</text>')
        for track in tracks:
            for r in track:
                x = label_w + width * r["start"] / span
                w = max(1.5, width * (r["end"] - r["start"]) / span)
                tip = f"{r['stage']}: {r['end'] - r['start']:.1f} s" + (
                    f" (waited {r['waited']:.1f} s for resources)" if r["waited"] > 0.5 else "")
                parts.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row_h - 3}" fill="#4a7ab8">'
                             f"<title>{html.escape(tip)}</title></rect>")
                if w > 60:
                    parts.append(f'<text x="{x + 3:.1f}" y="{y + 10}" font-size="9" fill="#fff">'
                                 f"{html.escape(r['stage'][: int(w / 5.5)])}</text>")
            y += row_h
        y += 8
    parts.append(f'<text x="{label_w}" y="{y + 12}" font-size="10">0 s</text>'
                 f'<text x="{label_w + width - 40}" y="{y + 12}" font-size="10">{span:.0f} s</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + width + 10}" height="{height}" '
            f'role="img" aria-label="stage timeline">{"".join(parts)}</svg>')


def _figure_sections(fs: Any, root: str, outputs: list[tuple[str, str]]) -> list[str]:
    found: dict[str, list[str]] = {key: [] for key, *_ in FIGURE_SECTIONS}
    places = [("run", root)] + outputs  # PNGs at the run's top level too (e.g. flow-level figures)
    for stage_name, path in places:
        files = sorted(p for ext in _MIME for p in fs.glob(f"{path}/*.{ext}"))
        for p in files:
            name = p.rsplit("/", 1)[-1]
            key = next(k for k, _, _, match in FIGURE_SECTIONS if match(name.lower()))
            found[key].append(f"<figure>{_img(fs, p)}<figcaption>{html.escape(stage_name)}: "
                              f"{html.escape(name)}</figcaption></figure>")
    parts = []
    for key, title, what, _ in FIGURE_SECTIONS:
        if found[key]:
            cls = "figs wide" if key in _WIDE else "figs"
            note = f'<p class="muted">{html.escape(what)}</p>' if what else ""
            parts.append(f'<h2 id="{key}">{html.escape(title)}</h2>{note}<div class="{cls}">{"".join(found[key])}</div>')
    return parts


def build_report(run_root: str, out: str | None = None) -> str:
    """Write ``<run>/report.html`` (or ``out``) and return its path."""
    fs, root = fsspec.core.url_to_fs(run_root.rstrip("/"))
    # Checked before Run(), which would create the folder: a typo must not leave an empty run behind.
    if not fs.exists(f"{root}/{LEDGER}"):
        raise FileNotFoundError(f"{run_root} is not a fermine run folder (no {LEDGER}); pass the run's `out` folder")
    run = Run(run_root)

    results_path = f"{root}/results.json"
    summary: dict[str, Any] = json.loads(fs.cat_file(results_path)) if fs.exists(results_path) else {}
    title = summary.get("name") or root.rstrip("/").rsplit("/", 1)[-1]
    body = [f"<h1>fermine run: {html.escape(str(title))}</h1>",
            f'<p class="muted">{html.escape(run.root)} &middot; report written {time.strftime("%Y-%m-%d %H:%M:%S")}</p>']

    sections: list[tuple[str, str]] = []  # (anchor, html) in page order
    results_html = _table(summary.get("results", []))
    method_sections = summary.get("sections") or {}
    if len(method_sections) > 1:  # a round of several methods: a table per method
        from flows.results import SECTION_TITLES

        results_html = "".join(f'<h3 id="results-{html.escape(k)}">{html.escape(SECTION_TITLES.get(k, k))}</h3>'
                               + _table(list(v)) for k, v in method_sections.items())
    if not summary:
        results_html = '<p class="muted">no results.json yet: the run has not finished</p>'
    sections.append(("results", f'<h2 id="results">Results</h2>{results_html}'))
    per_class = _per_class_rows(summary.get("metrics", {}))
    if per_class:
        sections.append(("per-class", '<h2 id="per-class">Per-class accuracy</h2>' + _table(per_class)))

    stages, outputs, total_b = _stage_rows(run)
    total_s = sum(r["seconds"] or 0 for r in stages)
    sections.append(("stages", '<h2 id="stages">Stages</h2>'
                     f'<p class="muted">{len(stages)} stages, {total_s:.1f} s of compute, {_human(total_b)} of artifacts</p>'
                     + _table(stages, {"seconds": 1})))

    timeline = _timeline_svg(timeline_rows(run))
    if timeline:
        sections.append(("timeline", '<h2 id="timeline">Timeline</h2><p class="muted">each stage computed in '
                         "this folder, by where it ran (host / device); stacked bars ran at the same time; hover "
                         f"for seconds</p>{timeline}"))

    for part in _figure_sections(fs, root, outputs):
        anchor = part.split('id="', 1)[1].split('"', 1)[0]
        sections.append((anchor, part))

    cfg_path = f"{root}/config.json"
    if fs.exists(cfg_path):
        sections.append(("config", '<h2 id="config">Config</h2><pre>' + html.escape(fs.cat_file(cfg_path).decode()) + "</pre>"))

    titles = {"results": "Results", "per-class": "Per-class", "stages": "Stages", "config": "Config",
              "timeline": "Timeline",
              **{k: t for k, t, _, _ in FIGURE_SECTIONS}}
    nav = "<nav>" + "".join(f'<a href="#{a}">{html.escape(titles[a])}</a>' for a, _ in sections) + "</nav>"
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>fermine report: {html.escape(str(title))}</title>"
            f"<style>{_CSS}</style><script>{_SELF_CHECK}</script></head>"
            f"<body>{''.join(body)}{nav}{''.join(s for _, s in sections)}</body></html>")
    target = out or join(run.root, "report.html")
    with fsspec.open(target, "w") as f:
        f.write(page)
    return target
