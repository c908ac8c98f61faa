"""Batch sources of labeled image tables: decoded once into memory, or streamed from the shards.

Both yield uint8 (images, labels) batches whose order is a function of (seed, epoch) only
(tasks.engine.seeding), so an epoch replays identically after a resume. Images stay uint8 until the
device, where methods flip and normalise them (4x less to copy).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from storage.artifact import Artifact
from tasks.data import batch_to_imageset
from tasks.engine.seeding import ORDER, WORKER, generator

if TYPE_CHECKING:
    from tasks.train import TrainConfig

__all__ = ["MemorySource", "ShardStream", "StreamSource", "check_image_table", "count_labels", "labeled_mask",
           "labeled_source", "load_labeled"]


def labeled_mask(batch: pa.RecordBatch, splits: Sequence[str] | None) -> pa.Array:
    """Rows in ``splits`` with a label >= 0 (null = unlabeled)."""
    label = batch.column("label")
    mask = pc.fill_null(pc.greater_equal(label, 0), False)
    if splits is not None:
        mask = pc.and_(mask, pc.is_in(batch.column("split"), value_set=pa.array(list(splits))))
    return mask


def check_image_table(uri: str) -> Artifact:
    art = Artifact(uri)
    missing = [c for c in ("image", "label", "split") if c not in art.schema.names]
    if missing:
        raise ValueError(f"{uri} is not an image table (no column(s) {missing}); train on the output of ingest/align")
    return art


def load_labeled(uri: str, size: int, splits: Sequence[str] | None, num_classes: int,
                 threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Decode the labeled rows of ``splits`` into (uint8 N x 3 x size x size, int64 labels, unlabeled count).

    Decoding runs on a thread pool (OpenCV releases the GIL), one record batch per task, in order.
    """
    art = check_image_table(uri)
    cols = ["id", "image", "label", "split"]
    unlabeled = 0
    batches: list[pa.RecordBatch] = []
    for b in art.iter_batches(columns=cols, batch_size=256):
        in_split = b if splits is None else b.filter(pc.is_in(b.column("split"), value_set=pa.array(list(splits))))
        kept = in_split.filter(labeled_mask(in_split, None))
        unlabeled += in_split.num_rows - kept.num_rows
        if kept.num_rows:
            batches.append(kept)
    threads = threads or max(1, min(16, os.cpu_count() or 1))
    with ThreadPoolExecutor(threads) as pool:
        sets = list(pool.map(lambda b: batch_to_imageset(b, size), batches))
    if not sets:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8), torch.zeros(0, dtype=torch.long), unlabeled
    images = torch.cat([s.images for s in sets])
    labels = torch.cat([s.labels for s in sets])
    if (labels >= num_classes).any():
        raise ValueError(f"{uri} has labels up to {int(labels.max())} but the model has {num_classes} classes")
    return images, labels, unlabeled


