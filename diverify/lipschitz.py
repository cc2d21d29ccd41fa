"""Lipschitz bounds of the reverse diffusion chain x_T -> x_0, per step and cumulative.

A reverse step is (see :mod:`diverify.diffusion.schedulers`)

    f_i(x) = a * clip((x - s eps(x)) / sqrt(abar)) + b x + c eps(x) + sigma z_i,

with ``z_i`` a fixed noise draw for stochastic samplers (DDPM, DDIM eta > 0),
so the chain F = f_{T-1} o ... o f_0 is a deterministic function of x_T.
Norms are Euclidean over the whole sample. Three certified methods:

* ``global``: ||f_i(x) - f_i(y)|| <= L_i ||x - y|| for ALL x, y, with
  L_i = |a| / sqrt(abar) (1 + s L_eps) + |b| + |c| L_eps (clip is 1-Lipschitz),
  and L_eps a global bound of the denoiser; cumulative prod_i L_i. For a UNet
  L_eps is a product/sum of per-layer bounds (:func:`unet_eps_lipschitz`); for the
  Gaussian mixture it is closed form (:func:`gmm_eps_lipschitz`). Sensitivity to
  the conditioning c: sum_i (prod_{j>i} L_j) L_{c,i}.
* ``local``: balls along the clean trajectory x̄_i. With rho_0 = r, the bound
  engine bounds f_i over the l2 ball B(x̄_i, rho_i) by a box; rho_{i+1} is the
  l2 distance from x̄_{i+1} to the farthest box corner. By induction every
  x_T in B(x̄_T, r) has x_i in B(x̄_i, rho_i); per step rho_{i+1} / rho_i,
  cumulative rho_T / r bounds ||F(x_T) - F(x̄_T)|| / r (an expansion about
  the clean point, the quantity a certified radius needs).
* ``reach``: the same, but the engine's box of step i is the input set of step
  i+1 (no re-rounding to a ball); cumulative = l2 radius of the last box / r.

Every certified number sits next to an empirical lower bound: the spectral
norm of each step's Jacobian at x̄_i and of the chain's Jacobian at x̄_T
(power iteration with jvp/vjp), and a projected-gradient attack on
||F(x̄_T + delta) - F(x̄_T)|| over ||delta|| <= r. The attack ratio is a lower
bound of all three certified cumulative numbers; the chain's Jacobian norm
is a lower bound of the global one.

Soundness: global bounds rest on (i) exact upper bounds of linear operator
norms (the Schur bound ||A||_2 <= sqrt(||A||_1 ||A||_inf) for convolutions,
an SVD padded by a relative 1e-4 for dense layers) and (ii) the stated
nonlinearity slopes; power iteration is only reported, never used, because it
under-estimates. Local and reach bounds are as sound as the bound engine
(float32 rounding covered by its padding). All are exact-arithmetic bounds
for the float32 model evaluated in real arithmetic.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diverify.diffusion.schedulers import SamplingSchedule, StepCoefficients, apply_step, step_coefficients
from diverify.errors import DiverifyError

METHODS = ("global", "local", "reach")

#: max_x |d/dx x sigmoid(x)| (attained at x ~ 2.3994).
SILU_SLOPE = 1.0998
#: Relative padding of a float32 SVD's largest singular value.
_SVD_PADDING = 1e-4


# --------------------------------------------------------------------------- the chain


@dataclasses.dataclass(frozen=True)
class Chain:
    """A reverse chain ready to bound: ``eps(x) = apply_fn(params, x, t, cond)``, fixed noise per step.

    ``x_T`` has a batch axis of 1 (``(1, d)`` for the mixture, ``(1, C, H, W)``
    for an image model); ``noises[i]`` is the z of step i (None when sigma = 0).
    """

    apply_fn: Callable
    params: Any
    cond: Any
    schedule: SamplingSchedule
    x_T: jax.Array
    noises: tuple
    jitted_apply: Callable | None = None

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps


def make_chain(apply_fn: Callable, params: Any, cond: Any, schedule: SamplingSchedule, x_T: Any,
               key: jax.Array | None = None) -> Chain:
    """A :class:`Chain`; ``key`` draws the fixed noise of stochastic steps (required then)."""
    x_T = jnp.asarray(x_T, jnp.float32)
    if x_T.ndim < 2 or x_T.shape[0] != 1:
        raise DiverifyError(f"x_T must have a batch axis of size 1, got shape {tuple(x_T.shape)}")
    noises = []
    for i in range(schedule.num_steps):
        if step_coefficients(schedule, i).noise_std:
            if key is None:
                raise DiverifyError(f"the {schedule.kind} sampler is stochastic here: pass a key to fix its noise")
            noises.append(jax.random.normal(jax.random.fold_in(key, i), x_T.shape, jnp.float32))
        else:
            noises.append(None)
    return Chain(apply_fn, params, cond, schedule, x_T, tuple(noises), jax.jit(apply_fn))


def step_function(chain: Chain, i: int, jitted: bool = False) -> Callable[[jax.Array], jax.Array]:
    """f_i as a function of x (batch 1). ``jitted`` calls the denoiser through one jitted function
    shared by all steps (t is an argument), so that autodiff along T steps compiles the model once;
    the bound engine needs the plain function."""
    coeffs = step_coefficients(chain.schedule, i)
    c = chain.cond
    z = chain.noises[i]
    apply_fn = chain.jitted_apply if jitted and chain.jitted_apply is not None else chain.apply_fn

    def step(x):
        eps = apply_fn(chain.params, x, jnp.full((x.shape[0],), coeffs.t, jnp.int32), c)
        return apply_step(coeffs, x, eps, z)

    return step


def chain_function(chain: Chain, jitted: bool = True) -> Callable[[jax.Array], jax.Array]:
    """F = f_{T-1} o ... o f_0 (``jitted``: see :func:`step_function`)."""
    steps = [step_function(chain, i, jitted) for i in range(chain.num_steps)]

    def run(x):
        for f in steps:
            x = f(x)
        return x

    return run


def clean_trajectory(chain: Chain) -> list[jax.Array]:
    """x̄_T, ..., x̄_0 from the chain's x_T."""
    states = [chain.x_T]
    for i in range(chain.num_steps):
        states.append(step_function(chain, i, jitted=True)(states[-1]))
    return states


