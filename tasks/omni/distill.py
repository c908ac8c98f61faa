"""Dataset distillation (Wang et al. 2018; Omni-supervised FER Eq. 8): the distilled auxiliary samples (DAS).

Learn a handful of synthetic images x~ (``images_per_class`` per class, 1 in the paper) and the step
size(s) eta~ such that a network that takes a few gradient steps on x~ from a *random* initialisation
does well on the real data:

    theta_{s+1} = theta_s - eta~_s grad_theta CE(f(x~; theta_s), y~)        s = 0 .. inner_steps-1
    min_{x~, eta~}  E_{theta_0 ~ p(theta_0)}  CE(f(x_real; theta_S), y_real)                    (Eq. 8)

Each outer step draws ``n_inits`` fresh initialisations (the random-init variant of Wang et al., whose
images then work for nets the distiller never saw) and a fresh batch of real images, unrolls the inner
SGD steps functionally (torch.func.functional_call, create_graph=True) and back-propagates the real
loss through them into the images and the step sizes (Adam). The step size is learned through a
softplus so it stays positive, one per inner step as in Wang et al.

The images are kept inside the valid pixel range after every update (projected), so the PNGs written
at the end are the images that were learned, not a clipped version of them.

BatchNorm: networks trained for a few steps from random weights have no meaningful running statistics,
so BatchNorm layers are switched to batch statistics everywhere (torch.func.replace_all_batch_norm_modules_),
in distillation and in the evaluation helpers below.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, replace_all_batch_norm_modules_

from storage.artifact import Artifact, ArtifactWriter, Manifest, identity, join
from storage.images import encode
from storage.schema import CLASSES, IMAGE_SCHEMA, image_row

STAGE = "distill"
CODE_VERSION = "distill-1"
GRID_FILE = "distilled.png"


@dataclass(frozen=True)
class DistillConfig:
    images_per_class: int = 1  # distilled images per class (the paper: 1, i.e. 7 images)
    inner_steps: int = 5  # SGD steps on the distilled images per training run, one learned step size each
    #                       (Eq. 8 is the 1-step case; from random inits a few steps learn far better)
    outer_steps: int = 400  # updates of images and step sizes (ignored when ``epochs`` is set)
    epochs: float | None = None  # alternatively: passes over the real images loaded (real rows / real_batch steps each)
    real_batch: int = 256  # real images per outer step (the L(x, theta_1) of Eq. 8)
    n_inits: int = 4  # fresh random initialisations per outer step (gradients averaged)
    image_lr: float = 0.03  # Adam step for the images (in normalised pixel units, range [-1, 1])
    lr_lr: float = 0.03  # Adam step for the softplus-parameterised step sizes
    init_step_size: float = 0.05  # eta~ at the start
    lr_decay_every: int = 0  # halve both Adam steps every this many outer steps (0 = never)
    image_size: int = 32  # side of the distilled images (DAS are resized by the trainers like any image)
    arch: str = "convnet"  # "convnet"/"convnet_s" (instance norm, the distillation literature's net), "lenet"
    #                        (Wang et al.'s), or any tasks.models architecture such as "small_cnn"
    num_classes: int = len(CLASSES)
    max_real_per_class: int = 2000  # real images per class held in memory (class-balanced reservoir sample)
    splits: tuple[str, ...] | None = ("train",)  # rows of the input table to distill from; None = all labeled
    holdout: float = 0.1  # fraction of the loaded real images kept out to score the result (0 = no scoring)
    eval_inits: int = 5  # random initialisations for that score
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("images_per_class", "inner_steps", "outer_steps", "real_batch", "n_inits", "image_size",
                     "num_classes", "max_real_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.holdout < 0.9:
            raise ValueError(f"holdout is a fraction in [0, 0.9), got {self.holdout}")
        if self.init_step_size <= 0:
            raise ValueError("init_step_size must be > 0")
        smallest = MIN_IMAGE_SIZE.get(self.arch, 16)
        if self.image_size < smallest:
            raise ValueError(f"image_size {self.image_size} is too small for arch {self.arch}: it needs >= {smallest} px")


# Smallest input side each network's pooling can take (measured); other tasks.models archs: 16.
MIN_IMAGE_SIZE = {"lenet": 10, "convnet": 8, "convnet_s": 8}


@dataclass
class Distilled:
    images: torch.Tensor  # (K * ipc) x 3 x S x S, normalised (tasks.data.normalize space)
    labels: torch.Tensor  # (K * ipc,) int64
    step_sizes: list[float]  # learned eta~, one per inner step
    history: list[dict[str, float]] = field(default_factory=list)


# ---------------------------------------------------------------- networks


class LeNet(nn.Module):
    """Wang et al.'s LeNet (any input size: pooled to 5 x 5 before the classifier); no BatchNorm."""

    def __init__(self, num_classes: int = 7):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.adaptive_max_pool2d(F.relu(self.conv2(x)), 5)
        x = F.relu(self.fc2(F.relu(self.fc1(torch.flatten(x, 1)))))
        return self.fc3(x)


