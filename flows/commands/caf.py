"""`fermine caf [TABLE] OUT`: valence/arousal regression with the Contrastive Adversarial Framework.

Trains CAF (or the critic-free baseline) on an image table with valence/arousal, evaluates it on a
test table and prints the paper's Table 1 columns. ``--compare`` runs the caf pipeline (flows/caf.py:
train and evaluate the baseline and CAF as stages, reused by a rerun; `fermine status OUT`) and prints
both side by side; with ``--seeds`` one pipeline run per seed (OUT/seed-S), then the mean +- std over
seeds and the paired difference CAF - baseline. TABLE defaults to ``synthetic``: the embedded synthetic
data set, generated once under OUT/data.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import typer

SYNTHETIC = "synthetic"  # same word as flows.caf.SYNTHETIC (not imported: keeps `fermine --help` light)
_METRIC_HEADERS = ("RMSE V", "RMSE A", "SAGR V", "SAGR A", "PCC V", "PCC A", "CCC V", "CCC A")


def _splits(text: str) -> tuple[str, ...] | None:
    """'train,val' -> ('train', 'val'); 'all' -> None (every row)."""
    parts = tuple(s.strip() for s in text.split(",") if s.strip())
    return None if parts in ((), ("all",)) else parts


def results_table(rows: dict[str, dict[str, Any]], title: str):
    """A rich Table in the layout of the paper's Table 1 (best value of each column in bold; 3 decimals,
    full precision is in the JSON files)."""
    import math

    from rich import box
    from rich.table import Table

    from tasks.caf.va_metrics import VA_METRICS

    # Compact enough for an 80-column terminal (and for logs, where rich assumes 80).
    ns = {r.get("n") for r in rows.values()}
    same_n = len(ns) == 1
    if same_n:
        title = f"{title}, n = {ns.pop()}"
    from rich.markup import escape

    table = Table(title=escape(title), box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)  # "[test]" is no tag
    table.add_column("Method", no_wrap=True)
    for h in _METRIC_HEADERS:
        table.add_column(h, justify="right", no_wrap=True)
    if not same_n:
        table.add_column("n", justify="right", no_wrap=True)
    best: dict[str, float] = {}
    for k in VA_METRICS:
        vals = [r[k] for r in rows.values() if isinstance(r.get(k), float) and math.isfinite(r[k])]
        if len(vals) > 1:
            best[k] = min(vals) if k.startswith("rmse") else max(vals)
    for name, r in rows.items():
        cells = []
        for k in VA_METRICS:
            v = r.get(k)
            s = "nan" if v is None or not math.isfinite(v) else f"{v:.3f}"
            cells.append(f"[bold]{s}[/]" if k in best and v == best[k] else s)
        table.add_row(name, *cells, *([] if same_n else [str(r.get("n", ""))]))
    return table


def _table_splits(uri: str) -> list[str]:
    """Every split of an image table, in first-seen order (``--test-splits all`` for the pipeline, which
    tests on named splits)."""
    from storage.artifact import Artifact

    return list(dict.fromkeys(Artifact(uri).read(columns=["split"]).column("split").to_pylist()))


def _check_splits(uri: str, splits: Sequence[str], option: str) -> None:
    """UserError before the pipeline starts (not a failed stage an hour in) when a split is not in the table."""
    from flows.cli import UserError

    have = _table_splits(uri)
    missing = [s for s in splits if s not in have]
    if missing:
        raise UserError(f"{option}: {uri} has no split(s) {missing}; its splits: {', '.join(have) or 'none'}")


def _run_pipeline(out: str, name: str, cfg: Any, train_uri: str, test_uri: str, splits: list[str]) -> dict[str, Any]:
    """One run of the caf pipeline (pipeline: caf, flows/caf.py) into ``out``: baseline and CAF trained
    with ``cfg`` (every CAFConfig field given, so the run does not depend on the recipe the flow would
    pick) and tested on ``splits`` of ``test_uri``; a rerun reuses its finished stages."""
    from flows.cli import UserError
    from flows.commands.run import _resolve, _run_flow, build_config

    run_cfg = build_config({
        "name": name, "out": out, "pipeline": "caf", "seed": cfg.seed,
        "caf": {"train_uri": train_uri, "test_uri": test_uri, "test_splits": splits, "config": cfg.to_dict(),
                "compare": True}})
    _resolve(run_cfg)  # as `fermine run` does: every setting checked before the flow starts
    try:
        return _run_flow(run_cfg)
    except (ValueError, FloatingPointError) as e:  # no V/A, bad split or arch, divergence
        raise UserError(str(e)) from None


def seed_summary(per_seed: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Over seeds: each model's metrics as mean (``k``) and sample std (``k_std``), and per metric the
    paired (same seed) difference CAF - baseline with its standard error (tasks.metrics.paired_seed_differences)."""
    import numpy as np

    from tasks.caf.va_metrics import VA_METRICS
    from tasks.metrics import paired_seed_differences

    rows: dict[str, dict[str, Any]] = {}
    for name, runs in per_seed.items():
        vals = {k: np.array([r[k] for r in runs], dtype=np.float64) for k in VA_METRICS}
        rows[name] = {**{k: float(v.mean()) for k, v in vals.items()},
                      **{f"{k}_std": float(v.std(ddof=1)) if len(v) > 1 else float("nan") for k, v in vals.items()},
                      "n": runs[0].get("n"), "skipped": runs[0].get("skipped"), "seeds": [r["seed"] for r in runs]}
    paired = {}
    for k in VA_METRICS:
        d = paired_seed_differences([r[k] for r in per_seed["baseline"]], [r[k] for r in per_seed["caf"]])
        paired[k] = {"diffs": list(d.diffs), "mean": d.mean, "se": d.se, "z": d.t}
    return {"rows": rows, "paired": paired}


