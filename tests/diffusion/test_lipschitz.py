"""Lipschitz bounds of the reverse chain against the exact Jacobian of the Gaussian-mixture fixture,
sampled pairs and sampled trajectory end points; the UNet's global bound; the CLI."""

import contextlib
import io
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diverify import lipschitz as L
from diverify.cli import main
from diverify.commands import lipschitz as lipschitz_command
from diverify.diffusion import digits
from diverify.diffusion import gmm as G
from diverify.diffusion import schedulers as sch
from diverify.errors import DiverifyError
from diverify.models.diffusers_checkpoint import build_denoiser
from diverify.specs import lp_ball

NOISE = sch.noise_schedule(1000, clip_sample=False)


def mixture(d, std=0.3):
    means = np.zeros((2, d))
    means[0, 0], means[1, 0] = -1.0, 1.0
    return G.gaussian_mixture([0.5, 0.5], means, [std, std], NOISE)


def global_bound(mix, schedule):
    per = [L.step_lipschitz(sch.step_coefficients(schedule, i),
                            L.gmm_eps_lipschitz(mix, float(NOISE.alphas_cumprod[schedule.timesteps[i]])))[0]
           for i in range(schedule.num_steps)]
    return per, math.prod(per)


@pytest.mark.parametrize("d", [2, 16])
def test_global_bound_dominates_the_exact_jacobian_and_sampled_pairs(d):
    mix, schedule = mixture(d), sch.ddim_schedule(NOISE, 4)
    per, total = global_bound(mix, schedule)
    rng = np.random.default_rng(d)
    # Points on the boundary between the modes (x_1 ~ 0) are where sensitivity peaks.
    points = rng.normal(size=(6, d)).astype(np.float32)
    points[:3, 0] = rng.normal(scale=0.02, size=3)
    fmap = G.ddim_map(mix, schedule)
    worst = max(float(np.linalg.norm(np.asarray(j), 2)) for j in jax.jit(jax.vmap(jax.jacfwd(fmap)))(points))
    chain = L.make_chain(G.gmm_eps, mix, None, schedule, points[:1])
    for i in range(schedule.num_steps):
        step = L.step_function(chain, i)
        jacs = jax.jit(jax.vmap(jax.jacfwd(lambda z: step(z[None])[0])))(points)
        assert max(float(np.linalg.norm(np.asarray(j), 2)) for j in jacs) <= per[i]
    assert worst <= total
    batched = jax.jit(jax.vmap(fmap))
    a = rng.normal(size=(200, d)).astype(np.float32)
    b = a + rng.normal(scale=0.3, size=a.shape).astype(np.float32)
    ratios = np.linalg.norm(batched(a) - batched(b), axis=1) / np.linalg.norm(a - b, axis=1)
    assert np.max(ratios) <= total
    # The bound is not vacuous for the mixture: within a few orders of magnitude of the truth.
    assert total <= 1e4 * worst


def test_unequal_stds_have_no_global_bound():
    mix = G.gaussian_mixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.0]], [0.2, 0.5], NOISE)
    with pytest.raises(DiverifyError, match="equal component stds"):
        L.gmm_eps_lipschitz(mix, 0.5)


@pytest.mark.parametrize("method,precision,engine", [("local", "float64", "ibp"), ("reach", "float64", "ibp"),
                                                     ("reach", "float32", "ibp"), ("local", "float32", "zonotope"),
                                                     ("local", "mixed", "zonotope")])
