"""What kind of operation a graph node is, as the bound methods see it.

Every node of a :class:`~diverify.bounds.graph.Graph` is one of

* ``linear``: affine in its perturbed inputs once the constants are fixed
  (``add``, ``dot_general`` with one constant operand, ``reshape``, ``gather``
  with constant indices, ...). Linear methods need no rule for these: JAX's
  own ``vjp``/``jvp`` of the primitive is the exact backward/forward map;
* ``unary``: an elementwise nonlinearity relaxed by
  :mod:`diverify.bounds.elementwise`;
* ``product``: ``mul`` of two perturbed operands (with broadcasting);
* ``dot``: ``dot_general`` of two perturbed operands (attention).

Anything else is an :class:`~diverify.errors.UnsupportedPrimitiveError` that
names the primitive and the user's line it came from.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from diverify.bounds.elementwise import is_unary
from diverify.bounds.graph import Const, Node
from diverify.errors import UnsupportedPrimitiveError

#: Linear maps whose coefficients are all >= 0 once index operands are fixed.
STRUCTURAL = frozenset({
    "add", "add_any", "reduce_sum", "reshape", "broadcast_in_dim", "transpose", "squeeze",
    "expand_dims", "concatenate", "slice", "dynamic_slice", "dynamic_update_slice", "gather",
    "pad", "select_n", "convert_element_type", "rev", "cumsum", "scatter-add", "scatter_add",
    "split", "real", "copy", "simplex",
})
#: Operand positions that are indices or predicates and must be constant.
INDEX_OPERANDS = {
    "gather": (1,),
    "select_n": (0,),
    "scatter-add": (1,),
    "scatter_add": (1,),
}
#: Bilinear primitives: linear when exactly one operand is perturbed.
MULTIPLICATIVE = frozenset({"mul", "dot_general", "conv_general_dilated", "div"})
#: Linear with mixed signs, handled in the structural way by the sign flip below.
SIGNED = frozenset({"sub", "neg"})
#: Linear maps that only move, copy or select values: no rounding in any float type.
EXACT = frozenset({
    "reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "concatenate", "slice",
    "dynamic_slice", "dynamic_update_slice", "gather", "pad", "select_n", "convert_element_type",
    "rev", "split", "real", "copy", "simplex", "neg",
})


def _index_positions(node: Node) -> tuple[int, ...]:
    if node.name == "dynamic_slice":
        return tuple(range(1, len(node.inputs)))
    if node.name == "dynamic_update_slice":
        return tuple(range(2, len(node.inputs)))
    return INDEX_OPERANDS.get(node.name, ())


def unsupported(node: Node, why: str = "") -> UnsupportedPrimitiveError:
    where = f" (from {node.source})" if node.source else ""
    detail = f": {why}" if why else ""
    return UnsupportedPrimitiveError(f"cannot bound primitive '{node.name}'{where}{detail}")


def kind(node: Node) -> str:
    """``"linear"``, ``"unary"``, ``"product"`` or ``"dot"``; raises for anything else."""
    bounded = node.bounded_inputs
    if node.name in MULTIPLICATIVE:
        if len(bounded) == 1:
            if node.name == "div" and bounded != (0,):
                raise unsupported(node, "perturbed denominator (normalisation should have removed it)")
            return "linear"
        if node.name == "mul":
            return "product"
        if node.name == "dot_general":
            return "dot"
        raise unsupported(node, "both operands are perturbed")
    if node.name in STRUCTURAL or node.name in SIGNED:
        for i in _index_positions(node):
            if i in bounded:
                raise unsupported(node, "its indices/predicate depend on the perturbed input")
        return "linear"
    if is_unary(node):
        return "unary"
    raise unsupported(node)


def relaxed_inputs(graph) -> set[int]:
    """Value ids whose intervals the relaxations need: the inputs of every
    non-linear node (unary, product, dot)."""
    return {v for node in graph.nodes if kind(node) != "linear" for v in node.inputs if not isinstance(v, Const)}


def check_supported(nodes) -> None:
    """Raise for the first node no method can bound, before any work is done."""
    for node in nodes:
        kind(node)


def bounded_function(node: Node, constants=None):
    """``f(*perturbed_operands)`` with the node's constants fixed (``constants``:
    one value per operand position, None at the perturbed ones; default the node's own)."""
    positions = node.bounded_inputs
    fixed = [v.value if isinstance(v, Const) else None for v in node.inputs] if constants is None else list(constants)

    def f(*xs):
        args = list(fixed)
        for i, x in zip(positions, xs):
            args[i] = x
        return node.evaluate(*args)

    return f


def linear_offset(node: Node):
    """``f(0)``: the constant part of an affine node (one array per output)."""
    zeros = [jnp.zeros(node.in_avals[i].shape, node.in_avals[i].dtype) for i in node.bounded_inputs]
    return bounded_function(node)(*zeros)


