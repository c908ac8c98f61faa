"""Omni-supervised mining (Eq. 5-6): pseudo-label unlabeled faces by cosine similarity to class centroids.

For every pool face x_i with penultimate features f_i (the primitive model's ``features``):

    d_i^k = center_k . f_i / (|center_k| |f_i|)                      (Eq. 5, a cosine *similarity*)
    y_i = k^  if  d_i^k^ >= d_i^k + m  for all k != k^              (Eq. 6, as intended)

Eq. 6 is printed with "<=" on a quantity the paper calls a distance but defines as a similarity; the
intended rule (and the one the paper's Fig. 3 ranks by) keeps a face when its best similarity beats
every other class's by the margin m, i.e. best - second best >= m. An optional absolute floor
(best >= floor) also drops faces that are equally far from every centroid (non-faces, distractors).

This module holds the pure parts (``similarities``, ``select``) and the per-shard processor that the Ray
job (workers/mine.py) runs inside each actor: decode -> embed -> compare -> keep the selected rows only.
Nothing proportional to the pool is ever held: one input shard in, the kept rows of it out.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from storage.schema import IMAGE_SCHEMA, REJECTS_SCHEMA

STAGE = "mine"
CODE_VERSION = "mine-1"

# The auxiliary samples table is an image table (so every trainer can read it next to the labeled
# one) plus the two scores of Eq. 6.
AUX_SCHEMA = pa.schema(list(IMAGE_SCHEMA) + [
    pa.field("best_similarity", pa.float32()),  # d_i^k^ (Eq. 5) of the pseudo class
    pa.field("margin", pa.float32()),  # best minus second-best similarity (Eq. 6's left-over margin)
])

# Columns of the pool the processor reads; the others (e.g. a pool's own label) are never needed.
POOL_COLUMNS = ("id", "image", "split", "source", "valence", "arousal", "landmarks")


@dataclass(frozen=True)
class MineConfig:
    margin: float = 0.05  # m of Eq. 6: best similarity - second best >= m. Not given in the paper; tune
    #                       it on the per-class counts (the paper kept 2.4% of MS1M: 137,769 of 5,822,653)
    floor: float | None = None  # optional: also require best similarity >= floor
    center: bool = False  # subtract the mean of the class centroids from features and centroids first.
    #   Not in the paper: features after ReLU + pooling share a large common component, so raw cosines
    #   are all ~0.99 and margins tiny (~1e-3) unless the model is well trained; centring spreads them.
    batch_size: int = 256  # images per forward pass (per actor)
    # Pool rows to mine, by split. None = every split except evaluation ones (test*, val*): a test image
    # mined into the auxiliary set would be trained on and then scored as unseen. Naming a split mines it.
    splits: tuple[str, ...] | None = None
    input_size: int | None = None  # None: the checkpoint's input size
    device: str = "auto"  # "auto": the actor's GPU when it has one, else cpu
    amp: bool = True  # fp16 autocast on GPU (features are compared by cosine: fp16 is ample)
    decode_threads: int = 1  # background threads decoding the next batches while the model runs
    torch_threads: int | None = None  # CPU threads for the model per actor; None = torch's default
    source_prefix: str = "mined:"  # output source = prefix + the pool row's source

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.decode_threads < 0:
            raise ValueError(f"decode_threads must be >= 0, got {self.decode_threads}")
        if not -2.0 <= self.margin <= 2.0:
            raise ValueError(f"margin is a difference of cosine similarities, within [-2, 2]; got {self.margin}")
        if self.floor is not None and not -1.0 <= self.floor <= 1.0:
            raise ValueError(f"floor is a cosine similarity, within [-1, 1]; got {self.floor}")


EVAL_SPLIT_PREFIXES = ("test", "val")  # test, test_occlusion, val, validation: never mined by default


def mined_rows(split: pa.Array | pa.ChunkedArray, splits: Sequence[str] | None) -> pa.Array:
    """Boolean mask of the rows of a split column that mining takes (MineConfig.splits)."""
    if splits is not None:
        return pc.fill_null(pc.is_in(split, value_set=pa.array(list(splits), pa.string())), False)
    evaluation = functools.reduce(pc.or_, (pc.starts_with(split, p) for p in EVAL_SPLIT_PREFIXES))
    return pc.invert(pc.fill_null(evaluation, False))


def check_disjoint(pool_uri: str, splits: Sequence[str] | None, tests: dict[str, tuple[str, Sequence[str] | None]]
                   ) -> None:
    """Refuse a pool whose mined rows share ids with a test set: they would be trained on, then scored.

    ``tests`` maps a test set's name to (table URI, its splits or None for all rows).
    """
    from storage.artifact import Artifact

    pool = Artifact(pool_uri)
    ids: set[str] = set()
    for b in pool.iter_batches(columns=["id", "split"] if "split" in pool.schema.names else ["id"]):
        if "split" in b.schema.names:
            b = b.filter(mined_rows(b.column("split"), splits))
        ids.update(b.column("id").to_pylist())
    for name, (uri, test_splits) in tests.items():
        shared: list[str] = []
        for b in Artifact(uri).iter_batches(columns=["id", "split"]):
            if test_splits is not None:
                b = b.filter(pc.is_in(b.column("split"), value_set=pa.array(list(test_splits), pa.string())))
            shared += [i for i in b.column("id").to_pylist() if i in ids]
        if shared:
            raise ValueError(
                f"the mining pool {pool_uri} shares {len(shared)} ids with test set {name!r} (e.g. {shared[0]}); "
                "mined test images would be trained on. Mine other splits (mine.splits) or another pool.")


def similarities(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Eq. 5: cosine similarity of each feature row (N x D) to each centroid (K x D) -> N x K."""
    features = torch.as_tensor(features)
    centroids = torch.as_tensor(centroids, device=features.device, dtype=features.dtype)
    if features.ndim != 2 or centroids.ndim != 2 or features.shape[1] != centroids.shape[1]:
        raise ValueError(
            f"features {tuple(features.shape)} and centroids {tuple(centroids.shape)} must be N x D and K x D "
            "with the same D (were the centroids computed with this model?)"
        )
    f = torch.nn.functional.normalize(features.float(), dim=1)
    c = torch.nn.functional.normalize(centroids.float(), dim=1)
    return f @ c.T


