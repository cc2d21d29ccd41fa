"""Flax port of transformers' CLIP text encoder (``CLIPTextModel``, ``...WithProjection``, ``CLIPModel``'s text tower).

Per layer (Radford et al., 2021; pre-LN)::

    a = x + Dense_o(MHA(LN_1 x; causal and padding mask))
    y = a + fc2(act(fc1(LN_2 a)))

after ``token + position`` embeddings, followed by ``final_layer_norm``. The
pooled output is the final hidden state at the EOS token, optionally times
``text_projection`` (no bias). Submodules carry the checkpoint's names
(``text_model.encoder.layers.3.self_attn.q_proj`` is
``params['text_model']['encoder']['layers_3']['self_attn']['q_proj']``).

EOS position, as in transformers' ``CLIPTextModel.forward``: when the config's
``eos_token_id`` is 2 (configs written before transformers PR #24773) it is
the position of the largest token id; otherwise the first position holding
``eos_token_id``. It is applied as a one-hot contraction, which is linear in
the hidden state and exact in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diverify.errors import DiverifyError
from diverify.models.layers import (MASK_NEG, PRECISION, LayerNorm, activation, attention_bias, dense,
                                    multi_head_attention)

#: ``model_type`` values read as CLIP (``clip`` is the full model: its ``text_config`` is used).
MODEL_TYPES = ("clip_text_model", "clip")

#: ``(old, new)`` prefix rewrites of a :func:`~diverify.models.checkpoint.torch_key` tried in order:
#: the Flax tree always has ``text_model``, but ``CLIPTextModel`` written by transformers >= 5
#: stores its tensors without that prefix (older ones and the projection/full models keep it).
CHECKPOINT_ALIASES = (("", ""), ("text_model.", ""))


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The parts of a CLIP text config that fix the computation; ``projection_dim`` is None without projection."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_act: str
    layer_norm_eps: float
    eos_token_id: int
    projection_dim: int | None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], projection_dim: int | None) -> "CLIPTextConfig":
        """Validate a CLIP text config dict (for ``CLIPModel``, its ``text_config``)."""
        try:
            config = cls(
                vocab_size=int(raw.get("vocab_size", 49408)),
                hidden_size=int(raw.get("hidden_size", 512)),
                intermediate_size=int(raw.get("intermediate_size", 2048)),
                num_hidden_layers=int(raw.get("num_hidden_layers", 12)),
                num_attention_heads=int(raw.get("num_attention_heads", 8)),
                max_position_embeddings=int(raw.get("max_position_embeddings", 77)),
                hidden_act=raw.get("hidden_act", "quick_gelu"),
                layer_norm_eps=float(raw.get("layer_norm_eps", 1e-5)),
                eos_token_id=int(raw.get("eos_token_id", 49407)),
                projection_dim=None if projection_dim is None else int(projection_dim),
            )
        except (TypeError, ValueError) as err:
            raise DiverifyError(f"config.json: bad value in a CLIP text config ({err})") from None
        activation(config.hidden_act)
        if config.hidden_size % config.num_attention_heads:
            raise DiverifyError(f"config.json: hidden_size {config.hidden_size} is not a multiple of "
                                f"num_attention_heads {config.num_attention_heads}")
        return config


def causal_bias(length: int) -> np.ndarray:
    """Additive causal mask ``[1, 1, L, L]``: query ``i`` sees keys ``j <= i``."""
    allowed = np.tril(np.ones((length, length), dtype=bool))
    return np.where(allowed, 0.0, MASK_NEG).astype(np.float32)[None, None]


def eos_one_hot(ids, eos_token_id: int):
    """One-hot ``[B, L]`` float32 of the pooled (EOS) position of each sequence, transformers' rule.

    numpy in, numpy out (a constant in the traced graph); a traced ``ids`` gives a traced one-hot.
    """
    xp = np if isinstance(ids, np.ndarray) else jnp
    ids = xp.asarray(ids).astype(xp.int32)
    position = xp.argmax(ids, axis=-1) if eos_token_id == 2 else xp.argmax(ids == eos_token_id, axis=-1)
    return (xp.arange(ids.shape[-1])[None, :] == position[:, None]).astype(xp.float32)


class CLIPAttention(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, x: jax.Array, bias) -> jax.Array:
        h = self.config.hidden_size
        q, k, v = dense(h, "q_proj")(x), dense(h, "k_proj")(x), dense(h, "v_proj")(x)
        return dense(h, "out_proj")(multi_head_attention(q, k, v, self.config.num_attention_heads, bias))


class CLIPMLP(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inner = activation(self.config.hidden_act)(dense(self.config.intermediate_size, "fc1")(x))
        return dense(self.config.hidden_size, "fc2")(inner)


class CLIPEncoderLayer(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, x: jax.Array, bias) -> jax.Array:
        eps = self.config.layer_norm_eps
        x = x + CLIPAttention(self.config, name="self_attn")(LayerNorm(eps, name="layer_norm1")(x), bias)
        return x + CLIPMLP(self.config, name="mlp")(LayerNorm(eps, name="layer_norm2")(x))


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig

    def setup(self):
        self.layers = [CLIPEncoderLayer(self.config) for _ in range(self.config.num_hidden_layers)]

    def __call__(self, x: jax.Array, bias) -> jax.Array:
        for layer in self.layers:
            x = layer(x, bias)
        return x


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig

    def setup(self):
        c = self.config
        self.token_embedding = nn.Embed(c.vocab_size, c.hidden_size, param_dtype=jnp.float32)
        self.position_embedding = nn.Embed(c.max_position_embeddings, c.hidden_size, param_dtype=jnp.float32)

    def lookup(self, ids: jax.Array) -> jax.Array:
        return self.token_embedding(ids)

    def __call__(self, word_emb: jax.Array) -> jax.Array:
        return word_emb + self.position_embedding.embedding[:word_emb.shape[1]]


class CLIPTextTransformer(nn.Module):
    config: CLIPTextConfig

    def setup(self):
        self.embeddings = CLIPTextEmbeddings(self.config)
        self.encoder = CLIPEncoder(self.config)
        self.final_layer_norm = LayerNorm(self.config.layer_norm_eps)

    def __call__(self, word_emb: jax.Array, mask) -> jax.Array:
        length = word_emb.shape[1]
        if length > self.config.max_position_embeddings:
            raise DiverifyError(f"sequence of {length} tokens is longer than the model's "
                                f"max_position_embeddings {self.config.max_position_embeddings}")
        bias = attention_bias(mask) + causal_bias(length)
        return self.final_layer_norm(self.encoder(self.embeddings(word_emb), bias))


class CLIPTextModel(nn.Module):
    """CLIP text tower (+ ``text_projection`` when ``config.projection_dim`` is set)."""

    config: CLIPTextConfig

    def setup(self):
        self.text_model = CLIPTextTransformer(self.config)
        if self.config.projection_dim is not None:
            self.text_projection = dense(self.config.projection_dim, "text_projection", use_bias=False)

    def word_embeddings(self, ids: jax.Array) -> jax.Array:
        return self.text_model.embeddings.lookup(ids)

    def __call__(self, word_emb: jax.Array, mask) -> jax.Array:
        """Last hidden state ``[B, L, H]`` (after ``final_layer_norm``) from word embeddings and the key mask."""
        return self.text_model(word_emb, mask)

    def pool(self, hidden: jax.Array, eos: jax.Array) -> jax.Array:
        """Hidden state at the EOS one-hot ``eos`` ``[B, L]``, projected when the model has a projection."""
        pooled = jnp.einsum("bl,blh->bh", eos, hidden, precision=PRECISION)
        if self.config.projection_dim is not None:
            pooled = self.text_projection(pooled)
        return pooled

    def from_ids(self, ids: jax.Array, mask) -> jax.Array:
        """Pooled output from token ids (touches every parameter, so it is what ``init`` runs)."""
        eos = eos_one_hot(ids, self.config.eos_token_id)
        return self.pool(self(self.word_embeddings(ids), mask), eos)
