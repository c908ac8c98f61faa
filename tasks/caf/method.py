"""Contrastive Adversarial Framework (CAF) for valence/arousal regression.

Paper: contrastive_adversarial_av.md (Kim & Song, AAAI 2021), Algorithm 1 and Eq. 3-8.

Networks: an encoder f_e (a FERNet backbone, ``model.features``), a regression head f_r (the
FERNet's linear head with 2 outputs, followed by tanh: 0 = valence, 1 = arousal) and a critic f_c
(an MLP on the encoder features, d-dimensional output z). Each iteration on a minibatch:

1. (line 3) Otsu thresholds on the batch's |arousal| and |valence| give delta_a, delta_v and
   delta_r = sqrt(delta_a^2 + delta_v^2); samples with sqrt(a^2 + v^2) < delta_r are *weak* (Q),
   the others *strong* (P).
2. (line 6) critic step on L_c (Eq. 7): mean squared distance of strong-strong pairs plus half the
   mean hinge max(0, alpha - D^2) over strong-weak pairs, with the margin alpha of Eq. 5/8.
3. (line 7) encoder step on L_adv = -mean f_c(f_e(x_w)) over weak samples, critic frozen.
4. (line 8) encoder + head step on L_AV = RMSE + 0.5 (L_PCC + L_CCC).

With ``critic=False`` steps 1-3 are skipped: the "backbone without critic" baseline of Table 4.
Only the encoder and head are kept for inference (the checkpoint is a plain 2-output FERNet whose
model.json says ``task: valence_arousal`` and ``output_activation: tanh``).

Choices the paper leaves open (documented here, configurable in :class:`CAFConfig`):

- Margin (Eq. 5/8): alpha = MI + Delta. MI = -1/2 log(1 - eta^2), eta = Pearson correlation of
  g(Z_s) and g(Z_w) where the i-th strong and i-th weak latent vectors of the batch are paired (the
  first min(N_s, N_w) of each; batches are shuffled so the pairing is random) and g is an
  element-wise Gaussian kernel exp(-z^2 / (2 sigma^2)), sigma^2 the median of z^2 unless set. MI is
  clamped to ``mi_max`` (the authors' code clamps to 2.5) since it diverges when |eta| -> 1.
  Delta(N, K) = log(N / c) / (2K) (Eq. 8's reading of log(N/c)^(1/2K)), N the batch size, c = 0.05,
  K the mean adaptive neighbourhood size of the AKNN rule (Balsubramani et al. 2019) in the critic's
  latent space with strong/weak as labels: the smallest k at which one group's share of the k
  nearest neighbours exceeds 1/2 by ``aknn_confidence / sqrt(k)``. As the critic separates the
  groups K shrinks and Delta grows, as the paper describes. The margin is a number (no gradient).
- Table 4 ablation: ``margin="constant"`` replaces Delta by kappa = 0.2, ``margin="linear"`` by
  kappa' = 0.1 + epoch * 5e-3 (epoch = completed passes over the data); MI is kept in both.
- L_RMSE is the mean of the valence and arousal RMSEs (the authors' code sums them).
- Lemma 1's regulariser (the f^2 term of Eq. 3) is omitted, as in Eq. 6-7.
- A batch where one group is empty (all weak or all strong) skips steps 2-3 and is counted.
- Lines 7 and 8 share one Adam optimiser for the encoder (as the authors' code does). Adam's step
  size does not depend on the gradient's scale, and its momentum carries the L_AV direction into the
  L_adv step, so ``adv_weight`` changes little unless it is 0 (which still takes the extra momentum
  step: the control for "CAF helps only because the encoder is stepped twice").

Training runs on the shared engine (tasks.engine.fit: schedule, seeding, AMP, divergence guard,
last.pt resume, checkpoint); this module holds the paper's math, :class:`CAF` (Algorithm 1 as the
engine's method, three optimiser steps per iteration) and :func:`train_caf`.

The per-epoch history records the grouping (delta_r, weak_frac), the margin parts (mi, eta, k, delta,
margin) and two critic diagnostics: d2_sw, the mean squared strong-weak distance in the critic's
space, and hinge_active, the share of strong-weak pairs inside the margin. With hinge_active = 1
the critic's gradient is independent of the margin value, so the Table 4 margin variants coincide.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from tasks.engine.checkpoint import weights_digest
from tasks.device import resolve_device
from tasks.engine import Method, Recipe, StepContext, build_optimizer, fit
from tasks.engine.seeding import FLIP, ORDER
from tasks.caf.va_metrics import VA_METRICS, va_loss, va_metrics

log = logging.getLogger("fermine.caf")

TASK = "valence_arousal"
OUTPUTS = ("valence", "arousal")
MARGINS = ("adaptive", "constant", "linear")

# The synthetic comparison (the caf pipeline on the synthetic data: ``fermine caf OUT --compare``, bench/fidelity.py):
# storage.synthetic.SyntheticConfig options (generated at the input size) and the CAFConfig fields shared by
# the critic-free baseline and CAF (they differ only in ``critic``). The generator's default faces with 500
# training faces per class (fresh faces teach more per CPU second than repeated epochs) and 100 test faces
# per class. The paper's Adam at 1e-4 for 50k iterations, decayed x0.8 every 10k, does not fit a CPU
# budget: 80 updates at 1e-4 (the former defaults) left the baseline at CCC 0.09 / 0.24. Here 8 epochs
# (432 updates of 64 faces) at 2e-3, decayed x0.6 every ~1.6 epochs (the paper's five steps over training):
# about 1 CPU minute for the baseline at 32 px. The baseline reaches CCC ~0.74 / 0.73 (valence / arousal);
# a 3x longer run (24 epochs, lr_step 261) reaches 0.78 / 0.79, so it is not fully converged.
SYNTHETIC_DATA: dict[str, Any] = {"train_per_class": 500, "test_per_class": 100, "pool_size": 0}
SYNTHETIC_RECIPE: dict[str, Any] = {"input_size": 32, "batch_size": 64, "epochs": 8, "lr": 2e-3, "lr_step": 87,
                                    "lr_gamma": 0.6}

__all__ = [
    "SYNTHETIC_DATA",
    "SYNTHETIC_RECIPE",
    "synthetic_table",
    "CAF",
    "CAFConfig",
    "CAFResult",
    "Critic",
    "OtsuThresholds",
    "TASK",
    "adaptive_k",
    "adversarial_loss",
    "confidence_delta",
    "critic_loss",
    "evaluate_va",
    "load_va_set",
    "margin_for",
    "mutual_information",
    "otsu_thresholds",
    "predict_va",
    "save_va_scatter",
    "train_caf",
    "weak_strong_split",
]


# ---------------------------------------------------------------- config


@dataclass(frozen=True)
class CAFConfig(Recipe):
    """Settings of one CAF (or baseline) training run. Defaults follow the paper where it gives one.

    The shared fields (network, input, length, optimiser, schedule, seed, device, AMP) are
    tasks.engine.Recipe's; CAF's defaults: Adam at 1e-4 for encoder, head and critic, no weight decay,
    lr x0.8 every 10k iterations (``lr_unit="iteration"``: ``lr_step`` counts parameter updates).
    """

    arch: str = "small_cnn"  # encoder backbone (tasks.models registry); paper: ResNet-18, AlexNet
    input_size: int = 64  # faces are resized to input_size x input_size
    batch_size: int = 128  # paper: 128 (ResNet-18), 256 (AlexNet)
    epochs: int = 10  # passes over the training rows; ignored when ``iterations`` is set
    iterations: int | None = None  # total parameter updates (paper: 50k on AffectNet/AFEW-VA)
    optimizer: str = "adam"  # for encoder, head and critic (paper)
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_schedule: str = "step"
    lr_unit: str = "iteration"  # lr_step counts iterations (paper: decay every 10k)
    lr_step: int = 10_000  # iterations between learning-rate decays
    lr_gamma: float = 0.8  # decay factor (paper: x0.8)
    critic: bool = True  # False: the baseline regressor without critic (Table 4, "-" rows)
    margin: str = "adaptive"  # "adaptive" (MI + Delta), "constant" (MI + kappa), "linear" (MI + kappa')
    kappa: float = 0.2  # the constant margin term of Table 4
    linear_base: float = 0.1  # kappa' = linear_base + epoch * linear_slope (Table 4)
    linear_slope: float = 5e-3
    c: float = 0.05  # confidence parameter of Delta(N, K)
    aknn_confidence: float = 0.7  # AKNN bias threshold A / sqrt(k) (the authors' code uses 0.7)
    kernel_sigma: float | None = None  # Gaussian kernel width for MI; None: median heuristic per batch
    mi_max: float = 2.5  # clamp of the MI term (it diverges as |eta| -> 1)
    critic_hidden: int = 64
    critic_dim: int = 16  # dimension d of the critic's latent z
    adv_weight: float = 1.0  # scale of L_adv (the paper uses 1; the authors' code 0.1)
    av_eps: float = 0.5  # epsilon of L_AV = RMSE + eps (L_PCC + L_CCC)
    hflip: bool = True  # random horizontal flip (valence and arousal do not change under a mirror)
    train_splits: tuple[str, ...] = ("train",)
    val_splits: tuple[str, ...] = ("test",)  # splits of the validation table evaluated after each epoch

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.margin not in MARGINS:
            raise ValueError(f"margin must be one of {', '.join(MARGINS)}, got {self.margin!r}")
        if self.batch_size < 4:
            raise ValueError(f"batch_size must be >= 4 (PCC/CCC and the Otsu split need a batch), got {self.batch_size}")
        if self.iterations is not None and self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.c <= 0:
            raise ValueError("c must be > 0")
        if not self.train_splits:
            raise ValueError("train_splits must name at least one split")


# ---------------------------------------------------------------- Algorithm 1, line 3: grouping


class OtsuThresholds(NamedTuple):
    delta_a: float
    delta_v: float
    delta_r: float


def otsu_thresholds(valence: np.ndarray | torch.Tensor, arousal: np.ndarray | torch.Tensor) -> OtsuThresholds:
    """Otsu thresholds of the batch's |arousal| and |valence|, and delta_r = sqrt(delta_a^2 + delta_v^2)."""
    from skimage.filters import threshold_otsu

    v = np.abs(np.asarray(torch.as_tensor(valence).detach().cpu(), dtype=np.float64)).ravel()
    a = np.abs(np.asarray(torch.as_tensor(arousal).detach().cpu(), dtype=np.float64)).ravel()
    if v.size == 0 or v.size != a.size:
        raise ValueError(f"need as many valence as arousal values (>= 1), got {v.size} and {a.size}")
    # threshold_otsu returns the value itself for a constant input (one grey level), no error.
    da, dv = float(threshold_otsu(a)), float(threshold_otsu(v))
    return OtsuThresholds(da, dv, math.hypot(da, dv))