# --------------------------------------------------------------------------- global bounds


def dense_norm_bound(w: Any) -> float:
    """Upper bound of the spectral norm of a matrix: float32 SVD plus a relative margin."""
    w = np.asarray(w, np.float64).reshape(-1, np.shape(w)[-1])
    return float(np.linalg.norm(w, 2) * (1 + _SVD_PADDING))


def conv_norm_bound(kernel: Any) -> float:
    """Upper bound of ||conv||_2 for an HWIO kernel, any stride and zero padding.

    Schur: ||A||_2 <= sqrt(||A||_1 ||A||_inf). A row of the conv matrix (one
    output) holds at most the kernel of its output channel, a column (one input)
    at most every tap of its input channel once per output channel; zero
    padding and stride only remove entries.
    """
    k = np.abs(np.asarray(kernel, np.float64))
    row = k.sum(axis=(0, 1, 2)).max()
    col = k.sum(axis=(0, 1, 3)).max()
    return float(math.sqrt(row * col) * (1 + _SVD_PADDING))


def power_iteration_norm(linear: Callable, x_shape: tuple, key: jax.Array, iters: int = 30) -> float:
    """Estimate (a LOWER bound, up to convergence) of ||A||_2 for a linear map ``linear`` via A^T A."""
    v = jax.random.normal(key, x_shape, jnp.float32)
    _, vjp = jax.vjp(linear, jnp.zeros(x_shape, jnp.float32))

    @jax.jit
    def body(v):
        v = v / jnp.linalg.norm(v)
        w = linear(v)
        return vjp(w)[0], jnp.linalg.norm(w)

    norm = 0.0
    for _ in range(iters):
        v, n = body(v)
        norm = float(n)
    return norm


def _groupnorm(p, eps: float) -> float:
    # (x - mean) / sqrt(var + eps) has Jacobian norm <= 1 / sqrt(var + eps) <= 1 / sqrt(eps).
    return float(np.max(np.abs(np.asarray(p["scale"])))) / math.sqrt(eps)


