"""The align stage on real photos shipped by scikit-image (astronaut, LFW subset).

MTCNN (TensorFlow) takes seconds to load, so one detector is shared by the module.
LFW subset images are 25 x 25 gray crops where the face fills the frame; MTCNN cannot find a face
that fills a 25 px image, so those tests use the stage's own ``detect_upscale_to`` option (upscale
for detection only, warp from the original pixels) -- the same thing a user does for low-res data.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from skimage import data

import cv2
from storage import Artifact, ArtifactWriter, ShardedWriter
from storage.images import decode, encode
from storage.schema import IMAGE_SCHEMA, REJECTS_SCHEMA, image_row
from tasks.align import (
    ALIGNED_SCHEMA,
    AlignConfig,
    align_face,
    align_record,
    align_table,
    apply_transform,
    choose_face,
    detect_and_align,
    detect_faces,
    make_detector,
    reject_category,
    similarity_transform,
    template,
    warp,
)


@pytest.fixture(scope="module")
def detector():
    return make_detector(threads=1)


@pytest.fixture(scope="module")
def astronaut():
    return data.astronaut()


@pytest.fixture(scope="module")
def lfw():
    imgs = data.lfw_subset()  # 200 x 25 x 25 float in [0, 1]: 100 faces, then 100 non-faces
    return np.stack([(imgs * 255).round().astype(np.uint8)] * 3, axis=-1)


def _eye_errors(points: np.ndarray, size: int) -> np.ndarray:
    """Distance of the left and right eye from the template's eyes, in pixels of a 112 crop."""
    return np.linalg.norm(np.asarray(points)[:2] - template(size)[:2], axis=1) * 112 / size


class _NoDetector:
    """Stands in where detection must NOT happen: calling it fails the test."""

    def detect_faces(self, *a, **k):
        raise AssertionError("the detector was called although the row has landmarks")


def _row(id, rgb_or_bytes, **kw):
    img = rgb_or_bytes if isinstance(rgb_or_bytes, bytes) else encode(rgb_or_bytes)
    return image_row(id, img, label=kw.pop("label", 4), source=kw.pop("source", "photos"), **kw)


# ---------------------------------------------------------------- geometry (no detector)


