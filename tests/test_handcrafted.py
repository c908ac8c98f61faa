"""Handcrafted features (GABOR, GSF, dense SIFT): shapes, projections, the artifact and its reuse."""

import cv2
import numpy as np
import pytest

from storage.ingest import write_image_table
from storage.synthetic import SyntheticConfig, generate
from tasks.data import decode_resized
from tasks.featloss.handcrafted import (
    HandcraftedConfig,
    PatchProjection,
    _gray,
    compute_features,
    dense_sift,
    feature_dims,
    fit_projection,
    gabor_bank,
    gabor_histograms,
    load_features,
    load_projection,
)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("hc") / "table")
    cfg = SyntheticConfig(size=32, train_per_class=6, val_per_class=1, test_per_class=2, pool_size=0, n_identities=12)
    write_image_table(generate(cfg), uri, stage="ingest", config={"tiny": 1})
    return uri


CFG = HandcraftedConfig(size=32, gabor_grid=2, gsf_grid=2, sift_grid=2)


@pytest.fixture(scope="module")
def features(table, tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("hcf") / "features")
    compute_features(table, uri, CFG)
    return uri


def test_gabor_bank_and_histograms_have_the_papers_layout(rng):
    bank = gabor_bank(32)
    assert len(bank) == 8 * 4  # 8 scales x 4 orientations
    gray = (rng.random((32, 32)) * 255).astype(np.uint8)
    h = gabor_histograms(gray, 3, bank=bank)
    assert h.shape == (9, 8 * 4 * 16)  # n*n patches x (maps x 16 bins)
    # each map's 16-bin histogram in each patch is a distribution
    np.testing.assert_allclose(h.reshape(9, 32, 16).sum(axis=2), 1.0, atol=1e-5)


def test_gabor_orientation_is_encoded(rng):
    # vertical stripes vs horizontal stripes: the same picture turned by 90 degrees must not give the same feature
    x = np.arange(32)
    stripes = ((np.sin(x / 2.0) > 0) * 200 + 20).astype(np.uint8)
    vert = np.tile(stripes, (32, 1))
    hor = np.ascontiguousarray(vert.T)
    hv, hh = gabor_histograms(vert, 2), gabor_histograms(hor, 2)
    assert np.abs(hv - hh).sum() > 1.0
    # the horizontal-stripe features are the vertical ones with orientations permuted (0 <-> 90 degrees)
    perm = hv.reshape(4, 8, 4, 16)[:, :, [2, 1, 0, 3]]
    assert np.abs(perm.reshape(4, -1) - hh).sum() < np.abs(hv - hh).sum()


def test_dense_sift_is_opencv_sift_on_a_grid(rng):
    gray = (rng.random((32, 32)) * 255).astype(np.uint8)
    d = dense_sift(gray, 4)
    assert d.shape == (16, 128)
    _, ref = cv2.SIFT_create().compute(gray, [cv2.KeyPoint(4.0, 4.0, 8.0)])
    np.testing.assert_allclose(d[0], ref[0], atol=1e-4)
    with pytest.raises(ValueError, match="square 2-D"):
        dense_sift(np.zeros((32, 30), np.uint8), 4)


def test_projection_is_per_patch_pca_then_lda_to_classes_minus_one(rng):
    k, n, patches, d = 4, 120, 3, 20
    labels = rng.integers(0, k, n)
    means = rng.normal(0, 3, (k, patches, d))
    x = means[labels] + rng.normal(0, 1, (n, patches, d))
    proj = fit_projection(x, labels, 0.99)
    out = proj.transform(x)
    assert out.shape == (n, patches * (k - 1)) and proj.out_dim == patches * (k - 1)
    # the projection is discriminative: nearest class mean in the projected space recovers the labels
    cm = np.stack([out[labels == c].mean(0) for c in range(k)])
    pred = np.argmin(((out[:, None] - cm[None]) ** 2).sum(-1), axis=1)
    assert (pred == labels).mean() > 0.9
    again = PatchProjection.from_npz(proj.to_npz())
    np.testing.assert_allclose(again.transform(x), out, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="at least 2 classes"):
        fit_projection(x, np.zeros(n, int))


def test_features_artifact_one_row_per_image_with_all_kinds(table, features):
    from storage.artifact import Artifact

    art = Artifact(features)
    assert len(art) == len(Artifact(table)) == 7 * 9
    dims = feature_dims(features)
    assert dims == {"gabor": 512 * 4, "gsf": 6 * 4, "sift": 6 * 4}
    for kind, dim in dims.items():
        ids, mat = load_features(features, kind)
        _, flip = load_features(features, kind, flip=True)
        assert mat.shape == flip.shape == (63, dim) and len(set(ids)) == 63
        assert np.isfinite(mat).all() and np.abs(mat - flip).sum() > 0  # the mirror is not the same face
    # stored GSF = the saved projection applied to the image's Gabor histograms (same code path for new images)
    t = Artifact(table).read(columns=["id", "image"])
    first_id, img = t.column("id")[0].as_py(), t.column("image")[0].as_py()
    g = _gray(decode_resized(img, 32), 32)
    expect = load_projection(features, "gsf").transform(gabor_histograms(g, 2)[None])[0]
    _, got = load_features(features, "gsf", [first_id])
    np.testing.assert_allclose(got[0], expect, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="have no features"):
        load_features(features, "gsf", ["no-such-id"])


def test_features_are_computed_once_then_reused(table, features, monkeypatch):
    import tasks.featloss.handcrafted as hc
    from storage.artifact import Artifact

    before = Artifact(features).manifest

    def boom(self, gray):
        raise AssertionError("features were recomputed")

    monkeypatch.setattr(hc._Extractor, "__call__", boom)
    again = compute_features(table, features, CFG)
    assert again.created == before.created and again.digest == before.digest
    with pytest.raises(ValueError, match="another table or configuration"):
        compute_features(table, features, HandcraftedConfig(size=32, gabor_grid=3, gsf_grid=2, sift_grid=2))


def test_bad_settings_are_clear_errors(table, tmp_path):
    with pytest.raises(ValueError, match="gabor_grid must be between"):
        HandcraftedConfig(size=32, gabor_grid=20)
    with pytest.raises(ValueError, match="no labeled rows in the fit split"):
        compute_features(table, str(tmp_path / "f"), HandcraftedConfig(size=32, gabor_grid=2, gsf_grid=2, sift_grid=2,
                                                                        fit_splits=("nope",)))
