"""`fermine featloss`: handcrafted feature losses with adaptive loss weighting (Xie et al.).

  fermine featloss features TABLE OUT      GABOR, GSF and SIFT of every image, stored once as an artifact
  fermine featloss train TABLE OUT         one variant (no feature loss, GABOR, GSF, SIFT, fixed, adaptive ...)
  fermine featloss compare OUT             the comparison table (featloss pipeline), synthetic data by default
"""

from __future__ import annotations

from typing import Any, Optional

import typer

_VARIANT_HELP = ("none, gabor, gsf, sift, fixed (GSF + SIFT, alternative structure, fixed weights), adaptive "
                 "(alternative, adaptive weights), branched-fixed, branched-adaptive.")


def _splits(text: str, option: str) -> tuple[str, ...]:
    from flows.cli import UserError

    parts = tuple(s.strip() for s in text.split(",") if s.strip())
    if not parts:
        raise UserError(f"{option} must name at least one split (e.g. train)")
    return parts


def _table(uri: str, name: str) -> None:
    from flows.cli import UserError
    from storage.artifact import Artifact, ArtifactError, is_finished

    if not is_finished(uri):
        raise UserError(f"{name}: no finished image table at {uri}; check the path, or run `fermine ingest` first")
    try:
        names = Artifact(uri).schema.names
    except ArtifactError as e:
        raise UserError(f"{name}: {e}") from None
    if "image" not in names:
        raise UserError(f"{name}: {uri} is not an image table (no image column)")


def _config(**kw: Any):
    """FeatLossConfig from CLI options; ValueError -> UserError."""
    from flows.cli import UserError
    from tasks.featloss.method import FeatLossConfig
    from tasks.models import available_models

    if kw["arch"] not in available_models():
        raise UserError(f"unknown --arch {kw['arch']!r}; choose one of: {', '.join(available_models())}")
    try:
        return FeatLossConfig(**kw)
    except ValueError as e:
        raise UserError(str(e)) from None