def weak_strong_split(
    valence: torch.Tensor, arousal: torch.Tensor, delta_r: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, OtsuThresholds | None]:
    """Indices of weak (Q: radius < delta_r) and strong (P: radius >= delta_r) samples.

    ``delta_r`` defaults to the batch's Otsu decision threshold. The paper writes P's radius as < 1;
    radii up to sqrt(2) exist (|v| = |a| = 1) and count as strong here rather than being dropped.
    """
    th = None
    if delta_r is None:
        th = otsu_thresholds(valence, arousal)
        delta_r = th.delta_r
    r = torch.sqrt(valence.float() ** 2 + arousal.float() ** 2)
    weak = torch.nonzero(r < delta_r).flatten()
    strong = torch.nonzero(r >= delta_r).flatten()
    return weak, strong, th


# ---------------------------------------------------------------- the critic and its loss


class Critic(nn.Module):
    """f_c: encoder features -> d-dimensional latent z (an MLP, as in the authors' code)."""

    def __init__(self, in_dim: int, hidden: int = 64, out_dim: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden // 2), nn.ReLU(inplace=True),
            nn.Linear(hidden // 2, out_dim),
        )

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f)


def critic_loss(z_strong: torch.Tensor, z_weak: torch.Tensor, margin: float | torch.Tensor) -> torch.Tensor:
    """L_c of Eq. 7: E_{P x P} D^2 + 1/2 E_{P x Q} max(0, alpha - D^2).

    The first term pulls strong samples together (intra-group compactness), the second pushes
    strong and weak samples at least ``margin`` (in squared distance) apart. Pairs (i, i) are not
    pairs; with fewer than two strong samples the first term is 0.
    """
    ns = z_strong.shape[0]
    if ns >= 2:
        d_ss = torch.cdist(z_strong, z_strong).pow(2)
        off = ~torch.eye(ns, dtype=torch.bool, device=z_strong.device)
        intra = d_ss[off].mean()
    else:
        intra = z_strong.sum() * 0.0
    d_sw = torch.cdist(z_strong, z_weak).pow(2)
    inter = torch.relu(margin - d_sw).mean()
    return intra + 0.5 * inter