def seeds_table(summary: dict[str, Any], title: str):
    """Per metric: baseline and CAF as mean +- std over seeds, and CAF - baseline +- its paired se."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    from tasks.caf.va_metrics import VA_METRICS

    rows, paired = summary["rows"], summary["paired"]
    table = Table(title=escape(title), box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    for col in ("Metric", "baseline", "CAF", "CAF - baseline"):
        table.add_column(col, justify="left" if col == "Metric" else "right", no_wrap=True)
    for k in VA_METRICS:
        cells = [f"{rows[n][k]:.3f} +- {rows[n][f'{k}_std']:.3f}" for n in ("baseline", "caf")]
        table.add_row(k.replace("_", " ").upper(), *cells,
                      f"{paired[k]['mean']:+.3f} +- {paired[k]['se']:.3f}")
    return table


def compare_over_seeds(out: str, cfg: Any, train_uri: str, test_uri: str, splits: list[str],
                       seeds: list[int]) -> dict[str, Any]:
    """One caf pipeline run per seed into ``<out>/seed-<s>`` (the seed sets initialisation, batch order and
    flips; data and test set stay the same), then seed_summary; writes and returns ``<out>/results.json``:
    {"rows": means and stds per model, "paired": CAF - baseline per metric, "per_seed": {model: [metrics of
    each seed, with "seed", "run", "checkpoint"]}, "seeds", "runs", the data, the config}."""
    import dataclasses
    import time

    from storage.artifact import join
    from tasks.caf.va_metrics import VA_METRICS
    from tasks.engine.checkpoint import atomic_write_bytes, dumps_json

    t0 = time.time()
    per_seed: dict[str, list[dict[str, Any]]] = {}
    runs: dict[str, str] = {}
    for seed in seeds:
        run = join(out, f"seed-{seed}")
        summary = _run_pipeline(run, f"caf-seed-{seed}", dataclasses.replace(cfg, seed=seed), train_uri, test_uri,
                                splits)
        runs[str(seed)] = run
        for name, m in summary["rows"].items():
            per_seed.setdefault(name, []).append(
                {**{k: m[k] for k in (*VA_METRICS, "n", "skipped") if k in m}, "seed": seed, "run": run,
                 "checkpoint": m.get("checkpoint"), "scatter_png": m.get("scatter_png")})
    result = {"train_uri": train_uri, "test_uri": test_uri, "test_splits": splits, "config": cfg.to_dict(),
              "seeds": seeds, "runs": runs, **seed_summary(per_seed), "per_seed": per_seed,
              "seconds": time.time() - t0}
    atomic_write_bytes(join(out, "results.json"), dumps_json(result).encode())
    return result


def register(app: typer.Typer) -> None:
    @app.command("caf")
    def caf(
        train_table: Optional[str] = typer.Argument(
            None, metavar="TABLE", show_default=False,
            help="Image table with valence/arousal (e.g. from `fermine ingest affectnet|afewva ...`), or 'synthetic' "
            "(the default when only OUT is given): the embedded synthetic data set, generated once under OUT/data."),
        out: Optional[str] = typer.Argument(None, metavar="OUT", show_default=False,
                                            help="Output folder: checkpoint (model.pt/model.json), metrics.json, "
                                            "scatter.png; with --compare the caf pipeline's run folder (a folder "
                                            "per stage, results.json; `fermine status OUT`)."),
        test: Optional[str] = typer.Option(None, "--test", help="Table to evaluate on, or 'synthetic' "
                                           "(default: TABLE)."),
        test_splits: str = typer.Option("test", "--test-splits", help="Comma-separated splits of the test table, "
                                        "or 'all'."),
        train_splits: str = typer.Option("train", "--train-splits", help="Comma-separated splits to train on."),
        compare: bool = typer.Option(False, "--compare", help="Run the caf pipeline: train the baseline (no "
                                     "critic) and CAF with the same settings as stages (a rerun reuses them) and "
                                     "print both (paper Table 1/4)."),
        no_critic: bool = typer.Option(False, "--no-critic", help="Train the baseline regressor only."),
        margin: str = typer.Option("adaptive", "--margin", help="Critic margin: adaptive (MI + Delta), constant "
                                   "(MI + kappa), linear (MI + 0.1 + 5e-3 epoch): Table 4's ablation."),
        arch: str = typer.Option("small_cnn", "--arch", help="Encoder: small_cnn, resnet18, resnet34, resnet50, vgg16."),
        size: Optional[int] = typer.Option(None, "--size", min=16, help="Input size in pixels (default: 32 on "
                                           "the synthetic data, else 64)."),
        epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Passes over the training rows "
                                             "(default: 8 on the synthetic data, else 10)."),
        iterations: Optional[int] = typer.Option(None, "--iterations", min=1, help="Total updates (overrides "
                                                 "--epochs; the paper uses 50000)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", min=4, help="Default: 64 on the synthetic "
                                                 "data, else 128 (paper)."),
        lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate (default: 2e-3 on the synthetic "
                                           "data, else the paper's 1e-4)."),
        lr_step: Optional[int] = typer.Option(None, "--lr-step", min=1, help="Iterations between lr decays "
                                              "(default: 87 on the synthetic data, else the paper's 10000)."),
        lr_gamma: Optional[float] = typer.Option(None, "--lr-gamma", help="lr decay factor (default: 0.6 on the "
                                                 "synthetic data, else the paper's 0.8)."),
        adv_weight: float = typer.Option(1.0, "--adv-weight", help="Weight of the encoder's adversarial loss."),
        kappa: float = typer.Option(0.2, "--kappa", help="Margin term of --margin constant."),
        seed: int = typer.Option(0, "--seed"),
        seeds: Optional[str] = typer.Option(None, "--seeds", help="With --compare: comma-separated seeds, one "
                                            "caf pipeline run each (OUT/seed-S); prints mean +- std over seeds "
                                            "and the paired difference CAF - baseline, and OUT/results.json "
                                            "holds the per-seed metrics and those summaries."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
        pretrained: Optional[str] = typer.Option(None, "--pretrained", help="Local encoder weights (file or "
                                                 "checkpoint folder)."),
        synthetic_option: Optional[list[str]] = typer.Option(
            None, "--synthetic-option", help="key=value setting of the synthetic data (storage.synthetic."
            "SyntheticConfig, e.g. train_per_class=50); repeatable. Default: tasks.caf.method.SYNTHETIC_DATA (500 "
            "train + 100 test faces per class at --size, no pool)."),
    ) -> None:
        """Valence/arousal regression with the Contrastive Adversarial Framework (CAF).

        `fermine caf OUT --compare` runs the caf pipeline (flows/caf.py) on the synthetic data: the
        critic-free baseline and CAF as stages, and the Table 1 comparison; `fermine caf TABLE OUT` trains one
        model on your own table. On the synthetic data the unset training options come from
        tasks.caf.method.SYNTHETIC_RECIPE (what benchmarks run), otherwise from the paper (tasks.caf.method.CAFConfig).
        """
        from rich.console import Console

        from flows.cli import UserError
        from storage.artifact import is_finished
        from tasks.caf.method import SYNTHETIC_RECIPE, CAFConfig

        if out is None:  # one argument: it is OUT, and the table is the synthetic data set
            if train_table in (None, SYNTHETIC):
                raise UserError("missing argument OUT: `fermine caf [TABLE] OUT` (TABLE defaults to synthetic)")
            if is_finished(train_table):
                raise UserError(f"missing argument OUT: {train_table} is an image table; give an output folder "
                                f"after it (`fermine caf {train_table} OUT`)")
            train_table, out = SYNTHETIC, train_table
        if is_finished(out):
            raise UserError(f"OUT {out} is a finished artifact (an image table?); give a folder for the run")
        if synthetic_option and SYNTHETIC not in (train_table, test):
            raise UserError("--synthetic-option applies to the synthetic data set only (TABLE or --test synthetic)")
        if compare and no_critic:
            raise UserError("--compare already trains the baseline; drop --no-critic")
        tr_splits = _splits(train_splits)
        if tr_splits is None:
            raise UserError("--train-splits must name splits (e.g. train)")
        te_splits = _splits(test_splits)
        seed_list = None
        if seeds is not None:
            if not compare:
                raise UserError("--seeds applies to --compare (use --seed for one model)")
            seed_list = _seed_list(seeds)
        given = {"input_size": size, "epochs": epochs, "batch_size": batch_size, "lr": lr, "lr_step": lr_step,
                 "lr_gamma": lr_gamma}
        # Unset options: the synthetic recipe when training on the synthetic data, else CAFConfig's (the paper's).
        recipe = SYNTHETIC_RECIPE if train_table == SYNTHETIC else {}
        training = {**recipe, **{k: v for k, v in given.items() if v is not None}}
        try:
            cfg = CAFConfig(arch=arch, iterations=iterations, critic=not no_critic, margin=margin,
                            kappa=kappa, adv_weight=adv_weight, train_splits=tr_splits,
                            val_splits=te_splits or ("test",), seed=seed, device=device, pretrained=pretrained,
                            **training)
        except ValueError as e:
            raise UserError(str(e)) from None
        size = cfg.input_size
        console = Console()
        if SYNTHETIC in (train_table, test):
            from flows.caf import synthetic_table
            from flows.commands.ingest import parse_options

            try:
                with console.status("generating the synthetic data set (once, then reused)"):
                    synth = synthetic_table(out, size, parse_options(list(synthetic_option or [])))
            except ValueError as e:
                raise UserError(str(e)) from None
            console.print(f"synthetic data set: {synth}")
            train_table = synth if train_table == SYNTHETIC else train_table
            test = synth if test == SYNTHETIC else test
        for name, uri in (("TABLE", train_table), ("--test", test)):
            if uri is not None and not is_finished(uri):
                raise UserError(f"{name}: no finished image table at {uri}; check the path, or run `fermine ingest` "
                                "first (or use 'synthetic')")
        test_uri = test or train_table
        if compare:
            # The pipeline tests on named splits: 'all' is every split the test table has.
            splits = list(te_splits) if te_splits is not None else _table_splits(test_uri)
            _check_splits(train_table, cfg.train_splits, "--train-splits")
            _check_splits(test_uri, splits, "--test-splits")
            _compare(console, cfg, train_table, test_uri, splits, out, seed_list)
        else:
            _train_one(console, cfg, train_table, test_uri, te_splits, out)


def _seed_list(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; UserError unless distinct integers."""
    from flows.cli import UserError

    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds must name distinct seeds (e.g. 0,1,2), got {text!r}")
    return seeds


