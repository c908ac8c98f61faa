"""Export a checkpoint to ONNX or TorchScript, with its preprocessing written beside it.

The exported graph ends in the model's output activation -- softmax probabilities for a
classifier, tanh valence/arousal for a ``task: valence_arousal`` model -- so a consumer needs no
fermine code after the network. Before it, they need exactly what ``preprocessing.json`` records:
faces aligned with the MTCNN 5-point similarity warp onto the ArcFace template at ``input_size``,
RGB, NCHW float32, ``(pixel / 255 - mean) / std``.

ONNX uses torch's TorchScript-based exporter (``dynamo=False``): it needs no network and no
onnxscript, and handles every fermine architecture; the batch axis is dynamic.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import torch
from torch import nn

FORMATS = ("onnx", "torchscript")
PREPROCESSING_FILE = "preprocessing.json"
ONNX_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "output"

__all__ = ["FORMATS", "PREPROCESSING_FILE", "export_model", "preprocessing"]


class _WithActivation(nn.Module):
    """The network followed by its output activation (softmax or tanh)."""

    def __init__(self, model: nn.Module, activation: str):
        super().__init__()
        self.model = model
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if self.activation == "tanh":
            return torch.tanh(out)
        return torch.softmax(out, dim=1)


def preprocessing(meta: dict[str, Any], fmt: str, file: str) -> dict[str, Any]:
    """What a consumer of the exported file must do before and after it (from model.json)."""
    from tasks.align import TEMPLATE_112

    size = int(meta["input_size"])
    is_va = meta.get("task") == "valence_arousal"
    return {
        "format": fmt,
        "file": file,
        "arch": meta.get("arch"),
        "task": meta.get("task", "classification"),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_size": size,
        "input_shape": ["batch", 3, size, size],
        "layout": "NCHW",
        "dtype": "float32",
        "channel_order": "RGB",
        "scale": 1.0 / 255.0,
        "mean": list(meta.get("mean") or (0.5, 0.5, 0.5)),
        "std": list(meta.get("std") or (0.5, 0.5, 0.5)),
        "normalization": "x = (pixel / 255 - mean[c]) / std[c]",
        "alignment": {
            "detector": "MTCNN",
            "method": "least-squares similarity transform of the 5 landmarks onto the template, cv2.warpAffine bilinear",
            "landmark_order": ["left_eye", "right_eye", "nose", "mouth_left", "mouth_right"],
            "template": [[round(float(v) * size / 112.0, 4) for v in pt] for pt in TEMPLATE_112],
        },
        "output": "valence_arousal_tanh" if is_va else "probabilities_softmax",
        "classes": list(meta.get("outputs") or meta.get("classes") or []),
        "metrics": meta.get("metrics", {}),
    }


def export_model(checkpoint_uri: str, out_dir: str, fmt: str = "onnx") -> str:
    """Export the checkpoint to ``out_dir/model.onnx`` or ``out_dir/model.ts`` and write
    ``out_dir/preprocessing.json``; returns the model file's path."""
    from tasks.engine.checkpoint import load_checkpoint

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    model, meta = load_checkpoint(checkpoint_uri, device="cpu")
    if not meta.get("input_size"):
        raise ValueError(f"{checkpoint_uri}/model.json has no input_size: cannot fix the exported input shape")
    size = int(meta["input_size"])
    activation = "tanh" if meta.get("task") == "valence_arousal" else "softmax"
    wrapped = _WithActivation(model, activation).eval()
    # Batch 2, not 1: a batch of one lets tracing specialise shapes (e.g. flatten) to 1.
    example = torch.zeros(2, 3, size, size)
    os.makedirs(out_dir, exist_ok=True)
    name = "model.onnx" if fmt == "onnx" else "model.ts"
    path = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, f".tmp-{os.getpid()}-{name}")
    try:
        # torch.jit warns that it is deprecated in favour of torch.export; TorchScript files remain the
        # format C++/libtorch consumers load, so the warning is silenced rather than shown to users.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            if fmt == "onnx":
                torch.onnx.export(
                    wrapped, (example,), tmp, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    opset_version=ONNX_OPSET, dynamo=False,
                )
            else:
                traced = torch.jit.trace(wrapped, example)
                torch.jit.save(traced, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    pre = preprocessing(meta, fmt, name)
    with open(os.path.join(out_dir, PREPROCESSING_FILE), "w") as f:
        json.dump(pre, f, indent=2, default=str)
    return path