def test_engine_radii_contain_sampled_trajectories(method, precision, engine):
    """Every sampled trajectory from the x_T ball stays within rho_i of the clean one at every step, and
    sampled points on the sphere (pairs with x̄_T) stay under the certified expansion rho_T / r.
    With the zonotope, local carries each radius through the spectral norm of the step's affine form."""
    mix, schedule = mixture(2), sch.ddim_schedule(NOISE, 2)
    x_T = jnp.array([[0.03, 0.4]], jnp.float32)
    chain = L.make_chain(G.gmm_eps, mix, None, schedule, x_T)
    radius = 0.05
    compiled = {}
    rho, _ = L.engine_chain(chain, radius, method, engine, compiled=compiled, precision=precision)
    assert all(b.precision == precision for b in compiled.values())
    if engine == "zonotope" and precision == "float32":  # op by op, the same bound without compiling it whole
        eager, _ = L.engine_chain(chain, radius, method, engine, precision=precision, eager=True)
        np.testing.assert_allclose(eager, rho, rtol=1e-4)  # float32: XLA fusion rounds differently
    # One traced and compiled bound serves every step (a ball for local; a ball then boxes for reach).
    assert len(compiled) == (1 if method == "local" else 2)
    fmap = jax.jit(jax.vmap(G.ddim_map(mix, schedule)))
    clean = np.asarray(fmap(x_T))[0]
    rng = np.random.default_rng(1)
    dirs = rng.normal(size=(400, 2))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    scales = np.concatenate([np.ones(200), rng.uniform(size=200)])[:, None]
    points = np.asarray(x_T) + radius * scales * dirs
    # Attack points: the gradient-ascent optimum of the end-point displacement.
    f = L.chain_function(chain)
    objective = L.attack_objective(f)
    ratio = L.attack_ratio(objective, x_T, f(x_T), radius, jax.random.PRNGKey(0))
    ends = np.asarray(fmap(jnp.asarray(points, jnp.float32)))
    assert np.max(np.linalg.norm(ends - clean, axis=1)) <= rho[-1]
    if engine == "zonotope":  # reach's first ball reuses local's step bound, compiled for the l2 parts only
        reach, _ = L.engine_chain(chain, radius, "reach", engine, compiled=compiled, precision=precision)
        assert compiled["LpBall"].executable is None
        assert np.max(np.linalg.norm(ends - clean, axis=1)) <= reach[-1]
    assert ratio * radius <= rho[-1]
    pair_ratios = np.linalg.norm(ends[:200] - clean, axis=1) / np.linalg.norm(points[:200] - np.asarray(x_T), axis=1)
    assert np.max(pair_ratios) <= rho[-1] / radius
    states = jnp.asarray(points, jnp.float32)[:, None]
    traj = L.clean_trajectory(chain)
    step = jax.jit(jax.vmap(chain.step, in_axes=(0, None)))
    for i in range(chain.num_steps):
        states = step(states, chain.inputs[i])
        assert np.max(np.linalg.norm(np.asarray(states - traj[i + 1]).reshape(len(points), -1), axis=1)) <= rho[i + 1]


def test_symbol_budget_reaches_the_step_bound_and_a_smaller_one_stays_sound():
    """``symbols`` (the zonotope's order-reduction budget) is the compiled step bound's, a cached
    bound with another budget is recompiled, and a tiny budget (every value reduced) gives a
    radius no smaller than the default's that still holds every sampled end point; ``refine``
    reaches the step bound the same way."""
    mix, schedule = mixture(16), sch.ddim_schedule(NOISE, 2)
    x_T = jnp.asarray(np.random.default_rng(2).normal(size=(1, 16)) * 0.5, jnp.float32)
    chain = L.make_chain(G.gmm_eps, mix, None, schedule, x_T)
    radius, compiled = 0.05, {}
    rho_few, _ = L.engine_chain(chain, radius, "local", "zonotope", compiled=compiled, precision="float64", symbols=2)
    assert compiled["LpBall"].bound_function.symbols == 2
    rho, _ = L.engine_chain(chain, radius, "local", "zonotope", compiled=compiled, precision="float64")
    assert compiled["LpBall"].bound_function.symbols is None
    assert rho_few[-1] >= rho[-1] * (1 - 1e-9) and rho_few[-1] > rho[-1], (rho_few, rho)
    # refine= reaches the step bound too (recompiled); with every symbol kept there is nothing to refine
    rho_plain, _ = L.engine_chain(chain, radius, "local", "zonotope", compiled=compiled, precision="float64",
                                  refine="none")
    assert compiled["LpBall"].bound_function.refine == "none"
    np.testing.assert_allclose(rho_plain, rho, rtol=1e-9)
    fmap = jax.jit(jax.vmap(G.ddim_map(mix, schedule)))
    dirs = np.random.default_rng(3).normal(size=(300, 16))
    points = np.asarray(x_T) + radius * dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    ends = np.asarray(fmap(jnp.asarray(points, jnp.float32)))
    assert np.max(np.linalg.norm(ends - np.asarray(fmap(x_T)), axis=1)) <= rho_few[-1]


