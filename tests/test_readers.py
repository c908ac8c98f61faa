"""Every public data set reader on a tiny fixture written here in that data set's exact layout,
plus `fermine ingest` / `fermine inspect` end to end."""

from __future__ import annotations

import csv
import json
import os
import struct

import cv2
import numpy as np
import pytest

from storage.artifact import Artifact
from storage.images import decode, encode
from storage.ingest import rejects_uri, write_image_table
from storage.readers import available, get_reader
from storage.readers.base import DatasetFormatError, Reject
from storage.schema import CLASS_INDEX

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPG_MAGIC = b"\xff\xd8\xff"
CORRUPT = b"this is not an image at all"


def img(seed: int, size: int = 24, gray: bool = False) -> np.ndarray:
    a = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return a[..., 0] if gray else a


def jpg(seed: int, size: int = 24) -> bytes:
    return encode(img(seed, size), ".jpg")


def png(seed: int, size: int = 24) -> bytes:
    return encode(img(seed, size), ".png")


def put(path, data: bytes | str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def collect(records):
    rows, rejects = {}, {}
    for r in records:
        if isinstance(r, Reject):
            assert r.id not in rejects, f"duplicate reject id {r.id}"
            rejects[r.id] = r.reason
        else:
            assert r["id"] not in rows, f"duplicate row id {r['id']}"
            rows[r["id"]] = r
    return rows, rejects


def five(points68: np.ndarray) -> list[float]:
    p = points68
    return [*p[36:42].mean(0), *p[42:48].mean(0), *p[30], *p[48], *p[54]]


def test_all_readers_registered():
    assert {"rafdb", "fer2013", "ferplus", "affectnet", "ckplus", "jaffe", "folder", "ms1m", "afewva"} <= set(available())


# ---------------------------------------------------------------- RAF-DB


def write_rafdb(root) -> str:
    base = os.path.join(root, "basic")
    lines = ["train_00001.jpg 5", "train_00002.jpg 1", "train_00003.jpg 7", "test_0001.jpg 6",
             "test_0002.jpg 9", "train_00004.jpg 4", "train_00005.jpg 2", "train_00006.jpg 3"]
    put(os.path.join(base, "EmoLabel", "list_patition_label.txt"), "\n".join(lines) + "\n")
    for i, name in enumerate(["train_00001", "train_00002", "train_00003", "test_0001", "test_0002",
                              "train_00006"]):
        put(os.path.join(base, "Image", "aligned", f"{name}_aligned.jpg"), jpg(i, 20))
        put(os.path.join(base, "Image", "original", f"{name}.jpg"), jpg(i, 40))
    put(os.path.join(base, "Image", "aligned", "train_00004_aligned.jpg"), CORRUPT)
    put(os.path.join(base, "Image", "original", "train_00004.jpg"), jpg(9, 40))
    # train_00005 has no image file at all.
    put(os.path.join(base, "Annotation", "manual", "train_00001_manu_attri.txt"),
        "10.5\t12.0\n30.0\t12.5\n20.0\t22.0\n12.0\t30.0\n28.0\t31.0\n0\n1\n2\n")
    put(os.path.join(base, "Annotation", "manual", "train_00006_manu_attri.txt"), "1 2\n3\n")
    return base


def test_rafdb_labels_splits_and_rejects(tmp_path):
    base = write_rafdb(tmp_path)
    rows, rejects = collect(get_reader("rafdb")(str(tmp_path)))  # the folder above basic/ works too
    assert rows["rafdb/train_00001"]["label"] == CLASS_INDEX["sad"]
    assert rows["rafdb/train_00002"]["label"] == CLASS_INDEX["surprise"]
    assert rows["rafdb/train_00003"]["label"] == CLASS_INDEX["neutral"]
    assert rows["rafdb/test_0001"]["label"] == CLASS_INDEX["anger"]
    assert rows["rafdb/train_00006"]["label"] == CLASS_INDEX["disgust"]
    assert rows["rafdb/test_0001"]["split"] == "test" and rows["rafdb/train_00002"]["split"] == "train"
    assert {r["source"] for r in rows.values()} == {"rafdb"}
    # Original bytes are stored, aligned images by default; no landmarks for aligned faces.
    assert rows["rafdb/train_00001"]["image"] == open(os.path.join(base, "Image/aligned/train_00001_aligned.jpg"), "rb").read()
    assert rows["rafdb/train_00001"]["landmarks"] is None
    assert rejects["rafdb/test_0002"].startswith("bad label")
    assert rejects["rafdb/train_00004"].startswith("corrupt")
    assert rejects["rafdb/train_00005"].startswith("missing")
    assert len(rows) == 5 and len(rejects) == 3


def test_rafdb_original_with_landmarks(tmp_path):
    base = write_rafdb(tmp_path)
    rows, rejects = collect(get_reader("rafdb")(base, aligned="false"))
    r = rows["rafdb/train_00001"]
    assert decode(r["image"]).shape == (40, 40, 3)
    assert r["landmarks"] == [10.5, 12.0, 30.0, 12.5, 20.0, 22.0, 12.0, 30.0, 28.0, 31.0]
    assert rows["rafdb/train_00002"]["landmarks"] is None  # no annotation file: no landmarks
    assert rejects["rafdb/train_00006"].startswith("bad landmarks")
    assert "rafdb/train_00004" not in rejects  # the original image is fine, only the aligned one is corrupt


def test_rafdb_missing_layout_fails_eagerly(tmp_path):
    with pytest.raises(DatasetFormatError, match="list_patition_label.txt"):
        get_reader("rafdb")(str(tmp_path))  # no iteration needed: checked before any output is made
    with pytest.raises(DatasetFormatError, match="not a folder"):
        get_reader("rafdb")(str(tmp_path / "nope"))
    write_rafdb(tmp_path)
    with pytest.raises(ValueError, match="aligned"):
        get_reader("rafdb")(str(tmp_path), aligned="maybe")


# ---------------------------------------------------------------- FER2013 / FERPlus


def pixels(seed: int, n: int = 2304) -> str:
    return " ".join(str(v) for v in np.random.default_rng(seed).integers(0, 256, n))


FER_ROWS = [  # emotion, Usage, pixels
    ("0", "Training", pixels(0)),
    ("6", "PublicTest", pixels(1)),
    ("3", "PrivateTest", pixels(2)),
    ("4", "Training", pixels(3, 100)),  # wrong pixel count
    ("9", "Training", pixels(4)),  # bad label
    ("5", "Nowhere", pixels(5)),  # bad split
    ("1", "Training", pixels(6)),
    ("2", "Training", pixels(7)),
    ("3", "Training", pixels(8)),
]


def write_fer2013(folder) -> str:
    path = os.path.join(folder, "fer2013.csv")
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["emotion", "pixels", "Usage"])
        for e, u, p in FER_ROWS:
            w.writerow([e, p, u])
    return path


