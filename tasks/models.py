"""Backbones for FER: a registry (like timm's) of networks that expose their penultimate features.

Every model is a :class:`FERNet`: ``features(x)`` gives the penultimate representation (after global
pooling for CNNs, after fc6/fc7 for VGG-16), ``head(f)`` the logits, and ``forward = head(features)``.
Mining (class centroids, Omni-supervised Eq. 4) and feature losses need the features; the PASM
teacher-student loss needs the logits.

Pretrained weights come from a local file only (no hub, no downloads): a torchvision state_dict, a
plain FERNet state_dict, a fermine checkpoint folder or a training state (``last.pt``). The old
classifier is dropped when its shape does not fit (e.g. ImageNet's 1000 classes -> 7 expressions).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn

__all__ = [
    "FERNet",
    "LoadReport",
    "available_models",
    "build_model",
    "load_pretrained",
    "load_state_file",
    "register_model",
]


class FERNet(nn.Module):
    """A classifier split into ``body`` (input -> penultimate features) and ``head`` (features -> logits).

    ``tv_prefix`` names the torchvision key of the classifier that ``head`` replaces (``fc.`` for ResNet,
    ``classifier.6.`` for VGG) so torchvision state_dicts map onto ``body.*`` / ``head.*``.
    """

    def __init__(self, arch: str, body: nn.Module, feature_dim: int, num_classes: int, tv_head_prefix: str = ""):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.arch = arch
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.tv_head_prefix = tv_head_prefix
        self.body = body
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, (N, feature_dim)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, num_classes={self.num_classes}, feature_dim={self.feature_dim}"


_REGISTRY: dict[str, Callable[[int], FERNet]] = {}


def register_model(name: str) -> Callable[[Callable[[int], FERNet]], Callable[[int], FERNet]]:
    """Decorator: ``@register_model("name")`` on ``fn(num_classes) -> FERNet``."""

    def deco(fn: Callable[[int], FERNet]) -> Callable[[int], FERNet]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(arch: str, num_classes: int = 7, pretrained: str | None = None) -> FERNet:
    """Build ``arch`` with a fresh ``num_classes`` head; optionally load weights from a local file/folder."""
    if arch not in _REGISTRY:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(available_models())}")
    model = _REGISTRY[arch](num_classes)
    if pretrained:
        report = load_pretrained(model, pretrained)
        if report.head_reset or report.missing or report.unexpected:
            warnings.warn(f"pretrained weights from {pretrained}: {report.summary()}", stacklevel=2)
    return model


# ---------------------------------------------------------------- architectures


class _SmallCNNBody(nn.Module):
    """A stride-2 conv block, then 3 x (conv3x3-BN-ReLU, maxpool 2), then global average pooling.

    Sized for CPU runs at 32-112 px: about 5x fewer multiply-adds than ResNet-18 at the same input size
    (33M vs 150M at 64 px). Downsampling is 16x like ResNet's stem + 2 stages; the stride-2 first
    block keeps the largest activation map (the costliest on a CPU) small.
    """

    def __init__(self, widths: tuple[int, ...] = (24, 48, 96, 192)):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(widths):
            layers += [nn.Conv2d(c_in, c, 3, stride=2 if i == 0 else 1, padding=1, bias=False),
                       nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.blocks(x)), 1)


@register_model("small_cnn")
def small_cnn(num_classes: int = 7) -> FERNet:
    return FERNet("small_cnn", _SmallCNNBody(), 192, num_classes)


def _resnet(arch: str, num_classes: int) -> FERNet:
    import torchvision

    body = getattr(torchvision.models, arch)(weights=None)
    dim = body.fc.in_features
    body.fc = nn.Identity()  # the head replaces it; body(x) now ends at the pooled features
    return FERNet(arch, body, dim, num_classes, tv_head_prefix="fc.")


@register_model("resnet18")
def resnet18(num_classes: int = 7) -> FERNet:
    return _resnet("resnet18", num_classes)


@register_model("resnet34")
def resnet34(num_classes: int = 7) -> FERNet:
    return _resnet("resnet34", num_classes)


@register_model("resnet50")
def resnet50(num_classes: int = 7) -> FERNet:
    return _resnet("resnet50", num_classes)


class _VGGBody(nn.Module):
    """torchvision VGG up to fc7 (incl. ReLU and dropout): keys match torchvision's for classifier.0-5."""

    def __init__(self, vgg: nn.Module):
        super().__init__()
        self.features = vgg.features
        self.avgpool = vgg.avgpool
        self.classifier = nn.Sequential(*list(vgg.classifier.children())[:6])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@register_model("vgg16")
