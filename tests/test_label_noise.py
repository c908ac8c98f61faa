"""Label-noise injection (Progressive Teacher, Section 4.3.2): symmetric and fear<->surprise asymmetric."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from storage.artifact import Artifact, ArtifactWriter
from storage.images import encode
from storage.label_noise import corrupt_labels
from storage.schema import CLASS_INDEX, IMAGE_SCHEMA, NUM_CLASSES, image_row
from tasks.pt.label_noise import (CLEAN_LABEL, apply_noise, asymmetric_noise, inject_noise, noise_spec,
                               symmetric_noise)

FEAR, SURPRISE = CLASS_INDEX["fear"], CLASS_INDEX["surprise"]


def _balanced(per_class: int) -> np.ndarray:
    return np.repeat(np.arange(NUM_CLASSES), per_class)


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.3, 0.5])
def test_symmetric_flips_exact_fraction_of_every_class_to_other_classes(rate):
    clean = _balanced(40)
    noisy = symmetric_noise(clean, rate, seed=1)
    for c in range(NUM_CLASSES):
        idx = clean == c
        assert (noisy[idx] != c).sum() == round(rate * 40)
    changed = noisy != clean
    assert (noisy[changed] != clean[changed]).all()  # a flipped label is never its own class
    assert noisy.min() >= 0 and noisy.max() < NUM_CLASSES


def test_symmetric_targets_are_uniform_over_the_other_classes():
    clean = np.full(60000, 2)
    noisy = symmetric_noise(clean, 0.6, seed=0)
    counts = np.bincount(noisy[noisy != 2], minlength=NUM_CLASSES)
    assert counts[2] == 0
    others = np.delete(counts, 2)
    expected = 36000 / 6
    chi2 = float(((others - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # chi-square, 5 dof, p ~ 0.001


def test_asymmetric_swaps_only_fear_and_surprise():
    clean = _balanced(50)
    noisy = asymmetric_noise(clean, 0.3, seed=3)
    changed = noisy != clean
    assert set(np.unique(clean[changed])) == {FEAR, SURPRISE}
    assert (noisy[changed & (clean == FEAR)] == SURPRISE).all()
    assert (noisy[changed & (clean == SURPRISE)] == FEAR).all()
    assert (changed & (clean == FEAR)).sum() == 15 and (changed & (clean == SURPRISE)).sum() == 15


def test_noise_is_seeded_and_leaves_unlabeled_rows_alone():
    clean = np.concatenate([_balanced(30), np.full(20, -1)])
    a = apply_noise(clean, "symmetric", 0.3, seed=7)
    b = apply_noise(clean, "symmetric", 0.3, seed=7)
    c = apply_noise(clean, "symmetric", 0.3, seed=8)
    assert (a == b).all() and (a != c).any()
    assert (a[-20:] == -1).all()
    assert (apply_noise(clean, "none", 0.3, seed=7) == clean).all()
    assert (apply_noise(clean, "symmetric", 0.0, seed=7) == clean).all()


@pytest.mark.parametrize("kind,rate", [("uniform", 0.1), ("symmetric", 1.5), ("asymmetric", -0.1)])
def test_bad_spec_is_a_clear_error(kind, rate):
    with pytest.raises(ValueError, match="label-noise"):
        apply_noise(_balanced(5), kind, rate, seed=0)


def test_synthetic_generator_noise_follows_the_same_definition():
    """The generator's own label_noise option gives the same per-class counts and pairs as injection."""
    from storage.synthetic import SyntheticConfig, sample_truth

    for kind in ("symmetric", "asymmetric"):
        cfg = SyntheticConfig(train_per_class=20, test_per_class=0, pool_size=0, label_noise=0.3, noise_kind=kind)
        truth = [t for t in sample_truth(cfg).values() if t.split == "train"]
        clean = np.array([t.clean_label for t in truth])
        given = np.array([t.label for t in truth])
        for c in range(NUM_CLASSES):
            flips = int(((clean == c) & (given != c)).sum())
            affected = kind == "symmetric" or c in (FEAR, SURPRISE)
            assert flips == (round(0.3 * 20) if affected else 0)
        if kind == "asymmetric":
            assert set(given[(clean == FEAR) & (given != FEAR)]) == {SURPRISE}
        # Same RNG stream in -> same labels out: the shared function reproduces any seeded draw.
        rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
        assert (corrupt_labels(clean, kind, 0.3, rng_a) == corrupt_labels(clean, kind, 0.3, rng_b)).all()