class ConvNet(nn.Module):
    """The ConvNet of the dataset-distillation literature (Zhao et al. 2021): ``depth`` x
    (conv3x3 - instance norm - ReLU - avg-pool 2) then a linear classifier. Instance norm has no batch
    dependence and no running statistics, and nets of this shape learn in a few steps from random
    weights, which is what distillation from random initialisations needs."""

    def __init__(self, num_classes: int = 7, width: int = 64, depth: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(width, width, affine=True), nn.ReLU(),
                       nn.AvgPool2d(2)]
            c = width
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)  # any input size >= 2**depth
        self.fc = nn.Linear(width * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.body(x)), 1))


# Networks only the distiller knows (no penultimate-feature API needed); anything else is tasks.models'.
DISTILL_NETS: dict[str, Callable[[int], nn.Module]] = {
    "lenet": LeNet,
    "convnet": ConvNet,
    "convnet_s": lambda k: ConvNet(k, width=32, depth=3),
}


def make_net(arch: str, num_classes: int) -> nn.Module:
    """A freshly initialised network (a draw from p(theta_0)) with BatchNorm on batch statistics."""
    if arch in DISTILL_NETS:
        net: nn.Module = DISTILL_NETS[arch](num_classes)
    else:
        from tasks.models import build_model

        net = build_model(arch, num_classes)
    replace_all_batch_norm_modules_(net)
    return net.train()


def _fresh_params(arch: str, num_classes: int, device: torch.device) -> dict[str, torch.Tensor]:
    net = make_net(arch, num_classes)
    return {k: v.detach().to(device).requires_grad_(True) for k, v in net.named_parameters()}


