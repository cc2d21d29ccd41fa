"""CMAV certificates end to end on a small random BERT (ids, no tokenizer)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diverify import cmav
from diverify.errors import DiverifyError
from diverify.models import load_text_encoder
from tests.conftest import write_bert_checkpoint

IDS = [2, 7, 11, 5, 3]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    d = tmp_path_factory.mktemp("small-bert")
    write_bert_checkpoint(d, seed=3, num_hidden_layers=1)
    return load_text_encoder(str(d))


def test_certified_at_small_eps_and_collision_below_clean_cosine(encoder):
    prompt = cmav.make_prompt(encoder, ids=IDS)
    other = cmav.make_prompt(encoder, ids=[2, 9, 4, 3])
    target = encoder.embed_ids(jnp.asarray(other.ids))
    ball = cmav.embedding_ball(encoder, prompt, [2], 1e-4)
    clean = float(cmav.cosine_function(encoder, prompt, target / jnp.linalg.norm(target))(ball.center)[0])
    # a threshold above the clean cosine is certified at a tiny radius ...
    cert = cmav.certify(encoder, prompt, ball, ["other"], min(clean + 0.2, 0.999), method="crown-forward",
                        concept_vectors=target)
    assert cert.concepts[0].status == "certified" and cert.certified
    assert cert.concepts[0].cosine_lower <= clean <= cert.concepts[0].cosine_upper
    # ... and a threshold at or below the clean cosine is a collision with a witness.
    cert = cmav.certify(encoder, prompt, ball, ["other"], clean - 1e-3, method="crown-forward", concept_vectors=target)
    assert cert.concepts[0].status == "collision" and cert.concepts[0].witness is not None
    assert cert.concepts[0].attack_cosine >= clean - 1e-3


def test_pgd_never_exceeds_the_certified_upper_bound(encoder):
    prompt = cmav.make_prompt(encoder, ids=IDS)
    target = jax.random.normal(jax.random.PRNGKey(0), (2, encoder.embedding_dim))
    ball = cmav.embedding_ball(encoder, prompt, [1, 3], 1e-3)
    cert = cmav.certify(encoder, prompt, ball, ["a", "b"], -1.0, method="crown-forward", concept_vectors=target)
    for v in cert.concepts:  # threshold -1 forces the attack to run
        assert v.attack_cosine <= v.cosine_upper + 1e-5


def test_substitution_search_finds_the_best_vertex(encoder):
    prompt = cmav.make_prompt(encoder, ids=IDS)
    s, table = cmav.substitution_set(encoder, prompt, {1: [13, 17], 2: [19, 23, 29]})
    assert [t[0] for t in table] == [IDS[1], IDS[2]]  # the original token is a vertex too
    target = jax.random.normal(jax.random.PRNGKey(1), (1, encoder.embedding_dim))
    fn = cmav.cosine_function(encoder, prompt, target / jnp.linalg.norm(target))
    best, picks = cmav.search_substitutions(fn, s, table)
    brute = max(float(fn(encoder.word_embeddings(jnp.asarray([[IDS[0], a, b, *IDS[3:]]])))[0])
                for a in table[0] for b in table[1])
    assert float(best[0]) == pytest.approx(brute, abs=1e-6)


def test_exhaustive_certificate_is_the_brute_force_maximum_over_the_token_lists(encoder):
    prompt = cmav.make_prompt(encoder, ids=IDS)
    s, table = cmav.substitution_set(encoder, prompt, {1: [13, 17], 3: [19, 23, 29]})
    targets = jax.random.normal(jax.random.PRNGKey(4), (2, encoder.embedding_dim))
    fn = cmav.cosine_function(encoder, prompt, targets / jnp.linalg.norm(targets, axis=-1, keepdims=True))
    brute = {(a, b): [float(x) for x in fn(encoder.word_embeddings(jnp.asarray([[IDS[0], a, IDS[2], b, IDS[4]]])))]
             for a in table[0] for b in table[1]}
    assert len(brute) == 3 * 4  # the original tokens are in the lists too
    for k in range(2):
        best = max(brute, key=lambda ab: brute[ab][k])
        high, low = brute[best][k], min(v[k] for v in brute.values())
        above = cmav.certify(encoder, prompt, s, ["a", "b"], high + 1e-3, method="exhaustive", table_ids=table,
                             concept_vectors=targets).concepts[k]
        assert above.status == "certified" and "all 12 substitutions" in above.reason
        assert above.cosine_upper == pytest.approx(high, abs=1e-6) and above.cosine_lower == pytest.approx(low, abs=1e-6)
        at = cmav.certify(encoder, prompt, s, ["a", "b"], high - 1e-4, method="exhaustive", table_ids=table,
                          concept_vectors=targets).concepts[k]
        assert at.status == "collision" and at.witness == {"substitution": {1: best[0], 3: best[1]}}
        close = cmav.certify(encoder, prompt, s, ["a", "b"], high + 1e-6, method="exhaustive", table_ids=table,
                             concept_vectors=targets).concepts[k]
        assert close.status == "unknown" and "rounding" in close.reason


def test_exhaustive_refuses_balls_and_oversized_lists(encoder, monkeypatch):
    prompt = cmav.make_prompt(encoder, ids=IDS)
    target = jax.random.normal(jax.random.PRNGKey(0), (1, encoder.embedding_dim))
    ball = cmav.embedding_ball(encoder, prompt, [2], 1e-3)
    with pytest.raises(DiverifyError, match="an l_p ball is infinite"):
        cmav.certify(encoder, prompt, ball, ["a"], 0.5, method="exhaustive", concept_vectors=target)
    s, table = cmav.substitution_set(encoder, prompt, {1: [13, 17], 3: [19, 23, 29]})
    monkeypatch.setattr(cmav, "MAX_EXHAUSTIVE", 11)
    with pytest.raises(DiverifyError, match="12 substitution combinations exceed"):
        cmav.certify(encoder, prompt, s, ["a"], 0.5, method="exhaustive", table_ids=table, concept_vectors=target)


def test_a_bound_that_cannot_be_computed_is_unknown_or_a_collision_never_certified(encoder):
    """At eps 1 the IBP LayerNorm variance bound reaches LayerNorm's epsilon and the next
    relaxation (the GELU) is refused: the concepts are unknown with the engine's reason, the
    attack still runs, and a collision it finds is reported with its witness."""
    prompt = cmav.make_prompt(encoder, ids=IDS)
    target = jax.random.normal(jax.random.PRNGKey(0), (1, encoder.embedding_dim))
    ball = cmav.embedding_ball(encoder, prompt, [2], 1.0)
    cert = cmav.certify(encoder, prompt, ball, ["a"], 0.999, method="ibp", concept_vectors=target)
    v = cert.concepts[0]
    assert not cert.certified and v.status == "unknown" and "cannot bound 'gelu_erf'" in v.reason
    assert v.cosine_upper is None and v.cosine_lower is None and v.witness is None
    assert -1.0 <= v.attack_cosine < 0.999  # the attack ran
    cert = cmav.certify(encoder, prompt, ball, ["a"], v.cosine_clean - 1e-3, method="ibp", concept_vectors=target)
    v = cert.concepts[0]
    assert v.status == "collision" and v.witness["delta_norm"] <= 1.0 + 1e-6 and not cert.certified
    cert = cmav.certify(encoder, prompt, ball, ["a"], -1.0, method="ibp", concept_vectors=target, attack=False)
    assert cert.concepts[0].status == "unknown"  # even a trivial threshold is not certified without a bound


def test_radius_does_not_certify_where_the_bound_cannot_be_computed(encoder):
    prompt = cmav.make_prompt(encoder, ids=IDS)
    target = jax.random.normal(jax.random.PRNGKey(0), (1, encoder.embedding_dim))
    res = cmav.certified_radius(encoder, prompt, [2], ["a"], 0.999, method="ibp", eps_max=1.0, steps=3,
                                concept_vectors=target)
    assert res.certified_radius < 1.0


def test_bad_specifications_are_clear_errors(encoder):
    prompt = cmav.make_prompt(encoder, ids=IDS)
    with pytest.raises(DiverifyError, match="out of range"):
        cmav.embedding_ball(encoder, prompt, [9], 0.1)
    with pytest.raises(DiverifyError, match="eps must be >= 0"):
        cmav.embedding_ball(encoder, prompt, [1], -1.0)
    with pytest.raises(DiverifyError, match="empty substitution"):
        cmav.substitution_set(encoder, prompt, {1: []})
    with pytest.raises(DiverifyError, match="token ids must lie"):
        cmav.make_prompt(encoder, ids=[1, 10**6])


def test_radius_brackets_the_truth_and_certifies_at_its_answer(encoder):
    """The certified radius is certified, the attack radius is a real collision, and the first lies below the second."""
    prompt = cmav.make_prompt(encoder, ids=IDS)
    other = cmav.make_prompt(encoder, ids=[2, 9, 4, 3])
    target = encoder.embed_ids(jnp.asarray(other.ids))
    unit = target / jnp.linalg.norm(target)
    clean = float(cmav.cosine_function(encoder, prompt, unit)(cmav.embedding_ball(encoder, prompt, [2], 0.0).center)[0])
    tau = clean + 0.02
    res = cmav.certified_radius(encoder, prompt, [2], ["other"], tau, method="crown-forward", eps_max=1.0, steps=4,
                                concept_vectors=target)
    assert 0.0 < res.certified_radius < 1.0
    assert res.attack_radius is not None and res.certified_radius <= res.attack_radius
    at_cert = cmav.certify(encoder, prompt, cmav.embedding_ball(encoder, prompt, [2], res.certified_radius), ["other"],
                           tau, method="crown-forward", concept_vectors=target)
    assert at_cert.certified
    ball = cmav.embedding_ball(encoder, prompt, [2], res.attack_radius)
    best, _ = cmav.pgd_max(cmav.cosine_function(encoder, prompt, unit), ball, jax.random.PRNGKey(0))
    assert float(best[0]) >= tau


def test_pgd_attack_compiles_once_for_every_radius(encoder):
    """eps is traced data: attacking at several radii traces ``fn`` only for the first call;
    every witness lies in its ball and its value is ``fn``'s value there."""
    prompt = cmav.make_prompt(encoder, ids=IDS)
    target = jax.random.normal(jax.random.PRNGKey(2), (1, encoder.embedding_dim))
    inner = cmav.cosine_function(encoder, prompt, target / jnp.linalg.norm(target))
    traces = []

    def fn(we):
        traces.append(1)
        return inner(we)

    attack = cmav.pgd_attack(fn, steps=10, restarts=2)
    ball = cmav.embedding_ball(encoder, prompt, [2], 1e-3)
    for eps in (1e-3, 1e-2, 1e-1):
        vals, xs = attack(dataclasses.replace(ball, eps=jnp.float32(eps)), jax.random.PRNGKey(0))
        n_traced = len(traces) if eps == 1e-3 else n_traced
        assert len(traces) == n_traced
        delta = (xs[0] - ball.center) * ball.mask
        assert float(jnp.max(jnp.abs(delta))) <= eps * (1 + 1e-5)  # the witness lies in the ball
        assert float(vals[0]) == pytest.approx(float(inner(xs[0])[0]), abs=1e-5)


