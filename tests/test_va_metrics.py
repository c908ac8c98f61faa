"""Valence/arousal metrics against reference formulas (scipy/numpy), and their differentiable losses."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from tasks.caf.va_metrics import (VA_METRICS, ccc, ccc_loss, format_row, pcc, pcc_loss, rmse, rmse_loss, sagr, va_loss,
                              va_metrics)


def _ref_ccc(y, p):
    # Lin's concordance correlation coefficient from its textbook definition, population moments.
    y, p = np.asarray(y, float), np.asarray(p, float)
    rho = scipy.stats.pearsonr(y, p)[0]
    sy, sp = np.std(y), np.std(p)
    return 2 * rho * sy * sp / (sy ** 2 + sp ** 2 + (y.mean() - p.mean()) ** 2)


@pytest.fixture
def pairs(rng):
    y = np.clip(rng.normal(0.1, 0.4, 300), -1, 1)
    p = np.clip(0.6 * y + rng.normal(0.05, 0.2, 300), -1, 1)
    return y, p


def test_rmse_matches_numpy(pairs):
    y, p = pairs
    assert rmse(y, p) == pytest.approx(np.sqrt(np.mean((y - p) ** 2)), rel=1e-12)
    assert rmse(y, y) == 0.0


def test_sagr_is_sign_agreement_with_zero_its_own_sign():
    y = np.array([0.5, -0.2, 0.0, 0.3, -0.7, 0.0])
    p = np.array([0.1, 0.4, 0.0, -0.3, -0.1, 0.2])
    assert sagr(y, p) == pytest.approx(np.mean(np.sign(y) == np.sign(p)))
    assert sagr(y, p) == pytest.approx(3 / 6)  # 0.5/0.1, 0/0, -0.7/-0.1 agree


def test_pcc_matches_scipy_pearsonr(pairs):
    y, p = pairs
    assert pcc(y, p) == pytest.approx(scipy.stats.pearsonr(y, p)[0], abs=1e-12)
    assert pcc(y, 3 * y - 1) == pytest.approx(1.0)  # invariant to affine maps
    assert pcc(y, -y) == pytest.approx(-1.0)


def test_ccc_matches_reference_formula(pairs):
    y, p = pairs
    assert ccc(y, p) == pytest.approx(_ref_ccc(y, p), abs=1e-12)
    assert ccc(y, y) == pytest.approx(1.0)
    # unlike PCC, CCC penalises bias and scale: a shifted or scaled copy is perfectly correlated, not concordant
    s = 0.3
    assert pcc(y, y + s) == pytest.approx(1.0)
    assert ccc(y, y + s) == pytest.approx(2 * y.var() / (2 * y.var() + s * s))
    assert ccc(y, 0.5 * y) < 0.9


def test_degenerate_inputs():
    y = np.array([0.1, -0.4, 0.6, 0.2])
    const = np.full(4, 0.2)
    assert math.isnan(pcc(y, const))  # scipy also gives nan for a constant input
    assert ccc(y, const) == 0.0  # a constant prediction agrees with nothing
    with pytest.raises(ValueError, match="differ in length"):
        rmse(y, y[:3])
    with pytest.raises(ValueError, match="zero samples"):
        pcc([], [])


def test_va_metrics_columns_and_order(pairs, rng):
    y, p = pairs
    a = np.clip(rng.normal(0.3, 0.3, y.size), -1, 1)
    pa = a * 0.2
    m = va_metrics(np.stack([y, a], 1), np.stack([p, pa], 1))
    assert tuple(m) == VA_METRICS
    assert m["rmse_v"] == pytest.approx(rmse(y, p)) and m["rmse_a"] == pytest.approx(rmse(a, pa))
    assert m["pcc_a"] == pytest.approx(1.0)  # pa is a scaled copy of a
    assert m["ccc_a"] < 0.6
    assert m["sagr_v"] == pytest.approx(sagr(y, p)) and m["ccc_v"] == pytest.approx(_ref_ccc(y, p))
    assert len(format_row(m)) == 8
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        va_metrics(y, p)


def test_torch_losses_agree_with_numpy_metrics(pairs, rng):
    y, p = pairs
    a = np.clip(rng.normal(0.3, 0.3, y.size), -1, 1)
    pa = np.clip(a + rng.normal(0, 0.3, y.size), -1, 1)
    t = torch.tensor(np.stack([y, a], 1), dtype=torch.float64)
    q = torch.tensor(np.stack([p, pa], 1), dtype=torch.float64)
    assert float(pcc_loss(q, t)) == pytest.approx(1 - (pcc(y, p) + pcc(a, pa)) / 2, abs=1e-6)
    assert float(ccc_loss(q, t)) == pytest.approx(1 - (ccc(y, p) + ccc(a, pa)) / 2, abs=1e-6)
    assert float(rmse_loss(q, t)) == pytest.approx((rmse(y, p) + rmse(a, pa)) / 2, abs=1e-6)
    want = float(rmse_loss(q, t)) + 0.5 * (float(pcc_loss(q, t)) + float(ccc_loss(q, t)))
    assert float(va_loss(q, t)) == pytest.approx(want, abs=1e-9)


def test_losses_have_finite_gradients_in_degenerate_batches():
    t = torch.tensor([[0.5, -0.2], [0.1, 0.3], [-0.4, 0.8], [0.2, 0.0]])
    for pred in (t.clone(), torch.zeros_like(t)):  # perfect prediction (RMSE 0), constant prediction (PCC 0/0)
        pred = pred.requires_grad_(True)
        loss = va_loss(pred, t)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()


def test_minimising_va_loss_reaches_concordance():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(64, 2, generator=g) * 2 - 1
    # Free predictions starting near (not exactly) constant, like a fresh network's head: PCC is
    # scale-invariant, so its gradient grows as 1/std(pred) and an exactly constant start would
    # flood Adam's second moment.
    w = (0.1 * torch.randn(64, 2, generator=g)).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        va_loss(torch.tanh(w), t).backward()
        opt.step()
    m = va_metrics(t.numpy(), torch.tanh(w).detach().numpy())
    assert m["ccc_v"] > 0.98 and m["ccc_a"] > 0.98 and m["rmse_v"] < 0.05
