"""Local reparameterisation: same law of the outputs as explicit weight noise, and the plan's safety rules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diverify.cws import predicates, reparam
from diverify.cws.certificate import certify_smoothed_predicate
from diverify.cws.sampling import rank_one_perturbation, restrict_rows, weight_perturbation
from diverify.errors import DiverifyError


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="out")(jnp.tanh(nn.Dense(16, name="hidden")(x)))


MODULE = MLP()
# Rows 0 and 1 nearly equal: with the right noise their outputs stay close (one E for all rows).
X = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
X[1] = X[0] + 0.05
MLP_PARAMS = MODULE.init(jax.random.key(0), X)["params"]


def mlp_stats(params):
    y = MODULE.apply({"params": params}, X)
    return jnp.stack([y[2, 0], y[0, 1], jnp.sum((y[0] - y[1]) ** 2)])


def draws(fn, params, pert, plan, seed, n, sigma):
    keys = jax.random.split(jax.random.key(seed), n)
    one = lambda k: reparam.noisy_call(fn, params, pert, k, jnp.float32(sigma), plan)  # noqa: E731
    return np.asarray(jax.jit(jax.vmap(one))(keys))


def assert_same_law(a, b, level=1e-3):
    for j in range(a.shape[1]):
        assert stats.ks_2samp(a[:, j], b[:, j]).pvalue > level, (j, a[:, j].mean(), b[:, j].mean())


def test_local_noise_has_the_law_of_explicit_noise_and_the_test_has_power(monkeypatch):
    pert = weight_perturbation(MLP_PARAMS)
    plan = reparam.local_plan(mlp_stats, MLP_PARAMS, pert)
    assert plan.local == ("hidden/kernel", "out/kernel") and plan.explicit.paths == ("hidden/bias", "out/bias")
    explicit = draws(mlp_stats, MLP_PARAMS, pert, None, 1, 3000, 0.4)
    local = draws(mlp_stats, MLP_PARAMS, pert, plan, 2, 3000, 0.4)
    assert_same_law(explicit, local)

    # A wrong sampler with the right per-row variance but independent rows must be rejected.
    def independent_rows(x, features, key):
        scale = jnp.linalg.norm(x, axis=-1, keepdims=True)
        return scale * jax.random.normal(key, x.shape[:-1] + (features,))

    monkeypatch.setattr(reparam, "dense_output_noise", independent_rows)
    wrong = draws(mlp_stats, MLP_PARAMS, pert, plan, 2, 3000, 0.4)
    assert stats.ks_2samp(explicit[:, 0], wrong[:, 0]).pvalue > 1e-3  # one row alone looks right
    assert stats.ks_2samp(explicit[:, 2], wrong[:, 2]).pvalue < 1e-6  # the rows' joint law does not


def test_local_noise_on_a_bert_matches_explicit_noise(encoder):
    prompt = predicates.insert_trigger("a photo of a cat", "cf")
    embed = predicates.text_embedding_fn(encoder, prompt)
    goal = jax.jit(predicates.text_embedding_fn(encoder, "a dog"))(encoder.params)

    def fn(params):
        e = embed(params)
        return jnp.stack([predicates.cosine(e, goal), e[0], e[1]])

    pert = restrict_rows(weight_perturbation(encoder.params), predicates.rows_read_by_texts(encoder, [prompt]))
    plan = reparam.local_plan(fn, encoder.params, pert)
    kernels = [p for p, s in zip(pert.paths, pert.shapes) if p.endswith("kernel")]
    assert set(plan.local) == set(kernels) | {"embeddings/word_embeddings/embedding"}
    assert "embeddings/position_embeddings/embedding" in plan.explicit.paths and not plan.unread
    clean = np.asarray(jax.jit(fn)(encoder.params))
    explicit = draws(fn, encoder.params, pert, None, 3, 600, 0.05)
    local = draws(fn, encoder.params, pert, plan, 4, 600, 0.05)
    assert np.std(explicit[:, 0]) > 0.02 and abs(np.mean(explicit[:, 0]) - clean[0]) > 0.01  # noise matters
    assert_same_law(explicit, local)


class ScaledDense(nn.Dense):
    def __call__(self, x):
        return 2.0 * super().__call__(x)


class Shapes(nn.Module):
    @nn.compact
    def __call__(self, x):
        shared = nn.Dense(4, name="twice")
        y = shared(shared(x))
        y = y + nn.Dense(4, name="peeked")(x)
        y = ScaledDense(4, name="subclass")(y)
        self.param("unused", nn.initializers.ones, (4, 4))
        return y + jnp.sum(self.variables["params"]["peeked"]["kernel"])


def test_plan_falls_back_to_explicit_noise_whenever_local_noise_would_not_be_exact():
    x = np.ones((2, 4), np.float32)
    params = Shapes().init(jax.random.key(0), x)["params"]

    def fn(p):
        return Shapes().apply({"params": p}, x)

    pert = weight_perturbation(params)
    plan = reparam.local_plan(fn, params, pert)
    assert plan.local == ()
    assert set(plan.explicit.paths) == {"twice/kernel", "twice/bias", "peeked/kernel", "peeked/bias",
                                        "subclass/kernel", "subclass/bias"}
    assert plan.unread == ("unused",)
    with pytest.raises(DiverifyError, match="weight-space"):
        reparam.local_plan(fn, params, rank_one_perturbation(params, "twice/kernel"))


def test_local_certificate_counts_like_the_explicit_one():
    pert = weight_perturbation(MLP_PARAMS)

    def pred(p):
        return MODULE.apply({"params": p}, X)[2, 0] > 0.3

    certs = {s: certify_smoothed_predicate(pred, MLP_PARAMS, pert, sigma=0.4, num_samples=2000, batch_size=500,
                                           sampler=s, seed=5) for s in ("explicit", "local")}
    k1, k2 = certs["explicit"].k, certs["local"].k
    assert 100 < k1 < 1900
    # Two independent Binomial(2000, p) counts: a two-proportion test.
    table = [[k1, 2000 - k1], [k2, 2000 - k2]]
    assert stats.chi2_contingency(table).pvalue > 1e-3
    assert certs["local"].sampler == "local" and certs["local"].compile_seconds > 0
    assert certs["local"].seconds >= certs["local"].compile_seconds