def test_the_clean_cosine_is_the_bounded_function_on_every_device(encoder):
    """Every product of the encoder and the cosine runs at HIGHEST: a GPU would otherwise evaluate the
    clean cosine in TF32, not the full-precision function the engine bounds (seen on an H200: the
    throughput benchmark's clean cosines fell outside their bounds)."""
    from tests.precision import low_precision_products

    prompt = cmav.make_prompt(encoder, ids=IDS)
    targets = encoder.embed_ids(jnp.asarray(cmav.make_prompt(encoder, ids=[2, 9, 4, 3]).ids))
    ball = cmav.embedding_ball(encoder, prompt, [2], 1e-4)
    fn = cmav.cosine_function(encoder, prompt, targets / jnp.linalg.norm(targets))
    assert low_precision_products(fn, ball.center) == []
    assert low_precision_products(lambda x: jnp.dot(x, x), ball.center[0, 0]) == ["dot_general: None"]


def test_cosine_bound_relaxes_one_product_per_concept_and_is_no_looser(encoder):
    """``unit_cosines`` scales ``targets @ e`` by ``rsqrt(sum e^2)``: one bilinear relaxation per
    concept. Normalising ``e`` coordinate by coordinate first gives the same function, but its
    bound is looser (each coordinate's product error is summed by the dot)."""
    from diverify.bounds import compile_bounds

    prompt = cmav.make_prompt(encoder, ids=IDS)
    targets = jax.random.normal(jax.random.PRNGKey(1), (3, encoder.embedding_dim))
    targets = targets / jnp.linalg.norm(targets, axis=-1, keepdims=True)
    new = cmav.cosine_function(encoder, prompt, targets)

    def per_coordinate(we):
        e = encoder.pooled_from_word_embeddings(encoder.params, we, prompt.mask, prompt.ids)[0]
        return jnp.matmul(targets, e * jax.lax.rsqrt(jnp.sum(e * e)), precision=jax.lax.Precision.HIGHEST)

    ball = cmav.embedding_ball(encoder, prompt, [2], 3e-3)
    clean = new(ball.center)
    assert jnp.allclose(clean, per_coordinate(ball.center), atol=1e-6)
    b_new = compile_bounds(new, ball, method="crown-zonotope")(ball).output
    b_old = compile_bounds(per_coordinate, ball, method="crown-zonotope")(ball).output
    assert jnp.all(b_new.lower <= clean) and jnp.all(clean <= b_new.upper)
    assert jnp.all(b_new.upper - b_new.lower <= b_old.upper - b_old.lower)
    assert jnp.sum(b_new.upper - b_new.lower) < jnp.sum(b_old.upper - b_old.lower)  # 0.3% here; 18% on MiniLM



