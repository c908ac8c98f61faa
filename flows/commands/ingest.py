"""`fermine ingest`: a public data set on disk -> image table; `fermine inspect`: look at any artifact."""

from __future__ import annotations

import inspect as _inspect
import json
import os
import re
from collections import Counter
from typing import Any, Optional

import typer

GRID_PER_CLASS = 8
UNLABELED = "unlabeled"
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` strings -> options; true/false, none, integers and numbers are converted."""
    from flows.cli import UserError

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UserError(f"--option expects key=value, got {pair!r}")
        out[key] = _coerce(value.strip())
    return out


def _coerce(value: str) -> Any:
    low = value.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    if _INT.fullmatch(value):
        return int(value)
    if _FLOAT.fullmatch(value):  # plain decimals only: a split named "nan" stays a string
        return float(value)
    return value


def label_histogram(uri: str) -> dict[str, Counter] | None:
    """split -> Counter(class name or 'unlabeled'), streamed from the label/split columns only."""
    import pyarrow as pa

    from storage.artifact import Artifact
    from storage.schema import CLASSES

    art = Artifact(uri)
    names = art.schema.names
    if "label" not in names:
        return None
    cols = ["label"] + (["split"] if "split" in names else [])
    hist: dict[str, Counter] = {}
    for batch in art.iter_batches(columns=cols, batch_size=65536):
        split = batch.column("split") if "split" in cols else pa.array([""] * batch.num_rows)
        t = pa.table({"split": split, "label": batch.column("label")})
        for r in t.group_by(["split", "label"]).aggregate([([], "count_all")]).to_pylist():
            lab = r["label"]
            name = UNLABELED if lab is None else (CLASSES[lab] if 0 <= lab < len(CLASSES) else str(lab))
            hist.setdefault(r["split"] or "", Counter())[name] += r["count_all"]
    return hist


def rejects_summary(uri: str, top: int = 10) -> tuple[int, list[tuple[str, int, str]]] | None:
    """(count, [(reason kind, count, example 'id: reason')]) of ``<uri>/rejects``; None if absent."""
    from storage.artifact import Artifact, is_finished
    from storage.ingest import rejects_uri

    ruri = rejects_uri(uri)
    if not is_finished(ruri):
        return None
    art = Artifact(ruri)
    kinds: Counter[str] = Counter()
    example: dict[str, str] = {}
    for batch in art.iter_batches(columns=["id", "reason"], batch_size=65536):
        for rid, reason in zip(batch.column("id").to_pylist(), batch.column("reason").to_pylist()):
            kind = reason.split(":", 1)[0]
            kinds[kind] += 1
            example.setdefault(kind, f"{rid}: {reason}")
    return len(art), [(k, c, example[k]) for k, c in kinds.most_common(top)]


def sample_grid(uri: str, path: str, n: int = GRID_PER_CLASS) -> str | None:
    """A PNG with up to ``n`` images per class (one row per class); None if there is no image column.

    A first pass reads only the label column to find which shards hold which classes, so a large
    artifact is not decoded beyond the shards that supply the samples.
    """
    import numpy as np
    import pyarrow.compute as pc

    from storage.artifact import Artifact
    from storage.images import ImageDecodeError, decode
    from storage.schema import CLASSES
    from tasks.figures import image_grid

    art = Artifact(uri)
    names = art.schema.names
    if "image" not in names:
        return None
    has_label = "label" in names

    def key_of(lab: int | None) -> str:
        return UNLABELED if lab is None or lab < 0 else (CLASSES[lab] if lab < len(CLASSES) else str(lab))

    wanted: dict[str, int] = {}
    shards = list(range(art.num_shards))
    if has_label:
        per_shard = []
        for i in shards:
            labels = pc.fill_null(pc.cast(art.read_shard(i, ["label"]).column("label"), "int16"), -1)
            counts = {key_of(r["values"]): r["counts"] for r in pc.value_counts(labels).to_pylist()}
            per_shard.append(counts)
            for k in counts:
                wanted[k] = n
        need, shards = dict(wanted), []
        for i, counts in enumerate(per_shard):  # the fewest leading shards that supply n of each class
            if any(need[k] > 0 for k in counts):
                shards.append(i)
                for k, c in counts.items():
                    need[k] -= c
    rows: dict[str, list[np.ndarray]] = {}
    titles: dict[str, list[str]] = {}
    cols = ["id", "image"] + (["label"] if has_label else [])

    def full() -> bool:
        if not has_label:
            return len(rows.get("samples", [])) >= n
        return bool(rows) and all(len(rows.get(k, [])) >= n for k in wanted)

    for batch in art.iter_batches(columns=cols, batch_size=256, shards=shards):
        ids, images = batch.column("id").to_pylist(), batch.column("image").to_pylist()
        labels = batch.column("label").to_pylist() if has_label else [None] * len(ids)
        for rid, data, lab in zip(ids, images, labels):
            key = "samples" if not has_label else key_of(lab)
            if len(rows.get(key, [])) >= n:
                continue
            try:
                img = decode(data)
            except ImageDecodeError:
                continue
            rows.setdefault(key, []).append(img)
            titles.setdefault(key, []).append(rid.split("/", 1)[-1][-16:])  # id without the source prefix
        if full():
            break
    if not rows:
        return None
    order = [k for k in (*CLASSES, UNLABELED, "samples") if k in rows]
    image_grid([rows[k] for k in order], path, row_titles=order, cell_titles=[titles[k] for k in order],
               title=f"{os.path.basename(uri.rstrip('/'))}: {len(art)} rows")
    return path


def print_histogram(console, hist: dict[str, Counter]) -> None:
    from rich.table import Table

    from storage.schema import CLASSES

    # Every class is shown, so a class missing from a split is visible as a 0.
    cols = list(CLASSES) + ([UNLABELED] if any(h.get(UNLABELED) for h in hist.values()) else [])
    extra = sorted({k for h in hist.values() for k in h} - set(cols))
    table = Table(title="rows per split and class")
    table.add_column("split")
    for c in cols + extra:
        table.add_column(c, justify="right")
    table.add_column("total", justify="right", style="bold")
    for split in sorted(hist):
        h = hist[split]
        table.add_row(split or "-", *[str(h.get(c, 0)) for c in cols + extra], str(sum(h.values())))
    if len(hist) > 1:
        tot: Counter = sum(hist.values(), Counter())
        table.add_row("all", *[str(tot.get(c, 0)) for c in cols + extra], str(sum(tot.values())), style="bold")
    console.print(table)


def print_rejects(console, summary: tuple[int, list[tuple[str, int, str]]] | None) -> None:
    from rich.table import Table

    if summary is None:
        return
    count, top = summary
    if not count:
        console.print("rejects: 0")
        return
    table = Table(title=f"rejects: {count}")
    table.add_column("reason")
    table.add_column("count", justify="right")
    table.add_column("example", overflow="fold")
    for kind, c, ex in top:
        table.add_row(kind, str(c), ex)
    console.print(table)


def ingest_table(fmt: str, root: str, out: str, options: dict[str, Any], *, rows_per_shard: int,
                 workers: int | None = None, ray_address: str | None = None, label: str | None = None):
    """Read ``root`` (format ``fmt``) into the image table ``out``; returns its Manifest.

    A source with random access (storage.readers.Splittable: an indexed RecordIO, a folder tree, a csv)
    of more than one part is read in parts of ``rows_per_shard`` entries as Ray tasks, ``workers`` at once
    (default: one per CPU of the Ray instance or cluster at ``ray_address``), and a rerun after a kill
    redoes only the missing parts; ``workers=1``, and any other source, read in this process. Both give
    the same table. User mistakes (unknown format, bad options or layout) raise flows.cli.UserError.
    """
    import time

    from flows.cli import UserError
    from flows.progress import progress_bar
    from storage.ingest import write_image_table
    from storage.readers import check_options, get_reader, get_splittable
    from storage.readers.base import Reject

    label = label or f"ingest {fmt}"
    try:
        reader, split = get_reader(fmt), get_splittable(fmt)
    except KeyError as e:
        raise UserError(str(e.args[0])) from None
    try:
        check_options(fmt, options)
    except ValueError as e:
        raise UserError(str(e)) from None
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    local_root = os.path.abspath(root) if os.path.exists(root) else root
    config = {"format": fmt, "root": local_root, "options": options}
    stage = f"ingest.{fmt}"
    try:  # readers check the layout here, before OUT is created
        entries = split.entries(root, **options) if split is not None and workers != 1 else None
        records = reader(root, **options) if entries is None or len(entries) <= rows_per_shard else None
    except TypeError as e:
        raise UserError(f"bad options for {fmt}: {e}") from None
    except ValueError as e:  # DatasetFormatError is one too; the message says what to fix
        raise UserError(str(e)) from None
    t0 = time.perf_counter()
    if records is not None:
        counts = {"rows": 0, "rejects": 0}
        with progress_bar(label, None) as bar:
            def on_record(rec) -> None:
                counts["rejects" if isinstance(rec, Reject) else "rows"] += 1
                bar.update(0, advance=1, info=f"{counts['rows']} rows, {counts['rejects']} rejects")

            try:
                return write_image_table(records, out, stage=stage, config=config, rows_per_shard=rows_per_shard,
                                         on_record=on_record)
            except ValueError as e:
                raise UserError(f"{fmt} at {root}: {e}") from None
    import ray

    from workers.cluster import RayConfig, connect
    from workers.ingest import ingest_parts
    from workers.sharded import PoolConfig

    connect(RayConfig(address=ray_address))
    n_tasks = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    with progress_bar(f"{label} ({n_tasks} Ray tasks at once)", len(entries)) as bar:
        seen = {"entries": 0, "rejects": 0}

        def on_part(i: int, info, rejected: int) -> None:
            n = min(rows_per_shard, len(entries) - i * rows_per_shard)
            seen["entries"] += n
            seen["rejects"] += rejected
            rate = seen["entries"] / max(time.perf_counter() - t0, 1e-9)
            bar.update(0, advance=n, info=f"{seen['rejects']} rejects, {rate:.0f} entries/s")

        try:
            manifest = ingest_parts(split.read_entries, entries, out, stage=stage, config=config,
                                    part_size=rows_per_shard, pool=PoolConfig(num_actors=n_tasks, num_cpus=1.0),
                                    on_part=on_part)
        except FileExistsError as e:
            raise UserError(f"{e}; choose another output or delete it") from None
    return manifest


def register(app: typer.Typer) -> None:
    @app.command("ingest")
    def ingest(
        fmt: str = typer.Argument(..., metavar="FORMAT", help="Data set format: rafdb, fer2013, ferplus, affectnet, "
                                  "ckplus, jaffe, afewva, folder, ms1m, synthetic; `fermine formats` lists their options."),
        root: str = typer.Argument(..., metavar="ROOT",
                                   help="The data set's folder (or csv/.rec file), laid out as its publisher ships it."),
        out: str = typer.Argument(..., metavar="OUT",
                                  help="Where to write the image table (an fsspec URI; rejects go to OUT/rejects)."),
        rows_per_shard: int = typer.Option(1024, "--rows-per-shard", min=1,
                                           help="Rows per Parquet shard (and entries per Ray task when read in parts)."),
        option: list[str] = typer.Option([], "--option", "-o", metavar="KEY=VALUE",
                                         help="Reader option, repeatable (e.g. rafdb: -o aligned=false; ms1m: -o limit=1000; `fermine formats` lists each reader's)."),
        workers: Optional[int] = typer.Option(None, help="Ray tasks at once for a source with random access (ms1m "
                                              "with its .idx or folders, folder, fer2013); default: one per CPU; "
                                              "1: read in this process."),
        ray_address: Optional[str] = typer.Option(None, help="Ray cluster (auto or ray://host:10001) for reading in "
                                                  "parts; default: a local instance. ROOT must be at the same path "
                                                  "on every node."),
    ) -> None:
        """Read a public FER data set into an image table, with its rejects (entries that could not be used).

        A large source with random access is read in parts on Ray, resumable: rerun the same command
        after a kill and only the missing parts are read."""
        import time

        from rich.console import Console

        from flows.cli import UserError
        from storage.artifact import is_finished

        if is_finished(out):
            raise UserError(f"{out} is already a finished artifact; choose another output or delete it")
        t0 = time.perf_counter()
        manifest = ingest_table(fmt, root, out, parse_options(option), rows_per_shard=rows_per_shard,
                                workers=workers, ray_address=ray_address)
        secs = time.perf_counter() - t0
        console = Console()
        console.print(f"[bold]{out}[/]: {manifest.rows} rows in {len(manifest.shards)} shard(s), "
                      f"{manifest.extra.get('rejects', 0)} rejects, {secs:.1f}s; digest {manifest.digest[:16]}")
        hist = label_histogram(out)
        if hist:
            print_histogram(console, hist)
        print_rejects(console, rejects_summary(out))

    @app.command("formats")
    def formats() -> None:
        """List the data set formats `fermine ingest` reads, with their options and defaults."""
        from rich.console import Console
        from rich.table import Table

        from storage.readers import available, get_reader, reader_options

        table = Table(title="fermine ingest FORMAT ROOT OUT [-o KEY=VALUE ...]")
        table.add_column("format", style="bold")
        table.add_column("layout", overflow="fold")
        table.add_column("options (-o key=value)", overflow="fold")
        for name in available():
            reader = get_reader(name)
            mod_doc = (_inspect.getmodule(reader).__doc__ or "").strip().split("\n\n")[0].replace("``", "")
            known = reader_options(reader)
            opts = "any" if known is None else (", ".join(f"{k}={v!r}" for k, v in known.items()) or "-")
            table.add_row(name, " ".join(mod_doc.split()), opts)
        Console().print(table)

    @app.command("inspect")
    def inspect(
        artifact: str = typer.Argument(..., help="An artifact folder (any fsspec URI)."),
        grid: Optional[str] = typer.Option(None, "--grid", help="Write a PNG grid of samples, one row per class, "
                                           "here (default: ./<artifact name>-samples.png)."),
        no_grid: bool = typer.Option(False, "--no-grid", help="Do not write the sample grid."),
        n: int = typer.Option(GRID_PER_CLASS, "--n", min=1, max=64, help="Samples per class in the grid."),
    ) -> None:
        """Show an artifact's manifest, rows per split and class, rejects, and save a grid of sample images."""
        import datetime

        from rich.console import Console
        from rich.table import Table

        from storage.artifact import Artifact

        art = Artifact(artifact)
        m = art.manifest
        console = Console()
        table = Table(title=art.uri, show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        table.add_row("stage", m.stage)
        table.add_row("rows", str(m.rows))
        table.add_row("shards", f"{len(m.shards)} (rows per shard: {', '.join(str(s.rows) for s in m.shards[:5])}"
                      f"{', ...' if len(m.shards) > 5 else ''})")
        table.add_row("digest", m.digest)
        table.add_row("schema", f"v{m.schema_version}: " + ", ".join(f"{f.name} {f.type}" for f in art.schema))
        if m.created:
            table.add_row("created", datetime.datetime.fromtimestamp(m.created).isoformat(timespec="seconds"))
        table.add_row("inputs", "\n".join(f"{k}: {v}" for k, v in m.inputs.items()) or "-")
        table.add_row("config", json.dumps(m.config, sort_keys=True, default=str))
        if m.extra:
            table.add_row("extra", json.dumps(m.extra, sort_keys=True, default=str))
        console.print(table)
        hist = label_histogram(artifact)
        if hist:
            print_histogram(console, hist)
        print_rejects(console, rejects_summary(artifact))
        if no_grid:
            return
        path = grid or f"{os.path.basename(artifact.rstrip('/')) or 'artifact'}-samples.png"
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            from flows.cli import UserError

            raise UserError(f"cannot write the grid to {path}: folder {parent} does not exist")
        written = sample_grid(artifact, path, n)
        console.print(f"sample grid: {written}" if written else "no image column: no sample grid written")