def unroll(
    net: nn.Module,
    params: dict[str, torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    step_sizes: Sequence[torch.Tensor | float],
    create_graph: bool,
) -> dict[str, torch.Tensor]:
    """The inner loop: one full-batch SGD step on ``images`` per step size, functionally."""
    for eta in step_sizes:
        loss = F.cross_entropy(functional_call(net, params, (images,)), labels)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        params = {k: p - eta * g for (k, p), g in zip(params.items(), grads)}
        if not create_graph:
            params = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    return params


def _pixel_bounds(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from tasks.data import MEAN, STD

    m = torch.tensor(MEAN, device=device).view(1, -1, 1, 1)
    s = torch.tensor(STD, device=device).view(1, -1, 1, 1)
    return (0 - m) / s, (1 - m) / s


def _softplus_inv(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def learn_distilled(
    real_x: torch.Tensor,
    real_y: torch.Tensor,
    cfg: DistillConfig,
    progress: Callable[[dict[str, float]], None] | None = None,
) -> Distilled:
    """Eq. 8 on in-memory real data: ``real_x`` uint8 N x 3 x S x S, ``real_y`` int64 N (0..K-1).

    Deterministic given ``cfg.seed``; the caller's global RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # the networks' initialisations
        return _learn_distilled(real_x, real_y, cfg, progress)


def _learn_distilled(
    real_x: torch.Tensor,
    real_y: torch.Tensor,
    cfg: DistillConfig,
    progress: Callable[[dict[str, float]], None] | None,
) -> Distilled:
    from tasks.device import resolve_device
    from tasks.data import normalize

    device = resolve_device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    k, ipc = cfg.num_classes, cfg.images_per_class
    present = sorted(set(real_y.tolist()))
    if len(present) < 2:
        raise ValueError(f"distillation needs labeled images of at least 2 classes, got {len(present)}")
    if real_x.shape[-1] != cfg.image_size or real_x.shape[-2] != cfg.image_size:
        raise ValueError(f"real images are {tuple(real_x.shape[-2:])} but image_size is {cfg.image_size}")
    lo, hi = _pixel_bounds(device)
    # Only classes with real images get distilled ones: an image labelled with a class nothing taught
    # it would teach every retrained model that class on noise.
    syn_x = torch.randn((len(present) * ipc, 3, cfg.image_size, cfg.image_size), generator=gen).to(device)
    syn_x = torch.max(torch.min(syn_x, hi), lo).requires_grad_(True)
    syn_y = torch.tensor(present, device=device).repeat_interleave(ipc)
    raw_eta = torch.full((cfg.inner_steps,), _softplus_inv(cfg.init_step_size), device=device, requires_grad=True)
    opt = torch.optim.Adam([{"params": [syn_x], "lr": cfg.image_lr}, {"params": [raw_eta], "lr": cfg.lr_lr}])
    sched = torch.optim.lr_scheduler.StepLR(opt, cfg.lr_decay_every, 0.5) if cfg.lr_decay_every else None
    net = make_net(cfg.arch, k).to(device)
    n = len(real_y)
    steps = cfg.outer_steps if cfg.epochs is None else max(1, int(round(cfg.epochs * math.ceil(n / cfg.real_batch))))
    history: list[dict[str, float]] = []
    perm = torch.randperm(n, generator=gen)
    pos = 0
    for step in range(steps):
        if pos + cfg.real_batch > n:  # epochs over the real images, reshuffled each pass
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + cfg.real_batch]
        pos += cfg.real_batch
        xb = normalize(real_x[idx].to(device))
        yb = real_y[idx].to(device)
        opt.zero_grad(set_to_none=True)
        total, correct = 0.0, 0.0
        for _ in range(cfg.n_inits):
            eta = F.softplus(raw_eta)  # per init: each backward frees its own graph
            params = _fresh_params(cfg.arch, k, device)
            params = unroll(net, params, syn_x, syn_y, list(eta), create_graph=True)
            out = functional_call(net, params, (xb,))
            loss = F.cross_entropy(out, yb) / cfg.n_inits
            loss.backward()
            total += float(loss.detach()) * cfg.n_inits
            correct += float((out.argmax(1) == yb).float().mean())
        opt.step()
        if sched is not None:
            sched.step()
        with torch.no_grad():  # project back into the valid pixel range
            syn_x.copy_(torch.max(torch.min(syn_x, hi), lo))
        rec = {"step": step, "loss": total / cfg.n_inits, "real_acc": correct / cfg.n_inits,
               "eta": [float(v) for v in F.softplus(raw_eta).detach().cpu()]}
        history.append(rec)
        if progress is not None:
            progress(rec)
    return Distilled(syn_x.detach().cpu(), syn_y.cpu(), [float(v) for v in F.softplus(raw_eta).detach().cpu()],
                     history)


# ---------------------------------------------------------------- scoring


@torch.no_grad()
def _accuracy(net: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    correct = 0
    for s in range(0, len(y), batch):
        out = functional_call(net, params, (x[s:s + batch],))
        correct += int((out.argmax(1) == y[s:s + batch]).sum())
    return correct / max(1, len(y))


def score_training_set(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    step_sizes: Sequence[float],
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    arch: str,
    num_classes: int,
    inits: int = 5,
    seed: int = 1000,
    device: str | torch.device = "cpu",
) -> list[float]:
    """Held-out accuracy of nets trained from ``inits`` fresh random initialisations by full-batch SGD
    on (train_x, train_y) with the given step sizes. Images are normalised floats."""
    device = torch.device(device)
    net = make_net(arch, num_classes).to(device)
    tx, ty = train_x.to(device), train_y.to(device)
    vx, vy = test_x.to(device), test_y.to(device)
    accs = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(inits):
            params = _fresh_params(arch, num_classes, device)
            params = unroll(net, params, tx, ty, list(step_sizes), create_graph=False)
            accs.append(_accuracy(net, params, vx, vy))
    return accs


def random_real_baseline(
    real_x: torch.Tensor,
    real_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    images_per_class: int,
    arch: str,
    num_classes: int,
    step_sizes_grid: Sequence[float] = (0.003, 0.01, 0.03, 0.1, 0.3),
    steps_grid: Sequence[int] = (1, 10),
    inits: int = 5,
    seed: int = 1000,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """The Wang et al. baseline: as many randomly chosen real images per class as distilled ones, trained
    from fresh random inits by full-batch SGD. Generous to the baseline: the best (step size, steps) of
    a grid, picked on the held-out set itself, with a new random choice of real images for every init."""
    from tasks.data import normalize

    g = torch.Generator().manual_seed(seed)
    best: dict[str, Any] = {"mean": -1.0}
    for eta in step_sizes_grid:
        for steps in steps_grid:
            accs = []
            for j in range(inits):
                idx = torch.cat([
                    (real_y == c).nonzero().flatten()[torch.randperm(int((real_y == c).sum()), generator=g)[:images_per_class]]
                    for c in range(num_classes) if (real_y == c).any()
                ])
                accs += score_training_set(normalize(real_x[idx]), real_y[idx], [eta] * steps, test_x, test_y,
                                           arch=arch, num_classes=num_classes, inits=1, seed=seed + j, device=device)
            m = float(np.mean(accs))
            if m > best["mean"]:
                best = {"mean": m, "accs": accs, "step_size": eta, "steps": steps}
    return best


# ---------------------------------------------------------------- the stage


def load_real(uri: str, cfg: DistillConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Labeled rows of ``uri`` at ``cfg.image_size``: a class-balanced reservoir sample of at most
    ``max_real_per_class`` per class, streamed (only sampled rows are decoded)."""
    from tasks.data import decode_resized

    art = Artifact(uri)
    cols = [c for c in ("image", "label", "split") if c in art.schema.names]
    if "label" not in cols:
        raise ValueError(f"{uri} has no label column: distillation needs labeled (or mined) images")
    rng = np.random.default_rng(cfg.seed)
    cap = cfg.max_real_per_class
    seen = np.zeros(cfg.num_classes, np.int64)
    res: list[list[np.ndarray]] = [[] for _ in range(cfg.num_classes)]
    for batch in art.iter_batches(columns=cols, batch_size=1024):
        mask = pc.is_valid(batch.column("label"))
        if cfg.splits is not None and "split" in cols:
            mask = pc.and_(mask, pc.is_in(batch.column("split"), value_set=pa.array(list(cfg.splits))))
        batch = batch.filter(mask)
        labels = batch.column("label").to_numpy(zero_copy_only=False)
        images = batch.column("image")
        for i, y in enumerate(labels):
            y = int(y)
            if not 0 <= y < cfg.num_classes:
                raise ValueError(f"{uri} has label {y}, outside 0..{cfg.num_classes - 1}")
            seen[y] += 1
            if len(res[y]) < cap:
                res[y].append(decode_resized(images[i].as_py(), cfg.image_size))
            else:
                j = rng.integers(seen[y])  # reservoir sampling: every row equally likely to be held
                if j < cap:
                    res[y][j] = decode_resized(images[i].as_py(), cfg.image_size)
    xs = [np.stack(r) for r in res if r]
    if not xs:
        raise ValueError(f"{uri} has no labeled rows" + (f" in split(s) {list(cfg.splits)}" if cfg.splits else ""))
    x = torch.from_numpy(np.concatenate(xs)).permute(0, 3, 1, 2).contiguous()
    y = torch.cat([torch.full((len(r),), c, dtype=torch.int64) for c, r in enumerate(res) if r])
    return x, y


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Normalised N x 3 x S x S -> N x S x S x 3 uint8 RGB."""
    from tasks.data import MEAN, STD

    m = torch.tensor(MEAN).view(1, -1, 1, 1)
    s = torch.tensor(STD).view(1, -1, 1, 1)
    x = (images.detach().cpu() * s + m).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@dataclass
class DistillResult:
    manifest: Manifest
    step_sizes: list[float]
    grid_uri: str
    history: list[dict[str, float]]
    holdout: dict[str, Any]


def distill(
    table_uri: str,
    out_uri: str,
    cfg: DistillConfig = DistillConfig(),
    progress: Callable[[dict[str, float]], None] | None = None,
) -> DistillResult:
    """Distil ``table_uri`` (auxiliary samples, or any labeled image table) into an image table of
    ``images_per_class`` x K images (split "train", source "distilled") plus ``distilled.png`` (the
    paper's Fig. 4). The learned step size(s) and, unless ``holdout`` is 0, the held-out accuracy of
    nets trained from random inits on the distilled images vs on random real images go to the
    manifest's ``extra``."""
    from tasks.omni.centroids import reuse_or_refuse
    from tasks.device import resolve_device
    from tasks.data import normalize
    from tasks.figures import draw_safely, image_grid

    config = asdict(cfg)
    inputs = {"table": Artifact(table_uri).digest}
    ident = identity(STAGE, {k: v for k, v in config.items() if k != "device"}, inputs, CODE_VERSION)
    grid_uri = join(out_uri, GRID_FILE)
    if (m := reuse_or_refuse(out_uri, ident)) is not None:
        return DistillResult(m, list(m.extra.get("step_sizes", [])), grid_uri, [], m.extra.get("holdout", {}))
    t0 = time.perf_counter()
    x, y = load_real(table_uri, cfg)
    test_x = test_y = None
    if cfg.holdout > 0:
        g = torch.Generator().manual_seed(cfg.seed + 1)
        hold = torch.cat([(y == c).nonzero().flatten()[torch.randperm(int((y == c).sum()), generator=g)]
                          [: int(round(cfg.holdout * int((y == c).sum())))] for c in range(cfg.num_classes)])
        mask = torch.ones(len(y), dtype=torch.bool)
        mask[hold] = False
        test_x, test_y = normalize(x[hold]), y[hold]
        x, y = x[mask], y[mask]
    d = learn_distilled(x, y, cfg, progress)
    images = to_uint8(d.images)
    holdout: dict[str, Any] = {}
    if test_x is not None and len(test_y) and cfg.eval_inits:
        dev = resolve_device(cfg.device)
        # Score the images as written (8-bit PNG), not the float tensors.
        saved = normalize(torch.from_numpy(images).permute(0, 3, 1, 2))
        acc = score_training_set(saved, d.labels, d.step_sizes, test_x, test_y, arch=cfg.arch,
                                 num_classes=cfg.num_classes, inits=cfg.eval_inits, device=dev)
        base = random_real_baseline(x, y, test_x, test_y, images_per_class=cfg.images_per_class, arch=cfg.arch,
                                    num_classes=cfg.num_classes, inits=cfg.eval_inits, device=dev,
                                    steps_grid=sorted({cfg.inner_steps, 10}))
        holdout = {"distilled_acc": float(np.mean(acc)), "distilled_accs": acc,
                   "random_real_acc": base["mean"], "random_real_step_size": base["step_size"],
                   "random_real_steps": base["steps"], "n_test": int(len(test_y))}
    names = [CLASSES[c] if c < len(CLASSES) else str(c) for c in range(cfg.num_classes)]
    rows = [image_row(f"distilled-{names[int(lab)]}-{j % cfg.images_per_class}", encode(img, ".png"),
                      label=int(lab), split="train", source="distilled")
            for j, (img, lab) in enumerate(zip(images, d.labels.tolist()))]
    draw_safely("distilled images", _write_grid, images, d.labels.tolist(), names, cfg.images_per_class, grid_uri,
                d.step_sizes, image_grid)
    with ArtifactWriter(out_uri, stage=STAGE, config=config, inputs=inputs, schema=IMAGE_SCHEMA) as w:
        w.write_rows(rows)
        m = w.commit(extra={
            "identity": ident, "step_sizes": d.step_sizes, "lr": float(np.mean(d.step_sizes)),
            "real_images": int(len(y)), "outer_steps": len(d.history),
            "final_loss": d.history[-1]["loss"] if d.history else None, "holdout": holdout,
            "absent_classes": [names[c] for c in sorted(set(range(cfg.num_classes)) - set(d.labels.tolist()))],
            "grid": GRID_FILE, "seconds": time.perf_counter() - t0,
        })
    return DistillResult(m, d.step_sizes, grid_uri, d.history, holdout)


def _write_grid(images: np.ndarray, labels: list[int], names: list[str], ipc: int, uri: str,
                step_sizes: list[float], image_grid: Callable[..., str]) -> None:
    """One column per class like the paper's Fig. 4 (rows = the images_per_class images)."""
    cols: dict[int, list[np.ndarray]] = {}
    for img, lab in zip(images, labels):
        cols.setdefault(lab, []).append(img)
    order = sorted(cols)
    rows = [[cols[c][r] for c in order] for r in range(ipc)]
    titles = [[names[c] for c in order] for _ in range(ipc)]
    eta = ", ".join(f"{v:.3g}" for v in step_sizes)
    image_grid(rows, uri, cell_titles=titles, title=f"distilled images (learned step size {eta})")