def _train_one(console: Any, cfg: Any, train_uri: str, test_uri: str, splits: tuple[str, ...] | None,
               out: str) -> None:
    """The single-stage command: train one model into OUT directly (train_caf), test it, print its row."""
    from flows.cli import UserError
    from flows.progress import progress_bar
    from tasks.caf.method import evaluate_va, train_caf
    from tasks.engine.checkpoint import atomic_write_bytes, dumps_json

    name = "CAF" if cfg.critic else "baseline"
    try:
        with progress_bar(f"{name} {cfg.arch}", None) as bar:
            def cb(d: dict[str, Any]) -> None:
                bar.update(0, total=d["total"], completed=d["iteration"],
                           info=f"ep {d['epoch']}/{d['epochs']} L_AV {d['loss_av']:.3f}")

            result = train_caf(cfg, train_uri, out, progress=cb)
        m = evaluate_va(out, test_uri, splits, device=cfg.device, scatter_png=out.rstrip("/") + "/scatter.png")
    except (ValueError, FloatingPointError) as e:  # no V/A, bad split or arch, config clash on resume, divergence
        raise UserError(str(e)) from None
    atomic_write_bytes(out.rstrip("/") + "/test_metrics.json",
                       dumps_json({"test_uri": test_uri, "splits": splits, **m}).encode())
    if any(result.skipped.values()):
        console.print(f"training rows skipped: {result.skipped}")
    _print_rows(console, {name: m}, f"valence/arousal on {_where(test_uri, splits)}")
    console.print(f"checkpoint and scatter plot under [bold]{out}[/]")


