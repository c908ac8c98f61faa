"""`fermine centroids`, `fermine mine`, `fermine distill`, `fermine omni`: Omni-supervised FER (Eq. 4-8)."""

from __future__ import annotations

from typing import List, Optional

import typer


def _splits(values: list[str] | None, default: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """Repeatable/comma-separated --split; "all" = every row (None)."""
    if not values:
        return default
    out = tuple(s.strip() for v in values for s in v.split(",") if s.strip())
    return None if "all" in out else out


def _need_table(uri: str, what: str) -> None:
    from flows.cli import UserError
    from storage.artifact import is_finished

    if not is_finished(uri):
        raise UserError(f"no finished image table at {uri} ({what}): check the path, or run the stage that makes it")


def _pool_table(pool: str, out: str, ray_address: str | None = None) -> str:
    """POOL as an image table: a finished table as is, an MS-Celeb-1M release ingested once.

    A release (insightface ``train.rec`` + ``train.idx``, or face.evoLVe ``<identity>/<n>.jpg``
    folders) is ingested into ``OUT/pool`` first, in parts on Ray (flows.commands.ingest.ingest_table);
    a rerun finds that table finished and reuses it, or resumes its missing parts after a kill.
    """
    import os

    from flows.cli import UserError
    from flows.commands.ingest import ingest_table
    from storage.artifact import is_finished, join

    if is_finished(pool):
        return pool
    if not os.path.isdir(pool):
        raise UserError(f"no finished image table or MS-Celeb-1M release at {pool} (POOL): check the path")
    table = join(out, "pool")
    if is_finished(table):
        return table
    try:
        ingest_table("ms1m", pool, table, {}, rows_per_shard=1024, ray_address=ray_address,
                     label="ingest ms1m pool")
    except UserError as e:
        raise UserError(f"POOL {pool} is neither a finished image table nor an MS-Celeb-1M release: {e}") from None
    return table


def _need_checkpoint(uri: str) -> None:
    from flows.cli import UserError
    from tasks.engine.checkpoint import checkpoint_exists

    if not checkpoint_exists(uri):
        raise UserError(f"no finished checkpoint at {uri} (model.json + model.pt): train the primitive learner "
                        "with `fermine train` first")


def _counts_table(title: str, counts: dict[str, int], kept: int, examined: int, undecodable: int):
    from rich.table import Table

    t = Table(title=title)
    t.add_column("pseudo class")
    t.add_column("kept", justify="right")
    for name, n in counts.items():
        t.add_row(name, str(n))
    frac = f" ({100 * kept / examined:.2f}%)" if examined else ""
    t.add_row("[bold]kept / examined", f"[bold]{kept} / {examined}{frac}")
    if undecodable:
        t.add_row("undecodable (see rejects)", str(undecodable))
    return t


def _mine_config(margin, floor, center, batch_size, split, size, device, decode_threads):
    from tasks.omni.mine import MineConfig

    return MineConfig(margin=margin, floor=floor, center=center, batch_size=batch_size, splits=_splits(split, None),
                      input_size=size, device=device, decode_threads=decode_threads)


def _distill_config(**kw):
    from tasks.omni.distill import DistillConfig

    return DistillConfig(**kw)


def register(app: typer.Typer) -> None:
    @app.command("centroids")
    def centroids_cmd(
        checkpoint: str = typer.Argument(..., help="Primitive learner (checkpoint folder)."),
        labeled: str = typer.Argument(..., help="Labeled image table (the anchor data set)."),
        out: str = typer.Argument(..., help="Output artifact: one row per class (label, count, centroid)."),
        split: Optional[List[str]] = typer.Option(None, help="Labeled split(s) to average (default: train; 'all')."),
        normalize: bool = typer.Option(False, help="Average unit-length features (Eq. 4 averages raw ones)."),
        batch_size: int = typer.Option(256, help="Images per forward pass."),
        size: Optional[int] = typer.Option(None, help="Input size (default: the checkpoint's)."),
        device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    ) -> None:
        """Class centroids of the primitive learner's penultimate features (Eq. 4)."""
        from rich.console import Console

        from flows.cli import UserError
        from tasks.omni.centroids import CentroidConfig, compute_centroids

        _need_checkpoint(checkpoint)
        _need_table(labeled, "LABELED")
        try:
            cfg = CentroidConfig(splits=_splits(split, ("train",)), batch_size=batch_size,
                                 normalize_features=normalize, input_size=size, device=device)
            m = compute_centroids(checkpoint, labeled, out, cfg)
        except ValueError as e:
            raise UserError(str(e)) from e
        con = Console()
        con.print(f"centroids of {len(m.extra['counts']) - len(m.extra['missing_classes'])} classes "
                  f"({m.extra['feature_dim']}-d) -> {out}")
        con.print(", ".join(f"{k}: {v}" for k, v in m.extra["counts"].items()))
        if m.extra["missing_classes"]:
            con.print(f"[yellow]no labeled rows (cannot be mined): {', '.join(m.extra['missing_classes'])}")

    @app.command("mine")
    def mine_cmd(
        checkpoint: str = typer.Argument(..., help="Primitive learner (checkpoint folder)."),
        labeled: str = typer.Argument(..., help="Labeled image table (for the centroids)."),
        pool: str = typer.Argument(..., help="Unlabeled pool: any image table, or an MS-Celeb-1M release "
                                   "folder (train.rec + train.idx, or <identity>/<n>.jpg), ingested once into OUT/pool."),
        out: str = typer.Argument(..., help="Output: the auxiliary samples table (an image table)."),
        margin: float = typer.Option(0.05, help="Eq. 6 margin m: best cosine similarity - second best >= m."),
        floor: Optional[float] = typer.Option(None, help="Also require best similarity >= this."),
        center: bool = typer.Option(False, help="Subtract the centroids' mean before the cosine (not in the "
                                    "paper; spreads the ~0.99 raw cosines of ReLU features)."),
        centroids: Optional[str] = typer.Option(None, help="Precomputed centroids (default: OUT/centroids, made "
                                                "from LABELED's train split)."),
        split: Optional[List[str]] = typer.Option(None, help="Pool split(s) to mine (default: every row)."),
        batch_size: int = typer.Option(256, help="Images per forward pass per worker."),
        size: Optional[int] = typer.Option(None, help="Input size (default: the checkpoint's)."),
        ray_address: Optional[str] = typer.Option(None, help="Ray cluster (auto or ray://host:10001); default: "
                                                  "a local instance."),
        workers: Optional[int] = typer.Option(None, help="Actors (default: one per GPU, else one per 2 CPUs)."),
        gpus_per_worker: Optional[float] = typer.Option(None, help="GPUs per actor (default: 1 if the cluster has GPUs)."),
        cpus_per_worker: Optional[float] = typer.Option(None, help="CPUs per actor (decoding, or the model on CPU)."),
        decode_threads: int = typer.Option(1, help="Background decode threads per actor (more on GPU nodes)."),
        device: str = typer.Option("auto", help="auto: each actor's GPU when it has one, else cpu."),
        figure: Optional[str] = typer.Option(None, help="Fig. 3 grid PNG (default: OUT/mined.png; 'none' to skip)."),
        per_class: int = typer.Option(8, help="Faces per row of the grid."),
    ) -> None:
        """Mine the pool with the labeled set's centroids (Eq. 5-6) on Ray; resumable shard by shard."""
        from rich.console import Console

        from flows.cli import UserError
        from flows.progress import progress_bar
        from storage.artifact import Artifact, join
        from tasks.omni.centroids import CentroidConfig, compute_centroids
        from workers.cluster import RayConfig
        from workers.mine import mine_pool

        _need_checkpoint(checkpoint)
        pool = _pool_table(pool, out, ray_address=ray_address)
        try:
            cfg = _mine_config(margin, floor, center, batch_size, split, size, device, decode_threads)
            if centroids is None:
                _need_table(labeled, "LABELED")
                centroids = join(out, "centroids")
                compute_centroids(checkpoint, labeled, centroids, CentroidConfig(input_size=size))
            n_shards = Artifact(pool).num_shards
            with progress_bar("mine", n_shards) as bar:
                def on_shard(i, info, rejected):
                    bar.update(0, advance=1, info=f"shard {i}: kept {info.rows}")

                res = mine_pool(checkpoint, centroids, pool, out, cfg, workers=workers,
                                cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                                ray_cfg=RayConfig(address=ray_address), on_shard=on_shard)
        except ValueError as e:
            raise UserError(str(e)) from e
        con = Console()
        con.print(_counts_table(f"auxiliary samples (margin {margin}) -> {out}", res.counts, res.kept, res.examined,
                                res.rejected))
        if res.reused:
            con.print("finished earlier with the same inputs and settings: reused")
        elif res.seconds > 0:
            con.print(f"{res.examined} faces in {res.seconds:.1f} s ({res.images_per_s:.0f} images/s)")
        if (figure or "").lower() != "none":
            from tasks.omni.figure import mined_grid

            path = figure or join(out, "mined.png")
            if res.kept:
                mined_grid(out, path, per_class=per_class)
                con.print(f"Fig. 3 grid: {path}")

    @app.command("distill")
    def distill_cmd(
        table: str = typer.Argument(..., help="Auxiliary samples (from `fermine mine`) or any labeled image table."),
        out: str = typer.Argument(..., help="Output: the distilled images as an image table (+ distilled.png)."),
        images_per_class: int = typer.Option(1, help="Distilled images per class (the paper: 1)."),
        inner_steps: int = typer.Option(5, help="SGD steps on the distilled images, each with a learned step size "
                                        "(Eq. 8 is 1)."),
        outer_steps: int = typer.Option(400, help="Updates of the images and step sizes."),
        epochs: Optional[float] = typer.Option(None, help="Instead of --outer-steps: passes over the real images."),
        image_size: int = typer.Option(32, help="Side of the distilled images in pixels."),
        arch: str = typer.Option("convnet", help="convnet, convnet_s, lenet, or a model architecture (small_cnn...)."),
        inits: int = typer.Option(4, help="Fresh random initialisations per outer step."),
        real_batch: int = typer.Option(256, help="Real images per outer step."),
        image_lr: float = typer.Option(0.03, help="Adam step for the images."),
        lr_lr: float = typer.Option(0.03, help="Adam step for the learned step sizes."),
        init_step_size: float = typer.Option(0.05, help="Initial step size."),
        max_per_class: int = typer.Option(2000, help="Real images per class held in memory (random sample)."),
        split: Optional[List[str]] = typer.Option(None, help="Split(s) of TABLE (default: train; 'all')."),
        holdout: float = typer.Option(0.1, help="Fraction of real images held out to score the result (0: none)."),
        seed: int = typer.Option(0, help="Seed."),
        device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    ) -> None:
        """Dataset distillation (Wang et al. 2018): a few synthetic images per class + the learned step size."""
        from rich.console import Console

        from flows.cli import UserError
        from flows.progress import progress_bar
        from tasks.omni.distill import distill

        _need_table(table, "TABLE")
        try:
            cfg = _distill_config(images_per_class=images_per_class, inner_steps=inner_steps,
                                  outer_steps=outer_steps, epochs=epochs, image_size=image_size, arch=arch,
                                  n_inits=inits, real_batch=real_batch, image_lr=image_lr, lr_lr=lr_lr,
                                  init_step_size=init_step_size, max_real_per_class=max_per_class,
                                  splits=_splits(split, ("train",)), holdout=holdout, seed=seed, device=device)
            with progress_bar("distill", None if epochs else outer_steps) as bar:
                def on_step(r):
                    bar.update(0, advance=1, info=f"loss {r['loss']:.3f} acc {r['real_acc']:.2f} "
                                                  f"eta {', '.join(f'{e:.3g}' for e in r['eta'])}")

                res = distill(table, out, cfg, progress=on_step)
        except ValueError as e:
            raise UserError(str(e)) from e
        con = Console()
        con.print(f"{res.manifest.rows} distilled images -> {out}; learned step size(s): "
                  f"{', '.join(f'{v:.4g}' for v in res.step_sizes)}")
        h = res.holdout
        if h:
            con.print(f"held-out accuracy of nets trained from random inits: distilled {h['distilled_acc']:.3f} vs "
                      f"{images_per_class} random real image(s) per class {h['random_real_acc']:.3f}")
        absent = res.manifest.extra.get("absent_classes")
        if absent:
            con.print(f"no real images of {', '.join(absent)} in {table}: no distilled images for them")
        con.print(f"Fig. 4 grid: {res.grid_uri}")

    @app.command("omni")
    def omni_cmd(
        labeled: str = typer.Argument(..., help="Labeled image table (train split: anchor; test split: inner test)."),
        pool: str = typer.Argument(..., help="Unlabeled pool: an image table, or an MS-Celeb-1M release folder "
                                   "(train.rec + train.idx, or <identity>/<n>.jpg), ingested once as a stage."),
        out: str = typer.Argument(..., help="Run folder: a folder per stage, results.json/.md, report.html."),
        cross: Optional[List[str]] = typer.Option(None, help="Cross-data-set test table as NAME=TABLE (repeatable; "
                                                  "every row is tested)."),
        primitive: Optional[str] = typer.Option(None, help="Use this trained checkpoint as primitive learner/baseline."),
        arch: str = typer.Option("small_cnn", help="small_cnn, resnet18, resnet34, resnet50, vgg16."),
        epochs: int = typer.Option(10, help="Epochs of the baseline and of each retraining."),
        size: int = typer.Option(64, help="Input size in pixels."),
        lr: float = typer.Option(0.01, help="Initial learning rate."),
        batch_size: int = typer.Option(64, help="Images per SGD step."),
        margin: float = typer.Option(0.05, help="Eq. 6 margin m."),
        floor: Optional[float] = typer.Option(None, help="Also require best similarity >= this."),
        center: bool = typer.Option(False, help="Subtract the centroids' mean before the cosine (not in the paper)."),
        pool_split: Optional[List[str]] = typer.Option(None, help="Pool split(s) to mine (default: every row)."),
        distill_steps: int = typer.Option(400, help="Distillation outer steps."),
        distill_arch: Optional[str] = typer.Option(None, help="Network the images are distilled for (default: "
                                                   "--arch, the network retrained with them)."),
        distill_size: Optional[int] = typer.Option(None, help="Distilled image side (default: --size)."),
        images_per_class: int = typer.Option(1, help="Distilled images per class."),
        ray_address: Optional[str] = typer.Option(None, help="Ray cluster for mining; default: a local instance."),
        workers: int = typer.Option(2, help="Mining actors."),
        seed: int = typer.Option(0, help="Seed."),
        device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    ) -> None:
        """Centroids -> mine -> distill -> retrain with labeled + VAS / DAS -> evaluate, as the omni pipeline.

        The same DAG as `fermine run` with `pipeline: omni` (this command builds that config from its
        options), so a rerun reuses every finished stage, and `fermine status OUT` / the report work.
        """
        import os

        from flows.cli import UserError
        from flows.commands.run import build_config, run_pipeline
        from storage.artifact import is_finished

        if is_finished(pool):
            pool_source: dict = {"format": "table", "root": pool}
        elif os.path.isdir(pool):  # an MS-Celeb-1M release: aligned 112 x 112 crops, resized, no face detection
            pool_source = {"format": "ms1m", "root": pool, "align": {"detect": "never"}}
        else:
            raise UserError(f"no finished image table or MS-Celeb-1M release at {pool} (POOL): check the path")
        cross_sources = []
        for c in cross or []:
            name, sep, uri = c.partition("=")
            if not sep or not name or not uri:
                raise UserError(f"--cross takes NAME=TABLE, got {c!r}")
            cross_sources.append({"format": "table", "root": uri, "name": name})
        recipe = {"arch": arch, "epochs": epochs, "input_size": size, "lr": lr, "batch_size": batch_size,
                  "device": device}
        cfg = build_config({
            "name": "omni", "out": out, "seed": seed, "pipeline": "omni",
            "labeled": {"format": "table", "root": labeled}, "pool": pool_source, "cross": cross_sources,
            "align": {"size": size}, "teacher": recipe, "teacher_checkpoint": primitive,
            "mine": {"margin": margin, "floor": floor, "center": center, "splits": _splits(pool_split, None),
                     "device": device},
            "distill": {"outer_steps": distill_steps, "images_per_class": images_per_class, "device": device,
                        **({"arch": distill_arch} if distill_arch else {}),
                        **({"image_size": distill_size} if distill_size else {})},
            "ray": {"address": ray_address, "workers": workers},
        })
        run_pipeline(cfg)