def test_float64_engine_centres_its_balls_on_the_float64_trajectory():
    """With a float64 engine the local balls are centred on the trajectory evaluated in float64, so a
    step adds float64 rounding to the radius, not the float32 sampler's: at r = 1e-7 the certified
    expansion stays within 1% of the product of the steps' exact Jacobian norms (the float32 centres
    added ~1e-7 in l2 a step, doubling it), and points on the sphere, run in float64, stay inside."""
    mix, schedule = mixture(2), sch.ddim_schedule(NOISE, 3)
    x_T = jnp.array([[0.03, 0.4]], jnp.float32)
    chain = L.make_chain(G.gmm_eps, mix, None, schedule, x_T)
    centres = L.clean_trajectory(chain, float64=True)
    assert all(c.dtype == np.float64 for c in centres)
    np.testing.assert_allclose(np.concatenate(centres), np.concatenate([np.asarray(t) for t in L.clean_trajectory(chain)]),
                               atol=1e-5)
    radius = 1e-7
    rho, _ = L.engine_chain(chain, radius, "local", "zonotope", precision="float64")
    with jax.enable_x64(True):
        step = jax.jit(chain.step)
        k = [jnp.asarray(chain.inputs[i], jnp.float64) for i in range(chain.num_steps)]
        norms = [float(np.linalg.norm(np.asarray(jax.jacfwd(lambda x: step(x, k[i]))(jnp.asarray(centres[i])))
                                      .reshape(2, 2), 2)) for i in range(chain.num_steps)]
        dirs = np.random.default_rng(4).normal(size=(64, 1, 2))
        states = jnp.asarray(centres[0] + radius * dirs / np.linalg.norm(dirs, axis=-1, keepdims=True))
        run = jax.jit(jax.vmap(chain.step, in_axes=(0, None)))
        for i in range(chain.num_steps):
            states = run(states, k[i])
            assert np.max(np.linalg.norm(np.asarray(states) - centres[i + 1], axis=-1)) <= rho[i + 1]
    assert rho[-1] / radius <= 1.01 * math.prod(norms), (rho[-1] / radius, norms)


def test_reach_carries_the_affine_image_and_holds_sampled_trajectories():
    """Reach with the zonotope carries each step's output as an AffineBall in the x_T ball's
    coordinates: its radius follows the chain's own Jacobian (within 3% of the exact float64
    norm at r = 1e-3, d = 16, T = 10), is no looser than local's product of steps, and every
    trajectory from the sphere (and the attack's point), run in float64, stays inside at every step."""
    d, radius = 16, 1e-3
    mix, schedule = mixture(d), sch.ddim_schedule(NOISE, 10)
    x_T = jnp.asarray(np.random.default_rng(2).normal(size=(1, d)) * 0.5, jnp.float32)
    chain = L.make_chain(G.gmm_eps, mix, None, schedule, x_T)
    compiled = {}
    reach, _ = L.engine_chain(chain, radius, "reach", "zonotope", compiled=compiled, precision="float64")
    assert set(compiled) == {"AffineBall"}
    local, _ = L.engine_chain(chain, radius, "local", "zonotope", compiled=compiled, precision="float64")
    centres = L.clean_trajectory(chain, float64=True)
    f = L.chain_function(chain)
    ratio = L.attack_ratio(L.attack_objective(f), x_T, f(x_T), radius, jax.random.PRNGKey(0))
    with jax.enable_x64(True):
        x0 = jnp.asarray(centres[0][0])
        exact = float(np.linalg.norm(np.asarray(jax.jacfwd(G.ddim_map(mix, schedule))(x0)), 2))
        dirs = np.random.default_rng(5).normal(size=(300, 1, d))
        scales = np.concatenate([np.ones(200), np.random.default_rng(6).uniform(size=100)])[:, None, None]
        states = jnp.asarray(centres[0] + radius * scales * dirs / np.linalg.norm(dirs, axis=-1, keepdims=True))
        run = jax.jit(jax.vmap(chain.step, in_axes=(0, None)))
        for i in range(chain.num_steps):
            states = run(states, jnp.asarray(chain.inputs[i], jnp.float64))
            assert np.max(np.linalg.norm(np.asarray(states) - centres[i + 1], axis=-1)) <= reach[i + 1]
    assert ratio * radius <= reach[-1]
    assert reach[-1] <= 1.03 * exact * radius, (reach[-1] / radius, exact)
    assert reach[-1] <= local[-1]


