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
  engine bounds f_i over the l2 ball B(x̄_i, rho_i), and rho_{i+1} bounds
  ||f_i(x) - x̄_{i+1}|| over it: with ``zonotope``/``forward`` (:data:`L2_METHODS`)
  from the output's affine form, ||M||_2 rho_i plus the l2 norm of its error box
  (:func:`l2_step_radius`: the spectral norm of the linear part, ~||J||_2 rho_i
  for a small ball), with either that or the box's farthest corner when smaller; with
  other methods from the corner alone (~||J||_F rho_i at best, up to sqrt(d) times
  more per step). The centres x̄_i are computed in the engine's arithmetic: with
  ``float64``/``mixed`` the trajectory is the step map evaluated in float64, so the engine's
  centre f_i(x̄_i) and the next ball's centre differ by float64 rounding instead of by the
  float32 sampler's own rounding (on the digits UNet ~1e-6 in l2, 6-13% of a 1e-5 ball's
  radius added at every step). By induction every
  x_T in B(x̄_T, r) has x_i in B(x̄_i, rho_i); per step rho_{i+1} / rho_i,
  cumulative rho_T / r bounds ||F(x_T) - F(x̄_T)|| / r (an expansion about
  the clean point, the quantity a certified radius needs).
* ``reach``: the engine's output set of step i is the input set of step i+1
  (no re-rounding to a ball). With ``zonotope``/``forward`` it is the output's
  affine form in the coordinates of the x_T ball, an
  :class:`~diverify.specs.AffineBall` ``c_i + M_i u + [-h_i, h_i]`` (||u||_2 <= 1):
  the linear parts compose, so M_T ~ J_T ... J_1 r keeps the chain's own Jacobian
  (||J_chain||_2 r) where local multiplies the steps' norms (prod ||J_i||_2 r:
  on the digits UNet at T = 50, 10.95 against 2.27), and only the engine's
  error boxes h_i go through later steps as boxes. With other engine methods
  it is the output box. rho_{i+1} is the l2 distance bound from x̄_{i+1} to that
  set; cumulative = rho_T / r.

