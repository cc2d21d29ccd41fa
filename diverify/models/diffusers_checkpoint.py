"""Reading and writing diffusers checkpoints (``config.json`` + ``diffusion_pytorch_model.safetensors``).

A diffusers directory becomes a :class:`Denoiser`: the validated config, the
Flax parameters and two pure functions ``apply(params, x_nchw, t, cond)``
(the model output, NCHW) and ``eps(params, x_nchw, t, cond)`` (the noise
prediction: the first ``in_channels`` output channels of a learned-sigma
model). The whole PyTorch <-> Flax name mapping is :func:`flax_key_to_torch`.

Every problem with the user's files raises :class:`DiverifyError` naming the
file or tensor: missing directory/config/weights, unreadable or truncated
safetensors, unsupported ``_class_name`` or option, missing or unexpected
tensor, shape mismatch, NaN/Inf values.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from diverify.errors import DiverifyError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

#: diffusers ModuleList attributes: ``down_blocks.0`` <-> ``down_blocks_0``.
LIST_MODULES = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
                "transformer_blocks", "to_out", "net")

SUPPORTED_CLASSES = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel")

ApplyFn = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """A loaded denoiser: ``eps(params, x_nchw, t, cond)`` is what samplers call.

    ``sample_size`` is the spatial size of the config (None if unset);
    ``raw_config`` is the config.json mapping as read.
    """

    class_name: str
    config: Any
    params: Any
    apply: ApplyFn
    eps: ApplyFn
    in_channels: int
    sample_size: int | None
    raw_config: Mapping[str, Any]


def flax_key_to_torch(path: tuple[str, ...], value_ndim: int) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """The diffusers tensor name of a Flax parameter, and the map from the torch array to the Flax one.

    ``("down_blocks_0", "resnets_1", "conv1", "kernel")`` -> ``"down_blocks.0.resnets.1.conv1.weight"``;
    conv kernels are OIHW in torch and HWIO in Flax, linear weights are transposed,
    norm ``scale`` and embedding tables are stored as ``weight`` unchanged.
    """
    parts = []
    for name in path[:-1]:
        match = re.fullmatch(r"(.+)_(\d+)", name)
        if match and match.group(1) in LIST_MODULES:
            parts += [match.group(1), match.group(2)]
        else:
            parts.append(name)
    leaf = path[-1]
    if leaf == "kernel" and value_ndim == 4:
        return ".".join(parts + ["weight"]), lambda w: np.transpose(w, (2, 3, 1, 0))
    if leaf == "kernel":
        return ".".join(parts + ["weight"]), lambda w: np.transpose(w)
    if leaf in ("scale", "embedding"):
        return ".".join(parts + ["weight"]), lambda w: w
    return ".".join(parts + [leaf]), lambda w: w


def read_config(directory: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a diffusers model directory, with errors naming the file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DiverifyError(f"denoiser directory {str(directory)!r} does not exist")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise DiverifyError(f"denoiser directory {str(directory)!r} has no {CONFIG_NAME}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DiverifyError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise DiverifyError(f"{path} must hold a JSON object")
    return config


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as float32 numpy arrays, checked finite."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise DiverifyError(f"weights file {str(path)!r} does not exist")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as err:
        raise DiverifyError(f"weights file {str(path)!r} is not a readable safetensors file "
                            f"(truncated or corrupt?): {err}") from None
    out = {}
    for name, value in tensors.items():
        if not np.issubdtype(value.dtype, np.floating):
            raise DiverifyError(f"tensor {name!r} in {path.name} has dtype {value.dtype}, expected floating point")
        value = value.astype(np.float32)
        if not np.all(np.isfinite(value)):
            raise DiverifyError(f"tensor {name!r} in {path.name} contains NaN or Inf values")
        out[name] = value
    return out


def torch_state_to_flax(state: Mapping[str, np.ndarray], expected: Any, source: str) -> Any:
    """Fill the Flax parameter tree ``expected`` (arrays or ShapeDtypeStructs) from a torch state dict.

    Raises DiverifyError for a missing tensor, a shape mismatch or a tensor the
    model does not use (which would mean the config does not describe the weights).
    """
    used = set()

    def fill(path, leaf):
        names = tuple(getattr(k, "key", str(k)) for k in path)
        key, convert = flax_key_to_torch(names, len(leaf.shape))
        if key not in state:
            raise DiverifyError(f"{source} is missing tensor {key!r}")
        value = convert(state[key])
        if tuple(value.shape) != tuple(leaf.shape):
            raise DiverifyError(f"tensor {key!r} in {source} has shape {tuple(state[key].shape)}, but the config "
                                f"implies {_torch_shape(names[-1], tuple(leaf.shape))}")
        used.add(key)
        return jnp.asarray(value, jnp.float32)

    params = jax.tree_util.tree_map_with_path(fill, expected)
    unexpected = sorted(set(state) - used)
    if unexpected:
        raise DiverifyError(f"{source} has tensor {unexpected[0]!r} that the config does not use "
                            f"({len(unexpected)} unused in all)")
    return params


def _torch_shape(leaf_name: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if leaf_name == "kernel" and len(flax_shape) == 4:
        return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
    if leaf_name == "kernel":
        return flax_shape[::-1]
    return flax_shape


def flax_to_torch_state(params: Any) -> dict[str, np.ndarray]:
    """The diffusers state dict (numpy, torch layouts) of a Flax parameter tree; inverse of loading."""
    state = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = tuple(getattr(k, "key", str(k)) for k in path)
        key, _ = flax_key_to_torch(names, np.ndim(leaf))
        value = np.asarray(leaf, np.float32)
        if names[-1] == "kernel" and value.ndim == 4:
            value = np.transpose(value, (3, 2, 0, 1))
        elif names[-1] == "kernel":
            value = value.T
        state[key] = np.ascontiguousarray(value)
    return state


def save_denoiser(directory: str | Path, config: Mapping[str, Any], params: Any) -> Path:
    """Write ``config.json`` and ``diffusion_pytorch_model.safetensors`` (loadable by diffusers too)."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, sort_keys=True))
    save_file(flax_to_torch_state(params), str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


@dataclasses.dataclass(frozen=True)
class _Architecture:
    class_name: str
    config: Any
    apply: ApplyFn
    param_shapes: Callable[[], Any]
    random_params: Callable[[int], Any]
    sample_size: int


def _architecture(config: Mapping[str, Any], sample_size: int | None) -> _Architecture:
    from diverify.models import dit, unet

    class_name = config.get("_class_name")
    if class_name not in SUPPORTED_CLASSES:
        raise DiverifyError(f"_class_name {class_name!r} is not supported (supported: {', '.join(SUPPORTED_CLASSES)})")
    if class_name == "DiTTransformer2DModel":
        cfg = dit.dit_config(config)
        return _Architecture(class_name, cfg, functools.partial(dit.dit_apply, dit.DiT(cfg)),
                             functools.partial(dit.dit_param_shapes, cfg),
                             lambda seed: dit.init_dit_params(cfg, seed), cfg.sample_size)
    cfg = unet.unet2d_config(config) if class_name == "UNet2DModel" else unet.unet2d_condition_config(config)
    size = sample_size or config.get("sample_size") or 2 ** (len(cfg.block_out_channels) - 1)
    if isinstance(size, (list, tuple)):
        size = size[0]
    return _Architecture(class_name, cfg, functools.partial(unet.unet_apply, unet.UNet(cfg)),
                         functools.partial(unet.unet_param_shapes, cfg, size),
                         lambda seed: unet.init_unet_params(cfg, seed, size), size)


def _denoiser(arch: _Architecture, params: Any, raw_config: Mapping[str, Any]) -> Denoiser:
    cfg = arch.config
    if arch.class_name == "DiTTransformer2DModel" and cfg.out_channels == 2 * cfg.in_channels:
        eps = functools.partial(_first_channels, arch.apply, cfg.in_channels)
    else:
        eps = arch.apply
    return Denoiser(arch.class_name, cfg, params, arch.apply, eps, cfg.in_channels, arch.sample_size,
                    dict(raw_config))


def _first_channels(apply: ApplyFn, channels: int, params, x, t, cond):
    return apply(params, x, t, cond)[:, :channels]


def build_denoiser(config: Mapping[str, Any], params: Any | None = None, sample_size: int | None = None,
                   seed: int = 0) -> Denoiser:
    """A :class:`Denoiser` from a config mapping and either given params or random ones drawn with ``seed``."""
    arch = _architecture(config, sample_size)
    return _denoiser(arch, arch.random_params(seed) if params is None else params, config)


def load_denoiser(directory: str | Path) -> Denoiser:
    """Load a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` / ``DiTTransformer2DModel`` directory."""
    directory = Path(directory)
    config = read_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise DiverifyError(f"denoiser directory {str(directory)!r} has no {WEIGHTS_NAME}")
    arch = _architecture(config, None)
    params = torch_state_to_flax(read_safetensors(weights), arch.param_shapes(), str(weights))
    return _denoiser(arch, params, config)
