"""A flat, inlined computation graph of a JAX function, built from its jaxpr.

The bound engine never walks JAX's internal structures directly: it traces
the function once with the public :func:`jax.make_jaxpr`, inlines every
sub-jaxpr (``jit``/``pjit``, ``custom_jvp_call``, ``custom_vjp_call``,
``closed_call``, ``remat``), folds everything that does not depend on a
perturbed input into constants, and hands the bound methods a topologically
ordered list of :class:`Node`. Only ``jax.make_jaxpr`` and the types of
:mod:`jax.extend.core` are used (jax_verify died of ``jax.core`` internals).

Each node is either a JAX primitive (``node.primitive.bind`` evaluates it)
or a *synthetic* op found by :mod:`diverify.bounds.synthetic` (softmax,
GELU, ...), which the methods relax as a whole.

Matrix products and convolutions are recorded at ``Precision.HIGHEST``
(:func:`full_precision`): a GPU's default float32 product uses TF32, whose
~1e-3 relative error is far above the roundings the relaxations pad for, so
the engine's own products (and the constants it folds) must not use it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from diverify.errors import DiverifyError

#: Primitives whose ``precision`` parameter selects the arithmetic of their products.
_PRECISION_PRIMITIVES = ("dot_general", "conv_general_dilated")


def full_precision(name: str, params: dict) -> dict:
    """``params`` with a product's default or reduced ``precision`` raised to ``HIGHEST``.

    ``None``/``DEFAULT``/``HIGH`` let a GPU compute float32 products in TF32 or
    bf16 passes; an explicit dot algorithm is kept as the user chose it."""
    if name not in _PRECISION_PRIMITIVES:
        return params
    precision = params.get("precision")
    if precision is None or (isinstance(precision, tuple)
                             and all(isinstance(p, jax.lax.Precision) for p in precision)):
        return dict(params, precision=(jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST))
    return params


#: Parameters under which a higher-order primitive keeps the jaxpr it calls.
_SUBJAXPR_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


@dataclasses.dataclass(frozen=True)
class Const:
    """A value that does not depend on any perturbed input."""

    value: Any


@dataclasses.dataclass(frozen=True)
class Node:
    """One operation of the flattened graph.

    ``inputs`` are value ids (ints, produced by an earlier node or a graph
    input) or :class:`Const`; ``outputs`` are value ids. ``name`` is the
    primitive's name, or the synthetic op's name when ``primitive`` is None.
    ``source`` says where the op came from, for error messages.
    """

    name: str
    primitive: Any
    params: dict
    inputs: tuple
    outputs: tuple
    out_avals: tuple
    in_avals: tuple = ()
    source: str = ""

    def evaluate(self, *args):
        """Apply the primitive to concrete or traced arrays (one value per input)."""
        out = self.primitive.bind(*args, **self.params)
        return tuple(out) if self.primitive.multiple_results else (out,)

    @property
    def bounded_inputs(self) -> tuple[int, ...]:
        return tuple(i for i, v in enumerate(self.inputs) if not isinstance(v, Const))


@dataclasses.dataclass(frozen=True)
class Graph:
    """A traced function: ``inputs`` are the value ids of the perturbed inputs,
    ``outputs`` the ids (or :class:`Const`) of the flattened outputs."""

    nodes: tuple[Node, ...]
    inputs: tuple[int, ...]
    input_avals: tuple
    outputs: tuple
    out_tree: Any
    avals: dict


_LIBRARY_PATHS = ("/jax/", "/jaxlib/", "/flax/", "/diverify/bounds/", "/optax/")


def _describe(eqn) -> str:
    """``file:line (function)`` of the user code that emitted ``eqn``, if known."""
    traceback = getattr(getattr(eqn, "source_info", None), "traceback", None)
    for frame in getattr(traceback, "frames", None) or ():
        if not any(p in frame.file_name for p in _LIBRARY_PATHS):
            return f"{frame.file_name}:{frame.line_num} ({frame.function_name})"
    return ""


class _Builder:
    def __init__(self):
        self.nodes: list[Node] = []
        self.avals: dict[int, Any] = {}
        self._next = 0

    def new_value(self, aval) -> int:
        vid = self._next
        self._next += 1
        self.avals[vid] = aval
        return vid

    def inline(self, jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list:
        env: dict[Any, Any] = {}
        for var, c in zip(jaxpr.constvars, consts):
            env[var] = Const(c)
        for var, a in zip(jaxpr.invars, args):
            env[var] = a

        def read(v):
            if isinstance(v, jcore.Literal):
                return Const(v.val)
            return env[v]

        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            sub = _subjaxpr(eqn)
            if sub is not None:
                outs = self.inline(sub.jaxpr, sub.consts, ins)
            elif all(isinstance(v, Const) for v in ins):
                vals = eqn.primitive.bind(*[v.value for v in ins],
                                          **full_precision(eqn.primitive.name, eqn.params))
                vals = vals if eqn.primitive.multiple_results else [vals]
                outs = [Const(val) for val in vals]
            else:
                outs = [self.new_value(v.aval) for v in eqn.outvars]
                self.nodes.append(
                    Node(
                        name=eqn.primitive.name,
                        primitive=eqn.primitive,
                        params=full_precision(eqn.primitive.name, dict(eqn.params)),
                        inputs=tuple(ins),
                        outputs=tuple(outs),
                        out_avals=tuple(v.aval for v in eqn.outvars),
                        in_avals=tuple(v.aval for v in eqn.invars),
                        source=_describe(eqn),
                    )
                )
            for var, o in zip(eqn.outvars, outs):
                env[var] = o
        return [read(v) for v in jaxpr.outvars]


def _subjaxpr(eqn):
    for key in _SUBJAXPR_PARAMS:
        sub = eqn.params.get(key)
        if isinstance(sub, jcore.ClosedJaxpr) and len(sub.jaxpr.invars) == len(eqn.invars):
            return sub
        if isinstance(sub, jcore.Jaxpr) and len(sub.invars) == len(eqn.invars):
            return jcore.ClosedJaxpr(sub, ())
    return None


def trace(fn: Callable, args: Sequence[Any], perturbed: Sequence[bool]) -> Graph:
    """Trace ``fn(*args)`` into a :class:`Graph` whose inputs are the perturbed args.

    ``args`` are example arrays (only their shapes and dtypes matter for the
    perturbed ones; the others are captured as constants).
    """
    flat_args = [jnp.asarray(a) for a in args]
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*flat_args)
    out_tree = jax.tree_util.tree_structure(out_shape)
    builder = _Builder()
    graph_args: list[Any] = []
    inputs = []
    for a, is_perturbed in zip(flat_args, perturbed):
        if is_perturbed:
            vid = builder.new_value(jax.ShapeDtypeStruct(a.shape, a.dtype))
            inputs.append(vid)
            graph_args.append(vid)
        else:
            graph_args.append(Const(a))
    if len(closed.jaxpr.invars) != len(flat_args):
        raise DiverifyError(
            "the function to bound must take arrays as positional arguments "
            f"(got {len(flat_args)} arguments but the traced function has "
            f"{len(closed.jaxpr.invars)} array inputs)"
        )
    outs = builder.inline(closed.jaxpr, closed.consts, graph_args)
    from diverify.bounds.synthetic import recognise

    nodes, outs = recognise(tuple(builder.nodes), builder.avals, outs, builder)
    return Graph(
        nodes=nodes,
        inputs=tuple(inputs),
        input_avals=tuple(builder.avals[i] for i in inputs),
        outputs=tuple(outs),
        out_tree=out_tree,
        avals=builder.avals,
    )

