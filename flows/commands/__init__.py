"""One module per pipeline; each defines ``register(app: typer.Typer)``."""
