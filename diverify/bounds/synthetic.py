"""Recognise high-level ops in a traced graph and put them in bound-friendly form.

Following jax_verify's *synthetic primitives*, a pattern is not written by
hand: it is the graph that tracing a reference function (``jax.nn.softmax``,
``jax.nn.gelu``, ...) produces, and it is found in the user's graph by
structural matching (same primitives, same literal constants, same wiring),
so a user's own softmax or GELU is found as long as it traces the same way.

What a match becomes:

* elementwise activations (GELU exact and tanh, quick-GELU, SiLU, softplus) become one
  *unary* node with the activation's name; :mod:`diverify.bounds.elementwise`
  relaxes it as a whole, which is far tighter than relaxing ``x * erfc(..)``
  as a product;
* softmax along an axis becomes its *pairwise* form
  ``y_i = 1 / (1 + sum_{j != i} exp(x_j - x_i))`` (as in DeepT, Bonaert et
  al. 2021): the differences ``x_j - x_i`` are linear, so correlated
  perturbations cancel before the exponential, and the reciprocal's argument
  is provably ``>= 1``; even interval arithmetic on this form gives the
  tight softmax interval. Its result then passes a ``simplex`` node: the
  identity on values, which records that the values sum to one along
  ``axis`` so that a method may use that equality (the zonotope method does).

A light normalisation pass then rewrites the remaining primitives into the
few node kinds the methods know: ``max(x, c)`` -> ``relu``, a maximum of perturbed values (``max``,
``reduce_max``, their ``min`` twins) -> pairwise ``a + relu(b - a)``, ``div(a, y)``
with a perturbed ``y`` -> ``a * reciprocal(y)``, ``erfc`` -> ``1 - erf``,
``x * x`` -> ``square``, identities dropped.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diverify.bounds.graph import Const, Node

#: Primitives that are the identity on values (bounds pass through unchanged).
IDENTITY_PRIMITIVES = frozenset({"copy", "copy_p", "stop_gradient", "optimization_barrier", "reduce_precision"})

COMMUTATIVE = frozenset({"add", "mul", "max", "min"})


@dataclasses.dataclass(frozen=True)
class Unary:
    """A synthetic elementwise op: ``impl`` evaluates it, ``name`` selects its relaxation."""

    name: str
    impl: Callable

    def bind(self, x, **_):
        return self.impl(x)

    multiple_results = False


@dataclasses.dataclass(frozen=True)
class Simplex:
    """The identity on values that lie on the probability simplex along ``axis``.

    A linear node for every method; the marker lets a method enforce the
    equality ``sum_axis y = 1`` that the pairwise softmax's relaxations lose.
    """

    def bind(self, x, **_):
        return x

    multiple_results = False


def simplex_weights(bounds, axis: int):
    """Weights ``w >= 0`` with ``sum_axis w = 1``: the middle of the interval
    ``bounds = (lo, hi)``, renormalised (any such ``w`` keeps a simplex
    method sound; this one centres the errors on the expected probabilities)."""
    mid = jnp.maximum((bounds[0] + bounds[1]) / 2, 0.0)
    return mid / jnp.maximum(jnp.sum(mid, axis=axis, keepdims=True), jnp.finfo(mid.dtype).tiny)


def _simplex_node(y, out_id: int, axis: int, like: Node, builder) -> Node:
    aval = builder.avals[y]
    return Node(name="simplex", primitive=Simplex(), params={"axis": axis % len(aval.shape)},
                inputs=(y,), outputs=(out_id,), out_avals=like.out_avals, in_avals=(aval,),
                source=like.source)


#: Pairwise softmax differences are clipped here before ``exp`` (see :func:`_softmax_pairwise`).
EXP_CLIP = 80.0


def _softmax_pairwise(x, axis):
    """``y_i = 1 / (1 + sum_{j != i} exp(min(x_j - x_i, EXP_CLIP)))``.

    The clip keeps masked keys (scores ~ -1e9) boundable: where a difference
    exceeds 80, the true ``y_i`` is below ``1 / (1 + e^80) = 1.8e-35`` and the
    clipped form gives a value in ``[0, 1.8e-35]`` as well, so the rewrite
    moves ``y_i`` by less than 1.8e-35: below ``ABS_PAD`` (1e-30), which every
    relaxation adds, and below float32's resolution of any sum it enters.
    A sum of at most 1e3 terms ``e^80`` stays finite in float32.
    """
    x = jnp.moveaxis(x, axis, -1)
    diff = x[..., None, :] - x[..., :, None]  # diff[..., i, j] = x_j - x_i
    off_diagonal = 1.0 - jnp.eye(x.shape[-1], dtype=x.dtype)
    y = 1.0 / (1.0 + jnp.sum(off_diagonal * jnp.exp(jnp.minimum(diff, EXP_CLIP)), axis=-1))
    return jnp.moveaxis(y, -1, axis)


UNARY_IMPLS: dict[str, Callable] = {
    "relu": jax.nn.relu,
    "reciprocal": lambda x: 1.0 / x,
    "square": jnp.square,
    "gelu_erf": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "softplus": jax.nn.softplus,
    "finite": lambda x: x,
}


# --------------------------------------------------------------------------
# Pattern graphs, traced from reference functions.


@dataclasses.dataclass(frozen=True)
class _Pattern:
    name: str
    nodes: tuple
    input_id: int
    output_id: int

    @functools.cached_property
    def producer(self):
        return {o: n for n in self.nodes for o in n.outputs}


def _pattern(name: str, fn: Callable, shape=(2, 3)) -> _Pattern:
    from diverify.bounds.graph import _Builder

    closed = jax.make_jaxpr(fn)(jnp.ones(shape, jnp.float32))
    builder = _Builder()
    x = builder.new_value(jax.ShapeDtypeStruct(shape, jnp.float32))
    (out,) = builder.inline(closed.jaxpr, closed.consts, [x])
    nodes, (out,) = _drop_identities(tuple(builder.nodes), [out])
    return _Pattern(name, nodes, x, out)


@functools.cache
def _patterns() -> tuple[_Pattern, ...]:
    # Larger patterns first: GELU-tanh contains a tanh, quick-GELU a logistic.
    return (
        _pattern("softmax", lambda x: jax.nn.softmax(x, axis=-1)),
        _pattern("softmax", lambda x: jnp.exp(x) / jnp.sum(jnp.exp(x), axis=-1, keepdims=True)),
        _pattern("gelu_tanh", functools.partial(jax.nn.gelu, approximate=True)),
        _pattern("gelu_erf", functools.partial(jax.nn.gelu, approximate=False)),
        _pattern("quick_gelu", UNARY_IMPLS["quick_gelu"]),
        _pattern("silu", lambda x: x * jax.nn.sigmoid(x)),
        _pattern("softplus", jax.nn.softplus),
    )


def _same_const(a: Const, b: Const) -> bool:
    va, vb = np.asarray(a.value), np.asarray(b.value)
    if va.size != 1 or vb.size != 1:
        return False
    return bool(np.isclose(va.reshape(()), vb.reshape(()), rtol=1e-6, atol=0.0, equal_nan=True))


def _match(pat: _Pattern, producer: dict, p_val, t_val, binding: dict, mapping: dict) -> bool:
    if isinstance(p_val, Const):
        return isinstance(t_val, Const) and _same_const(p_val, t_val)
    if p_val == pat.input_id:
        if isinstance(t_val, Const):
            return False
        if p_val in binding:
            return binding[p_val] == t_val
        binding[p_val] = t_val
        return True
    if isinstance(t_val, Const) or t_val not in producer:
        return False
    p_node, (t_index, t_node) = pat.producer[p_val], producer[t_val]
    if p_node.name != t_node.name or len(p_node.inputs) != len(t_node.inputs):
        return False
    if p_node.params.get("y") != t_node.params.get("y"):
        return False
    if t_index in mapping:
        return mapping[t_index] is p_node
    orders = [t_node.inputs]
    if t_node.name in COMMUTATIVE:
        orders.append(tuple(reversed(t_node.inputs)))
    for t_inputs in orders:
        b, m = dict(binding), dict(mapping)
        m[t_index] = p_node
        if all(_match(pat, producer, pi, ti, b, m) for pi, ti in zip(p_node.inputs, t_inputs)):
            binding.update(b)
            mapping.update(m)
            return True
    return False


def _softmax_axis(matched: list[Node], x_shape) -> int | None:
    """The softmax axis, if every reduction and broadcast in the match agrees on one."""
    axes = {tuple(n.params["axes"]) for n in matched if n.name.startswith("reduce_")}
    if len(axes) != 1:
        return None
    (axis_tuple,) = axes
    if len(axis_tuple) != 1:
        return None
    axis = axis_tuple[0]
    rank = len(x_shape)
    for n in matched:
        if n.name == "broadcast_in_dim":
            others = tuple(d for d in range(rank) if d != axis)
            if tuple(n.params["broadcast_dimensions"]) != others or n.params["shape"][axis] != 1:
                return None
    return axis


# --------------------------------------------------------------------------
# Rewriting.


def _drop_identities(nodes: tuple, outputs: list):
    alias: dict[int, object] = {}

    def resolve(v):
        while not isinstance(v, Const) and v in alias:
            v = alias[v]
        return v

    kept = []
    for n in nodes:
        if n.name in IDENTITY_PRIMITIVES or (
            n.name == "convert_element_type" and n.in_avals[0].dtype == n.out_avals[0].dtype
        ):
            alias[n.outputs[0]] = n.inputs[0]
            continue
        kept.append(dataclasses.replace(n, inputs=tuple(resolve(v) for v in n.inputs)))
    return tuple(kept), [resolve(o) for o in outputs]


def recognise(nodes: tuple, avals: dict, outputs: list, builder) -> tuple[tuple, list]:
    """Return the graph with high-level ops recognised and primitives normalised.

    ``builder`` (a :class:`diverify.bounds.graph._Builder`) provides fresh value
    ids for the nodes of rewritten forms.
    """
    nodes, outputs = _drop_identities(nodes, outputs)
    nodes = _replace_patterns(nodes, avals, outputs, builder)
    nodes = _finite_guards(_normalise(nodes, builder), builder)
    return _live(nodes, outputs), outputs


def _finite_guards(nodes: tuple, builder) -> tuple:
    """``where(isfinite(c), c, 0)`` (``select_n(is_finite(c), 0, c)``: ``jax.nn.logsumexp``'s guard of
    its shift) -> ``finite(c)``, the identity on a finite interval. Sound: the bound of ``finite``
    is flagged (an error) unless ``c``'s interval is finite, and then every point has a finite ``c``,
    where the guard returns ``c``. The ``is_finite`` node is then dead (:func:`_live`)."""
    producer = {o: n for n in nodes for o in n.outputs}
    out = []
    for n in nodes:
        if n.name == "select_n" and len(n.inputs) == 3 and not isinstance(n.inputs[0], Const):
            guard, zero, value = producer.get(n.inputs[0]), n.inputs[1], n.inputs[2]
            if guard is not None and guard.name == "is_finite" and guard.inputs[0] == value and _is_zero(zero):
                out.append(_unary_node("finite", value, n, builder))
                continue
        out.append(n)
    return tuple(out)


def _live(nodes: tuple, outputs: list) -> tuple:
    """The nodes that some output depends on (in order): an unused result (``logsumexp``'s
    ``sign``, a dead guard) is neither bounded nor required to be boundable."""
    needed = {v for v in outputs if not isinstance(v, Const)}
    kept = []
    for n in reversed(nodes):
        if any(o in needed for o in n.outputs):
            kept.append(n)
            needed.update(v for v in n.inputs if not isinstance(v, Const))
    return tuple(reversed(kept))


def _replace_patterns(nodes: tuple, avals: dict, outputs: list, builder) -> tuple:
    producer = {o: (k, n) for k, n in enumerate(nodes) for o in n.outputs}
    users: dict[int, set[int]] = {}
    for k, n in enumerate(nodes):
        for v in n.inputs:
            if not isinstance(v, Const):
                users.setdefault(v, set()).add(k)
    graph_outputs = {o for o in outputs if not isinstance(o, Const)}

    absorbed: set[int] = set()
    replacement: dict[int, tuple] = {}
    for pat in _patterns():
        root_name = pat.producer[pat.output_id].name
        for k in range(len(nodes) - 1, -1, -1):
            node = nodes[k]
            if k in absorbed or k in replacement or node.name != root_name or len(node.outputs) != 1:
                continue
            binding, mapping = {}, {}
            if not _match(pat, producer, pat.output_id, node.outputs[0], binding, mapping):
                continue
            inner = set(mapping) - {k}
            if inner & (absorbed | set(replacement)):
                continue
            inner_outs = {o for i in inner for o in nodes[i].outputs}
            if inner_outs & graph_outputs or any(users.get(o, set()) - set(mapping) for o in inner_outs):
                continue
            x = binding[pat.input_id]
            if pat.name == "softmax":
                axis = _softmax_axis([nodes[i] for i in mapping], avals[x].shape)
                if axis is None:
                    continue
                y = builder.new_value(avals[node.outputs[0]])
                new_nodes = _inline_fn(builder, functools.partial(_softmax_pairwise, axis=axis), x, y)
                new_nodes += (_simplex_node(y, node.outputs[0], axis, node, builder),)
            else:
                new_nodes = (_unary_node(pat.name, x, node, builder),)
            absorbed |= inner
            replacement[k] = new_nodes
    out = []
    for k, n in enumerate(nodes):
        if k in absorbed:
            continue
        out.extend(replacement.get(k, (n,)))
    return tuple(out)


def _unary_node(name: str, x, like: Node, builder) -> Node:
    return Node(
        name=name,
        primitive=Unary(name, UNARY_IMPLS[name]),
        params={},
        inputs=(x,),
        outputs=like.outputs,
        out_avals=like.out_avals,
        in_avals=(builder.avals[x],),
        source=like.source,
    )


def _inline_fn(builder, fn: Callable, x, out_id: int, *extra) -> tuple:
    """Inline the graph of ``fn(x, *extra)`` (extra: constants or values of the graph) so that its
    result is ``out_id``."""
    def example(v):
        return v.value if isinstance(v, Const) else jnp.zeros(builder.avals[v].shape, builder.avals[v].dtype)

    closed = jax.make_jaxpr(fn)(example(x), *[example(e) for e in extra])
    saved = builder.nodes
    builder.nodes = []
    (out,) = builder.inline(closed.jaxpr, closed.consts, [x, *extra])
    new_nodes, builder.nodes = tuple(builder.nodes), saved
    if isinstance(out, Const) or out == x:
        raise AssertionError("a rewrite must produce a new perturbed value")
    new_nodes, _ = _drop_identities(new_nodes, [out])
    # Rename the rewrite's result to the id the rest of the graph reads.
    last = new_nodes[-1]
    if last.outputs != (out,):
        raise AssertionError("the rewrite's result must come from its last node")
    new_nodes = new_nodes[:-1] + (dataclasses.replace(last, outputs=(out_id,)),)
    return _normalise(new_nodes, builder)


def _normalise(nodes: tuple, builder) -> tuple:
    out = []
    for n in nodes:
        out.extend(_normalise_node(n, builder))
    return tuple(out)


def _is_zero(v) -> bool:
    return isinstance(v, Const) and np.all(np.asarray(v.value) == 0)


def _normalise_node(n: Node, builder) -> tuple:
    ins = n.inputs
    if n.name == "mul" and len(ins) == 2 and ins[0] == ins[1] and not isinstance(ins[0], Const):
        return (dataclasses.replace(n, name="square", primitive=Unary("square", UNARY_IMPLS["square"]), inputs=(ins[0],), in_avals=n.in_avals[:1]),)
    if n.name == "integer_pow" and n.params.get("y") == 2:
        return (dataclasses.replace(n, name="square", primitive=Unary("square", UNARY_IMPLS["square"]), params={}),)
    if n.name in ("max", "min") and len(ins) == 2 and sum(isinstance(v, Const) for v in ins) == 1:
        return _clamp(n, builder)
    if n.name in ("max", "min") and len(ins) == 2 and not any(isinstance(v, Const) for v in ins):
        return _inline_fn(builder, _larger if n.name == "max" else _smaller, ins[0], n.outputs[0], ins[1])
    if n.name in ("reduce_max", "reduce_min") and not isinstance(ins[0], Const):
        axes = tuple(n.params["axes"])
        return _inline_fn(builder, functools.partial(_tree_max if n.name == "reduce_max" else _tree_min, axes=axes),
                          ins[0], n.outputs[0])
    if n.name == "div" and not isinstance(ins[1], Const):
        return _times_reciprocal(n, builder)
    if n.name == "erfc":
        return _inline_fn(builder, lambda x: 1.0 - jax.lax.erf(x), ins[0], n.outputs[0])
    return (n,)


#: ``max(x, c)`` / ``min(x, c)`` with constants up to this magnitude keep the form ``c +- relu(..)`` (see
#: :func:`_larger`): interval arithmetic gets it exactly, and its cancellation costs at most ~1e-5 absolute
#: in float32. The softmax's :data:`EXP_CLIP` must stay below it, or wide intervals would overflow ``exp``.
SMALL_CLAMP = 100.0


def _small(c: Const) -> bool:
    """Whether the constant of ``max(x, c)`` / ``min(x, c)`` is at most :data:`SMALL_CLAMP` in magnitude."""
    return bool(np.all(np.abs(np.asarray(c.value)) <= SMALL_CLAMP))


def _clamp(n: Node, builder) -> tuple:
    """``max(x, c)`` / ``min(x, c)`` with a constant ``c``: a relu for ``max(x, 0)``, the identity for
    ``max(x, -inf)`` / ``min(x, inf)`` (a reduction's initial value: log_softmax's max), else
    ``c +- relu(+-(x - c))`` for constants up to :data:`SMALL_CLAMP` and :func:`_larger` /
    :func:`_smaller` beyond (why: :func:`_larger`)."""
    x, c = (n.inputs[0], n.inputs[1]) if isinstance(n.inputs[1], Const) else (n.inputs[1], n.inputs[0])
    sign = 1.0 if n.name == "max" else -1.0
    if sign > 0 and _is_zero(c):
        return (_unary_node("relu", x, n, builder),)
    if np.all(np.asarray(c.value) == -sign * np.inf):
        return _inline_fn(builder, lambda x: x + 0.0, x, n.outputs[0])
    if _small(c):
        form = (lambda x, c: c + jax.nn.relu(x - c)) if sign > 0 else (lambda x, c: c - jax.nn.relu(c - x))
    else:
        form = _larger if sign > 0 else _smaller
    return _inline_fn(builder, form, x, n.outputs[0], c)


def _larger(a, b):
    """``max(a, b) = a + relu(b - a)``, exact in real arithmetic, with the relu's relaxation.

    In this order a ``b`` far below ``a`` costs no cancellation: ``relu(b - a)`` is exactly 0 there
    (a clamp ``max(x, -1e9)``, a masked token's fill at the end of a max pooling). The form
    ``c + relu(x - c)`` computes ``-1e9 + (x + 1e9)`` there, and the float32 rounding of those
    offsets (~64) is not padded: until stop 34 ``max(x, -1e9)`` bounded ``x = 0.3`` by [0, 0] in
    float32. That form stays for constants up to :data:`SMALL_CLAMP` (a DDIM clip to [-1, 1], the
    softmax's :data:`EXP_CLIP`): interval arithmetic gets ``c + relu(x - c)`` exactly, and
    ``x + relu(c - x)`` only up to ``x``'s width where the relu's input straddles 0 (an ``exp`` after
    ``min(d, EXP_CLIP)`` overflowed that way on wide intervals). A ``b`` far *above* ``a`` still
    cancels; see "Precision" in :mod:`diverify.bounds.api`."""
    return a + jax.nn.relu(b - a)


def _smaller(a, b):
    """``min(a, b) = a - relu(a - b)``: no cancellation for a ``b`` far above ``a`` (``min(x, 1e9)``)."""
    return a - jax.nn.relu(a - b)


def _tree_max(x, axes: tuple):
    """``max`` over ``axes`` as a tree of pairwise :func:`_larger` (the first half against the
    second, log2(n) levels): the form whose relaxations bound a maximum."""
    for axis in sorted(axes, reverse=True):
        while x.shape[axis] > 1:
            n = x.shape[axis]
            half = n // 2
            pairs = _larger(jax.lax.slice_in_dim(x, 0, half, axis=axis), jax.lax.slice_in_dim(x, half, 2 * half, axis=axis))
            x = pairs if n % 2 == 0 else jnp.concatenate([pairs, jax.lax.slice_in_dim(x, n - 1, n, axis=axis)], axis)
        x = jnp.squeeze(x, axis)
    return x


def _tree_min(x, axes: tuple):
    return -_tree_max(-x, axes)


def _times_reciprocal(n: Node, builder) -> tuple:
    """``a / y`` with a perturbed ``y`` -> ``r = reciprocal(y); a * r``."""
    numerator, y = n.inputs
    if _is_const_one(numerator):
        return (_unary_node("reciprocal", y, n, builder),)
    r = builder.new_value(builder.avals[y])
    reciprocal = Node(
        name="reciprocal",
        primitive=Unary("reciprocal", UNARY_IMPLS["reciprocal"]),
        params={},
        inputs=(y,),
        outputs=(r,),
        out_avals=(builder.avals[y],),
        in_avals=(builder.avals[y],),
        source=n.source,
    )
    product = Node(
        name="mul",
        primitive=jax.lax.mul_p,
        params={},
        inputs=(numerator, r),
        outputs=n.outputs,
        out_avals=n.out_avals,
        in_avals=(n.in_avals[0], builder.avals[y]),
        source=n.source,
    )
    return (reciprocal, product)


def _is_const_one(v) -> bool:
    return isinstance(v, Const) and np.asarray(v.value).size == 1 and float(np.asarray(v.value).reshape(())) == 1.0
