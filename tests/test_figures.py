"""Figures never fail a stage: empty, one-row and ragged grids draw; a drawing error is logged, not raised."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from storage.artifact import ArtifactWriter
from storage.images import encode
from storage.ingest import write_image_table
from storage.schema import image_row
from tasks.figures import draw_safely, image_grid
from tasks.omni.mine import AUX_SCHEMA
from tasks.omni.figure import mined_grid

PNG = b"\x89PNG"


def _aux(uri: str, labels: list[int]) -> str:
    rng = np.random.default_rng(0)
    rows = [{**image_row(f"a{i}", encode(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)), label=k,
                         split="pool", source="mined:x"), "best_similarity": 0.9 - i / 100, "margin": 0.1}
            for i, k in enumerate(labels)]
    with ArtifactWriter(uri, stage="mine", schema=AUX_SCHEMA) as w:
        w.write_rows(rows)
    return uri


@pytest.mark.parametrize("labels", [[], [3], [0, 0, 5]], ids=["nothing mined", "one row", "empty classes"])
def test_mined_grid_draws_whatever_was_mined(tmp_path, labels):
    shown = mined_grid(_aux(str(tmp_path / "aux"), labels), str(tmp_path / "g.png"))
    assert (tmp_path / "g.png").read_bytes()[:4] == PNG
    assert sum(len(v) for v in shown.values()) == len(labels)


def test_image_grid_takes_no_rows_and_ragged_titles(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    for i, (rows, cells) in enumerate([([], []), ([[img]], [["a"]]), ([[img, img], [img]], [["a", "b"]]),
                                       ([[img], []], [["x"], []])]):
        path = str(tmp_path / f"g{i}.png")
        image_grid(rows, path, row_titles=["r"], cell_titles=cells, title="t")
        assert open(path, "rb").read(4) == PNG


def test_draw_safely_logs_instead_of_raising(caplog):
    def broken(*_a, **_k):
        raise IndexError("list index out of range")

    with caplog.at_level(logging.WARNING, logger="fermine.figures"):
        assert draw_safely("mined samples", broken, 1, k=2) is None
    assert "mined samples" in caplog.text and "IndexError" in caplog.text
    assert draw_safely("ok", lambda x: x + 1, 1) == 2


def test_a_figure_error_after_the_metrics_does_not_fail_evaluation(tmp_path, monkeypatch):
    """The evaluate stage writes its metrics, then its figures; a broken figure is logged, the stage ends."""
    import torch

    import tasks.evaluate
    from flows import steps
    from tasks.engine.checkpoint import save_checkpoint
    from tasks.models import build_model

    rng = np.random.default_rng(1)
    table = str(tmp_path / "t")
    write_image_table([image_row(f"t{i}", encode(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)), label=i % 7,
                                 split="test", source="x") for i in range(14)], table, stage="t", config={})
    torch.manual_seed(0)
    ck = str(tmp_path / "m")
    save_checkpoint(ck, build_model("small_cnn", 7), {"input_size": 16})

    def broken(*_a, **_k):
        raise RuntimeError("no display")

    monkeypatch.setattr(tasks.evaluate, "save_confusion_png", broken)
    out = tmp_path / "ev"
    steps.evaluate(ck, {"inner": (table, ("test",))})(str(out))
    assert json.loads((out / "metrics.json").read_text())["inner"]["n"] == 14
