"""`fermine run`, `fermine demo`, `fermine status`, `fermine report`, `fermine config`."""

from __future__ import annotations

import json
import sys
import time
from typing import List, Optional

import typer

from flows.cli import UserError


def _run_flow(cfg) -> dict:
    """Run the config's pipeline with a calm console (flows.console): a line per stage, the noise to the
    run's log file."""
    from flows.console import calm_console
    from flows.round import FLOWS

    with calm_console(cfg.out) as log_path:
        if log_path:
            typer.echo(f"{cfg.name}: pipeline {cfg.pipeline} -> {cfg.out} (details: {log_path})", err=True)
        try:
            return FLOWS[cfg.pipeline](cfg=cfg)
        except (ValueError, KeyError) as e:
            # A stage refused its input or settings (a missing split, a label it cannot use...): the message
            # says what; finished stages are kept, so fixing it and rerunning redoes only the rest.
            where = f" (the traceback is in {log_path})" if log_path else ""
            raise UserError(f"{e}\nFix that and rerun: finished stages are reused{where}") from None


def _print_summary(summary: dict, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    from rich import box

    from flows.results import SECTION_TITLES

    con = Console() if sys.stdout.isatty() else Console(width=120)  # logs: no 80-column cut
    sections = dict(summary.get("sections") or {})
    if "pasm" in sections and "omni" in sections:  # one classification table; omni's rows after PASM's
        shared = {r["model"] for r in sections["pasm"]}
        sections["pasm"] = [*sections["pasm"], *[r for r in sections.pop("omni") if r["model"] not in shared]]
        titles = {**SECTION_TITLES, "pasm": "PASM and omni-supervised (teacher, vas, das)"}
    else:
        titles = dict(SECTION_TITLES)
    tables = ([(f"{summary.get('name')}: {titles.get(k, k)}", v) for k, v in sections.items()]
              if len(sections) > 1 else [(f"{summary.get('name')}: results", summary.get("results", []))])
    for title, recs in tables:
        if not recs:
            continue
        keys: list[str] = []
        for r in recs:  # rows of one table may differ (the union, first seen first)
            keys += [k for k in r if k not in keys]
        t = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1))
        for k in keys:  # short headers so the table fits an 80-column terminal
            label = (k.replace("mean class accuracy", "mean-class acc").replace("accuracy", "acc")
                     .replace("test (5-crop + mirror vote)", "5-crop vote").replace("test (centre crop)", "centre")
                     .replace("val (vote)", "val"))
            t.add_column(label, justify="left" if k == "model" else "right", no_wrap=k == "model")
        for r in recs:
            t.add_row(*["" if r.get(k) is None else (f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k]))
                        for k in keys])
        con.print(t)
    con.print(f"run folder: {summary.get('run')}  ({seconds / 60:.1f} min)")
    if summary.get("report"):
        con.print(f"report: [bold]{summary['report']}[/bold]")


def _load(config: Optional[str], sets: List[str]):
    from flows.config import ConfigError, load_config

    try:
        return load_config(config, sets)
    except ConfigError as e:
        raise UserError(str(e)) from None


def _resolve(cfg, check_paths: bool = True) -> dict:
    """Every stage's config, checked before a flow starts: a typo fails in a second, not an hour in."""
    from flows.steps import resolve_configs

    try:
        return resolve_configs(cfg, check_paths)
    except ValueError as e:  # ConfigError included
        raise UserError(str(e)) from None


def run_pipeline(cfg) -> dict:
    """What `fermine run` does with a config: check every stage's settings, run the pipeline with the
    calm console, print the results table(s). The per-method commands build their config and call this."""
    _resolve(cfg)
    t0 = time.time()
    summary = _run_flow(cfg)
    _print_summary(summary, time.time() - t0)
    return summary


def build_config(data: dict):
    """A RunConfig from a per-method command's options (UserError naming the bad setting)."""
    from pydantic import ValidationError

    from flows.config import RunConfig

    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise UserError(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}") from None


