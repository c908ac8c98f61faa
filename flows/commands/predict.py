"""`fermine predict` (faces in photos -> labels) and `fermine export` (ONNX / TorchScript)."""

from __future__ import annotations

from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("predict")
    def predict(
        model: str = typer.Argument(..., help="Checkpoint folder (model.pt + model.json), e.g. a run's train stage output."),
        paths: List[str] = typer.Argument(..., help="Photos and/or folders of photos (searched recursively)."),
        out: Optional[str] = typer.Option(None, "--out", help="Write every face to this .csv or .json file."),
        annotate_dir: Optional[str] = typer.Option(None, "--annotate", help="Write each photo with boxes and labels drawn into this folder."),
        min_face_size: int = typer.Option(32, help="Faces smaller than this (photo pixels) are listed but not classified."),
        min_confidence: float = typer.Option(0.9, help="Faces MTCNN is less sure of are listed but not classified."),
        upscale_to: int = typer.Option(0, help="Upscale photos smaller than this for detection (0 = never)."),
        align_size: int = typer.Option(0, help="Warp faces at this size, then resize to the model's input "
                                       "(0 = the align size of the table the model was trained on)."),
        device: str = typer.Option("cpu", help="cpu, cuda or auto."),
    ) -> None:
        """Detect (MTCNN), align (as in training) and classify every face in photos."""
        import os

        from rich.console import Console
        from rich.table import Table

        from flows.cli import UserError
        from flows.progress import progress_bar
        from tasks.predict import IMAGE_EXTENSIONS, PredictConfig, annotate, find_photos, predict_photos, summarize, write_results

        if out is not None and os.path.splitext(out)[1].lower() not in (".csv", ".json"):
            raise UserError(f"--out must end in .csv or .json, got {out!r}")
        try:
            cfg = PredictConfig(min_face_size=min_face_size, min_confidence=min_confidence,
                                detect_upscale_to=upscale_to, align_size=align_size, device=device)
        except ValueError as e:
            raise UserError(str(e)) from None
        photos = find_photos(paths)  # FileNotFoundError for a typo: one line, exit 2
        if not photos:
            raise UserError(f"no photos ({' '.join(IMAGE_EXTENSIONS)}) under {' '.join(paths)}")

        con = Console()
        used_names: set[str] = set()
        annotated: list[str] = []

        def _annotated_name(photo: str) -> str:
            stem = os.path.splitext(os.path.basename(photo))[0]
            name, k = f"{stem}.jpg", 1
            while name in used_names:  # same file name in two folders
                name, k = f"{stem}-{k}.jpg", k + 1
            used_names.add(name)
            return os.path.join(annotate_dir, name)

        with progress_bar("predict", total=len(photos)) as bar:
            def on_photo(photo, rows):
                if annotate_dir is not None and not any(r.problem and r.problem.startswith("corrupt") for r in rows):
                    annotated.append(annotate(photo, rows, _annotated_name(photo)))
                bar.advance(0, 1)

            try:
                results = predict_photos(model, photos, cfg, on_photo=on_photo)
            except ValueError as e:
                raise UserError(str(e)) from None

        s = summarize(results)
        t = Table(title="fermine predict")
        t.add_column("photos", justify="right")
        t.add_column("faces", justify="right")
        t.add_column("no face", justify="right")
        t.add_column("corrupt", justify="right")
        t.add_column("skipped faces", justify="right")
        t.add_row(str(s["photos"]), str(s["faces"]), str(s["no_face"]), str(s["corrupt"]), str(s["skipped_faces"]))
        con.print(t)
        if s["labels"]:
            con.print("labels: " + ", ".join(f"{k} {v}" for k, v in s["labels"].items()))
        if out is None and len(results) <= 50:
            rt = Table(show_header=True)
            for col in ("photo", "face", "label", "score", "valence", "arousal", "problem"):
                rt.add_column(col)
            for r in results:
                rt.add_row(r.photo, "" if r.face is None else str(r.face), r.label or "",
                           "" if r.score is None else f"{r.score:.3f}",
                           "" if r.valence is None else f"{r.valence:+.3f}",
                           "" if r.arousal is None else f"{r.arousal:+.3f}", r.problem or "")
            con.print(rt)
        if out is not None:
            con.print(f"results: [bold]{write_results(results, out)}[/bold]")
        if annotated:
            con.print(f"annotated photos: [bold]{annotate_dir}[/bold] ({len(annotated)})")

    @app.command("export")
    def export(
        model: str = typer.Argument(..., help="Checkpoint folder (model.pt + model.json)."),
        format: str = typer.Option("onnx", "--format", help="onnx or torchscript."),
        out: Optional[str] = typer.Option(None, "--out", help="Output folder; default: MODEL/export-<format>."),
    ) -> None:
        """Export a model (softmax / tanh included) with its preprocessing in preprocessing.json."""
        import json
        import os

        from rich.console import Console

        from flows.cli import UserError
        from tasks.export import FORMATS, PREPROCESSING_FILE, export_model

        fmt = format.lower()
        if fmt not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
        if "://" in model and out is None:
            raise UserError("the checkpoint is remote: pass --out with a local folder for the exported model")
        target = out or os.path.join(model, f"export-{fmt}")
        try:
            path = export_model(model, target, fmt)
        except ValueError as e:
            raise UserError(str(e)) from None
        with open(os.path.join(target, PREPROCESSING_FILE)) as f:
            pre = json.load(f)
        con = Console()
        con.print(f"exported [bold]{path}[/bold] ({os.path.getsize(path) / 1e6:.1f} MB)")
        con.print(f"input: {pre['layout']} {pre['dtype']} {pre['channel_order']} {pre['input_size']}x{pre['input_size']}, "
                  f"(pixel/255 - {pre['mean']}) / {pre['std']}; output: {pre['output']} over {pre['classes']}")
        con.print(f"preprocessing: {os.path.join(target, PREPROCESSING_FILE)}")