def adversarial_loss(z_weak: torch.Tensor) -> torch.Tensor:
    """L_adv = -(1/N_w) sum f_c(f_e(x_w)) (Algorithm 1, line 7), averaged over the d outputs too."""
    return -z_weak.mean()


# ---------------------------------------------------------------- adaptive margin (Eq. 5, 8)


def mutual_information(z_strong: torch.Tensor, z_weak: torch.Tensor, sigma: float | None = None,
                       mi_max: float = 2.5) -> tuple[float, float]:
    """MI(g(Z_s), g(Z_w)) = -1/2 log(1 - eta^2) under the Gaussian assumption; returns (mi, eta).

    Rows i of the two groups are paired (first min(N_s, N_w)); g is the element-wise Gaussian
    kernel exp(-z^2 / 2 sigma^2). Fewer than 2 pairs, or a constant kernel output: eta = 0, MI = 0.
    """
    m = min(z_strong.shape[0], z_weak.shape[0])
    if m < 2:
        return 0.0, 0.0
    zs = z_strong[:m].detach().double()
    zw = z_weak[:m].detach().double()
    if sigma is None:
        s2 = float(torch.cat([zs, zw]).pow(2).median())
        s2 = s2 if s2 > 1e-12 else 1.0
    else:
        s2 = float(sigma) ** 2
    gs = torch.exp(-zs.pow(2) / (2 * s2)).flatten()
    gw = torch.exp(-zw.pow(2) / (2 * s2)).flatten()
    gs, gw = gs - gs.mean(), gw - gw.mean()
    den = float(torch.sqrt((gs * gs).sum() * (gw * gw).sum()))
    if den <= 1e-12:
        return 0.0, 0.0
    eta = float((gs * gw).sum()) / den
    eta2 = min(eta * eta, 1.0 - 1e-12)
    return min(-0.5 * math.log(1.0 - eta2), mi_max), eta


