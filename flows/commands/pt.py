"""`fermine pt`: Progressive Teacher (semi-supervised, noisy labels), optionally against its baselines."""

from __future__ import annotations

from typing import Any, List, Optional

import typer

SYNTHETIC = "synthetic"  # same word as flows.pt.SYNTHETIC (not imported: keeps `fermine --help` light)
DEFAULT_COMPARE_RATES = (0.0, 0.1, 0.2, 0.3)
SYNTHETIC_PRETRAIN_DEFAULT = True


def _split_list(values: list[str] | None, default: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """Repeatable/comma-separated split options; "all" means every split (None)."""
    if not values:
        return default
    out = tuple(s.strip() for v in values for s in v.split(",") if s.strip())
    return None if "all" in out else out


def _pct(rate: float) -> str:
    return f"{100 * rate:g}"


def register(app: typer.Typer) -> None:
    @app.command("pt")
    def pt_cmd(
        labeled: str = typer.Argument(..., help="Labeled image table (its --train-split rows are trained on), "
                                      "or 'synthetic' for the embedded synthetic data set."),
        pool: str = typer.Argument(..., help="Unlabeled pool image table (labels ignored), 'synthetic', or '-' "
                                   "for none."),
        test: str = typer.Argument(..., help="Test image table (its --test-split rows), or 'synthetic'."),
        out: str = typer.Argument(..., help="Output folder: one sub-folder per noise rate and method."),
        noise: Optional[List[float]] = typer.Option(None, help="Label-noise rate(s) injected into the training "
                                                    "split, repeatable (0.3 = 30%). Default: 0, or 0/0.1/0.2/0.3 "
                                                    "with --compare."),
        noise_kind: str = typer.Option("symmetric", help="symmetric (uniform to other classes) or asymmetric "
                                       "(fear <-> surprise)."),
        noise_seed: int = typer.Option(0, help="Seed of the injected label noise."),
        compare: bool = typer.Option(False, "--compare", help="Also train the fine-tune baseline and Mean Teacher "
                                     "at every noise rate and print a Table-4-like comparison."),
        epochs: Optional[int] = typer.Option(None, help="Epochs N (paper: 6; synthetic recipe: 10)."),
        batch_size: Optional[int] = typer.Option(None, help="Images per mini-batch (paper: 200; synthetic: 64)."),
        labeled_fraction: float = typer.Option(0.25, help="Labeled share of each mini-batch (paper: 1/4)."),
        lr: float = typer.Option(0.01, help="Initial learning rate (paper: 0.01)."),
        lr_step: Optional[List[int]] = typer.Option(None, help="Epoch(s) after which lr is multiplied by "
                                                    "--lr-gamma (paper: 3; synthetic: 5)."),
        lr_gamma: float = typer.Option(0.1, help="Learning-rate decay factor."),
        momentum: float = typer.Option(0.9, help="SGD momentum."),
        weight_decay: float = typer.Option(5e-4, help="SGD weight decay (paper: 5e-4)."),
        forget_rate: Optional[float] = typer.Option(None, help="r: final fraction of labeled samples filtered out "
                                                    "per batch. Default: the paper's rule (noise rate + "
                                                    "--forget-margin for symmetric noise, 0.05 without noise)."),
        forget_margin: Optional[float] = typer.Option(None, help="What the rule adds to a symmetric noise rate "
                                                      "(paper, RAF-DB: 0.1; synthetic: 0, its labels are clean)."),
        turn_iters: Optional[int] = typer.Option(None, "--turn-iters", "-T", help="T: iteration at which R(t) "
                                                 "reaches 1 - r (paper: 300; synthetic: 130)."),
        ema_max: Optional[float] = typer.Option(None, help="Cap of the teachers' EMA coefficient alpha = min(1 - "
                                                "1/(1 + iter), cap) (paper: 0.999; synthetic: 0.99)."),
        consistency_max: float = typer.Option(10.0, help="Final consistency weight: w = max * exp(-shape * "
                                              "(1 - epoch/N)^2) (paper: 10)."),
        consistency_shape: float = typer.Option(5.0, help="Shape of the consistency ramp-up (paper: 5)."),
        ratio: str = typer.Option("progressive", help="progressive (Eq. 8) or fixed (R = 1 - r throughout)."),
        guidance: str = typer.Option("cross", help="cross (teachers select for the other pair's student) or same."),
        consistency_guidance: Optional[str] = typer.Option(None, help="cross or same; default: as --guidance."),
        pairs: int = typer.Option(2, help="Teacher-student pairs (1 needs --guidance same)."),
        confidence: bool = typer.Option(False, "--confidence/--no-confidence", help="Confidence-estimator "
                                        "extension (Section 4.6): keep large-loss samples the teacher is sure of."),
        confidence_threshold: float = typer.Option(0.9, help="Confidence above which a large-loss sample is kept."),
        arch: str = typer.Option("small_cnn", help="small_cnn (CPU), resnet18, resnet34, resnet50, vgg16."),
        size: Optional[int] = typer.Option(None, help="Input side in pixels (paper: 112; default 64; synthetic: 48)."),
        pretrained: Optional[str] = typer.Option(None, help="Local weights file or checkpoint folder for every "
                                                 "method's backbone."),
        synthetic_pretrain: bool = typer.Option(SYNTHETIC_PRETRAIN_DEFAULT, "--synthetic-pretrain/--no-synthetic-pretrain",
                                                help="With LABELED 'synthetic' and no --pretrained: start every "
                                                "method from a backbone pretrained once (reused) on the clean, "
                                                "differently rendered style-b synthetic faces of other people, the "
                                                "stand-in for the paper's pretrained ResNet-18 (no downloads here)."),
        split_bn: bool = typer.Option(False, "--split-bn/--no-split-bn", help="Forward labeled and pool images in "
                                      "separate passes so BatchNorm statistics never mix them (not in the paper)."),
        seed: int = typer.Option(0, help="Seed of initialisation, batches and augmentation."),
        device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda, cuda:N."),
        train_split: Optional[List[str]] = typer.Option(None, help="Training split(s) of LABELED (default: train)."),
        pool_split: Optional[List[str]] = typer.Option(None, help="Split(s) of POOL used (default: all rows; "
                                                       "'pool' when POOL is synthetic)."),
        test_split: Optional[List[str]] = typer.Option(None, help="Split(s) of TEST (default: test)."),
        val: Optional[str] = typer.Option(None, help="Validation table: picks the best teacher/epoch by accuracy."),
        val_split: Optional[List[str]] = typer.Option(None, help="Split(s) of --val (default: val)."),
        synthetic_option: Optional[List[str]] = typer.Option(None, "--synthetic-option", help="key=value setting "
                                                             "of the synthetic data (storage.synthetic.SyntheticConfig"
                                                             ", e.g. train_per_class=150, pool_size=2100, "
                                                             "intensity_min=0.6); repeatable."),
        report: bool = typer.Option(True, "--report/--no-report", help="Write the filtered-samples report "
                                    "(per-class table + image grid) of every PT run."),
    ) -> None:
        """Progressive Teacher: two EMA teachers pick small-loss labeled samples for each other's student.

        Defaults are the paper's (6 epochs, batch 200, T = 300, EMA cap 0.999, r = noise + 0.1) except
        where LABELED is 'synthetic': there the synthetic recipe (flows.pt.SYNTHETIC_RECIPE: 48 px, 10
        epochs, lr step 5, batch 64, T = 130, EMA cap 0.99, r = noise) fills every setting not given, and
        every method starts from a backbone pretrained on other synthetic faces (--synthetic-pretrain).
        """
        from rich.console import Console
        from rich.table import Table

        from flows.cli import UserError
        from flows.pt import SYNTHETIC_RECIPE
        from storage.artifact import is_finished, join

        # Settings not given: the synthetic recipe on the synthetic data, the paper's (PTConfig) otherwise.
        given = {"input_size": size, "epochs": epochs, "lr_milestones": tuple(lr_step) if lr_step else None,
                 "batch_size": batch_size, "turn_iters": turn_iters, "ema_max": ema_max,
                 "forget_margin": forget_margin}
        from tasks.pt.method import PTConfig

        paper = PTConfig()  # the paper's values (input size: fermine's CPU default)
        base = {**{k: getattr(paper, k) for k in given}, **(SYNTHETIC_RECIPE if labeled == SYNTHETIC else {})}
        chosen = {k: base[k] if v is None else v for k, v in given.items()}
        size = int(chosen["input_size"])

        console = Console(stderr=True)
        train_splits = _split_list(train_split, ("train",))
        test_splits = _split_list(test_split, ("test",))
        if train_splits is None:
            raise UserError("--train-split needs named splits (e.g. train), not 'all'")
        if noise_kind not in ("symmetric", "asymmetric"):
            raise UserError(f"--noise-kind must be symmetric or asymmetric, got {noise_kind!r}")
        rates = list(noise) if noise else (list(DEFAULT_COMPARE_RATES) if compare else [0.0])
        bad = [r for r in rates if not 0.0 <= r < 1.0]
        if bad:
            raise UserError(f"--noise rates must be fractions in [0, 1) (0.3 = 30%), got {bad}")
        if is_finished(out):
            raise UserError(f"OUT {out} is an image table; give a folder for the runs (did you forget an argument?)")

        pool_splits = _split_list(pool_split, ("pool",) if pool == SYNTHETIC else None)
        # Settings are checked before any data is generated or read, so a typo fails at once.
        from tasks.pt.label_noise import inject_noise
        from tasks.pt.method import PTConfig, mean_teacher_config

        try:
            cfg = PTConfig(
                arch=arch, pretrained=pretrained, labeled_fraction=labeled_fraction, lr=lr,
                lr_gamma=lr_gamma, momentum=momentum, weight_decay=weight_decay, forget_rate=forget_rate,
                consistency_max=consistency_max, **chosen,
                consistency_shape=consistency_shape, ratio=ratio, guidance=guidance,
                consistency_guidance=consistency_guidance,
                n_pairs=pairs, confidence_estimator=confidence, confidence_threshold=confidence_threshold,
                split_bn=split_bn, seed=seed, device=device, train_splits=train_splits, pool_splits=pool_splits,
                val_splits=_split_list(val_split, ("val",)) or ("val",),
            )
            from tasks.models import available_models
            from tasks.pt.method import finetune_config

            if compare:
                finetune_config(cfg)  # the matched baseline must be expressible before anything runs
            if arch not in available_models():
                raise ValueError(f"unknown --arch {arch!r}; choose one of: {', '.join(available_models())}")
            from tasks.device import resolve_device

            resolve_device(device)
        except (ValueError, RuntimeError) as e:  # torch.device("gpu") is a RuntimeError
            raise UserError(str(e)) from e

        synth = None
        if SYNTHETIC in (labeled, pool, test):
            from flows.commands.ingest import parse_options
            from flows.pt import synthetic_table

            try:
                with console.status("generating the synthetic data set"):
                    synth = synthetic_table(out, size, parse_options(list(synthetic_option or [])))
            except ValueError as e:
                raise UserError(str(e)) from e
        labeled_uri = synth if labeled == SYNTHETIC else labeled
        pool_uri = None if pool == "-" else (synth if pool == SYNTHETIC else pool)
        test_uri = synth if test == SYNTHETIC else test
        for name, uri in (("LABELED", labeled_uri), ("POOL", pool_uri), ("TEST", test_uri), ("--val", val)):
            if uri is not None and not is_finished(uri):
                raise UserError(f"{name}: no finished image table at {uri}; check the path, or run "
                                "`fermine ingest` first")
        if synthetic_pretrain and labeled == SYNTHETIC and pretrained is None:
            import dataclasses

            from flows.pt import synthetic_backbone

            try:
                with console.status("pretraining the backbone on the style-b synthetic faces (once, then reused)"):
                    cfg = dataclasses.replace(cfg, pretrained=synthetic_backbone(out, size, arch, device=device,
                                                                                 seed=seed))
            except ValueError as e:
                raise UserError(str(e)) from e
            console.print(f"pretrained backbone: {cfg.pretrained}")

        results: list[dict[str, Any]] = []
        try:
            for rate in rates:
                tag = f"noise-{noise_kind[:3]}-{_pct(rate)}" if rate > 0 else "noise-0"
                run_dir = join(out, tag)
                train_uri = labeled_uri
                if rate > 0:
                    train_uri = join(run_dir, "labeled")
                    inject_noise(labeled_uri, train_uri, noise_kind, rate, noise_seed, splits=train_splits)
                methods: list[tuple[str, Any]] = []
                if compare:
                    methods.append(("Fine-tune (baseline)", "finetune"))
                    methods.append(("Mean Teacher", mean_teacher_config(cfg)))
                methods.append(("PT (ours)" if compare else "PT", cfg))
                for name, how in methods:
                    row = _run_one(name, how, cfg, train_uri, pool_uri, test_uri, test_splits, val, run_dir, rate,
                                   noise_kind, report)
                    results.append(row)
                    console.print(f"[bold]{name}[/bold] at {_pct(rate)}% noise: accuracy {row['accuracy']:.4f}, "
                                  f"mean class accuracy {row['mean_class_accuracy']:.4f} -> {row['checkpoint']}")
        except (ValueError, FileExistsError, FileNotFoundError) as e:
            raise UserError(str(e)) from e

        table = Table(title=f"{'Table 4-style comparison' if compare else 'Progressive Teacher'} "
                            f"({noise_kind} noise) on {test_uri} [{', '.join(test_splits or ['all'])}]")
        table.add_column("Method", no_wrap=True)
        for col in ("Noise (%)", "Accuracy", "Mean class acc.", "Filtered noisy", "Filtered clean"):
            table.add_column(col, justify="right")
        for r in results:
            fmt = lambda v: "" if v is None or v != v else f"{100 * v:.1f}%"
            table.add_row(r["method"], _pct(r["noise"]), f"{100 * r['accuracy']:.2f}%",
                          f"{100 * r['mean_class_accuracy']:.2f}%", fmt(r.get("noisy_filtered_rate")),
                          fmt(r.get("clean_filtered_rate")))
        Console().print(table)
        from tasks.engine.checkpoint import atomic_write_bytes, dumps_json

        atomic_write_bytes(join(out, "results.json"), dumps_json({"results": results, "noise_kind": noise_kind,
                                                                 "test": test_uri}).encode())
        console.print(f"results: {join(out, 'results.json')}")


def _run_one(name: str, how: Any, cfg: Any, train_uri: str, pool_uri: str | None, test_uri: str,
             test_splits: tuple[str, ...] | None, val: str | None, run_dir: str, rate: float, noise_kind: str,
             report: bool) -> dict[str, Any]:
    """Train one method, evaluate it on the test table; returns a results row."""
    from flows.progress import progress_bar
    from storage.artifact import join
    from tasks.evaluate import evaluate

    row: dict[str, Any] = {"method": name, "noise": rate, "noise_kind": noise_kind}
    if how == "finetune":
        from tasks.pt.method import finetune_config
        from tasks.train import train

        # Same network, epochs, schedule and labeled samples per step as PT, without pool or selection.
        tcfg = finetune_config(cfg)
        ckpt = join(run_dir, "finetune")
        with progress_bar(f"{name} {_pct(rate)}%", None) as bar:
            def on_batch(d: dict) -> None:
                bar.update(0, total=d["steps"] * d["epochs"], completed=(d["epoch"] - 1) * d["steps"] + d["step"],
                           info=f"epoch {d['epoch']}/{d['epochs']} loss {d['loss']:.3f}")

            train(tcfg, [train_uri], ckpt, on_batch=on_batch)
    else:
        from tasks.pt.method import train_pt

        sub = join(run_dir, "pt" if how.n_pairs > 1 or how.forget_rate != 0 else "mean_teacher")
        with progress_bar(f"{name} {_pct(rate)}%", None) as bar:
            def on_step(d: dict) -> None:
                if d["event"] == "step":
                    bar.update(0, total=d["steps"] * d["epochs"], completed=(d["epoch"] - 1) * d["steps"] + d["step"],
                               info=f"epoch {d['epoch']}/{d['epochs']} CE {d['sup_loss']:.3f}"
                                    f" R {d['ratio']:.2f} w {d['weight']:.2f}")

            res = train_pt(how, train_uri, pool_uri, sub, progress=on_step, val_uri=val)
        ckpt = res.checkpoint_uri
        for k in ("noisy_filtered_rate", "clean_filtered_rate", "filtered_precision", "forget_rate", "filtered_out"):
            if k in res.metrics:
                row[k] = res.metrics[k]
        if report and how.forget_rate != 0:
            from tasks.pt.report import write_report

            rep = write_report(sub, train_uri, size=cfg.input_size)
            row["report"] = {"csv": rep.csv_uri, "png": rep.png_uri}
            from flows.progress import console

            console.print(f"filtered out by the teachers ({name}, {_pct(rate)}% noise):\n{rep.table}")
    ev = evaluate(ckpt, test_uri, splits=test_splits, device=cfg.device)
    row.update({"accuracy": ev.accuracy, "mean_class_accuracy": ev.mean_class_accuracy, "checkpoint": ckpt,
                "per_class": ev.per_class})
    return row