def _common(arch: str, size: Optional[int], load_size: Optional[int], epochs: Optional[int],
            round_epochs: Optional[int], batch_size: Optional[int], lr: Optional[float], warmup: Optional[float],
            lambda_f1: Optional[float], lambda_f: Optional[float], rho: Optional[float], gamma: Optional[float],
            norm: int, no_balance: bool, no_five_crop: bool, train_split: str, val_split: str, seed: int,
            device: str) -> dict[str, Any]:
    """FeatLossConfig fields of the options; the unset (None) training options are left out, so the caller's
    defaults apply (FeatLossConfig's, or tasks.featloss.method.SYNTHETIC_RECIPE on the synthetic data)."""
    if load_size is None and size is not None:
        load_size = size + max(2, size // 8)
    optional = dict(input_size=size, load_size=load_size, epochs=epochs, round_epochs=round_epochs,
                    batch_size=batch_size, lr=lr, warmup=warmup, lambda_f1=lambda_f1, lambda_f2=lambda_f,
                    lambda_b=lambda_f, rho=rho, gamma=gamma)
    return dict(arch=arch, norm=norm, class_balanced=not no_balance, five_crop=not no_five_crop,
                train_splits=_splits(train_split, "--train-split"), val_splits=_splits(val_split, "--val-split"),
                seed=seed, device=device, **{k: v for k, v in optional.items() if v is not None})


def _results_table(rows: list[dict[str, Any]], title: str):
    """Compact enough for 80 columns; the variants are explained by `--help` and results.md."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title), box=box.SIMPLE_HEAD)
    table.add_column("Variant", no_wrap=True)
    for col in ("Acc. vote", "Mean cls acc.", "Acc. centre", "l1, l2"):
        table.add_column(col, justify="right", no_wrap=True)
    best = max((r["accuracy"] for r in rows if r.get("accuracy") is not None), default=None)
    pct = lambda v: "" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    for r in rows:
        acc = r.get("accuracy")
        lam = r.get("lambdas")
        table.add_row(r["variant"], f"[bold]{pct(acc)}[/]" if acc == best and len(rows) > 1 else pct(acc),
                      pct(r.get("mean_class_accuracy")), pct(r.get("accuracy_center")),
                      "" if not lam else f"{lam[0]:.2f}, {lam[1]:.2f}")
    return table


def register(app: typer.Typer) -> None:
    fl = typer.Typer(name="featloss", no_args_is_help=True, add_completion=False,
                     help="Handcrafted feature losses (GABOR, GSF, SIFT) with adaptive loss weighting.")
    app.add_typer(fl, name="featloss")

    @fl.command("features")
    def features_cmd(
        table: str = typer.Argument(..., help="Image table (e.g. from `fermine ingest`)."),
        out: str = typer.Argument(..., help="Output artifact folder; an existing one of the same table and "
                                  "settings is reused, not recomputed."),
        size: int = typer.Option(48, "--size", help="Images are converted to gray at SIZE x SIZE (paper: 227)."),
        gabor_grid: int = typer.Option(3, "--gabor-grid", help="n of the n x n GABOR patch grid (paper: 5)."),
        gsf_grid: int = typer.Option(4, "--gsf-grid", help="n of the GSF grid (paper: 8)."),
        sift_grid: int = typer.Option(4, "--sift-grid", help="n of the dense-SIFT grid (paper: 7)."),
        fit_split: str = typer.Option("train", "--fit-split", help="Comma-separated labeled splits that fit "
                                      "PCA + LDA (never the test split)."),
        mirror: bool = typer.Option(True, "--mirror/--no-mirror", help="Also store the mirrored images' features."),
    ) -> None:
        """Compute GABOR, GSF and dense-SIFT features of every image (once per data set)."""
        from rich.console import Console

        from flows.cli import UserError
        from flows.progress import progress_bar
        from storage.artifact import Artifact, is_finished
        from tasks.featloss.handcrafted import HandcraftedConfig, compute_features

        _table(table, "TABLE")
        try:
            cfg = HandcraftedConfig(size=size, gabor_grid=gabor_grid, gsf_grid=gsf_grid, sift_grid=sift_grid,
                                    fit_splits=_splits(fit_split, "--fit-split"), mirror=mirror)
        except ValueError as e:
            raise UserError(str(e)) from None
        existed = is_finished(out)
        try:
            with progress_bar("handcrafted features", len(Artifact(table))) as bar:
                m = compute_features(table, out, cfg, on_rows=lambda n: bar.advance(0, n))
        except ValueError as e:
            raise UserError(str(e)) from None
        dims = m.extra.get("dims", {})
        Console().print(f"{'reused' if existed else 'wrote'} {out}: {m.rows} images; dims "
                        + ", ".join(f"{k.upper()} {v}" for k, v in dims.items()))

    @fl.command("train")
    def train_cmd(
        table: str = typer.Argument(..., help="Image table with train (and val/test) splits."),
        out: str = typer.Argument(..., help="Output folder: model.pt + model.json (the checkpoint `fermine evaluate`, "
                                  "`predict` and `export` take), metrics.json, last.pt (a rerun resumes), "
                                  "test_metrics.json."),
        features: Optional[str] = typer.Option(None, "--features", help="Handcrafted-features artifact of TABLE "
                                               "(`fermine featloss features`); needed by every variant but none."),
        variant: str = typer.Option("adaptive", "--variant", help=_VARIANT_HELP),
        test_split: str = typer.Option("test", "--test-split", help="Comma-separated splits evaluated at the end."),
        arch: str = typer.Option("small_cnn", "--arch"),
        size: Optional[int] = typer.Option(None, "--size", help="Crop side fed to the network (default 48; "
                                           "paper: 227)."),
        load_size: Optional[int] = typer.Option(None, "--load-size", help="Side images are decoded at before the "
                                                "five crops (default: SIZE + SIZE/8; paper: 256)."),
        epochs: Optional[int] = typer.Option(None, "--epochs", help="Default 6."),
        round_epochs: Optional[int] = typer.Option(None, "--round-epochs", help="Epochs between loss-weight "
                                                   "updates (MaxIter; default 2)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Default 32."),
        lr: Optional[float] = typer.Option(None, "--lr", help="SGD rate, cosine-annealed (default 0.02)."),
        warmup: Optional[float] = typer.Option(None, "--warmup", "--warmup-epochs", help="Linear lr warm-up (epochs; "
                                               "default 0)."),
        lambda_f1: Optional[float] = typer.Option(None, "--lambda-f1", help="Initial weight of the feature loss on z "
                                                  "(GABOR; default 1e-4)."),
        lambda_f: Optional[float] = typer.Option(None, "--lambda-f", help="Initial weight of the feature losses on x "
                                                 "(lambda_F2, lambda_b; default 0.005)."),
        rho: Optional[float] = typer.Option(None, "--rho", help="Per-epoch decay of the feature-loss weights "
                                            "(Eq. 6; default 0.9)."),
        gamma: Optional[float] = typer.Option(None, "--gamma", help="Amplification of the better loss's weight "
                                              "(Eq. 10; default 1.2)."),
        norm: int = typer.Option(2, "--norm", help="p of the feature loss: 1 or 2."),
        no_balance: bool = typer.Option(False, "--no-balance", help="Plain SoftMax (no class weights, Eq. 13-14)."),
        no_five_crop: bool = typer.Option(False, "--no-five-crop", help="Centre crop only (no five-crop voting)."),
        train_split: str = typer.Option("train", "--train-split"),
        val_split: str = typer.Option("val", "--val-split", help="Validation split(s) (adaptive weighting)."),
        seed: int = typer.Option(0, "--seed"),
        device: str = typer.Option("auto", "--device"),
    ) -> None:
        """Train one feature-loss variant and evaluate it with five-crop + mirror voting.

        Unset training options take tasks.featloss.method.FeatLossConfig's defaults.
        """
        from rich.console import Console

        from flows.cli import UserError
        from flows.progress import progress_bar
        from storage.artifact import join
        from tasks.engine.checkpoint import atomic_write_bytes, dumps_json
        from tasks.featloss.method import (
            VARIANT_TITLES,
            evaluate_featloss,
            train_featloss,
            variant_config,
        )

        _table(table, "TABLE")
        base = _config(**_common(arch, size, load_size, epochs, round_epochs, batch_size, lr, warmup, lambda_f1,
                                 lambda_f, rho, gamma, norm, no_balance, no_five_crop, train_split, val_split, seed,
                                 device))
        try:
            cfg = variant_config(variant, base)
        except ValueError as e:
            raise UserError(str(e)) from None
        if cfg.features and not features:
            raise UserError(f"--variant {variant} uses {', '.join(cfg.features).upper()}: give --features (computed "
                            f"by `fermine featloss features {table} FEATURES`)")
        if features:
            _table_features(features)
        try:
            with progress_bar(f"featloss {variant}", None) as bar:
                def cb(d: dict[str, Any]) -> None:
                    if d["event"] == "step":
                        done = (d["epoch"] - 1) * d["steps"] + d["step"]
                        bar.update(0, total=d["steps"] * d["epochs"], completed=done,
                                   info=f"{d['phase']} epoch {d['epoch']}/{d['epochs']} loss {d['loss']:.3f}")

                res = train_featloss(cfg, table, features if cfg.features else None, out, progress=cb)
            m = evaluate_featloss(out, table, _splits(test_split, "--test-split"), device=device)
        except (ValueError, FloatingPointError) as e:
            raise UserError(str(e)) from None
        # metrics.json is the engine's record of the training (a rerun compares against it): the test metrics
        # go beside it.
        atomic_write_bytes(join(out, "test_metrics.json"), dumps_json(m).encode())
        row = {"variant": variant, "method": VARIANT_TITLES[variant], "lambdas": res.lambdas, **m}
        Console().print(_results_table([row], f"{table} [{test_split}], {m['n']} images"))

    @fl.command("compare")
    def compare_cmd(
        out: str = typer.Argument(..., help="Run folder: one sub-folder per stage, results.json/.md, report."),
        table: Optional[str] = typer.Option(None, "--table", help="Image table with train/val/test splits "
                                            "(default: the synthetic data set, generated under OUT)."),
        test: Optional[str] = typer.Option(None, "--test", help="Test table (default: the table)."),
        test_split: str = typer.Option("test", "--test-split"),
        variants: str = typer.Option("none,gabor,gsf,sift,fixed,adaptive", "--variants",
                                     help="Comma-separated rows of the table: " + _VARIANT_HELP),
        arch: str = typer.Option("small_cnn", "--arch"),
        size: Optional[int] = typer.Option(None, "--size", help="Crop side fed to the network (synthetic data: 32, "
                                           "else 48)."),
        load_size: Optional[int] = typer.Option(None, "--load-size", help="Decode side (default SIZE + SIZE/8)."),
        epochs: Optional[int] = typer.Option(None, "--epochs", help="Default 6."),
        round_epochs: Optional[int] = typer.Option(None, "--round-epochs", help="Synthetic data: 1, else 2."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Default 32."),
        lr: Optional[float] = typer.Option(None, "--lr", help="Synthetic data: 0.05, else 0.02."),
        warmup: Optional[float] = typer.Option(None, "--warmup", "--warmup-epochs", help="Linear lr warm-up (epochs; "
                                               "synthetic data: 1, else 0)."),
        lambda_f1: Optional[float] = typer.Option(None, "--lambda-f1", help="Default 1e-4."),
        lambda_f: Optional[float] = typer.Option(None, "--lambda-f", help="Default 0.05."),
        rho: Optional[float] = typer.Option(None, "--rho", help="Default 0.9."),
        gamma: Optional[float] = typer.Option(None, "--gamma", help="Default 1.2."),
        norm: int = typer.Option(2, "--norm"),
        no_balance: bool = typer.Option(False, "--no-balance"),
        no_five_crop: bool = typer.Option(False, "--no-five-crop"),
        train_split: str = typer.Option("train", "--train-split"),
        val_split: str = typer.Option("val", "--val-split"),
        seed: int = typer.Option(0, "--seed"),
        device: str = typer.Option("auto", "--device"),
        synthetic_option: Optional[list[str]] = typer.Option(
            None, "--synthetic-option", help="key=value setting of the synthetic data (e.g. train_per_class=150); "
            "repeatable."),
        report: bool = typer.Option(True, "--report/--no-report", help="Write the run's HTML report."),
    ) -> None:
        """Compare no feature loss, GABOR, GSF, SIFT, fixed and adaptive weighting (the featloss pipeline).

        On the synthetic data (no --table) the unset training options come from
        tasks.featloss.method.SYNTHETIC_RECIPE and the data from tasks.featloss.method.SYNTHETIC_DATA: the
        featloss pipeline (flows/featloss.py) that bench/fidelity.py runs once per seed.
        """
        from rich.console import Console

        from flows.cli import UserError
        from flows.commands.ingest import parse_options
        from tasks.featloss.method import VARIANTS

        names = [v.strip() for v in variants.split(",") if v.strip()]
        unknown = [v for v in names if v not in VARIANTS]
        if not names or unknown:
            raise UserError(f"--variants: unknown {unknown or 'empty list'}; choose from {', '.join(VARIANTS)}")
        if table:
            _table(table, "--table")
        if test:
            _table(test, "--test")
        given = _common(arch, size, load_size, epochs, round_epochs, batch_size, lr, warmup, lambda_f1, lambda_f, rho,
                        gamma, norm, no_balance, no_five_crop, train_split, val_split, seed, device)
        if not table:
            from tasks.featloss.method import SYNTHETIC_RECIPE

            given = {**SYNTHETIC_RECIPE, **given}
        base = _config(**given)
        synth = parse_options(list(synthetic_option or []))
        if not table:
            from flows.featloss import synthetic_options
            from storage.synthetic import config_from_options

            synth = {"size": base.load_size, **synth}
            try:
                config_from_options(**synthetic_options(synth))
            except ValueError as e:
                raise UserError(str(e)) from None
        from flows.commands.run import _resolve, _run_flow, build_config

        # The variant sets the feature-loss fields; the rest is the config every variant trains with.
        cfg = {k: v for k, v in base.to_dict().items()
               if k not in ("z_feature", "x_features", "structure", "adaptive")}
        run_cfg = build_config({
            "name": "featloss", "out": out, "pipeline": "featloss", "seed": seed, "report": report,
            "featloss": {"table_uri": table, "test_uri": test, "test_splits": list(_splits(test_split, "--test-split")),
                         "variants": names, "config": cfg, "synthetic": synth, "report": report}})
        _resolve(run_cfg)  # as `fermine run` does: every setting checked before the flow starts
        try:
            summary = _run_flow(run_cfg)
        except (ValueError, FloatingPointError) as e:  # ConfigError, a table without the splits, divergence
            raise UserError(str(e)) from None
        rows = []
        for name, m in summary["metrics"].items():
            vote, centre = m["test (5-crop + mirror vote)"], m["test (centre crop)"]
            rows.append({"variant": name, "method": m.get("method"), "accuracy": vote["accuracy"],
                         "mean_class_accuracy": vote["mean_class_accuracy"], "accuracy_center": centre["accuracy"],
                         "lambdas": m.get("lambdas")})
        Console().print(_results_table(rows, f"feature losses on {summary['test_uri']} [{test_split}]"))
        Console().print(f"results: {out.rstrip('/')}/results.json, results.md")


def _table_features(uri: str) -> None:
    from flows.cli import UserError
    from storage.artifact import Artifact, ArtifactError, is_finished
    from tasks.featloss.handcrafted import STAGE

    if not is_finished(uri):
        raise UserError(f"--features: no finished features artifact at {uri}; compute it with "
                        "`fermine featloss features TABLE OUT`")
    try:
        stage = Artifact(uri).manifest.stage
    except ArtifactError as e:
        raise UserError(f"--features: {e}") from None
    if stage != STAGE:
        raise UserError(f"--features: {uri} is a {stage!r} artifact, not handcrafted features")
