"""Spectral metrics on matrices whose spectra are chosen by construction."""

import numpy as np
import pytest

from diverify.audit.spectral import (LowRankDelta, effective_rank, matrix_kind, per_kind_z_scores,
                                     randomized_svd, robust_z_scores, spectral_metrics)
from diverify.errors import DiverifyError


def orthonormal(rng, n, k):
    q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return q


@pytest.fixture
def base():
    """W = U diag(s) V^T, 60 x 80: ten principal values 60 .. 51, then 50 small ones 5 .. 1."""
    rng = np.random.default_rng(0)
    u, v = orthonormal(rng, 60, 60), orthonormal(rng, 80, 60)
    s = np.concatenate([np.linspace(60.0, 51.0, 10), np.linspace(5.0, 1.0, 50)])
    return u, s, v, (u * s) @ v.T


def test_metrics_of_delta_with_chosen_spectrum(base):
    u, _, v, w = base
    d = np.array([5.0, 3.0, 2.0, 1.0])
    cols = [0, 30, 45, 59]
    delta = (u[:, cols] * d) @ v[:, cols].T
    m, _ = spectral_metrics("encoder.layer.0.attention.self.key.weight", w.astype(np.float32),
                            delta.astype(np.float32), top_k=4, subspace_rank=10)
    assert m.frobenius == pytest.approx(np.sqrt(np.sum(d**2)), rel=1e-5)
    assert m.relative_norm == pytest.approx(np.sqrt(np.sum(d**2)) / np.linalg.norm(w), rel=1e-5)
    np.testing.assert_allclose(m.top_singular_values, d, rtol=1e-4)
    assert m.stable_rank == pytest.approx(np.sum(d**2) / 25.0, rel=1e-4)
    p = d / d.sum()
    assert m.effective_rank == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-4)
    # Only the first direction lies in W's top-10 subspace: 25 of 39 energy units.
    assert m.null_space_energy == pytest.approx(1.0 - 25.0 / 39.0, abs=1e-5)
    assert m.kind == "encoder.layer.*.attention.self.key.weight"
    assert m.shape == (60, 80)


def test_null_space_energy_extremes(base):
    u, s, v, w = base
    inside = 0.1 * np.outer(u[:, 0], v[:, 2]) + 0.2 * np.outer(u[:, 1], v[:, 0])
    outside = np.outer(u[:, 50], v[:, 55])
    m_in, _ = spectral_metrics("a", w, inside, subspace_rank=10)
    m_out, _ = spectral_metrics("a", w, outside, subspace_rank=10)
    assert m_in.null_space_energy == pytest.approx(0.0, abs=1e-6)
    assert m_out.null_space_energy == pytest.approx(1.0, abs=1e-6)
    # A pure rescaling of W is entirely principal once k covers the spectrum.
    m_scale, _ = spectral_metrics("a", w, 0.01 * w, subspace_rank=60)
    assert m_scale.null_space_energy == pytest.approx(0.0, abs=1e-6)
    assert m_scale.relative_norm == pytest.approx(0.01, rel=1e-6)


def test_rank_one_delta_has_unit_stable_and_effective_rank(base):
    rng = np.random.default_rng(1)
    delta = np.outer(rng.standard_normal(60), rng.standard_normal(80))
    m, _ = spectral_metrics("a", base[3], delta)
    assert m.stable_rank == pytest.approx(1.0, rel=1e-5)
    assert m.effective_rank == pytest.approx(1.0, rel=1e-5)


def test_zero_delta_is_all_zero(base):
    m, _ = spectral_metrics("a", base[3], np.zeros((60, 80)))
    assert (m.frobenius, m.stable_rank, m.effective_rank, m.null_space_energy) == (0.0, 0.0, 0.0, 0.0)


def test_randomized_svd_matches_exact_top_values():
    rng = np.random.default_rng(2)
    u, v = orthonormal(rng, 200, 100), orthonormal(rng, 260, 100)
    s = 1.0 / np.arange(1, 101) ** 0.7
    a = ((u * s) @ v.T).astype(np.float32)
    approx = randomized_svd(a, 6)
    np.testing.assert_allclose(approx.s, s[:6], rtol=2e-3)
    # The singular vectors span the same subspace (up to sign).
    np.testing.assert_allclose(np.abs(np.sum(approx.u * u[:, :6], axis=0)), 1.0, atol=2e-2)


def test_low_rank_delta_metrics_equal_materialised(base):
    rng = np.random.default_rng(3)
    left, right = rng.standard_normal((60, 4)), rng.standard_normal((4, 80))
    low = LowRankDelta(left.astype(np.float32), right.astype(np.float32))
    m_low, svd_low = spectral_metrics("a", base[3], low, top_k=4, subspace_rank=8)
    m_dense, svd_dense = spectral_metrics("a", base[3], low.dense(), top_k=4, subspace_rank=8)
    for field in ("frobenius", "stable_rank", "effective_rank", "null_space_energy", "relative_norm"):
        assert getattr(m_low, field) == pytest.approx(getattr(m_dense, field), rel=1e-4, abs=1e-6), field
    np.testing.assert_allclose(m_low.top_singular_values, m_dense.top_singular_values, rtol=1e-4)
    assert low.frobenius_squared() == pytest.approx(np.sum(low.dense().astype(np.float64) ** 2), rel=1e-5)
    np.testing.assert_allclose(np.abs(np.sum(svd_low.vt[:4] * svd_dense.vt[:4], axis=1)), 1.0, atol=1e-3)


def test_shape_mismatch_is_named(base):
    with pytest.raises(DiverifyError, match="tensor enc.w"):
        spectral_metrics("enc.w", base[3], np.zeros((80, 60)))


def test_effective_rank_of_flat_spectrum():
    assert effective_rank(np.ones(7)) == pytest.approx(7.0)


def test_matrix_kind_strips_layer_indices():
    assert matrix_kind("encoder.layer.11.output.dense.weight") == "encoder.layer.*.output.dense.weight"
    assert matrix_kind("down_blocks.0.resnets.1.conv1.weight") == "down_blocks.*.resnets.*.conv1.weight"
    assert matrix_kind("pooler.dense.weight") == "pooler.dense.weight"


def test_robust_z_flags_the_outlier_only():
    z = robust_z_scores(np.array([1.0, 1.1, 0.9, 1.05, 0.95, 5.0]))
    assert z[-1] > 10 and np.all(np.abs(z[:-1]) < 2)
    assert np.all(robust_z_scores(np.array([1.0, 2.0])) == 0)
    kinds = ["a", "a", "a", "b", "b", "b"]
    z = per_kind_z_scores(kinds, np.array([1.0, 1.0, 1.0, 100.0, 100.0, 100.0]))
    np.testing.assert_allclose(z, 0.0)
