"""Flax ports of diffusers' ``UNet2DModel`` and (small-config) ``UNet2DConditionModel``.

The modules mirror diffusers' PyTorch modules one to one: every submodule
carries the name of its checkpoint counterpart (``down_blocks.0.resnets.1``
becomes ``down_blocks_0/resnets_1``), so that
:func:`diverify.models.diffusers_checkpoint.flax_key_to_torch` is the whole
name mapping. Activations are NHWC inside; the public :func:`unet2d_apply` and
:func:`unet2d_condition_apply` take and return NCHW like diffusers.

Nonlinear layers are written in the elementary form the bound engine relaxes:
GroupNorm/LayerNorm as mean, centred values, mean of squares of the centred
values and ``rsqrt(var + eps)``; SiLU as ``x * sigmoid(x)``; attention with
``jax.nn.softmax``. There is no Python control flow on traced values, so every
``apply`` can be traced by :func:`jax.make_jaxpr` and jitted.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diverify.errors import DiverifyError
from diverify.models.layers import PRECISION, dense


# --------------------------------------------------------------------------- layers


def silu(x: jax.Array) -> jax.Array:
    """SiLU(x) = x * sigmoid(x), written out so the bound engine sees a product."""
    return x * jax.nn.sigmoid(x)


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> jax.Array:
    """Sinusoidal embedding of diffusers' ``get_timestep_embedding``.

    freq_j = exp(-log(10000) j / (dim/2 - freq_shift)); emb = [sin(t f), cos(t f)]
    (cos first when ``flip_sin_to_cos``), zero-padded to an odd ``dim``.
    The frequencies are rounded to float32 from float64 constants.
    """
    half = dim // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half, dtype=np.float64) / (half - freq_shift))
    arg = t.astype(jnp.float32)[:, None] * jnp.asarray(freqs, jnp.float32)[None, :]
    first, second = (jnp.cos(arg), jnp.sin(arg)) if flip_sin_to_cos else (jnp.sin(arg), jnp.cos(arg))
    emb = jnp.concatenate([first, second], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm on NHWC (or NLC) input, in the explicit bound-friendly form."""

    num_groups: int
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        grouped = x.reshape(x.shape[0], -1, self.num_groups, channels // self.num_groups)
        mean = jnp.mean(grouped, axis=(1, 3), keepdims=True)
        centred = grouped - mean
        var = jnp.mean(centred * centred, axis=(1, 3), keepdims=True)
        normed = (centred * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        return normed * scale + bias


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last axis (``affine=False`` has no parameters)."""

    eps: float
    affine: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        mean = jnp.mean(x, axis=-1, keepdims=True)
        centred = x - mean
        var = jnp.mean(centred * centred, axis=-1, keepdims=True)
        normed = centred * jax.lax.rsqrt(var + self.eps)
        if not self.affine:
            return normed
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        return normed * scale + bias


class ClassEmbedding(nn.Module):
    """nn.Embedding as ``one_hot(labels) @ table``.

    ``labels`` are integer class ids ``(B,)`` or float class weights
    ``(B, num_classes)`` (a one-hot row gives the table row exactly), so that
    sensitivity to the conditioning can be taken on a continuous input.
    """

    num_embeddings: int
    features: int

    @nn.compact
    def __call__(self, labels: jax.Array) -> jax.Array:
        table = self.param("embedding", nn.initializers.normal(1.0), (self.num_embeddings, self.features))
        if jnp.issubdtype(labels.dtype, jnp.integer):
            labels = jax.nn.one_hot(labels, self.num_embeddings, dtype=table.dtype)
        return jnp.matmul(labels, table, precision=PRECISION)


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers ``TimestepEmbedding``)."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = dense(self.features, "linear_1")(x)
        return dense(self.features, "linear_2")(silu(x))


def conv3x3(features: int, name: str, stride: int = 1, padding: Any = ((1, 1), (1, 1))) -> nn.Conv:
    return nn.Conv(features, (3, 3), strides=(stride, stride), padding=padding, precision=PRECISION, name=name)


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` with ``time_embedding_norm="default"``.

    out = (shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + W silu(temb))))) / output_scale_factor
    """

    out_channels: int
    groups: int
    eps: float
    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        h = silu(GroupNorm(self.groups, self.eps, name="norm1")(x))
        h = conv3x3(self.out_channels, "conv1")(h)
        h = h + dense(self.out_channels, "time_emb_proj")(silu(temb))[:, None, None, :]
        h = silu(GroupNorm(self.groups, self.eps, name="norm2")(h))
        h = conv3x3(self.out_channels, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), padding="VALID", precision=PRECISION, name="conv_shortcut")(x)
        return (x + h) / self.output_scale_factor


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v per head; q ``(B, N, heads*d)``, k/v ``(B, M, heads*d)``."""
    b, n, inner = q.shape
    d = inner // heads
    q = q.reshape(b, n, heads, d)
    k = k.reshape(b, k.shape[1], heads, d)
    v = v.reshape(b, v.shape[1], heads, d)
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k, precision=PRECISION) * (d ** -0.5)
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhnm,bmhd->bnhd", weights, v, precision=PRECISION).reshape(b, n, inner)


class Attention(nn.Module):
    """diffusers ``Attention`` (q/k/v projections, heads, ``to_out.0``).

    With ``norm_groups`` it is the spatial self-attention of ``AttnDownBlock2D``:
    GroupNorm first, residual added and divided by ``rescale_output_factor``.
    """

    heads: int
    head_dim: int
    qkv_bias: bool = True
    norm_groups: int | None = None
    eps: float = 1e-5
    residual: bool = False
    rescale_output_factor: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        spatial_shape = x.shape
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        residual = x
        if self.norm_groups is not None:
            x = GroupNorm(self.norm_groups, self.eps, name="group_norm")(x)
        context = x if context is None else context
        inner = self.heads * self.head_dim
        q = dense(inner, "to_q", use_bias=self.qkv_bias)(x)
        k = dense(inner, "to_k", use_bias=self.qkv_bias)(context)
        v = dense(inner, "to_v", use_bias=self.qkv_bias)(context)
        attended = multi_head_attention(q, k, v, self.heads)
        out = dense(residual.shape[-1], "to_out_0")(attended)
        if self.residual:
            out = out + residual
        return (out / self.rescale_output_factor).reshape(spatial_shape[:-1] + (out.shape[-1],))


class FeedForward(nn.Module):
    """diffusers ``FeedForward``: ``net.0`` (GEGLU or GELU projection) then ``net.2``."""

    dim: int
    activation: str
    mult: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inner = self.dim * self.mult
        if self.activation == "geglu":
            hidden, gate = jnp.split(ProjModule(2 * inner, name="net_0")(x), 2, axis=-1)
            h = hidden * jax.nn.gelu(gate, approximate=False)
        else:
            h = ProjModule(inner, name="net_0")(x)
            h = jax.nn.gelu(h, approximate=self.activation == "gelu-approximate")
        return dense(self.dim, "net_2")(h)


class ProjModule(nn.Module):
    """The ``proj`` linear inside diffusers' GELU/GEGLU activation modules."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return dense(self.features, "proj")(x)


class BasicTransformerBlock(nn.Module):
    """diffusers ``BasicTransformerBlock`` with ``norm_type="layer_norm"``:
    self-attention, cross-attention on the encoder states, GEGLU feed-forward,
    each pre-normed and residual."""

    dim: int
    heads: int
    head_dim: int
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        x = x + Attention(self.heads, self.head_dim, qkv_bias=False, name="attn1")(
            LayerNorm(self.eps, name="norm1")(x))
        x = x + Attention(self.heads, self.head_dim, qkv_bias=False, name="attn2")(
            LayerNorm(self.eps, name="norm2")(x), context)
        return x + FeedForward(self.dim, "geglu", name="ff")(LayerNorm(self.eps, name="norm3")(x))


class Transformer2DModel(nn.Module):
    """diffusers ``Transformer2DModel`` on continuous NHWC input (cross-attention blocks)."""

    heads: int
    groups: int
    num_layers: int
    use_linear_projection: bool

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = GroupNorm(self.groups, 1e-6, name="norm")(x)
        if self.use_linear_projection:
            h = dense(c, "proj_in")(h.reshape(b, hgt * wid, c))
        else:
            h = nn.Conv(c, (1, 1), padding="VALID", precision=PRECISION, name="proj_in")(h).reshape(b, hgt * wid, c)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(c, self.heads, c // self.heads, name=f"transformer_blocks_{i}")(h, context)
        if self.use_linear_projection:
            h = dense(c, "proj_out")(h).reshape(b, hgt, wid, c)
        else:
            h = nn.Conv(c, (1, 1), padding="VALID", precision=PRECISION, name="proj_out")(h.reshape(b, hgt, wid, c))
        return h + x


class Downsample2D(nn.Module):
    """Stride-2 3x3 convolution; ``padding=0`` pads right/bottom by one as diffusers does."""

    channels: int
    padding: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = ((0, 1), (0, 1)) if self.padding == 0 else ((self.padding,) * 2,) * 2
        return conv3x3(self.channels, "conv", stride=2, padding=pad)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling then a 3x3 convolution."""

    channels: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv3x3(self.channels, "conv")(x)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """What one down/up/mid block contains; built from the config, never from data."""

    out_channels: int
    num_layers: int
    attention: str | None  # None, "self" (AttnDownBlock2D) or "cross" (CrossAttn*Block2D)
    resample: bool
    heads: int = 1
    groups: int = 32
    eps: float = 1e-5
    downsample_padding: int = 1
    transformer_layers: int = 1
    use_linear_projection: bool = False
    output_scale_factor: float = 1.0
    attn_groups: int | None = None  # GroupNorm groups of the self-attention, if not ``groups``


class DownBlock(nn.Module):
    """``DownBlock2D`` / ``AttnDownBlock2D`` / ``CrossAttnDownBlock2D``; returns (h, skip states)."""

    spec: BlockSpec

    @nn.compact
    def __call__(self, h, temb, context):
        s = self.spec
        skips = []
        for i in range(s.num_layers):
            h = ResnetBlock2D(s.out_channels, s.groups, s.eps, name=f"resnets_{i}")(h, temb)
            h = _attend(s, h, context, f"attentions_{i}")
            skips.append(h)
        if s.resample:
            h = Downsample2D(s.out_channels, s.downsample_padding, name="downsamplers_0")(h)
            skips.append(h)
        return h, skips


class UpBlock(nn.Module):
    """``UpBlock2D`` / ``AttnUpBlock2D`` / ``CrossAttnUpBlock2D``; consumes skip states last first."""

    spec: BlockSpec

    @nn.compact
    def __call__(self, h, skips, temb, context):
        s = self.spec
        for i in range(s.num_layers):
            h = jnp.concatenate([h, skips[-1 - i]], axis=-1)
            h = ResnetBlock2D(s.out_channels, s.groups, s.eps, name=f"resnets_{i}")(h, temb)
            h = _attend(s, h, context, f"attentions_{i}")
        if s.resample:
            h = Upsample2D(s.out_channels, name="upsamplers_0")(h)
        return h


class MidBlock(nn.Module):
    """``UNetMidBlock2D`` (optional self-attention) / ``UNetMidBlock2DCrossAttn``: resnet, (attn, resnet) x1."""

    spec: BlockSpec

    @nn.compact
    def __call__(self, h, temb, context):
        s = self.spec
        h = ResnetBlock2D(s.out_channels, s.groups, s.eps, s.output_scale_factor, name="resnets_0")(h, temb)
        h = _attend(s, h, context, "attentions_0")
        return ResnetBlock2D(s.out_channels, s.groups, s.eps, s.output_scale_factor, name="resnets_1")(h, temb)


def _attend(s: BlockSpec, h: jax.Array, context: jax.Array | None, name: str) -> jax.Array:
    if s.attention == "self":
        return Attention(s.heads, s.out_channels // s.heads, norm_groups=s.attn_groups or s.groups, eps=s.eps,
                         residual=True,
                         rescale_output_factor=s.output_scale_factor, name=name)(h)
    if s.attention == "cross":
        return Transformer2DModel(s.heads, s.groups, s.transformer_layers, s.use_linear_projection, name=name)(
            h, context)
    return h


# --------------------------------------------------------------------------- configs


def _require(config: Mapping[str, Any], key: str, allowed: Sequence[Any], class_name: str) -> None:
    value = config.get(key, allowed[0])
    if value not in allowed:
        raise DiverifyError(f"{class_name} option {key}={value!r} is not supported (supported: "
                            f"{', '.join(repr(a) for a in allowed)})")


def _per_block(value: Any, n: int, key: str, class_name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise DiverifyError(f"{class_name} option {key} has {len(value)} entries for {n} blocks")
        return tuple(value)
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The parts of a diffusers UNet config that fix the computation.

    ``cross_attention_dim`` is None for ``UNet2DModel``; ``attention_heads`` has
    one entry per down block (the mid block uses the last).
    """

    class_name: str
    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    mid_block: str | None
    layers_per_block: int
    norm_num_groups: int
    norm_eps: float
    attention_heads: tuple[int, ...]
    mid_attention_heads: int
    mid_attn_groups: int
    mid_add_attention: bool
    mid_block_scale_factor: float
    flip_sin_to_cos: bool
    freq_shift: float
    time_embed_dim: int
    num_class_embeds: int | None
    center_input_sample: bool
    downsample_padding: int
    cross_attention_dim: int | None = None
    transformer_layers_per_block: int = 1
    use_linear_projection: bool = False
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3


UNET2D_DOWN = ("DownBlock2D", "AttnDownBlock2D")
UNET2D_UP = ("UpBlock2D", "AttnUpBlock2D")
COND_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D")
COND_UP = ("UpBlock2D", "CrossAttnUpBlock2D")


def _check_blocks(config: Mapping[str, Any], class_name: str, down_ok, up_ok) -> tuple[tuple, tuple, tuple]:
    down = tuple(config.get("down_block_types", ()))
    up = tuple(config.get("up_block_types", ()))
    channels = tuple(config.get("block_out_channels", ()))
    for kind, types, ok in (("down", down, down_ok), ("up", up, up_ok)):
        for t in types:
            if t not in ok:
                raise DiverifyError(f"{class_name} {kind} block type {t!r} is not supported "
                                    f"(supported: {', '.join(ok)})")
    if not channels or len(down) != len(channels) or len(up) != len(channels):
        raise DiverifyError(f"{class_name} config needs as many down_block_types and up_block_types as "
                            f"block_out_channels (got {len(down)}, {len(up)}, {len(channels)})")
    _require(config, "act_fn", ("silu", "swish"), class_name)
    _require(config, "resnet_time_scale_shift", ("default",), class_name)
    _require(config, "time_embedding_type", ("positional",), class_name)
    _require(config, "class_embed_type", (None,), class_name)
    layers = config.get("layers_per_block", 2)
    if not isinstance(layers, int):
        raise DiverifyError(f"{class_name} option layers_per_block={layers!r} is not supported (one int only)")
    groups = config.get("norm_num_groups", 32)
    if not isinstance(groups, int) or any(c % groups for c in channels):
        raise DiverifyError(f"{class_name} option norm_num_groups={groups!r} must divide every block_out_channels")
    return down, up, channels


def unet2d_config(config: Mapping[str, Any]) -> UNetConfig:
    """Validate a diffusers ``UNet2DModel`` config dict; unsupported options raise DiverifyError."""
    name = "UNet2DModel"
    down, up, channels = _check_blocks(config, name, UNET2D_DOWN, UNET2D_UP)
    _require(config, "mid_block_type", ("UNetMidBlock2D", None), name)
    _require(config, "downsample_type", ("conv",), name)
    _require(config, "upsample_type", ("conv",), name)
    head_dim = config.get("attention_head_dim", 8)
    with_attention = [c for c, d, u in zip(channels, down, reversed(up)) if "Attn" in d + u]
    if config.get("mid_block_type", "UNetMidBlock2D") is not None and config.get("add_attention", True):
        with_attention.append(channels[-1])
    if head_dim is not None and any(c % head_dim for c in with_attention):
        raise DiverifyError(f"{name} option attention_head_dim={head_dim!r} must divide the channels of every "
                            "attention block")
    heads = tuple(max(1, c // (head_dim or c)) for c in channels)
    groups = config.get("norm_num_groups", 32)
    return UNetConfig(
        class_name=name,
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        block_out_channels=channels,
        down_block_types=down,
        up_block_types=up,
        mid_block=None if config.get("mid_block_type", "UNetMidBlock2D") is None else "self",
        layers_per_block=config.get("layers_per_block", 2),
        norm_num_groups=groups,
        norm_eps=config.get("norm_eps", 1e-5),
        attention_heads=heads,
        mid_attention_heads=heads[-1],
        mid_attn_groups=config.get("attn_norm_num_groups") or groups,
        mid_add_attention=config.get("add_attention", True),
        mid_block_scale_factor=config.get("mid_block_scale_factor", 1.0),
        flip_sin_to_cos=config.get("flip_sin_to_cos", True),
        freq_shift=config.get("freq_shift", 0),
        time_embed_dim=config.get("time_embedding_dim") or channels[0] * 4,
        num_class_embeds=config.get("num_class_embeds"),
        center_input_sample=config.get("center_input_sample", False),
        downsample_padding=config.get("downsample_padding", 1),
    )


def unet2d_condition_config(config: Mapping[str, Any]) -> UNetConfig:
    """Validate a small diffusers ``UNet2DConditionModel`` config dict (cross-attention, no add-ons)."""
    name = "UNet2DConditionModel"
    down, up, channels = _check_blocks(config, name, COND_DOWN, COND_UP)
    _require(config, "mid_block_type", ("UNetMidBlock2DCrossAttn", None), name)
    for key in ("encoder_hid_dim", "encoder_hid_dim_type", "addition_embed_type", "time_embedding_act_fn",
                "timestep_post_act", "time_cond_proj_dim", "cross_attention_norm",
                "reverse_transformer_layers_per_block"):
        _require(config, key, (None,), name)
    for key in ("only_cross_attention", "dual_cross_attention", "class_embeddings_concat",
                "resnet_skip_time_act", "mid_block_only_cross_attention"):
        _require(config, key, (False, None) if key == "mid_block_only_cross_attention" else (False,), name)
    _require(config, "attention_type", ("default",), name)
    _require(config, "num_class_embeds", (None,), name)
    _require(config, "resnet_out_scale_factor", (1.0,), name)
    for key in ("cross_attention_dim", "transformer_layers_per_block"):
        if not isinstance(config.get(key, 1), int):
            raise DiverifyError(f"{name} option {key}={config.get(key)!r} is not supported (one int only)")
    heads_cfg = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads = _per_block(heads_cfg, len(channels), "num_attention_heads", name)
    for c, h in zip(channels, heads):
        if c % h:
            raise DiverifyError(f"{name}: {h} attention heads do not divide {c} channels")
    for key in ("conv_in_kernel", "conv_out_kernel"):
        if config.get(key, 3) % 2 != 1:
            raise DiverifyError(f"{name} option {key}={config.get(key)!r} is not supported (odd sizes only)")
    return UNetConfig(
        class_name=name,
        in_channels=config.get("in_channels", 4),
        out_channels=config.get("out_channels", 4),
        block_out_channels=channels,
        down_block_types=down,
        up_block_types=up,
        mid_block=None if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is None else "cross",
        layers_per_block=config.get("layers_per_block", 2),
        norm_num_groups=config.get("norm_num_groups", 32),
        norm_eps=config.get("norm_eps", 1e-5),
        attention_heads=heads,
        mid_attention_heads=heads[-1],
        mid_attn_groups=config.get("norm_num_groups", 32),
        mid_add_attention=True,
        mid_block_scale_factor=config.get("mid_block_scale_factor", 1.0),
        flip_sin_to_cos=config.get("flip_sin_to_cos", True),
        freq_shift=config.get("freq_shift", 0),
        time_embed_dim=config.get("time_embedding_dim") or channels[0] * 4,
        num_class_embeds=None,
        center_input_sample=config.get("center_input_sample", False),
        downsample_padding=config.get("downsample_padding", 1),
        cross_attention_dim=config.get("cross_attention_dim", 1280),
        transformer_layers_per_block=config.get("transformer_layers_per_block", 1),
        use_linear_projection=config.get("use_linear_projection", False),
        conv_in_kernel=config.get("conv_in_kernel", 3),
        conv_out_kernel=config.get("conv_out_kernel", 3),
    )


# --------------------------------------------------------------------------- the UNet


def _attention_kind(block_type: str) -> str | None:
    if block_type.startswith("CrossAttn"):
        return "cross"
    if block_type.startswith("Attn"):
        return "self"
    return None


class UNet(nn.Module):
    """UNet2DModel / UNet2DConditionModel on NHWC input; ``cond`` is class labels or encoder states."""

    config: UNetConfig

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, cond: jax.Array | None) -> jax.Array:
        cfg = self.config
        ch = cfg.block_out_channels
        n = len(ch)
        context = cond if cfg.cross_attention_dim is not None else None
        if cfg.center_input_sample:
            x = 2.0 * x - 1.0
        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        emb = TimestepEmbedding(cfg.time_embed_dim, name="time_embedding")(
            timestep_embedding(t, ch[0], cfg.flip_sin_to_cos, cfg.freq_shift))
        if cfg.num_class_embeds is not None:
            emb = emb + ClassEmbedding(cfg.num_class_embeds, cfg.time_embed_dim, name="class_embedding")(cond)
        k_in = cfg.conv_in_kernel
        h = nn.Conv(ch[0], (k_in, k_in), padding=(((k_in - 1) // 2,) * 2,) * 2, precision=PRECISION, name="conv_in")(x)
        skips = [h]
        common = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, transformer_layers=cfg.transformer_layers_per_block,
                      use_linear_projection=cfg.use_linear_projection)
        for i, block_type in enumerate(cfg.down_block_types):
            spec = BlockSpec(ch[i], cfg.layers_per_block, _attention_kind(block_type), i < n - 1,
                             heads=cfg.attention_heads[i], downsample_padding=cfg.downsample_padding, **common)
            h, block_skips = DownBlock(spec, name=f"down_blocks_{i}")(h, emb, context)
            skips += block_skips
        if cfg.mid_block is not None:
            spec = BlockSpec(ch[-1], 1, cfg.mid_block if cfg.mid_add_attention else None, False,
                             heads=cfg.mid_attention_heads, output_scale_factor=cfg.mid_block_scale_factor,
                             attn_groups=cfg.mid_attn_groups, **common)
            h = MidBlock(spec, name="mid_block")(h, emb, context)
        rev = tuple(reversed(ch))
        rev_heads = tuple(reversed(cfg.attention_heads))
        for i, block_type in enumerate(cfg.up_block_types):
            spec = BlockSpec(rev[i], cfg.layers_per_block + 1, _attention_kind(block_type), i < n - 1,
                             heads=rev_heads[i], **common)
            block_skips = skips[-(cfg.layers_per_block + 1):]
            skips = skips[:-(cfg.layers_per_block + 1)]
            h = UpBlock(spec, name=f"up_blocks_{i}")(h, block_skips, emb, context)
        h = silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out")(h))
        k_out = cfg.conv_out_kernel
        return nn.Conv(cfg.out_channels, (k_out, k_out), padding=(((k_out - 1) // 2,) * 2,) * 2,
                       precision=PRECISION, name="conv_out")(h)


def check_unet_inputs(config: UNetConfig, x_nchw: Any, cond: Any) -> None:
    """Raise DiverifyError for an input the config cannot take (checked on static shapes)."""
    shape = tuple(np.shape(x_nchw))
    if len(shape) != 4 or shape[1] != config.in_channels:
        raise DiverifyError(f"{config.class_name} input sample must be NCHW with {config.in_channels} channels, "
                            f"got shape {shape}")
    factor = 2 ** (len(config.block_out_channels) - 1)
    if shape[2] % factor or shape[3] % factor:
        raise DiverifyError(f"{config.class_name} input sample height and width must be multiples of {factor}, "
                            f"got {shape[2]}x{shape[3]}")
    if config.cross_attention_dim is not None:
        cshape = tuple(np.shape(cond)) if cond is not None else None
        if cshape is None or len(cshape) != 3 or cshape[-1] != config.cross_attention_dim:
            raise DiverifyError(f"{config.class_name} encoder hidden states must have shape (B, L, "
                                f"{config.cross_attention_dim}), got {cshape}")
    elif config.num_class_embeds is not None:
        if cond is None:
            raise DiverifyError(f"{config.class_name} is class-conditional: class labels are required")
        cshape = tuple(np.shape(cond))
        if cshape not in ((shape[0],), (shape[0], config.num_class_embeds)):
            raise DiverifyError(f"{config.class_name} class labels must have shape ({shape[0]},) or "
                                f"({shape[0]}, {config.num_class_embeds}), got {cshape}")
    elif config.num_class_embeds is None and cond is not None:
        raise DiverifyError(f"{config.class_name} has no class embedding (num_class_embeds is unset): "
                            "pass no class labels")


def unet_apply(module: UNet, params: Any, x_nchw: jax.Array, t: jax.Array, cond: jax.Array | None) -> jax.Array:
    """Model output (NCHW) of the UNet for NCHW input ``x_nchw`` at timestep(s) ``t``.

    ``cond``: class labels ``(B,)`` (or class weights ``(B, num_classes)``) for
    ``UNet2DModel`` with ``num_class_embeds``; encoder hidden states
    ``(B, L, cross_attention_dim)`` for ``UNet2DConditionModel``; else None.
    """
    check_unet_inputs(module.config, x_nchw, cond)
    x = jnp.transpose(x_nchw, (0, 2, 3, 1))
    out = module.apply({"params": params}, x, t, cond)
    return jnp.transpose(out, (0, 3, 1, 2))


def random_params(shapes: Any, seed: int) -> Any:
    """Random parameters for a tree of shapes: LeCun-normal kernels, zero biases, unit norm scales,
    standard-normal embedding tables.

    Drawn with numpy: compiling flax's jax.random initialisers costs minutes on a small CPU.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = getattr(path[-1], "key", str(path[-1]))
        shape = tuple(leaf.shape)
        if name == "kernel":
            value = rng.normal(size=shape) / math.sqrt(max(1, int(np.prod(shape[:-1]))))
        elif name == "embedding":
            value = rng.normal(size=shape)
        elif name == "scale":
            value = np.ones(shape)
        else:
            value = np.zeros(shape)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def unet_param_shapes(config: UNetConfig, sample_size: int) -> Any:
    """The parameter tree of a UNet as ShapeDtypeStructs (traced, nothing compiled)."""
    x = jnp.zeros((1, sample_size, sample_size, config.in_channels), jnp.float32)
    if config.cross_attention_dim is not None:
        cond = jnp.zeros((1, 1, config.cross_attention_dim), jnp.float32)
    elif config.num_class_embeds is not None:
        cond = jnp.zeros((1,), jnp.int32)
    else:
        cond = None
    return jax.eval_shape(UNet(config).init, jax.random.PRNGKey(0), x, jnp.zeros((1,), jnp.float32), cond)["params"]


def init_unet_params(config: UNetConfig, seed: int, sample_size: int) -> Any:
    """Random parameters (see :func:`random_params`) for a UNet at ``sample_size`` x ``sample_size``."""
    return random_params(unet_param_shapes(config, sample_size), seed)
