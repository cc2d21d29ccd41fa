"""The public face of the bound engine: ``ibp``, ``crown``, ``bound``, ``compile_bounds``.

A call traces ``fn`` once into a :class:`~diverify.bounds.graph.Graph`,
checks that every operation is supported (the error names the primitive and
the user's line), and runs a jit-compiled pure function of the input sets.
Arguments of ``fn`` that are input sets (:class:`~diverify.specs.Box`,
:class:`~diverify.specs.LpBall`, :class:`~diverify.specs.Substitution`, or an
:class:`~diverify.bounds.interval.IntervalBound`) are perturbed; plain arrays
are constants.

Methods (auto_LiRPA's names are accepted, any case):

=============  =====================================  ======================
method         final bound                            intermediate bounds
=============  =====================================  ======================
``ibp``        interval propagation                   IBP
``forward``    forward linear (symbolic intervals)    forward linear
``crown-ibp``  backward linear (CROWN)                IBP
``crown-forward`` backward linear (CROWN)             forward linear
``zonotope``   zonotope (fresh error symbols)         zonotope
``crown-zonotope`` backward linear (CROWN)            zonotope
``crown``      backward linear (CROWN)                CROWN, node by node
``alpha-crown``CROWN with optimised relaxation slopes CROWN
=============  =====================================  ======================

The zonotope's normaliser intervals (variances, softmax denominators) are tightened by CROWN
passes (``refine=``): in ``crown-zonotope`` from the first node on, in ``zonotope`` once an
order reduction has boxed error symbols (the fast method: tiny-bert compiles in 6.7 s instead
of 12.6 s; MiniLM's first layer at 1e-3 is 69x the true range that way instead of 21x).

Precision. ``precision="float32"`` (the default) computes the bounds in the
function's own float32 and pads every relaxation for float32 rounding. Its linear
maps are not padded: their rounding is that of the values they add, so an output
can leave a float32 bound by a few float32 units of the largest value summed into
it (random compositions of every operation, every method:
at most 2e-7 of the output scale, ``tests/bounds/random_programs.py``; issue 3's
tests allow 1e-5), and a function that adds and then cancels a constant far larger
than its output (``(x + 1e9) - 1e9``) gets a float32 bound of the wrong value.
Clamps by large constants (``max(x, -1e9)``) are rewritten without that
cancellation (:mod:`diverify.bounds.synthetic`) and diverify's max pooling has no
fill to cancel (:func:`diverify.models.encoder.pool_tokens`); a maximum over
values among which a user put huge fills still cancels them: bound such a
function in float64 or mixed.
``precision="float64"`` traces and bounds the function in float64 (inputs and
captured weights are promoted; the padding shrinks to float64's ulp) and
rounds the results outward to float32. It bounds the function in exact
arithmetic: the float32 evaluation of the same function can differ from it by
its own rounding (relative ~1e-7 per operation), which the soundness tests'
tolerance covers. At small radii it is far tighter (MiniLM, 1 layer, 1e-5:
1.05x the true range vs 2.2x), because float32 padding, not the
nonlinearity, dominates there. A function that casts a perturbed value down
to float32 cannot be bounded in float64 and is an error.

Every linear bound is intersected with the IBP interval of the same value
(both are sound). A bound that comes out NaN or infinite, or a relaxation
used outside its domain (``rsqrt`` of an interval reaching 0, ...), is a
:class:`~diverify.errors.DiverifyError`, never a certificate.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diverify import xla_options
from diverify.bounds import backward, ops
from diverify.bounds.graph import Const, Graph, trace
from diverify.bounds.interval import IntervalBound, intersect
from diverify.errors import DiverifyError
from diverify.specs import Box, check_set

_METHOD_ALIASES = {
    "ibp": "ibp",
    "interval": "ibp",
    "crown-ibp": "crown-ibp",
    "crownibp": "crown-ibp",
    "crown": "crown",
    "backward": "crown",
    "alpha-crown": "alpha-crown",
    "alphacrown": "alpha-crown",
    "α-crown": "alpha-crown",
    "crown-optimized": "alpha-crown",
    "forward": "forward",
    "forward-crown": "forward",
    "crown-forward": "crown-forward",
    "zonotope": "zonotope",
    "deepz": "zonotope",
    "deept": "zonotope",
    "crown-zonotope": "crown-zonotope",
}
METHODS = ("ibp", "forward", "zonotope", "crown-ibp", "crown-forward", "crown-zonotope", "crown", "alpha-crown")
#: Which method supplies the intermediate bounds of each method.
INTERMEDIATE = {
    "ibp": "ibp",
    "forward": "forward",
    "crown-ibp": "ibp",
    "crown-forward": "forward",
    "zonotope": "zonotope",
    "crown-zonotope": "zonotope",
    "crown": "crown",
    "alpha-crown": "crown",
}


PRECISIONS = ("float32", "float64", "mixed")


def _dtype(precision: str):
    if precision not in PRECISIONS:
        raise DiverifyError(f"unknown precision '{precision}': choose float32, float64 or mixed")
    return jnp.float32 if precision == "float32" else jnp.float64


def error_dtype(precision: str):
    """The float type of the zonotope's error coefficients: float32 for ``"mixed"``,
    None (the values' own) otherwise."""
    return jnp.float32 if precision == "mixed" else None


def _promote(tree, dtype):
    """Every floating leaf of ``tree`` as ``dtype`` (other leaves unchanged)."""
    return jax.tree_util.tree_map(lambda a: a.astype(dtype) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a, tree)


def _outward_float32(lo, hi):
    """``[lo, hi]`` rounded outward to float32 (no-op for float32 input)."""
    if lo.dtype == jnp.float32:
        return lo, hi
    lo32, hi32 = lo.astype(jnp.float32), hi.astype(jnp.float32)
    lo32 = jnp.where(lo32.astype(lo.dtype) > lo, jnp.nextafter(lo32, jnp.float32(-jnp.inf)), lo32)
    hi32 = jnp.where(hi32.astype(hi.dtype) < hi, jnp.nextafter(hi32, jnp.float32(jnp.inf)), hi32)
    return lo32, hi32


def _check_no_narrowing(graph: Graph, precision: str) -> None:
    """A cast of a perturbed value to a narrower float type rounds it by more
    than the bound accounts for: an error, naming the cast."""
    for node in graph.nodes:
        if node.name == "convert_element_type":
            src, dst = node.in_avals[0].dtype, node.out_avals[0].dtype
            if jnp.issubdtype(src, jnp.floating) and jnp.issubdtype(dst, jnp.floating) and jnp.finfo(dst).bits < jnp.finfo(src).bits:
                where = f" at {node.source}" if node.source else ""
                hint = "remove the cast or use precision='float32'" if precision != "float32" else "remove the cast"
                raise DiverifyError(
                    f"cannot bound this function in {precision}: it casts a perturbed value from {src} to {dst}{where}, "
                    f"a rounding the bound does not cover; {hint}"
                )


def canonical_method(method: str) -> str:
    key = method.strip().lower().replace("_", "-")
    if key not in _METHOD_ALIASES:
        raise DiverifyError(f"unknown bound method '{method}': choose one of {', '.join(METHODS)}")
    return _METHOD_ALIASES[key]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BoundResult:
    """Bounds on a function's outputs over an input set.

    ``output`` mirrors the function's output pytree with an
    :class:`IntervalBound` per array (or, with a ``spec`` matrix ``C``, one
    :class:`IntervalBound` of shape ``(m,)`` bounding ``C @ f(x)``);
    ``intermediates`` maps ``"<node index>:<op name>"`` to the interval of
    that node's output; ``node_ok[k]`` is False when node ``k``'s relaxation
    was used outside its domain (the checked entry points raise instead).
    """

    output: Any
    intermediates: dict
    node_ok: jax.Array
    method: str = dataclasses.field(metadata=dict(static=True))
    intermediate_method: str = dataclasses.field(metadata=dict(static=True))

    @property
    def domain_ok(self) -> jax.Array:
        return jnp.all(self.node_ok)


def _as_input_set(arg):
    if isinstance(arg, IntervalBound):
        return Box(arg.lower, arg.upper)
    if hasattr(arg, "minimize_linear") and hasattr(arg, "interval"):
        return arg
    return None


def _check_sets(sets, what: str = "input set") -> None:
    """:func:`~diverify.specs.check_set` on every set (None, a constant argument, is skipped)."""
    for i, s in enumerate(sets):
        check_set(_as_input_set(s) or s, f"{what} {i}")


def _spec_rows(spec, out_shape, dtype):
    c = jnp.asarray(spec, dtype)
    size = int(np.prod(out_shape)) if out_shape else 1
    if c.ndim == 1:
        c = c[None]
    if c.ndim == 2 and c.shape[1] == size:
        return c.reshape((c.shape[0],) + tuple(out_shape))
    if tuple(c.shape[1:]) == tuple(out_shape):
        return c
    raise DiverifyError(f"spec of shape {tuple(np.shape(spec))} does not match the output of shape {tuple(out_shape)}")


def _final_rows(graph: Graph, out, a0, env, sets, alphas=None):
    return backward.backward_lower(graph, out, a0, env, sets, alphas=alphas)


def _alpha_shapes(graph: Graph):
    shapes = {}
    for idx, node in enumerate(graph.nodes):
        k = ops.kind(node)
        if k == "unary":
            shapes[idx] = tuple(node.in_avals[0].shape)
        elif k == "product":
            shapes[idx] = tuple(node.out_avals[0].shape)
        elif k == "dot":
            ex, _, _ = backward._dot_expanders(node)
            shapes[idx] = tuple(jax.eval_shape(ex, jax.ShapeDtypeStruct(node.in_avals[0].shape, node.in_avals[0].dtype)).shape)
    return shapes


def _optimise_alphas(graph, out, a0, env, sets, steps: int, lr: float):
    """alpha-CROWN (Xu et al. 2021): maximise the sum of the lower bounds over
    the relaxations' free parameters with Adam, projected onto [0, 1]. Every
    alpha gives a sound bound, so the best value seen is returned."""
    shapes = _alpha_shapes(graph)
    params = {i: (jnp.full(s, 0.5), jnp.full(s, 0.5)) for i, s in shapes.items()}
    opt = optax.adam(lr)

    def objective(p):
        low = _final_rows(graph, out, a0, env, sets, alphas=p)
        return -jnp.sum(low), low

    def step(carry, _):
        p, state, best = carry
        (_, low), grads = jax.value_and_grad(objective, has_aux=True)(p)
        updates, state = opt.update(grads, state, p)
        p = jax.tree_util.tree_map(lambda a: jnp.clip(a, 0.0, 1.0), optax.apply_updates(p, updates))
        return (p, state, jnp.maximum(best, low)), None

    best0 = _final_rows(graph, out, a0, env, sets)
    (p, _, best), _ = jax.lax.scan(step, (params, opt.init(params), best0), None, length=steps)
    return jnp.maximum(best, objective(p)[1])


def _run(graph: Graph, method: str, spec, alpha_steps: int, alpha_lr: float, sets, symbols: int | None = None,
         errors=None, refine: str = "normalisers"):
    env, flags = backward.intermediate_bounds(graph, sets, INTERMEDIATE[method], symbols, errors, refine,
                                              refine_early=method == "crown-zonotope")
    outputs = []
    for o in graph.outputs:
        if isinstance(o, Const):
            v = jnp.asarray(o.value)
            outputs.append(IntervalBound(v, v) if spec is None else None)
            continue
        lo, hi = env[o]
        shape = tuple(graph.avals[o].shape)
        if method in ("ibp", "forward", "zonotope") and spec is None:
            outputs.append(IntervalBound(lo, hi))
            continue
        if spec is None:
            n = int(np.prod(shape)) if shape else 1
            eye = jnp.eye(n, dtype=graph.avals[o].dtype).reshape((n,) + shape)
            rows = jnp.concatenate([eye, -eye])
        else:
            c = _spec_rows(spec, shape, graph.avals[o].dtype)
            rows = jnp.concatenate([c, -c])
            n = c.shape[0]
            # IBP of C @ f for the intersection: centre/radius through C.
            cen, rad = (lo + hi) / 2, (hi - lo) / 2
            axes = tuple(range(1, c.ndim))
            ic = jnp.sum(c * cen[None], axis=axes)
            ir = jnp.sum(jnp.abs(c) * rad[None], axis=axes)
            lo, hi, shape = ic - ir, ic + ir, (n,)
        if method in ("ibp", "forward", "zonotope"):
            outputs.append(IntervalBound(lo, hi))
            continue
        if method == "alpha-crown":
            low = _optimise_alphas(graph, o, rows, env, sets, alpha_steps, alpha_lr)
        else:
            low = _final_rows(graph, o, rows, env, sets)
        outputs.append(IntervalBound(*intersect((low[:n].reshape(shape), -low[n:].reshape(shape)), (lo, hi))))
    intermediates = {}
    for idx, node in enumerate(graph.nodes):
        for vid in node.outputs:
            intermediates[f"{idx}:{node.name}"] = IntervalBound(*env[vid])
    node_ok = jnp.stack([jnp.asarray(f) for f in flags]) if flags else jnp.ones((0,), bool)
    return outputs, intermediates, node_ok


@dataclasses.dataclass(frozen=True)
class BoundFunction:
    """``fn`` traced and compiled for one method; call it with input sets.

    ``__call__`` checks the result (domain, finiteness) and raises a
    :class:`DiverifyError`; :meth:`unchecked` is the pure function to use
    under ``jax.vmap`` / ``jax.jit`` / sharding, whose result carries the
    ``domain_ok`` flag instead.
    """

    graph: Graph
    method: str
    perturbed: tuple
    constants: tuple
    spec: Any = None
    alpha_steps: int = 20
    alpha_lr: float = 0.1
    precision: str = "float32"
    symbols: int | None = None
    refine: str = "normalisers"

    def context(self):
        """The JAX configuration the bound must run under: ``jax.enable_x64``
        for float64. Wrap calls of :meth:`unchecked` (under ``vmap``/``jit``) in it."""
        return jax.enable_x64(self.precision != "float32")

    @property
    def dtype(self):
        """The engine's float dtype (``precision``)."""
        return _dtype(self.precision)

    @property
    def forward_slack(self) -> bool:
        """Whether the bound carries forward interval slack (``forward`` intermediate bounds), which
        :func:`diverify.xla_options.compiler_options` compiles differently."""
        return INTERMEDIATE[self.method] == "forward"

    def jit(self, fn):
        """``fn`` (a function of this bound's input sets, e.g. :meth:`unchecked` or a wrapper of it)
        jit-compiled with this bound's XLA options (:func:`diverify.xla_options.compiler_options`)."""
        return xla_options.jit(fn, self.dtype, forward_slack=self.forward_slack)

    @functools.cached_property
    def _compiled(self):
        return self.jit(self.unchecked)

    @functools.cached_property
    def _executables(self) -> dict:
        """Ahead-of-time compiled bound functions, by input structure and shapes."""
        return {}

    def engine_sets(self, *sets) -> list:
        """The input sets with every floating leaf in the engine's dtype (``precision``)."""
        return _promote(list(sets), self.dtype)

    def unchecked(self, *sets) -> BoundResult:
        """The bound as a pure function (float64: call it inside :meth:`context`)."""
        sets = self.engine_sets(*sets)
        outputs, intermediates, node_ok = _run(self.graph, self.method, self.spec, self.alpha_steps, self.alpha_lr, sets,
                                               self.symbols, error_dtype(self.precision), self.refine)
        outputs = [IntervalBound(*_outward_float32(b.lower, b.upper)) for b in outputs]
        intermediates = {k: IntervalBound(*_outward_float32(b.lower, b.upper)) for k, b in intermediates.items()}
        inter = INTERMEDIATE[self.method]
        output = outputs[0] if self.spec is not None else jax.tree_util.tree_unflatten(self.graph.out_tree, outputs)
        return BoundResult(output=output, intermediates=intermediates, node_ok=node_ok, method=self.method, intermediate_method=inter)

    def __call__(self, *sets) -> BoundResult:
        _check_sets(sets)
        with self.context():
            return self._checked(self._executable(sets)(*sets))

    def timed(self, *sets) -> tuple[BoundResult, float, float]:
        """The checked result, the tracing+compilation seconds (0 when an earlier call
        compiled for the same shapes) and the bound seconds (compiled ahead of time,
        so the bound is computed once)."""
        _check_sets(sets)
        with self.context():
            t0 = time.perf_counter()
            compiled = self._executable(sets)
            t1 = time.perf_counter()
            result = jax.block_until_ready(compiled(*sets))
            t2 = time.perf_counter()
        return self._checked(result), t1 - t0, t2 - t1

    def _executable(self, sets: tuple):
        """The bound compiled ahead of time for the structure, shapes and types of ``sets``
        (call inside :meth:`context`), compiled on first use (:func:`diverify.xla_options.compile`)."""
        if len(sets) != len(self.graph.input_avals):
            raise DiverifyError(f"the bound takes {len(self.graph.input_avals)} input set(s), got {len(sets)}")
        for i, (s, aval) in enumerate(zip(sets, self.graph.input_avals)):
            if tuple(np.shape(_as_input_set(s).center)) != tuple(aval.shape):
                raise DiverifyError(f"input set {i} has shape {tuple(np.shape(_as_input_set(s).center))}, but the "
                                    f"bound was compiled for shape {tuple(aval.shape)}")
        leaves, tree = jax.tree_util.tree_flatten(sets)
        key = (tree, tuple(jax.typeof(x) for x in leaves))
        if key not in self._executables:
            self._executables[key] = xla_options.compile(self._compiled.lower(*sets))
        return self._executables[key]

    def _checked(self, result: BoundResult) -> BoundResult:
        for node, ok in zip(self.graph.nodes, np.asarray(result.node_ok)):
            if not ok:
                where = f" (from {node.source})" if node.source else ""
                raise DiverifyError(
                    f"cannot bound '{node.name}'{where}: its input interval leaves the domain or float32 range "
                    "of the function (e.g. a variance bound reaching 0); the perturbation is too large for this method"
                )
        for leaf in jax.tree_util.tree_leaves(result.output):
            if not bool(jnp.all(jnp.isfinite(leaf))):
                raise DiverifyError(
                    f"the {self.method} bound is not finite (NaN or Inf): the perturbation is too large for this "
                    "model and method; try a smaller eps or a tighter method"
                )
        return result


def check_refine(refine: str, name: str = "refine") -> str:
    """``refine`` (which zonotope intervals CROWN tightens) if it is one of
    :data:`~diverify.bounds.backward.REFINE_SCOPES`, else a :class:`DiverifyError` naming ``name``."""
    if refine not in backward.REFINE_SCOPES:
        raise DiverifyError(f"{name} must be one of {', '.join(backward.REFINE_SCOPES)}, got {refine!r}")
    return refine


def check_symbols(symbols, name: str = "symbols") -> int | None:
    """``symbols`` (a zonotope order-reduction budget, None for the default) as an int; a
    :class:`DiverifyError` naming ``name`` unless it is a positive integer."""
    if symbols is None:
        return None
    if int(symbols) != symbols or symbols < 1:
        raise DiverifyError(f"{name} must be a positive integer, got {symbols}")
    return int(symbols)


def compile_bounds(fn: Callable, *args, method: str = "crown", spec=None, alpha_steps: int = 20, alpha_lr: float = 0.1,
                   precision: str = "float32", symbols: int | None = None, refine: str = "normalisers"):
    """Trace ``fn(*args)`` and return a :class:`BoundFunction` for ``method``.

    ``args``: input sets (perturbed) or arrays (constants). The returned
    function takes the input sets (same positions, same shapes) only.
    ``precision``: ``"float32"``, ``"float64"`` or ``"mixed"`` (see the module docstring).
    ``symbols``: how many error symbols the zonotope keeps at an order reduction
    (zonotope methods only; default :data:`diverify.bounds.zonotope.KEEP_SYMBOLS`):
    more is tighter and costs time and memory in proportion.
    ``refine``: which zonotope intervals a backward CROWN pass tightens once an order
    reduction has boxed symbols (zonotope methods only): ``"none"`` (the zonotope alone),
    ``"normalisers"`` (normalisation
    variances and softmax denominators, the default) or ``"attention"`` (also the operands
    of products of two perturbed tensors and the softmax's ``exp`` inputs: tighter on deep
    transformers at large radii, ~3x the time), ``"costliest"`` (every relaxation's input, but
    of each only the elements whose relaxations lose most, a fixed number) or ``"all"`` (every
    relaxation's input: the tightest and slowest; see :func:`diverify.bounds.backward.refined_by_crown`).
    """
    method = canonical_method(method)
    symbols = check_symbols(symbols)
    refine = check_refine(refine)
    dtype = _dtype(precision)
    sets = [_as_input_set(a) for a in args]
    _check_sets(sets, "argument")
    perturbed = tuple(s is not None for s in sets)
    if not any(perturbed):
        raise DiverifyError("nothing to bound: pass at least one input set (Box, LpBall, Substitution, IntervalBound)")
    with jax.enable_x64(precision != "float32"):  # a float64 set's centre stays float64
        examples = [s.center if s is not None else a for s, a in zip(sets, args)]
        for i, (s, e) in enumerate(zip(sets, examples)):
            if s is not None and not jnp.issubdtype(jnp.asarray(e).dtype, jnp.floating):
                raise DiverifyError(f"argument {i} is an input set of non-float dtype {jnp.asarray(e).dtype}")
        examples = [_promote(jnp.asarray(e), dtype) for e in examples]
        graph = trace(fn, examples, perturbed)
    ops.check_supported(graph.nodes)
    _check_no_narrowing(graph, precision)
    if spec is not None and len(graph.outputs) != 1:
        raise DiverifyError("a spec matrix needs a function with a single array output")
    return BoundFunction(graph, method, perturbed, tuple(a for a, p in zip(args, perturbed) if not p), spec, alpha_steps, alpha_lr,
                         precision, symbols, refine)


def bound(fn: Callable, *args, method: str = "crown", spec=None, alpha_steps: int = 20, alpha_lr: float = 0.1,
          precision: str = "float32") -> BoundResult:
    """Bounds of ``fn`` over the input sets among ``args`` with ``method`` (in ``precision``)."""
    bf = compile_bounds(fn, *args, method=method, spec=spec, alpha_steps=alpha_steps, alpha_lr=alpha_lr, precision=precision)
    return bf(*[_as_input_set(a) for a in args if _as_input_set(a) is not None])


def ibp(fn: Callable, *args):
    """Interval bound propagation: the output pytree with an :class:`IntervalBound` per array."""
    return bound(fn, *args, method="ibp").output


def crown(fn: Callable, *args, spec=None, method: str = "crown"):
    """Backward linear bounds (CROWN) of ``fn`` (or of ``spec @ fn`` when ``spec`` is given)."""
    return bound(fn, *args, method=method, spec=spec).output
