"""Synthetic label noise for evaluating noise-robust training (Progressive Teacher, Section 4).

Two kinds, as in the paper:

* ``symmetric``: in every class, a ``rate`` fraction of its samples (chosen at random) is
  relabelled uniformly to one of the *other* classes (Section 4.3.2, "Uniform Noise", following SCN).
* ``asymmetric``: a ``rate`` fraction of ``fear`` becomes ``surprise`` and the same fraction of
  ``surprise`` becomes ``fear`` -- the pair annotators confuse (open mouth, widened eyes).

The definition itself (which samples, which new labels) is ``storage.label_noise.corrupt_labels``,
shared with the synthetic generator's own ``label_noise`` option: one implementation, not two.
The noisy table keeps the true label in a ``clean_label`` column, so that later stages can
measure which samples a method filtered out, and records the noise spec in its manifest
(``config`` and ``extra["label_noise"]``) so that every run trained on it knows what it was.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.artifact import Artifact, ArtifactWriter, Manifest, is_finished
from storage.label_noise import ASYMMETRIC_PAIRS, NOISE_KINDS, check_noise, corrupt_labels
from storage.schema import CLASSES, NUM_CLASSES

KINDS = ("none", *NOISE_KINDS)
CLEAN_LABEL = "clean_label"
STAGE = "label_noise"


@dataclass(frozen=True)
class NoiseSpec:
    """What was done to the labels; stored in the noisy table's manifest."""

    kind: str = "symmetric"  # none | symmetric | asymmetric
    rate: float = 0.0  # fraction of each affected class that is relabelled
    seed: int = 0
    splits: tuple[str, ...] | None = ("train",)  # only these splits are corrupted (None = every split)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown label-noise kind {self.kind!r}; choose one of: {', '.join(KINDS)}")
        check_noise("symmetric", self.rate)


