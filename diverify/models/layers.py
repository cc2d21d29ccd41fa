"""Layers shared by the text-encoder ports, written in the form the bound engine relaxes.

Every nonlinearity is spelled as the elementary JAX operations that
:mod:`diverify.bounds` recognises: LayerNorm as mean, centred values, mean of
the squared centred values and ``rsqrt(var + eps)`` (never the
``E[x^2] - E[x]^2`` form, whose relaxation is much looser and which can go
negative in float32); softmax as :func:`jax.nn.softmax`; GELU as
:func:`jax.nn.gelu`; quick GELU as ``x * sigmoid(1.702 x)``.

Matrix products run at ``Precision.HIGHEST``: on GPUs the default float32
matmul uses TF32, whose ~1e-3 relative error would break parity with the
PyTorch references and void the float32 rounding margins of the bounds.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diverify.errors import DiverifyError

#: Precision of every matrix product in the ports (see the module docstring).
PRECISION = jax.lax.Precision.HIGHEST

#: Added to the attention score of a masked key. Finite (unlike ``-inf``) so
#: that interval bounds of masked scores stay finite; ``exp(-1e9)`` is 0 in float32.
MASK_NEG = -1e9


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """``(x - mean(x)) / sqrt(var(x) + eps) * scale + bias`` over the last axis (biased variance)."""
    mu = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mu
    var = jnp.mean(xc * xc, axis=-1, keepdims=True)
    return xc * jax.lax.rsqrt(var + eps) * scale + bias


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with parameters ``scale`` (torch ``weight``) and ``bias``."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (dim,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (dim,), jnp.float32)
        return layer_norm(x, scale, bias, self.eps)


def dense(features: int, name: str, use_bias: bool = True) -> nn.Dense:
    """A float32 :class:`flax.linen.Dense` at :data:`PRECISION` (kernel ``[in, out]``: torch ``weight.T``)."""
    return nn.Dense(features, use_bias=use_bias, precision=PRECISION, param_dtype=jnp.float32, name=name)


def gelu_exact(x: jax.Array) -> jax.Array:
    """GELU with the exact erf: ``x * Phi(x)`` (transformers' ``gelu``)."""
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU's tanh approximation (transformers' ``gelu_new`` and ``gelu_pytorch_tanh``)."""
    return jax.nn.gelu(x, approximate=True)


def quick_gelu(x: jax.Array) -> jax.Array:
    """``x * sigmoid(1.702 x)``, the activation of OpenAI's CLIP (transformers' ``quick_gelu``)."""
    return x * jax.nn.sigmoid(1.702 * x)


#: ``hidden_act`` values of a transformers config and the activation they name.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu_exact,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation called ``name`` in a config's ``hidden_act``; DiverifyError if unsupported."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise DiverifyError(f"config.json: hidden_act {name!r} is not supported "
                            f"(supported: {', '.join(sorted(ACTIVATIONS))})")
    return ACTIVATIONS[name]


def attention_bias(mask) -> jax.Array | np.ndarray:
    """Additive key mask ``[B, 1, 1, L]``: 0 where ``mask`` is nonzero, :data:`MASK_NEG` elsewhere.

    A concrete (numpy) mask gives a numpy constant, so the traced graph holds
    the bias as a literal rather than operations on an input.
    """
    xp = np if isinstance(mask, np.ndarray) else jnp
    bias = xp.where(mask != 0, 0.0, MASK_NEG).astype(xp.float32)
    return bias[:, None, None, :]


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int, bias) -> jax.Array:
    """Scaled dot-product attention ``softmax(q k^T / sqrt(d) + bias) v`` with ``num_heads`` heads.

    ``q, k, v``: ``[B, L, H]``; ``bias``: broadcastable to ``[B, heads, L, L]``. Returns ``[B, L, H]``.
    """
    b, length, hidden = q.shape
    head_dim = hidden // num_heads
    split = lambda t: t.reshape(b, length, num_heads, head_dim)
    scores = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k), precision=PRECISION) * (head_dim ** -0.5)
    probs = jax.nn.softmax(scores + bias, axis=-1)
    context = jnp.einsum("bhqk,bkhd->bqhd", probs, split(v), precision=PRECISION)
    return context.reshape(b, length, hidden)
