"""The Progressive Teacher flow: noise injection -> fine-tune / Mean Teacher / PT -> evaluation -> Table 4.

Per noise rate: ``noise-<kind>-<pct>`` (tasks.pt.label_noise, skipped at 0%), ``finetune-<pct>``,
``mean-teacher-<pct>`` (with ``compare``), ``pt-<pct>``, an ``eval-*`` stage per model and a
``pt-report-<pct>`` stage (filtered samples per class + image grid). Every box is a stage
(flows.prefect_tasks.stage): a rerun reuses finished stages and resumes an interrupted training
from its last.pt. Writes ``<out>/results.json``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import fsspec
from prefect import flow

from flows.config import build_dataclass
from flows.prefect_tasks import stage
from flows.results import markdown_table, publish_artifacts
from flows.stage import Run
from storage.artifact import join

SYNTHETIC = "synthetic"
# The pool is three times the labeled training set (150 per class), so the 3/4 unlabeled share of every
# batch sees each pool image about once per epoch, as in the paper's labeled/unlabeled proportions.
SYNTHETIC_DEFAULTS: dict[str, Any] = {"pool_size": 2100}


def synthetic_table(out: str, size: int, options: dict[str, Any] | None = None, defaults: bool = True) -> str:
    """The embedded synthetic data set (train/test/pool splits), generated once under ``<out>/data``.

    The folder name is a digest of the generator's config, so other options give another table and the
    same options reuse the finished one. ``defaults``: start from SYNTHETIC_DEFAULTS (PT's pool size).
    Raises ValueError for unknown or mistyped options.
    """
    import dataclasses
    import hashlib

    from storage.artifact import is_finished
    from storage.ingest import write_image_table
    from storage.synthetic import config_from_options, generate

    cfg = config_from_options(**{"size": size, **(SYNTHETIC_DEFAULTS if defaults else {}), **(options or {})})
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str).encode()).hexdigest()
    uri = join(out, "data", f"synthetic-{digest[:12]}")
    if not is_finished(uri):
        write_image_table(generate(cfg), uri, stage="ingest", config={"format": SYNTHETIC, **dataclasses.asdict(cfg)})
    return uri


# PT's recipe on the synthetic data (measured with bench/fidelity.py --only pt; README, Results): the paper's is
# sized for RAF-DB at batch 200 (T = 300 iterations within 6 epochs). 1050 labeled images at batch 64 (16
# labeled a step) give ~66 iterations an epoch, so T = 130 is two epochs and the EMA cap 0.99 averages
# ~100 steps; labels clean but for the injected noise need no forget margin on top of the noise rate.
# Applied where LABELED is the synthetic data and the setting was not given.
SYNTHETIC_RECIPE: dict[str, Any] = {"input_size": 48, "epochs": 10, "lr_milestones": (5,), "batch_size": 64,
                                    "turn_iters": 130, "ema_max": 0.99, "forget_margin": 0.0}


# Stand-in for the paper's pretrained backbone (ResNet-18 pretrained on a face data set; no weights can be
# downloaded here, SPEC.md): the *other* rendering style "b", other people (seed 1), clean labels, no pool.
SYNTHETIC_PRETRAIN_OPTIONS: dict[str, Any] = {"style": "b", "seed": 1, "train_per_class": 300, "val_per_class": 0,
                                              "test_per_class": 30, "pool_size": 0}
SYNTHETIC_PRETRAIN_EPOCHS = 15


def synthetic_backbone(out: str, size: int, arch: str = "small_cnn", epochs: int | None = None,
                       device: str = "auto", seed: int = 0, options: dict[str, Any] | None = None) -> str:
    """Pretrain ``arch`` once on the clean style-b synthetic set; returns the backbone weights file.

    The file holds every weight except the classifier head (``head.*``), like a face-recognition
    backbone: each model started from it gets a fresh expression head of its own, so PT's two pairs still
    start from different initialisations (different heads), as in the paper. Stored under
    ``<out>/data/pretrain-<digest>`` (digest of data and training settings): reused when finished, and an
    interrupted pretraining resumes (tasks.train). ``epochs`` defaults to SYNTHETIC_PRETRAIN_EPOCHS and
    ``options`` (storage.synthetic.SyntheticConfig fields) override SYNTHETIC_PRETRAIN_OPTIONS.
    """
    import hashlib

    import torch

    from storage.artifact import _fs
    from tasks.engine.checkpoint import atomic_write_bytes
    from tasks.models import load_state_file
    from tasks.train import TrainConfig, train

    data_options = {**SYNTHETIC_PRETRAIN_OPTIONS, **(options or {})}
    tcfg = TrainConfig(arch=arch, input_size=size, epochs=epochs or SYNTHETIC_PRETRAIN_EPOCHS, batch_size=64, lr=0.01, lr_step=10, seed=seed,
                       device=device)
    key = {"data": data_options, "train": {k: v for k, v in tcfg.to_dict().items() if k != "device"}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    root = join(out, "data", f"pretrain-{digest}")
    weights = join(root, "backbone.pt")
    fs, path = _fs(weights)
    if fs.exists(path):
        return weights
    data = synthetic_table(join(root, "data"), size, data_options, defaults=False)
    res = train(tcfg, [data], join(root, "model"))
    state = {k: v for k, v in load_state_file(res.checkpoint_uri).items() if not k.startswith("head.")}
    buf = __import__("io").BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(weights, buf.getvalue())
    return weights


def pretrain(size: int, arch: str, device: str, seed: int):
    """The synthetic backbone as a stage body: pretrained into the stage's folder (synthetic_backbone)."""
    def fn(out: str) -> None:
        synthetic_backbone(out, size, arch, device=device, seed=seed)

    return fn


def _inject(labeled_uri: str, kind: str, rate: float, seed: int, splits: Sequence[str]):
    def fn(out: str) -> None:
        from tasks.pt.label_noise import inject_noise

        inject_noise(labeled_uri, out, kind, rate, seed, splits=splits)

    return fn


def _finetune(cfg: Any, train_uri: str):
    def fn(out: str) -> None:
        from tasks.train import train

        train(cfg, [train_uri], out)

    return fn


def _pt(cfg: Any, train_uri: str, pool_uri: str | None, val_uri: str | None):
    def fn(out: str) -> None:
        from tasks.pt.method import train_pt

        train_pt(cfg, train_uri, pool_uri, out, val_uri=val_uri)

    return fn


def _report(run_uri: str, train_uri: str, size: int):
    def fn(out: str) -> None:
        from tasks.pt.report import write_report

        write_report(run_uri, train_uri, out, size=size)

    return fn


def _evaluate(model_uri: str, test_uri: str, splits: Sequence[str] | None, device: str):
    def fn(out: str) -> None:
        from tasks.engine.checkpoint import atomic_write_bytes, dumps_json
        from tasks.evaluate import evaluate, save_confusion_png

        ev = evaluate(model_uri, test_uri, splits=splits, device=device)
        atomic_write_bytes(join(out, "metrics.json"), dumps_json(ev.to_dict()).encode())
        save_confusion_png(ev, join(out, "confusion.png"))  # plots write through fsspec

    return fn


def pt_stages(run: Run, cfg: Any, labeled_uri: str, pool_uri: str | None, test_uri: str, splits: Sequence[str],
              rates: Sequence[float], *, noise_kind: str = "symmetric", noise_seed: int = 0, compare: bool = True,
              val_uri: str | None = None, prefix: str = "") -> list[dict[str, Any]]:
    """PT's stages in ``run`` (names prefixed by ``prefix`` inside a round); returns one row per model.

    Per noise rate: the noisy table, fine-tune and Mean Teacher (``compare``), PT, the filtered-samples
    report and an evaluation stage per model.
    """
    from tasks.pt.method import finetune_config, mean_teacher_config

    rows: list[dict[str, Any]] = []
    for rate in rates:
        pct = f"{100 * rate:g}"
        train_uri = labeled_uri
        if rate > 0:
            spec = {"kind": noise_kind, "rate": rate, "seed": noise_seed, "splits": list(cfg.train_splits)}
            train_uri = stage(run, f"{prefix}noise-{noise_kind}-{pct}", spec, {"labeled": labeled_uri},
                              _inject(labeled_uri, noise_kind, rate, noise_seed, cfg.train_splits)).uri
        inputs = {"labeled": train_uri, **({"pool": pool_uri} if pool_uri else {}), **({"val": val_uri} if val_uri else {})}
        variants: list[tuple[str, str, Any]] = []
        if compare:
            variants.append(("Fine-tune (baseline)", f"finetune-{pct}", finetune_config(cfg)))
            variants.append(("Mean Teacher", f"mean-teacher-{pct}", mean_teacher_config(cfg)))
        variants.append(("PT", f"pt-{pct}", cfg))
        for method, name, c in variants:
            extra: dict[str, Any] = {}
            if name.startswith("finetune"):
                tr = stage(run, prefix + name, c, {"labeled": train_uri}, _finetune(c, train_uri), compute=True)
            else:
                tr = stage(run, prefix + name, c, inputs, _pt(c, train_uri, pool_uri, val_uri), compute=True)
                with fsspec.open(join(tr.uri, "pt.json"), "r") as f:
                    m = json.load(f)["metrics"]
                extra = {k: m.get(k) for k in ("forget_rate", "filtered_out", "noisy_filtered_rate",
                                               "clean_filtered_rate", "filtered_precision") if k in m}
                if c.forget_rate != 0:
                    rep = stage(run, f"{prefix}pt-report-{pct}", {"size": c.input_size},
                                {"run": tr.uri, "labeled": train_uri}, _report(tr.uri, train_uri, c.input_size), compute=True)
                    extra["report"] = rep.uri
            # the run folder holds the model (for PT: the chosen teacher, model.pt + model.json)
            ev = stage(run, f"{prefix}eval-{name}", {"splits": list(splits), "device": c.device},
                       {"model": tr.uri, "test": test_uri}, _evaluate(tr.uri, test_uri, splits, c.device), compute=True)
            with fsspec.open(join(ev.uri, "metrics.json"), "r") as f:
                em = json.load(f)
            rows.append({"method": method, "noise": rate, "noise_kind": noise_kind, "accuracy": em["accuracy"],
                         "mean_class_accuracy": em["mean_class_accuracy"], "checkpoint": tr.uri, **extra})
    return rows


def records(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results-table rows of PT's models (Table 4's columns)."""
    return [{"model": r["method"], "noise": r["noise"], "accuracy": r["accuracy"],
             "mean class accuracy": r["mean_class_accuracy"]} for r in rows]


@flow(name="progressive-teacher")
def pt_flow(
    labeled_uri: str = SYNTHETIC,
    out: str = "runs/pt",
    pool_uri: str | None = None,
    test_uri: str | None = None,
    test_splits: list[str] | None = None,
    noise_rates: list[float] | None = None,
    noise_kind: str = "symmetric",
    noise_seed: int = 0,
    config: dict[str, Any] | None = None,
    compare: bool = True,
    val_uri: str | None = None,
    synthetic_options: dict[str, Any] | None = None,
    synthetic_pretrain: bool = True,
) -> dict[str, Any]:
    """Fine-tune baseline, Mean Teacher and PT (``compare``) or PT alone, at every noise rate (Table 4).

    ``labeled_uri="synthetic"`` (the default) generates the embedded synthetic data set under
    ``<out>/data`` (``synthetic_options``: storage.synthetic.SyntheticConfig fields) and uses its ``pool``
    split as the unlabeled pool and its ``test`` split for testing, unless ``pool_uri``/``test_uri`` are
    given, with SYNTHETIC_RECIPE under ``config``; with ``synthetic_pretrain`` (and no ``pretrained`` in
    ``config``) every method starts from the backbone of :func:`synthetic_backbone`, as the paper starts
    from a pretrained one. ``config`` overrides tasks.pt.method.PTConfig fields; ``test_uri``
    defaults to ``labeled_uri`` and ``test_splits`` to ["test"]; ``noise_rates`` to [0, 0.1, 0.2, 0.3].
    """
    from tasks.pt.method import PTConfig

    overrides = dict(config or {})
    if labeled_uri == SYNTHETIC:
        overrides = {**SYNTHETIC_RECIPE, **overrides}
        labeled_uri = synthetic_table(out, int(overrides.get("input_size", PTConfig.input_size)), synthetic_options)
        if pool_uri is None:
            pool_uri = labeled_uri
            overrides.setdefault("pool_splits", ["pool"])
        if synthetic_pretrain and not overrides.get("pretrained"):
            build_dataclass(PTConfig, overrides, "pt")  # a mistyped setting fails before the pretraining
            overrides["pretrained"] = synthetic_backbone(
                out, int(overrides.get("input_size", PTConfig.input_size)), str(overrides.get("arch", PTConfig.arch)),
                device=str(overrides.get("device", PTConfig.device)), seed=int(overrides.get("seed", PTConfig.seed)))
    cfg = build_dataclass(PTConfig, overrides, "pt")
    test_uri = test_uri or labeled_uri
    splits = list(test_splits) if test_splits is not None else ["test"]
    rates = list(noise_rates) if noise_rates is not None else [0.0, 0.1, 0.2, 0.3]
    run = Run(out)
    rows = pt_stages(run, cfg, labeled_uri, pool_uri, test_uri, splits, rates, noise_kind=noise_kind,
                     noise_seed=noise_seed, compare=compare, val_uri=val_uri)
    result = {"labeled_uri": labeled_uri, "pool_uri": pool_uri, "test_uri": test_uri, "test_splits": splits,
              "config": dataclasses.asdict(cfg), "rows": rows}
    with fsspec.open(join(run.root, "results.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    table = records(rows)
    md = f"# Progressive Teacher ({noise_kind} noise), test splits {', '.join(splits)}\n\n{markdown_table(table)}\n"
    with fsspec.open(join(run.root, "results.md"), "w") as f:
        f.write(md)
    publish_artifacts("progressive-teacher", table, md, description="PT vs fine-tune vs Mean Teacher (Table 4)")
    return result