def _combine(*parts):
    """Lipschitz pair (x, cond) of a concatenation: Minkowski on each argument."""
    return (math.sqrt(sum(p[0] ** 2 for p in parts)), math.sqrt(sum(p[1] ** 2 for p in parts)))


def _resnet(p, h, temb_c: float, eps: float, scale: float = 1.0):
    lx, lc = h
    g1 = _groupnorm(p["norm1"], eps) * SILU_SLOPE
    k1 = conv_norm_bound(p["conv1"]["kernel"])
    ax, ac = lx * g1 * k1, lc * g1 * k1 + dense_norm_bound(p["time_emb_proj"]["kernel"]) * SILU_SLOPE * temb_c
    g2 = _groupnorm(p["norm2"], eps) * SILU_SLOPE * conv_norm_bound(p["conv2"]["kernel"])
    sx, sc = (lx, lc)
    if "conv_shortcut" in p:
        ks = conv_norm_bound(p["conv_shortcut"]["kernel"])
        sx, sc = lx * ks, lc * ks
    return ((sx + ax * g2) / scale, (sc + ac * g2) / scale)


def unet_eps_lipschitz(config: Any, params: Any) -> tuple[float, float]:
    """Global bounds (L_x, L_cond) of a UNet2DModel's output w.r.t. the sample and the class weights.

    Walks the architecture of :class:`diverify.models.unet.UNet`: convolutions by
    :func:`conv_norm_bound`, GroupNorm by max|scale| / sqrt(eps) (its global
    bound, attained when a group's variance is 0), SiLU by its slope 1.0998,
    residual sums add, skip concatenations combine by Minkowski, nearest 2x
    upsampling has norm 2. Each value carries (L_x, L_c) with
    ||delta h|| <= L_x ||delta x|| + L_c ||delta c||. Attention has no global
    Lipschitz bound (Kim et al. 2021), so a model with attention is an error.
    """
    cfg = config
    if cfg.cross_attention_dim is not None or any("Attn" in b for b in cfg.down_block_types + cfg.up_block_types) \
            or (cfg.mid_block is not None and cfg.mid_add_attention):
        raise DiverifyError("the global Lipschitz bound needs a UNet without attention (dot-product attention is "
                            "not globally Lipschitz); use --method local or reach")
    eps = cfg.norm_eps
    temb_c = dense_norm_bound(params["class_embedding"]["embedding"]) if cfg.num_class_embeds is not None else 0.0
    h = (conv_norm_bound(params["conv_in"]["kernel"]) * (2.0 if cfg.center_input_sample else 1.0), 0.0)
    skips = [h]
    n = len(cfg.block_out_channels)
    for i in range(n):
        block = params[f"down_blocks_{i}"]
        for j in range(cfg.layers_per_block):
            h = _resnet(block[f"resnets_{j}"], h, temb_c, eps)
            skips.append(h)
        if i < n - 1:
            k = conv_norm_bound(block["downsamplers_0"]["conv"]["kernel"])
            h = (h[0] * k, h[1] * k)
            skips.append(h)
    if cfg.mid_block is not None:
        mid = params["mid_block"]
        for j in range(2):
            h = _resnet(mid[f"resnets_{j}"], h, temb_c, eps, cfg.mid_block_scale_factor)
    for i in range(n):
        block = params[f"up_blocks_{i}"]
        for j in range(cfg.layers_per_block + 1):
            h = _resnet(block[f"resnets_{j}"], _combine(h, skips.pop()), temb_c, eps)
        if i < n - 1:
            k = 2.0 * conv_norm_bound(block["upsamplers_0"]["conv"]["kernel"])
            h = (h[0] * k, h[1] * k)
    g = _groupnorm(params["conv_norm_out"], eps) * SILU_SLOPE * conv_norm_bound(params["conv_out"]["kernel"])
    return h[0] * g, h[1] * g


