"""PASM's point attack (Eq. 2-3): a differential-evolution search for the most sensitive position.

Each candidate encodes (x, y, r, g, b) as in Su et al.'s one-pixel attack: a position and the RGB
value written there (``probe="pixel"``, L0 = 1 as in the paper) or over the s x s patch centred
there (``probe="patch"``). Fitness is the teacher's softmax probability of the TRUE class on the
perturbed image; lower is better. The search is DE/rand/1 (Eq. 3: x_r1 + k (x_r2 - x_r3), r1, r2,
r3 distinct and different from the parent), with binomial crossover (CR = 1, the paper's pure
Eq. 3, by default) and greedy parent-vs-child selection.

Why batched: the paper needed ~10 s an image because each image ran its own search, one forward
pass per generation at best. Here all images of a batch and all their candidates are evaluated
together: per generation the (image, candidate) pairs are flattened, each chunk of pairs gathers
its base images (uint8), writes the candidate pixels with one ``index_put``, normalises and runs
ONE forward pass. The chunk size is measured once per attacker (on a 2-core CPU batches above ~40
images are slower than ~40; a GPU wants hundreds). Images that meet the early-stop threshold leave
the active set, so the work shrinks as they finish.

Random numbers come from one seeded CPU generator, so a search is reproducible for the same
images in the same order, on any device (up to the device's float arithmetic).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from storage.images import ImageDecodeError
from tasks.data import MEAN, STD, decode_resized, normalize
from tasks.pasm.erase import side_pixels
from tasks.device import resolve_device

PROBES = ("pixel", "patch")
INITS = ("lhs", "uniform", "saliency")

# Chunk sizes tried by the tuner. CPU: small batches win (cache-resident activations);
# GPU: larger batches are needed to fill the device.
CPU_CHUNKS = (8, 16, 24, 32, 40, 48, 64, 96, 128)
GPU_CHUNKS = (64, 128, 256, 512, 1024, 2048)

POSITIONS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("x", pa.int32()),  # column, in pixels of the attacked image (size x size)
        pa.field("y", pa.int32()),  # row
        pa.field("r", pa.uint8()),
        pa.field("g", pa.uint8()),
        pa.field("b", pa.uint8()),
        pa.field("fitness", pa.float32()),  # teacher's true-class probability after the perturbation
        pa.field("clean_prob", pa.float32()),  # ... and before it
        pa.field("evals", pa.int32()),  # candidate evaluations spent on this image
        pa.field("label", pa.int8()),
        pa.field("size", pa.int32()),  # side of the attacked image; positions are in its pixels
    ]
)

ATTACK_STAGE = "attack"  # the stage name in manifests and claims (workers.attack uses the same)
REJECTS = "rejects"  # the rejects artifact lives at <positions>/rejects, as in workers.sharded
REJECTS_TABLE_SCHEMA = pa.schema([("id", pa.string()), ("reason", pa.string())])


@dataclass(frozen=True)
class AttackConfig:
    """Point-attack search settings. Defaults: the issue's GPU target setting (40 x 25)."""

    popsize: int = 40  # candidates per image (absolute count; Su et al. used 400, scipy's popsize x 5)
    generations: int = 25  # DE generations after the initial population (scipy's maxiter)
    scale: float = 0.5  # k in Eq. 3 (DE's F)
    crossover: float = 1.0  # binomial crossover rate; 1.0 = the child is the Eq. 3 mutant itself
    probe: str = "pixel"  # "pixel": one pixel (L0 = 1, the paper) | "patch": the s x s patch
    patch: float = 0.14  # patch side for probe="patch": pixels if >= 1, else a fraction of the side
    early_stop: float | None = None  # stop an image once its true-class probability is below this
    init: str = "lhs"  # "lhs": Latin hypercube (scipy's default) | "uniform" (Su et al.) | "saliency" (see below)
    saliency_top: int = 8  # positions seeded by the saliency start
    saliency_jitter: float = 0.03  # std of the position jitter around them, as a fraction of the side
    seed: int = 0
    chunk_size: int = 0  # images per forward pass; 0 = measure once per attacker
    image_batch: int = 512  # images searched together (bounds memory: base images stay on the device)
    device: str = "auto"  # "auto" = cuda if available else cpu
    amp: bool = True  # bf16 autocast for the forward passes, CUDA only
    channels_last: bool = True  # NHWC activations: faster convolutions on GPUs and with oneDNN on CPUs
    input_size: int | None = None  # None = the checkpoint's input size
    splits: tuple[str, ...] = ("train",)  # table splits attacked by attack_table / the Ray stage

    def validate(self) -> "AttackConfig":
        if self.popsize < 4:
            raise ValueError(f"popsize must be >= 4 (DE/rand/1 needs 3 others), got {self.popsize}")
        if self.generations < 0:
            raise ValueError(f"generations must be >= 0, got {self.generations}")
        if not 0 < self.scale <= 2:
            raise ValueError(f"scale (k) must be in (0, 2], got {self.scale}")
        if not 0 <= self.crossover <= 1:
            raise ValueError(f"crossover must be in [0, 1], got {self.crossover}")
        if self.probe not in PROBES:
            raise ValueError(f"probe must be one of {PROBES}, got {self.probe!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.patch <= 0:
            raise ValueError(f"patch size must be > 0 (pixels, or a fraction < 1), got {self.patch}")
        if self.early_stop is not None and not 0 < self.early_stop <= 1:
            raise ValueError(f"early_stop must be a probability in (0, 1], got {self.early_stop}")
        if self.chunk_size < 0 or self.image_batch < 1:
            raise ValueError("chunk_size must be >= 0 (0 = auto) and image_batch >= 1")
        return self


@dataclass
class AttackResult:
    """Per image: the best candidate found. Positions are pixel indices of the attacked image."""

    x: torch.Tensor  # (B,) int64 column
    y: torch.Tensor  # (B,) int64 row
    rgb: torch.Tensor  # (B, 3) uint8
    fitness: torch.Tensor  # (B,) float32, true-class probability with the perturbation
    clean_prob: torch.Tensor  # (B,) float32, true-class probability of the clean image
    evals: torch.Tensor  # (B,) int64 candidate evaluations
    history: torch.Tensor | None = None  # (B, generations + 1) best fitness after init and each generation
    seconds: float = 0.0

    def __len__(self) -> int:
        return int(self.x.shape[0])


def decode_candidates(cand: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M, 5) continuous candidates -> integer column, row and uint8 RGB.

    x is searched in [0, w) and floored, so every column gets the same share of the space;
    RGB in [0, 255] is rounded to a real pixel value.
    """
    px = cand[:, 0].floor().clamp(0, w - 1).long()
    py = cand[:, 1].floor().clamp(0, h - 1).long()
    rgb = cand[:, 2:5].round().clamp(0, 255).to(torch.uint8)
    return px, py, rgb


def apply_probe(images: torch.Tensor, px: torch.Tensor, py: torch.Tensor, rgb: torch.Tensor,
                probe: str = "pixel", side: int = 1) -> torch.Tensor:
    """Write each image's RGB value at its position (in place on ``images``, uint8 NCHW; returned).

    ``probe="patch"`` fills the side x side patch centred on the position, clipped at the borders
    (clamped indices repeat a border pixel with the same value, so the write stays exact).
    """
    m, c = images.shape[0], images.shape[1]
    dev = images.device
    ar = torch.arange(m, device=dev)
    ch = torch.arange(c, device=dev)
    rgb = rgb.to(device=dev, dtype=images.dtype)
    if probe == "pixel" or side <= 1:
        images[ar[:, None], ch[None, :], py[:, None], px[:, None]] = rgb
        return images
    h, w = images.shape[2], images.shape[3]
    offs = torch.arange(side, device=dev) - side // 2
    ys = (py[:, None] + offs).clamp(0, h - 1)
    xs = (px[:, None] + offs).clamp(0, w - 1)
    images[ar[:, None, None, None], ch[None, :, None, None], ys[:, None, :, None], xs[:, None, None, :]] = \
        rgb[:, :, None, None].expand(m, c, side, side)
    return images


def measure_throughput(model: nn.Module, shape: tuple[int, int, int], device: torch.device, sizes: Sequence[int],
                       amp: bool = True, min_seconds: float = 0.1, channels_last: bool = False,
                       rounds: int = 3) -> dict[int, float]:
    """Images/s of plain inference at each batch size (warm-up pass excluded).

    The sizes are measured in ``rounds`` interleaved passes and each keeps its best rate: other jobs
    on a shared machine only ever slow a measurement down, so the maximum is the robust estimate,
    and interleaving keeps a burst of load from penalising one size only.
    """
    use_amp = amp and device.type == "cuda"
    inputs = {}
    for n in sizes:
        x = torch.randn((n, *shape), device=device)
        inputs[n] = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    out: dict[int, float] = {n: 0.0 for n in sizes}
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        for n in sizes:
            model(inputs[n])  # warm-up: kernel selection / allocator
        _sync(device)
        for _ in range(max(1, rounds)):
            for n in sizes:
                reps, t0 = 0, time.perf_counter()
                while True:
                    model(inputs[n])
                    reps += 1
                    _sync(device)
                    dt = time.perf_counter() - t0
                    if dt >= min_seconds / max(1, rounds) and reps >= 1:
                        break
                out[n] = max(out[n], n * reps / dt)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tune_chunk_size(model: nn.Module, shape: tuple[int, int, int], device: torch.device, amp: bool = True,
                    max_size: int | None = None, channels_last: bool = False) -> int:
    """The batch size with the best measured plain-inference throughput on this device."""
    sizes = GPU_CHUNKS if device.type == "cuda" else CPU_CHUNKS
    if max_size is not None:
        sizes = tuple(s for s in sizes if s <= max_size) or (sizes[0],)
    rates = measure_throughput(model, shape, device, sizes, amp, channels_last=channels_last)
    return max(rates, key=rates.get)


class PointAttacker:
    """A teacher on a device, ready to attack batches of uint8 images (one per Ray actor).

    The chunk size is measured on the first call and kept, so the cost of measuring is paid once.
    """

    def __init__(self, model: nn.Module, cfg: AttackConfig, mean: Sequence[float] = MEAN,
                 std: Sequence[float] = STD, device: torch.device | str | None = None):
        self.cfg = cfg.validate()
        self.device = resolve_device(cfg.device) if device is None else torch.device(device)
        self.channels_last = cfg.channels_last
        if self.channels_last:
            model = copy.deepcopy(model)  # .to(memory_format) converts in place: leave the caller's model alone
        self.model = model.to(self.device).eval()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.mean, self.std = tuple(mean), tuple(std)
        self.chunk_size = cfg.chunk_size or None
        self.amp = cfg.amp and self.device.type == "cuda"

    # -- fitness -------------------------------------------------------------------------------
    def _forward_probs(self, images_u8: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = normalize(images_u8, self.mean, self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.model(x)
        return torch.softmax(logits.float(), dim=1).gather(1, labels[:, None])[:, 0]

    def fitness(self, base: torch.Tensor, labels: torch.Tensor, img_idx: torch.Tensor,
                cand: torch.Tensor) -> torch.Tensor:
        """True-class probability of ``base[img_idx]`` perturbed by ``cand`` (M, 5), chunked.

        ``base`` is uint8 (B, 3, H, W) on the device, ``labels`` (B,) int64.
        """
        h, w = base.shape[2], base.shape[3]
        side = side_pixels(self.cfg.patch, min(h, w)) if self.cfg.probe == "patch" else 1
        chunk = self.resolve_chunk(tuple(base.shape[1:]))
        out = torch.empty(len(img_idx), device=self.device)
        with torch.inference_mode():
            for s in range(0, len(img_idx), chunk):
                idx = img_idx[s:s + chunk]
                imgs = base.index_select(0, idx)
                px, py, rgb = decode_candidates(cand[s:s + chunk], h, w)
                apply_probe(imgs, px, py, rgb, self.cfg.probe, side)
                out[s:s + chunk] = self._forward_probs(imgs, labels.index_select(0, idx))
        return out

    def resolve_chunk(self, shape: tuple[int, int, int]) -> int:
        """The chunk size: the configured one, else measured on the first call and kept."""
        if self.chunk_size is None:
            self.chunk_size = tune_chunk_size(self.model, tuple(shape), self.device, self.amp,
                                              channels_last=self.channels_last)
        return self.chunk_size

    # -- initial population ----------------------------------------------------------------------
    def _saliency_init(self, base: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Population drawn around each image's top-|gradient| positions (one backward pass).

        The gradient of the true-class probability wrt the input ranks positions (for the patch
        probe, summed over the patch); half the candidates take the colour that moves the pixel
        against the gradient (0 or 255 per channel), half a random colour, to keep diversity.
        """
        cfg = self.cfg
        b, _, h, w = base.shape
        p = cfg.popsize
        side = side_pixels(cfg.patch, min(h, w)) if cfg.probe == "patch" else 1
        # Backward passes hold activations: cap the chunk so a GPU-sized chunk cannot run out of memory.
        chunk = min(self.resolve_chunk(tuple(base.shape[1:])), 256)
        grads = []
        for s in range(0, b, chunk):
            x = normalize(base[s:s + chunk], self.mean, self.std).requires_grad_(True)
            with torch.enable_grad():
                logits = self.model(x)
                prob = torch.softmax(logits.float(), 1).gather(1, labels[s:s + chunk, None]).sum()
                (g,) = torch.autograd.grad(prob, x)
            grads.append(g.detach())
        g = torch.cat(grads)  # (B, 3, H, W)
        sal = g.abs().sum(1, keepdim=True)
        if side > 1:
            sal = F.avg_pool2d(sal, side, stride=1, padding=side // 2, count_include_pad=False)[..., :h, :w]
        k = max(1, min(cfg.saliency_top, h * w))
        top = sal.flatten(1).topk(k, dim=1).indices.cpu()  # (B, k)
        ty, tx = (top // w).float(), (top % w).float()
        slot = torch.arange(p) % k  # every top position gets candidates, best first
        jitter = torch.randn((b, p, 2), generator=gen) * cfg.saliency_jitter * max(h, w)
        cx = (tx[:, slot] + 0.5 + jitter[..., 0]).clamp(0, w - 1e-3)
        cy = (ty[:, slot] + 0.5 + jitter[..., 1]).clamp(0, h - 1e-3)
        gsign = g.cpu().flatten(2).gather(2, top[:, None, :].expand(b, 3, k))  # (B, 3, k) at top positions
        extreme = torch.where(gsign > 0, 0.0, 255.0)[:, :, slot].permute(0, 2, 1)  # (B, P, 3)
        rand_rgb = torch.rand((b, p, 3), generator=gen) * 255
        use_extreme = (torch.arange(p) % 2 == 0)[None, :, None]
        rgb = torch.where(use_extreme, extreme, rand_rgb)
        return torch.cat([cx[..., None], cy[..., None], rgb], dim=2)

    def _uniform_init(self, b: int, h: int, w: int, gen: torch.Generator, latin: bool) -> torch.Tensor:
        p = self.cfg.popsize
        u = torch.rand((b, p, 5), generator=gen)
        if latin:
            # Latin hypercube: each parameter's range is cut into p strata and every stratum gets
            # exactly one candidate, so 40 candidates cover the rows/columns evenly.
            strata = torch.rand((b, p, 5), generator=gen).argsort(dim=1)
            u = (strata + u) / p
        return u * torch.tensor([w, h, 255.0, 255.0, 255.0])

    # -- the search ------------------------------------------------------------------------------
    def __call__(self, images: torch.Tensor, labels: torch.Tensor, track_history: bool = False) -> AttackResult:
        """Attack uint8 NCHW images (true labels int64, all >= 0); image_batch at a time."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images of shape (N, 3, H, W), got {tuple(images.shape)} {images.dtype}")
        labels = torch.as_tensor(labels, dtype=torch.long)
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if len(labels) and (labels.min() < 0):
            raise ValueError("every attacked image needs its true class (label >= 0); "
                             "unlabeled rows cannot be attacked")
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(self.cfg.seed)
        step = self.cfg.image_batch
        parts = [self._search(images[s:s + step], labels[s:s + step], gen, track_history)
                 for s in range(0, len(images), step)]
        if not parts:
            parts = [self._search(images, labels, gen, track_history)]
        fields = ("x", "y", "rgb", "fitness", "clean_prob", "evals")
        res = AttackResult(*(torch.cat([getattr(p, f) for p in parts]) for f in fields),
                           history=torch.cat([p.history for p in parts]) if track_history else None)
        res.seconds = time.perf_counter() - t0
        return res

    def _search(self, images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator, track: bool) -> AttackResult:
        cfg = self.cfg
        b, _, h, w = images.shape
        p = cfg.popsize
        dev = self.device
        if b == 0:
            z = torch.zeros(0, dtype=torch.long)
            return AttackResult(z, z, torch.zeros((0, 3), dtype=torch.uint8), torch.zeros(0), torch.zeros(0), z,
                                torch.zeros((0, cfg.generations + 1)) if track else None)
        base = images.to(dev, non_blocking=True)
        lab = labels.to(dev)
        with torch.inference_mode():
            clean = torch.cat([self._forward_probs(base[s:s + 256], lab[s:s + 256]) for s in range(0, b, 256)])
        hi = torch.tensor([w, h, 255.0, 255.0, 255.0])
        if cfg.init == "saliency":
            pop = self._saliency_init(base, lab, gen)
        else:
            pop = self._uniform_init(b, h, w, gen, latin=cfg.init == "lhs")
        pop = pop.to(dev)
        all_idx = torch.arange(b, device=dev)
        fit = self.fitness(base, lab, all_idx.repeat_interleave(p), pop.view(-1, 5)).view(b, p)
        evals = torch.full((b,), p, dtype=torch.long)
        history = torch.empty((b, cfg.generations + 1)) if track else None
        if track:
            history[:, 0] = fit.min(1).values.cpu()
        active = all_idx
        hi_dev = hi.to(dev)
        for g in range(cfg.generations):
            if cfg.early_stop is not None:
                keep = fit[active].min(1).values >= cfg.early_stop
                active = active[keep]
            na = len(active)
            if na == 0:
                if track:
                    history[:, g + 1:] = history[:, g:g + 1]
                break
            parents = pop[active]  # (na, P, 5)
            r1, r2, r3 = _distinct_others(na, p, gen)
            rows = torch.arange(na, device=dev)[:, None]
            mutant = parents[rows, r1.to(dev)] + cfg.scale * (parents[rows, r2.to(dev)] - parents[rows, r3.to(dev)])
            if cfg.crossover < 1.0:
                cross = torch.rand((na, p, 5), generator=gen) < cfg.crossover
                forced = torch.randint(0, 5, (na, p, 1), generator=gen)
                cross.scatter_(2, forced, True)  # at least one parameter from the mutant
                mutant = torch.where(cross.to(dev), mutant, parents)
            # Out-of-bounds parameters are redrawn uniformly (scipy's rule): clipping would pile
            # candidates up on the image border.
            oob = (mutant < 0) | (mutant >= hi_dev)
            redraw = (torch.rand((na, p, 5), generator=gen) * hi).to(dev)
            trial = torch.where(oob, redraw, mutant)
            tfit = self.fitness(base, lab, active.repeat_interleave(p), trial.view(-1, 5)).view(na, p)
            better = tfit <= fit[active]  # ties move: lets the search drift across flat regions
            pop[active] = torch.where(better[..., None], trial, parents)
            fit[active] = torch.where(better, tfit, fit[active])
            evals[active.cpu()] += p
            if track:
                history[:, g + 1] = fit.min(1).values.cpu()
        best_fit, best_i = fit.min(1)
        best = pop[all_idx, best_i]
        px, py, rgb = decode_candidates(best, h, w)
        return AttackResult(px.cpu(), py.cpu(), rgb.cpu(), best_fit.float().cpu(), clean.float().cpu(), evals, history)


def _distinct_others(n: int, p: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each of n x p candidates, three distinct population indices, none the candidate itself.

    Draws slots among the p - 1 others without replacement (shift-past-taken trick), then maps slot
    s of candidate i to (i + 1 + s) mod p: O(n p), no p x p matrices (Su et al. use p = 400).
    """
    a = torch.randint(0, p - 1, (n, p), generator=gen)
    b = torch.randint(0, p - 2, (n, p), generator=gen)
    b = b + (b >= a)
    c = torch.randint(0, p - 3, (n, p), generator=gen)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    c = c + (c >= lo)
    c = c + (c >= hi)
    i = torch.arange(p)[None, :]
    return (i + 1 + a) % p, (i + 1 + b) % p, (i + 1 + c) % p


def attack_images(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: AttackConfig = AttackConfig(),
                  *, mean: Sequence[float] = MEAN, std: Sequence[float] = STD,
                  track_history: bool = False) -> AttackResult:
    """One-shot convenience: attack uint8 NCHW ``images`` with true ``labels`` using ``model``."""
    return PointAttacker(model, cfg, mean, std)(images, labels, track_history)


# -- tables -------------------------------------------------------------------------------------

def _meta_size(meta: dict, cfg: AttackConfig) -> int:
    size = cfg.input_size or meta.get("input_size")
    if not size:
        raise ValueError("the checkpoint does not record its input size; set AttackConfig.input_size")
    return int(size)


def make_shard_processor(checkpoint_uri: str, cfg: AttackConfig, device: str | None = None
                         ) -> Callable[[pa.Table], tuple[pa.Table, pa.Table]]:
    """Load the teacher once; return ``fn(image table shard) -> (positions, rejects)``.

    Only rows in ``cfg.splits`` are attacked (PASM erases training images); of those, rows without
    a label or with an undecodable image become rejects with the reason, never silent drops.
    """
    from tasks.engine.checkpoint import load_checkpoint

    cfg = cfg.validate()
    dev = resolve_device(device or cfg.device)
    model, meta = load_checkpoint(checkpoint_uri, device=str(dev))
    size = _meta_size(meta, cfg)
    attacker = PointAttacker(model, cfg, meta.get("mean", MEAN), meta.get("std", STD), dev)

    def process(table: pa.Table) -> tuple[pa.Table, pa.Table]:
        ids = [str(i) for i in table.column("id").to_pylist()]
        splits = table.column("split").to_pylist() if "split" in table.schema.names else [None] * len(ids)
        labels = table.column("label").to_pylist()
        blobs = table.column("image").to_pylist()
        keep_ids, keep_imgs, keep_labels, rejects = [], [], [], []
        for i, sp, lab, blob in zip(ids, splits, labels, blobs):
            if cfg.splits and sp not in cfg.splits:
                continue  # other splits (test, pool) are not learning material: not attacked
            if lab is None or lab < 0:
                rejects.append({"id": i, "reason": "no label: the point attack needs the true class"})
                continue
            try:
                img = decode_resized(blob, size)
            except ImageDecodeError as e:
                rejects.append({"id": i, "reason": f"image does not decode: {e}"})
                continue
            keep_ids.append(i)
            keep_imgs.append(img)
            keep_labels.append(int(lab))
        if keep_imgs:
            images = torch.from_numpy(np.stack(keep_imgs)).permute(0, 3, 1, 2).contiguous()
            res = attacker(images, torch.tensor(keep_labels))
            cols = {
                "id": keep_ids, "x": res.x.int().numpy(), "y": res.y.int().numpy(),
                "r": res.rgb[:, 0].numpy(), "g": res.rgb[:, 1].numpy(), "b": res.rgb[:, 2].numpy(),
                "fitness": res.fitness.numpy(), "clean_prob": res.clean_prob.numpy(),
                "evals": res.evals.int().numpy(), "label": np.asarray(keep_labels, np.int8),
                "size": np.full(len(keep_ids), size, np.int32),
            }
            out = pa.table({k: pa.array(v, type=POSITIONS_SCHEMA.field(k).type) for k, v in cols.items()},
                           schema=POSITIONS_SCHEMA)
        else:
            out = POSITIONS_SCHEMA.empty_table()
        rej = pa.Table.from_pylist(rejects, schema=REJECTS_TABLE_SCHEMA)
        return out, rej

    return process


def attack_table(checkpoint_uri: str, table_uri: str, out_uri: str, cfg: AttackConfig = AttackConfig(), *,
                 device: str | None = None, on_shard: Callable[[int, int], None] | None = None):
    """In-process attack stage (no Ray): same output and resume behaviour as workers.attack.

    Each input shard's positions are written atomically under the same shard index, so a rerun
    attacks only the shards not yet written. Returns the committed Manifest.
    """
    from storage.artifact import Artifact, ShardedWriter, join, reopen, shard_name

    src = Artifact(table_uri)
    config, inputs = stage_config(cfg, checkpoint_uri), {"table": src.digest}
    finished = resume_guard(out_uri, config, inputs)
    if finished is not None:
        return finished
    names = [shard_name(i) for i in range(src.num_shards)]
    reopen(join(out_uri, REJECTS))
    writer, rwriter = ShardedWriter(out_uri), ShardedWriter(join(out_uri, REJECTS))
    done = writer.done()
    todo = [i for i, n in enumerate(names) if n not in done]
    process = make_shard_processor(checkpoint_uri, cfg, device) if todo else None
    for i in todo:
        out, rej = process(src.read_shard(i, ["id", "image", "label", "split"]))
        rwriter.write_shard(names[i], rej)  # rejects first: the positions marker means "shard done"
        writer.write_shard(names[i], out)
        if on_shard is not None:
            on_shard(i, out.num_rows)
    rdone = rwriter.done()
    for n in names:
        if n not in rdone:
            rwriter.write_shard(n, REJECTS_TABLE_SCHEMA.empty_table())
    rejected = rwriter.commit(f"{ATTACK_STAGE}.rejects", config, inputs, names).rows
    return writer.commit(ATTACK_STAGE, config, inputs, names, {"rejects": rejected})


def stage_config(cfg: AttackConfig, checkpoint_uri: str) -> dict:
    """What identifies an attack artifact: the search settings (minus device/chunking) and the teacher."""
    d = asdict(cfg)
    for k in ("device", "chunk_size", "image_batch", "amp", "channels_last"):  # speed only, not what is found
        d.pop(k)
    d["splits"] = list(cfg.splits)
    d["teacher"] = checkpoint_uri
    from tasks.engine.checkpoint import read_meta

    d["teacher_sha256"] = read_meta(checkpoint_uri).get("model_sha256")  # the weights, not just the path
    return d


def resume_guard(out_uri: str, config: dict, inputs: dict):
    """Resume safety for the attack stage (storage.artifact.claim): the Manifest when ``out_uri`` is
    already finished with these settings, None when it is new or an unfinished run with the same
    settings; FileExistsError when it holds positions searched with others (mixing them would give a
    positions table whose shards disagree on what was searched).
    """
    from storage.artifact import claim

    return claim(out_uri, {"stage": ATTACK_STAGE, "config": config, "inputs": inputs})
