"""`fermine align`: detect (MTCNN) and align every face of an image table, on Ray CPU workers."""

from __future__ import annotations

from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("align")
    def align(
        input: str = typer.Argument(..., help="Image table artifact (the output of `fermine ingest`)."),
        output: str = typer.Argument(..., help="Where to write the aligned table (its rejects go to OUTPUT/rejects)."),
        size: int = typer.Option(112, help="Output side in pixels: 224 for PASM, 112 for MS-Celeb style crops."),
        detect: str = typer.Option("auto", help="auto: detect rows without landmarks; always: detect every row; "
                                   "never: warp from shipped landmarks, resize the rest (already aligned data)."),
        min_face_size: int = typer.Option(32, help="Reject faces whose box is smaller than this (input pixels)."),
        min_confidence: float = typer.Option(0.9, help="Reject faces MTCNN is less sure of."),
        detect_min_face: int = typer.Option(20, help="Smallest face MTCNN looks for (pixels)."),
        upscale_to: int = typer.Option(0, help="Upscale images smaller than this for detection (0 = never)."),
        image_format: str = typer.Option("png", "--format", help="png (lossless) or jpg."),
        jpeg_quality: int = typer.Option(95, help="JPEG quality when --format jpg."),
        ray_address: Optional[str] = typer.Option(None, help="Ray cluster (auto or ray://host:10001); default: a local instance."),
        workers: Optional[int] = typer.Option(None, help="Ray actors, one CPU each; default: every CPU Ray has."),
    ) -> None:
        """Detect and align faces (MTCNN + 5-point similarity warp); resumes an interrupted run."""
        import time
        from collections import Counter

        from rich.console import Console
        from rich.table import Table

        from flows.cli import UserError
        from flows.progress import progress_bar
        from storage.artifact import Artifact, ShardedWriter, is_finished, join, shard_name
        from tasks.align import AlignConfig, reject_category

        try:
            cfg = AlignConfig(size=size, detect=detect, min_face_size=min_face_size, min_confidence=min_confidence,
                              detect_min_face=detect_min_face, detect_upscale_to=upscale_to,
                              image_format="." + image_format.lower().lstrip(".").replace("jpeg", "jpg"),
                              jpeg_quality=jpeg_quality)
        except ValueError as e:
            raise UserError(str(e)) from e
        if workers is not None and workers < 1:
            raise UserError(f"--workers must be at least 1, got {workers}")
        src = Artifact(input)
        if is_finished(output):
            raise UserError(f"{output} is already a finished artifact; choose another output or delete it")
        done = ShardedWriter(output).done()
        already = sum(s.rows for i, s in enumerate(src.manifest.shards) if shard_name(i) in done)

        import ray

        from workers.align import align_artifact
        from workers.cluster import RayConfig, connect
        from workers.sharded import PoolConfig

        connect(RayConfig(address=ray_address))
        n_actors = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        processed = 0
        t0 = time.perf_counter()
        with progress_bar("align", len(src)) as bar:
            bar.advance(0, already)

            def on_shard(i: int, info, rejected: int) -> None:
                nonlocal processed
                n = src.manifest.shards[i].rows
                processed += n
                rate = processed / max(time.perf_counter() - t0, 1e-9)
                bar.update(0, advance=n, info=f"{rate:.1f} img/s")

            try:
                manifest = align_artifact(input, output, cfg, pool=PoolConfig(num_actors=n_actors, num_cpus=1.0),
                                          on_shard=on_shard)
            except ValueError as e:
                raise UserError(str(e)) from e
        secs = time.perf_counter() - t0

        out = Artifact(output)
        methods = Counter(out.read(columns=["align_method"]).column("align_method").to_pylist())
        multi = sum(1 for n in out.read(columns=["n_faces"]).column("n_faces").to_pylist() if n and n > 1)
        reasons = Counter(reject_category(r) for r in Artifact(join(output, "rejects")).read(columns=["reason"])
                          .column("reason").to_pylist())
        console = Console()
        t = Table(title=f"align -> {output}", show_header=False)
        t.add_row("aligned", f"{manifest.rows}  ({', '.join(f'{k}: {v}' for k, v in sorted(methods.items())) or '-'})")
        if multi:
            t.add_row("images with several faces", f"{multi} (kept the most confident large face)")
        t.add_row("rejected", str(sum(reasons.values())))
        for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
            t.add_row(f"  {reason}", str(n))
        t.add_row("images/s", f"{processed / secs:.1f}" + (f"  ({already} rows reused from an earlier run)" if already else ""))
        t.add_row("workers", str(n_actors))
        console.print(t)