def gmm_eps_lipschitz(mixture: Any, abar: float) -> float:
    """Global bound of x -> eps*(x, t) for an isotropic mixture with one shared std s.

    eps* = -sqrt(1 - abar) score; the score's Jacobian is -I / v + abar Cov_r(mu) / v^2
    (v = abar s^2 + 1 - abar, Cov_r the covariance of the means under the
    responsibilities), symmetric with eigenvalues in [-1/v, -1/v + abar D^2 / (4 v^2)]
    by Popoviciu's inequality (D: the largest distance between two means).
    """
    stds = np.asarray(mixture.stds, np.float64)
    if np.ptp(stds) > 0:
        raise DiverifyError("the global Lipschitz bound of a mixture needs equal component stds "
                            "(with unequal ones the score's Jacobian grows with |x|); use local or reach")
    means = np.asarray(mixture.means, np.float64)
    diam = max(float(np.linalg.norm(a - b)) for a in means for b in means)
    v = abar * stds[0] ** 2 + 1 - abar
    top = -1 / v + abar * diam ** 2 / (4 * v * v)
    return math.sqrt(1 - abar) * max(1 / v, abs(top)) * (1 + 1e-5)


def step_lipschitz(c: StepCoefficients, eps_x: float, eps_c: float | None = None) -> tuple[float, float | None]:
    """(L_x, L_c) of one step from bounds of eps (clip is 1-Lipschitz, the noise term is constant);
    L_c is None when the denoiser has no bound w.r.t. its conditioning."""
    inv = abs(c.pred_x0_coeff) / math.sqrt(c.alpha_prod_t)
    s = math.sqrt(1 - c.alpha_prod_t)
    lx = inv * (1 + s * eps_x) + abs(c.sample_coeff) + abs(c.eps_coeff) * eps_x
    lc = None if eps_c is None else (inv * s + abs(c.eps_coeff)) * eps_c
    return lx, lc


# --------------------------------------------------------------------------- engine-based bounds


def _flat_step(chain: Chain, i: int):
    shape = chain.x_T.shape
    f = step_function(chain, i)
    return lambda flat: f(flat.reshape(shape)).reshape(1, -1)


def _box_radius(lo, hi, centre) -> float:
    """l2 distance from ``centre`` to the farthest point of the box [lo, hi]."""
    far = jnp.maximum(hi - centre, centre - lo)
    return float(jnp.linalg.norm(far))


def engine_chain(chain: Chain, radius: float, method: str, engine_method: str = "crown-forward",
                 trajectory: list | None = None, compiled: dict | None = None,
                 progress: Callable | None = None) -> tuple[list[float], list[float]]:
    """Radii rho_0 = radius, rho_1, ..., rho_T of the ``local`` (balls) or ``reach`` (boxes) propagation.

    Returns (rho, box_widths): ``box_widths[i]`` is the largest half-width of step i's output box.
    ``compiled`` caches the traced bound functions per step (same graph for any radius).
    """
    from diverify.bounds.api import compile_bounds
    from diverify.specs import Box, lp_ball

    traj = clean_trajectory(chain) if trajectory is None else trajectory
    compiled = {} if compiled is None else compiled
    rho, widths = [float(radius)], []
    box = None
    for i in range(chain.num_steps):
        centre = traj[i].reshape(1, -1)
        if method == "local" or box is None:
            in_set = lp_ball(centre, rho[-1], p=2)
        else:
            in_set = box
        key = (i, type(in_set).__name__)
        if key not in compiled:
            compiled[key] = compile_bounds(_flat_step(chain, i), in_set, method=engine_method)
        out = compiled[key](in_set).output
        nxt = traj[i + 1].reshape(1, -1)
        rho.append(_box_radius(out.lower, out.upper, nxt))
        widths.append(float(jnp.max(out.upper - out.lower)) / 2)
        box = Box(out.lower, out.upper)
        if progress is not None:
            progress()
    return rho, widths


# --------------------------------------------------------------------------- empirical lower bounds