def vgg16(num_classes: int = 7) -> FERNet:
    import torchvision

    vgg = torchvision.models.vgg16(weights=None)
    dim = vgg.classifier[6].in_features
    return FERNet("vgg16", _VGGBody(vgg), dim, num_classes, tv_head_prefix="classifier.6.")


# ---------------------------------------------------------------- pretrained weights


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did. ``head_reset``: the classifier was kept at its fresh init."""

    loaded: int = 0
    missing: list[str] = field(default_factory=list)  # model keys the file lacks (excluding the head)
    unexpected: list[str] = field(default_factory=list)  # file keys the model does not have
    shape_mismatch: list[str] = field(default_factory=list)  # e.g. "head.weight: file (1000, 512) vs model (7, 512)"
    head_reset: bool = False

    def summary(self) -> str:
        parts = [f"{self.loaded} tensors loaded"]
        if self.head_reset:
            parts.append("classifier head re-initialised (its shape or presence differs)")
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                           ("shape mismatch", self.shape_mismatch)):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{name}: {', '.join(keys[:5])}{more}")
        return "; ".join(parts)


def load_state_file(path: str) -> dict[str, torch.Tensor]:
    """Read a state_dict from a local file or a fermine checkpoint folder (``model.pt`` inside)."""
    import fsspec

    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        raise FileNotFoundError(f"pretrained weights not found: {path} (give a local .pt/.pth file or a checkpoint folder)")
    if fs.isdir(p):
        p = p.rstrip("/") + "/model.pt"
        if not fs.exists(p):
            raise FileNotFoundError(f"{path} is a folder without model.pt: not a fermine checkpoint")
    data = fs.cat_file(p)
    try:
        # weights_only: a weights file must never be able to run code when loaded.
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for non-checkpoint bytes
        raise ValueError(f"{path} is not a PyTorch weights file ({type(e).__name__}: {str(e)[:200]})") from None
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):  # training states and common wrappers
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state_dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}  # DataParallel/DDP prefixes


def weights_normalization(path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) the weights at ``path`` were trained with.

    A fermine checkpoint (its folder, or the ``model.pt`` beside its ``model.json``) records them; any
    other weights file is taken to be torchvision's ImageNet weights (the only pretrained weights a
    user can bring), trained on ImageNet's statistics.
    """
    import json

    import fsspec

    from tasks.data import IMAGENET_MEAN, IMAGENET_STD

    fs, p = fsspec.core.url_to_fs(path)
    folder = p.rstrip("/") if fs.isdir(p) else p.rsplit("/", 1)[0]
    meta = f"{folder}/model.json"
    if fs.exists(meta):
        m = json.loads(fs.cat_file(meta).decode())
        if m.get("mean") and m.get("std"):
            return tuple(m["mean"]), tuple(m["std"])
    return IMAGENET_MEAN, IMAGENET_STD


def _to_fernet_keys(model: FERNet, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if any(k.startswith(("body.", "head.")) for k in state):
        return dict(state)
    # A torchvision state_dict: its classifier becomes head.*, the rest lives under body.*.
    out = {}
    for k, v in state.items():
        if model.tv_head_prefix and k.startswith(model.tv_head_prefix):
            out["head." + k[len(model.tv_head_prefix):]] = v
        else:
            out["body." + k] = v
    return out


def load_pretrained(model: FERNet, path: str, strict_backbone: bool = True) -> LoadReport:
    """Load weights from a local file into ``model``, keeping the head fresh if its shape differs.

    With ``strict_backbone`` (default) a file that misses or adds backbone weights is refused: it was
    made for another architecture, and silently training from a half-initialised network wastes a run.
    """
    state = _to_fernet_keys(model, load_state_file(path))
    own = model.state_dict()
    report = LoadReport()
    usable: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k not in own:
            report.unexpected.append(k)
        elif own[k].shape != v.shape:
            report.shape_mismatch.append(f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}")
        else:
            usable[k] = v
    report.missing = [k for k in own if k not in usable and not k.startswith("head.")]
    head_keys = [k for k in own if k.startswith("head.")]
    report.head_reset = not all(k in usable for k in head_keys)
    # Head keys that fit are loaded only if the whole head fits (never a half-loaded classifier).
    if report.head_reset:
        usable = {k: v for k, v in usable.items() if not k.startswith("head.")}
    report.shape_mismatch = [m for m in report.shape_mismatch if not m.startswith("head.")]
    bad_body = report.missing or report.unexpected or report.shape_mismatch
    if not usable or (strict_backbone and bad_body):
        raise ValueError(
            f"{path} does not fit architecture {model.arch!r}: {report.summary()}. "
            "Check --arch, or pass a state_dict saved from the same architecture."
        )
    model.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    return report
