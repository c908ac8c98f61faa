"""`predict_photos` on real photos: scikit-image's astronaut (one face), a blank image, a corrupt file."""

import csv
import json

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from storage.images import decode, encode
from tasks.align import make_detector
from tasks.engine.checkpoint import save_checkpoint
from tasks.models import build_model
from tasks.predict import PredictConfig, annotate, find_photos, predict_photos, summarize, write_results

SIZE = 48


@pytest.fixture(scope="module")
def detector():
    return make_detector(threads=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    d = str(tmp_path_factory.mktemp("ck"))
    save_checkpoint(d, build_model("small_cnn", 7), {"input_size": SIZE})
    return d


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    (root / "astronaut.jpg").write_bytes(encode(data.astronaut(), ".jpg"))
    (root / "sub" / "blank.png").write_bytes(encode(np.full((120, 160, 3), 200, np.uint8), ".png"))
    (root / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "notes.txt").write_text("not a photo, not searched in folders")
    return root


@pytest.fixture(scope="module")
def results(checkpoint, photos, detector):
    return predict_photos(checkpoint, [str(photos)], PredictConfig(), detector=detector)


def _by_name(results, name):
    return [r for r in results if r.photo.endswith(name)]


def test_folders_are_searched_recursively_for_images(photos):
    found = find_photos([str(photos)])
    assert sorted(p.rsplit("/", 1)[-1] for p in found) == ["astronaut.jpg", "blank.png", "broken.jpg"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_photos([str(photos / "missing.jpg")])


def test_astronaut_face_is_found_and_classified(results):
    rows = _by_name(results, "astronaut.jpg")
    assert len(rows) == 1
    r = rows[0]
    assert r.ok and r.face == 0 and r.confidence > 0.99
    x, y, w, h = r.box
    assert 150 < x + w / 2 < 300 and 50 < y + h / 2 < 200 and 60 < w < 200  # her face, top middle
    assert set(r.probabilities) == {"neutral", "anger", "disgust", "fear", "happy", "sad", "surprise"}
    assert abs(sum(r.probabilities.values()) - 1) < 1e-5
    assert r.label == max(r.probabilities, key=r.probabilities.get) and r.score == r.probabilities[r.label]


def test_blank_and_corrupt_photos_are_reported_not_errors(results):
    (blank,) = _by_name(results, "blank.png")
    assert blank.problem.startswith("no face") and blank.face is None and blank.label is None
    (broken,) = _by_name(results, "broken.jpg")
    assert broken.problem.startswith("corrupt")
    s = summarize(results)
    assert s["photos"] == 3 and s["faces"] == 1 and s["no_face"] == 1 and s["corrupt"] == 1


def test_probabilities_match_the_model_on_the_aligned_face(checkpoint, results, detector):
    from tasks.align import AlignConfig, detect_and_align
    from tasks.engine.checkpoint import load_checkpoint
    from tasks.data import normalize

    model, meta = load_checkpoint(checkpoint)
    # The JPEG round trip changes pixels a little: compare on the decoded photo the predictor saw.
    (face,) = detect_and_align(decode(encode(data.astronaut(), ".jpg")), detector, AlignConfig(size=SIZE))
    x = torch.from_numpy(face.image).permute(2, 0, 1)[None]
    with torch.no_grad():
        p = torch.softmax(model(normalize(x, meta["mean"], meta["std"])), 1)[0].numpy()
    (r,) = _by_name(results, "astronaut.jpg")
    np.testing.assert_allclose([r.probabilities[c] for c in meta["classes"]], p, atol=1e-5)


def test_faces_are_aligned_at_the_training_tables_size_then_resized(checkpoint, photos, detector, tmp_path):
    """A model trained on a table aligned at 96 px (resized to 48 for training) sees faces made the same way."""
    from dataclasses import asdict

    from storage.artifact import ArtifactWriter
    from storage.schema import IMAGE_SCHEMA, image_row
    from tasks.align import AlignConfig, detect_and_align
    from tasks.engine.checkpoint import load_checkpoint
    from tasks.data import decode_resized, normalize
    from tasks.predict import ALIGN_STAGE, training_align_size
    from workers.align import STAGE

    assert ALIGN_STAGE == STAGE
    table = str(tmp_path / "aligned")
    with ArtifactWriter(table, stage=STAGE, config=asdict(AlignConfig(size=96)), schema=IMAGE_SCHEMA) as w:
        w.write_rows([image_row("a", encode(np.zeros((96, 96, 3), np.uint8), ".png"), label=0)])
    model, meta = load_checkpoint(checkpoint)
    ck = str(tmp_path / "ck96")
    save_checkpoint(ck, model, {"input_size": SIZE, "train_uris": [str(tmp_path / "gone"), table]})
    assert training_align_size({"train_uris": [str(tmp_path / "gone")]}) is None  # data not there: input_size

    (r,) = predict_photos(ck, [str(photos / "astronaut.jpg")], detector=detector)
    # What training saw: the align stage's 96 px PNG, decoded and resized to 48 by tasks.data.
    (face,) = detect_and_align(decode(encode(data.astronaut(), ".jpg")), detector, AlignConfig(size=96))
    x = torch.from_numpy(decode_resized(encode(face.image, ".png"), SIZE)).permute(2, 0, 1)[None]
    with torch.no_grad():
        want = torch.softmax(model(normalize(x, meta["mean"], meta["std"])), 1)[0].numpy()
    np.testing.assert_allclose([r.probabilities[c] for c in meta["classes"]], want, atol=1e-5)
    (direct,) = predict_photos(ck, [str(photos / "astronaut.jpg")], PredictConfig(align_size=SIZE), detector=detector)
    assert direct.probabilities != r.probabilities  # the override is honoured (and differs from 96 -> 48)


def test_tiny_face_is_listed_without_prediction(checkpoint, tmp_path, detector):
    p = tmp_path / "a.png"
    p.write_bytes(encode(data.astronaut(), ".png"))
    (r,) = predict_photos(checkpoint, [str(p)], PredictConfig(min_face_size=1000), detector=detector)
    assert r.face == 0 and r.problem.startswith("too small") and r.label is None and r.box is not None


def test_valence_arousal_model_gives_tanh_outputs(tmp_path, photos, detector):
    from tasks.caf import method as caf
    torch.manual_seed(2)
    ck = str(tmp_path / "va")
    # The meta keys tasks.caf.method.train_caf writes for a CAF / valence-arousal baseline checkpoint.
    save_checkpoint(ck, build_model("small_cnn", 2), {"input_size": SIZE, "task": caf.TASK, "classes": list(caf.OUTPUTS),
                                                       "outputs": list(caf.OUTPUTS), "output_activation": "tanh"})
    (r,) = predict_photos(ck, [str(photos / "astronaut.jpg")], detector=detector)
    assert r.ok and r.label is None and r.probabilities is None
    assert -1 < r.valence < 1 and -1 < r.arousal < 1


def test_csv_and_json_results(results, tmp_path):
    write_results(results, str(tmp_path / "r.csv"))
    with open(tmp_path / "r.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and "p_happy" in rows[0] and "box_w" in rows[0]
    face = [r for r in rows if r["photo"].endswith("astronaut.jpg")][0]
    assert face["label"] and float(face["box_w"]) > 60
    assert [r for r in rows if r["photo"].endswith("blank.png")][0]["problem"].startswith("no face")
    write_results(results, str(tmp_path / "r.json"))
    js = json.loads((tmp_path / "r.json").read_text())
    assert len(js) == 3 and any(len(r["box"] or []) == 4 and r["probabilities"] for r in js)
    with pytest.raises(ValueError, match=".csv or .json"):
        write_results(results, str(tmp_path / "r.xlsx"))


def test_annotate_draws_the_box(results, photos, tmp_path):
    rows = _by_name(results, "astronaut.jpg")
    out = annotate(str(photos / "astronaut.jpg"), rows, str(tmp_path / "ann" / "a.png"))
    img = cv2.imread(out)
    assert img is not None and img.shape == (512, 512, 3)
    orig = cv2.imread(str(photos / "astronaut.jpg"))
    x, y, w, h = (int(round(v)) for v in rows[0].box)
    changed = np.abs(img.astype(int) - orig.astype(int)).sum(2) > 60
    assert changed[y + h // 4: y + 3 * h // 4, x].mean() > 0.9  # the box's left edge is drawn
    assert changed[y + h // 3: y + 2 * h // 3, x + w // 3: x + 2 * w // 3].mean() < 0.05  # face untouched


def test_cli_predict(checkpoint, photos, tmp_path, capsys):
    from flows.cli import main

    main(["predict", checkpoint, str(photos), "--out", str(tmp_path / "r.json"), "--annotate", str(tmp_path / "ann")])
    out = capsys.readouterr().out
    assert "faces" in out and "r.json" in out
    assert len(json.loads((tmp_path / "r.json").read_text())) == 3
    assert sorted(p.name for p in (tmp_path / "ann").iterdir()) == ["astronaut.jpg", "blank.jpg"]
    with pytest.raises(SystemExit) as e:
        main(["predict", checkpoint, str(photos / "nope.jpg")])
    assert e.value.code == 2
