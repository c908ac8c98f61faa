"""PASM Section III-C: erase an s x s region centred on the attacked position (new learning material).

The fill is the perturbed RGB value found by the attack (Algorithm 1, line 9), random values
(the paper's "random values between 0 and 255" ablation) or a constant. The random-erasing
ablation (Zhong et al., Table VII) erases a region of the same size at a random position.

Erased images are written at the attack's resolution (the ``size`` column of the positions
table, i.e. the teacher's input size), PNG encoded so the fill values survive exactly; the
student trains at that same size, so nothing is resampled twice.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from storage.artifact import Artifact, ArtifactWriter, Manifest
from storage.images import ImageDecodeError, decode, encode
from storage.schema import IMAGE_SCHEMA
from tasks.data import decode_resized

FILLS = ("rgb", "random", "constant")


@dataclass(frozen=True)
class EraseConfig:
    """How the new learning materials are made. Default size: 0.14 of the side, 31 px at 224 (the middle of 23..39)."""

    size: float = 0.14  # region side: pixels if >= 1, else a fraction of the side (0.14 x 224 = 31 px)
    fill: str = "rgb"  # "rgb": the attack's perturbed value | "random": per-pixel 0..255 | "constant"
    constant: tuple[int, int, int] = (128, 128, 128)  # the "constant" fill
    random_position: bool = False  # ablation: random erasing (a random position, same region size)
    seed: int = 0  # random positions / random fills; per image, so sharding does not change them
    image_size: int | None = None  # side of the written images; None = the positions' attack size
    splits: tuple[str, ...] = ("train",)  # random_position mode: splits erased (labeled rows only)
    rows_per_shard: int = 1024

    def validate(self) -> "EraseConfig":
        if self.fill not in FILLS:
            raise ValueError(f"fill must be one of {FILLS}, got {self.fill!r}")
        if self.size <= 0:
            raise ValueError(f"erase size must be > 0 (pixels, or a fraction of the side < 1), got {self.size}")
        if len(self.constant) != 3 or not all(0 <= int(c) <= 255 for c in self.constant):
            raise ValueError(f"constant fill must be three values in 0..255, got {self.constant}")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        return self


def side_pixels(size: float, side: int) -> int:
    """A region side given in pixels (>= 1) or as a fraction of the image side (< 1)."""
    if size <= 0:
        raise ValueError(f"region size must be > 0, got {size}")
    s = int(round(size)) if size >= 1 else int(round(size * side))
    return max(1, min(s, side))


def region(x: int, y: int, s: int, h: int, w: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the s x s region centred on column x, row y, clipped at the borders.

    For an even s the extra row/column goes up-left: [x - s // 2, x - s // 2 + s).
    """
    x0, y0 = x - s // 2, y - s // 2
    return max(0, y0), min(h, y0 + s), max(0, x0), min(w, x0 + s)


