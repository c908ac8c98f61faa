"""The synthetic FER generator: determinism, counts, landmarks, valence/arousal, label noise, pool, reader,
and that a small CNN finds it learnable but not trivial."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest

from storage.images import decode
from storage.schema import CLASS_INDEX, CLASSES, NUM_CLASSES, image_row
from storage.synthetic import (
    SyntheticConfig,
    clean_labels,
    config_from_options,
    generate,
    render_sample,
    sample_truth,
)

SMALL = SyntheticConfig(size=48, train_per_class=12, test_per_class=4, val_per_class=2, pool_size=40)
# Faces only, unoccluded, noiseless: for checks of where things are drawn.
CLEAN = SyntheticConfig(size=64, train_per_class=30, test_per_class=0, pool_size=0, occlusion_prob=0.0,
                        noise_std=0.0)


def _by_split(rows):
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["split"], []).append(r)
    return out


def test_same_config_gives_identical_bytes_and_any_sample_renders_alone():
    a = list(generate(SMALL))
    b = list(generate(SMALL))
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert all(x == y for x, y in zip(a, b))
    # A sample rendered on its own is the same row as in the full run (per-sample RNG).
    for split, i in (("train", 7), ("test", 3), ("pool", 11)):
        row = render_sample(SMALL, split, i)
        assert row == next(r for r in a if r["id"] == f"synthetic/{split}/{i:06d}")
    # Another seed is another data set.
    c = list(generate(SyntheticConfig(**{**SMALL.__dict__, "seed": 1})))
    assert sum(x["image"] == y["image"] for x, y in zip(a, c)) == 0


def test_every_class_in_the_requested_counts_and_rows_are_valid():
    rows = list(generate(SMALL))
    splits = _by_split(rows)
    assert list(splits) == ["train", "val", "test", "pool"]
    for split, per in (("train", 12), ("val", 2), ("test", 4)):
        assert Counter(r["label"] for r in splits[split]) == {k: per for k in range(NUM_CLASSES)}
        assert [r["id"] for r in splits[split]] == [f"synthetic/{split}/{i:06d}" for i in range(per * NUM_CLASSES)]
    assert len(splits["pool"]) == 40
    for r in rows:
        image_row(**r)  # the schema accepts every row
        img = decode(r["image"])
        assert img.shape == (48, 48, 3) and r["image"][:4] == b"\x89PNG"
        assert r["source"] == "synthetic"
    # The default config is the documented size: 150 + 50 per class, 64 px.
    d = SyntheticConfig()
    assert (d.size, d.count("train"), d.count("test"), d.count("val")) == (64, 1050, 350, 0)


def test_landmarks_lie_on_the_drawn_features():
    rows = list(generate(CLEAN))
    darker_eyes = darker_mouth = 0
    for r in rows:
        img = decode(r["image"]).astype(float).mean(axis=2)
        lm = np.array(r["landmarks"]).reshape(5, 2)
        assert (lm >= 0).all() and (lm <= 63).all(), r["id"]
        le, re_, nose, lm_, rm = lm
        # Geometry: eyes above the nose above the mouth, image-left before image-right.
        assert le[0] < re_[0] and lm_[0] < rm[0]
        assert max(le[1], re_[1]) < nose[1] < max(lm_[1], rm[1]) + 2

        def patch(p, r_=1, img=img):
            x, y = int(round(p[0])), int(round(p[1]))
            return img[y - r_:y + r_ + 1, x - r_:x + r_ + 1].mean()

        # Cheek: halfway between an eye and the nose tip, pushed outwards: plain skin.
        cheeks = [patch((e + nose) / 2 + [(e[0] - nose[0]) * 0.5, 0]) for e in (le, re_)]
        darker_eyes += all(patch(e) < c - 8 for e, c in zip((le, re_), cheeks))
        darker_mouth += all(patch(m, 0) < c - 4 for m, c in zip((lm_, rm), cheeks))
    assert darker_eyes >= 0.9 * len(rows), f"eye landmarks darker than the cheek in only {darker_eyes}/{len(rows)}"
    assert darker_mouth >= 0.8 * len(rows), f"mouth corners darker than the cheek in only {darker_mouth}/{len(rows)}"


def test_landmarks_scale_with_the_image_size():
    # Same sample, same face at any size: landmarks scale exactly.
    for i in range(3):
        a = np.array(render_sample(SyntheticConfig(size=64), "train", i)["landmarks"])
        b = np.array(render_sample(SyntheticConfig(size=112), "train", i)["landmarks"])
        np.testing.assert_allclose((a + 0.5) * 112 / 64 - 0.5, b, atol=1e-3)
        assert decode(render_sample(SyntheticConfig(size=112), "train", i)["image"]).shape == (112, 112, 3)


def test_valence_arousal_follow_the_expression():
    cfg = SyntheticConfig(size=32, train_per_class=40, test_per_class=0, pool_size=0)
    truth = sample_truth(cfg)
    rows = list(generate(cfg))
    va: dict[str, list[tuple[float, float, float]]] = {c: [] for c in CLASSES}
    for r in rows:
        assert -1 <= r["valence"] <= 1 and -1 <= r["arousal"] <= 1
        t = truth[r["id"]]
        assert (t.valence, t.arousal) == pytest.approx((r["valence"], r["arousal"]))
        va[CLASSES[r["label"]]].append((r["valence"], r["arousal"], t.intensity))
    mean = {c: np.mean(np.array(v)[:, :2], axis=0) for c, v in va.items()}
    assert abs(mean["neutral"][0]) < 0.1 and abs(mean["neutral"][1]) < 0.1
    assert mean["happy"][0] > 0.4 and mean["happy"][1] > 0.15
    assert mean["anger"][0] < -0.3 and mean["anger"][1] > 0.4
    assert mean["sad"][0] < -0.3 and mean["sad"][1] < -0.15
    assert mean["surprise"][1] > 0.5 and mean["surprise"][1] > mean["anger"][1] - 0.1
    assert mean["fear"][0] < -0.3 and mean["fear"][1] > 0.4
    assert mean["disgust"][0] < -0.3 and 0.05 < mean["disgust"][1] < mean["anger"][1]
    # Per sample, not just on average: signs hold for (nearly) every happy / sad face...
    assert np.mean([v > 0 for v, _, _ in va["happy"]]) > 0.95
    assert np.mean([a < 0 for _, a, _ in va["sad"]]) > 0.9
    # ...and the strength follows the expression's intensity.
    h = np.array(va["happy"])
    assert np.corrcoef(h[:, 0], h[:, 2])[0, 1] > 0.8


@pytest.mark.parametrize("kind", ["symmetric", "asymmetric"])
def test_label_noise_flips_the_requested_fraction_and_keeps_the_clean_labels(kind):
    rate = 0.3
    base = dict(size=24, train_per_class=40, test_per_class=10, pool_size=0)
    noisy = SyntheticConfig(**base, label_noise=rate, noise_kind=kind)
    clean_cfg = SyntheticConfig(**base)
    rows = list(generate(noisy, splits=("train", "test")))
    clean = clean_labels(noisy)
    # The clean labels are those of the same config without noise, and the images do not change.
    ref = {r["id"]: r for r in generate(clean_cfg)}
    assert all(clean[r["id"]] == ref[r["id"]]["label"] for r in rows)
    assert all(r["image"] == ref[r["id"]]["image"] for r in rows[:20])
    train = [r for r in rows if r["split"] == "train"]
    flips = [(clean[r["id"]], r["label"]) for r in train if r["label"] != clean[r["id"]]]
    assert all(r["label"] == clean[r["id"]] for r in rows if r["split"] == "test"), "test labels stay clean"
    fear, surprise = CLASS_INDEX["fear"], CLASS_INDEX["surprise"]
    if kind == "symmetric":
        assert len(flips) == NUM_CLASSES * round(rate * 40)
        assert {c for c, _ in flips} == set(range(NUM_CLASSES))
        assert len({n for _, n in flips}) == NUM_CLASSES  # flipped to every class, not one
    else:
        assert len(flips) == 2 * round(rate * 40)
        assert set(flips) == {(fear, surprise), (surprise, fear)}
    # The truth records both labels, and the same config draws the same noise again.
    t = sample_truth(noisy)
    assert sum(v.label != v.clean_label for v in t.values()) == len(flips)
    assert [r["label"] for r in generate(noisy, splits=("train",))] == [r["label"] for r in train]


def test_pool_mixes_expressive_neutral_faces_and_distractors():
    cfg = SyntheticConfig(size=32, train_per_class=0, test_per_class=0, pool_size=80, pool_expressive=0.5,
                          pool_neutral=0.25, pool_distractor=0.25)
    rows = list(generate(cfg))
    truth = sample_truth(cfg)
    assert len(rows) == 80 and {r["split"] for r in rows} == {"pool"}
    assert all(r["label"] is None and r["valence"] is None for r in rows)  # the truth is hidden
    kinds = Counter(truth[r["id"]].kind for r in rows)
    assert kinds == {"face": 40, "neutral": 20, "distractor": 20}
    for r in rows:
        t = truth[r["id"]]
        if t.kind == "distractor":
            assert r["landmarks"] is None and t.clean_label is None
        else:
            assert r["landmarks"] is not None
            assert (t.clean_label == CLASS_INDEX["neutral"]) == (t.kind == "neutral")
    expressive = Counter(CLASSES[truth[r["id"]].clean_label] for r in rows if truth[r["id"]].kind == "face")
    assert "neutral" not in expressive and len(expressive) >= 5


def test_style_b_is_another_domain():
    a = SyntheticConfig(size=32, train_per_class=3, test_per_class=0, pool_size=0)
    b = SyntheticConfig(size=32, train_per_class=3, test_per_class=0, pool_size=0, style="b")
    ra, rb = list(generate(a)), list(generate(b))
    assert {r["source"] for r in rb} == {"synthetic-b"}
    assert [r["label"] for r in ra] != [r["label"] for r in rb] or all(x["image"] != y["image"]
                                                                       for x, y in zip(ra, rb))
    assert SyntheticConfig(source="mine").source_name == "mine"


def test_bad_configs_say_what_is_wrong():
    with pytest.raises(ValueError, match="label_noise"):
        SyntheticConfig(label_noise=1.5)
    with pytest.raises(ValueError, match="noise_kind"):
        SyntheticConfig(noise_kind="pairwise")
    with pytest.raises(ValueError, match="style"):
        SyntheticConfig(style="c")
    with pytest.raises(ValueError, match="unknown synthetic option.*valid: seed"):
        config_from_options(sizes=64)
    with pytest.raises(ValueError, match="size='big' is not a valid int"):
        config_from_options(size="big")
    with pytest.raises(ValueError, match="outside"):
        render_sample(SMALL, "train", 10_000)
    # Command-line strings are converted to the field types.
    cfg = config_from_options(size="32", label_noise="0.2", shared_identities="true", noisy_splits="train,val")
    assert (cfg.size, cfg.label_noise, cfg.shared_identities, cfg.noisy_splits) == (32, 0.2, True, ("train", "val"))


def test_reader_registration_writes_an_image_table():
    from storage.artifact import Artifact
    from storage.ingest import write_image_table
    from storage.readers import get_reader

    read = get_reader("synthetic")
    with pytest.raises(ValueError, match="unknown synthetic option"):
        read("", colour="red")  # checked when called, before any output exists
    with pytest.raises(ValueError, match="seed given twice"):
        read("3", seed=4)
    opts = dict(size="32", train_per_class=4, test_per_class=2, pool_size=6, label_noise=0.25)
    uri = "memory://fermine-test-synthetic/table"
    m = write_image_table(read("5", **opts), uri, stage="ingest.synthetic", config={"options": opts})
    t = Artifact(uri).read()
    assert m.rows == len(t) == 7 * 6 + 6 and m.extra["rejects"] == 0
    assert Counter(t.column("split").to_pylist()) == {"train": 28, "test": 14, "pool": 6}
    # ROOT "5" is the seed: the table holds exactly what generate() makes for seed 5.
    want = list(generate(config_from_options(seed=5, **opts)))
    assert t.column("id").to_pylist() == [r["id"] for r in want]
    assert t.column("image").to_pylist() == [r["image"] for r in want]
    assert t.column("label").to_pylist() == [r["label"] for r in want]


def test_generation_is_fast():
    cfg = SyntheticConfig(train_per_class=30, test_per_class=0, pool_size=90)  # 300 images at 64 px
    t0 = time.perf_counter()
    n = sum(1 for _ in generate(cfg))
    per_image = (time.perf_counter() - t0) / n
    # ~1.5-3 ms on one core; the bound leaves room for a busy shared CI machine.
    assert per_image < 0.02, f"{per_image * 1000:.1f} ms per image"


@pytest.mark.slow
def test_small_cnn_learns_it_but_does_not_solve_it():
    """The demo's premise: learnable (well above 1/7 chance) yet far from 100%, so methods can show gains."""
    import torch
    import torch.nn.functional as F

    from tasks.models import build_model

    cfg = SyntheticConfig(size=48, pool_size=0)  # the default set (150 + 50 per class), at 48 px
    rows = list(generate(cfg))

    def tensors(split):
        rs = [r for r in rows if r["split"] == split]
        x = torch.from_numpy(np.stack([decode(r["image"]) for r in rs])).permute(0, 3, 1, 2).float() / 127.5 - 1
        return x, torch.tensor([r["label"] for r in rs])

    xtr, ytr = tensors("train")
    xte, yte = tensors("test")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine one thread is much faster than two contending ones
    try:
        torch.manual_seed(0)
        net = build_model("small_cnn")
        epochs, bs = 10, 32
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        # One-cycle: ends at a tiny lr, so the final weights (and BN statistics) are settled rather than
        # caught mid-oscillation, which a constant lr gives on 1050 images.
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * -(-len(xtr) // bs))
        g = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            net.train()
            perm = torch.randperm(len(xtr), generator=g)
            for i in range(0, len(perm), bs):
                b = perm[i:i + bs]
                x = xtr[b].clone()
                flip = torch.rand(len(b), generator=g) < 0.5
                x[flip] = x[flip].flip(-1)
                loss = F.cross_entropy(net(x), ytr[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        net.eval()
        with torch.no_grad():
            acc = (net(xte).argmax(1) == yte).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    print(f"small_cnn: test accuracy {acc:.3f} after {epochs} epochs")  # shown with pytest -s
    # Measured: 0.72 (seeds 1, 2 of the data: 0.72, 0.80); chance is 0.14.
    assert 0.35 < acc < 0.95, f"test accuracy {acc:.3f} after {epochs} epochs"


# --------------------------------------------------------------------------------------------
# Existing outputs are pinned; the challenge splits (PASM Table III: occlusion, pose > 30 / > 45)


def _round(x):
    if x is None:
        return None
    return [round(float(v), 6) for v in x] if isinstance(x, list) else round(float(x), 6)


def _rows_digest(rows) -> str:
    """Ids, labels, splits, V/A, landmarks and decoded pixels (not PNG bytes, which an encoder update could
    change without changing the image) of ``rows``, in order."""
    import hashlib
    import json

    h = hashlib.sha256()
    for r in rows:
        meta = [r["id"], r["label"], r["split"], r["source"], _round(r["valence"]), _round(r["arousal"]),
                _round(r["landmarks"])]
        h.update(json.dumps(meta).encode())
        h.update(decode(r["image"]).tobytes())
    return h.hexdigest()[:16]


def _truth_digest(cfg) -> str:
    import hashlib
    import json

    h = hashlib.sha256()
    for t in sample_truth(cfg).values():
        h.update(json.dumps([t.id, t.split, t.kind, t.clean_label, t.label, _round(t.intensity), t.identity,
                             _round(t.valence), _round(t.arousal)]).encode())
    return h.hexdigest()[:16]


DEMO = SyntheticConfig(size=48, train_per_class=150, test_per_class=50, pool_size=700)  # flows/configs/demo.yaml
DEMO_CROSS = SyntheticConfig(size=48, style="b", seed=1, train_per_class=0, test_per_class=30, pool_size=0)
NOISY = SyntheticConfig(size=32, train_per_class=6, val_per_class=2, test_per_class=3, pool_size=20, label_noise=0.3,
                        shared_identities=True)


def test_existing_outputs_are_pinned():
    """The demo's published numbers depend on these bytes: digests computed before the challenge splits existed.

    If this fails, an edit changed the images, ids, labels or order of existing configs; new options must
    default to leaving them as they are.
    """
    d = SyntheticConfig()
    assert _rows_digest(render_sample(DEMO, s, i) for s in ("train", "test", "pool")
                        for i in range(0, DEMO.count(s), 25)) == "1c8f58fae1110663"
    assert _rows_digest(render_sample(d, s, i) for s in ("train", "test", "pool")
                        for i in range(0, d.count(s), 50)) == "5f33171c5a834d86"
    assert _rows_digest(generate(DEMO_CROSS)) == "36bcf02ba9b608e1"
    assert _rows_digest(generate(NOISY)) == "6eded1fe37ccb655"
    # Every id, label, identity and V/A of the full default set, in order (no rendering needed).
    assert _truth_digest(d) == "0207702462a9a3db"
    assert _truth_digest(DEMO_CROSS) == "ddd7ed99765b2642"
    assert _truth_digest(NOISY) == "5f40621b4ec41b83"
    assert [s for s in ("train", "val", "test", "pool", "test_occlusion", "test_pose30", "test_pose45")
            if d.count(s)] == ["train", "test", "pool"]  # the challenge splits are off by default


CHALLENGE = SyntheticConfig(size=48, train_per_class=2, test_per_class=2, pool_size=5, occlusion_test_per_class=6,
                            pose_test_per_class=6)


def test_challenge_splits_have_balanced_clean_labels_and_their_own_ids_after_the_others():
    rows = list(generate(CHALLENGE))
    splits = _by_split(rows)
    assert list(splits) == ["train", "test", "pool", "test_occlusion", "test_pose30", "test_pose45"]
    truth = sample_truth(CHALLENGE)
    for split in ("test_occlusion", "test_pose30", "test_pose45"):
        rs = splits[split]
        assert CHALLENGE.count(split) == len(rs) == 6 * NUM_CLASSES
        assert [r["id"] for r in rs] == [f"synthetic/{split}/{i:06d}" for i in range(6 * NUM_CLASSES)]
        assert Counter(r["label"] for r in rs) == {k: 6 for k in range(NUM_CLASSES)}
        assert all(truth[r["id"]].clean_label == r["label"] for r in rs)  # clean labels
        for r in rs:  # filled like test: landmarks, valence/arousal, a valid row
            image_row(**r)
            assert len(r["landmarks"]) == 10 and -1 <= r["valence"] <= 1 and -1 <= r["arousal"] <= 1
            assert decode(r["image"]).shape == (48, 48, 3)
            t = truth[r["id"]]
            assert (t.valence, t.arousal) == pytest.approx((r["valence"], r["arousal"]))
    # Turning the challenge splits on leaves every other row as it was.
    base = SyntheticConfig(**{**CHALLENGE.__dict__, "occlusion_test_per_class": 0, "pose_test_per_class": 0})
    assert [r for r in rows if r["split"] in ("train", "test", "pool")] == list(generate(base))
    # Only the challenge splits record pose and occlusion (the others draw them mid-rendering).
    assert all(t.occluded is None and t.pose_deg is None for t in truth.values()
               if t.split in ("train", "test", "pool"))
    # Their people are their own (like test's), unless shared_identities.
    from storage.synthetic import _identity

    assert _identity(0, "a", "test_pose30", 3, False) != _identity(0, "a", "test", 3, False)
    assert _identity(0, "a", "test_pose30", 3, True) == _identity(0, "a", "test", 3, True)


def test_challenge_splits_are_deterministic_and_render_alone():
    a = list(generate(CHALLENGE, splits=("test_occlusion", "test_pose45")))
    assert a == list(generate(CHALLENGE, splits=("test_occlusion", "test_pose45")))
    assert render_sample(CHALLENGE, "test_pose45", 5) == next(r for r in a if r["id"] == "synthetic/test_pose45/000005")
    assert sample_truth(CHALLENGE) == sample_truth(CHALLENGE)
    other = list(generate(SyntheticConfig(**{**CHALLENGE.__dict__, "seed": 1}), splits=("test_occlusion",)))
    assert sum(x["image"] == y["image"] for x, y in zip(a, other)) == 0


def _eye_line_deg(row) -> float:
    # Both eye landmarks sit at the same canonical height, so the eye line's angle is the in-plane pose.
    le, re_ = np.array(row["landmarks"]).reshape(5, 2)[:2]
    return float(np.degrees(np.arctan2(re_[1] - le[1], re_[0] - le[0])))


def test_every_occlusion_face_is_occluded_and_the_truth_matches_the_pixels(monkeypatch):
    import storage.synthetic as synth

    truth = sample_truth(CHALLENGE)
    rows = [r for r in generate(CHALLENGE) if r["split"] in synth.CHALLENGE_SPLITS]
    assert all(truth[r["id"]].occluded is True for r in rows if r["split"] == "test_occlusion")
    monkeypatch.setattr(synth, "_occlude", lambda cv, rng, idn: None)  # the same samples without occluders
    changed_occ = []
    for r in rows:
        bare = decode(render_sample(CHALLENGE, r["split"], int(r["id"][-6:]))["image"]).astype(int)
        changed = float((np.abs(decode(r["image"]).astype(int) - bare).max(axis=2) > 24).mean())
        if truth[r["id"]].occluded:
            changed_occ.append(changed)
            assert changed > 0.01, f"{r['id']}: the occluder changed only {changed:.1%} of the pixels"
        else:
            assert changed == 0.0, r["id"]  # no occluder drawn where the truth says none
    assert len(changed_occ) >= 6 * NUM_CLASSES
    # The occlusion split's pose is test's: normal with sd pose_deg, clipped at 2.2 sd.
    occ_pose = [truth[r["id"]].pose_deg for r in rows if r["split"] == "test_occlusion"]
    assert max(abs(p) for p in occ_pose) <= 2.2 * CHALLENGE.pose_deg + 1e-9
    assert 3 < np.std(occ_pose) < 11


def test_pose_splits_are_beyond_their_thresholds():
    from storage.synthetic import POSE_TEST_DEG

    cfg = SyntheticConfig(size=48, train_per_class=0, test_per_class=0, pool_size=0, pose_test_per_class=20)
    truth = sample_truth(cfg)
    rows = list(generate(cfg))
    for split, (lo, hi) in (("test_pose30", (30, 60)), ("test_pose45", (45, 75))):
        assert POSE_TEST_DEG[split] == (lo, hi)
        rs = [r for r in rows if r["split"] == split]
        pose = np.array([truth[r["id"]].pose_deg for r in rs])
        assert ((np.abs(pose) > lo) & (np.abs(pose) <= hi)).all(), split
        assert (pose > 0).sum() > 0.3 * len(pose) and (pose < 0).sum() > 0.3 * len(pose)  # both directions
        # The faces are drawn at the recorded angle: the eye line of the landmarks says so.
        np.testing.assert_allclose([_eye_line_deg(r) for r in rs], pose, atol=1e-3)
        # Occlusion follows occlusion_prob (0.25), as in test.
        occ = np.mean([truth[r["id"]].occluded for r in rs])
        assert 0.1 < occ < 0.4, (split, occ)
    # Default test faces stay within the training pose range (clipped at 2.2 sd = 15.4 degrees).
    test = [r for r in generate(SyntheticConfig(size=48, train_per_class=0, test_per_class=5, pool_size=0))]
    assert max(abs(_eye_line_deg(r)) for r in test) <= 2.2 * 7.0 + 1e-3


def test_challenge_split_options_are_validated_and_reach_the_reader():
    from storage.readers import check_options, get_reader

    with pytest.raises(ValueError, match="occlusion_test_per_class=-1 must be >= 0"):
        SyntheticConfig(occlusion_test_per_class=-1)
    with pytest.raises(ValueError, match="pose_test_per_class=-2 must be >= 0"):
        SyntheticConfig(pose_test_per_class=-2)
    with pytest.raises(ValueError, match="always clean-labeled"):
        SyntheticConfig(label_noise=0.2, noisy_splits=("train", "test_pose30"))
    with pytest.raises(ValueError, match="pose_test_per_class='many' is not a valid int"):
        config_from_options(pose_test_per_class="many")
    with pytest.raises(ValueError, match="outside"):
        render_sample(SMALL, "test_occlusion", 0)  # SMALL has none
    with pytest.raises(ValueError, match="test_pose45"):
        render_sample(SMALL, "test_pose60", 0)  # the message lists the splits
    cfg = config_from_options(occlusion_test_per_class="3", pose_test_per_class="2")
    assert (cfg.count("test_occlusion"), cfg.count("test_pose30"), cfg.count("test_pose45")) == (21, 14, 14)
    # `fermine ingest synthetic -o pose_test_per_class=...` accepts the new fields and emits the splits.
    check_options("synthetic", {"occlusion_test_per_class": 1, "pose_test_per_class": 1})
    rows = list(get_reader("synthetic")("2", size="24", train_per_class=0, test_per_class=1, pool_size=0,
                                        occlusion_test_per_class=1, pose_test_per_class="2"))
    assert Counter(r["split"] for r in rows) == {"test": 7, "test_occlusion": 7, "test_pose30": 14, "test_pose45": 14}
