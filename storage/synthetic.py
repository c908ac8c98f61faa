"""The embedded synthetic FER data set: procedurally drawn faces with seven expressions.

No public FER data set can be downloaded here, so every demo and test runs on this generator.
It is built to be *learnable but not trivial*, so the methods have room to show gains:

* Expressions are driven by facial-action-like cues (mouth curve/opening/width/asymmetry, brow
  height/tilt/pull, eye openness, cheek raise, nose wrinkle, glabella lines). Each class is a
  prototype cue vector; a sample shows ``intensity * prototype`` on top of the person's resting
  face, plus per-sample jitter. Weak intensities are genuinely ambiguous (neutral vs weak sad),
  and the prototypes overlap the way real expressions do (fear vs surprise share raised brows,
  wide eyes and an open mouth; anger, disgust and sad share lowered mouth corners and brow cues).
* Nuisance factors: identities (face shape, skin tone, hair, eye spacing, glasses, moustache),
  pose (roll, scale, shift; landmarks move with it), lighting gradients, blur, sensor noise,
  random occluders over the eyes/mouth/face, background clutter.
* Valence/arousal follow the expression (circumplex model) scaled by the intensity.
* Five landmarks (eye centres, nose tip, mouth corners) are where they are drawn, in pixels.
* Optional label noise (symmetric, or asymmetric fear<->surprise) with the clean labels kept
  available through :func:`sample_truth` / :func:`clean_labels`.
* An unlabeled ``pool`` split mixes expressive faces, neutral faces and non-face distractors
  (shapes, textures, featureless head blobs), with their hidden truth in :func:`sample_truth`.
* A second rendering ``style="b"`` (palette, lighting, outlines, background) gives a shifted
  domain, source ``synthetic-b``, for cross-data-set evaluation.
* Challenge test splits modelled on PASM's Table III (Occlusion-RAF-DB, Pose-RAF-DB with head pose
  above 30 and 45 degrees): ``test_occlusion`` (every face occluded), ``test_pose30`` and
  ``test_pose45`` (in-plane pose beyond the threshold). They are off by default; see
  :data:`CHALLENGE_SPLITS` and :data:`POSE_TEST_DEG`.

Everything is deterministic: each sample has its own RNG derived from (seed, style, split, index),
so any subset can be rendered independently (:func:`render_sample`) and ``generate(cfg)`` always
yields identical bytes for the same config.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Any, Iterator

import cv2
import numpy as np

from storage.images import encode
from storage.label_noise import NOISE_KINDS, corrupt_labels
from storage.schema import CLASS_INDEX, CLASSES, NUM_CLASSES

# The challenge splits come last, so turning them on never moves a row of the other splits.
CHALLENGE_SPLITS: tuple[str, ...] = ("test_occlusion", "test_pose30", "test_pose45")
SPLITS: tuple[str, ...] = ("train", "val", "test", "pool") + CHALLENGE_SPLITS
STYLES: tuple[str, ...] = ("a", "b")
_SPLIT_CODE = {"train": 1, "val": 2, "test": 3, "pool": 4, "test_occlusion": 5, "test_pose30": 6, "test_pose45": 7}
# Pose splits: |in-plane angle| uniform in [lo, hi] degrees, random sign. The pose is the canvas's
# in-plane similarity transform (roll), the only pose these 2-D faces have; RAF-DB's pose subsets are
# mostly yaw/pitch, which a flat drawing cannot show. Ranges 30 degrees wide above each threshold,
# so pose30 also holds faces beyond 45 (as Pose-RAF-DB's >30 subset holds its >45 one). The training
# pose (normal, sd pose_deg, clipped at 2.2 sd: 15.4 degrees at the default 7) never reaches them:
# these splits measure extrapolation to unseen poses, a harder shift than RAF-DB's rare-but-seen ones.
POSE_TEST_DEG: dict[str, tuple[float, float]] = {"test_pose30": (30.0, 60.0), "test_pose45": (45.0, 75.0)}
_PER_CLASS = {"train": "train_per_class", "val": "val_per_class", "test": "test_per_class",
              "test_occlusion": "occlusion_test_per_class", "test_pose30": "pose_test_per_class",
              "test_pose45": "pose_test_per_class"}
_STYLE_CODE = {"a": 0, "b": 1}


@dataclass(frozen=True)
class SyntheticConfig:
    """What to generate. Defaults: 150 train + 50 test images per class at 64 px, plus a 700-image pool.

    Tuned so that small_cnn trained from scratch for 10 CPU epochs reaches ~0.72-0.80 test accuracy
    (chance 0.14; tests/test_synthetic.py): learnable, yet with room for the methods to gain.

    seed: everything derives from it; same config -> identical bytes.
    size: output side in pixels (square); drawing is resolution independent (64, 112, 224 ... all work).
    n_identities: distinct people per split (train/val/test/pool each get their own people unless
        ``shared_identities``), so test accuracy measures generalisation to new faces.
    shared_identities: draw every split from the same people instead.
    train_per_class / val_per_class / test_per_class: images per class in each labeled split
        (0 leaves the split out).
    occlusion_test_per_class: images per class in ``test_occlusion`` (0, the default, leaves it out):
        a test split of the same distribution in which every face carries an occluder (a bar over
        the eyes, a mask over the mouth, a vertical bar or a blob over the face), as Occlusion-RAF-DB.
    pose_test_per_class: images per class in each of ``test_pose30`` and ``test_pose45`` (0, the
        default, leaves them out): the same distribution with the in-plane pose angle's magnitude
        uniform in POSE_TEST_DEG (30-60 and 45-75 degrees), random sign, as Pose-RAF-DB (>30, >45).
        The challenge splits have their own people (unless ``shared_identities``), clean labels,
        landmarks and valence/arousal like ``test``; occlusion in the pose splits and pose in the
        occlusion split follow ``occlusion_prob`` and ``pose_deg`` as in ``test``.
    pool_size: images in the unlabeled ``pool`` split (label null), 0 leaves it out.
    pool_expressive / pool_neutral / pool_distractor: the pool mix; fractions, normalised to sum 1.
        Expressive faces are drawn uniformly from the six non-neutral classes.
    label_noise: fraction of each affected class whose *given* label is corrupted (0..1), per split
        in ``noisy_splits``; the clean label stays available through :func:`clean_labels`.
    noise_kind: "symmetric" (flip to one of the other six classes uniformly) or "asymmetric"
        (fear and surprise relabeled to each other; other classes untouched), as in the
        Progressive Teacher paper.
    noisy_splits: splits that get label noise (training labels by default; tests stay clean). The
        challenge splits are always clean.
    style: "a" (default domain) or "b" (shifted palette, lighting and rendering) for
        cross-data-set evaluation.
    source: the ``source`` column; empty means "synthetic" for style a, "synthetic-<style>" otherwise.
    intensity_min / intensity_max: range of expression intensity; low values are the hard,
        ambiguous samples.
    occlusion_prob: probability that an occluder (bar, mask, blob) covers part of the face.
    pose_deg: standard deviation of the in-plane rotation in degrees (clipped at 2.2 sd).
    noise_std: maximum standard deviation of the additive gaussian pixel noise (0..255 scale).
    fmt: image encoding, ".png" (lossless, default) or ".jpg".
    """

    seed: int = 0
    size: int = 64
    n_identities: int = 150
    shared_identities: bool = False
    train_per_class: int = 150
    val_per_class: int = 0
    test_per_class: int = 50
    pool_size: int = 700
    pool_expressive: float = 0.5
    pool_neutral: float = 0.25
    pool_distractor: float = 0.25
    label_noise: float = 0.0
    noise_kind: str = "symmetric"
    noisy_splits: tuple[str, ...] = ("train",)
    style: str = "a"
    source: str = ""
    intensity_min: float = 0.2
    intensity_max: float = 1.0
    occlusion_prob: float = 0.25
    pose_deg: float = 7.0
    noise_std: float = 6.0
    fmt: str = ".png"
    occlusion_test_per_class: int = 0
    pose_test_per_class: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not 16 <= self.size <= 1024:
            problems.append(f"size={self.size} must be between 16 and 1024 pixels")
        if self.n_identities < 1:
            problems.append(f"n_identities={self.n_identities} must be >= 1")
        for name in ("train_per_class", "val_per_class", "test_per_class", "pool_size",
                     "occlusion_test_per_class", "pose_test_per_class"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} must be >= 0")
        mix = (self.pool_expressive, self.pool_neutral, self.pool_distractor)
        if min(mix) < 0 or sum(mix) <= 0:
            problems.append(f"pool mix {mix} must be non-negative with a positive sum")
        if not 0.0 <= self.label_noise <= 1.0:
            problems.append(f"label_noise={self.label_noise} must be in 0..1")
        if self.noise_kind not in NOISE_KINDS:
            problems.append(f"noise_kind={self.noise_kind!r} must be one of {', '.join(NOISE_KINDS)}")
        bad = [s for s in self.noisy_splits if s not in SPLITS]
        if bad:
            problems.append(f"noisy_splits {bad} are not splits; choose from {', '.join(SPLITS)}")
        clean_only = [s for s in self.noisy_splits if s in CHALLENGE_SPLITS]
        if clean_only:
            problems.append(f"noisy_splits {clean_only} are challenge test splits, which are always "
                            "clean-labeled; label noise goes on train, val, test or pool")
        if self.style not in STYLES:
            problems.append(f"style={self.style!r} must be one of {', '.join(STYLES)}")
        if not 0.0 <= self.intensity_min <= self.intensity_max <= 1.5:
            problems.append(f"need 0 <= intensity_min ({self.intensity_min}) <= intensity_max "
                            f"({self.intensity_max}) <= 1.5")
        if not 0.0 <= self.occlusion_prob <= 1.0:
            problems.append(f"occlusion_prob={self.occlusion_prob} must be in 0..1")
        if self.pose_deg < 0 or self.noise_std < 0:
            problems.append("pose_deg and noise_std must be >= 0")
        if self.fmt not in (".png", ".jpg", ".jpeg"):
            problems.append(f"fmt={self.fmt!r} must be '.png' or '.jpg'")
        if problems:
            raise ValueError("invalid SyntheticConfig: " + "; ".join(problems))

    @property
    def source_name(self) -> str:
        if self.source:
            return self.source
        return "synthetic" if self.style == "a" else f"synthetic-{self.style}"

    def count(self, split: str) -> int:
        """Number of images in ``split``."""
        if split == "pool":
            return self.pool_size
        if split not in _PER_CLASS:
            raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        return NUM_CLASSES * int(getattr(self, _PER_CLASS[split]))


@dataclass(frozen=True)
class SampleTruth:
    """What a sample really is (the generator's hidden truth, for evaluating noise handling and mining).

    kind: "face" (expressive, labeled or pool), "neutral" (a pool neutral face) or "distractor" (no face).
    clean_label: the true class index (None for distractors); label: the label written to the table
    (noisy for noisy splits, None in the pool).
    occluded / pose_deg: whether an occluder was drawn and the in-plane pose angle (degrees, signed).
    Known for the challenge splits (CHALLENGE_SPLITS), which decide them before drawing; None for
    train/val/test/pool, whose pose and occlusion are drawn mid-rendering and not replayed here.
    """

    id: str
    split: str
    kind: str
    clean_label: int | None
    label: int | None
    intensity: float
    identity: int | None
    valence: float | None
    arousal: float | None
    occluded: bool | None = None
    pose_deg: float | None = None


# --------------------------------------------------------------------------------------------
# Expression model

# Cue order; each is roughly in -1..1 at full intensity.
#  curve: mouth-corner lift (+ smile, - frown)   open: jaw drop        width: mouth stretch (- = round/pressed)
#  asym: one-sided upper-lip raise (disgust)     brow: brow height    tilt: inner-brow lift (+ sad/fear, - anger)
#  pull: brows drawn together                    eye: lid aperture     cheek: cheek raise (lower lid up, smile lines)
#  wrinkle: nose wrinkle + nostril flare         glabella: vertical frown lines between the brows
CUES = ("curve", "open", "width", "asym", "brow", "tilt", "pull", "eye", "cheek", "wrinkle", "glabella")
_C = {c: i for i, c in enumerate(CUES)}


def _proto(**kw: float) -> np.ndarray:
    v = np.zeros(len(CUES))
    for k, x in kw.items():
        v[_C[k]] = x
    return v


# Prototypes overlap on purpose (see module docstring): fear/surprise share raise/eye/open;
# anger/disgust/sad share a negative curve and brow cues; neutral is the origin.
PROTOTYPES: dict[str, np.ndarray] = {
    "neutral": _proto(),
    "anger": _proto(curve=-0.3, width=-0.3, brow=-0.7, tilt=-1.0, pull=0.8, eye=0.15, wrinkle=0.15, glabella=1.0),
    "disgust": _proto(curve=-0.35, open=0.15, width=-0.05, asym=1.0, brow=-0.3, tilt=-0.25, pull=0.3, eye=-0.5,
                      cheek=0.2, wrinkle=1.0, glabella=0.3),
    "fear": _proto(curve=-0.25, open=0.5, width=0.45, brow=0.7, tilt=0.65, pull=0.5, eye=0.8, glabella=0.2),
    "happy": _proto(curve=1.0, open=0.3, width=0.3, brow=0.1, eye=-0.35, cheek=1.0),
    "sad": _proto(curve=-0.75, width=-0.05, brow=0.05, tilt=0.85, pull=0.3, eye=-0.35, glabella=0.2),
    "surprise": _proto(open=1.0, width=-0.4, brow=1.0, tilt=0.05, pull=-0.1, eye=0.95),
}

# Valence/arousal at full intensity (circumplex model); a sample gets intensity * this + jitter.
VA_PROTOTYPES: dict[str, tuple[float, float]] = {
    "neutral": (0.0, 0.0),
    "anger": (-0.6, 0.75),
    "disgust": (-0.65, 0.35),
    "fear": (-0.65, 0.7),
    "happy": (0.8, 0.45),
    "sad": (-0.65, -0.4),
    "surprise": (0.15, 0.85),
}

_NEUTRAL = CLASS_INDEX["neutral"]


# --------------------------------------------------------------------------------------------
# Identities

_SKIN = {
    # (RGB) anchors; a person's tone is a random blend of two neighbours plus jitter.
    "a": np.array([[255, 224, 196], [241, 194, 160], [224, 172, 130], [198, 134, 94], [160, 104, 70],
                   [112, 72, 48]], float),
    # Style b: a pinker, darker-shadowed palette (a different population and "camera").
    "b": np.array([[236, 210, 200], [226, 176, 160], [206, 150, 128], [176, 116, 96], [138, 88, 72],
                   [96, 62, 54]], float),
}
_HAIR = np.array([[20, 16, 14], [58, 38, 26], [96, 64, 40], [176, 140, 80], [140, 60, 30], [150, 150, 150],
                  [44, 34, 30]], float)
_IRIS = np.array([[60, 40, 25], [40, 30, 20], [70, 90, 110], [60, 90, 60], [30, 30, 30]], float)


@dataclass(frozen=True)
class _Identity:
    index: int
    cx: float
    cy: float
    fw: float  # face half-width (canvas units)
    fh: float  # face half-height
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    hair_style: int  # 0 short dome, 1 long, 2 bald-ish, 3 bangs
    hairline: float  # fraction of fh above centre where hair starts
    eye_dx: float  # half distance between eye centres
    eye_y: float
    eye_w: float  # eye half-width
    eye_h: float  # resting eye half-height factor
    iris: tuple[float, float, float]
    brow_gap: float
    brow_thick: float
    brow_len: float
    brow_arch: float
    nose_y: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    lip: tuple[float, float, float]
    glasses: bool
    moustache: bool
    clothes: tuple[float, float, float]
    rest: tuple[float, ...]  # resting-face offsets added to the cues (some people look a bit sad/angry)


@functools.lru_cache(maxsize=4096)  # a person appears in many samples; drawing their traits once is enough
def _identity(seed: int, style: str, split: str, index: int, shared: bool) -> _Identity:
    group = 0 if shared else _SPLIT_CODE[split]
    rng = np.random.default_rng([seed, 7919, _STYLE_CODE[style], group, index])
    # Tight crops, as aligned FER faces are: the face fills most of the frame.
    fw = rng.uniform(0.31, 0.37) * (1.05 if style == "b" else 1.0)
    fh = fw * rng.uniform(1.15, 1.3)
    cy = 0.53 + rng.normal(0, 0.01)
    pal = _SKIN[style]
    k = rng.uniform(0, len(pal) - 1)
    lo = int(k)
    skin = pal[lo] * (1 - (k - lo)) + pal[min(lo + 1, len(pal) - 1)] * (k - lo) + rng.normal(0, 6, 3)
    hair = _HAIR[rng.integers(len(_HAIR))] + rng.normal(0, 8, 3)
    eye_y = cy - fh * rng.uniform(0.08, 0.18)
    nose_y = eye_y + fh * rng.uniform(0.32, 0.40)
    mouth_y = nose_y + fh * rng.uniform(0.24, 0.32)
    rest = np.zeros(len(CUES))
    rest[_C["curve"]] = rng.normal(0, 0.12)
    rest[_C["tilt"]] = rng.normal(0, 0.15)
    rest[_C["brow"]] = rng.normal(0, 0.12)
    rest[_C["eye"]] = rng.normal(0, 0.1)
    rest[_C["width"]] = rng.normal(0, 0.1)
    return _Identity(
        index=index, cx=0.5 + rng.normal(0, 0.008), cy=cy, fw=fw, fh=fh,
        skin=tuple(np.clip(skin, 0, 255)), hair=tuple(np.clip(hair, 0, 255)),
        hair_style=int(rng.choice(4, p=[0.4, 0.3, 0.1, 0.2])), hairline=rng.uniform(0.45, 0.62),
        eye_dx=fw * rng.uniform(0.36, 0.46), eye_y=eye_y, eye_w=fw * rng.uniform(0.16, 0.2),
        eye_h=rng.uniform(0.45, 0.6), iris=tuple(_IRIS[rng.integers(len(_IRIS))]),
        brow_gap=fh * rng.uniform(0.08, 0.13), brow_thick=rng.uniform(0.016, 0.026),
        brow_len=fw * rng.uniform(0.38, 0.48), brow_arch=rng.uniform(0.004, 0.014),
        nose_y=nose_y, nose_w=fw * rng.uniform(0.12, 0.18), mouth_y=mouth_y, mouth_w=fw * rng.uniform(0.3, 0.4),
        lip=tuple(np.clip(skin * np.array([0.82, 0.55, 0.55]) + np.array([20, 0, 0]), 0, 255)),
        glasses=bool(rng.random() < 0.15), moustache=bool(rng.random() < 0.1),
        clothes=tuple(rng.uniform(30, 220, 3)), rest=tuple(rest),
    )


# --------------------------------------------------------------------------------------------
# Drawing

_SHIFT = 4  # sub-pixel precision bits for cv2 drawing
_ONE = 1 << _SHIFT


class _Canvas:
    """Draws in canonical face coordinates (0..1 canvas) through a similarity transform (pose)."""

    def __init__(self, img: np.ndarray, angle_deg: float = 0.0, scale: float = 1.0, shift=(0.0, 0.0)):
        self.img = img
        self.u = img.shape[0]
        self.angle = angle_deg
        a = math.radians(angle_deg)
        self.m = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        self.scale = scale
        self.t = np.array([0.5 + shift[0], 0.5 + shift[1]])

    def px(self, pts) -> np.ndarray:
        """Canonical -> render-pixel coordinates (float)."""
        p = np.asarray(pts, float).reshape(-1, 2)
        return ((p - 0.5) @ self.m.T + self.t) * self.u - 0.5

    def _i(self, pts) -> np.ndarray:
        return np.round(self.px(pts) * _ONE).astype(np.int32)

    def lw(self, w: float) -> int:
        return max(1, int(round(w * self.u * self.scale)))

    def poly(self, pts, color, width: float, closed: bool = False) -> None:
        cv2.polylines(self.img, [self._i(pts)], closed, _col(color), self.lw(width), cv2.LINE_AA, _SHIFT)

    def fill(self, pts, color) -> None:
        cv2.fillPoly(self.img, [self._i(pts)], _col(color), cv2.LINE_AA, _SHIFT)

    def ellipse(self, center, axes, color, width: float | None = None, angle: float = 0.0,
                start: float = 0.0, end: float = 360.0) -> None:
        c = self._i(center)[0]
        ax = (max(1, int(round(axes[0] * self.u * self.scale * _ONE))),
              max(1, int(round(axes[1] * self.u * self.scale * _ONE))))
        thick = -1 if width is None else self.lw(width)
        cv2.ellipse(self.img, (int(c[0]), int(c[1])), ax, angle + self.angle, start, end, _col(color), thick,
                    cv2.LINE_AA, _SHIFT)


def _muted(rgb: np.ndarray, keep: float = 0.55) -> np.ndarray:
    """Pull a colour towards its grey: backgrounds of real photos are rarely saturated."""
    return rgb.mean() + keep * (rgb - rgb.mean())


def _child(rng: np.random.Generator) -> np.random.Generator:
    """A generator for size-dependent draws (pixel noise), so the parent consumes the same number of
    values at every output size: the same sample is the same face at 64 px and at 224 px."""
    return np.random.default_rng(int(rng.integers(1 << 62)))


def _col(c) -> tuple[int, int, int]:
    return tuple(int(round(min(255.0, max(0.0, float(v))))) for v in c)


def _mix(a, b, t: float) -> tuple[float, float, float]:
    t = min(1.0, max(0.0, t))
    return tuple(float(x) * (1 - t) + float(y) * t for x, y in zip(a, b))


_BT = np.linspace(0, 1, 14)[:, None]
_BW = np.hstack([(1 - _BT) ** 2, 2 * (1 - _BT) * _BT, _BT ** 2])  # Bernstein weights, 14 x 3


def _bez(p0, c, p1) -> np.ndarray:
    """Quadratic Bezier through p0 and p1 with control c (the curve's midpoint is (p0 + 2c + p1) / 4)."""
    return _BW @ np.array([p0, c, p1], float)


def _background(img: np.ndarray, rng: np.random.Generator, style: str) -> None:
    u = img.shape[0]
    c1, c2 = _muted(rng.uniform(20, 235, 3)), _muted(rng.uniform(20, 235, 3))
    g = np.linspace(0, 1, u)[:, None]
    line = (c1 * (1 - g) + c2 * g).astype(np.uint8)  # u x 3: one colour per row (or column)
    if rng.random() < 0.5:
        img[:] = line[:, None, :]
    else:
        img[:] = line[None, :, :]
    if style == "b":  # a textured (striped) wall: a different background statistic from style a
        period = rng.uniform(0.05, 0.15) * u
        stripes = (np.sin(np.arange(u) / period * 2 * np.pi) > 0).astype(np.float32)[None, :, None]
        img[:] = np.clip(img * (0.85 + 0.15 * stripes), 0, 255).astype(np.uint8)
    for _ in range(rng.integers(0, 5)):  # clutter
        col = _col(_muted(rng.uniform(0, 255, 3)))
        kind = rng.integers(3)
        p = (rng.uniform(0, u, 2) * _ONE).astype(int)
        if kind == 0:
            q = (rng.uniform(0, u, 2) * _ONE).astype(int)
            cv2.line(img, tuple(p), tuple(q), col, max(1, int(rng.uniform(0.01, 0.05) * u)), cv2.LINE_AA, _SHIFT)
        elif kind == 1:
            ax = (rng.uniform(0.03, 0.2, 2) * u * _ONE).astype(int)
            cv2.ellipse(img, tuple(p), tuple(ax), float(rng.uniform(0, 180)), 0, 360, col, -1, cv2.LINE_AA, _SHIFT)
        else:
            q = p + (rng.uniform(0.05, 0.3, 2) * u * _ONE).astype(int)
            cv2.rectangle(img, tuple(p), tuple(q), col, -1, cv2.LINE_AA, _SHIFT)


def _draw_face(cv: _Canvas, rng: np.random.Generator, idn: _Identity, cue: np.ndarray, style: str,
               features: bool = True) -> np.ndarray:
    """Draw one face; returns the 5 landmarks in canonical coordinates (5 x 2).

    Feature offsets and line widths are multiples of ``z`` (the face's half-width relative to a
    reference face) so that expressions look the same on small and large faces.
    """
    cx, cy, fw, fh = idn.cx, idn.cy, idn.fw, idn.fh
    z = fw / 0.3
    skin = idn.skin
    dark = _mix(skin, (40, 25, 20), 0.6)
    line = (30, 20, 18)
    outline = 0.012 * z if style == "b" else 0.0  # style b draws contours, like a different renderer

    # Clothes/shoulders and neck.
    cv.ellipse((cx, cy + fh + 0.25), (fw * 2.0, 0.25), idn.clothes)
    cv.fill([(cx - fw * 0.45, cy + fh * 0.6), (cx + fw * 0.45, cy + fh * 0.6),
             (cx + fw * 0.5, cy + fh + 0.08), (cx - fw * 0.5, cy + fh + 0.08)], _mix(skin, (0, 0, 0), 0.18))
    if idn.hair_style == 1:  # long hair behind the head
        cv.ellipse((cx, cy + fh * 0.1), (fw * 1.22, fh * 1.15), idn.hair)
    for s in (-1, 1):  # ears
        cv.ellipse((cx + s * fw * 0.98, idn.eye_y + fh * 0.15), (fw * 0.12, fh * 0.16), _mix(skin, (0, 0, 0), 0.1))
    cv.ellipse((cx, cy), (fw, fh), skin)
    if outline:
        cv.ellipse((cx, cy), (fw, fh), _mix(skin, (0, 0, 0), 0.5), outline)
    # Hair on top: a half-ellipse whose flat base is the hairline (lower for bangs).
    if idn.hair_style != 2:
        hl = cy - fh * (idn.hairline * (0.65 if idn.hair_style == 3 else 1.0))
        half = fw * math.sqrt(max(0.0, 1 - ((hl - cy) / fh) ** 2))
        cv.ellipse((cx, hl), (max(half, fw * 0.7) + 0.012 * z, (hl - (cy - fh)) + 0.03 * z), idn.hair, None, 0, 180, 360)
    else:  # receding: a thin band of hair over the ears
        for s in (-1, 1):
            cv.ellipse((cx + s * fw * 0.93, cy - fh * 0.22), (fw * 0.08, fh * 0.2), _mix(idn.hair, skin, 0.3))

    if not features:
        return np.zeros((5, 2))

    c = {k: float(cue[i]) for k, i in _C.items()}
    # ---- eyes: almond from two Bezier lids; openness scales the lids, the cheek raise lifts the lower lid
    open_f = float(np.clip(1.0 + 0.8 * c["eye"], 0.15, 2.0))
    ew = idn.eye_w
    eh = ew * idn.eye_h * open_f
    lower_f = float(np.clip(0.85 - 0.6 * max(c["cheek"], 0.0), 0.15, 1.0))
    gaze = rng.normal(0, ew * 0.12)
    eyes = []
    for s in (-1, 1):
        ex, ey = cx + s * idn.eye_dx, idn.eye_y
        inner, outer = (ex - s * ew, ey), (ex + s * ew, ey + 0.004 * z)
        upper = _bez(inner, (ex, ey - 2 * eh), outer)
        lower = _bez(outer, (ex, ey + 2 * eh * lower_f), inner)
        cv.fill(np.vstack([upper, lower]), (240, 238, 232))
        ir = ew * 0.52
        iy = ey + eh * 0.05
        cv.ellipse((ex + gaze, iy), (ir, min(ir, eh * 0.95 * (0.55 + 0.45 * lower_f))), idn.iris)
        if eh > ir * 0.5:
            cv.ellipse((ex + gaze, iy), (ir * 0.45, min(ir * 0.45, eh * 0.5)), (8, 8, 8))
        cv.poly(upper, line, (0.013 + 0.004 * (style == "b")) * z)
        cv.poly(lower, dark, 0.006 * z)
        if c["cheek"] > 0.05:  # cheek bulge under the eye (Duchenne smile)
            cv.poly(_bez((ex - ew, ey + eh + ew * 0.6), (ex, ey + eh + ew * 0.15), (ex + ew, ey + eh + ew * 0.6)),
                    _mix(skin, dark, 0.9 * c["cheek"]), 0.008 * z)
        eyes.append((ex, ey))
    # ---- brows: height (brow), inner-end lift (tilt), drawn together (pull), arched when raised
    lift = 0.06 * z * c["brow"]
    tilt = c["tilt"]
    pull = 0.3 * ew * max(c["pull"], -0.5)
    brow_col = _mix(idn.hair, (0, 0, 0), 0.4)
    for s in (-1, 1):
        ex, ey = cx + s * idn.eye_dx, idn.eye_y
        base = ey - ew * idn.eye_h - idn.brow_gap - lift
        inner = (ex - s * (ew * 0.8 + pull), base - 0.045 * z * tilt)
        outer = (ex + s * (idn.brow_len * 1.6 - ew * 0.8), base + 0.015 * z * tilt + 0.006 * z)
        arch = idn.brow_arch * z + 0.025 * z * max(c["brow"] - max(tilt, 0), 0.0)
        mid = ((inner[0] + outer[0]) / 2, (inner[1] + outer[1]) / 2 - 2 * arch)
        cv.poly(_bez(inner, mid, outer), brow_col, idn.brow_thick * z)
    # ---- glabella (vertical frown lines of anger) and nose wrinkle (disgust)
    if c["glabella"] > 0.05:
        col = _mix(skin, dark, min(c["glabella"], 1.0))
        for s in (-1, 1):
            x = cx + s * ew * 0.25
            cv.poly([(x, idn.eye_y - ew * 1.3), (x + s * 0.003 * z, idn.eye_y - ew * 0.3)], col, 0.008 * z)
    ny = idn.nose_y
    nw = idn.nose_w * (1 + 0.35 * max(c["wrinkle"], 0.0))
    cv.poly([(cx + nw * 0.35, idn.eye_y + ew * 0.5), (cx + nw * 0.55, ny - ew * 0.4)], _mix(skin, dark, 0.45),
            0.007 * z)
    if c["wrinkle"] > 0.05:
        col = _mix(skin, dark, min(c["wrinkle"], 1.0))
        for k in range(3):
            y = idn.eye_y + ew * (0.3 + 0.45 * k)
            cv.poly(_bez((cx - nw * 0.8, y + 0.007 * z), (cx, y - 0.012 * z), (cx + nw * 0.8, y + 0.007 * z)), col,
                    0.009 * z)
    cv.poly(_bez((cx - nw, ny - 0.004 * z), (cx, ny + 0.03 * z), (cx + nw, ny - 0.004 * z)), _mix(skin, dark, 0.6),
            0.007 * z)
    for s in (-1, 1):
        cv.ellipse((cx + s * nw * 0.45, ny + 0.004 * z), (nw * 0.28, nw * 0.15), _mix(dark, (0, 0, 0), 0.4))
    # ---- mouth: corners lifted by the curve (one side by the asymmetric sneer), lips opened by the jaw drop
    mw = idn.mouth_w * float(np.clip(1 + 0.4 * c["width"], 0.5, 1.7))
    my = idn.mouth_y
    lift = 0.08 * z * c["curve"]
    side = 1 if rng.random() < 0.5 else -1
    asym = 0.055 * z * max(c["asym"], 0.0)
    left = (cx - mw, my - lift - (asym if side < 0 else 0.0))
    right = (cx + mw, my - lift - (asym if side > 0 else 0.0))
    ends = (left[1] + right[1]) / 2
    mid_y = my + 0.025 * z * c["curve"]
    opening = max(c["open"], 0.0)
    upper_c = (cx + side * mw * 0.3 * (asym > 0), 2 * (mid_y - 0.04 * z * opening - asym * 0.6) - ends)
    lower_c = (cx, 2 * (mid_y + 0.12 * z * opening) - ends)
    upper = _bez(left, upper_c, right)
    lower = _bez(right, lower_c, left)
    if opening > 0.08:
        cv.fill(np.vstack([upper, lower]), (60, 15, 20))
        if rng.random() < (0.9 if c["curve"] > 0.3 else 0.5):  # teeth: nearly always in an open smile
            gap = min(0.025 * z, 0.07 * z * opening)
            cv.fill(np.vstack([upper, upper[::-1] + [0, gap]]), (242, 240, 230))
        cv.poly(upper, idn.lip, 0.014 * z)
        cv.poly(lower, idn.lip, 0.016 * z)
    else:
        pressed = c["width"] < -0.2  # pressed lips: a thin hard line
        cv.poly(upper, _mix(idn.lip, line, 0.75 if pressed else 0.5), (0.013 if pressed else 0.017) * z)
        if not pressed:
            cv.poly(_bez(right, (cx, 2 * (mid_y + 0.022 * z) - ends), left), idn.lip, 0.009 * z)
    if c["cheek"] > 0.05 or c["asym"] > 0.4:  # nasolabial folds (smile, or the sneer of disgust)
        k = max(c["cheek"], 0.6 * c["asym"])
        col = _mix(skin, dark, 0.85 * min(k, 1.0))
        for s in (-1, 1):
            cv.poly(_bez((cx + s * nw * 1.2, ny - 0.01 * z), (cx + s * (mw + 0.025 * z), (ny + my) / 2),
                         (cx + s * (mw + 0.015 * z), my + 0.006 * z)), col, 0.007 * z)
    # ---- accessories
    if idn.moustache:
        cv.fill(np.vstack([_bez((cx - mw * 0.9, my - 0.014 * z), (cx, my - 0.055 * z), (cx + mw * 0.9, my - 0.014 * z)),
                           _bez((cx + mw * 0.9, my - 0.014 * z), (cx, my - 0.028 * z), (cx - mw * 0.9, my - 0.014 * z))]),
                idn.hair)
    if idn.glasses:
        for ex, ey in eyes:
            cv.ellipse((ex, ey), (ew * 1.45, ew * 1.05), (25, 25, 25), 0.008 * z)
        cv.poly([(cx - idn.eye_dx + ew * 1.45, idn.eye_y), (cx + idn.eye_dx - ew * 1.45, idn.eye_y)],
                (25, 25, 25), 0.008 * z)
    return np.array([eyes[0], eyes[1], (cx, ny), left, right])


def _occlude(cv: _Canvas, rng: np.random.Generator, idn: _Identity) -> None:
    kind = rng.integers(4)
    col = rng.uniform(0, 255, 3)
    cx, cy, fw, fh = idn.cx, idn.cy, idn.fw, idn.fh
    if kind == 0:  # bar across the eyes (sunglasses, hair band)
        y = idn.eye_y + rng.normal(0, 0.01)
        h = rng.uniform(0.035, 0.06)
        cv.fill([(cx - fw * 1.1, y - h), (cx + fw * 1.1, y - h), (cx + fw * 1.1, y + h), (cx - fw * 1.1, y + h)], col)
    elif kind == 1:  # mask / scarf over the mouth
        y = idn.mouth_y + rng.uniform(-0.03, 0.03)
        cv.ellipse((cx, y + 0.05), (fw * rng.uniform(0.8, 1.05), rng.uniform(0.07, 0.11)), col)
    elif kind == 2:  # vertical bar (a hand, a pole) over one side
        x = cx + rng.uniform(-fw, fw)
        w = rng.uniform(0.04, 0.08)
        cv.fill([(x - w, cy - fh * 1.2), (x + w, cy - fh * 1.2), (x + w, cy + fh * 1.2), (x - w, cy + fh * 1.2)], col)
    else:  # a blob (a hand, a cup) somewhere on the face
        p = (cx + rng.uniform(-fw, fw) * 0.8, cy + rng.uniform(-fh, fh) * 0.8)
        col = idn.skin if rng.random() < 0.5 else col
        cv.ellipse(p, (rng.uniform(0.06, 0.11), rng.uniform(0.05, 0.09)), _mix(col, (0, 0, 0), 0.15), None,
                   float(rng.uniform(0, 180)))


def _distractor(img: np.ndarray, rng: np.random.Generator, cfg: SyntheticConfig) -> None:
    """A non-face image: random shapes, a texture, or a featureless head blob (a hard negative)."""
    u = img.shape[0]
    _background(img, rng, cfg.style)
    kind = rng.integers(3)
    if kind == 0:
        for _ in range(rng.integers(3, 9)):
            col = _col(rng.uniform(0, 255, 3))
            pts = (rng.uniform(0, u, (int(rng.integers(3, 7)), 2)) * _ONE).astype(np.int32)
            if rng.random() < 0.5:
                cv2.fillPoly(img, [pts], col, cv2.LINE_AA, _SHIFT)
            else:
                c = tuple(int(v) for v in pts[0])
                ax = tuple(int(v) for v in (rng.uniform(0.05, 0.3, 2) * u * _ONE))
                cv2.ellipse(img, c, ax, float(rng.uniform(0, 180)), 0, 360, col, -1, cv2.LINE_AA, _SHIFT)
    elif kind == 1:
        yy, xx = np.mgrid[0:u, 0:u].astype(np.float32) / u
        f1, f2 = rng.uniform(2, 12, 2)
        a = rng.uniform(0, np.pi)
        wave = np.sin(2 * np.pi * (f1 * (xx * np.cos(a) + yy * np.sin(a)))) * np.sin(2 * np.pi * f2 * yy)
        c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = (wave[..., None] + 1) / 2
        grain = _child(rng).normal(0, 10, (u, u, 1))
        img[:] = np.clip(c1 * t + c2 * (1 - t) + grain, 0, 255).astype(np.uint8)
    else:
        idn = _identity(cfg.seed, cfg.style, "pool", int(rng.integers(1 << 30)), False)
        cv = _Canvas(img, rng.normal(0, cfg.pose_deg), rng.uniform(0.9, 1.08), rng.normal(0, 0.025, 2))
        _draw_face(cv, rng, idn, np.zeros(len(CUES)), cfg.style, features=False)
        for _ in range(rng.integers(0, 3)):
            p = (idn.cx + rng.uniform(-0.2, 0.2), idn.cy + rng.uniform(-0.2, 0.2))
            cv.ellipse(p, tuple(rng.uniform(0.02, 0.08, 2)), rng.uniform(0, 255, 3), None, float(rng.uniform(0, 180)))


def _finish(img: np.ndarray, rng: np.random.Generator, cfg: SyntheticConfig) -> np.ndarray:
    """Downsample to the output size, then lighting, colour cast, blur and noise."""
    size = cfg.size
    if img.shape[0] != size:
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    f = img.astype(np.float32)
    # Lighting: a linear gradient in a random direction (style b: harder side light, warmer cast).
    strength = rng.uniform(0.0, 0.45) if cfg.style == "a" else rng.uniform(0.3, 0.7)
    a = rng.uniform(0, 2 * np.pi)
    g = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    light = 1.0 + strength * (np.cos(a) * g[None, :] + np.sin(a) * g[:, None])
    gain = rng.uniform(0.75, 1.15)
    cast = rng.normal(1.0, 0.04, 3).astype(np.float32)
    if cfg.style == "b":
        cast *= np.array([1.06, 0.98, 0.9], np.float32)
        f = 0.85 * f + 0.15 * f.mean()  # lower contrast, a flatter "camera" response
    f = f * (light[..., None] * gain) * cast
    sigma = rng.uniform(0.0, 0.7) * size / 64
    if sigma > 0.3:
        f = cv2.GaussianBlur(f, (0, 0), sigma)
    ns = rng.uniform(0.0, cfg.noise_std)
    if ns > 0:
        f = f + _child(rng).normal(0, ns, f.shape).astype(np.float32)
    return np.clip(f + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Sampling plan: which class/kind each index is and which labels are noisy (cheap, no drawing)


def _split_plan(cfg: SyntheticConfig, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kind, clean label, given label) per index of ``split``; kind 0 face, 1 pool-neutral, 2 distractor.

    Labeled splits are exactly balanced; the order is a seeded permutation so any prefix is mixed.
    Label noise corrupts exactly round(rate * n_c) samples of each affected class, chosen by a seeded RNG
    (storage.label_noise.corrupt_labels).
    """
    n = cfg.count(split)
    rng = np.random.default_rng([cfg.seed, 104729, _STYLE_CODE[cfg.style], _SPLIT_CODE[split]])
    if split == "pool":
        mix = np.array([cfg.pool_expressive, cfg.pool_neutral, cfg.pool_distractor], float)
        counts = np.floor(mix / mix.sum() * n).astype(int)
        counts[np.argmax(mix)] += n - counts.sum()
        kind = rng.permutation(np.repeat(np.arange(3), counts))
        expressive = [i for i in range(NUM_CLASSES) if i != _NEUTRAL]
        clean = np.where(kind == 0, np.array(expressive)[rng.integers(0, len(expressive), n)],
                         np.where(kind == 1, _NEUTRAL, -1))
        return kind, clean, np.full(n, -1)
    clean = rng.permutation(np.repeat(np.arange(NUM_CLASSES), n // NUM_CLASSES))
    given = clean.copy()
    if cfg.label_noise > 0 and split in cfg.noisy_splits:
        # One definition of label noise for the generator and the noise-injection stage.
        nrng = np.random.default_rng([cfg.seed, 15485863, _STYLE_CODE[cfg.style], _SPLIT_CODE[split]])
        given = corrupt_labels(clean, cfg.noise_kind, cfg.label_noise, nrng)
    return np.zeros(n, int), clean, given


def _splits(cfg: SyntheticConfig) -> list[str]:
    return [s for s in SPLITS if cfg.count(s) > 0]


def _sample_id(split: str, index: int) -> str:
    return f"synthetic/{split}/{index:06d}"


def _draw_params(cfg: SyntheticConfig, split: str, index: int, kind: int, label: int):
    """The random choices of one sample that the truth needs (identity, intensity, cues, V/A).

    Drawn first from the sample's own RNG, so truth and rendering agree without rendering.
    """
    rng = np.random.default_rng([cfg.seed, _STYLE_CODE[cfg.style], _SPLIT_CODE[split], index])
    if kind == 2:
        return rng, None, 0.0, None, None, None
    ident = int(rng.integers(cfg.n_identities))
    cls = CLASSES[label]
    # sqrt(U): density rising towards strong expressions (as in posed/peak-frame data), with a tail of
    # weak, ambiguous ones.
    u = math.sqrt(rng.random())
    intensity = 0.0 if cls == "neutral" else cfg.intensity_min + (cfg.intensity_max - cfg.intensity_min) * u
    proto = PROTOTYPES[cls].copy()
    # Variants within a class, as in real data: closed-mouth smiles, shouting anger, tight-lipped fear.
    r = rng.random()
    if cls == "happy" and r < 0.4:
        proto[_C["open"]] = 0.0
    elif cls == "anger" and r < 0.2:
        proto[_C["open"]] = 0.5
    elif cls == "fear" and r < 0.25:
        proto[_C["open"]] = 0.1
    jitter = rng.normal(0, 0.07, len(CUES))
    v0, a0 = VA_PROTOTYPES[cls]
    valence = float(np.clip(intensity * v0 + rng.normal(0, 0.05), -1, 1))
    arousal = float(np.clip(intensity * a0 + rng.normal(0, 0.05), -1, 1))
    return rng, ident, intensity, intensity * proto + jitter, valence, arousal


def _challenge_pose(cfg: SyntheticConfig, split: str, index: int) -> tuple[float, bool] | None:
    """(pose angle in degrees, occluded) of a challenge-split sample; None for the other splits.

    Drawn from a stream of its own, so the truth knows them without rendering and the sample's main
    RNG consumes the same values as in ``test`` (whose angle and occlusion draws are then discarded).
    """
    if split not in CHALLENGE_SPLITS:
        return None
    rng = np.random.default_rng([cfg.seed, 2718281, _STYLE_CODE[cfg.style], _SPLIT_CODE[split], index])
    if split == "test_occlusion":
        angle = float(np.clip(rng.normal(0, cfg.pose_deg), -2.2 * cfg.pose_deg, 2.2 * cfg.pose_deg))
        return angle, True
    lo, hi = POSE_TEST_DEG[split]
    angle = float(rng.uniform(lo, hi)) * (1.0 if rng.random() < 0.5 else -1.0)
    return angle, bool(rng.random() < cfg.occlusion_prob)


def render_sample(cfg: SyntheticConfig, split: str, index: int) -> dict[str, Any]:
    """Render one sample as an image-table row (kwargs for storage.schema.image_row)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    n = cfg.count(split)
    if not 0 <= index < n:
        raise ValueError(f"index {index} is outside 0..{n - 1} for split {split!r} of this config")
    kind, clean, given = (a[index] for a in _split_plan(cfg, split))
    return _render(cfg, split, index, int(kind), int(clean), int(given))


def _render(cfg: SyntheticConfig, split: str, index: int, kind: int, clean: int, given: int) -> dict[str, Any]:
    rng, ident, intensity, cue, valence, arousal = _draw_params(cfg, split, index, kind, clean)
    # Supersample small outputs so anti-aliased features survive at 48-64 px.
    u = cfg.size * 2 if cfg.size < 128 else cfg.size
    img = np.empty((u, u, 3), np.uint8)
    landmarks = None
    if kind == 2:
        _distractor(img, rng, cfg)
    else:
        idn = _identity(cfg.seed, cfg.style, split, ident, cfg.shared_identities)
        cue = cue + np.array(idn.rest)
        _background(img, rng, cfg.style)
        angle = float(np.clip(rng.normal(0, cfg.pose_deg), -2.2 * cfg.pose_deg, 2.2 * cfg.pose_deg))
        forced = _challenge_pose(cfg, split, index)
        if forced is not None:
            angle = forced[0]
        cv = _Canvas(img, angle, rng.uniform(0.9, 1.08), np.clip(rng.normal(0, 0.025, 2), -0.06, 0.06))
        pts = _draw_face(cv, rng, idn, cue, cfg.style)
        occluded = rng.random() < cfg.occlusion_prob
        if forced is not None:
            occluded = forced[1]
        if occluded:
            _occlude(cv, rng, idn)
        px = cv.px(pts)
        landmarks = ((px + 0.5) * (cfg.size / u) - 0.5).reshape(-1).tolist()
    out = _finish(img, rng, cfg)
    labeled = split != "pool"
    return {
        "id": _sample_id(split, index),
        "image": encode(out, ".jpg" if cfg.fmt == ".jpeg" else cfg.fmt),
        "label": given if labeled else None,
        "split": split,
        "source": cfg.source_name,
        "valence": valence if labeled else None,
        "arousal": arousal if labeled else None,
        "landmarks": landmarks,
    }


def generate(cfg: SyntheticConfig = SyntheticConfig(), splits: tuple[str, ...] | None = None) -> Iterator[dict]:
    """Yield every sample of ``cfg`` (train, val, test, pool, then the challenge splits) as image-table rows.

    ``splits`` restricts the output to some splits; the rows are the same as in a full run.
    """
    wanted = _splits(cfg) if splits is None else [s for s in _splits(cfg) if s in splits]
    for split in wanted:
        kinds, clean, given = _split_plan(cfg, split)
        for i in range(len(kinds)):
            yield _render(cfg, split, i, int(kinds[i]), int(clean[i]), int(given[i]))


def sample_truth(cfg: SyntheticConfig) -> dict[str, SampleTruth]:
    """The hidden truth of every sample by id (clean labels, pool kinds), without rendering."""
    out: dict[str, SampleTruth] = {}
    for split in _splits(cfg):
        kinds, clean, given = _split_plan(cfg, split)
        for i in range(len(kinds)):
            k = int(kinds[i])
            _, ident, intensity, _, v, a = _draw_params(cfg, split, i, k, int(clean[i]))
            sid = _sample_id(split, i)
            forced = _challenge_pose(cfg, split, i)
            out[sid] = SampleTruth(
                id=sid, split=split, kind=("face", "neutral", "distractor")[k],
                clean_label=None if k == 2 else int(clean[i]),
                label=None if split == "pool" else int(given[i]),
                intensity=intensity, identity=ident, valence=v, arousal=a,
                occluded=None if forced is None else forced[1],
                pose_deg=None if forced is None else forced[0],
            )
    return out


def clean_labels(cfg: SyntheticConfig) -> dict[str, int | None]:
    """The true class of every sample by id (None for pool distractors), whatever the label noise."""
    return {k: t.clean_label for k, t in sample_truth(cfg).items()}


def config_from_options(**options: Any) -> SyntheticConfig:
    """Build a config from reader/CLI options; strings are converted to the field's type.

    Unknown option names and values of the wrong type raise ValueError naming what is valid.
    """
    names = [f.name for f in fields(SyntheticConfig)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(f"unknown synthetic option(s) {', '.join(unknown)}; valid: {', '.join(names)}")
    defaults = SyntheticConfig()
    kw: dict[str, Any] = {}
    for k, v in options.items():
        ref = getattr(defaults, k)
        try:
            kw[k] = _coerce(v, ref)
        except (TypeError, ValueError):
            raise ValueError(f"synthetic option {k}={v!r} is not a valid {type(ref).__name__} "
                             f"(default {ref!r})") from None
    return SyntheticConfig(**kw)


def _coerce(v: Any, ref: Any) -> Any:
    if isinstance(ref, bool):
        if isinstance(v, bool):
            return v
        text = str(v).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(v)
    if isinstance(ref, tuple):
        items = v.split(",") if isinstance(v, str) else list(v)
        return tuple(str(x).strip() for x in items if str(x).strip())
    if isinstance(ref, int):
        if isinstance(v, float) and not v.is_integer():
            raise ValueError(v)
        return int(float(v)) if isinstance(v, str) and "." in v else int(v)
    if isinstance(ref, float):
        return float(v)
    return str(v)


__all__ = ["CHALLENGE_SPLITS", "CUES", "POSE_TEST_DEG", "PROTOTYPES", "SPLITS", "STYLES", "VA_PROTOTYPES",
           "SampleTruth", "SyntheticConfig", "clean_labels", "config_from_options", "generate", "render_sample",
           "sample_truth"]