def _compare(console: Any, cfg: Any, train_uri: str, test_uri: str, splits: list[str], out: str,
             seeds: list[int] | None) -> None:
    """--compare: the caf pipeline into OUT, or with ``seeds`` one run per seed and their summary."""
    title = f"valence/arousal on {_where(test_uri, splits)}"
    if seeds is None:
        rows = _run_pipeline(out, "caf", cfg, train_uri, test_uri, splits)["rows"]
        _print_rows(console, rows, title)
        console.print(f"checkpoints and scatter plots under [bold]{out}[/] (stages: `fermine status {out}`)")
        return
    res = compare_over_seeds(out, cfg, train_uri, test_uri, splits, seeds)
    seed_text = ",".join(map(str, seeds))
    _print_rows(console, res["rows"], title + (f", mean of seeds {seed_text}" if len(seeds) > 1 else ""))
    if len(seeds) > 1:
        console.print(seeds_table(res, f"over seeds {seed_text}: mean +- std, CAF - baseline +- se (paired)"))
    console.print(f"per-seed runs under [bold]{out}[/]/seed-S (stages: `fermine status {out}/seed-{seeds[0]}`); "
                  f"per-seed metrics and paired differences in {out.rstrip('/')}/results.json")


def _where(test_uri: str, splits: Sequence[str] | None) -> str:
    return f"{test_uri} [{','.join(splits) if splits else 'all rows'}]"


def _print_rows(console: Any, rows: dict[str, dict[str, Any]], title: str) -> None:
    console.print(results_table(rows, title))
    skipped = next(iter(rows.values())).get("skipped") or {}
    if any(skipped.values()):
        console.print(f"test rows skipped: {skipped}")