def test_step_map_with_inputs_matches_the_sampler():
    """The chain's one step map, fed each step's coefficients, timestep features and noise, is the
    scheduler's step: mixture under stochastic DDPM, and a UNet whose timestep embedding is substituted."""
    mix = mixture(3)
    schedule = sch.ddpm_schedule(NOISE, 4)
    x_T = jnp.array([[0.2, -0.1, 0.4]], jnp.float32)
    key = jax.random.PRNGKey(5)
    chain = L.make_chain(G.gmm_eps, mix, None, schedule, x_T, key)
    expected = sch.trajectory(G.gmm_eps, mix, x_T, None, schedule, key)
    for got, want in zip(L.clean_trajectory(chain), expected):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    # Another T of the same sampler shares the step map (and so its compiled functions and bounds).
    longer = L.rechain(chain, sch.ddpm_schedule(NOISE, 6), key)
    assert longer.step is chain.step and longer.num_steps == 6
    expected = sch.trajectory(G.gmm_eps, mix, x_T, None, sch.ddpm_schedule(NOISE, 6), key)
    np.testing.assert_allclose(np.asarray(L.chain_function(longer)(x_T)), np.asarray(expected[-1]), rtol=1e-5,
                               atol=1e-6)
    config = dict(digits.UNET_CONFIG, block_out_channels=[8, 16], norm_num_groups=4)
    den = build_denoiser(config, seed=1)
    x_T = jnp.asarray(np.random.default_rng(0).normal(size=(1, 1, 8, 8)), jnp.float32)
    cond = jax.nn.one_hot(jnp.array([4]), 10)
    schedule = sch.ddim_schedule(sch.noise_schedule(), 3)
    chain = L.make_chain(den.eps, den.params, cond, schedule, x_T)
    expected = sch.trajectory(den.eps, den.params, x_T, cond, schedule)
    for got, want in zip(L.clean_trajectory(chain), expected):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    with pytest.raises(DiverifyError, match="stochastic"):
        L.make_chain(G.gmm_eps, mix, None, sch.ddpm_schedule(NOISE, 4), x_T[:, 0, 0, :3])


def test_too_large_bound_problem_is_an_error_before_it_runs():
    mix, schedule = mixture(2), sch.ddim_schedule(NOISE, 2)
    chain = L.make_chain(G.gmm_eps, mix, None, schedule, jnp.array([[0.1, 0.2]]))
    ball = lp_ball(chain.x_T, 0.01, p=2)
    with pytest.raises(DiverifyError, match=r"needs .* GiB .* more than the"):
        L.compile_step_bound(chain, ball, "ibp", memory_limit=1)