def symmetric_noise(labels: np.ndarray, rate: float, seed: int, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Relabel ``round(rate * n_c)`` random samples of each class c uniformly to the other classes.

    Entries < 0 (unlabeled) are left alone. Returns a new array; the input is not modified.
    """
    return corrupt_labels(labels, "symmetric", rate, np.random.default_rng(seed), num_classes)


def asymmetric_noise(labels: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """Relabel ``round(rate * n)`` random samples of fear as surprise and as many of surprise as fear."""
    return corrupt_labels(labels, "asymmetric", rate, np.random.default_rng(seed))


def apply_noise(labels: np.ndarray, kind: str, rate: float, seed: int, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Dispatch on ``kind`` (none | symmetric | asymmetric); ``none`` returns a copy."""
    NoiseSpec(kind, rate, seed)
    if kind == "none":
        return np.asarray(labels, dtype=np.int64).copy()
    return corrupt_labels(labels, kind, rate, np.random.default_rng(seed), num_classes)


def noise_summary(clean: np.ndarray, noisy: np.ndarray, num_classes: int = NUM_CLASSES) -> dict[str, Any]:
    """Counts recorded beside the spec: how many labels changed, per clean class, and the transitions."""
    clean = np.asarray(clean, dtype=np.int64)
    noisy = np.asarray(noisy, dtype=np.int64)
    labeled = clean >= 0
    flipped = labeled & (clean != noisy)
    trans = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(trans, (clean[labeled], noisy[labeled]), 1)
    per_class = Counter(int(c) for c in clean[flipped])
    return {
        "labeled": int(labeled.sum()),
        "flipped": int(flipped.sum()),
        "actual_rate": float(flipped.sum() / max(1, labeled.sum())),
        "flipped_per_class": {CLASSES[c] if c < len(CLASSES) else str(c): int(per_class.get(c, 0))
                              for c in range(num_classes)},
        "transitions": trans.tolist(),  # rows: clean label, columns: noisy label
    }


def noise_spec(uri: str) -> dict[str, Any] | None:
    """The label-noise record of an image table, or None when its labels were not corrupted on purpose.

    Tables from :func:`inject_noise` carry it in ``extra["label_noise"]``; a table the synthetic
    generator wrote with its own ``label_noise`` option records ``label_noise`` (the rate) and
    ``noise_kind`` in its config, which is read the same way.
    """
    m = Artifact(uri).manifest
    spec = m.extra.get("label_noise")
    if isinstance(spec, dict):
        return spec
    for cfg in (m.config, m.config.get("options") if isinstance(m.config.get("options"), dict) else {}):
        rate = cfg.get("label_noise")
        if isinstance(rate, dict) and "kind" in rate:
            return rate
        try:
            rate = float(rate)
        except (TypeError, ValueError):
            continue
        if rate > 0:
            return {"kind": str(cfg.get("noise_kind", "symmetric")), "rate": rate,
                    "seed": cfg.get("seed"), "splits": cfg.get("noisy_splits", ["train"])}
    return None


def inject_noise(table_uri: str, out_uri: str, kind: str, rate: float, seed: int = 0,
                 splits: Sequence[str] | None = ("train",)) -> Manifest:
    """Write a copy of an image table whose labels (in ``splits``) carry synthetic noise.

    The output has the input's columns plus ``clean_label`` (the label before corruption; an
    input that already has one keeps it, so noise can be stacked). Rows, order and shards are
    kept. Noise is drawn per class over all selected rows together, not per shard. A finished
    output made by the same call is reused; one made differently is refused.
    """
    spec = NoiseSpec(kind, float(rate), int(seed), tuple(splits) if splits is not None else None)
    src = Artifact(table_uri)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items()}
    inputs = {"table": src.digest}
    if is_finished(out_uri):
        done = Artifact(out_uri).manifest
        if done.stage == STAGE and done.config == config and done.inputs == inputs:
            return done
        raise FileExistsError(
            f"{out_uri} already holds a different artifact (stage {done.stage!r}, config {done.config}); "
            "choose another output or delete it"
        )
    names = src.schema.names
    if "label" not in names:
        raise ValueError(f"{table_uri} has no 'label' column; label noise needs an image table with labels")

    # Pass 1: labels only (cheap), so noise is drawn over the whole selection at once.
    cols = ["label"] + (["split"] if "split" in names else []) + ([CLEAN_LABEL] if CLEAN_LABEL in names else [])
    meta = src.read(cols)
    labels = np.array([-1 if v is None else v for v in meta.column("label").to_pylist()], dtype=np.int64)
    if spec.splits is not None:
        if "split" not in names:
            raise ValueError(f"{table_uri} has no 'split' column; pass splits=None to corrupt every row")
        selected = pc.is_in(meta.column("split"), value_set=pa.array(list(spec.splits))).to_numpy(
            zero_copy_only=False)
        selected = np.asarray(selected, dtype=bool)
    else:
        selected = np.ones(len(labels), dtype=bool)
    if not (selected & (labels >= 0)).any():
        where = f" in split(s) {list(spec.splits)}" if spec.splits is not None else ""
        raise ValueError(f"{table_uri} has no labeled rows{where} to add noise to")
    noisy = labels.copy()
    noisy[selected] = apply_noise(labels[selected], spec.kind, spec.rate, spec.seed)
    if CLEAN_LABEL in names:
        clean = np.array([-1 if v is None else v for v in meta.column(CLEAN_LABEL).to_pylist()], dtype=np.int64)
    else:
        clean = labels
    summary = noise_summary(clean[selected], noisy[selected])

    # Pass 2: stream the shards, swapping the label column and adding clean_label.
    schema = src.schema
    if CLEAN_LABEL not in names:
        schema = schema.append(pa.field(CLEAN_LABEL, pa.int8()))
    label_type = schema.field("label").type
    rows_per_shard = max(1, src.manifest.shards[0].rows) if src.num_shards else 1024
    offset = 0
    with ArtifactWriter(out_uri, stage=STAGE, config=config, inputs=inputs,
                        rows_per_shard=rows_per_shard, schema=schema) as w:
        for i in range(src.num_shards):
            t = src.read_shard(i)
            n = t.num_rows
            new = noisy[offset:offset + n]
            cl = clean[offset:offset + n]
            label_col = pa.array([None if v < 0 else int(v) for v in new], type=label_type)
            t = t.set_column(t.schema.get_field_index("label"), "label", label_col)
            clean_col = pa.array([None if v < 0 else int(v) for v in cl], type=pa.int8())
            if CLEAN_LABEL in t.schema.names:
                t = t.set_column(t.schema.get_field_index(CLEAN_LABEL), CLEAN_LABEL, clean_col)
            else:
                t = t.append_column(CLEAN_LABEL, clean_col)
            w.write(t)
            offset += n
        record = {**config, **summary}
        return w.commit(extra={"label_noise": record})


__all__ = ["ASYMMETRIC_PAIRS", "CLEAN_LABEL", "KINDS", "NoiseSpec", "apply_noise", "asymmetric_noise",
           "inject_noise", "noise_spec", "noise_summary", "symmetric_noise"]