def register(app: typer.Typer) -> None:
    @app.command()
    def run(
        config: str = typer.Argument(..., help="experiment config (YAML); see flows/configs/ and `fermine config`"),
        set_: List[str] = typer.Option([], "--set", help="override a setting: --set teacher.epochs=5 (repeatable)"),
        rerun: List[str] = typer.Option(
            [], "--rerun", metavar="STAGE",
            help="recompute STAGE and everything downstream of it, nothing else, though its code did not change "
                 "(repeatable; a glob such as 'attack-r*' names several; names as `fermine status RUN` lists them)"),
    ) -> None:
        """Run a pipeline from an experiment config; a rerun reuses every finished stage."""
        cfg = _load(config, set_)
        _resolve(cfg)
        if rerun:
            # Recorded in the run folder before the flow starts: the named stages get new output folders,
            # their dependents new inputs, and later plain runs keep reusing the fresh results.
            from flows.stage import request_reruns

            try:
                counts = request_reruns(cfg.out, rerun)
            except ValueError as e:
                raise UserError(str(e)) from None
            typer.echo("recomputing " + ", ".join(f"{s} (rerun #{n})" for s, n in counts.items())
                       + " and what depends on it")
        t0 = time.time()
        summary = _run_flow(cfg)
        _print_summary(summary, time.time() - t0)

    @app.command()
    def demo(
        out: str = typer.Option("runs/demo", help="run folder"),
        set_: List[str] = typer.Option([], "--set", help="override a setting of the demo config"),
    ) -> None:
        """The full round on the embedded synthetic data set, on this machine (CPU is fine)."""
        from flows.config import packaged_config

        cfg = _load(str(packaged_config("demo")), [f"out={out}", *set_])
        _resolve(cfg)
        t0 = time.time()
        summary = _run_flow(cfg)
        _print_summary(summary, time.time() - t0)

    @app.command()
    def status(run: str = typer.Argument(..., help="run folder (the config's `out`)")) -> None:
        """Each stage's state, duration and output folder."""
        from rich.console import Console
        from rich.table import Table

        from flows.stage import LEDGER, Run, fs_size
        from storage.artifact import _fs

        fs, path = _fs(run)
        if not fs.exists(f"{path.rstrip('/')}/{LEDGER}"):  # checked first: Run() would create the folder
            raise UserError(f"{run} has no recorded stages; is it a run folder (the config's `out`)?")
        r = Run(run)
        rows = r.status()
        if not rows:
            raise UserError(f"{run} has no recorded stages; is it a run folder (the config's `out`)?")
        from flows.report import where_label
        from flows.stage import read_record

        t = Table(title=f"run {run}")
        for col in ("stage", "state", "seconds", "where", "started", "size", "output"):
            t.add_column(col)
        for row in rows:
            rec = read_record(row["uri"])  # a reused stage shows where and when it was computed
            secs = row.get("seconds") if row.get("seconds") is not None else (rec.seconds if rec else None)
            placement = row.get("placement") or (rec.placement if rec else {})
            started = placement.get("started") or (rec.started if rec else None)
            t.add_row(row["stage"], row["state"], "" if secs is None else f"{secs:.1f}", where_label(placement),
                      "" if started is None else time.strftime("%H:%M:%S", time.localtime(started)),
                      f"{fs_size(row['uri']) / 1e6:.1f} MB", row["uri"].rsplit("/", 1)[-1])
        (Console() if sys.stdout.isatty() else Console(width=160)).print(t)  # logs and pipes: no 80-column cut

    @app.command()
    def report(run: str = typer.Argument(..., help="run folder"), out: Optional[str] = typer.Option(None, help="HTML path")) -> None:
        """Write the run's self-contained HTML report and print its path."""
        from flows.report import build_report

        typer.echo(build_report(run, out))

    @app.command("config")
    def config_cmd(
        config: Optional[str] = typer.Argument(None, help="config to validate and print resolved"),
        defaults: bool = typer.Option(False, "--defaults", help="print every stage's settings with defaults"),
    ) -> None:
        """Validate a config and print it with every default filled in."""
        import dataclasses

        import yaml

        if not defaults and config is None:
            raise UserError("pass a config file to validate it, or --defaults to print every default")
        cfg = _load(config, [])
        stages = _resolve(cfg, check_paths=False)  # a cluster config is often checked on a laptop
        resolved = {"run": cfg.model_dump(mode="json", exclude=set(stages) | {"retrain", "pt", "caf", "featloss"}), **stages}
        out = {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v) for k, v in resolved.items()}
        # PASM trains and attacks with the run's `teacher` and `attack` sections: show them there only.
        out["pasm"] = {k: v for k, v in out["pasm"].items() if k not in ("train", "attack")}
        from flows.methods import METHODS, method_defaults

        for name in METHODS:
            out[name] = method_defaults(name, stages.get(name))
        typer.echo(yaml.safe_dump(json.loads(json.dumps(out, default=list)), sort_keys=False))