def test_fer2013(tmp_path):
    write_fer2013(tmp_path)
    rows, rejects = collect(get_reader("fer2013")(str(tmp_path)))
    assert rows["fer2013/00000"]["label"] == CLASS_INDEX["anger"] and rows["fer2013/00000"]["split"] == "train"
    assert rows["fer2013/00001"]["label"] == CLASS_INDEX["neutral"] and rows["fer2013/00001"]["split"] == "val"
    assert rows["fer2013/00002"]["label"] == CLASS_INDEX["happy"] and rows["fer2013/00002"]["split"] == "test"
    assert rows["fer2013/00006"]["label"] == CLASS_INDEX["disgust"]
    assert rows["fer2013/00007"]["label"] == CLASS_INDEX["fear"]
    assert rejects["fer2013/00003"].startswith("corrupt") and "2304" in rejects["fer2013/00003"]
    assert rejects["fer2013/00004"].startswith("bad label")
    assert rejects["fer2013/00005"].startswith("bad split")
    im = decode(rows["fer2013/00000"]["image"])
    assert rows["fer2013/00000"]["image"].startswith(PNG_MAGIC)
    assert im.shape == (48, 48, 3)
    np.testing.assert_array_equal(im[..., 0].reshape(-1), np.array(FER_ROWS[0][2].split(), dtype=np.uint8))


def test_fer2013_padded_header_and_missing_file(tmp_path):
    # Some redistributions (icml_face_data.csv) pad names: "emotion, Usage, pixels".
    path = tmp_path / "icml_face_data.csv"
    path.write_text("emotion, Usage, pixels\n4,Training," + pixels(1) + "\n")
    rows, _ = collect(get_reader("fer2013")(str(path)))
    assert rows["fer2013/00000"]["label"] == CLASS_INDEX["sad"]
    with pytest.raises(DatasetFormatError, match="fer2013.csv"):
        get_reader("fer2013")(str(tmp_path / "empty"))
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DatasetFormatError, match="emotion"):
        get_reader("fer2013")(str(tmp_path / "bad.csv"))


NEW_HEADER = ["Usage", "Image name", "neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
              "contempt", "unknown", "NF"]