class MemorySource:
    """Pre-decoded uint8 images (on the device when they fit there): batches are index gathers."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, device: torch.device):
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if images.numel() < 0.25 * free:
                images, labels = images.to(device), labels.to(device)
            else:
                images, labels = images.pin_memory(), labels.pin_memory()
        self.images, self.labels = images, labels
        self.batch_size, self.seed = batch_size, seed
        self.n = len(labels)
        self.class_counts: torch.Tensor | None = None  # set by labeled_source, which knows num_classes
        self.mode = "memory"

    def steps(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(self.n, generator=generator(self.seed, epoch, ORDER))
        order = order.to(self.images.device)
        for i in range(0, self.n, self.batch_size):
            idx = order[i: i + self.batch_size]
            if len(idx) < 2:  # batch norm cannot train on a single sample
                break
            yield self.images[idx], self.labels[idx]


class ShardStream(torch.utils.data.IterableDataset):
    """Labeled rows of image-table shards, decoded in DataLoader workers, shuffled through a buffer.

    Yields whole uint8 batches (DataLoader ``batch_size=None``): collating single images in Python
    would cost more than decoding them. Each epoch permutes the shard order; worker w takes every
    nw-th shard; each worker shuffles with its own (seed, epoch, w) generator. The DataLoader
    interleaves workers in a fixed order, so an epoch is a function of (seed, epoch, num_workers).
    """

    def __init__(self, shards: Sequence[tuple[str, int]], size: int, splits: Sequence[str] | None,
                 batch_size: int, seed: int, shuffle_buffer: int, num_classes: int):
        self.shards = list(shards)
        self.size, self.splits = size, splits
        self.batch_size, self.seed = batch_size, seed
        self.shuffle_buffer, self.num_classes = shuffle_buffer, num_classes
        self.epoch = 0
        self.shared_epoch = None  # multiprocessing.Value when workers persist across epochs

    def _decode(self, uri: str, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        table = Artifact(uri).read_shard(index, ["id", "image", "label", "split"])
        parts_x, parts_y = [], []
        for b in table.to_batches(max_chunksize=256):
            b = b.filter(labeled_mask(b, self.splits))
            if b.num_rows:
                s = batch_to_imageset(b, self.size)
                parts_x.append(s.images)
                parts_y.append(s.labels)
        if not parts_x:
            return torch.zeros((0, 3, self.size, self.size), dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
        y = torch.cat(parts_y)
        if (y >= self.num_classes).any():
            raise ValueError(f"{uri} has labels up to {int(y.max())} but the model has {self.num_classes} classes")
        return torch.cat(parts_x), y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        import cv2

        cv2.setNumThreads(1)  # one decode thread per worker: the workers are the parallelism
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.shared_epoch.value if self.shared_epoch is not None else self.epoch
        order = torch.randperm(len(self.shards), generator=generator(self.seed, epoch, ORDER)).tolist()
        mine = [self.shards[i] for i in order[wid::nw]]
        gen = generator(self.seed, epoch, WORKER, wid)
        buf_x = torch.zeros((0, 3, self.size, self.size), dtype=torch.uint8)
        buf_y = torch.zeros(0, dtype=torch.long)
        bs = self.batch_size
        for uri, index in mine:
            x, y = self._decode(uri, index)
            buf_x, buf_y = torch.cat([buf_x, x]), torch.cat([buf_y, y])
            if len(buf_y) >= self.shuffle_buffer:
                perm = torch.randperm(len(buf_y), generator=gen)
                buf_x, buf_y = buf_x[perm], buf_y[perm]
                # Emit down to half a buffer: every image is copied about twice, yet each batch mixes
                # images from several shards.
                k = max(1, (len(buf_y) - self.shuffle_buffer // 2) // bs)
                for i in range(k):
                    yield buf_x[i * bs:(i + 1) * bs].clone(), buf_y[i * bs:(i + 1) * bs].clone()
                buf_x, buf_y = buf_x[k * bs:], buf_y[k * bs:]
        perm = torch.randperm(len(buf_y), generator=gen)
        buf_x, buf_y = buf_x[perm], buf_y[perm]
        for i in range(0, len(buf_y), bs):
            if len(buf_y) - i >= 2:
                yield buf_x[i:i + bs], buf_y[i:i + bs]


class StreamSource:
    """DataLoader over :class:`ShardStream`; workers persist across epochs (no re-spawn per epoch).

    Persistent workers keep their copy of the dataset, so the epoch reaches them through a value in
    shared memory, read when each epoch's iteration starts in the worker.
    """

    def __init__(self, uris: Sequence[str], cfg: "TrainConfig", num_workers: int, device: torch.device,
                 class_counts: torch.Tensor | None, rows: int):
        shards = [(u, i) for u in uris for i in range(Artifact(u).num_shards)]
        self.dataset = ShardStream(shards, cfg.input_size, cfg.train_splits, cfg.batch_size, cfg.seed,
                                   cfg.shuffle_buffer, cfg.num_classes)
        self.num_workers = num_workers
        # Spawned, not forked: a child forked from a process whose OpenCV, TensorFlow or Ray threads
        # are running inherits their locks held and hangs in its first cv2 call (seen with cv2's pool).
        ctx = torch.multiprocessing.get_context("spawn") if num_workers else None
        if ctx is not None:
            self.dataset.shared_epoch = ctx.Value("q", 0)
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, num_workers=num_workers, pin_memory=device.type == "cuda",
            prefetch_factor=4 if num_workers else None, persistent_workers=num_workers > 0,
            multiprocessing_context=ctx,
        )
        self.batch_size = cfg.batch_size
        self.n = rows
        self.class_counts = class_counts
        self.mode = "stream"

    def steps(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.dataset.epoch = epoch
        if self.dataset.shared_epoch is not None:
            self.dataset.shared_epoch.value = epoch
        yield from self.loader


def count_labels(uris: Sequence[str], splits: Sequence[str], num_classes: int) -> tuple[torch.Tensor, int]:
    counts = torch.zeros(num_classes, dtype=torch.long)
    unlabeled = 0
    for u in uris:
        for b in Artifact(u).iter_batches(columns=["label", "split"], batch_size=65536):
            b = b.filter(pc.is_in(b.column("split"), value_set=pa.array(list(splits))))
            m = labeled_mask(b, None)
            lab = b.filter(m).column("label").to_numpy(zero_copy_only=False).astype(np.int64)
            unlabeled += b.num_rows - len(lab)
            if len(lab) and lab.max() >= num_classes:
                raise ValueError(f"{u} has labels up to {int(lab.max())} but the model has {num_classes} classes")
            counts += torch.bincount(torch.from_numpy(lab), minlength=num_classes)
    return counts, unlabeled


def labeled_source(cfg: "TrainConfig", uris: Sequence[str], device: torch.device):
    arts = [check_image_table(u) for u in uris]
    rows = sum(len(a) for a in arts)
    mode = cfg.data
    if mode == "auto":
        mode = "memory" if rows * 3 * cfg.input_size ** 2 <= cfg.memory_limit_mb * 2 ** 20 else "stream"
    if mode == "memory":
        parts = [load_labeled(u, cfg.input_size, cfg.train_splits, cfg.num_classes) for u in uris]
        images = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        unlabeled = sum(p[2] for p in parts)
        src = MemorySource(images, labels, cfg.batch_size, cfg.seed, device)
        src.class_counts = torch.bincount(labels, minlength=cfg.num_classes)
        return src, unlabeled
    workers = cfg.num_workers if cfg.num_workers is not None else min(8, max(1, (os.cpu_count() or 2) - 1))
    # One cheap pass over the label/split columns: exact counts for class weights and progress totals.
    counts, unlabeled = count_labels(uris, cfg.train_splits, cfg.num_classes)
    src = StreamSource(uris, cfg, workers, device, counts, int(counts.sum()))
    return src, unlabeled


