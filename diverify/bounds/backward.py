"""Backward linear bound propagation (CROWN, Zhang et al. 2018; auto_LiRPA, Xu et al. 2020).

To lower-bound ``sum(A_0 * v_target)`` over the input set, walk the graph
backwards carrying a linear function ``sum_v <A_v, v> + bias`` that stays a
lower bound of it:

* an affine node ``y = L x + c`` substitutes exactly: ``A_x += L^T A_y``
  (JAX's ``vjp`` of the primitive) and ``bias += <A_y, c>``;
* a unary node with relaxation ``ls x + li <= y <= us x + ui`` on the
  pre-activation interval uses the lower line where ``A_y >= 0`` and the upper
  line where ``A_y < 0``;
* a product ``z = x * y`` (and each term of a ``dot_general`` of two perturbed
  operands) uses McCormick planes likewise;
* a ``simplex`` node (a softmax's output, ``sum_axis y = 1``) uses the
  equality: ``<A, y> = <A - mu 1, y> + sum mu`` for ``mu = sum_axis A w``,
  which weighs the softmax relaxations' errors by ``|A - mu|`` instead of ``|A|``;
* at the inputs, the input set minimises the remaining linear function
  exactly (:mod:`diverify.specs`).

The relaxation errors thus stay symbolic: each is weighted by the exact
back-substituted coefficient of the node it belongs to, and later linear
layers cannot inflate them. Relaxations need intervals of the nonlinear
nodes' inputs ("intermediate bounds"); :func:`intermediate_bounds` computes
them with IBP or with CROWN itself, node by node.

Sound in exact arithmetic; float32 rounding is covered by the sampling tests'
tolerance (relative 1e-5 of the output scale).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from diverify.bounds import elementwise, relaxations, zonotope
from diverify.bounds.graph import Const, Graph, Node
from diverify.bounds.interval import intersect, node_interval
from diverify.bounds.ops import bounded_function, kind, linear_offset, linear_part, offset_free, relaxed_inputs
from diverify.bounds.synthetic import simplex_weights


def _pos(a):
    return jnp.maximum(a, 0.0)


def _neg(a):
    return jnp.minimum(a, 0.0)


def _rowsum(x):
    return x.reshape(x.shape[0], -1).sum(axis=1)


def _dot_expanders(node: Node):
    """Linear maps E_x, E_y with ``dot_general(x, y) = sum_C E_x(x) * E_y(y)``,
    laid out as ``(batch, lhs free, rhs free, contraction)``."""
    (lc, rc), (lb, rb) = node.params["dimension_numbers"]
    xr, yr = len(node.in_avals[0].shape), len(node.in_avals[1].shape)
    lfree = [d for d in range(xr) if d not in lc and d not in lb]
    rfree = [d for d in range(yr) if d not in rc and d not in rb]
    xs, ys = node.in_avals[0].shape, node.in_avals[1].shape
    batch = [xs[d] for d in lb]
    lf, rf, cc = [xs[d] for d in lfree], [ys[d] for d in rfree], [xs[d] for d in lc]
    full = tuple(batch + lf + rf + cc)

    def ex(x):
        xt = jnp.transpose(x, tuple(lb) + tuple(lfree) + tuple(lc))
        xt = xt.reshape(tuple(batch + lf) + (1,) * len(rf) + tuple(cc))
        return jnp.broadcast_to(xt, full)

    def ey(y):
        yt = jnp.transpose(y, tuple(rb) + tuple(rfree) + tuple(rc))
        yt = yt.reshape(tuple(batch) + (1,) * len(lf) + tuple(rf + cc))
        return jnp.broadcast_to(yt, full)

    return ex, ey, len(cc)


def _product_backward(a_out, b: relaxations.BilinearBounds):
    """Coefficients on x and y and the bias for a lower bound of ``<A, x*y>`` under the planes ``b``."""
    ap, an = _pos(a_out), _neg(a_out)
    ax = ap * b.lower_x + an * b.upper_x
    ay = ap * b.lower_y + an * b.upper_y
    bias = _rowsum(ap * b.lower_const + an * b.upper_const)
    return ax, ay, bias


def relaxation(node: Node, bounds, alpha=None, cache: dict | None = None):
    """The relaxation of a nonlinear node on its inputs' intervals ``bounds``: the
    lines of a unary node, the planes of a product, and of every term of a
    ``dot_general`` (on its expanded operands, :func:`_dot_expanders`).

    ``cache`` (node id -> relaxation; only without ``alpha``) shares them among the
    passes of one propagation, whose intervals of a node's inputs never change once
    computed: every CROWN pass that crosses the node would otherwise build the same
    lines again (thousands of operations for a UNet's 17 GroupNorm refinements).
    Affine nodes cache their transpose under the same key (:func:`_transpose`)."""
    key = id(node)
    if cache is not None and alpha is None and key in cache:
        return cache[key]
    al, au = (None, None) if alpha is None else alpha
    k = kind(node)
    if k == "unary":
        l, u = bounds[node.inputs[0]]
        r = elementwise.linear_bounds(node, l, u, al, au)
    else:
        x, y = node.inputs
        if k == "product":
            shape = node.out_avals[0].shape
            lx, ux = (jnp.broadcast_to(t, shape) for t in bounds[x])
            ly, uy = (jnp.broadcast_to(t, shape) for t in bounds[y])
        else:
            ex, ey, _ = _dot_expanders(node)
            lx, ux = (ex(t) for t in bounds[x])
            ly, uy = (ey(t) for t in bounds[y])
        r = relaxations.bilinear_bounds(lx, ux, ly, uy, al, au)
    if cache is not None and alpha is None:
        cache[key] = r
    return r


def _simplex_backward(node: Node, a_out, bounds):
    """``<A, y>`` with ``sum_axis y = 1``: ``A -> A - mu``, ``bias += sum mu``,
    ``mu = sum_axis A w`` with ``w`` from :func:`~diverify.bounds.synthetic.simplex_weights`.

    Exact for every ``y`` on the simplex, whatever ``mu`` is (sound)."""
    w = simplex_weights(bounds, node.params["axis"])
    mu = jnp.sum(a_out * w[None], axis=node.params["axis"] + 1, keepdims=True)
    return {0: a_out - mu}, _rowsum(mu)


def _transpose(node: Node, dtype, cache: dict | None = None):
    """The transpose (``vjp``) of an affine node's linear part and its offsets ``f(0)`` (None where
    :func:`~diverify.bounds.ops.offset_free` knows them to be 0: no pass over the rows for a zero
    bias), shared through ``cache`` like :func:`relaxation`."""
    if cache is not None and id(node) in cache:
        return cache[id(node)]
    zeros = [jnp.zeros(node.in_avals[i].shape, dtype) for i in node.bounded_inputs]
    _, vjp = jax.vjp(linear_part(node), *zeros)
    out = (vjp, None if offset_free(node) else linear_offset(node))
    if cache is not None:
        cache[id(node)] = out
    return out


def node_backward(node: Node, a_outs, bounds, alpha=None, cache: dict | None = None):
    """Back-substitute through one node: returns ({input position: A}, bias).
    ``cache`` as in :func:`relaxation`."""
    k = kind(node)
    positions = node.bounded_inputs
    if node.name == "simplex" and node.inputs[0] in bounds:
        return _simplex_backward(node, a_outs[0], bounds[node.inputs[0]])
    if k == "linear":
        vjp, offsets = _transpose(node, a_outs[0].dtype, cache)
        a_ins = jax.vmap(vjp)(tuple(a_outs))
        bias = 0.0 if offsets is None else sum(_rowsum(a * off[None]) for a, off in zip(a_outs, offsets))
        return dict(zip(positions, a_ins)), bias
    (a_out,) = a_outs
    r = relaxation(node, bounds, alpha, cache)
    if k == "unary":
        ap, an = _pos(a_out), _neg(a_out)
        a_in = ap * r.lower_slope + an * r.upper_slope
        bias = _rowsum(ap * r.lower_intercept + an * r.upper_intercept)
        return {0: a_in}, bias
    if k == "product":
        shape = node.out_avals[0].shape
        ax, ay, bias = _product_backward(a_out, r)
        (_, vx) = jax.vjp(lambda t: jnp.broadcast_to(t, shape), jnp.zeros(node.in_avals[0].shape, a_out.dtype))
        (_, vy) = jax.vjp(lambda t: jnp.broadcast_to(t, shape), jnp.zeros(node.in_avals[1].shape, a_out.dtype))
        return {0: jax.vmap(vx)(ax)[0], 1: jax.vmap(vy)(ay)[0]}, bias
    # dot_general of two perturbed operands: relax each term of the sum.
    ex, ey, nc = _dot_expanders(node)
    a_prod = jnp.broadcast_to(a_out.reshape(a_out.shape + (1,) * nc), (a_out.shape[0],) + r.lower_x.shape)
    ax, ay, bias = _product_backward(a_prod, r)
    (_, vx) = jax.vjp(ex, jnp.zeros(node.in_avals[0].shape, a_out.dtype))
    (_, vy) = jax.vjp(ey, jnp.zeros(node.in_avals[1].shape, a_out.dtype))
    return {0: jax.vmap(vx)(ax)[0], 1: jax.vmap(vy)(ay)[0]}, bias


def backward_lower(graph: Graph, target: int, a0, bounds, input_sets, alphas=None, stop: int | None = None,
                   cache: dict | None = None):
    """Lower bounds of ``<A_0[s], v_target>`` for every row ``s`` of ``a0``.

    ``bounds`` maps the inputs of every nonlinear node upstream of the
    target to sound intervals; ``alphas`` optionally maps node index to the
    relaxation parameters. ``stop`` is the index of the target's producer
    (nodes after it are skipped). ``cache``: see :func:`relaxation`.
    """
    coeffs = {target: a0}
    bias = jnp.zeros(a0.shape[0], a0.dtype)
    last = len(graph.nodes) - 1 if stop is None else stop
    for idx in range(last, -1, -1):
        node = graph.nodes[idx]
        if not any(o in coeffs for o in node.outputs):
            continue
        a_outs = [coeffs.pop(o) if o in coeffs else jnp.zeros((a0.shape[0],) + av.shape, a0.dtype)
                  for o, av in zip(node.outputs, node.out_avals)]
        a_ins, b = node_backward(node, a_outs, bounds, None if alphas is None else alphas.get(idx), cache)
        bias = bias + b
        for pos, a in a_ins.items():
            vid = node.inputs[pos]
            coeffs[vid] = coeffs[vid] + a if vid in coeffs else a
    for vid, s in zip(graph.inputs, input_sets):
        if vid in coeffs:
            bias = bias + s.minimize_linear(coeffs.pop(vid))
    return bias


def crown_interval(graph: Graph, vid: int, bounds, input_sets, producer_index: int, chunk: int = 4096,
                   cache: dict | None = None, elements: tuple | None = None):
    """CROWN lower and upper bounds of every element of value ``vid`` (``cache``: see :func:`relaxation`).

    ``elements``: ``(k, score)`` to bound only the ``k`` elements with the largest ``score`` (an
    array of the value's shape); the others get ``(-inf, inf)``, which an intersection ignores.
    """
    shape = tuple(graph.avals[vid].shape)
    n = math.prod(shape)
    dtype = graph.avals[vid].dtype
    picked = None
    if elements is not None and elements[0] < n:
        _, picked = jax.lax.top_k(elements[1].reshape(-1), elements[0])
        rows = jax.nn.one_hot(picked, n, dtype=dtype).reshape((elements[0],) + shape)
    else:
        rows = jnp.eye(n, dtype=dtype).reshape((n,) + shape)
    a0 = jnp.concatenate([rows, -rows])

    def run(rows):
        return backward_lower(graph, vid, rows, bounds, input_sets, stop=producer_index, cache=cache)

    if a0.shape[0] <= chunk:
        low = run(a0)
    else:
        if cache is not None:  # relaxations built inside lax.map's body must not be cached out of it
            for node in graph.nodes[:producer_index + 1]:
                if kind(node) == "linear":
                    _transpose(node, a0.dtype, cache)
                elif all(v in bounds for v in node.inputs if not isinstance(v, Const)):
                    relaxation(node, bounds, cache=cache)
        pad = (-a0.shape[0]) % chunk
        padded = jnp.concatenate([a0, jnp.zeros((pad,) + a0.shape[1:], a0.dtype)])
        low = jax.lax.map(run, padded.reshape((-1, chunk) + a0.shape[1:])).reshape(-1)[: a0.shape[0]]
    m = rows.shape[0]
    lo, hi = low[:m], -low[m:]
    if picked is None:
        return lo.reshape(shape), hi.reshape(shape)
    return (jnp.full((n,), -jnp.inf, lo.dtype).at[picked].set(lo).reshape(shape),
            jnp.full((n,), jnp.inf, hi.dtype).at[picked].set(hi).reshape(shape))


def relaxation_cost(graph: Graph, vid: int, interval):
    """Elementwise: what the relaxations reading ``vid`` lose on its ``interval`` ``[l, u]``, the
    score by which the ``"costliest"`` refinement picks its elements. For a unary reader ``f``,
    the largest gap between ``f`` and its chord at the quarter points of ``[l, u]`` (about
    ``|f''| w^2 / 8`` on a narrow interval of width ``w``, and nothing where ``f`` is linear: a
    GELU input far from 0 costs little however wide); for a product or a ``dot_general`` of two
    perturbed tensors, the width. The larger of the two where both read it; non-finite intervals
    first. (MiniLM, 3 layers, float64, 1e-4, 1024 elements a value: 3.23x the true range by this
    score, 4.40x by the width alone.)"""
    lo, hi = interval
    width = hi - lo
    finite = jnp.isfinite(width)
    lo, hi = jnp.where(finite, lo, 0.0), jnp.where(finite, hi, 0.0)
    cost = jnp.zeros_like(width)
    for node in graph.nodes:
        if vid not in node.inputs or kind(node) == "linear":
            continue
        if kind(node) != "unary":
            cost = jnp.maximum(cost, width)
            continue
        f = lambda x: bounded_function(node)(x)[0]  # noqa: E731
        for t in (0.25, 0.5, 0.75):
            x = lo + t * (hi - lo)
            cost = jnp.maximum(cost, jnp.abs(f(x) - (1 - t) * f(lo) - t * f(hi)))
    return jnp.where(finite, jnp.nan_to_num(cost), jnp.inf)


#: Inputs of ``rsqrt``/``sqrt``/``reciprocal`` with at most this many elements get CROWN bounds in the zonotope method.
REFINE_LIMIT = 1024
#: The nodes whose (small) inputs :func:`refined_by_crown` selects.
REFINED_INPUTS = ("rsqrt", "sqrt", "reciprocal")
#: Rows per backward pass of those refinements (``lax.map`` over chunks): MiniLM, 3 layers, float64,
#: the softmax denominators' 1176 rows in one pass: 32.1 s, 12.6 GB peak; in chunks of 256: 27.5 s, 9.1 GB.
REFINE_CHUNK = 256
#: Elements per value that the ``"costliest"`` scope bounds with CROWN (those of largest :func:`relaxation_cost`).
REFINE_COSTLIEST = 1024
#: Which intervals the zonotope method tightens with CROWN (:func:`refined_by_crown`), from cheapest to tightest.
REFINE_SCOPES = ("none", "normalisers", "attention", "costliest", "all")


def refined_by_crown(graph: Graph, scope: str = "normalisers") -> set[int]:
    """The values whose zonotope interval a backward CROWN pass tightens.

    ``"none"``: no value, the zonotope alone (DeepZ/DeepT). Where the zonotope loses little
    to its order reductions it gives the same bound and compiles faster: the digits UNet's
    step bound at r = 1e-5 (mixed precision), the same reach bound at T = 10, compiled in
    45 s instead of 64 s.

    ``"normalisers"``: the small inputs of ``rsqrt``/``sqrt``/``reciprocal``, i.e.
    LayerNorm/GroupNorm variances (one per token or group) and softmax denominators
    (one per head and query). Their lower bound decides whether the normalisation can
    be bounded at all, and CROWN's back-substitution keeps every earlier relaxation's
    error with its sign where the zonotope had to box some of them (its symbol budget).
    MiniLM, 3 layers, float64, 1e-4, crown-zonotope: with the softmax denominators as
    well as the variances, 52.4x -> 21.7x the true range, 28.2 -> 27.5 s (in chunks of
    :data:`REFINE_CHUNK` rows).

    ``"attention"`` adds the operands of every product of two perturbed tensors
    (``dot_general``: queries and keys, attention weights and values) and the inputs of
    ``exp`` (the softmax's score differences): the second-order slack of those products
    is ``r_x r_y`` summed over the contraction and ``exp``'s remainder grows with its
    input's width, so they are what widths the zonotope lost cost most. MiniLM, 3 layers,
    float64, 1e-4, crown-zonotope: 21.7x -> 8.2x the true range, 27.5 -> 83 s.

    ``"all"``: every input of a relaxation (:func:`~diverify.bounds.ops.relaxed_inputs`;
    on a transformer the FFN's GELU inputs are what it adds): full CROWN intermediate
    bounds from the first order reduction on. MiniLM, 4 layers, 1e-4, zonotope: with
    ``"attention"`` the fourth layer's GELU inputs are 1.2 wide on average and the next
    variance reaches 0 (refused); with ``"all"`` they are 0.016 wide and every layer is
    bounded. crown-zonotope, 1e-4: 3 layers 1.79x the true range (177 s), all 6 layers
    2.56x (609 s, 21.7 GB peak) where the other scopes are refused
    (``benchmarks/RESULTS.md``, stop 24).

    ``"costliest"``: the values of ``"all"``, but of each one of more than :data:`REFINE_COSTLIEST`
    elements only those whose relaxations lose most (:func:`relaxation_cost`), a fixed number of
    backward rows a value. MiniLM, crown-zonotope, 3 layers, float64, 1e-4: 3.23x the true range in
    90 s (``"all"``: 1.76x in 233 s); 1 layer, float32, 1e-3: 14.2x in 3.9 s (``"all"``: 14.0x in
    11.6 s; ``"normalisers"``, ``"attention"``: 20.9x in 2.1 s, 3.6 s). Not enough for the full model
    at 1e-4, where only ``"all"`` is not refused (``benchmarks/RESULTS.md``, stop 29).

    Any selection is sound: a refinement is intersected with the zonotope's own interval.
    """
    if scope not in REFINE_SCOPES:
        raise ValueError(f"unknown refinement scope {scope!r}: choose one of {', '.join(REFINE_SCOPES)}")
    if scope == "none":
        return set()
    targets = {node.inputs[0] for node in graph.nodes
               if node.name in REFINED_INPUTS and not isinstance(node.inputs[0], Const)
               and math.prod(graph.avals[node.inputs[0]].shape) <= REFINE_LIMIT}
    if scope in ("costliest", "all"):
        return targets | relaxed_inputs(graph)
    if scope == "attention":
        for node in graph.nodes:
            if node.name == "dot_general" and len(node.bounded_inputs) == 2:
                targets.update(node.inputs)
            elif node.name == "exp" and not isinstance(node.inputs[0], Const):
                targets.add(node.inputs[0])
    return targets


def forward_forms(graph: Graph, input_sets, method: str, output_forms: bool = False, symbols: int | None = None,
                  error_dtype=None, refine: str = "normalisers", refine_early: bool = False):
    """:func:`diverify.bounds.zonotope.propagate` for ``method`` ``"forward"`` or ``"zonotope"``, the
    latter with the intervals :func:`refined_by_crown` selects for ``refine`` tightened by CROWN
    (from the first node with ``refine_early``, else once an order reduction has boxed symbols);
    ``output_forms``, ``symbols`` (the zonotope's order-reduction budget) and ``error_dtype`` as there."""
    refine_fn = None
    cache: dict = {}
    if method == "zonotope":
        targets = refined_by_crown(graph, refine)

        def refine_fn(vid, idx, env):
            if vid not in targets:
                return None
            elements = None
            if refine == "costliest" and math.prod(graph.avals[vid].shape) > REFINE_COSTLIEST:
                elements = (REFINE_COSTLIEST, relaxation_cost(graph, vid, env[vid]))
            return crown_interval(graph, vid, env, input_sets, idx, chunk=REFINE_CHUNK, cache=cache,
                                  elements=elements)

    return zonotope.propagate(graph, input_sets, fresh_errors=method == "zonotope", refine=refine_fn,
                              refine_early=refine_early, output_forms=output_forms, symbols=symbols,
                              error_dtype=error_dtype, lines=lambda node, env: relaxation(node, env, cache=cache))


def intermediate_bounds(graph: Graph, input_sets, method: str = "crown", symbols: int | None = None, error_dtype=None,
                        refine: str = "normalisers", refine_early: bool = False):
    """Intervals of every value (dict id -> (l, u)) and the per-node domain flags.

    Nodes are visited in order; each value gets its IBP interval computed from
    the (already tightened) intervals of its inputs. With ``method="crown"``,
    every value that a relaxation needs is in addition bounded by a backward
    CROWN pass of its own, which uses the relaxations of the nodes before it;
    the two intervals are intersected (both are sound, so the intersection
    is). ``method="ibp"`` keeps the IBP intervals (CROWN-IBP);
    ``method="forward"`` takes forward linear bounds and ``method="zonotope"``
    zonotope bounds (both :mod:`diverify.bounds.zonotope`), the latter with
    the normalisation variances tightened by CROWN (:func:`refined_by_crown`;
    ``symbols``: the zonotope's order-reduction budget, ``error_dtype``: the float type of its
    error coefficients, see :func:`diverify.bounds.zonotope.propagate`; ``refine``: which of its
    intervals CROWN tightens, :func:`refined_by_crown`, and ``refine_early``: from the first node on,
    see :func:`forward_forms`).
    """
    if method in ("forward", "zonotope"):
        return forward_forms(graph, input_sets, method, symbols=symbols, error_dtype=error_dtype, refine=refine,
                             refine_early=refine_early)
    env = dict(zip(graph.inputs, [s.interval() for s in input_sets]))
    needed = relaxed_inputs(graph) if method == "crown" else set()
    cache: dict = {}
    flags = []
    for idx, node in enumerate(graph.nodes):
        ins = [v if isinstance(v, Const) else env[v] for v in node.inputs]
        outs, ok = node_interval(node, ins)
        flags.append(ok)
        for vid, iv in zip(node.outputs, outs):
            if vid in needed:
                lo, hi = crown_interval(graph, vid, env, input_sets, idx, cache=cache)
                iv = intersect(iv, (lo, hi))
            env[vid] = iv
    return env, flags