def test_a_max_pooling_encoder_with_masked_positions_is_bounded_soundly_and_tightly(encoder):
    # Max pooling (sentence-transformers' pooling_mode_max_tokens) over a prompt with masked positions
    # in the middle and at the end: the engine bounds the maximum as pairwise a + relu(b - a), and the
    # masked rows hold a copy of an unmasked row. With sentence-transformers' -1e9 fill instead, the
    # pair (masked, unmasked) would cancel 1e9 against 1e9 in float32 and the bound would miss the
    # output by ~2.
    from diverify.bounds import bound
    from tests.bounds.sampling import check_sound

    enc = dataclasses.replace(encoder, pooling="max")
    prompt = cmav.make_prompt(enc, ids=IDS)
    holes = dataclasses.replace(prompt, mask=prompt.mask * np.array([1, 0, 1, 1, 0], prompt.mask.dtype))
    fn = cmav.pooled_function(enc, holes)
    ball = cmav.embedding_ball(enc, holes, [2], 1e-3)
    out = bound(fn, ball, method="zonotope").output
    check_sound(fn, ball, out, jax.random.PRNGKey(3), n=128, attack_directions=4)
    # The ball moves the pooled vector by ~1e-3 (an attack's range); the bound stays of that order.
    assert float(jnp.mean(out.upper - out.lower)) < 0.05