@pytest.mark.parametrize("engine", ["ibp", "zonotope"])
def test_a_step_bound_that_fails_names_its_step_and_radius(engine, monkeypatch):
    """A relaxation failing inside the chain (the engine's message names the node, e.g. a GroupNorm's
    variance reaching 0) also says at which step and how far the input set had grown: on the digits
    UNet the last steps fail first. The error keeps its type and chains the engine's."""
    mix, schedule = mixture(2), sch.ddim_schedule(NOISE, 4)
    chain = L.make_chain(G.gmm_eps, mix, None, schedule, jnp.array([[0.03, 0.4]]))
    radius, compiled = 0.05, {}
    rho, _ = L.engine_chain(chain, radius, "local", engine, compiled=compiled)
    (bound,) = compiled.values()
    calls = []

    class Refused(DiverifyError):
        pass

    def failing(*args):  # the third step's relaxation leaves its domain
        calls.append(args)
        if len(calls) == 3:
            raise Refused("cannot bound 'rsqrt' (from unet.py:72 (GroupNorm.__call__)): its input interval leaves")
        return original(*args)

    if engine == "zonotope":
        original = L.l2_step_radius
        monkeypatch.setattr(L, "l2_step_radius", failing)
    else:
        original = bound.__call__
        monkeypatch.setattr(type(bound), "__call__", lambda self, *a: failing(*a))
    with pytest.raises(Refused, match=rf"^step 3 of 4, whose input set lies within l2 distance {rho[2]:.3g} of "
                                      r"the clean trajectory: cannot bound 'rsqrt' \(from unet.py:72") as err:
        L.engine_chain(chain, radius, "local", engine, compiled=compiled)
    assert isinstance(err.value.__cause__, Refused)


def test_report_is_consistent_and_lower_bounds_stay_below():
    mix, schedule = mixture(3), sch.ddim_schedule(NOISE, 3)
    chain = L.make_chain(G.gmm_eps, mix, None, schedule, jnp.array([[0.01, -0.2, 0.5]]))
    lip = lambda t: (L.gmm_eps_lipschitz(mix, float(NOISE.alphas_cumprod[t])), None)  # noqa: E731
    report = L.lipschitz_report(chain, "global", 0.02, lip, distance=0.5, bisect_iters=2)
    assert report.empirical_lower <= report.cumulative
    assert all(e <= b for e, b in zip(report.empirical_per_step, report.per_step))
    assert math.isclose(report.cumulative, math.prod(report.per_step), rel_tol=1e-9)
    assert report.certified_radius == pytest.approx(0.5 / report.cumulative)
    assert report.cond_certified_radius is None  # the mixture has no bound w.r.t. its weights
    assert report.empirical_radius is None or report.certified_radius <= report.empirical_radius * 1.01
    exact = float(np.linalg.norm(np.asarray(G.ddim_jacobian(mix, schedule, chain.x_T[0])), 2))
    assert report.empirical_chain_jacobian == pytest.approx(exact, rel=1e-3)
    with pytest.raises(DiverifyError, match="radius"):
        L.lipschitz_report(chain, "global", -1.0, lip)
    with pytest.raises(DiverifyError, match="unknown Lipschitz method"):
        L.lipschitz_report(chain, "spectral", 0.1, lip)
    with pytest.raises(DiverifyError, match="unknown precision"):
        L.lipschitz_report(chain, "local", 0.1, precision="float16")


def test_decision_distance_is_the_exact_distance_to_the_boundary():
    rng = np.random.default_rng(0)
    dec = L.LinearDecision(rng.normal(size=(4, 6)), rng.normal(size=4))
    x = rng.normal(size=6)
    label, distance = dec.boundary_distance(x)
    z = dec.weight @ x + dec.bias
    assert label == int(np.argmax(z)) and distance > 0
    gaps = [(z[label] - z[j]) / np.linalg.norm(dec.weight[label] - dec.weight[j]) if j != label else np.inf
            for j in range(4)]
    j = int(np.argmin(gaps))
    u = (dec.weight[label] - dec.weight[j]) / np.linalg.norm(dec.weight[label] - dec.weight[j])
    def labels(points):
        return np.argmax(np.atleast_2d(points) @ dec.weight.T + dec.bias, axis=1)

    assert labels(x - distance * (1 + 1e-6) * u)[0] != label  # just past the nearest boundary
    directions = rng.normal(size=(2000, 6))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    inside = x + 0.999 * distance * directions * rng.uniform(size=(2000, 1)) ** (1 / 6)
    assert np.all(labels(inside) == label)
    assert np.all(labels(x + 0.999 * distance * directions) == label)
    # The mixture's Bayes rule for modes at +-e1 with one std is the sign of the first coordinate.
    points = rng.normal(size=(500, 3))
    mix_dec = L.mixture_decision(mixture(3))
    assert np.array_equal(labels_of(mix_dec, points), (points[:, 0] > 0).astype(int))
    with pytest.raises(DiverifyError, match="takes 6 values"):
        dec.boundary_distance(np.zeros(5))
    with pytest.raises(DiverifyError, match="share one std"):
        L.mixture_decision(G.gaussian_mixture([0.5, 0.5], np.eye(2), [0.3, 0.4], NOISE))


