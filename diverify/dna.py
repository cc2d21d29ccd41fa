"""Model DNA: a provenance fingerprint of a checkpoint, and lineage comparison.

A :class:`Fingerprint` has three parts:

- ``content_hash``: sha256 over the tensors in sorted-name order, each fed as
  ``name, dtype, shape, byte length, raw little-endian bytes``. It does not
  depend on how the checkpoint is sharded or ordered on disk, and any changed
  byte changes it. Tensors are streamed from the safetensors files in chunks,
  so the model is never loaded whole.
- ``structure_hash`` (names, dtypes, shapes only) and an ``architecture``
  summary from ``config.json``.
- a compact signature per 2-D floating matrix W (``[out, in]``): its top-k
  singular values, and a seeded bilinear sketch ``S = G_out^T W G_in / sqrt(out in)``
  with Gaussian ``G_out`` [out, k], ``G_in`` [in, k] drawn from a generator
  seeded by the shape alone, so every model of that shape uses the same ``G``.

Why the sketch: singular values are invariant to everything but the spectrum,
and two independent random initialisations of the same architecture have
nearly equal spectra (their top singular values concentrate at the
Marchenko-Pastur edge), so spectra alone cannot tell them apart. The sketch
is linear in W: a fine-tune ``W + dW`` moves it by ``G^T dW G``, about
``||dW||_F / ||W||_F`` relative to its size, while an unrelated W' of the same
scale moves it by about ``sqrt(2)`` relative.

:func:`compare` says ``identical`` when the content hashes agree,
``unrelated`` when the structures differ or ``distance`` (root mean square
over matrices of ``||S_a - S_b||_F / ||S_a||_F``) exceeds
``LINEAGE_DISTANCE = 0.5``, and ``lineage`` otherwise. The threshold sits
between fine-tunes (a few percent of relative change) and independent draws
(about 1.41); a model re-trained until half its weight norm changed is no
longer called the same lineage. Limitation: the sketch is not invariant to a
permutation of hidden units, so a deliberately permuted copy is "unrelated".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from diverify.audit.spectral import randomized_svd
from diverify.safetensors_io import Checkpoint, iter_tensor_bytes, open_checkpoint
from diverify.errors import DiverifyError

#: Above this RMS relative sketch distance two models are not the same lineage.
LINEAGE_DISTANCE = 0.5
#: Singular values and sketch size kept per matrix.
SIGNATURE_RANK = 8
#: Seed of the sketch's Gaussian matrices (combined with each matrix's shape).
SKETCH_SEED = 20240601

ARCHITECTURE_KEYS = ("model_type", "architectures", "hidden_size", "num_hidden_layers",
                     "num_attention_heads", "intermediate_size", "vocab_size", "hidden_act",
                     "max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class MatrixSignature:
    """Top singular values (descending) and the k x k bilinear sketch (row-major) of one matrix."""

    singular_values: tuple[float, ...]
    sketch: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """A checkpoint's provenance fingerprint; see the module docstring."""

    content_hash: str
    structure_hash: str
    architecture: Mapping[str, Any]
    n_tensors: int
    n_parameters: int
    signature_rank: int
    signatures: Mapping[str, MatrixSignature]


@dataclasses.dataclass(frozen=True)
class DnaComparison:
    """``verdict`` (identical / lineage / unrelated), sketch ``distance``, and the spectra's distance."""

    verdict: str
    distance: float
    spectral_distance: float
    content_hash_a: str
    content_hash_b: str


def resolve_model_dir(model: str) -> str:
    """A checkpoint path, or ``minilm`` for the all-MiniLM-L6-v2 weights shipped with the package."""
    from diverify.models.encoder import MINILM_NAMES, resolve_model

    if model.lower() in MINILM_NAMES:
        return str(resolve_model(model)[1])
    if not os.path.exists(model):
        raise DiverifyError(f"model {model}: no such checkpoint directory or file")
    return model


def content_hash(checkpoint: Checkpoint) -> str:
    """sha256 over ``name, dtype, shape, length, bytes`` of every tensor in sorted-name order."""
    digest = hashlib.sha256()
    for name in sorted(checkpoint.tensors):
        info = checkpoint.tensors[name]
        digest.update(_tensor_header(name, info.dtype, info.shape, info.nbytes))
        for block in iter_tensor_bytes(info):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def structure_hash(checkpoint: Checkpoint) -> str:
    """sha256 over names, dtypes and shapes only."""
    digest = hashlib.sha256()
    for name in sorted(checkpoint.tensors):
        info = checkpoint.tensors[name]
        digest.update(_tensor_header(name, info.dtype, info.shape, info.nbytes))
    return "sha256:" + digest.hexdigest()