def select(
    sims: torch.Tensor, margin: float, floor: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 6 on an N x K similarity matrix.

    Returns (keep bool N, pseudo label = argmax column N, best similarity N, margin N) where
    margin = best - second best; keep = margin >= ``margin`` and (best >= ``floor`` when a floor is given).
    The pseudo label is given for every row (kept or not) so rejected rows can be inspected too.
    """
    sims = torch.as_tensor(sims)
    if sims.ndim != 2 or sims.shape[1] < 2:
        raise ValueError(f"similarities must be N x K with K >= 2 classes, got shape {tuple(sims.shape)}")
    top = torch.topk(sims, 2, dim=1)
    best, second = top.values[:, 0], top.values[:, 1]
    label = top.indices[:, 0]
    gap = best - second
    keep = gap >= margin
    if floor is not None:
        keep &= best >= floor
    return keep, label, best, gap


def _decode_batch(images: Sequence[bytes], size: int) -> tuple[np.ndarray, list[int], list[str]]:
    """Decode and resize; returns (n_ok x size x size x 3 uint8, ok indices, error per failed index)."""
    from tasks.data import decode_resized

    out = np.empty((len(images), size, size, 3), np.uint8)
    ok: list[int] = []
    errors: list[str] = []
    for i, data in enumerate(images):
        try:
            out[len(ok)] = decode_resized(data, size)
            ok.append(i)
            errors.append("")
        except (ValueError, TypeError) as e:  # ImageDecodeError is a ValueError; None bytes a TypeError
            errors.append(f"undecodable image: {e}")
    return out[: len(ok)], ok, errors


class MineProcessor:
    """One actor's per-shard work: ``(pool shard) -> (auxiliary rows kept, rejects)``.

    Holds the model and the unit-length centroids on its device for its whole life (built once per
    actor). Decoding runs ``decode_threads`` batches ahead of the model in background threads (OpenCV
    and torch release the GIL), so on a GPU the next batch is ready when the current one is done.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        centroids: np.ndarray | torch.Tensor,
        centroid_labels: Sequence[int],
        cfg: MineConfig,
        *,
        input_size: int,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        device: torch.device | str = "cpu",
    ):
        self.cfg = cfg
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        c = torch.as_tensor(np.asarray(centroids, np.float32), device=self.device)
        self.offset = c.mean(0, keepdim=True) if cfg.center else None
        self.centroids = torch.nn.functional.normalize(c - self.offset if cfg.center else c, dim=1)
        self.labels = torch.as_tensor(list(centroid_labels), dtype=torch.int64)
        if len(self.labels) != self.centroids.shape[0]:
            raise ValueError("one label per centroid row is needed")
        self.size = int(input_size)
        self.mean = torch.tensor(list(mean), device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), device=self.device).view(1, -1, 1, 1)
        self._pool = cf.ThreadPoolExecutor(cfg.decode_threads) if cfg.decode_threads > 0 else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    @torch.inference_mode()
    def embed(self, images: np.ndarray) -> torch.Tensor:
        """N x H x W x 3 uint8 -> N x D features (float32) on the device."""
        x = torch.from_numpy(images).to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = (x / 255.0 - self.mean) / self.std
        if self.device.type == "cuda" and self.cfg.amp:
            with torch.autocast("cuda", dtype=torch.float16):
                return self.model.features(x).float()
        return self.model.features(x).float()

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(keep, pseudo label, best, margin) as numpy for a batch of decoded images."""
        feats = self.embed(images)
        if self.offset is not None:
            feats = feats - self.offset
        sims = similarities(feats, self.centroids)
        keep, idx, best, gap = select(sims, self.cfg.margin, self.cfg.floor)
        return keep.cpu().numpy(), self.labels[idx.cpu()].numpy(), best.cpu().numpy(), gap.cpu().numpy()

    def __call__(self, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        if "split" in table.schema.names:
            table = table.filter(mined_rows(table.column("split"), self.cfg.splits))
        images = table.column("image").to_pylist() if table.num_rows else []
        bs = self.cfg.batch_size
        starts = list(range(0, len(images), bs))

        def submit(s: int):
            if self._pool is None:
                return _decode_batch(images[s:s + bs], self.size)
            return self._pool.submit(_decode_batch, images[s:s + bs], self.size)

        ahead = max(1, self.cfg.decode_threads)
        pending = [submit(s) for s in starts[:ahead]]
        kept_idx: list[np.ndarray] = []
        kept_label: list[np.ndarray] = []
        kept_best: list[np.ndarray] = []
        kept_gap: list[np.ndarray] = []
        rejects: list[tuple[int, str]] = []
        for b, s in enumerate(starts):
            res = pending.pop(0)
            if b + ahead < len(starts):
                pending.append(submit(starts[b + ahead]))
            decoded, ok, errors = res if isinstance(res, tuple) else res.result()
            rejects += [(s + i, e) for i, e in enumerate(errors) if e]
            if not ok:
                continue
            keep, label, best, gap = self.score(decoded)
            rows = s + np.asarray(ok, np.int64)
            kept_idx.append(rows[keep])
            kept_label.append(label[keep])
            kept_best.append(best[keep])
            kept_gap.append(gap[keep])
        idx = np.concatenate(kept_idx) if kept_idx else np.zeros(0, np.int64)
        return self._output(table, idx, kept_label, kept_best, kept_gap), self._rejects(table, rejects)

    def _output(self, table: pa.Table, idx: np.ndarray, label: list, best: list, gap: list) -> pa.Table:
        n = len(idx)
        kept = table.take(pa.array(idx, pa.int64()))

        def col(name: str, typ: pa.DataType) -> pa.Array:
            if name in kept.schema.names:
                return kept.column(name).combine_chunks().cast(typ)
            return pa.nulls(n, typ)

        src = kept.column("source").to_pylist() if "source" in kept.schema.names else [""] * n
        cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0))
        arrays = {
            "id": kept.column("id").combine_chunks().cast(pa.string()),
            "image": kept.column("image").combine_chunks().cast(pa.binary()),
            "label": pa.array(cat(label).astype(np.int8), pa.int8()),
            "split": pa.array(["train"] * n, pa.string()),
            "source": pa.array([self.cfg.source_prefix + (s or "") for s in src], pa.string()),
            "valence": col("valence", pa.float32()),
            "arousal": col("arousal", pa.float32()),
            "landmarks": col("landmarks", IMAGE_SCHEMA.field("landmarks").type),
            "best_similarity": pa.array(cat(best).astype(np.float32), pa.float32()),
            "margin": pa.array(cat(gap).astype(np.float32), pa.float32()),
        }
        return pa.table(arrays, schema=AUX_SCHEMA)

    def _rejects(self, table: pa.Table, rejects: list[tuple[int, str]]) -> pa.Table:
        ids = table.column("id").to_pylist() if rejects else []
        src = table.column("source").to_pylist() if rejects and "source" in table.schema.names else None
        return pa.table({
            "id": pa.array([str(ids[i]) for i, _ in rejects], pa.string()),
            "reason": pa.array([r for _, r in rejects], pa.string()),
            "source": pa.array([(src[i] if src else "") or "" for i, _ in rejects], pa.string()),
        }, schema=REJECTS_SCHEMA)


def build_processor(checkpoint_uri: str, centroids_uri: str, cfg: MineConfig) -> MineProcessor:
    """Load the model and centroids (once per actor) and return the per-shard processor."""
    from tasks.omni.centroids import input_size_of, load_centroids
    from tasks.device import resolve_device
    from tasks.engine.checkpoint import load_checkpoint

    if cfg.torch_threads:
        torch.set_num_threads(int(cfg.torch_threads))
    device = resolve_device(cfg.device)
    model, meta = load_checkpoint(checkpoint_uri, device=device)
    labels, cents = load_centroids(centroids_uri)
    if cents.shape[1] != model.feature_dim:
        raise ValueError(
            f"centroids in {centroids_uri} have {cents.shape[1]} dimensions but {checkpoint_uri} gives "
            f"{model.feature_dim}-dimensional features: compute the centroids with the same checkpoint"
        )
    return MineProcessor(
        model, cents, labels, cfg, input_size=input_size_of(meta, cfg.input_size),
        mean=meta.get("mean", (0.5, 0.5, 0.5)), std=meta.get("std", (0.5, 0.5, 0.5)), device=device,
    )


def pool_columns(schema_names: Sequence[str]) -> list[str]:
    """The pool columns the processor needs that the pool actually has."""
    missing = {"id", "image"} - set(schema_names)
    if missing:
        raise ValueError(f"the pool is not an image table: no {', '.join(sorted(missing))} column")
    return [c for c in POOL_COLUMNS if c in schema_names]
