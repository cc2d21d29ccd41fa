"""Flax port of diffusers' ``DiTTransformer2DModel`` (Peebles & Xie, "Scalable Diffusion Models with Transformers").

Patchify (a p x p stride-p convolution plus fixed 2-D sin-cos positions), a
stack of transformer blocks modulated by AdaLayerNormZero on the timestep +
class-label embedding, the modulated final layer and unpatchify. Names mirror
the checkpoint (``transformer_blocks.0.norm1.emb.class_embedder.embedding_table``)
so that :func:`diverify.models.diffusers_checkpoint.flax_key_to_torch` maps them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diverify.errors import DiverifyError
from diverify.models.layers import PRECISION, dense
from diverify.models.unet import (Attention, ClassEmbedding, FeedForward, LayerNorm, TimestepEmbedding, random_params,
                                  silu, timestep_embedding)


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """The parts of a ``DiTTransformer2DModel`` config that fix the computation."""

    num_attention_heads: int
    attention_head_dim: int
    in_channels: int
    out_channels: int
    num_layers: int
    attention_bias: bool
    sample_size: int
    patch_size: int
    activation_fn: str
    num_embeds_ada_norm: int
    norm_elementwise_affine: bool
    norm_eps: float

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


def dit_config(config: Mapping[str, Any]) -> DiTConfig:
    """Validate a diffusers ``DiTTransformer2DModel`` config dict; unsupported options raise DiverifyError."""
    name = "DiTTransformer2DModel"
    if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise DiverifyError(f"{name} option norm_type={config.get('norm_type')!r} is not supported "
                            "(supported: 'ada_norm_zero')")
    activation = config.get("activation_fn", "gelu-approximate")
    if activation not in ("gelu-approximate", "gelu"):
        raise DiverifyError(f"{name} option activation_fn={activation!r} is not supported "
                            "(supported: 'gelu-approximate', 'gelu')")
    if config.get("num_embeds_ada_norm", 1000) is None:
        raise DiverifyError(f"{name} needs num_embeds_ada_norm (the number of classes)")
    size, patch = config.get("sample_size", 32), config.get("patch_size", 2)
    if not isinstance(size, int) or not isinstance(patch, int) or size % patch:
        raise DiverifyError(f"{name}: patch_size={patch!r} must divide sample_size={size!r}")
    in_channels = config.get("in_channels", 4)
    return DiTConfig(
        num_attention_heads=config.get("num_attention_heads", 16),
        attention_head_dim=config.get("attention_head_dim", 72),
        in_channels=in_channels,
        out_channels=config.get("out_channels") or in_channels,
        num_layers=config.get("num_layers", 28),
        attention_bias=config.get("attention_bias", True),
        sample_size=size,
        patch_size=patch,
        activation_fn=activation,
        num_embeds_ada_norm=config.get("num_embeds_ada_norm", 1000),
        norm_elementwise_affine=config.get("norm_elementwise_affine", False),
        norm_eps=config.get("norm_eps", 1e-5),
    )


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """diffusers' fixed 2-D sin-cos position table ``(grid*grid, dim)`` in float64.

    Token (i, j) gets [sin/cos(j * omega), sin/cos(i * omega)] with
    omega_k = 10000^(-k / (dim/4)), k < dim/4 (the column coordinate first, as diffusers).
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    ii, jj = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def one_d(pos):
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(jj), one_d(ii)], axis=1)


class CombinedTimestepLabelEmbeddings(nn.Module):
    """TimestepEmbedding(sinusoid_256(t)) + class table row (table has a spare classifier-free row)."""

    num_classes: int
    dim: int

    @nn.compact
    def __call__(self, t: jax.Array, labels: jax.Array) -> jax.Array:
        t_emb = TimestepEmbedding(self.dim, name="timestep_embedder")(timestep_embedding(t, 256, True, 1))
        return t_emb + LabelEmbedding(self.num_classes + 1, self.dim, name="class_embedder")(labels)


class LabelEmbedding(nn.Module):
    """diffusers ``LabelEmbedding`` (its table is ``embedding_table``)."""

    num_embeddings: int
    dim: int

    @nn.compact
    def __call__(self, labels: jax.Array) -> jax.Array:
        return ClassEmbedding(self.num_embeddings, self.dim, name="embedding_table")(labels)


