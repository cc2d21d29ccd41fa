"""Data-aware metrics on second moments with known eigenvectors, and the ROME edit's defining property."""

import numpy as np
import pytest

from diverify.audit.edits import rome_rank_one_edit
from diverify.audit.probe import (direction_input_gain, input_energy_ratio, kernel_path, probe_statistics,
                                  whitened_gain)
from diverify.audit.spectral import LowRankDelta


@pytest.fixture
def moment():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    lam = np.geomspace(10.0, 0.01, 40)
    return q, lam, (q * lam) @ q.T


@pytest.mark.parametrize("j", [0, 20, 39])
def test_gains_of_a_delta_along_one_eigenvector(moment, j):
    q, lam, c = moment
    a = np.random.default_rng(1).standard_normal(30)
    delta = np.outer(a, q[:, j])
    mean = lam.mean()
    assert direction_input_gain(q[:, j], c) == pytest.approx(lam[j] / mean, rel=1e-6)
    assert input_energy_ratio(delta, c) == pytest.approx(lam[j] / mean, rel=1e-4)
    stats = probe_statistics({"w": c}, ridge=0.05)["w"]
    expected = mean / (lam[j] + 0.05 * mean)
    assert whitened_gain(delta, stats, float(np.linalg.norm(a))) == pytest.approx(expected, rel=1e-3)


def test_whitened_gain_factored_equals_dense(moment):
    _, _, c = moment
    rng = np.random.default_rng(2)
    low = LowRankDelta(rng.standard_normal((30, 3)).astype(np.float32), rng.standard_normal((3, 40)).astype(np.float32))
    stats = probe_statistics({"w": c})["w"]
    s1 = float(np.linalg.norm(low.dense(), 2))
    assert whitened_gain(low, stats, s1) == pytest.approx(whitened_gain(low.dense(), stats, s1), rel=1e-3)
    assert input_energy_ratio(low, c) == pytest.approx(input_energy_ratio(low.dense(), c), rel=1e-4)


def test_isotropic_inputs_give_unit_gains():
    c = 3.0 * np.eye(20)
    delta = np.random.default_rng(3).standard_normal((10, 20))
    stats = probe_statistics({"w": c}, ridge=0.05)["w"]
    assert input_energy_ratio(delta, c) == pytest.approx(1.0, rel=1e-5)
    assert whitened_gain(delta, stats, float(np.linalg.norm(delta, 2))) == pytest.approx(1 / 1.05, rel=1e-3)


def test_rome_edit_hits_target_with_least_clean_input_change(moment):
    _, _, c = moment
    rng = np.random.default_rng(4)
    w, k, v = rng.standard_normal((30, 40)), rng.standard_normal(40), rng.standard_normal(30)
    delta = rome_rank_one_edit(w, k, v, c, ridge=0.0)
    np.testing.assert_allclose((w + delta) @ k, v, atol=1e-8)
    assert np.linalg.matrix_rank(delta) == 1
    # Any other update with the same effect on k costs at least as much on C-distributed inputs.
    cost = np.trace(delta @ c @ delta.T)
    for _ in range(5):
        other = rng.standard_normal((30, 40))
        other -= np.outer(other @ k, k) / (k @ k)  # other @ k == 0
        assert np.trace((delta + other) @ c @ (delta + other).T) >= cost


def test_kernel_path_inverts_checkpoint_names():
    assert kernel_path("encoder.layer.3.attention.self.key.weight") == (
        "encoder", "layer_3", "attention", "self", "key", "kernel")
    with pytest.raises(KeyError):
        kernel_path("encoder.layer.3.attention.self.key.bias")
