"""Exported models (ONNX via onnxruntime, TorchScript via torch.jit.load) give PyTorch's outputs."""

import json
import warnings

import numpy as np
import pytest
import torch

from tasks.engine.checkpoint import save_checkpoint
from tasks.export import PREPROCESSING_FILE, export_model
from tasks.models import build_model

SIZE = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("small_cnn", 7).eval()
    d = str(tmp_path_factory.mktemp("ck"))
    save_checkpoint(d, model, {"input_size": SIZE, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]})
    return d, model


@pytest.fixture(scope="module")
def va_checkpoint(tmp_path_factory):
    torch.manual_seed(1)
    model = build_model("small_cnn", 2).eval()
    d = str(tmp_path_factory.mktemp("va"))
    save_checkpoint(d, model, {"input_size": SIZE, "task": "valence_arousal", "classes": ["valence", "arousal"],
                               "outputs": ["valence", "arousal"], "output_activation": "tanh"})
    return d, model


def _batch(n):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(n))


def test_onnx_matches_pytorch_with_dynamic_batch(checkpoint, tmp_path):
    import onnxruntime as ort

    ck, model = checkpoint
    path = export_model(ck, str(tmp_path), "onnx")
    assert path.endswith("model.onnx")
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for n in (1, 5):  # exported with batch 2: other sizes prove the batch axis is dynamic
        x = _batch(n)
        got = sess.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            want = torch.softmax(model(x), 1).numpy()
        assert got.shape == (n, 7)
        np.testing.assert_allclose(got, want, atol=1e-4)
        np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    pre = json.loads((tmp_path / PREPROCESSING_FILE).read_text())
    assert pre["input_size"] == SIZE and pre["layout"] == "NCHW" and pre["channel_order"] == "RGB"
    assert pre["mean"] == [0.4, 0.5, 0.6] and pre["std"] == [0.2, 0.25, 0.3]
    assert pre["classes"][4] == "happy" and pre["output"] == "probabilities_softmax" and pre["file"] == "model.onnx"
    assert len(pre["alignment"]["template"]) == 5


def test_torchscript_matches_pytorch(checkpoint, tmp_path):
    ck, model = checkpoint
    path = export_model(ck, str(tmp_path), "torchscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(path)
    for n in (1, 3):
        x = _batch(n)
        with torch.no_grad():
            np.testing.assert_allclose(loaded(x).numpy(), torch.softmax(model(x), 1).numpy(), atol=1e-4)
    pre = json.loads((tmp_path / PREPROCESSING_FILE).read_text())
    assert pre["format"] == "torchscript" and pre["file"] == "model.ts"


def test_valence_arousal_export_applies_tanh(va_checkpoint, tmp_path):
    import onnxruntime as ort

    ck, model = va_checkpoint
    path = export_model(ck, str(tmp_path), "onnx")
    x = _batch(4) * 5
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, torch.tanh(model(x)).numpy(), atol=1e-4)
    pre = json.loads((tmp_path / PREPROCESSING_FILE).read_text())
    assert pre["task"] == "valence_arousal" and pre["classes"] == ["valence", "arousal"]


def test_bad_format_and_missing_checkpoint(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="format must be one of"):
        export_model(checkpoint[0], str(tmp_path), "tflite")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        export_model(str(tmp_path / "nope"), str(tmp_path / "o"), "onnx")


def test_cli_export(checkpoint, tmp_path, capsys):
    from flows.cli import main

    main(["export", checkpoint[0], "--format", "torchscript", "--out", str(tmp_path / "e")])
    assert (tmp_path / "e" / "model.ts").exists() and (tmp_path / "e" / PREPROCESSING_FILE).exists()
    assert "preprocessing" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["export", checkpoint[0], "--format", "tflite", "--out", str(tmp_path / "f")])
    assert e.value.code == 2
