"""Handcrafted face features for the feature losses of Xie et al. (handcrafted_feature_losses.md, Eq. 2-4).

GABOR: 8 scales x 4 orientations of OpenCV Gabor filters; the magnitude of each response is turned
    into a 16-bin histogram in every cell of an n x n grid (Eq. 3), giving 8*4*16*n*n values (e_i, Eq. 4).
GSF:   the GABOR histograms of each patch projected by PCA (0.99 of the variance, Sec. III-A) then LDA
    to (#class - 1) dimensions, per patch (f_i = P_LDA P_PCA e_i, Eq. 4).
SIFT:  dense SIFT (OpenCV, 128-D per patch, one keypoint per grid cell) projected the same way.

All three are computed in one pass over an image table and stored as ONE artifact (one row per
image id, a list<float32> column per feature), so a data set is processed once and every training
variant reads the same targets. With ``mirror`` the features of the horizontally mirrored image are
stored too (``<kind>_flip``): a mirrored training view is then guided by the features of what the
network actually sees (Gabor and SIFT patches are not mirror-symmetric).

The projections are fitted once on the labeled rows of ``fit_splits`` (never the test split) and
applied to every row; the fitted parameters go to ``<out>/projection-<kind>.npz`` so the same
projection can be applied to new images. Stored vectors are the raw e_i / f_i; the L2 normalisation
of Eq. 2 happens at loss time.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import pyarrow as pa

from storage.artifact import Artifact, ArtifactWriter, Manifest, is_finished, join

__all__ = [
    "KINDS",
    "HandcraftedConfig",
    "PatchProjection",
    "cell_histograms",
    "compute_features",
    "dense_sift",
    "feature_schema",
    "fit_projection",
    "gabor_bank",
    "gabor_histograms",
    "gabor_quantized",
    "load_features",
    "load_projection",
]

KINDS = ("gabor", "gsf", "sift")
STAGE = "handcrafted-features"


def projection_file(kind: str) -> str:
    return f"projection-{kind}.npz"


@dataclass(frozen=True)
class HandcraftedConfig:
    """How the handcrafted features of a data set are computed (all of KINDS, in one pass).

    size: images are converted to gray and resized to size x size first (the paper: 227 px faces;
        48-64 px here, the side of the training images).
    gabor_grid / gsf_grid / sift_grid: n of the n x n patch grid per feature. The paper uses 5, 8
        and 7 on 227 px faces; the defaults keep patches of 12-16 px on 48 px faces.
    scales / orientations / bins: the Gabor bank and histogram (the paper: 8 x 4 x 16).
    pca_variance: fraction of variance kept by PCA before LDA (the paper: 0.99).
    fit_splits: labeled rows of these splits fit PCA + LDA (never the test split: no leakage).
    mirror: also store the features of the mirrored image (columns ``<kind>_flip``).
    """

    size: int = 48
    gabor_grid: int = 3
    gsf_grid: int = 4
    sift_grid: int = 4
    scales: int = 8
    orientations: int = 4
    bins: int = 16
    pca_variance: float = 0.99
    fit_splits: tuple[str, ...] = ("train",)
    mirror: bool = True
    rows_per_shard: int = 1024

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError(f"size must be >= 16 pixels, got {self.size} (HandcraftedConfig)")
        for name in ("gabor_grid", "gsf_grid", "sift_grid"):
            g = getattr(self, name)
            if not 1 <= g <= self.size // 4:
                raise ValueError(f"{name} must be between 1 and size/4 = {self.size // 4} (patches of at least "
                                 f"4 px), got {g} (HandcraftedConfig)")
        if self.scales < 1 or self.orientations < 1 or self.bins < 2:
            raise ValueError("scales, orientations must be >= 1 and bins >= 2 (HandcraftedConfig)")
        if not 0 < self.pca_variance <= 1:
            raise ValueError(f"pca_variance must be in (0, 1], got {self.pca_variance} (HandcraftedConfig)")
        if not self.fit_splits:
            raise ValueError("fit_splits must name at least one labeled split (HandcraftedConfig)")
        if self.rows_per_shard < 1:
            raise ValueError("rows_per_shard must be >= 1 (HandcraftedConfig)")
        object.__setattr__(self, "fit_splits", tuple(self.fit_splits))

    def grid(self, kind: str) -> int:
        if kind not in KINDS:
            raise ValueError(f"unknown handcrafted feature {kind!r}; choose one of {', '.join(KINDS)}")
        return int(getattr(self, f"{kind}_grid"))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fit_splits"] = list(self.fit_splits)
        return d


def feature_schema(mirror: bool = True) -> pa.Schema:
    cols = [("id", pa.string()), ("label", pa.int8()), ("split", pa.string())]
    for k in KINDS:
        cols.append((k, pa.list_(pa.float32())))
        if mirror:
            cols.append((f"{k}_flip", pa.list_(pa.float32())))
    return pa.schema(cols)


# ---------------------------------------------------------------- raw features


def gabor_bank(size: int, scales: int = 8, orientations: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    """(even, odd) OpenCV Gabor kernel pairs; wavelengths grow by sqrt(2) per scale from 2.5 px.

    The pair (psi = 0, psi = pi/2) gives the response magnitude, which is shift-invariant within the
    wavelength (the usual choice for Gabor histograms). Kernels are capped at the image side.
    """
    bank = []
    for s in range(scales):
        lambd = 2.5 * (2 ** (s / 2))
        sigma = 0.56 * lambd  # ~1 octave bandwidth
        k = int(min(2 * np.ceil(2.5 * sigma) + 1, size - (1 - size % 2)))
        k = max(3, k | 1)
        for o in range(orientations):
            theta = np.pi * o / orientations
            even = cv2.getGaborKernel((k, k), sigma, theta, lambd, 0.5, 0, ktype=cv2.CV_32F)
            odd = cv2.getGaborKernel((k, k), sigma, theta, lambd, 0.5, np.pi / 2, ktype=cv2.CV_32F)
            even -= even.mean()  # zero DC: flat regions respond 0, so histograms encode texture, not brightness
            bank.append((even, odd))
    return bank


def _cell_index(size: int, n: int) -> np.ndarray:
    """(size, size) int map: the grid cell of each pixel (row-major over an n x n grid)."""
    edges = np.linspace(0, size, n + 1)[1:-1]
    r = np.digitize(np.arange(size), edges)
    return (r[:, None] * n + r[None, :]).astype(np.int64)


def _check_gray(gray: np.ndarray) -> None:
    if gray.ndim != 2 or gray.shape[0] != gray.shape[1]:
        raise ValueError(f"expected a square 2-D gray image, got shape {gray.shape}")


def gabor_quantized(gray: np.ndarray, bank: list[tuple[np.ndarray, np.ndarray]], bins: int = 16) -> np.ndarray:
    """(len(bank), size, size) bin index of every pixel's Gabor magnitude, per filter.

    Each magnitude map is quantised into ``bins`` equal bins over [0, its max] (a per-map contrast
    normalisation, so lighting changes move few values).
    """
    _check_gray(gray)
    size = gray.shape[0]
    img = gray.astype(np.float32) / 255.0
    q = np.empty((len(bank), size, size), np.int64)
    for i, (even, odd) in enumerate(bank):
        re = cv2.filter2D(img, cv2.CV_32F, even, borderType=cv2.BORDER_REFLECT)
        im = cv2.filter2D(img, cv2.CV_32F, odd, borderType=cv2.BORDER_REFLECT)
        mag = cv2.magnitude(re, im)
        top = float(mag.max())
        q[i] = 0 if top <= 1e-12 else np.minimum((mag * (bins / top)).astype(np.int64), bins - 1)
    return q


def cell_histograms(q: np.ndarray, n: int, bins: int = 16) -> np.ndarray:
    """(n*n, maps*bins): per grid cell, the fraction of its pixels in each bin of every map (Eq. 3)."""
    m, size = q.shape[0], q.shape[1]
    cells = _cell_index(size, n)
    # One bincount over (cell, map, bin) instead of n*n*m histogram calls.
    flat = (cells[None] * m + np.arange(m)[:, None, None]) * bins + q
    hist = np.bincount(flat.ravel(), minlength=n * n * m * bins).reshape(n * n, m * bins).astype(np.float32)
    counts = np.bincount(cells.ravel(), minlength=n * n).astype(np.float32)
    return hist / counts[:, None]


def gabor_histograms(gray: np.ndarray, n: int, scales: int = 8, orientations: int = 4, bins: int = 16,
                     bank: list | None = None) -> np.ndarray:
    """GABOR of Eq. 3-4: (n*n, scales*orientations*bins) per-cell histograms of Gabor magnitudes.

    Row j is the patch feature pf_{p_j}; flattened, it is e_i.
    """
    _check_gray(gray)
    bank = bank if bank is not None else gabor_bank(gray.shape[0], scales, orientations)
    return cell_histograms(gabor_quantized(gray, bank, bins), n, bins)


def dense_sift(gray: np.ndarray, n: int, sift: Any = None) -> np.ndarray:
    """Dense SIFT: (n*n, 128), one OpenCV SIFT descriptor per grid cell (keypoint at its centre, cell size)."""
    _check_gray(gray)
    size = gray.shape[0]
    sift = sift if sift is not None else cv2.SIFT_create()
    step = size / n
    kps = [cv2.KeyPoint(float((c + 0.5) * step), float((r + 0.5) * step), float(step))
           for r in range(n) for c in range(n)]
    kps_out, desc = sift.compute(np.ascontiguousarray(gray, dtype=np.uint8), kps)
    if desc is None or len(kps_out) != n * n:
        raise ValueError(f"SIFT kept {0 if desc is None else len(kps_out)} of {n * n} keypoints on a "
                         f"{size} px image; use a smaller grid or larger images")
    return desc.astype(np.float32)


def _gray(rgb: np.ndarray, size: int) -> np.ndarray:
    g = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if g.shape != (size, size):
        g = cv2.resize(g, (size, size), interpolation=cv2.INTER_AREA if g.shape[0] > size else cv2.INTER_LINEAR)
    return g


class _Extractor:
    """gray image -> {"gabor": (n_g^2, 512), "gsf_raw": (n_f^2, 512), "sift_raw": (n_s^2, 128)} patch features."""

    def __init__(self, cfg: HandcraftedConfig):
        self.cfg = cfg
        self.bank = gabor_bank(cfg.size, cfg.scales, cfg.orientations)
        self.sift = cv2.SIFT_create()

    def __call__(self, gray: np.ndarray) -> dict[str, np.ndarray]:
        c = self.cfg
        q = gabor_quantized(gray, self.bank, c.bins)  # the costly part, shared by GABOR and GSF
        return {"gabor": cell_histograms(q, c.gabor_grid, c.bins), "gsf": cell_histograms(q, c.gsf_grid, c.bins),
                "sift": dense_sift(gray, c.sift_grid, self.sift)}


# ---------------------------------------------------------------- projection


@dataclass
class PatchProjection:
    """Per-patch PCA then LDA: patch j -> ((x - mean_j) @ pca_j.T - xbar_j) @ scalings_j (Eq. 4)."""

    means: list[np.ndarray]
    components: list[np.ndarray]
    xbars: list[np.ndarray]
    scalings: list[np.ndarray]

    @property
    def out_dim(self) -> int:
        return sum(s.shape[1] for s in self.scalings)

    def transform(self, patches: np.ndarray) -> np.ndarray:
        """(N, n*n, d) -> (N, sum of per-patch dims)."""
        if patches.ndim != 3 or patches.shape[1] != len(self.means):
            raise ValueError(f"expected (N, {len(self.means)}, d) patch features, got shape {patches.shape}")
        outs = [((patches[:, j] - self.means[j]) @ self.components[j].T - self.xbars[j]) @ self.scalings[j]
                for j in range(len(self.means))]
        return np.concatenate(outs, axis=1).astype(np.float32)

    def to_npz(self) -> bytes:
        arrays: dict[str, np.ndarray] = {"patches": np.array(len(self.means))}
        for j in range(len(self.means)):
            arrays.update({f"mean{j}": self.means[j], f"comp{j}": self.components[j], f"xbar{j}": self.xbars[j],
                           f"scal{j}": self.scalings[j]})
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_npz(cls, data: bytes) -> PatchProjection:
        z = np.load(io.BytesIO(data))
        p = int(z["patches"])
        return cls([z[f"mean{j}"] for j in range(p)], [z[f"comp{j}"] for j in range(p)],
                   [z[f"xbar{j}"] for j in range(p)], [z[f"scal{j}"] for j in range(p)])


def fit_projection(patches: np.ndarray, labels: np.ndarray, pca_variance: float = 0.99,
                   num_classes: int | None = None) -> PatchProjection:
    """Fit PCA (keeping ``pca_variance``) then LDA to (#class - 1) dims, independently for every patch.

    Every patch gets exactly (#class - 1) output dims (``num_classes`` or the classes present): when PCA
    keeps fewer dims than that, the extra LDA columns are zero, so the feature's layout never depends
    on the data.
    """
    # scikit-learn (and the scipy BLAS it calls) is loaded before limiting: threadpool_limits only limits the
    # libraries already loaded when it is entered, and importing them inside the block (in _fit_patch) left
    # scipy's OpenBLAS on every core, whose SVDs ran ~30x slower on shared cores (5 min for 3500 images).
    import scipy.linalg  # noqa: F401
    import sklearn.decomposition  # noqa: F401
    import sklearn.discriminant_analysis  # noqa: F401
    from threadpoolctl import threadpool_limits

    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError(f"LDA needs labeled rows of at least 2 classes in the fit splits, found {len(classes)}")
    if len(labels) <= len(classes):
        raise ValueError(f"LDA needs more labeled rows ({len(labels)}) than classes ({len(classes)}) in the fit splits")
    out_dims = (num_classes or len(classes)) - 1
    means, comps, xbars, scals = [], [], [], []
    # One BLAS thread: these SVDs are small, and on shared cores threaded BLAS is several times slower.
    with threadpool_limits(1):
        for j in range(patches.shape[1]):
            _fit_patch(patches[:, j], labels, classes, pca_variance, out_dims, means, comps, xbars, scals)
    return PatchProjection(means, comps, xbars, scals)


def _fit_patch(x: np.ndarray, labels: np.ndarray, classes: np.ndarray, pca_variance: float, out_dims: int,
               means: list, comps: list, xbars: list, scals: list) -> None:
    from sklearn.decomposition import PCA
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    x = x.astype(np.float64)
    # A tiny deterministic jitter keeps PCA/LDA defined on constant patches (e.g. flat background).
    x = x + 1e-6 * np.sin(np.arange(x.size)).reshape(x.shape)
    pca = PCA(n_components=pca_variance if pca_variance < 1 else None, svd_solver="full")
    y = pca.fit_transform(x)
    k = min(len(classes) - 1, y.shape[1], out_dims)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # collinear variables: LDA's svd solver copes, the warning is noise
        lda = LinearDiscriminantAnalysis(n_components=k, solver="svd").fit(y, labels)
    means.append(pca.mean_.astype(np.float32))
    comps.append(pca.components_.astype(np.float32))
    xbars.append(lda.xbar_.astype(np.float32))
    scal = np.zeros((y.shape[1], out_dims), np.float32)  # pad: every patch has #class - 1 dims
    scal[:, :k] = lda.scalings_[:, :k]
    scals.append(scal)


# ---------------------------------------------------------------- the stage


def compute_features(table_uri: str, out_uri: str, cfg: HandcraftedConfig = HandcraftedConfig(),
                     num_classes: int = 7, on_rows: Callable[[int], None] | None = None) -> Manifest:
    """GABOR, GSF and SIFT of every row of an image table -> one artifact (id, label, split, <kind>[_flip]).

    Computed once: when ``out_uri`` already holds a finished artifact of the same table and config it
    is returned as is (nothing recomputed); one of another table or config is refused. GSF / SIFT fit
    their per-patch PCA + LDA on the labeled ``cfg.fit_splits`` rows (``projection-<kind>.npz``). The
    manifest's extra gives each feature's dim and grid. Images that do not decode fail the stage,
    naming them (an ingested table holds decodable images only; re-ingest to turn them into rejects).
    """
    from tasks.data import decode_resized

    art = Artifact(table_uri)
    inputs = {"table": art.digest}
    if is_finished(out_uri):
        m = Artifact(out_uri).manifest
        if m.stage == STAGE and m.config == cfg.to_dict() and m.inputs == inputs:
            return m
        raise ValueError(f"{out_uri} already holds a finished artifact of another table or configuration "
                         f"(stage {m.stage}); use another output folder, or delete it to recompute")
    extract = _Extractor(cfg)
    ids: list[str] = []
    labels: list[int] = []
    splits: list[str] = []
    raw: dict[str, list[np.ndarray]] = {f"{k}{s}": [] for k in KINDS for s in ("", "_flip")}
    bad: list[str] = []
    for batch in art.iter_batches(columns=["id", "image", "label", "split"], batch_size=256):
        d = batch.to_pydict()
        for i, img, lab, sp in zip(d["id"], d["image"], d["label"], d["split"]):
            try:
                rgb = decode_resized(img, cfg.size)
            except ValueError:
                bad.append(i)
                continue
            g = _gray(rgb, cfg.size)
            views = [("", g)] + ([("_flip", np.ascontiguousarray(g[:, ::-1]))] if cfg.mirror else [])
            for suffix, v in views:
                for k, f in extract(v).items():
                    raw[k + suffix].append(f)
            ids.append(str(i))
            labels.append(-1 if lab is None else int(lab))
            splits.append(sp)
        if on_rows is not None:
            on_rows(batch.num_rows)
    if bad:
        raise ValueError(f"{len(bad)} image(s) of {table_uri} do not decode (first: {bad[:3]}); "
                         "re-ingest the table so they become rejects")
    if not ids:
        raise ValueError(f"{table_uri} has no rows to compute handcrafted features for")
    lab = np.asarray(labels)
    fit = np.isin(np.asarray(splits), list(cfg.fit_splits)) & (lab >= 0)
    if not fit.any():
        raise ValueError(f"{table_uri} has no labeled rows in the fit split(s) {list(cfg.fit_splits)}: PCA + LDA of "
                         "GSF and SIFT need them (set fit_splits / --fit-split to the training split)")
    columns: dict[str, np.ndarray] = {}
    projections: dict[str, bytes] = {}
    extra: dict[str, Any] = {"kinds": list(KINDS), "fit_rows": int(fit.sum()), "dims": {}, "grids": {},
                             "mirror": cfg.mirror}
    for kind in KINDS:
        orig = np.stack(raw[kind])  # (N, n*n, d)
        if kind == "gabor":
            columns[kind] = orig.reshape(len(orig), -1)
            if cfg.mirror:
                columns[f"{kind}_flip"] = np.stack(raw[f"{kind}_flip"]).reshape(len(orig), -1)
        else:
            proj = fit_projection(orig[fit], lab[fit], cfg.pca_variance, num_classes)
            columns[kind] = proj.transform(orig)
            if cfg.mirror:
                columns[f"{kind}_flip"] = proj.transform(np.stack(raw[f"{kind}_flip"]))
            projections[kind] = proj.to_npz()
            extra[f"pca_dims_{kind}"] = [int(c.shape[0]) for c in proj.components]
        extra["dims"][kind] = int(columns[kind].shape[1])
        extra["grids"][kind] = cfg.grid(kind)
    schema = feature_schema(cfg.mirror)
    with ArtifactWriter(out_uri, stage=STAGE, config=cfg.to_dict(), inputs=inputs,
                        rows_per_shard=cfg.rows_per_shard, schema=schema) as w:
        import fsspec

        for kind, data in projections.items():
            with fsspec.open(join(out_uri, projection_file(kind)), "wb") as f:
                f.write(data)
        table = {"id": pa.array(ids, pa.string()),
                 "label": pa.array([None if v < 0 else v for v in labels], pa.int8()),
                 "split": pa.array(splits, pa.string())}
        for name, mat in columns.items():
            mat = np.ascontiguousarray(mat, np.float32)
            offsets = np.arange(0, mat.size + 1, mat.shape[1], dtype=np.int32)
            table[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(mat.ravel()))
        w.write(pa.table(table).select(schema.names).cast(schema))
        return w.commit(extra)


def feature_dims(uri: str) -> dict[str, int]:
    """{kind: dim} of a features artifact (from its manifest)."""
    return {k: int(v) for k, v in Artifact(uri).manifest.extra.get("dims", {}).items()}


def load_features(uri: str, kind: str, ids: Sequence[str] | None = None,
                  flip: bool = False) -> tuple[list[str], np.ndarray]:
    """(ids, (N, dim) float32) of one feature of a features artifact; with ``ids``, in that order.

    ``flip`` reads the mirrored image's features. Missing ids raise: the artifact was computed from
    another table.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown handcrafted feature {kind!r}; choose one of {', '.join(KINDS)}")
    art = Artifact(uri)
    col = f"{kind}_flip" if flip else kind
    if col not in art.schema.names:
        raise ValueError(f"{uri} has no column {col!r}: it is not a handcrafted-features artifact"
                         + (" with mirrored features (compute it with mirror=True)" if flip else ""))
    t = art.read(columns=["id", col])
    all_ids = t.column("id").to_pylist()
    flat = t.column(col).combine_chunks()
    mat = np.asarray(flat.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(len(all_ids), -1)
    if ids is None:
        return all_ids, mat
    pos = {k: i for i, k in enumerate(all_ids)}
    missing = [k for k in ids if k not in pos]
    if missing:
        raise ValueError(f"{len(missing)} image id(s) have no features in {uri} (first: {missing[:3]}); "
                         "compute the features from the same image table (`fermine featloss features`)")
    return list(ids), mat[[pos[k] for k in ids]]


def load_projection(uri: str, kind: str) -> PatchProjection:
    import fsspec

    with fsspec.open(join(uri, projection_file(kind)), "rb") as f:
        return PatchProjection.from_npz(f.read())