def labels_of(dec, points):
    return np.argmax(points @ np.asarray(dec.weight).T + np.asarray(dec.bias), axis=1)


def test_certified_decision_radius_keeps_the_label_under_sampling_and_attack():
    mix, schedule = mixture(2), sch.ddim_schedule(NOISE, 5)
    # x_T whose final sample lands near the boundary between the modes.
    chain = L.make_chain(G.gmm_eps, mix, None, schedule, jnp.array([[0.05, 0.3]]))
    dec = L.mixture_decision(mix)
    report = L.lipschitz_report(chain, "reach", 0.01, decision=dec, bisect_iters=3)
    fmap = jax.jit(jax.vmap(G.ddim_map(mix, schedule)))
    x_T = np.asarray(chain.x_T, np.float32)
    clean = np.asarray(fmap(x_T), np.float64)
    assert report.decision_label == labels_of(dec, clean)[0]
    assert report.distance == pytest.approx(dec.boundary_distance(clean[0])[1], rel=1e-4)
    r = report.certified_radius
    assert r is not None and r > 0
    rng = np.random.default_rng(1)
    directions = rng.normal(size=(400, 2))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    points = np.concatenate([x_T + r * directions, x_T + r * directions * rng.uniform(size=(400, 1))])
    assert np.all(labels_of(dec, np.asarray(fmap(points.astype(np.float32)))) == report.decision_label)
    flip = L.decision_objective(L.chain_function(chain), dec, report.decision_label)
    assert L.sphere_ascent(lambda d: flip(d, chain.x_T), chain.x_T, r, jax.random.PRNGKey(2)) <= 0
    # The attack changes the label within one bisection bracket (10^(1/8)) above its radius, and no
    # certificate can exceed a radius where the label changes.
    assert report.empirical_radius is not None and r <= report.empirical_radius * 10 ** (1 / 8)
    with pytest.raises(DiverifyError, match="either a distance or a decision"):
        L.lipschitz_report(chain, "reach", 0.01, distance=0.1, decision=dec)


def test_global_radius_in_the_class_weights_is_distance_over_the_conditioning_bound():
    config = dict(digits.UNET_CONFIG, block_out_channels=[8, 16], norm_num_groups=4)
    den = build_denoiser(config, seed=3)
    lx, lc = L.unet_eps_lipschitz(den.config, den.params)
    schedule = sch.ddim_schedule(NOISE, 2)
    chain = L.make_chain(den.eps, den.params, jax.nn.one_hot(jnp.array([3]), 10), schedule,
                         jnp.zeros((1, 1, 8, 8)))
    report = L.lipschitz_report(chain, "global", 0.01, lambda t: (lx, lc), distance=0.5, bisect_iters=1)
    assert report.cond_cumulative is not None and report.log10_cond_cumulative is not None
    assert report.cond_certified_radius == pytest.approx(0.5 * 10 ** -report.log10_cond_cumulative)
    assert report.decision_label is None
    # The powers of ten stay finite where the radii underflow float64 (a trained UNet's 10^-701).
    assert report.log10_certified_radius == pytest.approx(math.log10(0.5) - report.log10_cumulative)
    assert report.log10_cond_certified_radius == pytest.approx(math.log10(0.5) - report.log10_cond_cumulative)
    assert lipschitz_command._radius(0.0, -701.34) == "0 (10^-701.3)"
    assert lipschitz_command._radius(0.0125, -1.9) == "0.0125" and lipschitz_command._radius(None) == "none found"


