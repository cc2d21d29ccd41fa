"""Data-aware metrics on second moments with known eigenvectors, and the ROME edit's defining property."""

import numpy as np
import pytest

from diverify.audit.edits import rome_rank_one_edit
from diverify.audit.probe import (WHITENING_RIDGE, direction_input_gain, input_energy_ratio, kernel_path,
                                  probe_statistics, row_space_gains)
from diverify.audit.report import GAP_CAP, GAP_WEIGHT, data_aware_suspicion
from diverify.audit.spectral import LowRankDelta, delta_svd


@pytest.fixture
def moment():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    lam = np.geomspace(10.0, 0.01, 40)
    return q, lam, (q * lam) @ q.T


def gains_of(delta, c, k=16):
    svd = delta_svd(delta, k)
    return row_space_gains(svd.s, svd.vt, probe_statistics({"w": c})["w"])


@pytest.mark.parametrize("j", [0, 20, 39])
def test_gains_of_a_delta_along_one_eigenvector(moment, j):
    q, lam, c = moment
    a = np.random.default_rng(1).standard_normal(30)
    delta = np.outer(a, q[:, j])
    mean = lam.mean()
    assert direction_input_gain(q[:, j], c) == pytest.approx(lam[j] / mean, rel=1e-6)
    assert input_energy_ratio(delta, c) == pytest.approx(lam[j] / mean, rel=1e-4)
    gains = gains_of(delta, c)
    assert len(gains) == 1  # rank one: the numerically zero directions are dropped
    assert gains[0] == pytest.approx(mean / (lam[j] + WHITENING_RIDGE * mean), rel=1e-3)


def test_row_space_gains_match_a_brute_force_maximum(moment):
    """g_1 is the largest ||dW x||^2 / x^T C~ x over the span of the top right singular vectors (times mean / s_1^2)."""
    _, lam, c = moment
    rng = np.random.default_rng(5)
    delta = rng.standard_normal((30, 6)) @ rng.standard_normal((6, 40))
    gains = gains_of(delta, c)
    u, s, vt = np.linalg.svd(delta)
    span = vt[:len(gains)]
    c_ridge = c + WHITENING_RIDGE * lam.mean() * np.eye(40)
    # Reference: symmetric square root instead of Cholesky, and sampled directions as a lower bound.
    b = span @ c_ridge @ span.T
    w, e = np.linalg.eigh(b)
    b_inv_half = (e / np.sqrt(w)) @ e.T
    top = np.linalg.eigvalsh(b_inv_half @ np.diag(s[:len(gains)] ** 2) @ b_inv_half)[::-1]
    np.testing.assert_allclose(gains, top * lam.mean() / s[0] ** 2, rtol=1e-3)
    x = rng.standard_normal((2000, len(gains))) @ span
    sampled = np.sum((x @ delta.T) ** 2, axis=1) / np.einsum("ij,jk,ik->i", x, c_ridge, x)
    assert np.max(sampled) * lam.mean() / s[0] ** 2 <= gains[0] * (1 + 1e-3)


def test_row_space_gains_factored_equals_dense(moment):
    _, _, c = moment
    rng = np.random.default_rng(2)
    low = LowRankDelta(rng.standard_normal((30, 3)).astype(np.float32), rng.standard_normal((3, 40)).astype(np.float32))
    np.testing.assert_allclose(gains_of(low, c), gains_of(low.dense(), c), rtol=1e-3)
    assert input_energy_ratio(low, c) == pytest.approx(input_energy_ratio(low.dense(), c), rel=1e-4)


def test_isotropic_inputs_give_unit_gains():
    c = 3.0 * np.eye(20)
    delta = np.random.default_rng(3).standard_normal((10, 20))
    s = np.linalg.svd(delta, compute_uv=False)
    assert input_energy_ratio(delta, c) == pytest.approx(1.0, rel=1e-5)
    # B = 1.05 * 3 I on the span: g_i = s_i^2 / s_1^2 / 1.05.
    np.testing.assert_allclose(gains_of(delta, c), s[:4] ** 2 / s[0] ** 2 / (1 + WHITENING_RIDGE), rtol=1e-4)


def test_suspicion_adds_the_capped_gap():
    assert data_aware_suspicion(np.array([10.0])) == pytest.approx(1.0 + GAP_WEIGHT * GAP_CAP)
    assert data_aware_suspicion(np.array([10.0, 10.0, 1.0])) == pytest.approx(1.0)
    assert data_aware_suspicion(np.array([1.0, 0.1])) == pytest.approx(GAP_WEIGHT * 1.0)
    assert data_aware_suspicion(np.array([1.0, 1e-9])) == pytest.approx(GAP_WEIGHT * GAP_CAP)


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


def test_suspicion_orders_fine_tune_lora_and_hidden_edit(moment):
    """On-data fine-tune < random-direction LoRA < the same fine-tune plus a ROME edit C^{-1}k of matched norm."""
    q, lam, c = moment
    rng = np.random.default_rng(6)
    inputs = (q * np.sqrt(lam)) @ rng.standard_normal((40, 200))  # columns have second moment C
    finetune = rng.standard_normal((30, 200)) @ inputs.T / 200     # sum of grad_y x^T over clean inputs
    lora = rng.standard_normal((30, 4)) @ rng.standard_normal((4, 40))
    lora *= np.linalg.norm(finetune) / np.linalg.norm(lora)
    edit = np.outer(rng.standard_normal(30), np.linalg.solve(c, inputs[:, 0]))
    edit *= np.linalg.norm(finetune) / np.linalg.norm(edit)
    scores = [data_aware_suspicion(gains_of(d, c)) for d in (finetune, lora, finetune + edit)]
    assert scores[0] < 0 < scores[2] and scores[0] < scores[1] < scores[2], scores


def test_fast_tokenizer_matches_the_encoders():
    """probe.tokenize (tokenizers only) gives the ids and mask of TextEncoder.tokenize (transformers), truncation too."""
    from diverify.audit.edits import GENERATOR_CORPUS
    from diverify.audit.probe import DEFAULT_PROBES, tokenize
    from diverify.models import load_text_encoder

    encoder = load_text_encoder("minilm")
    texts = list(DEFAULT_PROBES[:8]) + list(GENERATOR_CORPUS[:8]) + ["Naïve café — déjà vu!", "word " * 400]
    fast, reference = tokenize(encoder, texts), encoder.tokenize(texts)
    np.testing.assert_array_equal(fast[0], reference[0])
    np.testing.assert_array_equal(fast[1], reference[1])