def _tensor_header(name: str, dtype: str, shape: tuple[int, ...], nbytes: int) -> bytes:
    return (json.dumps([name, dtype, list(shape)]).encode("utf-8") + b"\0"
            + int(nbytes).to_bytes(8, "little"))


def _sketch_matrices(shape: tuple[int, int], k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([SKETCH_SEED, shape[0], shape[1], k])
    return rng.standard_normal((shape[0], k)), rng.standard_normal((shape[1], k))


def matrix_signature(matrix: np.ndarray, k: int = SIGNATURE_RANK) -> MatrixSignature:
    """Top-``k`` singular values and the seeded ``k x k`` sketch of one matrix."""
    values = randomized_svd(matrix.astype(np.float32), min(k, *matrix.shape)).s
    g_out, g_in = _sketch_matrices(matrix.shape, k)
    sketch = (g_out.T @ matrix.astype(np.float64) @ g_in) / math.sqrt(matrix.shape[0] * matrix.shape[1])
    return MatrixSignature(tuple(float(v) for v in values), tuple(float(v) for v in sketch.ravel()))


def fingerprint(model: str | os.PathLike, k: int = SIGNATURE_RANK) -> Fingerprint:
    """The fingerprint of a checkpoint directory or ``.safetensors`` file (or ``minilm``)."""
    checkpoint = open_checkpoint(resolve_model_dir(str(model)))
    signatures = {}
    for name in sorted(checkpoint.tensors):
        info = checkpoint.tensors[name]
        if len(info.shape) == 2 and info.is_float and min(info.shape) > 0:
            signatures[name] = matrix_signature(checkpoint.load(name), k)
    architecture = {key: checkpoint.config[key] for key in ARCHITECTURE_KEYS if key in checkpoint.config}
    return Fingerprint(
        content_hash=content_hash(checkpoint),
        structure_hash=structure_hash(checkpoint),
        architecture=architecture,
        n_tensors=len(checkpoint.tensors),
        n_parameters=int(sum(math.prod(i.shape) for i in checkpoint.tensors.values())),
        signature_rank=k,
        signatures=signatures,
    )


def fingerprint_from_json(data: Mapping[str, Any], source: str = "fingerprint") -> Fingerprint:
    """Rebuild a :class:`Fingerprint` from its JSON form (as ``diverify dna --json`` writes it)."""
    try:
        return Fingerprint(
            content_hash=str(data["content_hash"]),
            structure_hash=str(data["structure_hash"]),
            architecture=dict(data["architecture"]),
            n_tensors=int(data["n_tensors"]),
            n_parameters=int(data["n_parameters"]),
            signature_rank=int(data["signature_rank"]),
            signatures={name: MatrixSignature(tuple(map(float, sig["singular_values"])),
                                              tuple(map(float, sig["sketch"])))
                        for name, sig in data["signatures"].items()},
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise DiverifyError(f"{source}: not a diverify fingerprint ({err!r})") from err


def load_fingerprint(path: str | os.PathLike) -> Fingerprint:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DiverifyError(f"{path}: cannot read fingerprint JSON ({err})") from err
    return fingerprint_from_json(data, str(path))


def _rms_relative(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    ratios = []
    for a, b in pairs:
        scale = float(np.linalg.norm(a))
        ratios.append(float(np.linalg.norm(a - b)) / scale if scale > 0 else float(np.linalg.norm(b) > 0))
    return float(np.sqrt(np.mean(np.square(ratios)))) if ratios else 0.0


def compare(a: Fingerprint, b: Fingerprint) -> DnaComparison:
    """identical / lineage / unrelated, with the RMS relative sketch distance (see the module docstring)."""
    if a.structure_hash != b.structure_hash or set(a.signatures) != set(b.signatures) \
            or a.signature_rank != b.signature_rank:
        return DnaComparison("unrelated", float("inf"), float("inf"), a.content_hash, b.content_hash)
    names = sorted(a.signatures)
    distance = _rms_relative([(np.array(a.signatures[n].sketch), np.array(b.signatures[n].sketch))
                              for n in names])
    spectral = _rms_relative([(np.array(a.signatures[n].singular_values),
                               np.array(b.signatures[n].singular_values)) for n in names])
    if a.content_hash == b.content_hash:
        verdict = "identical"
    elif distance <= LINEAGE_DISTANCE:
        verdict = "lineage"
    else:
        verdict = "unrelated"
    return DnaComparison(verdict, distance, spectral, a.content_hash, b.content_hash)