NEW_ROWS = [  # aligned with FER_ROWS
    ("Training", "fer0000000.png", [8, 1, 0, 0, 1, 0, 0, 0, 0, 0]),  # neutral
    ("PublicTest", "fer0000001.png", [1, 0, 0, 0, 0, 0, 0, 7, 2, 0]),  # contempt
    ("PrivateTest", "fer0000002.png", [0, 4, 4, 0, 0, 0, 0, 0, 2, 0]),  # tie happiness/surprise
    ("Training", "", [0, 0, 0, 0, 0, 0, 0, 0, 0, 10]),  # dropped by FER+
    ("Training", "fer0000004.png", [0, 0, 0, 0, 0, 0, 0, 0, 0, 10]),  # not a face
    ("PrivateTest", "fer0000005.png", [0, 0, 6, 0, 0, 0, 4, 0, 0, 0]),  # fer2013.csv says "Nowhere"
    ("Training", "fer0000006.png", [0, 0, 6, 0, 0, 0, 4, 0, 0, 0]),  # surprise
    ("Training", "fer0000007.png", [0, 0, 0, 0, 4, 3, 0, 0, 3, 0]),  # anger, 40%: no strict majority
    ("Training", "fer0000008.png", [2, 0, 0, 3, 0, 0, 0, 0, 5, 0]),  # unknown
]


def write_ferplus(root, fer_dir) -> None:
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "fer2013new.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(NEW_HEADER)
        for u, name, votes in NEW_ROWS:
            w.writerow([u, name, *votes])
    write_fer2013(fer_dir)


def test_ferplus_votes(tmp_path):
    write_ferplus(tmp_path / "ferplus", tmp_path / "ferplus")
    rows, rejects = collect(get_reader("ferplus")(str(tmp_path / "ferplus")))
    assert rows["ferplus/fer0000000"]["label"] == CLASS_INDEX["neutral"]
    assert rows["ferplus/fer0000006"]["label"] == CLASS_INDEX["surprise"]
    assert rows["ferplus/fer0000006"]["split"] == "train"
    assert rows["ferplus/fer0000007"]["label"] == CLASS_INDEX["anger"]
    assert rejects["ferplus/fer0000001"].startswith("contempt")
    assert rejects["ferplus/fer0000002"].startswith("tie")
    assert rejects["ferplus/row-00003"].startswith("dropped")
    assert rejects["ferplus/fer0000004"].startswith("not a face")
    assert rejects["ferplus/fer0000008"].startswith("unknown")
    assert rejects["ferplus/fer0000005"].startswith("mismatch")  # the two csv files disagree on the split
    assert len(rows) == 3 and len(rejects) == 6
    # The pixels are FER2013's, row for row.
    fer_rows, _ = collect(get_reader("fer2013")(str(tmp_path / "ferplus")))
    assert rows["ferplus/fer0000006"]["image"] == fer_rows["fer2013/00006"]["image"]


def test_ferplus_options(tmp_path):
    write_ferplus(tmp_path / "new", tmp_path / "old")
    read = get_reader("ferplus")
    with pytest.raises(DatasetFormatError, match="fer2013_csv"):
        read(str(tmp_path / "new"))
    old = str(tmp_path / "old" / "fer2013.csv")
    rows, rejects = collect(read(str(tmp_path / "new"), fer2013_csv=old, ties="first"))
    assert rows["ferplus/fer0000002"]["label"] == CLASS_INDEX["happy"]  # happiness comes first in the file
    assert rows["ferplus/fer0000007"]["label"] == CLASS_INDEX["anger"]
    rows, rejects = collect(read(str(tmp_path / "new"), fer2013_csv=old, min_share=0.5))
    assert rejects["ferplus/fer0000007"].startswith("no majority")
    assert rows["ferplus/fer0000000"]["label"] == CLASS_INDEX["neutral"]  # 8 of 10 votes
    with pytest.raises(ValueError, match="ties"):
        read(str(tmp_path / "new"), fer2013_csv=str(tmp_path / "old"), ties="coin")


# ---------------------------------------------------------------- AffectNet