Every certified number sits next to an empirical lower bound: the spectral
norm of each step's Jacobian at x̄_i and of the chain's Jacobian at x̄_T
(power iteration on the map linearised once per point), and a projected-gradient attack on
||F(x̄_T + delta) - F(x̄_T)|| over ||delta|| <= r (the chain run in float64: at r = 1e-5 the float32
chain's own rounding would add ~10% on the digits UNet). The attack ratio is a lower
bound of all three certified cumulative numbers; the chain's Jacobian norm
is a lower bound of the global one.

Certified radii: with a distance d, the largest r (bisection) whose certified bound keeps
||F(x_T) - F(x̄_T)|| <= d for every x_T in B(x̄_T, r); with a :class:`LinearDecision` (a classifier
affine before its argmax), d is x̄_0's exact l2 distance to its decision boundary, so the radius
certifies the label of the final sample, and the attack tries to change that label; w.r.t. the
conditioning (global only), d / L_c.

One compilation for all steps: everything that changes between steps (the
scheduler's coefficients, the model's timestep features, sigma_i z_i) is one
float vector k_i, an argument of a single step map f(x, k). XLA compiles it
once, and the bound engine bounds it once per kind of input set, with k in the
one-point box {k_i}: a constant of the bound problem (the engine folds only
values it can see at trace time into constants, so k enters as a degenerate
input set; its relaxations are exact on a point up to float32 padding).

Soundness: global bounds rest on (i) exact upper bounds of linear operator
norms (the Schur bound ||A||_2 <= sqrt(||A||_1 ||A||_inf) for convolutions,
an SVD padded by a relative 1e-4 for dense layers) and (ii) the stated
nonlinearity slopes; power iteration is only reported, never used, because it
under-estimates. Local and reach bounds are as sound as the bound engine.
All are exact-arithmetic bounds for the float32 model's weights evaluated in
real arithmetic. ``precision`` picks the engine's arithmetic for local/reach:
``"float64"`` traces the step in float64 with padding at float64's ulp and
rounds the output boxes outward to float32; ``"float32"`` (default) bounds in
float32 with float32 padding, a radius-independent floor (~1e-6 per
GroupNorm input) that a UNet's up path multiplies until a GroupNorm variance
interval reaches 0 (see benchmarks/RESULTS.md). float64 is not the default
because it costs about 2x where float32 suffices (the mixture); on the digits
UNet its step bound compiles in ~1.5 min on the 2-core CPU and then takes ~10 s
a step, and local-zonotope bounds T = 10 steps within 2.2x of the attack.
``"mixed"`` is float64 with the zonotope's error coefficients in float32, their rounding bounded
(:mod:`diverify.bounds.zonotope`): on the UNet a step took ~6 s instead of ~9 s, for 0.04% of the
3-step product (2.7 s since stop 32).
Each propagated radius rho_i is rounded up to float32 before it becomes the next ball.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diverify import xla_options
from diverify.bounds.api import PRECISIONS
from diverify.diffusion.schedulers import SamplingSchedule, StepCoefficients, step_coefficients
from diverify.errors import DiverifyError

METHODS = ("global", "local", "reach")
#: Arithmetic of the bound engine for local/reach bounds (see the module docstring).
PRECISION = "float32"

#: max_x |d/dx x sigmoid(x)| (attained at x ~ 2.3994).
SILU_SLOPE = 1.0998
#: Relative padding of a float32 SVD's largest singular value.
_SVD_PADDING = 1e-4


# --------------------------------------------------------------------------- the chain


@dataclasses.dataclass(frozen=True)
class TimeInput:
    """How a denoiser sees its timestep, as a float array the bound engine can take as an input.

    ``features(params, x, t, cond)`` (t an int32 scalar) is what the model computes from t
    (abar_t for the mixture; for a UNet or DiT see :func:`embedding_time_input`);
    ``apply(params, x, features, cond)`` is the eps-prediction from those features, so that
    ``apply(params, x, features(params, x, t, cond), cond) == apply_fn(params, x, t, cond)``.
    The bound engine then sees t only through an input set holding one point: one traced
    and compiled bound serves every step.
    """

    features: Callable
    apply: Callable


def mixture_time_input() -> TimeInput:
    """:func:`diverify.diffusion.gmm.gmm_eps` with abar_t as the feature."""
    from diverify.diffusion import gmm

    def features(mix, x, t, cond):
        return jnp.take(mix.alphas_cumprod, jnp.full((x.shape[0],), t, jnp.int32))

    def apply(mix, x, abar, cond):
        return -jnp.sqrt(1 - abar)[:, None] * gmm.score(mix, x, abar, cond)

    return TimeInput(features, apply)


#: Modules of :mod:`diverify.models` whose output depends only on t and the (fixed) conditioning and is
#: added to the activations: with their outputs as the features the engine sees k only through additions.
_TIME_PROJECTIONS = ("time_emb_proj",)


def _param_names(tree) -> set:
    names = set()
    if isinstance(tree, dict):
        for key, sub in tree.items():
            names.add(key)
            names |= _param_names(sub)
    return names


def embedding_time_input(apply_fn: Callable, params: Any) -> TimeInput:
    """A Flax denoiser (:mod:`diverify.models`) whose timestep reaches the sample only through
    its ``time_emb_proj`` modules (UNet ResNet blocks: their outputs are the features) or else
    through the sinusoid fed to its ``TimestepEmbedding`` modules (DiT: the sinusoid is the feature).
    A method interceptor records them, and ``apply`` substitutes them (t itself is then 0).

    Projections are preferred: between the sinusoid and the activations lie a SiLU and dense layers,
    whose relaxations on a one-point box add float32 padding that deep GroupNorm stacks amplify.
    """
    import flax.linen as nn

    project = bool(_param_names(params) & set(_TIME_PROJECTIONS))

    def wanted(context) -> bool:
        if context.method_name != "__call__":
            return False
        if project:
            return context.module.name in _TIME_PROJECTIONS
        return type(context.module).__name__ == "TimestepEmbedding"

    def features(params, x, t, cond):
        seen = []

        def record(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if wanted(context):
                seen.append(out if project else args[0])
            return out

        with nn.intercept_methods(record):
            apply_fn(params, x, jnp.full((x.shape[0],), t, jnp.int32), cond)
        if not seen:
            raise DiverifyError("this denoiser has no TimestepEmbedding module: its timestep cannot be passed "
                                "to the bound engine as an input")
        return jnp.concatenate([v.ravel() for v in seen])

    def apply(params, x, feats, cond):
        offset = [0]

        def take(shape):
            n = int(np.prod(shape))
            value = feats[offset[0]:offset[0] + n].reshape(shape)
            offset[0] += n
            return value

        def substitute(next_fun, args, kwargs, context):
            if not wanted(context):
                return next_fun(*args, **kwargs)
            if project:
                # The projection of the dummy t = 0 only gives the shape (a constant, dropped).
                return take(next_fun(*args, **kwargs).shape)
            return next_fun(take(args[0].shape), *args[1:], **kwargs)

        with nn.intercept_methods(substitute):
            return apply_fn(params, x, jnp.zeros((x.shape[0],), jnp.int32), cond)

    return TimeInput(features, apply)


#: Per-step coefficients at the head of a step's input vector: sqrt(1 - abar_t), sqrt(abar_t),
#: then pred_x0_coeff, sample_coeff, eps_coeff of :class:`StepCoefficients`.
_NUM_COEFFS = 5


@dataclasses.dataclass(frozen=True)
class Chain:
    """A reverse chain ready to bound.

    Step i is ``step(x, inputs[i])``: ``inputs[i]`` packs everything that changes from step to
    step (the scheduler coefficients, the model's timestep features, the fixed noise term
    sigma_i z_i when the sampler is stochastic) into one float32 vector, so that the step map is
    one function for all steps (compiled once by XLA and by the bound engine). ``x_T`` has a
    batch axis of 1 (``(1, d)`` for the mixture, ``(1, C, H, W)`` for an image model).
    """

    apply_fn: Callable
    params: Any
    cond: Any
    schedule: SamplingSchedule
    x_T: jax.Array
    inputs: jax.Array
    step: Callable
    jit_step: Callable
    time_input: TimeInput

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps


def _step_map(time_input: TimeInput, params: Any, cond: Any, clip: float | None, x_shape: tuple,
              feature_shape: tuple, stochastic: bool) -> Callable:
    """``(x, k) -> x_prev`` of :class:`StepCoefficients` with the coefficients, features and noise term in k."""
    n_feat = int(np.prod(feature_shape))

    def step(x, k):
        c = k[:_NUM_COEFFS]
        eps = time_input.apply(params, x, k[_NUM_COEFFS:_NUM_COEFFS + n_feat].reshape(feature_shape), cond)
        x0 = (x - c[0] * eps) / c[1]
        if clip is not None:
            x0 = jnp.clip(x0, -clip, clip)
        out = c[2] * x0 + c[3] * x + c[4] * eps
        if stochastic:
            out = out + k[_NUM_COEFFS + n_feat:].reshape(x_shape)
        return out

    return step


def make_chain(apply_fn: Callable, params: Any, cond: Any, schedule: SamplingSchedule, x_T: Any,
               key: jax.Array | None = None, time_input: TimeInput | None = None) -> Chain:
    """A :class:`Chain`; ``key`` draws the fixed noise of stochastic steps (required then).

    ``time_input`` defaults to :func:`mixture_time_input` for the mixture's ``gmm_eps`` and to
    :func:`embedding_time_input` otherwise.
    """
    from diverify.diffusion import gmm

    x_T = jnp.asarray(x_T, jnp.float32)
    if x_T.ndim < 2 or x_T.shape[0] != 1:
        raise DiverifyError(f"x_T must have a batch axis of size 1, got shape {tuple(x_T.shape)}")
    if time_input is None:
        time_input = mixture_time_input() if apply_fn is gmm.gmm_eps else embedding_time_input(apply_fn, params)
    inputs, feature_shape, stochastic = _step_inputs(time_input, params, cond, schedule, x_T, key)
    noise = schedule.noise
    step = _step_map(time_input, params, cond, noise.clip_sample_range if noise.clip_sample else None,
                     tuple(x_T.shape), feature_shape, stochastic)
    return Chain(apply_fn, params, cond, schedule, x_T, inputs, step, jax.jit(step), time_input)


def rechain(chain: Chain, schedule: SamplingSchedule, key: jax.Array | None = None) -> Chain:
    """The same denoiser, conditioning and x_T under another sampling schedule of the same noise
    schedule, sharing the chain's step map (and so its compiled functions and step bounds) when the
    new schedule is as stochastic as the old one."""
    if (schedule.noise.clip_sample, schedule.noise.clip_sample_range) != \
            (chain.schedule.noise.clip_sample, chain.schedule.noise.clip_sample_range):
        raise DiverifyError("rechain needs a schedule with the same clipping as the chain's")
    inputs, _, stochastic = _step_inputs(chain.time_input, chain.params, chain.cond, schedule, chain.x_T, key)
    if inputs.shape[1] != chain.inputs.shape[1]:
        return make_chain(chain.apply_fn, chain.params, chain.cond, schedule, chain.x_T, key, chain.time_input)
    return dataclasses.replace(chain, schedule=schedule, inputs=inputs)


def _step_inputs(time_input: TimeInput, params: Any, cond: Any, schedule: SamplingSchedule, x_T: jax.Array,
                 key: jax.Array | None) -> tuple[jax.Array, tuple, bool]:
    """The (T, n) step inputs k_i, the shape of the timestep features, whether a step is stochastic."""
    coeffs = [step_coefficients(schedule, i) for i in range(schedule.num_steps)]
    stochastic = any(c.noise_std for c in coeffs)
    if stochastic and key is None:
        raise DiverifyError(f"the {schedule.kind} sampler is stochastic here: pass a key to fix its noise")
    features = jax.jit(time_input.features)
    rows = []
    for i, c in enumerate(coeffs):
        feats = features(params, x_T, jnp.int32(c.t), cond)
        parts = [np.array([math.sqrt(1 - c.alpha_prod_t), math.sqrt(c.alpha_prod_t), c.pred_x0_coeff,
                           c.sample_coeff, c.eps_coeff], np.float32), np.asarray(feats, np.float32).ravel()]
        if stochastic:
            z = jax.random.normal(jax.random.fold_in(key, i), x_T.shape, jnp.float32) if c.noise_std else 0 * x_T
            parts.append(np.asarray(c.noise_std * z, np.float32).ravel())
        rows.append(np.concatenate(parts))
    return jnp.asarray(np.stack(rows)), tuple(feats.shape), stochastic


def step_function(chain: Chain, i: int) -> Callable[[jax.Array], jax.Array]:
    """f_i as a function of x (batch 1), through the chain's one jitted step map."""
    k = chain.inputs[i]
    return lambda x: chain.jit_step(x, k)


def _run_chain(step: Callable, x: jax.Array, inputs: jax.Array) -> jax.Array:
    return jax.lax.scan(lambda h, k: (step(h, k), None), x, inputs)[0]


def chain_function(chain: Chain) -> Callable[[jax.Array], jax.Array]:
    """F = f_{T-1} o ... o f_0 (a ``lax.scan`` over the step inputs: compiled once for any T)."""
    run = jax.jit(_run_chain, static_argnums=0)
    return lambda x: run(chain.step, x, chain.inputs)


def clean_trajectory(chain: Chain, float64: bool = False) -> list:
    """x̄_T, ..., x̄_0 from the chain's x_T: the float32 sampler's states (JAX arrays), or with
    ``float64`` the same step map evaluated in float64 (NumPy float64 arrays, so that they keep
    their precision outside ``jax.enable_x64``): the centres of the local balls when the engine
    computes in float64 (:func:`engine_chain`)."""
    if not float64:
        states = [chain.x_T]
        for i in range(chain.num_steps):
            states.append(chain.jit_step(states[-1], chain.inputs[i]))
        return states
    with jax.enable_x64(True):
        step = jax.jit(chain.step)
        states = [np.asarray(chain.x_T, np.float64)]
        for i in range(chain.num_steps):
            x = step(jnp.asarray(states[-1], jnp.float64), jnp.asarray(chain.inputs[i], jnp.float64))
            states.append(np.asarray(x, np.float64))
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


def _up_to_float32(x):
    """``x`` (float64, scalar or array) rounded up to float32 values: the smallest float32 >= x."""
    x = np.asarray(x, np.float64)
    x32 = x.astype(np.float32)
    return np.where(x32 < x, np.nextafter(x32, np.float32(np.inf)), x32)


def _box_radius(lo, hi, centre) -> float:
    """l2 distance from ``centre`` to the farthest point of the box [lo, hi], computed in float64 and
    rounded up to a float32 value (the ball built from it stores its radius in float32)."""
    lo, hi, centre = (np.asarray(v, np.float64) for v in (lo, hi, centre))
    # 1e-12 covers the float64 rounding of the norm (relative <= d * 1.1e-16) for d up to ~9000.
    return float(_up_to_float32(float(np.linalg.norm(np.maximum(hi - centre, centre - lo))) * (1 + 1e-12)))


def _available_bytes() -> int:
    """Memory of the default device (its allocator limit on an accelerator, physical memory on CPU)."""
    import os

    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


#: Engine methods whose output is an affine form of the input symbols (:func:`l2_step_radius` can use it).
L2_METHODS = ("zonotope", "forward")


@dataclasses.dataclass(frozen=True)
class StepBound:
    """The bound engine on the chain's step map ``(x_flat, k) -> x_prev_flat``, compiled once for all
    steps: x ranges over an input set, k over the point {inputs[i]} (a constant of the problem).
    ``l2_executable`` (``zonotope``/``forward`` on an l2 ball): the output's affine form in l2 terms,
    see :func:`l2_step_radius`."""

    step: Callable
    bound_function: Any
    executable: Any
    compile_seconds: float
    memory_bytes: int
    precision: str = PRECISION
    l2_executable: Any = None
    eager: bool = False

    def raw(self, in_set, k_box):
        """The unchecked :class:`~diverify.bounds.api.BoundResult` (intermediates, node_ok) for ``k_box``."""
        with self.bound_function.context():
            return self.executable(in_set, k_box)

    def __call__(self, in_set, k):
        from diverify.bounds.interval import IntervalBound
        from diverify.specs import Box

        if self.executable is None:  # compiled for l2 only: its parts carry the same output box
            *_, lo, hi = self.l2_parts(in_set, k)
            return IntervalBound(lo, hi)
        k = k[None]
        return self.bound_function._checked(self.raw(in_set, Box(k, k))).output

    def l2_parts(self, ball, k):
        """(centre, halfwidth, [M_b], lo, hi) of the step's output over ``ball`` (see
        :func:`_l2_parts_function`), checked like every bound: a relaxation outside its domain raises."""
        from diverify.bounds.api import BoundResult
        from diverify.bounds.interval import IntervalBound
        from diverify.specs import Box

        k = k[None]
        bf = self.bound_function
        with bf.context():
            *parts, ok = self.l2_executable(ball, Box(k, k))
        bf._checked(BoundResult(IntervalBound(parts[3], parts[4]), {}, ok, bf.method, bf.method))
        return parts


def _l2_parts_function(bf: Any) -> Callable:
    """``(ball, k_box) -> (centre, halfwidth, [M_b], lo, hi, node_ok)`` of the step's output
    (:func:`diverify.bounds.zonotope.l2_parts`; lo/hi the engine's box of the same output)."""
    from diverify.bounds import backward, zonotope
    from diverify.bounds.api import error_dtype

    def parts(in_set, k_box):
        sets = bf.engine_sets(in_set, k_box)
        env, flags, forms, blocks = backward.forward_forms(bf.graph, sets, bf.method, output_forms=True,
                                                           symbols=bf.symbols, error_dtype=error_dtype(bf.precision),
                                                           refine=bf.refine)
        centre, half, mats = zonotope.l2_parts(forms[0], blocks)
        lo, hi = env[bf.graph.outputs[0]]
        return centre, half, mats, lo, hi, jnp.stack([jnp.asarray(f) for f in flags])

    return parts


def l2_step_radius(sb: StepBound, in_set: Any, k: jax.Array, reference: Any) -> tuple[float, tuple]:
    """Upper bound of ||f(x, k) - reference||_2 over ``in_set`` (an l2 ball or an
    :class:`~diverify.specs.AffineBall`), from the output's affine form: sum_b ||M_b||_2 +
    || |centre - reference| + halfwidth ||_2 (:func:`diverify.bounds.zonotope.l2_parts`), with the
    spectral norms from a float64 SVD padded by a relative 1e-10 (a backward-stable SVD errs by ~n^2
    ulp) and the sum rounded up to float32. Also returns the parts (centre, halfwidth, [M_b], lo, hi),
    lo/hi the engine's output box. Where the step is nearly linear this is ||J||_2 r plus second-order
    terms; the box's farthest corner (:func:`_box_radius`) is ||J||_F r at best."""
    parts = sb.l2_parts(in_set, k)
    centre, half, mats = parts[:3]
    ref = np.asarray(reference, np.float64).reshape(-1)
    spread = np.abs(np.asarray(centre, np.float64) - ref) + np.asarray(half, np.float64)
    total = sum(float(np.linalg.norm(np.asarray(m, np.float64), 2)) * (1 + 1e-10) for m in mats)
    r = (total + float(np.linalg.norm(spread))) * (1 + 1e-12)
    if not math.isfinite(r):
        raise DiverifyError(f"the {sb.bound_function.method} bound of a step is not finite: the radius is too large "
                            "for this method")
    return float(_up_to_float32(r)), parts


def _image_set(parts: tuple, like: np.ndarray) -> Any:
    """The step's output set ``centre + M u + [-half, half]`` (||u||_2 <= 1) as the next step's input:
    an :class:`~diverify.specs.AffineBall` of ``like``'s shape and dtype. Stored in float32, the
    rounding of its centre and generators moves into ``half`` (rounded up), so it still holds the set."""
    from diverify.specs import affine_ball

    centre, half = (np.asarray(p, np.float64).reshape(like.shape) for p in parts[:2])
    (m,) = parts[2]  # one input set: the sample
    gens = np.asarray(m, np.float64).T.reshape((-1,) + like.shape)
    if like.dtype == np.float32:
        c32, g32 = centre.astype(np.float32), gens.astype(np.float32)
        half = _up_to_float32((half + np.abs(centre - c32) + np.sum(np.abs(gens - g32), axis=0)) * (1 + 1e-12))
        centre, gens = c32, g32
    return affine_ball(centre, gens, half)


def compile_step_bound(chain: Chain, in_set: Any, engine_method: str,
                       memory_limit: int | None = None, precision: str = PRECISION, l2: bool = False,
                       eager: bool = False, symbols: int | None = None, refine: str = "normalisers") -> StepBound:
    """Trace and compile the bound of the step map for sets like ``in_set``, in ``precision``
    (``"float32"``, ``"float64"`` or ``"mixed"``, see the module docstring); with ``l2`` (an l2 ball or an
    :class:`~diverify.specs.AffineBall`, and an engine method of :data:`L2_METHODS`) also the output's
    affine form for :func:`l2_step_radius`.

    XLA's own memory analysis of the compiled bound is checked against ``memory_limit``
    (default: the device's memory) before anything runs: a problem too large for the machine is a
    :class:`DiverifyError` that states the estimate, never an out-of-memory crash.
    ``eager``: trace only, and run the bound op by op (JAX compiles and caches each operation
    on first use) instead of compiling it as one XLA program; no memory estimate then. On the
    digits UNet in float64 that skips the ~1.5 min compilation but each step takes ~4x as long
    (~40 s instead of ~10 s on 2 CPU cores). ``symbols``: the error symbols the zonotope methods
    keep at each order reduction (``compile_bounds(..., symbols=)``; None: the engine's default);
    ``refine``: which of their intervals CROWN tightens (``compile_bounds(..., refine=)``).
    """
    from diverify.bounds.api import compile_bounds
    from diverify.specs import Box

    shape = chain.x_T.shape
    step = chain.step

    def flat(x, k):
        return step(x.reshape(shape), k[0]).reshape(1, -1)

    k = chain.inputs[:1]
    start = time.perf_counter()
    bf = compile_bounds(flat, in_set, Box(k, k), method=engine_method, precision=precision, symbols=symbols,
                        refine=refine)
    # With l2 the parts include the output box: one function serves both.
    run = _l2_parts_function(bf) if l2 else bf.unchecked
    need = 0
    if not eager:
        with bf.context():
            run = xla_options.compile(bf.jit(run).lower(in_set, Box(k, k)))
        mem = run.memory_analysis()
        need = 0 if mem is None else int(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes)
    exe, l2_exe = (None, run) if l2 else (run, None)
    seconds = time.perf_counter() - start
    limit = _available_bytes() if memory_limit is None else memory_limit
    if need > limit:
        raise DiverifyError(
            f"the {engine_method} bound of one step needs {need / 2 ** 30:.1f} GiB (XLA's estimate for "
            f"{int(np.prod(shape))} perturbed inputs through {len(bf.graph.nodes)} operations), more than the "
            f"{limit / 2 ** 30:.1f} GiB available: the problem is too large for this method here (try "
            "--engine-method ibp, a smaller model or a machine with more memory)")
    return StepBound(step, bf, exe, seconds, need, precision, l2_exe, eager)


def _ball(centre: np.ndarray, radius: float) -> Any:
    """The l2 ball B(centre, radius); a float64 centre stays float64 (NumPy, outside ``enable_x64``)."""
    from diverify.specs import lp_ball

    ball = lp_ball(centre, radius, p=2)
    return dataclasses.replace(ball, center=centre) if centre.dtype == np.float64 else ball


def engine_chain(chain: Chain, radius: float, method: str, engine_method: str = "zonotope",
                 trajectory: list | None = None, compiled: dict | None = None,
                 progress: Callable | None = None, precision: str = PRECISION,
                 eager: bool = False, symbols: int | None = None,
                 refine: str = "normalisers") -> tuple[list[float], list[float]]:
    """Radii rho_0 = radius, rho_1, ..., rho_T of the ``local`` (balls) or ``reach`` propagation,
    the engine computing in ``precision`` (op by op with ``eager``; ``symbols`` kept at each order
    reduction, ``refine``: see :func:`compile_step_bound`). ``reach`` carries the engine's output set of step i as
    the input of step i+1: with an engine method of :data:`L2_METHODS` its affine form in the x_T
    ball's coordinates (an :class:`~diverify.specs.AffineBall`: the composed linear parts keep the
    chain's own Jacobian, ~||J_chain||_2 r, where local multiplies the steps' norms), else its box.

    Returns (rho, box_widths): ``box_widths[i]`` is the largest half-width of step i's output box.
    ``compiled`` caches the :class:`StepBound` per kind of input set (one for all steps and radii, and
    for every chain that shares this chain's step map, see :func:`rechain`; recompiled for another precision).
    """
    from diverify.specs import Box, affine_ball

    from diverify.bounds.api import canonical_method

    traj = clean_trajectory(chain, precision != "float32") if trajectory is None else trajectory
    # Each ball's centre is the reference its radius was measured from, in one dtype for every step.
    centres = [np.asarray(t, np.float32 if precision == "float32" else np.float64).reshape(1, -1) for t in traj]
    compiled = {} if compiled is None else compiled
    l2 = canonical_method(engine_method) in L2_METHODS
    rho, widths = [float(radius)], []
    nxt_set = None
    if method == "reach" and l2:
        eye = np.eye(centres[0].size).reshape((centres[0].size,) + centres[0].shape)
        nxt_set = affine_ball(centres[0], eye * radius)
    for i in range(chain.num_steps):
        in_set = _ball(centres[i], rho[-1]) if method == "local" or nxt_set is None else nxt_set
        kind = type(in_set).__name__
        sb = compiled.get(kind)
        if sb is None or sb.step is not chain.step or sb.precision != precision or sb.eager != eager or \
                sb.bound_function.symbols != symbols or sb.bound_function.refine != refine or \
                (l2 and sb.l2_executable is None):
            sb = compiled[kind] = compile_step_bound(chain, in_set, engine_method, precision=precision, l2=l2,
                                                     eager=eager, symbols=symbols, refine=refine)
        nxt = centres[i + 1]
        try:
            if l2:
                r2, parts = l2_step_radius(sb, in_set, chain.inputs[i], nxt)
                lo, hi = parts[3], parts[4]
                rho.append(min(r2, _box_radius(lo, hi, nxt)))
                nxt_set = _image_set(parts, nxt) if method == "reach" else None
            else:
                out = sb(in_set, chain.inputs[i])
                lo, hi = out.lower, out.upper
                rho.append(_box_radius(lo, hi, nxt))
                nxt_set = Box(lo, hi)
        except DiverifyError as err:
            # Which step, and how far the set had grown: the message names the node, not the step.
            raise type(err)(f"step {i + 1} of {chain.num_steps}, whose input set lies within l2 distance "
                            f"{rho[-1]:.3g} of the clean trajectory: {err}") from err
        widths.append(float(np.max(np.asarray(hi, np.float64) - np.asarray(lo, np.float64))) / 2)
        if progress is not None:
            progress()
    return rho, widths


# --------------------------------------------------------------------------- empirical lower bounds


def power_iteration(matvec: Callable, rmatvec: Callable, v0: jax.Array, iters: int) -> jax.Array:
    """||A v|| for the last unit v of ``iters`` power iterations on A^T A (``matvec``: v -> A v,
    ``rmatvec``: w -> A^T w). Every unit v gives ||A v|| <= ||A||_2: a lower bound of the operator
    norm, which tightens as v converges to the top right singular vector."""
    def body(_, carry):
        v, _ = carry
        v = v / jnp.linalg.norm(v)
        w = matvec(v)
        return rmatvec(w), jnp.linalg.norm(w)

    return jax.lax.fori_loop(0, iters, body, (v0, jnp.zeros((), v0.dtype)))[1]


def power_iteration_norm(linear: Callable, x_shape: tuple, key: jax.Array, iters: int = 30) -> float:
    """Lower bound of ||A||_2 for a linear map ``linear`` (:func:`power_iteration`)."""
    zeros = jnp.zeros(x_shape, jnp.float32)
    transpose = jax.linear_transpose(linear, zeros)
    v0 = jax.random.normal(key, x_shape, jnp.float32)
    return float(jax.jit(lambda v: power_iteration(linear, lambda w: transpose(w)[0], v, iters))(v0))


@functools.partial(jax.jit, static_argnames=("f", "iters"))
def _jacobian_power(f: Callable, x: jax.Array, args: tuple, v0: jax.Array, iters: int) -> jax.Array:
    _, jvp = jax.linearize(lambda y: f(y, *args), x)
    vjp = jax.linear_transpose(jvp, x)
    return power_iteration(jvp, lambda w: vjp(w)[0], v0, iters)


def jacobian_norm(f: Callable, x: jax.Array, key: jax.Array, iters: int = 20, args: tuple = ()) -> float:
    """Lower bound of ||J(x)||_2 for y -> f(y, *args) (:func:`power_iteration` on the map linearised
    once at x with ``jax.linearize`` and transposed with ``jax.linear_transpose``). Compiled once per
    ``f`` and shapes: pass what changes between calls (a step's inputs) in ``args``."""
    v0 = jax.random.normal(key, x.shape, jnp.float32)
    return float(_jacobian_power(f, x, tuple(args), v0, iters))


def attack_objective(f: Callable) -> Callable:
    """``(delta, x, f(x)) -> (||f(x + delta) - f(x)||, gradient in delta)``, the function the attack climbs."""
    return jax.jit(jax.value_and_grad(lambda d, x, fx: jnp.linalg.norm(f(x + d) - fx)))


def sphere_ascent(value_and_grad: Callable, x: jax.Array, radius: float, key: jax.Array, steps: int = 10,
                  restarts: int = 2) -> float:
    """max over tried ||delta|| = radius of an objective (normalised gradient ascent projected on the
    sphere; ``value_and_grad(delta) -> (value, gradient)``, ``x`` gives the shape)."""
    best = -math.inf
    for k in range(restarts):
        d = jax.random.normal(jax.random.fold_in(key, k), x.shape, x.dtype)
        d = radius * d / jnp.linalg.norm(d)
        for _ in range(steps + 1):
            val, g = value_and_grad(d)
            best = max(best, float(val))
            gn = float(jnp.linalg.norm(g))
            if not math.isfinite(gn) or gn == 0.0:
                break
            d = d + radius * g / gn
            d = radius * d / jnp.linalg.norm(d)
    return best


def attack_ratio(objective: Callable, x: jax.Array, fx: jax.Array, radius: float, key: jax.Array, steps: int = 10,
                 restarts: int = 2) -> float:
    """max over tried ||delta|| = radius of ||f(x + delta) - f(x)|| / radius (:func:`sphere_ascent`;
    ``objective`` from :func:`attack_objective`)."""
    return sphere_ascent(lambda d: objective(d, x, fx), x, radius, key, steps, restarts) / radius


# --------------------------------------------------------------------------- decisions of the final sample


@dataclasses.dataclass(frozen=True)
class LinearDecision:
    """A classifier of the final sample that is affine before its argmax:
    ``label(x) = argmax_j (W x + b)_j`` over the flattened sample (the digits classifier of
    :mod:`diverify.diffusion.digits`; the mixture's Bayes rule, :func:`mixture_decision`)."""

    weight: np.ndarray  # (classes, d)
    bias: np.ndarray  # (classes,)

    def logits(self, x: jax.Array) -> jax.Array:
        weight = jnp.asarray(self.weight, jnp.float32)
        return (jnp.matmul(jnp.reshape(x, (-1,)), weight.T, precision=jax.lax.Precision.HIGHEST)
                + jnp.asarray(self.bias, jnp.float32))

    def boundary_distance(self, x: Any) -> tuple[int, float]:
        """(y, D) for the sample ``x``: y its label and D = min_{j != y} (z_y - z_j) / ||w_y - w_j||, the
        exact l2 distance from x to the set where another class scores at least as high (each margin
        z_y - z_j is affine with gradient w_y - w_j). Every x' with ||x' - x|| < D therefore keeps y.
        Computed in float64 and shrunk by a relative 1e-9 for its rounding."""
        w = np.asarray(self.weight, np.float64)
        b = np.asarray(self.bias, np.float64)
        flat = np.asarray(x, np.float64).reshape(-1)
        if w.ndim != 2 or w.shape[1] != flat.size or b.shape != (w.shape[0],):
            raise DiverifyError(f"the classifier takes {w.shape[1] if w.ndim == 2 else '?'} values per sample with "
                                f"bias {b.shape}, the samples have {flat.size}")
        z = w @ flat + b
        y = int(np.argmax(z))
        gaps = [(z[y] - z[j]) / np.linalg.norm(w[y] - w[j]) for j in range(len(z))
                if j != y and np.any(w[y] != w[j])]
        distance = max(0.0, min(gaps, default=math.inf) * (1 - 1e-9))
        return y, float(distance)


def mixture_decision(mixture: Any) -> LinearDecision:
    """The Bayes classifier of a Gaussian mixture with one shared std s, which is affine:
    argmax_j log w_j - ||x - mu_j||^2 / (2 s^2) = argmax_j mu_j . x / s^2 + log w_j - ||mu_j||^2 / (2 s^2)."""
    stds = np.asarray(mixture.stds, np.float64)
    if not np.allclose(stds, stds[0]):
        raise DiverifyError("the mixture's decision is affine only when its components share one std")
    means = np.asarray(mixture.means, np.float64)
    s2 = stds[0] ** 2
    return LinearDecision(means / s2, np.log(np.asarray(mixture.weights, np.float64)) - (means ** 2).sum(1) / (2 * s2))


def decision_objective(f: Callable, decision: LinearDecision, label: int) -> Callable:
    """``(delta, x) -> (max_{j != label} z_j - z_label at f(x + delta), gradient in delta)``: positive iff
    the decision changed."""
    others = jnp.asarray([j for j in range(decision.weight.shape[0]) if j != label])

    def gap(d, x):
        z = decision.logits(f(x + d))
        return jnp.max(z[others]) - z[label]

    return jax.jit(jax.value_and_grad(gap))


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
    first breaks the distance (an upper estimate of the true robust radius);
    ``compile_seconds``: tracing + compilation of the engine's step bounds (local/reach; part of
    ``seconds``); ``precision``: the engine's arithmetic (local/reach; None for global).
    With a decision (:class:`LinearDecision`): ``decision_label`` is the clean x̄_0's label,
    ``distance`` the distance from x̄_0 to its decision boundary (so ``certified_radius`` keeps
    the label), and ``empirical_radius`` the largest r (found) at which an attack on the label
    fails: the attack changes the label at a radius within one bisection step above it.
    ``cond_certified_radius`` (global): distance / ``cond_cumulative``, the l2 perturbation of the
    conditioning that provably keeps x_0 within ``distance`` (x_T fixed); ``log10_cond_cumulative``
    is always finite where ``cond_cumulative`` is set.
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
    compile_seconds: float | None = None
    precision: str | None = None
    decision_label: int | None = None
    cond_certified_radius: float | None = None
    log10_cond_cumulative: float | None = None

    @property
    def log10_certified_radius(self) -> float | None:
        """log10 of ``certified_radius``, finite also where it underflows float64 (global:
        log10(distance) - ``log10_cumulative``); None when no radius is certified."""
        return _log10_radius(self.certified_radius, self.distance, self.log10_cumulative, self.method)

    @property
    def log10_cond_certified_radius(self) -> float | None:
        """log10 of ``cond_certified_radius`` (global), finite where it underflows float64."""
        return _log10_radius(self.cond_certified_radius, self.distance, self.log10_cond_cumulative, self.method)


def _log10_radius(radius, distance, log10_bound, method: str) -> float | None:
    """log10 of a certified radius: for ``global`` exactly ``log10(distance) - log10_bound`` (the radius
    is distance / bound, which underflows float64 beyond 10^308), else ``log10(radius)``; None when
    there is no radius (no distance asked, or none certified)."""
    if radius is None or not distance:
        return None
    if method == "global" and log10_bound is not None and math.isfinite(log10_bound):
        return math.log10(distance) - log10_bound
    return math.log10(radius) if radius > 0 else None


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
                     engine_method: str = "zonotope", distance: float | None = None,
                     key: jax.Array | None = None, bisect_iters: int = 6,
                     progress: Callable | None = None, compiled: dict | None = None,
                     precision: str = PRECISION, decision: LinearDecision | None = None,
                     eager: bool = False, symbols: int | None = None,
                     refine: str = "normalisers") -> LipschitzReport:
    """Bounds of ``method`` for ``chain`` over the l2 ball of ``radius`` around its x_T (local/reach: the
    engine computing in ``precision``).

    ``eps_lipschitz(t) -> (L_x, L_cond)`` is needed for ``global``. With
    ``distance`` the certified radius (for global exactly distance / cumulative;
    for local/reach by bisection on the propagated radius) and the attack's
    radius are computed too. ``decision`` (instead of ``distance``): the distance is the clean x̄_0's
    distance to the decision boundary, and the attack tries to change the decision.
    ``compiled``: a cache of step bounds (see :func:`engine_chain`); ``eager``: the engine op by op,
    ``symbols``: its order-reduction budget, ``refine``: its CROWN refinements (:func:`compile_step_bound`).
    """
    if method not in METHODS:
        raise DiverifyError(f"unknown Lipschitz method {method!r}: choose one of {', '.join(METHODS)}")
    if precision not in PRECISIONS:
        raise DiverifyError(f"unknown precision {precision!r}: choose float32, float64 or mixed")
    from diverify.bounds.api import check_refine

    check_refine(refine)
    if not (math.isfinite(radius) and radius > 0):
        raise DiverifyError(f"radius must be a positive finite number, got {radius}")
    if distance is not None and not (math.isfinite(distance) and distance > 0):
        raise DiverifyError(f"distance must be a positive finite number, got {distance}")
    if decision is not None and distance is not None:
        raise DiverifyError("pass either a distance or a decision, not both")
    key = jax.random.PRNGKey(0) if key is None else key
    start = time.perf_counter()
    traj = clean_trajectory(chain)
    # The certificates are about balls around the trajectory the engine's arithmetic computes.
    centres = traj if method == "global" or precision == "float32" else clean_trajectory(chain, float64=True)
    label = None
    if decision is not None:
        label, distance = decision.boundary_distance(centres[-1])
    cond_cum, radii, cert_radius, compile_seconds, cond_radius, log_cond = None, None, None, None, None, None
    if method == "global":
        if eps_lipschitz is None:
            raise DiverifyError("the global method needs a global Lipschitz bound of the denoiser")
        per_step, log_cumulative, log_cond = _global(chain, eps_lipschitz)
        cond_cum = None if log_cond is None else (10.0 ** log_cond if log_cond < 308 else math.inf)
        if distance is not None:
            cert_radius = distance * 10.0 ** -log_cumulative if log_cumulative < 308 else 0.0
            if log_cond is not None:
                cond_radius = distance * 10.0 ** -log_cond if log_cond < 308 else 0.0
    elif distance == 0.0:
        raise DiverifyError("the clean final sample lies on the decision boundary: no radius keeps its label")
    else:
        compiled = {} if compiled is None else compiled
        cached = {id(b) for b in compiled.values()}
        radii, _ = engine_chain(chain, radius, method, engine_method, centres, compiled, progress, precision, eager,
                                symbols, refine)
        per_step = [radii[i + 1] / radii[i] if radii[i] > 0 else 0.0 for i in range(chain.num_steps)]
        cumulative = radii[-1] / radius
        log_cumulative = math.log10(cumulative) if cumulative > 0 else -math.inf
        if distance is not None:
            def holds(r):
                try:
                    return engine_chain(chain, r, method, engine_method, centres, compiled,
                                        precision=precision, eager=eager, symbols=symbols,
                                        refine=refine)[0][-1] <= distance
                except DiverifyError:
                    return False
            cert_radius = _bisect_radius(holds, radius, bisect_iters)
        compile_seconds = sum(b.compile_seconds for b in compiled.values() if id(b) not in cached)
    f = chain_function(chain)
    keys = jax.random.split(key, chain.num_steps + 2)
    emp_steps = [jacobian_norm(chain.step, traj[i], keys[i], args=(chain.inputs[i],))
                 for i in range(chain.num_steps)]
    emp_chain = jacobian_norm(lambda x, inputs: _run_chain(chain.step, x, inputs), chain.x_T, keys[-2],
                              args=(chain.inputs,))
    objective = attack_objective(f)
    # The attack runs the chain in float64: at r = 1e-5 the float32 chain's own rounding moves x_0 by
    # ~r / 10 on the digits UNet, which would pass for sensitivity.
    with jax.enable_x64(True):
        f64 = chain_function(chain)
        x64 = jnp.asarray(np.asarray(chain.x_T, np.float64))
        emp_attack = attack_ratio(attack_objective(f64), x64, f64(x64), radius, keys[-1])
    emp_lower = max(emp_chain, emp_attack) if method == "global" else emp_attack
    emp_radius = None
    if decision is not None:
        flip = decision_objective(f, decision, label)

        def breaks(r):
            return sphere_ascent(lambda d: flip(d, chain.x_T), chain.x_T, r, keys[-1], steps=5, restarts=1) > 0
        emp_radius = _bisect_radius(lambda r: not breaks(r), radius, bisect_iters)
    elif distance is not None:
        def breaks(r):
            return attack_ratio(objective, chain.x_T, traj[-1], r, keys[-1], steps=5, restarts=1) * r > distance
        emp_radius = _bisect_radius(lambda r: not breaks(r), radius, bisect_iters)
    cumulative = 10.0 ** log_cumulative if log_cumulative < 308 else math.inf
    return LipschitzReport(method, chain.schedule.kind, chain.num_steps, float(radius), per_step, float(cumulative),
                           float(log_cumulative),
                           emp_steps, emp_chain, emp_attack, emp_lower, cond_cum, radii, distance, cert_radius,
                           emp_radius, time.perf_counter() - start, compile_seconds,
                           None if method == "global" else precision, label, cond_radius, log_cond)