def test_config_rejects_bad_options():
    for bad in (dict(detect="sometimes"), dict(size=8), dict(image_format=".gif"), dict(min_confidence=2.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            AlignConfig(**bad)


def test_template_scales_with_output_size():
    assert np.allclose(template(224), 2 * template(112))
    assert np.allclose(template(112)[0], [38.2946, 51.6963])


def test_similarity_transform_recovers_a_known_similarity_and_matches_skimage(rng):
    from skimage.transform import SimilarityTransform

    src = rng.uniform(0, 200, size=(5, 2))
    angle, scale, t = 0.3, 0.7, np.array([12.0, -5.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = scale * src @ rot.T + t
    m = similarity_transform(src, dst)
    assert np.allclose(apply_transform(m, src), dst, atol=1e-9)
    # With noise it is the least-squares similarity, as scikit-image (insightface's estimator) finds.
    noisy = dst + rng.normal(0, 2, dst.shape)
    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        ref = SimilarityTransform.from_estimate(src, noisy)
    else:
        ref = SimilarityTransform()
        assert ref.estimate(src, noisy)
    assert np.allclose(similarity_transform(src, noisy), ref.params[:2], atol=1e-6)
    with pytest.raises(ValueError, match="same point"):
        similarity_transform(np.ones((5, 2)), dst)
    with pytest.raises(ValueError, match="NaN"):
        similarity_transform(np.full((5, 2), np.nan), dst)


def test_shrinking_warp_keeps_points_where_the_matrix_sends_them():
    # A large image shrunk 5x takes the low-pass path; a bright dot must land where the matrix says.
    img = np.zeros((600, 800, 3), np.uint8)
    p = np.array([[412.0, 287.0]])
    cv2.circle(img, (412, 287), 6, (255, 255, 255), -1)
    m = np.array([[0.2, 0.0, 10.0], [0.0, 0.2, 7.0]])
    out = warp(img, m, 112)[..., 0].astype(float)
    ys, xs = np.nonzero(out)
    centroid = np.array([(xs * out[ys, xs]).sum(), (ys * out[ys, xs]).sum()]) / out[ys, xs].sum()
    assert np.allclose(centroid, apply_transform(m, p)[0], atol=0.3)


# ---------------------------------------------------------------- real photos


@pytest.mark.parametrize("size", [112, 224])
def test_astronaut_eyes_land_on_the_template(detector, astronaut, size):
    faces = detect_and_align(astronaut, detector, AlignConfig(size=size))
    assert len(faces) == 1 and faces[0].problem is None and faces[0].confidence > 0.99
    face = faces[0]
    assert face.image.shape == (size, size, 3)
    x, y, w, h = face.box
    assert 150 < x + w / 2 < 300 and 50 < y + h / 2 < 200  # her face, top middle of the photo
    # The detected eyes, carried by the estimated transform (a broad smile pulls the least-squares
    # fit a little, so ~2.5 px at 112, not 0).
    assert (_eye_errors(face.landmarks, size) < 4.0).all()
    # Independent check: MTCNN run again on the aligned crop finds the eyes on the template.
    again = detect_faces(face.image, detector, AlignConfig(size=size, min_face_size=0))
    assert again, "no face found in the aligned crop"
    assert (_eye_errors(again[0].landmarks, size) < 5.0).all()


def test_lfw_faces_align_onto_the_template(detector, lfw):
    cfg = AlignConfig(size=112, min_face_size=0, detect_upscale_to=160)
    aligned, redetected, errors = 0, 0, []
    for rgb in lfw[:20]:
        faces = detect_and_align(rgb, detector, cfg)
        if not faces:
            continue
        aligned += 1
        errors.append(_eye_errors(faces[0].landmarks, 112))
        again = detect_faces(faces[0].image, detector, AlignConfig(size=112, min_face_size=0))
        if again:
            redetected += 1
            # the face is 25 px, blown up to 112: re-detection is coarser than on the astronaut
            assert (_eye_errors(again[0].landmarks, 112) < 6.0).all()
    assert aligned >= 18, f"MTCNN found only {aligned} of 20 LFW faces"
    errors = np.concatenate(errors)
    assert np.median(errors) < 2.5 and errors.max() < 5.0
    assert redetected >= aligned - 2


def test_lfw_faces_are_too_small_under_the_default_minimum(detector, lfw):
    # The same tiny faces, with the default min_face_size of 32 px: rejected with the reason.
    cfg = AlignConfig(size=112, detect_upscale_to=160)
    reasons = [reject_category(align_record(_row(f"lfw{i}", lfw[i]), detector, cfg)[1]["reason"]) for i in range(4)]
    assert set(reasons) <= {"too small", "no face"} and reasons.count("too small") >= 3


def test_lfw_non_faces_are_rejected(detector, lfw):
    cfg = AlignConfig(size=112, min_face_size=0, detect_upscale_to=160)
    for i in range(100, 110):
        out, rej = align_record(_row(f"lfw{i}", lfw[i]), detector, cfg)
        assert out is None and reject_category(rej["reason"]) == "no face", i


def test_blank_noise_and_coins_are_rejected_not_raised(detector, rng):
    cfg = AlignConfig(size=112)
    images = {
        "blank": np.full((200, 200, 3), 128, np.uint8),
        "noise": rng.integers(0, 256, (240, 320, 3), dtype=np.uint8),
        "coins": np.stack([data.coins()] * 3, axis=-1),
        "tiny": np.zeros((3, 3, 3), np.uint8),
    }
    for name, img in images.items():
        out, rej = align_record(_row(name, img), detector, cfg)
        assert out is None, name
        assert rej["id"] == name and rej["source"] == "photos" and reject_category(rej["reason"]) == "no face"


def test_corrupt_bytes_are_rejected(detector):
    for data_ in (b"\x89PNG\r\n\x1a\nnot really", b"", b"\xff\xd8\xff" + bytes(100)):
        out, rej = align_record({"id": "bad", "image": data_, "source": "x"}, detector, AlignConfig())
        assert out is None and reject_category(rej["reason"]) == "corrupt"


def test_small_face_and_unsure_face_are_rejected_with_their_reason(detector, astronaut):
    small = cv2.resize(astronaut, None, fx=0.3, fy=0.3, interpolation=cv2.INTER_AREA)  # face ~26 px wide
    out, rej = align_record(_row("small", small), detector, AlignConfig())
    assert out is None and rej["reason"].startswith("too small:") and "min_face_size 32" in rej["reason"]
    assert align_record(_row("small", small), detector, AlignConfig(min_face_size=20))[0] is not None
    out, rej = align_record(_row("unsure", astronaut), detector, AlignConfig(min_confidence=0.99999))
    assert out is None and reject_category(rej["reason"]) == "low confidence"


def test_several_faces_keep_the_large_one_and_record_the_choice(detector, astronaut):
    # The astronaut at full size and a half-size copy: MTCNN is (slightly) MORE confident about the
    # small copy, but the large face in front is the subject.
    canvas = np.zeros((512, 768, 3), np.uint8)
    canvas[:, :512] = astronaut
    canvas[100:356, 512:] = cv2.resize(astronaut, (256, 256), interpolation=cv2.INTER_AREA)
    faces = detect_faces(canvas, detector, AlignConfig())
    assert len(faces) == 2
    chosen, reason = choose_face(faces, AlignConfig())
    assert reason is None and chosen.box[0] < 512
    out, _ = align_record(_row("two", canvas), detector, AlignConfig(size=112))
    assert out["n_faces"] == 2 and out["detected"] and out["align_method"] == "detected"
    assert out["det_box"][0] < 512 and out["det_box"][2] > 60
    assert out["det_confidence"] == pytest.approx(chosen.confidence)
    # When no face is big enough, the reject names that problem.
    out, rej = align_record(_row("two", canvas), detector, AlignConfig(min_face_size=300))
    assert out is None and reject_category(rej["reason"]) == "too small"


def test_shipped_landmarks_skip_detection(detector, astronaut):
    det = detect_faces(astronaut, detector, AlignConfig())[0]
    row = _row("lm", astronaut, landmarks=det.landmarks.reshape(-1), valence=0.5, arousal=-0.25, split="test")
    out, _ = align_record(row, _NoDetector(), AlignConfig(size=112))
    assert out["align_method"] == "landmarks" and not out["detected"] and out["n_faces"] is None
    assert out["det_box"] is None and out["det_confidence"] is None
    assert (out["label"], out["split"], out["source"], out["valence"], out["arousal"]) == (4, "test", "photos", 0.5, -0.25)
    expected, _, pts = align_face(astronaut, det.landmarks, 112)
    assert np.array_equal(decode(out["image"]), expected)
    assert np.allclose(out["landmarks"], pts.reshape(-1), atol=1e-4)
    # "always" ignores shipped landmarks and detects; "never" warps from them too.
    assert align_record(row, detector, AlignConfig(detect="always"))[0]["align_method"] == "detected"
    assert align_record(row, _NoDetector(), AlignConfig(detect="never"))[0]["align_method"] == "landmarks"


def test_never_detect_resizes_already_aligned_faces(lfw):
    row = _row("lfw0", lfw[0])
    out, _ = align_record(row, None, AlignConfig(size=48, detect="never"))
    assert out["align_method"] == "resize" and out["landmarks"] is None
    assert decode(out["image"]).shape == (48, 48, 3)
    with pytest.raises(ValueError, match="needs face detection"):
        align_record(row, None, AlignConfig(detect="auto"))


def test_degenerate_landmarks_are_rejected(astronaut):
    out, rej = align_record(_row("lm", astronaut, landmarks=[10.0] * 10), None, AlignConfig())
    assert out is None and reject_category(rej["reason"]) == "bad landmarks"


def test_align_table_partitions_rows_into_aligned_and_rejects(detector, astronaut, lfw):
    rows = [
        _row("astro", astronaut),
        _row("blank", np.zeros((64, 64, 3), np.uint8)),
        {**_row("broken", astronaut), "image": b"garbage"},
        _row("given", lfw[0], landmarks=template(25).reshape(-1)),
    ]
    table = pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA)
    out, rej = align_table(table, detector, AlignConfig(size=64, image_format=".jpg", jpeg_quality=90))
    assert out.schema == ALIGNED_SCHEMA and rej.schema == REJECTS_SCHEMA
    assert out["id"].to_pylist() == ["astro", "given"]
    assert dict(zip(rej["id"].to_pylist(), map(reject_category, rej["reason"].to_pylist()))) == {"blank": "no face", "broken": "corrupt"}
    assert all(b[:2] == b"\xff\xd8" for b in out["image"].to_pylist())  # JPEG as asked
    assert out["detected"].to_pylist() == [True, False]


# ---------------------------------------------------------------- the Ray stage


def _write_source(uri, rows, rows_per_shard):
    with ArtifactWriter(uri, stage="ingest", schema=IMAGE_SCHEMA, rows_per_shard=rows_per_shard) as w:
        w.write_rows(rows)
    return uri


@pytest.mark.slow  # one Ray actor loading TensorFlow + MTCNN: ~15-30 s on 2 shared cores
def test_ray_stage_end_to_end(tmp_path, ray_local, astronaut, lfw):
    from workers.align import align_artifact
    from workers.sharded import PoolConfig

    rows = [
        _row("astro", astronaut),
        _row("blank", np.full((120, 120, 3), 255, np.uint8)),
        {**_row("broken", astronaut), "image": b"\x00\x01"},
        _row("coins", np.stack([data.coins()] * 3, axis=-1)),
        _row("given", lfw[1], landmarks=template(25).reshape(-1)),
    ]
    src = _write_source(str(tmp_path / "src"), rows, rows_per_shard=2)
    out = str(tmp_path / "aligned")
    seen = []
    m = align_artifact(src, out, AlignConfig(size=112), pool=PoolConfig(num_actors=1),
                       on_shard=lambda i, info, r: seen.append((i, info.rows, r)))
    assert sorted(seen) == [(0, 1, 1), (1, 0, 2), (2, 1, 0)]
    art = Artifact(out)
    t = art.read()
    assert t.schema == ALIGNED_SCHEMA and t["id"].to_pylist() == ["astro", "given"]
    assert t["align_method"].to_pylist() == ["detected", "landmarks"]
    assert (_eye_errors(np.reshape(t["landmarks"][0].as_py(), (5, 2)), 112) < 4.0).all()
    rej = Artifact(out + "/rejects").read()
    assert {i: reject_category(r) for i, r in zip(rej["id"].to_pylist(), rej["reason"].to_pylist())} == {
        "blank": "no face", "broken": "corrupt", "coins": "no face"}
    assert m.stage == "align" and m.config["size"] == 112 and m.extra["rejects"] == 3
    assert m.inputs["images"] == Artifact(src).digest


def _landmark_rows(lfw, n):
    return [_row(f"f{i}", lfw[i], landmarks=template(25).reshape(-1)) for i in range(n)]


def test_ray_stage_resumes_only_unfinished_shards(tmp_path, ray_local, lfw):
    from dataclasses import asdict

    from storage.artifact import claim
    from workers.align import align_artifact
    from workers.sharded import sharded_claim_key

    src = _write_source(str(tmp_path / "src"), _landmark_rows(lfw, 6), rows_per_shard=2)
    out = str(tmp_path / "aligned")
    # A crashed earlier run finished shard 1; its (recognisable) rows must be kept, not redone.
    claim(out, sharded_claim_key("align", asdict(AlignConfig(size=32)), {"images": Artifact(src).digest}))
    sentinel = dict(_row("sentinel", np.zeros((8, 8, 3), np.uint8)), detected=False, align_method="resize")
    ShardedWriter(out).write_shard("part-00001.parquet", pa.Table.from_pylist([sentinel], schema=ALIGNED_SCHEMA))
    with pytest.raises(FileExistsError, match="other inputs or settings"):  # never a table of mixed sizes
        align_artifact(src, out, AlignConfig(size=48))
    seen = []
    # Rows ship landmarks: the actors never load TensorFlow (the detector is built lazily).
    align_artifact(src, out, AlignConfig(size=32), on_shard=lambda i, info, r: seen.append(i))
    assert sorted(seen) == [0, 2]
    assert Artifact(out).read()["id"].to_pylist() == ["f0", "f1", "sentinel", "f4", "f5"]
    assert len(Artifact(out + "/rejects")) == 0


def test_cli_align_prints_a_summary_and_refuses_to_overwrite(tmp_path, ray_local, lfw, capsys):
    from flows.cli import main

    rows = _landmark_rows(lfw, 3) + [{**_row("broken", lfw[5]), "image": b"nope"}]
    src = _write_source(str(tmp_path / "src"), rows, rows_per_shard=2)
    out = str(tmp_path / "aligned")
    main(["align", src, out, "--size", "48", "--detect", "never", "--workers", "1", "--format", "jpg"])
    text = capsys.readouterr().out
    assert "aligned" in text and "landmarks: 3" in text and "corrupt" in text and "images/s" in text
    t = Artifact(out).read()
    assert len(t) == 3 and decode(t["image"][0].as_py()).shape == (48, 48, 3)
    with pytest.raises(SystemExit) as e:
        main(["align", src, out, "--size", "48"])
    assert e.value.code == 2 and "already a finished artifact" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["align", src, str(tmp_path / "o2"), "--detect", "sometimes"])
    assert e.value.code == 2 and "detect must be one of" in capsys.readouterr().err