def adaptive_k(z: torch.Tensor | np.ndarray, labels: np.ndarray, confidence: float = 0.7) -> np.ndarray:
    """Per-point AKNN neighbourhood size (Balsubramani et al. 2019) for two groups.

    For each point, the smallest k such that one group holds more than 1/2 + confidence / sqrt(k)
    of its k nearest neighbours (itself excluded); N - 1 + 1 = N when no k qualifies.
    """
    z = torch.as_tensor(z).detach().double().cpu()
    labels = np.asarray(labels).astype(bool)
    n = z.shape[0]
    if n < 2:
        return np.ones(n, dtype=np.int64)
    dist = torch.cdist(z, z).numpy()
    np.fill_diagonal(dist, np.inf)
    order = np.argsort(dist, axis=1, kind="stable")[:, : n - 1]  # neighbours, nearest first, self last -> cut
    nb = labels[order]  # (n, n-1) group of each neighbour
    k = np.arange(1, n)
    frac = np.cumsum(nb, axis=1) / k
    bias = np.maximum(frac, 1.0 - frac) - 0.5
    ok = bias > confidence / np.sqrt(k)
    return np.where(ok.any(axis=1), ok.argmax(axis=1) + 1, n).astype(np.int64)


def confidence_delta(n: int, k: float, c: float = 0.05) -> float:
    """Delta(N, K) = log((N / c)^(1 / 2K)) = log(N / c) / (2K) (Eq. 8)."""
    return math.log(n / c) / (2.0 * max(float(k), 1.0))


def margin_for(cfg: CAFConfig, z_strong: torch.Tensor, z_weak: torch.Tensor, epoch: int) -> dict[str, float]:
    """The critic's margin alpha for this batch and its parts: {"margin", "mi", "eta", "delta", "k"}."""
    mi, eta = mutual_information(z_strong, z_weak, cfg.kernel_sigma, cfg.mi_max)
    out = {"mi": mi, "eta": eta, "k": float("nan")}
    if cfg.margin == "adaptive":
        z = torch.cat([z_strong, z_weak]).detach()
        labels = np.r_[np.ones(len(z_strong), bool), np.zeros(len(z_weak), bool)]
        k = float(adaptive_k(z, labels, cfg.aknn_confidence).mean())
        out["k"] = k
        out["delta"] = confidence_delta(len(z), k, cfg.c)
    elif cfg.margin == "constant":
        out["delta"] = cfg.kappa
    else:
        out["delta"] = cfg.linear_base + epoch * cfg.linear_slope
    out["margin"] = mi + out["delta"]
    return out


# ---------------------------------------------------------------- data


@dataclass
class VASet:
    """Faces with finite valence/arousal in [-1, 1], and why other rows were left out."""

    ids: list[str]
    images: torch.Tensor  # N x 3 x H x W uint8
    targets: torch.Tensor  # N x 2 float32 (valence, arousal)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows

    def __len__(self) -> int:
        return len(self.ids)


