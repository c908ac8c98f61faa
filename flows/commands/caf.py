"""`fermine caf [TABLE] OUT`: valence/arousal regression with the Contrastive Adversarial Framework.

Trains CAF (or the critic-free baseline) on an image table with valence/arousal, evaluates it on a
test table and prints the paper's Table 1 columns; ``--compare`` trains both and prints them side by side.
TABLE defaults to ``synthetic``: the embedded synthetic data set, generated once under OUT/data.
"""

from __future__ import annotations

from typing import Any, Optional

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


def register(app: typer.Typer) -> None:
    @app.command("caf")
    def caf(
        train_table: Optional[str] = typer.Argument(
            None, metavar="TABLE", show_default=False,
            help="Image table with valence/arousal (e.g. from `fermine ingest affectnet|afewva ...`), or 'synthetic' "
            "(the default when only OUT is given): the embedded synthetic data set, generated once under OUT/data."),
        out: Optional[str] = typer.Argument(None, metavar="OUT", show_default=False,
                                            help="Output folder: checkpoint (model.pt/model.json), metrics.json, "
                                            "scatter.png; with --compare OUT/baseline, OUT/caf and OUT/results.json."),
        test: Optional[str] = typer.Option(None, "--test", help="Table to evaluate on, or 'synthetic' "
                                           "(default: TABLE)."),
        test_splits: str = typer.Option("test", "--test-splits", help="Comma-separated splits of the test table, "
                                        "or 'all'."),
        train_splits: str = typer.Option("train", "--train-splits", help="Comma-separated splits to train on."),
        compare: bool = typer.Option(False, "--compare", help="Train the baseline (no critic) and CAF with the "
                                     "same settings and print both (paper Table 1/4)."),
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
                                            "baseline/CAF pair each (OUT/seed-S/...); the table shows the means "
                                            "and results.json the per-seed metrics and paired differences."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
        pretrained: Optional[str] = typer.Option(None, "--pretrained", help="Local encoder weights (file or "
                                                 "checkpoint folder)."),
        synthetic_option: Optional[list[str]] = typer.Option(
            None, "--synthetic-option", help="key=value setting of the synthetic data (storage.synthetic."
            "SyntheticConfig, e.g. train_per_class=50); repeatable. Default: tasks.caf.method.SYNTHETIC_DATA (500 "
            "train + 100 test faces per class at --size, no pool)."),
    ) -> None:
        """Valence/arousal regression with the Contrastive Adversarial Framework (CAF).

        `fermine caf OUT --compare` trains the critic-free baseline and CAF on the synthetic data and prints
        the Table 1 comparison; `fermine caf TABLE OUT` trains on your own table. On the synthetic data the
        unset training options come from tasks.caf.method.SYNTHETIC_RECIPE (what benchmarks run), otherwise from the
        paper (tasks.caf.method.CAFConfig).
        """
        from rich.console import Console

        from flows.cli import UserError
        from flows.progress import progress_bar
        from storage.artifact import is_finished
        from tasks.caf.method import SYNTHETIC_RECIPE, CAFConfig, compare_caf, evaluate_va, train_caf
        from tasks.engine.checkpoint import atomic_write_bytes, dumps_json

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
            try:
                seed_list = [int(x) for x in seeds.split(",") if x.strip()]
            except ValueError:
                raise UserError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
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
        try:
            if compare:
                with progress_bar("caf --compare", None) as bar:
                    def cb(name: str, d: dict[str, Any]) -> None:
                        bar.update(0, total=d["total"], completed=d["iteration"],
                                   info=f"{name} ep {d['epoch']}/{d['epochs']} L_AV {d['loss_av']:.3f}")

                    res = compare_caf(cfg, train_table, out, test_uri, te_splits, progress=cb, seeds=seed_list)
                rows = res["rows"]
            else:
                name = "CAF" if cfg.critic else "baseline"
                with progress_bar(f"{name} {arch}", None) as bar:
                    def cb1(d: dict[str, Any]) -> None:
                        bar.update(0, total=d["total"], completed=d["iteration"],
                                   info=f"ep {d['epoch']}/{d['epochs']} L_AV {d['loss_av']:.3f}")

                    result = train_caf(cfg, train_table, out, progress=cb1)
                m = evaluate_va(out, test_uri, te_splits, device=device, scatter_png=out.rstrip("/") + "/scatter.png")
                rows = {name: m}
                atomic_write_bytes(out.rstrip("/") + "/test_metrics.json",
                                   dumps_json({"test_uri": test_uri, "splits": te_splits, **m}).encode())
                if any(result.skipped.values()):
                    console.print(f"training rows skipped: {result.skipped}")
        except (ValueError, FloatingPointError) as e:  # no V/A, bad split or arch, config clash on resume, divergence
            raise UserError(str(e)) from None
        where = f"{test_uri} [{','.join(te_splits) if te_splits else 'all rows'}]"
        title = f"valence/arousal on {where}"
        if seed_list is not None and len(seed_list) > 1:
            title += f", mean of seeds {','.join(map(str, seed_list))}"
        console.print(results_table(rows, title))
        if seed_list is not None and len(seed_list) > 1:
            p = res["paired"]
            console.print("CAF - baseline per seed (mean +- se): " + ", ".join(
                f"{k} {p[k]['mean']:+.3f} +- {p[k]['se']:.3f}" for k in ("rmse_v", "rmse_a", "ccc_v", "ccc_a")))
        skipped = next(iter(rows.values())).get("skipped") or {}
        if any(skipped.values()):
            console.print(f"test rows skipped: {skipped}")
        console.print(f"checkpoints and scatter plots under [bold]{out}[/]")