def _table(uri: str, per_class: int = 10, test_per_class: int = 2, pool: int = 3) -> None:
    img = encode(np.zeros((8, 8, 3), np.uint8))
    rows = []
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c in range(NUM_CLASSES):
            for i in range(n):
                rows.append(image_row(f"{split}/{c}/{i}", img, label=c, split=split, source="t"))
    rows += [image_row(f"pool/{i}", img, label=None, split="pool", source="t") for i in range(pool)]
    with ArtifactWriter(uri, stage="ingest", rows_per_shard=25, schema=IMAGE_SCHEMA) as w:
        w.write_rows(rows)


def test_inject_noise_writes_noisy_table_with_clean_labels_and_spec(tmp_path):
    src, out = str(tmp_path / "clean"), str(tmp_path / "noisy")
    _table(src)
    m = inject_noise(src, out, "symmetric", 0.3, seed=0)
    a, b = Artifact(src).read(), Artifact(out).read()
    assert b.column("id").to_pylist() == a.column("id").to_pylist()  # order kept
    assert b.column("image").to_pylist() == a.column("image").to_pylist()
    assert CLEAN_LABEL in b.schema.names
    assert b.column(CLEAN_LABEL).to_pylist() == a.column("label").to_pylist()
    split = np.array(b.column("split").to_pylist())
    new = np.array([-1 if v is None else v for v in b.column("label").to_pylist()])
    old = np.array([-1 if v is None else v for v in a.column("label").to_pylist()])
    assert (new[split != "train"] == old[split != "train"]).all()  # test and pool untouched
    assert (new[split == "train"] != old[split == "train"]).sum() == NUM_CLASSES * 3
    spec = noise_spec(out)
    assert spec == m.extra["label_noise"]
    assert spec["kind"] == "symmetric" and spec["rate"] == 0.3 and spec["seed"] == 0 and spec["flipped"] == 21
    assert m.config["splits"] == ["train"] and m.inputs["table"] == Artifact(src).digest
    assert noise_spec(src) is None
    # Same call again reuses the artifact; a different call refuses to overwrite it.
    assert inject_noise(src, out, "symmetric", 0.3, seed=0).digest == m.digest
    with pytest.raises(FileExistsError, match="different artifact"):
        inject_noise(src, out, "symmetric", 0.2, seed=0)


def test_inject_noise_stacks_and_keeps_the_original_clean_label(tmp_path):
    src, n1, n2 = (str(tmp_path / n) for n in ("clean", "n1", "n2"))
    _table(src, per_class=20)
    inject_noise(src, n1, "asymmetric", 0.5, seed=0)
    inject_noise(n1, n2, "symmetric", 0.2, seed=1)
    a, c = Artifact(src).read(), Artifact(n2).read()
    assert c.column(CLEAN_LABEL).to_pylist() == a.column("label").to_pylist()
    assert c.schema.field(CLEAN_LABEL).type == pa.int8()


def test_inject_noise_reports_missing_labels(tmp_path):
    src = str(tmp_path / "pool_only")
    img = encode(np.zeros((8, 8, 3), np.uint8))
    with ArtifactWriter(src, stage="ingest", schema=IMAGE_SCHEMA) as w:
        w.write_rows([image_row("p0", img, label=None, split="pool")])
    with pytest.raises(ValueError, match="no labeled rows"):
        inject_noise(src, str(tmp_path / "out"), "symmetric", 0.1, seed=0)
