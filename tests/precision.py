"""Which matrix products of a traced function run below full float32 precision.

On a GPU, XLA computes a float32 ``dot_general`` or convolution whose precision
is unset (or DEFAULT / HIGH) with TF32 operands (~1e-3 relative error); the bound
engine records every product at HIGHEST, so a model evaluated below it is not the
function that was bounded, and a bound can miss its clean output.
"""

import jax

PRODUCTS = ("dot_general", "conv_general_dilated")


def _sub_jaxprs(value):
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
        if hasattr(v, "eqns"):
            yield v
        elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
            yield v.jaxpr


def low_precision_products(fn, *args) -> list[str]:
    """``primitive: precision`` of every product in ``jax.make_jaxpr(fn)(*args)`` (sub-jaxprs included)
    whose precision is not HIGHEST for both operands."""
    highest = jax.lax.Precision.HIGHEST
    found, stack = [], [jax.make_jaxpr(fn)(*args).jaxpr]
    while stack:
        for eqn in stack.pop().eqns:
            if eqn.primitive.name in PRODUCTS:
                precision = eqn.params.get("precision")
                if not (isinstance(precision, tuple) and all(p == highest for p in precision)):
                    found.append(f"{eqn.primitive.name}: {precision}")
            for value in eqn.params.values():
                stack.extend(_sub_jaxprs(value))
    return found
