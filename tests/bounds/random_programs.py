"""Random compositions of the operations the engine bounds, checked against float64 evaluation.

The per-operation tests (``test_ops_soundness.py``) fix one operation, one radius and one method.
Here a seed draws a whole problem: a program of 2-5 blocks (activations, LayerNorm with eps down to
1e-12, GroupNorm + SiLU, attention with and without a mask, residual GELU MLPs, products of two
perturbed values, division, sqrt/log, softmax along either axis, clipping, clamps by constants
far from the values, maxima over an axis and of two values, a convolution), an
l_inf / l_2 / l_1 ball of radius 1e-5..0.3 on every row or on one row, an engine method, a precision,
a symbol budget small enough to force order reductions, and in some problems a random ``spec``
matrix ``C`` (the bounds are then of ``C f(x)``). The program is evaluated in float64 at
interior points, corners and sign-gradient attack points of the set.

What must hold: with ``precision="float64"`` or ``"mixed"`` the engine claims bounds of the function
in exact arithmetic, so no float64 output may leave them by more than float64 rounding
(:data:`EXACT_RTOL` of the output scale). With ``"float32"`` the relaxations are padded for float32
rounding but the linear maps are computed in float32, so an output may leave the bounds by a few
float32 units: issue 3 allows :data:`FLOAT32_RTOL` (1e-5 of the output scale). A refusal
(:class:`~diverify.errors.DiverifyError`) is allowed, a non-finite bound never is.

``python -m tests.bounds.random_programs 0:400`` runs many seeds and prints the largest excess per
method and precision (``benchmarks/RESULTS.md`` quotes a run).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diverify.bounds.api import METHODS, PRECISIONS, compile_bounds
from diverify.errors import DiverifyError
from diverify.specs import LpBall, lp_ball

#: Allowed excess of a float64 output over exact-arithmetic bounds (float64 and mixed precision).
EXACT_RTOL = 1e-9
#: Allowed excess over float32 bounds (issue 3: a float32 tolerance of at most 1e-5 of the output scale).
FLOAT32_RTOL = 1e-5

_ACTIVATIONS = {
    "relu": jax.nn.relu, "tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid, "silu": jax.nn.silu,
    "gelu_erf": lambda z: jax.nn.gelu(z, approximate=False), "gelu_tanh": lambda z: jax.nn.gelu(z, approximate=True),
    "exp": lambda z: jnp.exp(0.5 * z), "softplus": jax.nn.softplus, "mish": jax.nn.mish, "square": jnp.square,
    "abs": jnp.abs,
}
BLOCKS = ("activation", "layernorm", "groupnorm", "attention", "residual", "product", "division", "sqrt_log",
          "softmax", "clip", "clamp", "max", "conv")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One drawn problem: ``fn`` over ``input_set``, bounded with ``method`` in ``precision``."""

    seed: int
    fn: Callable
    blocks: tuple
    input_set: LpBall
    method: str
    precision: str
    symbols: int | None
    refine: str
    spec: np.ndarray | None = None

    def describe(self) -> str:
        s = self.input_set
        return (f"seed {self.seed}: {' -> '.join(self.blocks)} on {tuple(s.center.shape)}, l_{float(s.p):g} "
                f"eps {float(s.eps):.3g}{'' if s.support is None else f' on row {s.support[0]}'}, {self.method}, "
                f"{self.precision}, symbols {self.symbols}, refine {self.refine}"
                f"{'' if self.spec is None else f', spec {self.spec.shape}'}")