def jacobian_norm(f: Callable, x: jax.Array, key: jax.Array, iters: int = 20) -> float:
    """Power-iteration estimate of ||J_f(x)||_2 (a lower bound of the local Lipschitz constant)."""
    v = jax.random.normal(key, x.shape, jnp.float32)
    # Not jitted as a whole: ``f`` calls a jitted denoiser, whose jvp/vjp compile once for all steps.
    def body(v):
        v = v / jnp.linalg.norm(v)
        out, jv = jax.jvp(f, (x,), (v,))
        _, vjp = jax.vjp(f, x)
        return vjp(jv)[0], jnp.linalg.norm(jv)

    n = 0.0
    for _ in range(iters):
        v, nv = body(v)
        n = float(nv)
    return n


def attack_objective(f: Callable) -> Callable:
    """``(delta, x, f(x)) -> (||f(x + delta) - f(x)||, gradient in delta)``, the function the attack climbs."""
    return jax.value_and_grad(lambda d, x, fx: jnp.linalg.norm(f(x + d) - fx))


def attack_ratio(objective: Callable, x: jax.Array, fx: jax.Array, radius: float, key: jax.Array, steps: int = 10,
                 restarts: int = 2) -> float:
    """max over tried ||delta|| = radius of ||f(x + delta) - f(x)|| / radius (normalised gradient ascent
    projected on the sphere; ``objective`` from :func:`attack_objective`)."""
    best = 0.0
    for k in range(restarts):
        d = jax.random.normal(jax.random.fold_in(key, k), x.shape, jnp.float32)
        d = radius * d / jnp.linalg.norm(d)
        for _ in range(steps + 1):
            val, g = objective(d, x, fx)
            best = max(best, float(val))
            gn = float(jnp.linalg.norm(g))
            if not math.isfinite(gn) or gn == 0.0:
                break
            d = d + radius * g / gn
            d = radius * d / jnp.linalg.norm(d)
    return best / radius


# --------------------------------------------------------------------------- the report


@dataclasses.dataclass(frozen=True)
class LipschitzReport:
    """Certified per-step / cumulative bounds of one method, next to the empirical ones.

    ``per_step[i]``: certified bound of step i; ``cumulative``: certified bound of the
    whole chain (``inf`` beyond float64, ``log10_cumulative`` is always finite) (global: Lipschitz constant; local/reach: expansion about x̄_T over the
    ball of ``radius``); ``empirical_per_step[i]``: ||J_{f_i}(x̄_i)||;
    ``empirical_lower``: lower bound of ``cumulative`` (see the module docstring);
    ``cond_cumulative``: global bound w.r.t. the conditioning (None if not computed);
    ``step_radii``: rho_0..rho_T for local/reach; ``certified_radius``: largest r
    (found) with a certified ||F(x_T) - F(x̄_T)|| <= distance; ``empirical_radius``:
    the largest r (found) at which the attack stays within distance, i.e. about where it
    first breaks the distance (an upper estimate of the true robust radius).
    """

    method: str
    sampler: str
    steps: int
    radius: float
    per_step: list
    cumulative: float
    log10_cumulative: float
    empirical_per_step: list
    empirical_chain_jacobian: float
    empirical_attack: float
    empirical_lower: float
    cond_cumulative: float | None
    step_radii: list | None
    distance: float | None
    certified_radius: float | None
    empirical_radius: float | None
    seconds: float


def _global(chain: Chain, eps_lipschitz: Callable[[int], tuple[float, float]]):
    per_x, per_c = [], []
    for i in range(chain.num_steps):
        c = step_coefficients(chain.schedule, i)
        lx, lc = step_lipschitz(c, *eps_lipschitz(c.t))
        per_x.append(lx)
        per_c.append(lc)
    # Products of T per-step bounds overflow float64 for real UNets: they are kept as log10.
    logs = [math.log10(v) for v in per_x]
    if any(c is None for c in per_c):
        return per_x, sum(logs), None
    terms = [math.log10(c) + sum(logs[i + 1:]) for i, c in enumerate(per_c) if c > 0]
    top = max(terms, default=None)
    cum_c = None if top is None else top + math.log10(sum(10 ** (v - top) for v in terms))
    return per_x, sum(logs), cum_c