class AdaLayerNormZero(nn.Module):
    """emb -> linear(silu(emb)) split in six; returns the modulated LayerNorm and the five others."""

    config: DiTConfig

    @nn.compact
    def __call__(self, x, t, labels):
        d = self.config.inner_dim
        emb = CombinedTimestepLabelEmbeddings(self.config.num_embeds_ada_norm, d, name="emb")(t, labels)
        mod = dense(6 * d, "linear")(silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        normed = LayerNorm(1e-6, affine=False)(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        return normed, emb, (gate_msa, shift_mlp, scale_mlp, gate_mlp)


class DiTBlock(nn.Module):
    """``BasicTransformerBlock`` with ``norm_type="ada_norm_zero"``; also returns its conditioning vector."""

    config: DiTConfig

    @nn.compact
    def __call__(self, x, t, labels):
        cfg = self.config
        normed, emb, (gate_msa, shift_mlp, scale_mlp, gate_mlp) = AdaLayerNormZero(cfg, name="norm1")(x, t, labels)
        attn = Attention(cfg.num_attention_heads, cfg.attention_head_dim, qkv_bias=cfg.attention_bias,
                         name="attn1")(normed)
        x = x + gate_msa[:, None] * attn
        normed = LayerNorm(cfg.norm_eps, affine=cfg.norm_elementwise_affine, name="norm3")(x)
        normed = normed * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp[:, None] * FeedForward(cfg.inner_dim, cfg.activation_fn, name="ff")(normed), emb


class PatchEmbed(nn.Module):
    """p x p stride-p convolution to tokens (row-major) plus the fixed sin-cos positions (not in the checkpoint)."""

    config: DiTConfig

    @nn.compact
    def __call__(self, x_nhwc):
        cfg = self.config
        p = cfg.patch_size
        h = nn.Conv(cfg.inner_dim, (p, p), strides=(p, p), padding="VALID", precision=PRECISION, name="proj")(x_nhwc)
        b, gh, gw, d = h.shape
        pos = sincos_pos_embed_2d(d, gh).astype(np.float32)
        return h.reshape(b, gh * gw, d) + jnp.asarray(pos)[None]


class DiT(nn.Module):
    """DiTTransformer2DModel on NHWC input; returns NHWC output with ``out_channels`` channels."""

    config: DiTConfig

    @nn.compact
    def __call__(self, x, t, labels):
        cfg = self.config
        b, hgt, wid, _ = x.shape
        p = cfg.patch_size
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        h = PatchEmbed(cfg, name="pos_embed")(x)
        conditioning = None
        for i in range(cfg.num_layers):
            h, emb = DiTBlock(cfg, name=f"transformer_blocks_{i}")(h, t, labels)
            conditioning = emb if i == 0 else conditioning
        modulation = dense(2 * cfg.inner_dim, "proj_out_1")(silu(conditioning))
        shift, scale = jnp.split(modulation, 2, axis=-1)
        h = LayerNorm(1e-6, affine=False)(h) * (1 + scale[:, None]) + shift[:, None]
        h = dense(p * p * cfg.out_channels, "proj_out_2")(h)
        gh, gw = hgt // p, wid // p
        h = h.reshape(b, gh, gw, p, p, cfg.out_channels)
        return jnp.transpose(h, (0, 1, 3, 2, 4, 5)).reshape(b, gh * p, gw * p, cfg.out_channels)


def dit_apply(module: DiT, params: Any, x_nchw: jax.Array, t: jax.Array, labels: jax.Array) -> jax.Array:
    """Model output (NCHW, ``out_channels``) for NCHW latents at timestep(s) ``t`` and class ``labels``.

    ``labels``: integer ids ``(B,)`` or float class weights ``(B, num_classes + 1)``.
    """
    cfg = module.config
    shape = tuple(np.shape(x_nchw))
    if len(shape) != 4 or shape[1] != cfg.in_channels or shape[2] != cfg.sample_size or shape[3] != cfg.sample_size:
        raise DiverifyError(f"DiTTransformer2DModel input must have shape (B, {cfg.in_channels}, {cfg.sample_size}, "
                            f"{cfg.sample_size}), got {shape}")
    if labels is None:
        raise DiverifyError("DiTTransformer2DModel is class-conditional: class labels are required")
    out = module.apply({"params": params}, jnp.transpose(x_nchw, (0, 2, 3, 1)), t, labels)
    return jnp.transpose(out, (0, 3, 1, 2))


def dit_param_shapes(config: DiTConfig, sample_size: int | None = None) -> Any:
    """The parameter tree of a DiT as ShapeDtypeStructs (traced, nothing compiled)."""
    x = jnp.zeros((1, config.sample_size, config.sample_size, config.in_channels), jnp.float32)
    return jax.eval_shape(DiT(config).init, jax.random.PRNGKey(0), x, jnp.zeros((1,), jnp.float32),
                          jnp.zeros((1,), jnp.int32))["params"]


def init_dit_params(config: DiTConfig, seed: int, sample_size: int | None = None) -> Any:
    """Random parameters (see :func:`diverify.models.unet.random_params`) for a DiT of this config."""
    return random_params(dit_param_shapes(config), seed)