def erase(image: np.ndarray, x: int, y: int, s: int, fill: str = "rgb", rgb: Sequence[int] | None = None,
          rng: np.random.Generator | None = None, constant: Sequence[int] = (128, 128, 128)) -> np.ndarray:
    """A copy of HxWx3 uint8 ``image`` with the s x s region at (x, y) erased."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    y0, y1, x0, x1 = region(int(x), int(y), int(s), h, w)
    out = image.copy()
    if fill == "rgb":
        if rgb is None:
            raise ValueError("fill='rgb' needs the perturbed RGB value")
        out[y0:y1, x0:x1] = np.asarray(rgb, np.uint8)
    elif fill == "random":
        rng = rng or np.random.default_rng()
        out[y0:y1, x0:x1] = rng.integers(0, 256, size=(y1 - y0, x1 - x0, 3), dtype=np.uint8)
    elif fill == "constant":
        out[y0:y1, x0:x1] = np.asarray(constant, np.uint8)
    else:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    return out


def erase_batch(images: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, s: int, fill: str = "rgb",
                rgb: torch.Tensor | None = None, generator: torch.Generator | None = None,
                constant: Sequence[int] = (128, 128, 128)) -> torch.Tensor:
    """Batched :func:`erase` on uint8 NCHW tensors (a copy), e.g. for online erasing in a trainer."""
    n, c, h, w = images.shape
    out = images.clone()
    dev = images.device
    iy = torch.arange(h, device=dev)[None, :, None]
    ix = torch.arange(w, device=dev)[None, None, :]
    y0 = (ys.to(dev) - s // 2)[:, None, None]
    x0 = (xs.to(dev) - s // 2)[:, None, None]
    mask = ((iy >= y0) & (iy < y0 + s) & (ix >= x0) & (ix < x0 + s))[:, None]  # (N, 1, H, W)
    if fill == "rgb":
        if rgb is None:
            raise ValueError("fill='rgb' needs the perturbed RGB values")
        val = rgb.to(dev, torch.uint8)[:, :, None, None].expand(n, c, h, w)
    elif fill == "random":
        val = torch.randint(0, 256, (n, c, h, w), generator=generator, dtype=torch.uint8).to(dev)
    elif fill == "constant":
        val = torch.tensor(list(constant), dtype=torch.uint8, device=dev)[None, :, None, None].expand(n, c, h, w)
    else:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    return torch.where(mask, val, out)


def _row_rng(seed: int, row_id: str) -> np.random.Generator:
    # Per-row generator: the same image gets the same random draw however the table is sharded.
    return np.random.default_rng([seed, zlib.crc32(row_id.encode())])


def _read_positions(uri: str) -> dict[str, tuple[int, int, int, int, int, int]]:
    t = Artifact(uri).read(["id", "x", "y", "r", "g", "b", "size"])
    cols = [t.column(c).to_pylist() for c in ("x", "y", "r", "g", "b", "size")]
    return {i: tuple(v) for i, v in zip(t.column("id").to_pylist(), zip(*cols))}


def erase_table(table_uri: str, positions_uri: str | None, out_uri: str, cfg: EraseConfig = EraseConfig(), *,
                on_rows: Callable[[int], None] | None = None) -> Manifest:
    """Write the erased learning materials: one IMAGE_SCHEMA row per erased image.

    With positions (the attack's output), every row of ``table_uri`` that has a position is erased
    there; the others (test split, rows the attack rejected) are not learning material and are not
    written; their count is recorded in the manifest (``extra.not_erased``). A position whose id is
    not in the table is an error: the positions belong to another table.

    With ``cfg.random_position`` (the random-erasing ablation) ``positions_uri`` may be None: every
    labeled row of ``cfg.splits`` is erased at a uniformly random position (``cfg.image_size``
    required then); the "rgb" fill becomes one random colour per image, the analogue of a
    perturbed value.
    """
    cfg = cfg.validate()
    src = Artifact(table_uri)
    positions = _read_positions(positions_uri) if positions_uri else None
    if positions is None and not cfg.random_position:
        raise ValueError("erase_table needs a positions table (the attack's output) unless random_position is set")
    if positions is None and cfg.image_size is None:
        raise ValueError("random erasing without positions needs EraseConfig.image_size (the training input size)")
    config = asdict(cfg)
    inputs = {"table": src.digest}
    if positions_uri:
        inputs["positions"] = Artifact(positions_uri).digest
    seen: set[str] = set()
    not_erased = 0
    with ArtifactWriter(out_uri, stage="erase", config=config, inputs=inputs, rows_per_shard=cfg.rows_per_shard,
                        schema=IMAGE_SCHEMA) as out:
        for batch in src.iter_batches(batch_size=256):
            rows = []
            for rec in batch.to_pylist():
                rid = str(rec["id"])
                if positions is not None:
                    pos = positions.get(rid)
                    if pos is None:
                        not_erased += 1
                        continue
                    if cfg.random_position:
                        pos = (None, None, *pos[2:])
                elif rec.get("split") not in cfg.splits or rec.get("label") is None:
                    not_erased += 1
                    continue
                else:
                    pos = (None, None, None, None, None, cfg.image_size)
                seen.add(rid)
                rows.append(_erase_row(rec, pos, cfg))
            if rows:
                out.write_rows(rows)
                if on_rows is not None:
                    on_rows(len(rows))
        if positions is not None and len(seen) != len(positions):
            missing = sorted(set(positions) - seen)
            raise ValueError(
                f"{len(missing)} positions (e.g. {missing[:3]}) have no row in {table_uri}: the positions were "
                "computed on another table; rerun the attack on this one")
        return out.commit({"rows_erased": len(seen), "not_erased": not_erased})


def _erase_row(rec: dict, pos: tuple, cfg: EraseConfig) -> dict:
    x, y, r, g, b, attack_size = pos
    rid = str(rec["id"])
    size = int(cfg.image_size or attack_size)
    try:
        orig = decode(rec["image"])
    except ImageDecodeError as e:
        raise ValueError(f"row {rid} does not decode ({e}); the attack should have rejected it") from e
    oh, ow = orig.shape[:2]
    img = decode_resized(rec["image"], size)
    rng = _row_rng(cfg.seed, rid)
    s = side_pixels(cfg.size, size)
    if x is None:  # random position (ablation)
        x, y = int(rng.integers(0, size)), int(rng.integers(0, size))
        rgb = rng.integers(0, 256, size=3) if r is None else (r, g, b)
    else:
        if attack_size != size:  # positions are in pixels of the attacked image
            x, y = int(x * size / attack_size), int(y * size / attack_size)
        rgb = (r, g, b)
    erased = erase(img, x, y, s, cfg.fill, rgb, rng, cfg.constant)
    out = dict(rec)
    out["image"] = encode(erased, ".png")
    lm = rec.get("landmarks")
    if lm is not None and (oh != size or ow != size):
        out["landmarks"] = [v * (size / ow if i % 2 == 0 else size / oh) for i, v in enumerate(lm)]
    return {k: out.get(k) for k in IMAGE_SCHEMA.names}


def random_erasing_batch(images: torch.Tensor, generator: torch.Generator, p: float = 0.5,
                         area: tuple[float, float] = (0.02, 0.4), aspect: float = 0.3,
                         attempts: int = 10) -> torch.Tensor:
    """Zhong et al.'s random erasing (RE-R), online: a copy of uint8 NCHW ``images``.

    Each image, with probability ``p``, gets one rectangle of random area (a fraction in ``area`` of the
    image) and aspect ratio (log-uniform in [aspect, 1 / aspect], as torchvision's RandomErasing) at a
    random position, filled with random values 0..255. Every draw comes from ``generator`` (CPU), so a
    trainer that seeds it per epoch replays the same erasing on resume.
    """
    n, c, h, w = images.shape
    out = images.clone()
    hit = torch.rand(n, generator=generator) < p
    lo, hi = math.log(aspect), math.log(1.0 / aspect)
    for i in torch.nonzero(hit).flatten().tolist():
        for _ in range(attempts):  # Zhong et al.: redraw until the rectangle fits inside the image
            a = float(torch.empty(()).uniform_(area[0], area[1], generator=generator)) * h * w
            r = math.exp(float(torch.empty(()).uniform_(lo, hi, generator=generator)))
            eh, ew = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
            if 0 < eh < h and 0 < ew < w:
                y0 = int(torch.randint(0, h - eh + 1, (1,), generator=generator))
                x0 = int(torch.randint(0, w - ew + 1, (1,), generator=generator))
                fill = torch.randint(0, 256, (c, eh, ew), generator=generator, dtype=torch.uint8)
                out[i, :, y0:y0 + eh, x0:x0 + ew] = fill.to(out.device)
                break
    return out
