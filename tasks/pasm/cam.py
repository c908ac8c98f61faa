"""Adversarial erasing (Wei et al. 2017, PASM ref. [22]): erase where the network's attention peaks.

PASM's Table VII compares three ways to pick the erased region of the same size: random (Zhong et al.),
the attention map (this module) and the point attack. The attention map is Grad-CAM (Selvaraju et al.)
of the true class on the last spatial feature map of the trained network; for a global-average-pooled
body with a linear head (small_cnn, ResNet) it equals Wei et al.'s CAM up to a positive factor, and it
also works for VGG's fully connected head. The erased position is the centre of the map's strongest cell, in
image pixels.

The output is a positions table (tasks.pasm.attack.POSITIONS_SCHEMA), so tasks.pasm.erase.erase_table erases it
exactly like the attack's positions. Its RGB is each image's mean colour: Wei et al. erase with the
mean pixel value, and the attack's perturbed colour does not exist here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from storage.artifact import Artifact, ArtifactWriter, Manifest
from storage.images import ImageDecodeError
from tasks.pasm.attack import POSITIONS_SCHEMA
from tasks.data import decode_resized, normalize

STAGE = "cam"


@dataclass(frozen=True)
class CamConfig:
    splits: tuple[str, ...] = ("train",)  # rows whose attention peak is located (the learning material)
    batch_size: int = 64
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        object.__setattr__(self, "splits", tuple(self.splits))


def _last_spatial_output(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, the last 4-D activation of the forward pass), found by hooking every module once."""
    maps: list[torch.Tensor] = []

    def keep(_m: torch.nn.Module, _i: object, out: object) -> None:
        # A spatial map has more than one position: a global pool's N x C x 1 x 1 output is not one.
        if torch.is_tensor(out) and out.ndim == 4 and out.shape[-1] * out.shape[-2] > 1:
            maps.append(out)

    hooks = [m.register_forward_hook(keep) for m in model.modules() if not list(m.children())]
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    if not maps:
        raise ValueError("the network has no spatial feature map: attention erasing needs a convolutional body")
    return logits, maps[-1]


def grad_cam(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of class ``labels`` for normalised inputs ``x``: N x h x w maps at the feature map's resolution."""
    model.eval()
    x = x.detach().requires_grad_(False)
    with torch.enable_grad():
        logits, fmap = _last_spatial_output(model, x)
        score = logits.gather(1, labels.view(-1, 1)).sum()
        (grads,) = torch.autograd.grad(score, fmap)
    weights = grads.mean(dim=(2, 3), keepdim=True)  # alpha_k: the spatially pooled gradient per channel
    return F.relu((weights * fmap).sum(1)).detach()


def peak_positions(cam: torch.Tensor, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) in image pixels of the centre of each map's strongest cell.

    The last feature map of a small input is coarse (2 x 2 for small_cnn at 32 px): an upsampled map
    would put its maximum on an image border, the centre of the cell is where that cell's evidence is.
    """
    n, h, w = cam.shape
    flat = cam.reshape(n, -1).argmax(1)
    cx, cy = flat % w, flat // w
    return ((cx.float() + 0.5) * image_size / w).long(), ((cy.float() + 0.5) * image_size / h).long()


def cam_table(checkpoint_uri: str, table_uri: str, out_uri: str, cfg: CamConfig = CamConfig()) -> Manifest:
    """Write the attention peak of every labeled ``cfg.splits`` row of ``table_uri`` as a positions table.

    Rows without a label or whose image does not decode are counted in the manifest
    (``extra.rejects``) and left out, as the attack does.
    """
    from tasks.engine.checkpoint import load_checkpoint, read_meta
    from tasks.device import resolve_device

    dev = resolve_device(cfg.device)
    model, meta = load_checkpoint(checkpoint_uri, device=str(dev))
    size = int(meta["input_size"])
    mean, std = meta.get("mean"), meta.get("std")
    src = Artifact(table_uri)
    config = {**asdict(cfg), "splits": list(cfg.splits), "teacher_sha256": read_meta(checkpoint_uri).get("model_sha256")}
    config.pop("device")
    rejects = 0
    out = ArtifactWriter(out_uri, stage=STAGE, config=config, inputs={"table": src.digest}, schema=POSITIONS_SCHEMA)
    for batch in src.iter_batches(columns=["id", "image", "label", "split"], batch_size=cfg.batch_size):
        ids, imgs, labels = [], [], []
        for rid, blob, lab, sp in zip(*(batch.column(c).to_pylist() for c in ("id", "image", "label", "split"))):
            if sp not in cfg.splits:
                continue
            if lab is None or lab < 0:
                rejects += 1
                continue
            try:
                imgs.append(decode_resized(blob, size))
            except ImageDecodeError:
                rejects += 1
                continue
            ids.append(str(rid))
            labels.append(int(lab))
        if ids:
            out.write(_positions(model, ids, np.stack(imgs), labels, size, mean, std, dev))
    return out.commit({"rejects": rejects})


def _positions(model: torch.nn.Module, ids: list[str], imgs: np.ndarray, labels: list[int], size: int,
               mean: Sequence[float] | None, std: Sequence[float] | None, dev: torch.device) -> pa.Table:
    u8 = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous().to(dev)
    y = torch.tensor(labels, device=dev)
    x = normalize(u8, *(a for a in (mean, std) if a is not None))
    cam = grad_cam(model, x, y)
    with torch.no_grad():
        prob = torch.softmax(model(x).float(), 1).gather(1, y.view(-1, 1))[:, 0].cpu().numpy()
    px, py = peak_positions(cam, size)
    rgb = imgs.reshape(len(ids), -1, 3).mean(1).round().astype(np.uint8)
    cols = {"id": ids, "x": px.cpu().int().numpy(), "y": py.cpu().int().numpy(), "r": rgb[:, 0], "g": rgb[:, 1],
            "b": rgb[:, 2], "fitness": prob, "clean_prob": prob, "evals": np.ones(len(ids), np.int32),
            "label": np.asarray(labels, np.int8), "size": np.full(len(ids), size, np.int32)}
    return pa.table({k: pa.array(v, type=POSITIONS_SCHEMA.field(k).type) for k, v in cols.items()},
                    schema=POSITIONS_SCHEMA)
