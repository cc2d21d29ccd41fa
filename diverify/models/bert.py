"""Flax port of transformers' ``BertModel`` (post-LN BERT; MiniLM is one), without the pooler.

Per layer (Devlin et al., 2019)::

    a = LayerNorm(x + Dense_o(MHA(Dense_q x, Dense_k x, Dense_v x; mask)))
    y = LayerNorm(a + Dense_out(act(Dense_in a)))

after the embeddings ``LayerNorm(word + position + token_type)``. Submodules
carry the checkpoint's names (``encoder.layer.3.attention.self.query`` is
``params['encoder']['layer_3']['attention']['self']['query']``), so
:func:`diverify.models.checkpoint.torch_key` is the whole name mapping.

:meth:`BertModel.__call__` starts from the word embeddings (the rows of the
word-embedding table, before position/type embeddings and the embedding
LayerNorm): that is the input space in which prompts are perturbed and bounded.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from diverify.errors import DiverifyError
from diverify.models.layers import LayerNorm, activation, attention_bias, dense, multi_head_attention

#: ``model_type`` values read as BERT.
MODEL_TYPES = ("bert",)

#: ``(old, new)`` prefix rewrites of a :func:`~diverify.models.checkpoint.torch_key` tried in order:
#: ``BertForMaskedLM`` and other heads store the encoder under ``bert.``.
CHECKPOINT_ALIASES = (("", ""), ("", "bert."))


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The parts of a BERT ``config.json`` that fix the computation."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "BertConfig":
        """Validate a transformers BERT config dict; DiverifyError names the offending field."""
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise DiverifyError(f"config.json: position_embedding_type {raw['position_embedding_type']!r} "
                                "is not supported (only 'absolute')")
        if raw.get("is_decoder") or raw.get("add_cross_attention"):
            raise DiverifyError("config.json: decoder BERT (is_decoder / add_cross_attention) is not supported")
        try:
            config = cls(
                vocab_size=int(raw["vocab_size"]),
                hidden_size=int(raw["hidden_size"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=int(raw["num_attention_heads"]),
                intermediate_size=int(raw["intermediate_size"]),
                hidden_act=raw.get("hidden_act", "gelu"),
                max_position_embeddings=int(raw.get("max_position_embeddings", 512)),
                type_vocab_size=int(raw.get("type_vocab_size", 2)),
                layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
            )
        except KeyError as err:
            raise DiverifyError(f"config.json: missing field {err.args[0]!r} for a BERT model") from None
        except (TypeError, ValueError) as err:
            raise DiverifyError(f"config.json: bad value in a BERT config ({err})") from None
        activation(config.hidden_act)
        if config.hidden_size % config.num_attention_heads:
            raise DiverifyError(f"config.json: hidden_size {config.hidden_size} is not a multiple of "
                                f"num_attention_heads {config.num_attention_heads}")
        return config


class BertEmbeddings(nn.Module):
    config: BertConfig

    def setup(self):
        c = self.config
        self.word_embeddings = nn.Embed(c.vocab_size, c.hidden_size, param_dtype=jnp.float32)
        self.position_embeddings = nn.Embed(c.max_position_embeddings, c.hidden_size, param_dtype=jnp.float32)
        self.token_type_embeddings = nn.Embed(c.type_vocab_size, c.hidden_size, param_dtype=jnp.float32)
        self.LayerNorm = LayerNorm(c.layer_norm_eps)

    def lookup(self, ids: jax.Array) -> jax.Array:
        """Rows of the word-embedding table: ``[B, L] -> [B, L, H]``."""
        return self.word_embeddings(ids)

    def __call__(self, word_emb: jax.Array, token_type_ids: jax.Array | None = None) -> jax.Array:
        length = word_emb.shape[1]
        positions = self.position_embeddings.embedding[:length]
        if token_type_ids is None:
            token_types = self.token_type_embeddings.embedding[0]
        else:
            token_types = self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(word_emb + positions + token_types)


class BertSelfAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, bias) -> jax.Array:
        h = self.config.hidden_size
        q, k, v = dense(h, "query")(x), dense(h, "key")(x), dense(h, "value")(x)
        return multi_head_attention(q, k, v, self.config.num_attention_heads, bias)


class BertSelfOutput(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, context: jax.Array, residual: jax.Array) -> jax.Array:
        return LayerNorm(self.config.layer_norm_eps, name="LayerNorm")(
            dense(self.config.hidden_size, "dense")(context) + residual)


class BertAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, bias) -> jax.Array:
        context = BertSelfAttention(self.config, name="self")(x, bias)
        return BertSelfOutput(self.config, name="output")(context, x)


class BertIntermediate(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return activation(self.config.hidden_act)(dense(self.config.intermediate_size, "dense")(x))


class BertLayer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, bias) -> jax.Array:
        a = BertAttention(self.config, name="attention")(x, bias)
        inner = BertIntermediate(self.config, name="intermediate")(a)
        return BertSelfOutput(self.config, name="output")(inner, a)


class BertEncoder(nn.Module):
    config: BertConfig

    def setup(self):
        self.layer = [BertLayer(self.config) for _ in range(self.config.num_hidden_layers)]

    def __call__(self, x: jax.Array, bias) -> jax.Array:
        for layer in self.layer:
            x = layer(x, bias)
        return x


class BertModel(nn.Module):
    """``BertModel`` without the pooler; ``__call__`` maps word embeddings to the last hidden state."""

    config: BertConfig

    def setup(self):
        self.embeddings = BertEmbeddings(self.config)
        self.encoder = BertEncoder(self.config)

    def word_embeddings(self, ids: jax.Array) -> jax.Array:
        return self.embeddings.lookup(ids)

    def __call__(self, word_emb: jax.Array, mask, token_type_ids: jax.Array | None = None) -> jax.Array:
        """Last hidden state ``[B, L, H]`` from word embeddings ``[B, L, H]`` and the 0/1 key mask ``[B, L]``."""
        if word_emb.shape[1] > self.config.max_position_embeddings:
            raise DiverifyError(f"sequence of {word_emb.shape[1]} tokens is longer than the model's "
                                f"max_position_embeddings {self.config.max_position_embeddings}")
        return self.encoder(self.embeddings(word_emb, token_type_ids), attention_bias(mask))

    def from_ids(self, ids: jax.Array, mask) -> jax.Array:
        """Last hidden state from token ids (touches every parameter, so it is what ``init`` runs)."""
        return self(self.word_embeddings(ids), mask)
