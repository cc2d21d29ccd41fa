"""The public API: method names, jit/vmap, sharding, errors, the jax_verify aliases."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diverify.jax_verify as jax_verify
from diverify.bounds import BoundResult, bound, canonical_method, compile_bounds
from diverify.errors import DiverifyError
from diverify.specs import Box, LpBall, affine_ball, check_set, lp_ball, substitution
from tests.bounds.sampling import check_sound

W = jax.random.normal(jax.random.PRNGKey(0), (4, 3))


def mlp(x):
    return jnp.tanh(x @ W) @ W.T


@pytest.mark.parametrize("name, expected", [("IBP", "ibp"), ("CROWN", "crown"), ("CROWN-IBP", "crown-ibp"),
                                            ("alpha-CROWN", "alpha-crown"), ("forward", "forward")])
def test_auto_lirpa_method_names(name, expected):
    assert canonical_method(name) == expected


def test_unknown_method_and_bad_eps_are_clear_errors():
    with pytest.raises(DiverifyError, match="unknown bound method"):
        canonical_method("beta-crown-plus")
    with pytest.raises(DiverifyError, match="eps must be >= 0"):
        lp_ball(jnp.zeros(3), -0.1)
    with pytest.raises(DiverifyError, match="nothing to bound"):
        bound(mlp, jnp.zeros(4))
    with pytest.raises(DiverifyError, match="empty substitution"):
        substitution(jnp.zeros((3, 2)), [1], [np.zeros((0, 2))])


def test_malformed_input_sets_built_field_by_field_are_clear_errors():
    """``LpBall(center, eps, p)`` puts ``p`` (inf) into ``mask``: refused, never a bound."""
    x0 = jnp.linspace(-1.0, 1.0, 4)
    with pytest.raises(DiverifyError, match="NaN or infinite.*lp_ball"):
        compile_bounds(mlp, LpBall(x0, jnp.float32(0.1), jnp.float32(np.inf)))
    with pytest.raises(DiverifyError, match="eps must be >= 0"):
        compile_bounds(mlp, LpBall(x0, jnp.float32(-0.1), jnp.ones((1,))))
    with pytest.raises(DiverifyError, match="mask must be >= 0"):
        compile_bounds(mlp, LpBall(x0, jnp.float32(0.1), -jnp.ones((1,))))
    with pytest.raises(DiverifyError, match="lower <= upper"):
        compile_bounds(mlp, Box(x0 + 0.1, x0 - 0.1))
    with pytest.raises(DiverifyError, match="NaN or infinite"):
        compile_bounds(mlp, Box(x0.at[0].set(jnp.nan), x0 + 0.1))
    bf = compile_bounds(mlp, lp_ball(x0, 0.1), method="ibp")
    for call in (bf, lambda s: bf.timed(s)):
        with pytest.raises(DiverifyError, match="input set 0: eps must be >= 0"):
            call(LpBall(x0, jnp.float32(-0.1), jnp.ones((1,))))
    # Under jit the numbers are traced: the check steps aside instead of failing on a tracer.
    np.testing.assert_array_equal(jax.jit(lambda c: (check_set(LpBall(c, c[0], c[1:])), c)[1])(x0), x0)


def test_result_is_a_pytree_and_vmaps_over_problems():
    x0 = jax.random.normal(jax.random.PRNGKey(1), (4,))
    bf = compile_bounds(mlp, lp_ball(x0, 0.1), method="crown")
    centers = jax.random.normal(jax.random.PRNGKey(2), (5, 4))
    batched = jax.jit(jax.vmap(lambda c: bf.unchecked(lp_ball(c, 0.1))))(centers)
    assert isinstance(batched, BoundResult) and batched.output.lower.shape == (5, 4)
    for i in range(5):
        single = bf(lp_ball(centers[i], 0.1)).output
        np.testing.assert_allclose(batched.output.lower[i], single.lower, rtol=1e-5, atol=1e-6)


def test_jax_verify_aliases_match_diverify():
    x0 = jax.random.normal(jax.random.PRNGKey(1), (4,))
    ib = jax_verify.IntervalBound(x0 - 0.1, x0 + 0.1)
    for alias, method in [(jax_verify.interval_bound_propagation, "ibp"),
                          (jax_verify.backward_crown_bound_propagation, "crown"),
                          (jax_verify.forward_crown_bound_propagation, "forward"),
                          (jax_verify.crownibp_bound_propagation, "crown-ibp")]:
        out = alias(mlp, ib)
        ref = bound(mlp, lp_ball(x0, 0.1), method=method).output
        np.testing.assert_allclose(out.lower, ref.lower, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.upper, ref.upper, rtol=1e-5, atol=1e-6)


def test_substitution_set_is_sound():
    base = jax.random.normal(jax.random.PRNGKey(3), (3, 4))
    cands = [np.asarray(jax.random.normal(jax.random.PRNGKey(4), (3, 4)))]
    s = substitution(base, [1], cands)
    fn = lambda x: jnp.tanh(x @ W).sum(0)  # noqa: E731
    out = bound(fn, s, method="crown").output
    for c in cands[0]:  # every candidate itself lies inside the bound
        y = fn(base.at[1].set(c))
        assert np.all(y >= out.lower - 1e-5) and np.all(y <= out.upper + 1e-5)
    check_sound(fn, s, out, jax.random.PRNGKey(5), n=64, attack_directions=0)


def test_affine_ball_concretises_exactly_and_is_sound_in_every_method():
    """AffineBall c + G u + [-h, h], ||u||_2 <= 1: minimize_linear is attained at
    u = -G^T a / ||G^T a||, e = -sign(a) h; the interval is attained per coordinate; the zonotope's
    l2 parts map its generators exactly (M = W^T G^T for a linear map); each method's bound holds
    sampled points; bad shapes and negative half-widths are clear errors."""
    from diverify.bounds import backward, zonotope

    k = jax.random.split(jax.random.PRNGKey(21), 4)
    c = jax.random.normal(k[0], (1, 4))
    g = 0.3 * jax.random.normal(k[1], (3, 1, 4))
    h = 0.05 * jnp.abs(jax.random.normal(k[2], (1, 4)))
    s = affine_ball(c, g, h)
    a = np.asarray(jax.random.normal(k[3], (5, 1, 4)), np.float64)
    gm, c64, h64 = (np.asarray(v, np.float64) for v in (g.reshape(3, 4), c.reshape(4), h.reshape(4)))
    proj = a.reshape(5, 4) @ gm.T
    u = -proj / np.linalg.norm(proj, axis=1, keepdims=True)
    attained = (a.reshape(5, 4) * (c64 + u @ gm - np.sign(a.reshape(5, 4)) * h64)).sum(1)
    np.testing.assert_allclose(np.asarray(s.minimize_linear(jnp.asarray(a, jnp.float32))), attained, rtol=1e-5)
    lo, hi = s.interval()
    e = jnp.eye(4).reshape(4, 1, 4)
    np.testing.assert_allclose(np.asarray(lo).reshape(4), np.asarray(s.minimize_linear(e)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(hi).reshape(4), -np.asarray(s.minimize_linear(-e)), rtol=1e-5)
    bf = compile_bounds(lambda x: x @ W, s, method="zonotope")
    env, _, forms, blocks = backward.forward_forms(bf.graph, [s], "zonotope", output_forms=True)
    centre, half, mats = zonotope.l2_parts(forms[0], blocks)
    np.testing.assert_allclose(np.asarray(mats[0]), np.asarray(W).T @ gm.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(centre), c64 @ np.asarray(W), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(half) >= h64 @ np.abs(np.asarray(W)) * (1 - 1e-6))
    rng = np.random.default_rng(0)
    dirs = rng.normal(size=(400, 3))
    dirs *= (rng.uniform(size=(400, 1)) ** (1 / 3)) / np.linalg.norm(dirs, axis=1, keepdims=True)
    dirs[:100] /= np.linalg.norm(dirs[:100], axis=1, keepdims=True)  # the ellipsoid's surface
    pts = c64 + dirs @ gm + rng.choice([-1.0, 1.0], size=(400, 4)) * h64
    ys = np.asarray(jax.vmap(lambda x: mlp(x[None])[0])(jnp.asarray(pts, jnp.float32)))
    for method in ("ibp", "crown", "forward", "zonotope", "crown-zonotope"):
        out = bound(mlp, s, method=method).output
        assert np.all(ys >= np.asarray(out.lower) - 1e-5) and np.all(ys <= np.asarray(out.upper) + 1e-5), method
    with pytest.raises(DiverifyError, match="generators need shape"):
        affine_ball(c, g.reshape(3, 4))
    with pytest.raises(DiverifyError, match="half-widths must be >= 0"):
        affine_ball(c, g, -h)


def test_sharded_batch_matches_unsharded_on_8_cpu_devices():
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from diverify.bounds import compile_bounds
        from diverify.specs import lp_ball
        assert len(jax.devices()) == 8
        W = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
        fn = lambda x: jnp.tanh(x @ W) @ W.T
        bf = compile_bounds(fn, lp_ball(jnp.zeros(4), 0.1), method="crown")
        centers = jax.random.normal(jax.random.PRNGKey(2), (16, 4))
        run = jax.jit(jax.vmap(lambda c: bf.unchecked(lp_ball(c, 0.1)).output))
        mesh = Mesh(np.array(jax.devices()), ("batch",))
        sharded = jax.device_put(centers, NamedSharding(mesh, P("batch")))
        out = run(sharded)
        assert len(out.lower.sharding.device_set) == 8
        ref = run(centers)
        np.testing.assert_allclose(out.lower, ref.lower, rtol=1e-5, atol=1e-6)
        print("OK")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]


def test_linear_range_in_the_terms_layout_matches_minimize_linear_and_holds_sampled_points():
    """``linear_range(s, T)`` (terms of shape ``center.shape + out``, contracted in place) gives
    the numbers of ``minimize_linear`` on the rows moved to the front, for boxes, l_1 / l_2 / l_inf
    balls with a mask that leaves a slice fixed, a substitution set and an affine ball; and every
    sampled point of the set maps inside them."""
    from diverify.specs import linear_range

    k = jax.random.split(jax.random.PRNGKey(31), 6)
    centre = jax.random.normal(k[0], (2, 3, 4))
    mask = jnp.asarray([1.0, 0.0, 1.0]).reshape(1, 3, 1)
    sets = [Box(centre - 0.2, centre + 0.3 * jnp.abs(jax.random.normal(k[1], centre.shape)))]
    sets += [lp_ball(centre, 0.25, p=p, mask=mask) for p in (1, 2, np.inf)]
    sets += [substitution(centre[0], [0, 2], np.asarray(jax.random.normal(k[2], (2, 3, 4)))),
             affine_ball(centre, 0.2 * jax.random.normal(k[3], (5,) + centre.shape), 0.1 * jnp.ones(centre.shape))]
    rng = np.random.default_rng(3)
    for s in sets:
        shape = tuple(s.center.shape)
        terms = jax.random.normal(k[4], shape + (2, 5))
        lo, hi = linear_range(s, terms)
        rows = jnp.moveaxis(terms.reshape(shape + (10,)), -1, 0)
        np.testing.assert_allclose(np.asarray(lo).reshape(10), np.asarray(s.minimize_linear(rows)), rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_allclose(np.asarray(hi).reshape(10), -np.asarray(s.minimize_linear(-rows)), rtol=1e-5,
                                   atol=1e-5)
        if isinstance(s, LpBall):  # points of the ball (its surface included), pushed out along the mask
            d = rng.normal(size=(64,) + shape)
            norm = np.linalg.norm(d, ord=float(s.p), axis=-1, keepdims=True)
            d = d / norm * rng.uniform(0.5, 1.0, size=(64,) + shape[:-1] + (1,)) * 0.25 * np.asarray(s.mask)
            pts = np.asarray(s.center) + d
        elif isinstance(s, Box):
            pts = rng.uniform(np.asarray(s.lower), np.asarray(s.upper), size=(64,) + shape)
        else:
            continue
        ys = pts.reshape(64, -1) @ np.asarray(terms, np.float64).reshape(-1, 10)
        assert np.all(ys >= np.asarray(lo).reshape(10) - 1e-4), type(s).__name__
        assert np.all(ys <= np.asarray(hi).reshape(10) + 1e-4), type(s).__name__


def test_a_ball_with_a_support_is_the_masked_ball_with_input_symbols_for_its_slices_only():
    """``LpBall.support`` (static): the slices outside it never move, whatever the mask says there
    (interval, concretisation, the engine); ``lp_ball`` folds it into the mask and checks it. Every
    method bounds the supported ball as the same ball without a support (mask only), the
    zonotope with one input block of the support's shape, and the bounds hold sampled points."""
    from diverify.bounds import backward

    k = jax.random.split(jax.random.PRNGKey(41), 3)
    centre = jax.random.normal(k[0], (1, 4, 3))
    w1, w2 = jax.random.normal(k[1], (3, 5)), jax.random.normal(k[2], (5, 2))

    def fn(x):  # mixes the tokens (a mean), then a tanh layer per token
        h = jnp.tanh((x + jnp.mean(x, axis=1, keepdims=True)) @ w1)
        return (h @ w2).reshape(-1)

    loose = LpBall(centre, jnp.float32(0.1), jnp.ones((1, 4, 1)), np.inf, (1, 3))  # mask 1 everywhere
    lo, hi = loose.interval()
    assert np.all(np.asarray(hi - lo)[0, [0, 2]] == 0) and np.all(np.asarray(hi - lo)[0, [1, 3]] > 0)
    for p in (np.inf, 2, 1):
        masked = lp_ball(centre, 0.1, p=p, mask=np.asarray([0, 1, 0, 1.0]).reshape(1, 4, 1))
        supported = lp_ball(centre, 0.1, p=p, support=[3, 1])
        assert supported.support == (1, 3)
        np.testing.assert_array_equal(np.asarray(supported.mask), np.asarray(masked.mask))
        for method in ("ibp", "crown", "zonotope", "crown-zonotope"):
            a, b = bound(fn, masked, method=method).output, bound(fn, supported, method=method).output
            np.testing.assert_allclose(np.asarray(b.lower), np.asarray(a.lower), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np.asarray(b.upper), np.asarray(a.upper), rtol=1e-5, atol=1e-6)
            check_sound(fn, supported, b, jax.random.PRNGKey(42), n=128, attack_directions=2)
        graph = compile_bounds(fn, supported, method="zonotope").graph
        _, _, _, blocks = backward.forward_forms(graph, [supported], "zonotope", output_forms=True)
        _, _, _, full = backward.forward_forms(graph, [masked], "zonotope", output_forms=True)
        assert blocks.shapes[0] == (2, 3) and full.shapes[0] == (1, 4, 3)
    with pytest.raises(DiverifyError, match="support must list distinct slices in 0..3"):
        lp_ball(centre, 0.1, support=[4])
    with pytest.raises(DiverifyError, match="support must list"):
        check_set(LpBall(centre, jnp.float32(0.1), jnp.ones((1, 4, 1)), np.inf, (0, 7)))