def _select_va(imgs, skipped: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    v, a = imgs.valence, imgs.arousal
    finite = torch.isfinite(v) & torch.isfinite(a)
    # AffectNet codes "no face / uncertain" as -2: anything outside [-1, 1] is not a usable label.
    in_range = finite & (v.abs() <= 1.0 + 1e-6) & (a.abs() <= 1.0 + 1e-6)
    skipped["no valence/arousal"] = skipped.get("no valence/arousal", 0) + int((~finite).sum())
    skipped["outside [-1, 1]"] = skipped.get("outside [-1, 1]", 0) + int((finite & ~in_range).sum())
    idx = torch.nonzero(in_range).flatten()
    return idx, torch.stack([v[idx], a[idx]], dim=1).clamp(-1.0, 1.0)


def _no_va_error(uri: str, splits: Sequence[str] | None, skipped: dict[str, int]) -> ValueError:
    n = sum(skipped.values())
    where = f" in split(s) {list(splits)}" if splits else ""
    why = ", ".join(f"{v} {k}" for k, v in skipped.items() if v)
    return ValueError(
        f"{uri} has no rows with valence/arousal{where} ({n} rows: {why}). Valence/arousal regression "
        "needs continuous valence and arousal labels in [-1, 1], e.g. from the AffectNet reader or the "
        "synthetic generator (`fermine ingest synthetic ...`)."
    )


def load_va_set(uri: str, size: int, splits: Sequence[str] | None = None) -> VASet:
    """Load the rows of ``uri`` (in ``splits``) that have valence and arousal; count the others."""
    import pyarrow.compute  # noqa: F401  tasks.data uses pa.compute, which `import pyarrow` alone does not load

    from tasks.data import load_image_set

    imgs = load_image_set(uri, size, splits=splits)
    skipped: dict[str, int] = {}
    idx, targets = _select_va(imgs, skipped)
    if len(idx) == 0:
        raise _no_va_error(uri, splits, skipped)
    if any(skipped.values()):
        log.warning("%s: skipped %d rows (%s)", uri, sum(skipped.values()),
                    ", ".join(f"{v} {k}" for k, v in skipped.items() if v))
    return VASet([imgs.ids[i] for i in idx.tolist()], imgs.images[idx], targets, skipped)


def _iter_va_batches(uri: str, size: int, splits: Sequence[str] | None, batch_size: int,
                     skipped: dict[str, int]) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Stream (uint8 images, targets, ids) of rows with valence/arousal; evaluation never loads a whole table."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from storage.artifact import Artifact
    from tasks.data import batch_to_imageset

    art = Artifact(uri)
    names = art.schema.names
    for col in ("valence", "arousal"):
        if col not in names:
            raise ValueError(f"{uri} has no {col} column: it is not an image table with valence/arousal")
    cols = [c for c in ("id", "image", "split", "valence", "arousal") if c in names]
    for batch in art.iter_batches(columns=cols, batch_size=batch_size):
        if splits is not None:
            batch = batch.filter(pc.is_in(batch.column("split"), value_set=pa.array(list(splits))))
        if not batch.num_rows:
            continue
        imgs = batch_to_imageset(batch, size)
        idx, targets = _select_va(imgs, skipped)
        if len(idx):
            yield imgs.images[idx], targets, [imgs.ids[i] for i in idx.tolist()]


# ---------------------------------------------------------------- models and prediction


def predict_va(model: nn.Module, images_uint8: torch.Tensor, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None) -> torch.Tensor:
    """(N, 2) predictions in [-1, 1] (valence, arousal) for uint8 NCHW images; model in eval mode."""
    from tasks.data import MEAN, STD, normalize

    dev = next(model.parameters()).device
    x = normalize(images_uint8.to(dev), mean or MEAN, std or STD)
    with torch.no_grad():
        return torch.tanh(model(x))


def _predict_all(model: nn.Module, batches, mean, std) -> tuple[np.ndarray, np.ndarray, list[str]]:
    preds, trues, ids = [], [], []
    for images, targets, bids in batches:
        preds.append(predict_va(model, images, mean, std).float().cpu().numpy())
        trues.append(targets.numpy())
        ids.extend(bids)
    if not preds:
        return np.zeros((0, 2)), np.zeros((0, 2)), []
    return np.concatenate(trues), np.concatenate(preds), ids


def _chunks(s: VASet, batch_size: int):
    for i in range(0, len(s), batch_size):
        yield s.images[i:i + batch_size], s.targets[i:i + batch_size], s.ids[i:i + batch_size]


def save_va_scatter(true: np.ndarray, pred: np.ndarray, path: str, title: str = "") -> str:
    """Predicted vs true scatter, one panel for valence and one for arousal (PNG at ``path``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # headless
    import matplotlib.pyplot as plt

    from tasks.engine.checkpoint import atomic_write_bytes

    true, pred = np.asarray(true), np.asarray(pred)
    m = va_metrics(true, pred) if len(true) else {k: float("nan") for k in VA_METRICS}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8))
    alpha = float(np.clip(2000.0 / max(len(true), 1), 0.05, 0.8))  # dense sets stay readable
    for j, (ax, name, key) in enumerate(zip(axes, OUTPUTS, ("v", "a"))):
        ax.scatter(true[:, j], pred[:, j], s=6, alpha=alpha, color="tab:blue" if j == 0 else "tab:red")
        ax.plot([-1, 1], [-1, 1], "k--", lw=0.8)
        ax.axhline(0, color="0.8", lw=0.6)
        ax.axvline(0, color="0.8", lw=0.6)
        ax.set_xlim(-1.05, 1.05)
        ax.set_ylim(-1.05, 1.05)
        ax.set_aspect("equal")
        ax.set_xlabel(f"true {name}")
        ax.set_ylabel(f"predicted {name}")
        ax.set_title(f"{name}: RMSE {m['rmse_' + key]:.3f}  CCC {m['ccc_' + key]:.3f}", fontsize=9)
    fig.suptitle(f"{title} (n = {len(true)})".strip(), fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


# ---------------------------------------------------------------- training


@dataclass
class CAFResult:
    checkpoint_uri: str
    metrics: dict[str, Any]  # evaluation metrics on the validation table, n, skipped (empty without one)
    history: list[dict[str, Any]]  # one entry per epoch: mean losses, margin parts, lr, validation metrics
    skipped: dict[str, int]  # training rows left out, by reason
    n_train: int
    scatter_png: str | None = None
    seconds: float = 0.0


def _join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


def _evaluate_model(model: nn.Module, vset: VASet, batch_size: int) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    model.eval()
    true, pred, _ = _predict_all(model, _chunks(vset, batch_size), None, None)
    return va_metrics(true, pred), true, pred


VAL_BATCH = 256  # images per forward pass of the per-epoch validation


class CAF(Method):
    """Algorithm 1 as an engine method: encoder f_e + head f_r (one 2-output FERNet) and the critic f_c.

    Each step is one iteration on a normalised batch (x, y): the critic step on L_c (line 6), the encoder
    step on L_adv with the critic frozen (line 7), and the encoder + head step on L_AV (line 8), each its
    own ``ctx.backward_step``. With ``cfg.critic`` False only line 8 runs (the critic-free baseline; the
    critic is still built, so both variants draw the same initial encoder). ``data`` (the training faces)
    is needed for :meth:`steps_per_epoch` and :meth:`batches` only.
    """

    automatic_optimization = False

    def __init__(self, cfg: CAFConfig, data: VASet | None = None, val_uri: str | None = None):
        self.cfg, self.data, self.val_uri = cfg, data, val_uri
        self.name = "caf" if cfg.critic else "va_baseline"
        self.vset: VASet | None = None
        self.val_pred: tuple[np.ndarray, np.ndarray] | None = None  # (true, pred) of the final validation
        self._skipped = 0  # batches of this epoch without both weak and strong samples

    # -- engine hooks
    def setup(self, ctx: StepContext) -> None:
        from tasks.models import build_model

        cfg = self.cfg
        # The FERNet's 2-output head is f_r; its body is f_e. Saving the FERNet keeps the checkpoint
        # loadable by tasks.engine.checkpoint.load_checkpoint and usable without the critic.
        self.model = ctx.prepare(build_model(cfg.arch, num_classes=2, pretrained=cfg.pretrained))
        self.critic = Critic(self.model.feature_dim, cfg.critic_hidden, cfg.critic_dim).to(ctx.device)

        def opt(params):
            return build_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay, cfg.momentum)

        self.enc_opt = opt(self.model.body.parameters())
        self.reg_opt = opt(self.model.head.parameters())
        self.critic_opt = opt(self.critic.parameters())
        self.optimizers = [self.enc_opt, self.reg_opt, self.critic_opt]
        if self.val_uri is not None:
            self.vset = load_va_set(self.val_uri, cfg.input_size, cfg.val_splits)

    def _batch_size(self) -> int:
        return min(self.cfg.batch_size, len(self.data))

    def steps_per_epoch(self) -> int:
        return len(self.data) // self._batch_size()  # incomplete last batch dropped: Otsu and PCC want full batches

    def batches(self, epoch: int, ctx: StepContext) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        from tasks.data import MEAN, STD, normalize

        data, bs = self.data, self._batch_size()
        perm = torch.randperm(len(data), generator=ctx.generator(ORDER))
        flips = ctx.generator(FLIP)
        for b in range(self.steps_per_epoch()):
            idx = perm[b * bs:(b + 1) * bs]
            images = data.images[idx]
            if self.cfg.hflip:
                flip = torch.rand(len(idx), generator=flips) < 0.5
                images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            x = ctx.prepare_input(normalize(images.to(ctx.device), MEAN, STD))
            yield x, data.targets[idx].to(ctx.device)

    def on_epoch_start(self, epoch: int, ctx: StepContext) -> None:
        self._skipped = 0

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], ctx: StepContext) -> dict[str, Any]:
        """One iteration of Algorithm 1 on normalised images x and targets y (N x 2: valence, arousal)."""
        x, y = batch
        cfg = self.cfg
        self.model.train()
        self.critic.train()
        row: dict[str, Any] = {}
        if cfg.critic:
            weak, strong, th = weak_strong_split(y[:, 0].cpu(), y[:, 1].cpu())
            row.update(delta_r=th.delta_r, weak_frac=len(weak) / len(y))
            if len(weak) and len(strong):
                weak, strong = weak.to(ctx.device), strong.to(ctx.device)
                # line 5: Z = f_c(f_e(X)); the encoder graph is reused by line 7 (the critic's update in
                # line 6 does not touch the encoder, so the graph stays valid).
                feats = self.model.features(x)
                z = self.critic(feats.detach()).float()
                zs, zw = z[strong], z[weak]
                marg = margin_for(cfg, zs, zw, ctx.epoch)
                with torch.no_grad():
                    # Diagnostics: when every strong-weak pair is inside the margin (hinge_active = 1) the
                    # critic's gradient does not depend on the margin's value at all.
                    d2 = torch.cdist(zs, zw).pow(2)
                    row.update(d2_sw=float(d2.mean()), hinge_active=float((d2 < marg["margin"]).float().mean()))
                # line 6: critic step on L_c
                loss_c = critic_loss(zs, zw, marg["margin"])
                ctx.backward_step(loss_c, [self.critic_opt])
                # line 7: encoder step on L_adv with the critic frozen
                for p in self.critic.parameters():
                    p.requires_grad_(False)
                try:
                    loss_adv = cfg.adv_weight * adversarial_loss(self.critic(feats[weak]).float())
                    ctx.backward_step(loss_adv, [self.enc_opt])
                finally:
                    for p in self.critic.parameters():
                        p.requires_grad_(True)
                row.update(loss_c=loss_c.detach(), loss_adv=loss_adv.detach(),
                           **{k: v for k, v in marg.items() if not math.isnan(v)})  # k: nan unless adaptive
            else:
                row["critic_skipped"] = 1.0
        # line 8: encoder + head on L_AV (fresh forward: the encoder has just changed)
        pred = torch.tanh(self.model(x).float())
        loss_av = va_loss(pred, y, cfg.av_eps)
        ctx.backward_step(loss_av, [self.enc_opt, self.reg_opt])
        self._skipped += int("critic_skipped" in row)
        loss_av = loss_av.detach()
        return {"loss": loss_av, "loss_av": loss_av, **row, "samples": len(y)}

    def on_epoch_end(self, epoch: int, ctx: StepContext) -> dict[str, Any]:
        # The engine averages each diagnostic over the steps that report it; the skipped batches are a count.
        return {"critic_skipped": float(self._skipped)}

    def validate(self, ctx: StepContext) -> dict[str, Any] | None:
        if self.vset is None:
            return None
        m, _, _ = _evaluate_model(self.model, self.vset, VAL_BATCH)
        return {f"val_{k}": v for k, v in m.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "critic": self.critic.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.critic.load_state_dict(state["critic"])

    def final_metrics(self, history: list[dict[str, Any]], ctx: StepContext) -> dict[str, Any]:
        """The validation metrics of the final weights (VA_METRICS, n, skipped; none without a validation
        table), and the run's iterations and training rows."""
        out: dict[str, Any] = {"iterations": ctx.global_step}
        if self.data is not None:
            out.update(n_train=len(self.data), train_skipped=self.data.skipped)
        if self.vset is not None:
            m, true, pred = _evaluate_model(self.model, self.vset, VAL_BATCH)
            self.val_pred = (true, pred)
            out.update({**m, "n": len(self.vset), "skipped": self.vset.skipped})
        return out

    def export(self, ctx: StepContext) -> tuple[nn.Module, dict[str, Any]]:
        from tasks.data import MEAN, STD

        meta: dict[str, Any] = {"task": TASK, "classes": list(OUTPUTS), "outputs": list(OUTPUTS),
                                "output_activation": "tanh", "input_size": self.cfg.input_size,
                                "mean": list(MEAN), "std": list(STD), "val_uri": self.val_uri}
        if self.data is not None:
            meta.update(n_train=len(self.data), skipped=self.data.skipped)
        return self.model, meta


def train_caf(
    cfg: CAFConfig,
    train_uri: str,
    out_uri: str,
    val_uri: str | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> CAFResult:
    """Train CAF (or the baseline when ``cfg.critic`` is False) and write a checkpoint folder.

    ``out_uri`` receives the engine's layout (tasks.engine.loop): model.pt + model.json (task
    "valence_arousal", a 2-output FERNet whose outputs go through tanh), metrics.json, last.pt (the
    resumable state, written after every epoch) and, with ``val_uri``, scatter.png of the validation
    predictions (``cfg.val_splits`` of ``val_uri``, also evaluated after every epoch). A rerun with the
    same ``out_uri``, config and tables continues from last.pt (a finished run is returned as it is); another
    config or table is refused (tasks.engine.ResumeMismatch, naming what differs). ``progress`` is called
    after every iteration with a dict (iteration, total, epoch, epochs, and the epoch's running mean losses).
    """
    from storage.artifact import Artifact

    t0 = time.time()
    data = load_va_set(train_uri, cfg.input_size, cfg.train_splits)
    if len(data) < 4:
        raise ValueError(f"{train_uri} has only {len(data)} rows with valence/arousal in {list(cfg.train_splits)}; "
                         "CAF needs at least 4 (a batch must have weak and strong samples)")
    inputs = {"train": Artifact(train_uri).digest}
    if val_uri is not None:
        inputs["val"] = Artifact(val_uri).digest
    if cfg.pretrained:
        inputs["pretrained"] = weights_digest(cfg.pretrained)
    method = CAF(cfg, data, val_uri)
    per_epoch = method.steps_per_epoch()
    # ``iterations`` is the engine's max_steps; the epochs it spans (the last one maybe cut short) are the
    # epochs fit runs.
    total = cfg.iterations if cfg.iterations is not None else cfg.epochs * per_epoch
    n_epochs = math.ceil(total / per_epoch)

    def events(d: dict[str, Any]) -> None:
        if d.pop("event") == "step":
            progress({**d, "iteration": d["global_step"], "total": total})

    res = fit(method, out_uri, config=cfg.to_dict(), inputs=inputs, max_steps=cfg.iterations, log_every=1,
              progress=events if progress is not None else None, **{**cfg.fit_options(), "epochs": n_epochs})
    scatter: str | None = _join(out_uri, "scatter.png") if val_uri else None
    if method.val_pred is not None and not res.reused:
        scatter = save_va_scatter(*method.val_pred, scatter,
                                  f"{'CAF' if cfg.critic else 'baseline'} ({cfg.arch}) on {val_uri}")
    metrics = {k: v for k, v in res.metrics.items() if k in VA_METRICS or k in ("n", "skipped")}
    return CAFResult(out_uri, metrics, res.history, data.skipped, len(data), scatter, time.time() - t0)


# ---------------------------------------------------------------- evaluation


def evaluate_va(
    checkpoint_uri: str,
    table_uri: str,
    splits: Sequence[str] | None = ("test",),
    batch_size: int = 256,
    device: str = "auto",
    scatter_png: str | None = None,
) -> dict[str, Any]:
    """RMSE, SAGR, PCC, CCC of valence and arousal (keys rmse_v ... ccc_a), plus n and skipped rows.

    ``splits=None`` uses every row. Rows without valence/arousal are counted in ``skipped``; a table
    without any raises ValueError. ``scatter_png`` also saves the predicted-vs-true scatter plot.
    """
    from tasks.engine.checkpoint import load_checkpoint, read_meta

    meta = read_meta(checkpoint_uri)
    if meta.get("task") != TASK:
        raise ValueError(
            f"{checkpoint_uri} is a {meta.get('task') or 'classification'} checkpoint, not a valence/arousal "
            "regressor; train one with `fermine caf`"
        )
    model, meta = load_checkpoint(checkpoint_uri, device=resolve_device(device))
    size = int(meta["input_size"])
    skipped: dict[str, int] = {}
    true, pred, _ = _predict_all(
        model, _iter_va_batches(table_uri, size, splits, batch_size, skipped), meta.get("mean"), meta.get("std"))
    if len(true) == 0:
        raise _no_va_error(table_uri, splits, skipped)
    out: dict[str, Any] = {**va_metrics(true, pred), "n": int(len(true)), "skipped": skipped}
    if scatter_png:
        save_va_scatter(true, pred, scatter_png, f"{checkpoint_uri} on {table_uri}")
        out["scatter_png"] = scatter_png
    return out


def synthetic_table(out_uri: str, size: int, options: dict[str, Any] | None = None) -> str:
    """The synthetic valence/arousal table (SYNTHETIC_DATA over ``options``, generated at ``size``) under
    ``<out>/data/synthetic-<digest of the generator config>``, generated once and then reused (the layout
    of flows.pt.synthetic_table). ValueError for unknown or mistyped options."""

    from storage.artifact import is_finished
    from storage.ingest import write_image_table
    from storage.synthetic import config_from_options, generate

    cfg = config_from_options(**{"size": size, **SYNTHETIC_DATA, **(options or {})})
    config = dataclasses.asdict(cfg)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    uri = _join(_join(out_uri, "data"), f"synthetic-{digest[:12]}")
    if not is_finished(uri):
        write_image_table(generate(cfg), uri, stage="ingest", config={"format": "synthetic", **config})
    return uri