def offset_free(node: Node) -> bool:
    """Whether an affine node's ``f(0)`` is 0, decided at trace time: a multiplicative node is linear in
    its perturbed operand, and a structural or signed one jointly in its non-index operands, so ``f(0)``
    is 0 when every constant among those is (their values are concrete while tracing). Most affine
    nodes of a model are so (products with weights, reshapes, sums); a bias ``add`` is not."""
    if node.name in MULTIPLICATIVE:
        return True
    index = _index_positions(node)
    try:
        return not any(isinstance(v, Const) and i not in index and np.any(np.asarray(v.value) != 0)
                       for i, v in enumerate(node.inputs))
    except jax.errors.TracerArrayConversionError:  # a constant only known inside a trace
        return False


def linear_part(node: Node, dtype=None):
    """The linear part ``x -> f(x) - f(0)`` of an affine node, as a function of
    its perturbed operands returning a tuple of outputs.

    ``dtype`` (a float type): evaluate it in that type instead, the constants
    rounded to it (:func:`rounding_count` bounds the difference).

    Evaluated directly, without ``f(0)``: a multiplicative node (one perturbed
    operand) is already linear in it, and a structural or signed node is linear
    in all its non-index operands jointly, so zeros in place of its constant
    operands leave exactly the linear part (the same reading as
    :func:`linear_radius`). Subtracting ``f(0)`` instead cost one more
    evaluation and a pass over every symbol's coefficients per node.
    """
    index = _index_positions(node)
    constants = [None if not isinstance(v, Const) else v.value if node.name in MULTIPLICATIVE or i in index
                 else jnp.zeros_like(jnp.asarray(v.value)) for i, v in enumerate(node.inputs)]
    if dtype is None:
        f = bounded_function(node, constants)
        return lambda *xs: tuple(f(*xs))
    constants = [c if c is None or not jnp.issubdtype(jnp.asarray(c).dtype, jnp.floating) else jnp.asarray(c, dtype)
                 for c in constants]
    params = dict(node.params)
    if params.get("preferred_element_type") is not None:
        params["preferred_element_type"] = dtype
    narrow = dataclasses.replace(node, params=params)
    f = bounded_function(narrow, constants)
    return lambda *xs: tuple(jnp.asarray(o, dtype) for o in f(*xs))


def rounding_count(node: Node) -> int:
    """``k`` such that :func:`linear_part` evaluated in a float type of machine epsilon
    ``eps`` (constants rounded to it) is within ``k eps |L| |x|`` of the exact linear map
    ``L x``, elementwise.

    The standard error analysis: a sum of ``n`` products rounds by at most
    ``gamma_n |L| |x|`` with ``gamma_n = n u / (1 - n u)`` (``u = eps / 2``) in any
    summation order, with or without fused multiply-adds (assumed: XLA evaluates
    products and convolutions directly or by im2col and GEMM, not by a fast transform
    such as Winograd's), rounding a constant adds ``u |c|``, a final cast ``u``. ``k``
    counts ``n + 2`` units of ``u`` as ``eps`` units, a factor 2 of margin. Moving
    ops (:data:`EXACT`) are exact; a primitive not analysed here gets its largest
    operand's size as ``n`` (every output a sum of at most that many terms).
    """
    name = node.name
    if name in EXACT:
        return 0
    if name in ("add", "add_any", "sub", "mul", "div"):
        n = 1
    elif name == "dot_general":
        (lc, _), _ = node.params["dimension_numbers"]
        shape = node.in_avals[0].shape
        n = math.prod(shape[d] for d in lc)
    elif name == "conv_general_dilated":
        rhs = node.in_avals[1].shape
        n = math.prod(rhs) // rhs[node.params["dimension_numbers"].rhs_spec[0]]
    elif name == "reduce_sum":
        n = math.prod(node.in_avals[0].shape) // max(1, math.prod(node.out_avals[0].shape))
    elif name == "cumsum":
        n = node.in_avals[0].shape[node.params["axis"]]
    else:
        n = max(math.prod(av.shape) for av in node.in_avals)
    return n + 2


def linear_radius(node: Node, radii):
    """Image of the radii ``r_i >= 0`` under ``|L|`` (the absolute linear map).

    Sound because ``|L x| <= |L| |x|`` elementwise. Multiplicative nodes take
    ``|c|`` for their constant operand; structural nodes have coefficients
    ``>= 0`` (zeros stand for the constant operands); ``sub``/``neg`` flip a
    sign, which ``|L|`` undoes.
    """
    positions = node.bounded_inputs
    out_shape = node.out_avals[0].shape
    if node.name == "neg":
        return (radii[0],)
    if node.name == "sub":
        return (sum(jnp.broadcast_to(r, out_shape) for r in radii),)
    args = []
    for i, v in enumerate(node.inputs):
        if i in positions:
            args.append(radii[positions.index(i)])
        elif node.name in MULTIPLICATIVE:
            args.append(jnp.abs(jnp.asarray(v.value)))
        elif i in _index_positions(node):
            args.append(v.value)
        else:
            args.append(jnp.zeros_like(jnp.asarray(v.value)))
    return node.evaluate(*args)
