"""Seeded sampling: reproducible across chunks and devices, noise where it was asked for."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diverify.cws.certificate import certify_smoothed_predicate, covered_fro_norm
from diverify.cws.sampling import (
    apply_coordinates,
    coordinate_norm,
    count_predicate_hits,
    param_paths,
    rank_one_perturbation,
    sample_coordinates,
    select_paths,
    weight_perturbation,
)
from diverify.errors import DiverifyError

PARAMS = {
    "encoder": {
        "layer_0": {
            "attention": {"key": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)},
                          "value": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}},
            "mlp": {"kernel": jnp.zeros((3, 5))},
        }
    },
    "head": jnp.zeros(5),
}


def total(p):
    return sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(p))


def test_path_patterns_glob_regex_and_errors():
    assert param_paths(PARAMS)[0] == "encoder/layer_0/attention/key/bias"
    assert select_paths(PARAMS, "*attention/key/kernel,*attention/value/kernel") == (
        "encoder/layer_0/attention/key/kernel", "encoder/layer_0/attention/value/kernel")
    assert select_paths(PARAMS, "re:attention/(key|value)/bias$") == (
        "encoder/layer_0/attention/key/bias", "encoder/layer_0/attention/value/bias")
    assert select_paths(PARAMS, None) == param_paths(PARAMS)
    with pytest.raises(DiverifyError, match="matches no parameter.*encoder/layer_0/attention/key/bias"):
        select_paths(PARAMS, "*cross_attn*")
    with pytest.raises(DiverifyError, match="not a valid regex"):
        select_paths(PARAMS, "re:(")
    with pytest.raises(DiverifyError, match="2-D"):
        rank_one_perturbation(PARAMS, "*attention/key/*")


def test_noise_touches_only_the_selected_leaves_with_the_right_scale():
    pert = weight_perturbation(PARAMS, "*attention/*/kernel")
    assert pert.num_coordinates == 24
    sigma = 0.3
    keys = jax.random.split(jax.random.key(0), 400)
    draws = jax.jit(jax.vmap(lambda k: jnp.concatenate(
        [c.ravel() for c in sample_coordinates(pert, k, sigma)])))(keys)
    # Distinct coordinates are independent: the empirical correlation matrix is near identity.
    corr = np.corrcoef(np.asarray(draws).T)
    assert np.abs(corr - np.eye(24)).max() < 0.25
    assert abs(float(draws.mean())) < 4 * sigma / np.sqrt(draws.size)
    assert float(draws.std()) == pytest.approx(sigma, rel=0.05)
    moved = apply_coordinates(pert, PARAMS, sample_coordinates(pert, jax.random.key(0), sigma))
    assert float(jnp.abs(moved["encoder"]["layer_0"]["attention"]["key"]["kernel"]).min()) > 0
    assert float(jnp.abs(moved["encoder"]["layer_0"]["attention"]["key"]["bias"]).max()) == 0
    assert float(jnp.abs(moved["head"]).max()) == 0


def test_rank_one_coordinates_apply_an_outer_product_and_cover_sqrt_2_fro():
    pert = rank_one_perturbation(PARAMS, "*mlp/kernel")
    assert pert.num_coordinates == 3 + 5
    u, v = jnp.arange(3.0), jnp.arange(5.0) - 2
    moved = apply_coordinates(pert, PARAMS, ((u, v),))
    np.testing.assert_array_equal(moved["encoder"]["layer_0"]["mlp"]["kernel"], np.outer(u, v))
    # The cheapest coordinates of D = u v^T are balanced, with squared norm 2 ||D||_F.
    fro = float(np.linalg.norm(np.outer(u, v)))
    c = np.sqrt(np.linalg.norm(v) / np.linalg.norm(u))
    balanced = ((c * u, v / c),)
    assert float(coordinate_norm(balanced)) ** 2 == pytest.approx(2 * fro, rel=1e-5)
    assert covered_fro_norm(float(coordinate_norm(balanced)), "rank_one") == pytest.approx(fro, rel=1e-5)


def sum_predicate(p):
    return total(p) >= 0.5


@pytest.mark.parametrize("kind", ["weights", "rank_one"])
def test_counts_do_not_depend_on_the_chunk_size(kind):
    pert = (weight_perturbation(PARAMS, "*kernel") if kind == "weights"
            else rank_one_perturbation(PARAMS, "*kernel"))
    counts = {b: count_predicate_hits(sum_predicate, PARAMS, pert, sigma=0.6, key=jax.random.key(7),
                                      num_samples=50, batch_size=b) for b in (50, 16)}
    assert counts[50] == counts[16]
    assert 0 < counts[50] < 50


def test_certificate_fields_agree_with_the_statistics():
    pert = weight_perturbation(PARAMS, "head")
    cert = certify_smoothed_predicate(lambda p: jnp.sum(p["head"]) > 3.0, PARAMS, pert, sigma=0.5,
                                      num_samples=64, alpha=0.01, p_max=0.5, seed=3, batch_size=64)
    # sum of 5 N(0, 0.25) is N(0, 1.25): P[> 3] = 0.0036, so almost surely no hit in 64.
    assert cert.k == 0 and cert.p_hat == 0.0
    assert cert.p_upper == pytest.approx(1 - 0.01 ** (1 / 64))
    assert cert.certified_edit_radius > 0 and cert.covered_edit_fro_norm == cert.certified_edit_radius
    assert cert.num_perturbed_params == 5 and cert.coordinates == "weights"
    with pytest.raises(DiverifyError):
        certify_smoothed_predicate(sum_predicate, PARAMS, pert, sigma=0.5, num_samples=8, alpha=0.0)


SHARDED_SCRIPT = textwrap.dedent("""
    import json, jax, jax.numpy as jnp, flax.linen as nn
    from diverify.cws.sampling import count_predicate_hits, rank_one_perturbation, sample_mesh, weight_perturbation
    params = {"a": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.zeros(4)}
    def pred(p):
        return jnp.tanh(p["a"]).sum() + p["b"] @ jnp.arange(4.0) >= 0.3
    devices = jax.local_devices()
    out = {"devices": len(devices)}
    for kind, pert in (("weights", weight_perturbation(params)), ("rank_one", rank_one_perturbation(params, "a"))):
        out[kind] = [count_predicate_hits(pred, params, pert, sigma=0.4, key=jax.random.key(11), num_samples=203,
                                          batch_size=b, mesh=sample_mesh(devs))
                     for devs, b in ((devices[:1], 203), (devices, 64), (devices[:3], 9))]
    mlp, x = nn.Dense(3), jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
    mlp_params = mlp.init(jax.random.key(0), x)["params"]
    def mlp_pred(p):
        return mlp.apply({"params": p}, x).sum() >= 0.2
    out["local"] = [count_predicate_hits(mlp_pred, mlp_params, weight_perturbation(mlp_params), sigma=0.4,
                                         key=jax.random.key(11), num_samples=203, batch_size=b,
                                         mesh=sample_mesh(devs), sampler="local")
                    for devs, b in ((devices[:1], 203), (devices, 64), (devices[:3], 9))]
    print(json.dumps(out))
""")


def test_sharded_counts_equal_unsharded_counts_on_8_simulated_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8
    for kind in ("weights", "rank_one", "local"):
        assert len(set(out[kind])) == 1, (kind, out[kind])
        assert 0 < out[kind][0] < 203