def landmarks68(seed: int, scale: float = 60.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(5, scale, (68, 2)).round(2)


def write_affectnet(root) -> None:
    header = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "facial_landmarks",
              "expression", "valence", "arousal"]
    train = [
        ("689/a1.jpg", 10, 5, 40, 50, 1, 0.8, 0.3),  # happy
        ("689/a2.jpg", 0, 0, 64, 64, 7, -0.4, 0.5),  # contempt
        ("690/a3.jpg", 0, 0, 64, 64, 10, -2, -2),  # no face
        ("690/a4.jpg", 0, 0, 64, 64, 6, -2, -2),  # anger, valence/arousal not annotated
        ("690/a5.jpg", 0, 0, 64, 64, 2, 0.1, 0.1),  # corrupt image
        ("690/a6.jpg", 0, 0, 64, 64, 12, 0.1, 0.1),  # bad code
    ]
    val = [("700/b1.png", 0, 0, 64, 64, 3, 0.2, 0.9)]  # surprise
    lists = os.path.join(root, "Manually_Annotated_file_lists")
    for name, entries in (("training.csv", train), ("validation.csv", val)):
        os.makedirs(lists, exist_ok=True)
        with open(os.path.join(lists, name), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            for i, (rel, x, y, wd, ht, e, v, a) in enumerate(entries):
                lm = ";".join(f"{c}" for c in landmarks68(i).reshape(-1))
                w.writerow([rel, x, y, wd, ht, lm, e, v, a])
                data = CORRUPT if rel.endswith("a5.jpg") else (png(i, 64) if rel.endswith(".png") else jpg(i, 64))
                put(os.path.join(root, "Manually_Annotated_Images", rel), data)


def test_affectnet(tmp_path):
    write_affectnet(tmp_path)
    rows, rejects = collect(get_reader("affectnet")(str(tmp_path)))
    happy = rows["affectnet/689/a1"]
    assert happy["label"] == CLASS_INDEX["happy"] and happy["split"] == "train"
    assert happy["valence"] == pytest.approx(0.8) and happy["arousal"] == pytest.approx(0.3)
    assert decode(happy["image"]).shape == (50, 40, 3)  # cropped to the face box (h, w)
    expected = np.array(five(landmarks68(0))) - np.tile([10, 5], 5)  # shifted into the crop
    np.testing.assert_allclose(happy["landmarks"], expected, atol=1e-6)
    assert rows["affectnet/690/a4"]["label"] == CLASS_INDEX["anger"]
    assert rows["affectnet/690/a4"]["valence"] is None and rows["affectnet/690/a4"]["arousal"] is None
    surprise = rows["affectnet/700/b1"]
    assert surprise["label"] == CLASS_INDEX["surprise"] and surprise["split"] == "test"
    assert rejects["affectnet/689/a2"].startswith("contempt")
    assert rejects["affectnet/690/a3"].startswith("no-face")
    assert rejects["affectnet/690/a5"].startswith("corrupt")
    assert rejects["affectnet/690/a6"].startswith("bad label")
    assert len(rows) == 3 and len(rejects) == 4


def test_affectnet_keep_va_only_and_no_crop(tmp_path):
    write_affectnet(tmp_path)
    rows, rejects = collect(get_reader("affectnet")(str(tmp_path), keep_va_only=True, crop=False,
                                                    subset="training"))
    va = rows["affectnet/689/a2"]
    assert va["label"] is None and va["valence"] == pytest.approx(-0.4)
    assert "affectnet/690/a3" in rejects  # no face: nothing to regress either
    assert rows["affectnet/689/a1"]["image"] == open(tmp_path / "Manually_Annotated_Images/689/a1.jpg", "rb").read()
    assert "affectnet/700/b1" not in rows  # subset=training
    with pytest.raises(DatasetFormatError, match="Manually_Annotated_Images"):
        os.rename(tmp_path / "Manually_Annotated_Images", tmp_path / "elsewhere")
        get_reader("affectnet")(str(tmp_path))


# ---------------------------------------------------------------- CK+


def write_ckplus(root) -> None:
    seqs = {  # (subject, seq): (frames, emotion file content or None)
        ("S005", "001"): (5, "   3.0000000e+00"),  # disgust
        ("S010", "002"): (4, "   2.0000000e+00"),  # contempt
        ("S011", "001"): (4, None),  # unlabeled
        ("S012", "003"): (6, "   5.0000000e+00"),  # happy, last frame corrupt
        ("S013", "001"): (4, "   9.5000000e+00"),  # bad label
        ("S014", "004"): (3, "   7.0000000e+00"),  # surprise, short sequence
    }
    for (subj, seq), (n, emo) in seqs.items():
        for k in range(1, n + 1):
            stem = f"{subj}_{seq}_{k:08d}"
            data = CORRUPT if (subj == "S012" and k == n) else encode(img(k, 24, gray=True), ".png")
            put(os.path.join(root, "cohn-kanade-images", subj, seq, f"{stem}.png"), data)
        os.makedirs(os.path.join(root, "Emotion", subj, seq), exist_ok=True)
        if emo is not None:
            put(os.path.join(root, "Emotion", subj, seq, f"{subj}_{seq}_{n:08d}_emotion.txt"), emo + "\n")
    lm = landmarks68(3)
    put(os.path.join(root, "Landmarks", "S005", "001", "S005_001_00000001_landmarks.txt"),
        "".join(f"   {x:.7e}   {y:.7e}\n" for x, y in lm))


def test_ckplus(tmp_path):
    write_ckplus(tmp_path)
    rows, rejects = collect(get_reader("ckplus")(str(tmp_path)))
    assert rows["ckplus/S005_001_00000001"]["label"] == CLASS_INDEX["neutral"]
    for k in (3, 4, 5):
        assert rows[f"ckplus/S005_001_0000000{k}"]["label"] == CLASS_INDEX["disgust"]
    assert "ckplus/S005_001_00000002" not in rows  # neither first nor among the last three
    # Folds over labeled subjects, sorted: S005 S010 S012 S013 S014 -> 0 1 2 3 4.
    assert rows["ckplus/S005_001_00000005"]["split"] == "fold-0"
    assert rows["ckplus/S012_003_00000001"]["split"] == "fold-2"
    assert rows["ckplus/S014_004_00000003"]["split"] == "fold-4"
    assert rows["ckplus/S012_003_00000005"]["label"] == CLASS_INDEX["happy"]
    assert [rows[f"ckplus/S014_004_0000000{k}"]["label"] for k in (1, 2, 3)] == [0, 6, 6]
    assert rejects["ckplus/S010_002"].startswith("contempt")
    assert rejects["ckplus/S011_001"].startswith("unlabeled")
    assert rejects["ckplus/S012_003_00000006"].startswith("corrupt")
    assert rejects["ckplus/S013_001"].startswith("bad label")
    np.testing.assert_allclose(rows["ckplus/S005_001_00000001"]["landmarks"], five(landmarks68(3)), atol=1e-4)
    assert rows["ckplus/S005_001_00000003"]["landmarks"] is None
    assert decode(rows["ckplus/S005_001_00000001"]["image"]).shape == (24, 24, 3)
    rows2, _ = collect(get_reader("ckplus")(str(tmp_path), folds=2, peak_frames=1))
    assert rows2["ckplus/S012_003_00000001"]["split"] == "fold-0"
    assert "ckplus/S005_001_00000004" not in rows2 and "ckplus/S005_001_00000005" in rows2
    with pytest.raises(DatasetFormatError, match="cohn-kanade-images"):
        get_reader("ckplus")(str(tmp_path / "Emotion"))


# ---------------------------------------------------------------- JAFFE


def tiff(seed: int) -> bytes:
    ok, buf = cv2.imencode(".tiff", img(seed, 32, gray=True))
    assert ok
    return buf.tobytes()


def test_jaffe(tmp_path):
    root = tmp_path / "jaffe"
    for i, name in enumerate(["KA.AN1.39.tiff", "KA.NE1.26.tiff", "KM.HA2.5.tiff", "YM.SU1.58.tiff",
                              "NA.DI1.214.tiff", "TM.FE3.99.tiff", "UY.SA2.140.tiff", "KL.ZZ1.1.tiff"]):
        put(str(root / name), tiff(i))
    put(str(root / "MK.SA1.119.tiff"), CORRUPT)
    put(str(root / "badname.tiff"), tiff(9))
    put(str(root / "README.txt"), "not an image")
    rows, rejects = collect(get_reader("jaffe")(str(tmp_path)))  # finds the jaffe/ subfolder
    labels = {k: v["label"] for k, v in rows.items()}
    assert labels == {"jaffe/KA.AN1.39": CLASS_INDEX["anger"], "jaffe/KA.NE1.26": CLASS_INDEX["neutral"],
                      "jaffe/KM.HA2.5": CLASS_INDEX["happy"], "jaffe/YM.SU1.58": CLASS_INDEX["surprise"],
                      "jaffe/NA.DI1.214": CLASS_INDEX["disgust"], "jaffe/TM.FE3.99": CLASS_INDEX["fear"],
                      "jaffe/UY.SA2.140": CLASS_INDEX["sad"]}
    assert {r["split"] for r in rows.values()} == {"train"}
    assert rows["jaffe/KA.AN1.39"]["image"].startswith(PNG_MAGIC)  # TIFF re-encoded losslessly
    np.testing.assert_array_equal(decode(rows["jaffe/KA.AN1.39"]["image"])[..., 0], img(0, 32, gray=True))
    assert rejects["jaffe/KL.ZZ1.1"].startswith("bad label")
    assert rejects["jaffe/MK.SA1.119"].startswith("corrupt")
    assert rejects["jaffe/badname"].startswith("bad name")
    assert len(rejects) == 3
    rows, _ = collect(get_reader("jaffe")(str(root), folds=10))
    # Subjects sorted: KA KL KM MK NA TM UY YM -> KA fold-0, KM fold-2, YM fold-7.
    assert rows["jaffe/KA.NE1.26"]["split"] == "fold-0" and rows["jaffe/KM.HA2.5"]["split"] == "fold-2"
    assert rows["jaffe/YM.SU1.58"]["split"] == "fold-7"


# ---------------------------------------------------------------- image folder tree


def test_folder_split_layout(tmp_path):
    put(str(tmp_path / "train/angry/a.jpg"), jpg(0))
    put(str(tmp_path / "train/Happiness/b.png"), png(1))
    put(str(tmp_path / "train/Happiness/sub/c.jpg"), jpg(2))
    put(str(tmp_path / "train/surprised/bad.jpg"), CORRUPT)
    put(str(tmp_path / "Validation/neutral/d.jpg"), jpg(3))
    put(str(tmp_path / "Validation/contempt/e.jpg"), jpg(4))
    put(str(tmp_path / "Validation/neutral/notes.txt"), "ignored: not an image")
    rows, rejects = collect(get_reader("folder")(str(tmp_path)))
    assert rows["folder/train/angry/a"]["label"] == CLASS_INDEX["anger"]
    assert rows["folder/train/Happiness/b"]["label"] == CLASS_INDEX["happy"]
    assert rows["folder/train/Happiness/sub/c"]["label"] == CLASS_INDEX["happy"]
    assert rows["folder/Validation/neutral/d"]["split"] == "val"
    assert rows["folder/train/angry/a"]["image"] == open(tmp_path / "train/angry/a.jpg", "rb").read()
    assert rejects["folder/train/surprised/bad"].startswith("corrupt")
    assert rejects["folder/Validation/contempt/e"].startswith("contempt")
    assert len(rows) == 4 and len(rejects) == 2


def test_folder_flat_unknown_and_unlabeled(tmp_path):
    put(str(tmp_path / "flat/sad/a.jpg"), jpg(0))
    put(str(tmp_path / "flat/Fearful/b.jpg"), jpg(1))
    put(str(tmp_path / "flat/loose.jpg"), jpg(2))
    rows, rejects = collect(get_reader("folder")(str(tmp_path / "flat"), split="test", source="mine"))
    assert rows["mine/sad/a"]["label"] == CLASS_INDEX["sad"] and rows["mine/sad/a"]["split"] == "test"
    assert rows["mine/Fearful/b"]["label"] == CLASS_INDEX["fear"] and rows["mine/sad/a"]["source"] == "mine"
    assert rejects["mine/loose"].startswith("unlabeled")
    put(str(tmp_path / "odd/happy/a.jpg"), jpg(0))
    put(str(tmp_path / "odd/smiling/b.jpg"), jpg(1))
    with pytest.raises(DatasetFormatError) as e:
        get_reader("folder")(str(tmp_path / "odd"))
    assert "smiling" in str(e.value) and "surprised" in str(e.value) and "unlabeled=true" in str(e.value)
    rows, rejects = collect(get_reader("folder")(str(tmp_path / "odd"), unlabeled="true"))
    assert set(rows) == {"folder/happy/a", "folder/smiling/b"} and not rejects
    assert all(r["label"] is None and r["split"] == "pool" for r in rows.values())


# ---------------------------------------------------------------- MS-Celeb-1M


MAGIC = 0xCED7230A


def pack_ir(flag: int, label: float, id1: int, id2: int, labels=(), data: bytes = b"") -> bytes:
    """mxnet.recordio.pack: IRHeader '<IfQQ', then `flag` float32 labels when flag > 0, then the data."""
    head = struct.pack("<IfQQ", flag, label, id1, id2)
    return head + (np.asarray(labels, dtype="<f4").tobytes() if flag > 0 else b"") + data


def write_record(f, payload: bytes) -> int:
    """dmlc-core RecordIOWriter::WriteRecord, byte for byte: split at aligned magic words."""
    offset = f.tell()
    magic = struct.pack("<I", MAGIC)
    n = len(payload)
    dptr = 0
    for i in range(0, (n >> 2) << 2, 4):
        if payload[i:i + 4] == magic:
            f.write(magic + struct.pack("<I", ((1 if dptr == 0 else 2) << 29) | (i - dptr)))
            f.write(payload[dptr:i])
            dptr = i + 4
    f.write(magic + struct.pack("<I", ((3 if dptr else 0) << 29) | (n - dptr)))
    f.write(payload[dptr:])
    f.write(b"\0" * ((-n) % 4))
    return offset


def write_ms1m_rec(root, with_idx: bool = True) -> dict[int, bytes]:
    """Header record 0, images 1..6 (image 3 corrupt, image 4 multi-part), 2 identity records."""
    images = {k: jpg(k, 16) for k in range(1, 7)}
    images[3] = CORRUPT
    j = images[4]
    # A JPEG followed by an aligned magic word: decoders ignore bytes after EOI, the writer splits there.
    pad = (-(24 + len(j))) % 4
    images[4] = j + b"\0" * pad + struct.pack("<I", MAGIC) + b"tail" + struct.pack("<I", MAGIC) + b"end!x"
    n_img, n_id = len(images), 2
    os.makedirs(root, exist_ok=True)
    offsets = {}
    with open(os.path.join(root, "train.rec"), "wb") as f:
        offsets[0] = write_record(f, pack_ir(2, 0.0, 0, 0, [n_img + 1, n_img + 1 + n_id]))
        for k, data in images.items():
            offsets[k] = write_record(f, pack_ir(0, float(k % 2), k, 0, data=data))
        for i in range(n_id):
            offsets[n_img + 1 + i] = write_record(f, pack_ir(2, 0.0, 0, 0, [1 + 3 * i, 4 + 3 * i]))
    if with_idx:
        offsets[5] = offsets[5] + 2  # a stale index entry: points into the middle of a record
        with open(os.path.join(root, "train.idx"), "w") as f:
            f.write("".join(f"{k}\t{o}\n" for k, o in sorted(offsets.items())))
    return images


def test_ms1m_recordio(tmp_path):
    images = write_ms1m_rec(tmp_path)
    raw = open(tmp_path / "train.rec", "rb").read()
    # The fixture really exercises multi-part records: flags 1 (first), 2 (middle) and 3 (last) occur.
    flags = {struct.unpack("<I", raw[i + 4:i + 8])[0] >> 29 for i in range(0, len(raw) - 8, 4)
             if raw[i:i + 4] == struct.pack("<I", MAGIC)}
    assert {1, 2, 3} <= flags
    rows, rejects = collect(get_reader("ms1m")(str(tmp_path)))
    assert set(rows) == {"ms1m/1", "ms1m/2", "ms1m/4", "ms1m/6"}  # header and identity records skipped
    assert rows["ms1m/4"]["image"] == images[4]  # parts joined with the magic put back, bytes unchanged
    assert rows["ms1m/1"]["image"] == images[1]
    assert all(r["label"] is None and r["split"] == "pool" and r["source"] == "ms1m" for r in rows.values())
    assert rejects["ms1m/3"].startswith("corrupt")
    assert rejects["ms1m/5"].startswith("corrupt: bad record magic")
    assert set(rejects) == {"ms1m/3", "ms1m/5"}
    rows, rejects = collect(get_reader("ms1m")(str(tmp_path), start=1, limit=2))
    assert set(rows) == {"ms1m/2"} and set(rejects) == {"ms1m/3"}


def test_ms1m_recordio_without_index_and_bad_files(tmp_path):
    images = write_ms1m_rec(tmp_path / "a", with_idx=False)
    rows, rejects = collect(get_reader("ms1m")(str(tmp_path / "a" / "train.rec")))
    assert set(rows) == {"ms1m/1", "ms1m/2", "ms1m/4", "ms1m/5", "ms1m/6"} and set(rejects) == {"ms1m/3"}
    assert rows["ms1m/4"]["image"] == images[4]
    put(str(tmp_path / "b" / "train.rec"), b"\x00" * 64)
    with pytest.raises(DatasetFormatError, match="magic"):
        get_reader("ms1m")(str(tmp_path / "b"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DatasetFormatError, match="train.rec"):
        get_reader("ms1m")(str(tmp_path / "empty"))
    # A file cut short inside the last image: that image is a reject saying so, the others are read.
    os.makedirs(tmp_path / "c")
    with open(tmp_path / "c" / "train.rec", "wb") as f:
        write_record(f, pack_ir(2, 0.0, 0, 0, [3, 4]))
        write_record(f, pack_ir(0, 0.0, 1, 0, data=jpg(1, 16)))
        write_record(f, pack_ir(0, 0.0, 2, 0, data=jpg(2, 16)))
        f.truncate(f.tell() - 10)
    rows, rejects = collect(get_reader("ms1m")(str(tmp_path / "c")))
    assert set(rows) == {"ms1m/1"} and "truncated" in rejects["ms1m/2"]


def test_ms1m_evolve_folders(tmp_path):
    for ident in ("0", "1"):
        for n in range(3):
            put(str(tmp_path / ident / f"{n}.jpg"), jpg(int(ident) * 10 + n, 16))
    put(str(tmp_path / "1" / "9.jpg"), CORRUPT)
    rows, rejects = collect(get_reader("ms1m")(str(tmp_path)))
    assert set(rows) == {f"ms1m/{i}/{n}" for i in "01" for n in range(3)}
    assert rejects == {"ms1m/1/9": rejects["ms1m/1/9"]} and rejects["ms1m/1/9"].startswith("corrupt")
    rows, _ = collect(get_reader("ms1m")(str(tmp_path), start=2, limit=2))
    assert set(rows) == {"ms1m/0/2", "ms1m/1/0"}


# ---------------------------------------------------------------- AFEW-VA


def test_afewva(tmp_path):
    lm = landmarks68(5).tolist()
    for clip, actor in (("001", "Bob"), ("002", "Ann")):
        frames = {"00000": {"valence": 5, "arousal": -10, "landmarks": lm},
                  "00001": {"valence": 0, "arousal": 3, "landmarks": lm},
                  "00002": {"valence": 12, "arousal": 0, "landmarks": lm},
                  "00003": {"valence": 1, "arousal": 1, "landmarks": lm}}
        put(str(tmp_path / clip / f"{clip}.json"), json.dumps({"actor": actor, "video_id": clip, "frames": frames}))
        put(str(tmp_path / clip / "00000.png"), png(0))
        put(str(tmp_path / clip / "00001.png"), CORRUPT)
        put(str(tmp_path / clip / "00002.png"), png(2))
    rows, rejects = collect(get_reader("afewva")(str(tmp_path), folds=2))
    r = rows["afewva/001/00000"]
    assert r["valence"] == pytest.approx(0.5) and r["arousal"] == pytest.approx(-1.0) and r["label"] is None
    np.testing.assert_allclose(r["landmarks"], five(landmarks68(5)), atol=1e-6)
    assert r["split"] == "fold-1" and rows["afewva/002/00000"]["split"] == "fold-0"  # actors Ann, Bob
    assert rejects["afewva/001/00001"].startswith("corrupt")
    assert rejects["afewva/001/00002"].startswith("bad label")
    assert rejects["afewva/001/00003"].startswith("missing")


# ---------------------------------------------------------------- artifact + CLI


def test_write_image_table_end_to_end(tmp_path):
    write_rafdb(tmp_path / "raf")
    out = str(tmp_path / "table")
    seen = []
    manifest = write_image_table(get_reader("rafdb")(str(tmp_path / "raf")), out, stage="ingest",
                                 config={"format": "rafdb"}, rows_per_shard=2, on_record=seen.append)
    art = Artifact(out)
    assert len(art) == 5 and art.num_shards == 3 and len(seen) == 8
    t = art.read(["id", "label", "split", "source"]).to_pylist()
    by_id = {r["id"]: r for r in t}
    assert by_id["rafdb/test_0001"] == {"id": "rafdb/test_0001", "label": CLASS_INDEX["anger"], "split": "test",
                                        "source": "rafdb"}
    rej = Artifact(rejects_uri(out)).read().to_pylist()
    assert sorted(r["id"] for r in rej) == ["rafdb/test_0002", "rafdb/train_00004", "rafdb/train_00005"]
    assert manifest.extra["rejects"] == 3 and manifest.extra["reject_reasons"] == {"bad label": 1, "corrupt": 1,
                                                                                   "missing": 1}


def run_cli(args, capsys):
    from flows.cli import main

    code = 0
    try:
        main(args)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_ingest_and_inspect(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps tables to the terminal width
    write_ckplus(tmp_path / "ck")
    out = str(tmp_path / "ck-table")
    code, stdout, err = run_cli(["ingest", "ckplus", str(tmp_path / "ck"), out, "--rows-per-shard", "4",
                                 "--option", "folds=3"], capsys)
    assert code == 0, err
    assert "Traceback" not in err
    assert len(Artifact(out)) == 10 and Artifact(out).manifest.config["options"] == {"folds": 3}
    assert "fold-0" in stdout and "disgust" in stdout and "contempt" in stdout  # histogram + rejects tables
    grid = tmp_path / "grid.png"
    code, stdout, err = run_cli(["inspect", out, "--grid", str(grid), "--n", "2"], capsys)
    assert code == 0, err
    assert "ingest" in stdout and Artifact(out).digest in stdout and "rejects: 4" in stdout
    assert grid.exists() and decode(grid.read_bytes()).shape[0] > 100
    monkeypatch.chdir(tmp_path)  # default grid path: ./<artifact name>-samples.png
    code, _, err = run_cli(["inspect", out], capsys)
    assert code == 0, err
    assert (tmp_path / "ck-table-samples.png").exists()
    code, _, err = run_cli(["ingest", "ckplus", str(tmp_path / "ck"), out], capsys)  # artifacts are immutable
    assert code == 2 and "already a finished artifact" in err and "Traceback" not in err


def test_cli_option_values():
    from flows.commands.ingest import parse_options

    assert parse_options(["aligned=false", "limit=10", "margin=0.25", "fer2013_csv=/x/fer2013.csv", "split=nan",
                          "limit-2=none"]) == {"aligned": False, "limit": 10, "margin": 0.25,
                                               "fer2013_csv": "/x/fer2013.csv", "split": "nan", "limit_2": None}


def test_cli_ingest_synthetic(tmp_path, capsys):
    if "synthetic" not in available():
        pytest.skip("storage.synthetic does not register a 'synthetic' reader yet")
    out = str(tmp_path / "syn")
    code, stdout, err = run_cli(["ingest", "synthetic", "-", out, "-o", "size=32", "-o", "train_per_class=2",
                                 "-o", "test_per_class=1", "-o", "val_per_class=0", "-o", "pool_size=3"], capsys)
    assert code == 0, err
    assert len(Artifact(out)) == 7 * 2 + 7 + 3


@pytest.mark.parametrize("args, message", [
    (["ingest", "rafdb", "/no/such/folder", "OUT"], "not a folder"),
    (["ingest", "nosuchformat", "ROOT", "OUT"], "unknown data set format"),
    (["ingest", "jaffe", "ROOT", "OUT", "--option", "colour=blue"], "no option colour"),
    (["ingest", "jaffe", "ROOT", "OUT", "--option", "colour"], "key=value"),
    (["inspect", "/no/such/artifact"], "no artifact"),
])
def test_cli_user_errors(tmp_path, capsys, args, message):
    args = [a.replace("ROOT", str(tmp_path)).replace("OUT", str(tmp_path / "out")) for a in args]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