def _block(rng: np.random.Generator, kind: str, rows: int, d: int) -> tuple[str, Callable]:
    def weight(a, b, scale=1.0):
        return jnp.asarray(rng.normal(size=(a, b)) * scale / np.sqrt(a), jnp.float32)

    def vector(a, scale=0.5):
        return jnp.asarray(rng.normal(size=(a,)) * scale, jnp.float32)

    if kind == "activation":
        name = str(rng.choice(sorted(_ACTIVATIONS)))
        w, b, f = weight(d, d), vector(d), _ACTIVATIONS[name]
        return f"{name}", lambda x: f(x @ w + b)
    if kind == "layernorm":
        eps, g, b = float(10 ** rng.uniform(-12, -2)), vector(d, 1.0) + 1.0, vector(d)

        def layernorm(x):
            xc = x - jnp.mean(x, -1, keepdims=True)
            return xc * jax.lax.rsqrt(jnp.mean(xc * xc, -1, keepdims=True) + eps) * g + b
        return f"layernorm({eps:.0e})", layernorm
    if kind == "groupnorm":
        groups, eps, g, b = 2 if d % 2 == 0 else 1, float(10 ** rng.uniform(-6, -3)), vector(d, 1.0) + 1.0, vector(d)

        def groupnorm(x):
            y = x.reshape(rows, groups, d // groups)
            y = (y - jnp.mean(y, (0, 2), keepdims=True)) / jnp.sqrt(jnp.var(y, (0, 2), keepdims=True) + eps)
            return jax.nn.silu(y.reshape(rows, d) * g + b)
        return "groupnorm", groupnorm
    if kind == "attention":
        wq, wk, wv = weight(d, d), weight(d, d), weight(d, d)
        mask = np.where(rng.random((rows, rows)) < 0.3, -1e4, 0.0) if rng.random() < 0.4 else np.zeros((rows, rows))
        mask[:, 0] = 0.0
        mask = jnp.asarray(mask, jnp.float32)
        return "attention", lambda x: jax.nn.softmax((x @ wq) @ (x @ wk).T / np.sqrt(d) + mask, axis=-1) @ (x @ wv)
    if kind == "residual":
        w1, w2 = weight(d, 2 * d), weight(2 * d, d)
        return "residual", lambda x: x + jax.nn.gelu(x @ w1, approximate=False) @ w2
    if kind == "product":
        w1, w2 = weight(d, d), weight(d, d)
        return "product", lambda x: (x @ w1) * jnp.tanh(x @ w2)
    if kind == "division":
        w1, w2 = weight(d, d), weight(d, d)
        return "division", lambda x: (x @ w1) / (1.0 + jnp.exp(x @ w2))
    if kind == "sqrt_log":
        w = weight(d, d)
        return "sqrt_log", lambda x: jnp.sqrt(1.0 + jnp.square(x @ w)) + jnp.log(2.0 + jnp.tanh(x))
    if kind == "softmax":
        w, axis = weight(d, d, 3.0), int(rng.integers(0, 2))
        return f"softmax(axis {axis})", lambda x: jax.nn.softmax(x @ w, axis=axis)
    if kind == "clip":
        w = weight(d, d)
        return "clip", lambda x: jnp.clip(x @ w, -0.5, 0.5) + jnp.maximum(x, 0.1)
    if kind == "clamp":  # constants far from the values: no cancellation may reach the bound
        w = weight(d, d)
        return "clamp", lambda x: jnp.maximum(x @ w, -1e9) + jnp.clip(x, -1e8, 1e8) + jax.nn.relu6(x)
    if kind == "max":
        w, axis = weight(d, d), int(rng.integers(0, 2))
        return f"max(axis {axis})", lambda x: x + jnp.max(x @ w, axis=axis, keepdims=True) - jnp.maximum(x, x[::-1])
    if kind == "conv":
        k = rng.normal(size=(3, 1, 1, 1)) / 2

        def conv(x):  # a 3-tap convolution along the rows, one channel per column
            y = jax.lax.conv_general_dilated(x.T[:, :, None, None], jnp.asarray(k, x.dtype), (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return y[:, :, 0, 0].T + x
        return "conv", conv
    raise ValueError(kind)


def draw(seed: int, method: str | None = None, precision: str | None = None) -> Problem:
    """The problem of ``seed`` (the same on every machine: NumPy's generator, float32 weights);
    ``method`` / ``precision`` replace the drawn ones."""
    rng = np.random.default_rng(seed)
    rows, d = int(rng.integers(2, 5)), int(rng.choice([2, 4, 6]))
    named = [_block(rng, str(rng.choice(BLOCKS)), rows, d) for _ in range(int(rng.integers(2, 6)))]
    head = jnp.asarray(rng.normal(size=(d, 3)) / np.sqrt(d), jnp.float32)
    layers = [f for _, f in named]

    def fn(x):
        for f in layers:
            x = f(x)
        return x @ head

    centre = jnp.asarray(rng.normal(size=(rows, d)), jnp.float32)
    eps, p = float(10 ** rng.uniform(-5, -0.5)), float(rng.choice([np.inf, 2.0, 1.0]))
    support = [int(rng.integers(0, rows))] if rng.random() < 0.5 else None
    drawn_method, drawn_precision = str(rng.choice(METHODS)), str(rng.choice(PRECISIONS))
    symbols = int(rng.choice([4, 16, 64])) if rng.random() < 0.5 else None
    refine = str(rng.choice(["none", "normalisers", "attention", "costliest", "all"]))
    spec = rng.normal(size=(2, rows * 3)).astype(np.float32) if rng.random() < 0.3 else None
    return Problem(seed, fn, tuple(n for n, _ in named), lp_ball(centre, eps, p=p, support=support),
                   method or drawn_method, precision or drawn_precision, symbols, refine, spec)


def _project(s: LpBall, centre, mask, x):
    """A point of the ball near ``x`` (float64; l_2 / l_1 scaled radially, a hair inside the sphere)."""
    d = (x - centre) * mask
    if s.p == np.inf:
        return centre + np.clip(d, -float(s.eps), float(s.eps))
    norm = np.sqrt(np.sum(d * d, -1, keepdims=True)) if s.p == 2.0 else np.sum(np.abs(d), -1, keepdims=True)
    return centre + d * np.minimum(1.0, float(s.eps) * (1 - 1e-12) / np.maximum(norm, 1e-300))


def float64_points(problem: Problem, n: int = 200, attacks: int = 8, steps: int = 25) -> np.ndarray:
    """Interior points, corners of the ball's box (projected) and sign-gradient ascent points on
    random output directions (the function in float64), all inside the input set."""
    s, rng = problem.input_set, np.random.default_rng(problem.seed + 1)
    centre, mask = np.asarray(s.center, np.float64), np.asarray(s.active_mask, np.float64)
    lo, hi = (np.asarray(a, np.float64) for a in s.interval())
    points = [centre]
    for _ in range(n):
        points.append(_project(s, centre, mask, lo + rng.random(lo.shape) * (hi - lo)))
        points.append(_project(s, centre, mask, np.where(rng.random(lo.shape) < 0.5, lo, hi)))
    with jax.enable_x64(True):
        out_shape = jax.eval_shape(problem.fn, jnp.asarray(centre)).shape
        grad = jax.jit(jax.grad(lambda x, w: jnp.sum(w * problem.fn(x))))
        for k in range(attacks):
            w = rng.normal(size=out_shape) if k >= attacks // 2 else np.zeros(out_shape)
            if k < attacks // 2:
                w.flat[rng.integers(0, w.size)] = (-1.0) ** k
            x, step = centre.copy(), float(np.max(hi - lo)) / 8
            for _ in range(steps):
                x = _project(s, centre, mask, x + step * np.sign(np.asarray(grad(jnp.asarray(x), jnp.asarray(w)))))
                step *= 0.9
            points.append(x)
    return np.stack(points)


def check(problem: Problem) -> dict:
    """Bound ``problem`` and compare with its float64 outputs. Returns ``excess`` (the largest amount by
    which an output leaves the bounds, over the output scale max(1, |y|): negative when all lie inside),
    ``allowed`` (the precision's tolerance) and ``width``; or ``refused`` with the engine's message."""
    s = problem.input_set
    try:
        bounded = compile_bounds(problem.fn, s, method=problem.method, precision=problem.precision,
                                 symbols=problem.symbols, refine=problem.refine, spec=problem.spec)(s).output
    except DiverifyError as err:
        return {"refused": str(err)}
    lower, upper = np.asarray(bounded.lower, np.float64), np.asarray(bounded.upper, np.float64)
    if not (np.all(np.isfinite(lower)) and np.all(np.isfinite(upper))):
        raise AssertionError(f"non-finite bound without an error: {problem.describe()}")
    with jax.enable_x64(True):
        ys = np.asarray(jax.jit(jax.vmap(problem.fn))(jnp.asarray(float64_points(problem))))
    if problem.spec is not None:  # the bounds are of C f(x)
        ys = ys.reshape(len(ys), -1) @ problem.spec.astype(np.float64).T
    scale = max(1.0, float(np.max(np.abs(ys))))
    excess = max(float(np.max(lower - ys)), float(np.max(ys - upper))) / scale
    allowed = FLOAT32_RTOL if problem.precision == "float32" else EXACT_RTOL
    return {"excess": excess, "allowed": allowed, "width": float(np.mean(upper - lower))}


def main(argv: list[str]) -> None:
    start, stop = (int(v) for v in (argv[0] if argv else "0:100").split(":"))
    worst: dict = {}
    failures = refused = 0
    for seed in range(start, stop):
        problem = draw(seed)
        result = check(problem)
        print(f"[{seed - start + 1}/{stop - start}] {problem.describe()}: "
              f"{'refused' if 'refused' in result else format(result['excess'], '.2g')}", file=sys.stderr, flush=True)
        if "refused" in result:
            refused += 1
            continue
        key = (problem.method, problem.precision)
        worst[key] = max(worst.get(key, -np.inf), result["excess"])
        if result["excess"] > result["allowed"]:
            failures += 1
            print(f"OUTSIDE by {result['excess']:.3g} (allowed {result['allowed']:g}): {problem.describe()}", flush=True)
    print(f"\n{stop - start} seeds, {refused} refused, {failures} outside their tolerance")
    print("largest excess over the output scale (negative: every point strictly inside)")
    print(f"| method | {' | '.join(PRECISIONS)} |\n|---|{'---|' * len(PRECISIONS)}")
    for m in METHODS:
        cells = [f"{worst[(m, p)]:.2g}" if (m, p) in worst else "" for p in PRECISIONS]
        print(f"| {m} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
