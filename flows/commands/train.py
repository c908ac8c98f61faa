"""`fermine train` and `fermine evaluate`: the shared supervised trainer and the evaluation of a checkpoint."""

from __future__ import annotations

from typing import List, Optional

import typer


def _splits(values: list[str] | None, default: tuple[str, ...]) -> tuple[str, ...] | None:
    """Repeatable --split options, also comma separated; "all" means every split (None)."""
    if not values:
        return default
    out = tuple(s.strip() for v in values for s in v.split(",") if s.strip())
    return None if "all" in out else out


def _named_splits(values: list[str] | None, default: tuple[str, ...]) -> tuple[str, ...]:
    out = _splits(values, default)
    if out is None:
        raise ValueError("training and validation need named splits (e.g. --split train --split val), not 'all'")
    return out


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        tables: List[str] = typer.Argument(..., help="Image table(s) to train on (their union), then OUT.",
                                           metavar="TABLE... OUT"),
        arch: str = typer.Option("small_cnn", help="small_cnn (CPU), resnet18, resnet34, resnet50, vgg16."),
        epochs: int = typer.Option(10, help="Epochs (an interrupted run resumes; a larger value extends it)."),
        batch_size: int = typer.Option(64, help="Images per SGD step."),
        lr: float = typer.Option(0.01, help="Initial learning rate (x --lr-gamma every --lr-step epochs)."),
        lr_step: int = typer.Option(10, help="Epochs between learning-rate decays."),
        lr_gamma: float = typer.Option(0.1, help="Learning-rate decay factor."),
        momentum: float = typer.Option(0.9, help="SGD momentum."),
        weight_decay: float = typer.Option(5e-4, help="SGD weight decay."),
        size: int = typer.Option(64, help="Input side in pixels (224 for the papers' ResNet/VGG runs)."),
        pretrained: Optional[str] = typer.Option(None, help="Local weights: torchvision/plain state_dict file or a "
                                                 "checkpoint folder. Never downloaded."),
        init_from: Optional[str] = typer.Option(None, help="Checkpoint folder to initialise every weight from."),
        teacher: Optional[str] = typer.Option(None, help="Teacher checkpoint for the PASM Eq. 4 MSE term (see --beta)."),
        alpha: float = typer.Option(1.0, help="Weight of the cross-entropy term."),
        beta: float = typer.Option(0.0, help="Weight of MSE(student logits, teacher logits); needs --teacher."),
        resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from OUT/last.pt when present."),
        val: Optional[str] = typer.Option(None, help="Image table evaluated after every epoch (see --val-split)."),
        val_split: Optional[List[str]] = typer.Option(None, help="Validation split(s) of --val (default: test)."),
        split: Optional[List[str]] = typer.Option(None, help="Training split(s) of the tables (default: train)."),
        class_balanced: bool = typer.Option(False, help="Weight the loss by inverse class frequency."),
        hflip: bool = typer.Option(True, "--hflip/--no-hflip", help="Random horizontal flip."),
        seed: int = typer.Option(0, help="Seed of initialisation, order and augmentation."),
        device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda, cuda:N."),
        amp: bool = typer.Option(True, "--amp/--no-amp", help="Mixed precision on CUDA."),
        data: str = typer.Option("auto", help="memory: decode once into RAM; stream: decode shards in workers; auto."),
        workers: Optional[int] = typer.Option(None, help="Streaming decode workers (default: CPUs - 1, at most 8)."),
        threads: Optional[int] = typer.Option(None, help="CPU threads for torch (default: torch's choice)."),
        json_path: Optional[str] = typer.Option(None, "--json", help="Also write the metrics JSON here."),
    ) -> None:
        """Train a FER classifier (SGD, lr x0.1 every 10 epochs); writes OUT/model.pt, model.json, metrics.json."""
        from rich.console import Console
        from rich.table import Table

        from flows.cli import UserError
        from flows.progress import progress_bar
        from storage.artifact import is_finished

        if len(tables) < 2:
            raise UserError("give at least one TABLE and the OUT folder: fermine train TABLE... OUT")
        *inputs, out = tables
        for t in inputs + ([val] if val else []):
            if not is_finished(t):
                raise UserError(f"no finished image table at {t}: check the path, or run the stage that makes it")
        if is_finished(out):
            raise UserError(f"OUT {out} is an image table, not a checkpoint folder; did you forget the OUT argument?")

        import torch

        from tasks.engine.checkpoint import load_checkpoint
        from tasks.train import TrainConfig, train

        if threads is not None:
            if threads < 1:
                raise UserError(f"--threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)

        try:
            cfg = TrainConfig(
                arch=arch, epochs=epochs, batch_size=batch_size, lr=lr, lr_step=lr_step, lr_gamma=lr_gamma,
                momentum=momentum, weight_decay=weight_decay, input_size=size, pretrained=pretrained,
                alpha=alpha, beta=beta, class_balanced=class_balanced, hflip=hflip, seed=seed, device=device,
                amp=amp, data=data, num_workers=workers,
                train_splits=_named_splits(split, ("train",)),
                val_splits=_named_splits(val_split, ("test",)),
            )
            from tasks.models import available_models

            if arch not in available_models():
                raise ValueError(f"unknown --arch {arch!r}; choose one of: {', '.join(available_models())}")
            teacher_model = None
            if teacher:
                teacher_model, tmeta = load_checkpoint(teacher)
                if tmeta.get("input_size") not in (None, size):
                    raise ValueError(f"teacher {teacher} was trained at {tmeta['input_size']} px but --size is {size}; "
                                     "train the student at the teacher's size")
        except (ValueError, FileNotFoundError) as e:
            raise UserError(str(e)) from e

        console = Console(stderr=True)
        with progress_bar(f"train {arch}", None) as bar:
            state = {"epoch": 0}

            def on_batch(d: dict) -> None:
                if d["epoch"] != state["epoch"]:
                    state["epoch"] = d["epoch"]
                    bar.reset(0, total=d["steps"], completed=0,
                              description=f"epoch {d['epoch']}/{d['epochs']}")
                bar.update(0, completed=d["step"],
                           info=f"loss {d['loss']:.3f} acc {d['train_acc']:.3f} {d['images_per_s']:.0f} img/s")

            def on_epoch(d: dict) -> None:
                task = bar.tasks[0]
                if task.total is not None:
                    bar.update(0, completed=task.total)
                msg = (f"epoch {d['epoch']}/{d['epochs']} loss {d['loss']:.4f} acc {d['train_acc']:.3f} "
                       f"lr {d['lr']:.2g} {d['images_per_s']:.0f} img/s")
                if "val_accuracy" in d:
                    msg += f" | val acc {d['val_accuracy']:.3f} mca {d['val_mean_class_accuracy']:.3f}"
                bar.console.print(msg, markup=False)

            try:
                res = train(cfg, inputs, out, teacher=teacher_model, init_from=init_from, progress=on_epoch,
                            val_uri=val, resume=resume, on_batch=on_batch)
            except (ValueError, FileNotFoundError) as e:
                raise UserError(str(e)) from e

        m = res.metrics
        from rich.markup import escape

        table = Table(title=escape(f"trained {arch} -> {res.checkpoint_uri}"))
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key in ("epochs", "loss", "train_acc", "images_per_s", "samples_per_epoch", "data_mode", "device"):
            v = m.get(key)
            table.add_row(key, f"{v:.4f}" if isinstance(v, float) else str(v))
        if "val" in m:
            table.add_row("val accuracy", f"{m['val']['accuracy']:.4f}")
            table.add_row("val mean class accuracy", f"{m['val']['mean_class_accuracy']:.4f}")
        Console().print(table)
        if json_path:
            from tasks.engine.checkpoint import atomic_write_bytes, dumps_json

            atomic_write_bytes(json_path, dumps_json({"final": m, "history": res.history}).encode())
        console.print(escape(f"metrics: {out.rstrip('/')}/metrics.json, curves: {out.rstrip('/')}/curves.png"))

    @app.command("evaluate")
    def evaluate_cmd(
        checkpoint: str = typer.Argument(..., help="Checkpoint folder (the OUT of any training: train, pt, caf, "
                                         "featloss)."),
        table: str = typer.Argument(..., help="Image table to evaluate on (same or another data set)."),
        split: Optional[List[str]] = typer.Option(None, help="Split(s) to evaluate (default: test; 'all' = every row)."),
        batch_size: int = typer.Option(256, help="Images per forward pass."),
        device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
        json_path: Optional[str] = typer.Option(None, "--json", help="Write the metrics JSON here instead of "
                                                "CHECKPOINT/eval-<table>-<split>.json."),
        confusion: Optional[str] = typer.Option(None, help="Write the confusion matrix PNG here."),
    ) -> None:
        """Accuracy, per-class and mean class accuracy and the confusion matrix of CHECKPOINT on TABLE
        (RMSE, SAGR, PCC and CCC of valence and arousal for a valence/arousal checkpoint, e.g. CAF's).

        Always writes the metrics JSON (default CHECKPOINT/eval-<table>-<split>.json) and prints its path.
        """
        import time

        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        from flows.cli import UserError
        from flows.progress import console, progress_bar
        from storage.artifact import Artifact, is_finished
        from tasks.engine.checkpoint import atomic_write_bytes, checkpoint_exists, dumps_json

        if batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {batch_size}")
        if not checkpoint_exists(checkpoint):
            raise UserError(f"no finished checkpoint at {checkpoint} (model.json + model.pt); train it first, "
                            "or resume an interrupted run with `fermine train`")
        if not is_finished(table):
            raise UserError(f"no finished image table at {table}: check the path, or run the stage that makes it")
        from tasks.evaluate import evaluate, save_confusion_png
        from tasks.device import resolve_device

        try:
            resolve_device(device)
        except (ValueError, RuntimeError) as e:  # torch.device("gpu") is a RuntimeError
            raise UserError(f"bad --device {device!r}: {e}") from e
        splits = _splits(split, ("test",))
        split_text = ", ".join(splits) if splits else "all"
        art = Artifact(table)
        from tasks.engine.checkpoint import read_meta

        if read_meta(checkpoint).get("task") == "valence_arousal":
            _evaluate_va(checkpoint, table, splits, batch_size, device, json_path, art.digest)
            return
        t0 = time.perf_counter()
        with progress_bar(escape(f"evaluate on {_name(table)} [{split_text}]"), len(art)) as bar:
            def on_batch(p: dict) -> None:
                bar.update(0, completed=p["rows"], info=f"{p['labeled']} labeled, {p['images_per_s']:.0f} img/s")

            try:
                res = evaluate(checkpoint, table, splits=splits, batch_size=batch_size, device=device,
                               progress=on_batch)
            except (ValueError, FileNotFoundError) as e:
                raise UserError(str(e)) from e
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.update(0, completed=len(art), info=f"{res.n} labeled images in {dt:.1f} s (model load included)")
        console.print(f"loss {res.loss:.4f} acc {res.accuracy:.4f} mca {res.mean_class_accuracy:.4f} "
                      f"n {res.n} {res.n / dt:.0f} img/s", markup=False, soft_wrap=True)

        t = Table(title=escape(f"{checkpoint} on {table} [{', '.join(res.splits or ['all'])}], n={res.n}"))
        t.add_column("class")
        t.add_column("n", justify="right")
        t.add_column("accuracy", justify="right")
        for c, n, a in zip(res.classes, res.support, res.per_class):
            t.add_row(c, str(n), "absent" if n == 0 else f"{a:.4f}")
        t.add_row("[bold]overall", str(res.n), f"[bold]{res.accuracy:.4f}")
        t.add_row("[bold]mean class", "", f"[bold]{res.mean_class_accuracy:.4f}")
        con = Console()
        con.print(t)
        cm = Table(title="confusion (rows: true, columns: predicted)")
        cm.add_column("")
        for c in res.classes:
            cm.add_column(c[:4], justify="right")
        for c, row in zip(res.classes, res.confusion):
            cm.add_row(c, *[str(v) for v in row])
        con.print(cm)
        if res.absent_classes:
            con.print(escape(f"classes absent from the test rows (excluded from the mean): {', '.join(res.absent_classes)}"))
        if res.unlabeled_skipped:
            con.print(f"{res.unlabeled_skipped} unlabeled rows skipped")

        record = res.to_dict()
        record.update({"test_abs_uri": _abs(table), "test_digest": art.digest, "images_per_s": res.n / dt,
                       "batch_size": batch_size})
        out = json_path or _default_eval_path(checkpoint, table, splits)
        try:
            atomic_write_bytes(out, dumps_json(record).encode())
            if confusion:
                save_confusion_png(res, confusion)
        except OSError as e:
            raise UserError(f"cannot write the evaluation output ({e}); give --json PATH / --confusion PATH "
                            "somewhere writable") from e
        console.print(escape(f"metrics: {out}") + (escape(f", confusion: {confusion}") if confusion else ""),
                      soft_wrap=True)


def _evaluate_va(checkpoint: str, table: str, splits: tuple[str, ...] | None, batch_size: int, device: str,
                 json_path: str | None, digest: str) -> None:
    """`fermine evaluate` of a valence/arousal checkpoint (CAF or its baseline): RMSE, SAGR, PCC, CCC."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from flows.cli import UserError
    from flows.progress import console
    from tasks.caf.method import evaluate_va
    from tasks.engine.checkpoint import atomic_write_bytes, dumps_json

    try:
        m = evaluate_va(checkpoint, table, splits, batch_size=batch_size, device=device)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from e
    t = Table(title=escape(f"{checkpoint} on {table} [{', '.join(splits or ['all'])}], n={m['n']}"))
    for c in ("", "RMSE", "SAGR", "PCC", "CCC"):
        t.add_column(c, justify="right" if c else "left")
    for name, k in (("valence", "v"), ("arousal", "a")):
        t.add_row(name, *(f"{m[f'{metric}_{k}']:.4f}" for metric in ("rmse", "sagr", "pcc", "ccc")))
    Console().print(t)
    if any(m["skipped"].values()):
        console.print(escape(f"rows without valence/arousal skipped: {m['skipped']}"))
    record = {**m, "task": "valence_arousal", "checkpoint_uri": checkpoint, "test_uri": table,
              "test_abs_uri": _abs(table), "test_digest": digest, "splits": list(splits) if splits else None}
    out = json_path or _default_eval_path(checkpoint, table, splits)
    try:
        atomic_write_bytes(out, dumps_json(record).encode())
    except OSError as e:
        raise UserError(f"cannot write the evaluation output ({e}); give --json PATH somewhere writable") from e
    console.print(escape(f"metrics: {out}"), soft_wrap=True)


def _name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1] or uri


def _abs(uri: str) -> str:
    """Local paths absolute (so two spellings of one table compare equal); URIs as given."""
    import os

    return uri.rstrip("/") if "://" in uri else os.path.abspath(uri)


def _default_eval_path(checkpoint: str, table: str, splits: tuple[str, ...] | None) -> str:
    """CHECKPOINT/eval-<table name>-<splits>.json; re-evaluating the same table and splits replaces it, but an
    earlier evaluation of another table with the same folder name is kept (a hash of the table's path is added)."""
    import hashlib
    import json
    import re

    import fsspec

    def clean(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "table"

    base = f"{checkpoint.rstrip('/')}/eval-{clean(_name(table))}-{clean('+'.join(splits) if splits else 'all')}"
    path = base + ".json"
    fs, p = fsspec.core.url_to_fs(path)
    if fs.exists(p):
        try:
            prev = json.loads(fs.cat_file(p).decode())
            prev_uri = prev.get("test_abs_uri") or _abs(str(prev.get("test_uri") or ""))
        except (ValueError, OSError, AttributeError):
            prev_uri = None  # unreadable: do not overwrite what we cannot identify
        if prev_uri != _abs(table):
            path = f"{base}-{hashlib.sha1(_abs(table).encode()).hexdigest()[:8]}.json"
    return path