def _bisect_radius(holds: Callable[[float], bool], start: float, iters: int) -> float | None:
    """Largest r found (geometric bisection) with ``holds(r)``; None if even ``start / 1e6`` fails."""
    lo, hi = 0.0, start
    while holds(hi):
        lo, hi = hi, hi * 10
        if hi > 1e6 * start:
            return lo
    if lo == 0.0:
        probe = hi
        for _ in range(6):
            probe /= 10
            if holds(probe):
                lo, hi = probe, probe * 10
                break
        else:
            return None
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if holds(mid) else (lo, mid)
    return lo


def lipschitz_report(chain: Chain, method: str, radius: float,
                     eps_lipschitz: Callable[[int], tuple[float, float]] | None = None,
                     engine_method: str = "crown-forward", distance: float | None = None,
                     key: jax.Array | None = None, bisect_iters: int = 6,
                     progress: Callable | None = None) -> LipschitzReport:
    """Bounds of ``method`` for ``chain`` over the l2 ball of ``radius`` around its x_T.

    ``eps_lipschitz(t) -> (L_x, L_cond)`` is needed for ``global``. With
    ``distance`` the certified radius (for global exactly distance / cumulative;
    for local/reach by bisection on the propagated radius) and the attack's
    radius are computed too.
    """
    if method not in METHODS:
        raise DiverifyError(f"unknown Lipschitz method {method!r}: choose one of {', '.join(METHODS)}")
    if not (math.isfinite(radius) and radius > 0):
        raise DiverifyError(f"radius must be a positive finite number, got {radius}")
    if distance is not None and not (math.isfinite(distance) and distance > 0):
        raise DiverifyError(f"distance must be a positive finite number, got {distance}")
    key = jax.random.PRNGKey(0) if key is None else key
    start = time.perf_counter()
    traj = clean_trajectory(chain)
    cond_cum, radii, cert_radius = None, None, None
    if method == "global":
        if eps_lipschitz is None:
            raise DiverifyError("the global method needs a global Lipschitz bound of the denoiser")
        per_step, log_cumulative, log_cond = _global(chain, eps_lipschitz)
        cond_cum = None if log_cond is None else (10.0 ** log_cond if log_cond < 308 else math.inf)
        if distance is not None:
            cert_radius = distance * 10.0 ** -log_cumulative if log_cumulative < 308 else 0.0
    else:
        compiled: dict = {}
        radii, _ = engine_chain(chain, radius, method, engine_method, traj, compiled, progress)
        per_step = [radii[i + 1] / radii[i] if radii[i] > 0 else 0.0 for i in range(chain.num_steps)]
        cumulative = radii[-1] / radius
        log_cumulative = math.log10(cumulative) if cumulative > 0 else -math.inf
        if distance is not None:
            def holds(r):
                try:
                    return engine_chain(chain, r, method, engine_method, traj, compiled)[0][-1] <= distance
                except DiverifyError:
                    return False
            cert_radius = _bisect_radius(holds, radius, bisect_iters)
    f = chain_function(chain)
    keys = jax.random.split(key, chain.num_steps + 2)
    emp_steps = [jacobian_norm(step_function(chain, i, jitted=True), traj[i], keys[i])
                 for i in range(chain.num_steps)]
    emp_chain = jacobian_norm(f, chain.x_T, keys[-2])
    objective = attack_objective(f)
    emp_attack = attack_ratio(objective, chain.x_T, traj[-1], radius, keys[-1])
    emp_lower = max(emp_chain, emp_attack) if method == "global" else emp_attack
    emp_radius = None
    if distance is not None:
        def breaks(r):
            return attack_ratio(objective, chain.x_T, traj[-1], r, keys[-1], steps=5, restarts=1) * r > distance
        emp_radius = _bisect_radius(lambda r: not breaks(r), radius, bisect_iters)
    cumulative = 10.0 ** log_cumulative if log_cumulative < 308 else math.inf
    return LipschitzReport(method, chain.schedule.kind, chain.num_steps, float(radius), per_step, float(cumulative),
                           float(log_cumulative),
                           emp_steps, emp_chain, emp_attack, emp_lower, cond_cum, radii, distance, cert_radius,
                           emp_radius, time.perf_counter() - start)
