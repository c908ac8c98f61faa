"""`fermine pt`: Progressive Teacher (semi-supervised, noisy labels), optionally against its baselines,
as the pt pipeline (flows/pt.py): the command builds the run config from its options."""

from __future__ import annotations

from typing import List, Optional

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
    ) -> None:
        """Progressive Teacher: two EMA teachers pick small-loss labeled samples for each other's student.

        Defaults are the paper's (6 epochs, batch 200, T = 300, EMA cap 0.999, r = noise + 0.1) except
        where LABELED is 'synthetic': there the synthetic recipe (flows.pt.SYNTHETIC_RECIPE: 48 px, 10
        epochs, lr step 5, batch 64, T = 130, EMA cap 0.99, r = noise) fills every setting not given, and
        every method starts from a backbone pretrained on other synthetic faces (--synthetic-pretrain).
        """
        from flows.cli import UserError
        from flows.commands.ingest import parse_options
        from flows.commands.run import build_config, run_pipeline

        train_splits = _split_list(train_split, ("train",))
        if train_splits is None:
            raise UserError("--train-split needs named splits (e.g. train), not 'all'")
        if noise_kind not in ("symmetric", "asymmetric"):
            raise UserError(f"--noise-kind must be symmetric or asymmetric, got {noise_kind!r}")
        rates = list(noise) if noise else (list(DEFAULT_COMPARE_RATES) if compare else [0.0])
        bad = [r for r in rates if not 0.0 <= r < 1.0]
        if bad:
            raise UserError(f"--noise rates must be fractions in [0, 1) (0.3 = 30%), got {bad}")
        if SYNTHETIC in (pool, test) and labeled != SYNTHETIC:
            raise UserError("POOL/TEST 'synthetic' is the synthetic data set's pool/test split: it needs LABELED "
                            "'synthetic' too; give image tables otherwise")
        # PTConfig fields; what is not given comes from the synthetic recipe on the synthetic data
        # (flows.pt.SYNTHETIC_RECIPE), from the paper's PTConfig defaults otherwise.
        given = {"input_size": size, "epochs": epochs, "lr_milestones": list(lr_step) if lr_step else None,
                 "batch_size": batch_size, "turn_iters": turn_iters, "ema_max": ema_max,
                 "forget_margin": forget_margin, "forget_rate": forget_rate,
                 "pool_splits": list(_split_list(pool_split, None) or []) or None}
        config = {k: v for k, v in given.items() if v is not None}
        config.update(
            arch=arch, pretrained=pretrained, labeled_fraction=labeled_fraction, lr=lr, lr_gamma=lr_gamma,
            momentum=momentum, weight_decay=weight_decay, consistency_max=consistency_max,
            consistency_shape=consistency_shape, ratio=ratio, guidance=guidance,
            consistency_guidance=consistency_guidance, n_pairs=pairs, confidence_estimator=confidence,
            confidence_threshold=confidence_threshold, split_bn=split_bn, seed=seed, device=device,
            train_splits=list(train_splits), val_splits=list(_split_list(val_split, ("val",)) or ("val",)))
        options = {
            "labeled_uri": labeled, "pool_uri": None if pool in ("-", SYNTHETIC) else pool,
            "test_uri": None if test == SYNTHETIC else test, "val_uri": val,
            "test_splits": list(_split_list(test_split, ("test",)) or []) or None,
            "noise_rates": rates, "noise_kind": noise_kind, "noise_seed": noise_seed, "compare": compare,
            "config": config, "synthetic_pretrain": synthetic_pretrain,
            "synthetic_options": parse_options(list(synthetic_option or [])),
        }
        cfg = build_config({"name": "pt", "out": out, "pipeline": "pt", "seed": seed, "pt": options})
        for name, uri in (("LABELED", labeled), ("POOL", options["pool_uri"]), ("TEST", options["test_uri"]),
                          ("--val", val)):
            if uri is not None and uri != SYNTHETIC and not _is_table(uri):
                raise UserError(f"{name}: no finished image table at {uri}; check the path, or run "
                                "`fermine ingest` first")
        run_pipeline(cfg)


def _is_table(uri: str) -> bool:
    from storage.artifact import is_finished

    return is_finished(uri)