def test_unet_global_bound_dominates_sampled_pairs_in_sample_and_class_weights():
    config = dict(digits.UNET_CONFIG, block_out_channels=[8, 16], norm_num_groups=4)
    den = build_denoiser(config, seed=3)
    lx, lc = L.unet_eps_lipschitz(den.config, den.params)
    rng = np.random.default_rng(0)
    eps = jax.jit(den.eps)
    t = jnp.array([500] * 16)
    x = jnp.asarray(rng.normal(size=(16, 1, 8, 8)), jnp.float32)
    y = x + jnp.asarray(rng.normal(scale=0.1, size=x.shape), jnp.float32)
    c = jax.nn.one_hot(jnp.arange(16) % 10, 10)
    c2 = jax.nn.softmax(jnp.asarray(rng.normal(size=(16, 10)), jnp.float32))
    def norms(v):
        return np.linalg.norm(np.asarray(v, np.float64).reshape(16, -1), axis=1)

    # float64 comparisons: a UNet's global bound is far beyond float32's range.
    assert math.isfinite(lx) and math.isfinite(lc)
    assert np.all(norms(eps(den.params, x, t, c) - eps(den.params, y, t, c)) <= lx * norms(x - y))
    assert np.all(norms(eps(den.params, x, t, c) - eps(den.params, x, t, c2)) <= lc * norms(c - c2))
    # The layer bounds are exact upper bounds: never below power iteration on the same operator.
    kernel = den.params["conv_in"]["kernel"]
    conv = lambda v: jax.lax.conv_general_dilated(v, kernel, (1, 1), ((1, 1), (1, 1)),  # noqa: E731
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert L.power_iteration_norm(conv, (1, 8, 8, 1), jax.random.PRNGKey(0)) <= L.conv_norm_bound(kernel)


def run_cli(argv):
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(argv)
    return code, buffer.getvalue()


def test_cli_json_and_errors(tmp_path, capsys):
    code, text = run_cli(["lipschitz", "--denoiser", "gmm", "--steps", "3", "--method", "global", "--json"])
    assert code == 0
    result = json.loads(text)
    assert {"per_step", "cumulative", "empirical_lower", "method", "seconds"} <= set(result)
    assert len(result["per_step"]) == 3 and result["cumulative"] >= result["empirical_lower"] > 0
    code, text = run_cli(["lipschitz", "--denoiser", "gmm", "--steps", "3", "--method", "global", "--keep-decision"])
    assert code == 0 and "radius keeping the classifier's decision (class" in text
    missing = str(tmp_path / "missing")
    for argv, message in [(["--denoiser", "gmm", "--radius", "-1"], "radius"),
                          (["--denoiser", "gmm", "--method", "spectral"], "unknown --method"),
                          (["--denoiser", missing], "does not exist"),
                          (["--denoiser", "gmm", "--keep-decision", "--distance", "0.1"], "--keep-decision"),
                          (["--denoiser", "gmm", "--method", "local", "--symbols", "0"], "--symbols must be a positive")]:
        code, _ = run_cli(["lipschitz", "--steps", "2"] + argv)
        assert code != 0
        assert message in capsys.readouterr().err


def test_cli_precision_auto_is_mixed_for_a_model_directory_and_float32_for_the_mixture():
    from diverify.commands.lipschitz import engine_precision

    assert engine_precision("auto", "runs/digits") == "mixed"
    assert engine_precision("auto", "gmm") == "float32"
    assert engine_precision("float64", "gmm") == "float64" and engine_precision("float32", "runs/digits") == "float32"
    code, text = run_cli(["lipschitz", "--denoiser", "gmm", "--steps", "2", "--method", "local", "--radius", "0.01",
                          "--json"])
    assert code == 0 and json.loads(text)["precision"] == "float32"
