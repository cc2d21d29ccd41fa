"""Per-matrix spectral metrics of a weight delta dW = W_suspect - W_base, given W_base.

All matrices are in the checkpoint's (PyTorch) layout ``[out, in]``: a Dense
layer computes ``y = W x``, so dW's *right* singular vectors live in the input
space and its *left* singular vectors in the output space.

Metrics (Frobenius norm ``||.||_F``, spectral norm ``||.||_2``, singular values
``s_1 >= s_2 >= ...`` of dW):

- ``frobenius`` ``||dW||_F`` and ``relative_norm`` ``||dW||_F / ||W||_F``;
- ``top_singular_values`` the K largest ``s_i``;
- ``stable_rank`` ``||dW||_F^2 / ||dW||_2^2`` (1 for a rank-one edit, up to
  ``rank(dW)`` for a flat spectrum);
- ``effective_rank`` ``exp(H(p))`` with ``p_i = s_i / sum_j s_j`` (Roy and
  Vetterli 2007), computed over the top-K spectrum, hence exact when
  ``rank(dW) <= K``;
- ``null_space_energy`` the share of ``||dW||_F^2`` outside the product of W's
  top-k left and right singular subspaces, ``1 - ||U_k^T dW V_k||_F^2 / ||dW||_F^2``
  (0 when dW only rescales W's principal directions, near 1 for a delta that
  ignores them).

Low-rank deltas (merged LoRA adapters, dW = B A) are never formed: their SVD
comes from QR factorisations of the factors and the SVD of an r x r core.
Large dense matrices use a randomised SVD (Halko, Martinsson and Tropp 2011,
Algorithm 4.4, with power iterations); matrices less than twice as large as
the sketch use the exact SVD.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Union

import contextlib
import functools

import numpy as np
from threadpoolctl import ThreadpoolController

from diverify.errors import DiverifyError

#: Oversampling of the randomised range finder beyond the requested rank (HMT 2011: 5-10).
OVERSAMPLE = 10
#: QR-stabilised power iterations of the range finder; each multiplies the
#: error in the captured subspace by about (s_{k+p} / s_k)^2.
POWER_ITERATIONS = 3
#: Below this many elements BLAS runs single-threaded: on small and thin
#: matrices OpenBLAS's threads cost more than they save (tens of times more on
#: a loaded machine), while large products still use every core.
SINGLE_THREAD_ELEMENTS = 4_000_000


@functools.lru_cache(maxsize=1)
def _threadpools() -> ThreadpoolController:
    # Inspecting the loaded BLAS libraries takes milliseconds: do it once, not per matrix.
    return ThreadpoolController()


def single_threaded() -> contextlib.AbstractContextManager:
    """BLAS limited to one thread inside the block."""
    return _threadpools().limit(limits=1, user_api="blas")


def _blas_threads_for(size: int) -> contextlib.AbstractContextManager:
    if size < SINGLE_THREAD_ELEMENTS:
        return single_threaded()
    return contextlib.nullcontext()


@dataclasses.dataclass(frozen=True)
class LowRankDelta:
    """dW = left @ right with ``left`` [out, r] and ``right`` [r, in], never formed unless asked."""

    left: np.ndarray
    right: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left.shape[0], self.right.shape[1])

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def dense(self) -> np.ndarray:
        return self.left @ self.right

    def frobenius_squared(self) -> float:
        """``||left @ right||_F^2 = trace((L^T L)(R R^T))`` from the r x r Gram matrices."""
        left = self.left.astype(np.float64)
        right = self.right.astype(np.float64)
        return float(np.sum((left.T @ left) * (right @ right.T)))


Delta = Union[np.ndarray, LowRankDelta]


@dataclasses.dataclass(frozen=True)
class TruncatedSVD:
    """Top singular triplets: ``u`` [m, k], ``s`` [k] descending, ``vt`` [k, n]."""

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray


def _exact_svd(matrix: np.ndarray, k: int) -> TruncatedSVD:
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return TruncatedSVD(u[:, :k], s[:k], vt[:k])


def randomized_svd(matrix: np.ndarray, k: int, seed: int = 0) -> TruncatedSVD:
    """Top-``k`` SVD of a dense matrix; exact when the matrix is not much larger than the sketch.

    Randomised range finder with ``k + OVERSAMPLE`` columns and
    ``POWER_ITERATIONS`` QR-stabilised power iterations (HMT 2011, Alg. 4.4);
    ``seed`` fixes the Gaussian test matrix so that results are reproducible.
    """
    with _blas_threads_for(matrix.size):
        return _randomized_svd(matrix, k, seed)


def _randomized_svd(matrix: np.ndarray, k: int, seed: int) -> TruncatedSVD:
    m, n = matrix.shape
    sketch = k + OVERSAMPLE
    if 2 * sketch >= min(m, n):
        return _exact_svd(matrix, k)
    rng = np.random.default_rng(seed)
    omega = rng.standard_normal((n, sketch)).astype(matrix.dtype)
    # Only the products with the matrix are large; the QR and SVD factorisations of the thin
    # sketches are LAPACK loops of tiny BLAS calls that threads slow down.
    y = matrix @ omega
    for _ in range(POWER_ITERATIONS):
        with single_threaded():
            q, _ = np.linalg.qr(y)
        z = matrix.T @ q
        with single_threaded():
            z, _ = np.linalg.qr(z)
        y = matrix @ z
    with single_threaded():
        q, _ = np.linalg.qr(y)
    small = q.T @ matrix
    with single_threaded():
        u_small, s, vt = np.linalg.svd(small, full_matrices=False)
        u = (q @ u_small)[:, :k]
    return TruncatedSVD(u, s[:k], vt[:k])


def low_rank_svd(delta: LowRankDelta, k: int) -> TruncatedSVD:
    """Exact top-``k`` SVD of ``left @ right`` via QR of both factors and the SVD of the r x r core.

    ``L = Q_L R_L`` and ``R^T = Q_R R_R`` give ``L R = Q_L (R_L R_R^T) Q_R^T``;
    the core's SVD ``U_c S V_c^T`` yields ``U = Q_L U_c`` and ``V = Q_R V_c``.
    """
    with _blas_threads_for(delta.left.size + delta.right.size):
        q_left, r_left = np.linalg.qr(delta.left.astype(np.float64))
        q_right, r_right = np.linalg.qr(delta.right.T.astype(np.float64))
        u_core, s, vt_core = np.linalg.svd(r_left @ r_right.T)
    u = (q_left @ u_core)[:, :k]
    vt = (vt_core @ q_right.T)[:k]
    return TruncatedSVD(u.astype(np.float32), s[:k].astype(np.float32), vt.astype(np.float32))


def delta_svd(delta: Delta, k: int, seed: int = 0) -> TruncatedSVD:
    """Top-``k`` SVD of a dense or low-rank delta."""
    if isinstance(delta, LowRankDelta):
        return low_rank_svd(delta, k)
    return randomized_svd(delta, k, seed)


def frobenius_squared(delta: Delta) -> float:
    if isinstance(delta, LowRankDelta):
        return delta.frobenius_squared()
    flat = np.ascontiguousarray(delta).ravel()
    # BLAS dot with float32 accumulation: a float64 copy of a large matrix costs more than all of it.
    return float(flat @ flat)


def stable_rank(frobenius_sq: float, spectral_norm: float) -> float:
    """``||dW||_F^2 / ||dW||_2^2``; 0 for a zero delta."""
    if spectral_norm <= 0.0:
        return 0.0
    return frobenius_sq / spectral_norm**2


def effective_rank(singular_values: np.ndarray) -> float:
    """``exp(-sum p_i log p_i)`` with ``p_i = s_i / sum s``; 0 for a zero spectrum."""
    s = np.asarray(singular_values, dtype=np.float64)
    s = s[s > 0]
    if s.size == 0:
        return 0.0
    p = s / s.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def principal_subspace_energy(delta: Delta, base_svd: TruncatedSVD) -> float:
    """``||U_k^T dW V_k||_F^2``: the energy of dW inside W's top-k left x right singular subspace."""
    u, v = base_svd.u.astype(np.float32), base_svd.vt.T.astype(np.float32)
    if isinstance(delta, LowRankDelta):
        block = (u.T @ delta.left.astype(np.float32)) @ (delta.right.astype(np.float32) @ v)
    else:
        block = (u.T @ np.asarray(delta, np.float32)) @ v
    return float(np.sum(np.square(block, dtype=np.float64)))


def null_space_energy(delta: Delta, base_svd: TruncatedSVD) -> float:
    """Share of ``||dW||_F^2`` outside W's top-k left x right singular subspace, in [0, 1]."""
    total = frobenius_squared(delta)
    if total <= 0.0:
        return 0.0
    inside = principal_subspace_energy(delta, base_svd)
    return float(min(1.0, max(0.0, 1.0 - inside / total)))


_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)")


def matrix_kind(name: str) -> str:
    """The name with layer indices replaced by ``*``: ``encoder.layer.*.attention.self.key.weight``."""
    return _LAYER_INDEX.sub("*", name)


@dataclasses.dataclass(frozen=True)
class SpectralMetrics:
    """Data-free metrics of one matrix delta (see the module docstring for the definitions)."""

    name: str
    kind: str
    shape: tuple[int, int]
    frobenius: float
    relative_norm: float
    top_singular_values: tuple[float, ...]
    stable_rank: float
    effective_rank: float
    null_space_energy: float


def spectral_metrics(name: str, base: np.ndarray, delta: Delta, top_k: int = 8,
                     subspace_rank: int = 16, spectrum_rank: int = 16, seed: int = 0,
                     base_svd: TruncatedSVD | None = None) -> tuple[SpectralMetrics, TruncatedSVD]:
    """Metrics of ``delta`` against ``base`` plus dW's top-``spectrum_rank`` SVD (for data-aware metrics).

    ``subspace_rank`` is the k of W's principal subspace in ``null_space_energy``;
    ``spectrum_rank`` the number of dW's singular values the effective rank sees;
    ``base_svd`` (W's top singular triplets, at least ``subspace_rank`` of them)
    skips recomputing them when the same base is audited many times.
    """
    if base.ndim != 2 or tuple(delta.shape) != tuple(base.shape):
        raise DiverifyError(f"tensor {name}: delta shape {tuple(delta.shape)} does not match base {base.shape}")
    with _blas_threads_for(base.size):
        return _spectral_metrics(name, base, delta, top_k, subspace_rank, max(spectrum_rank, top_k), seed,
                                 base_svd)


def _spectral_metrics(name: str, base: np.ndarray, delta: Delta, top_k: int, subspace_rank: int,
                      spectrum_rank: int, seed: int,
                      base_svd: TruncatedSVD | None) -> tuple[SpectralMetrics, TruncatedSVD]:
    fro_sq = frobenius_squared(delta)
    base_fro = float(np.sqrt(np.sum(np.square(base, dtype=np.float64))))
    if fro_sq == 0.0:
        empty = TruncatedSVD(np.zeros((base.shape[0], 0), np.float32), np.zeros(0, np.float32),
                             np.zeros((0, base.shape[1]), np.float32))
        return SpectralMetrics(name, matrix_kind(name), (int(base.shape[0]), int(base.shape[1])),
                               0.0, 0.0, (), 0.0, 0.0, 0.0), empty
    d_svd = delta_svd(delta, spectrum_rank, seed)
    if base_svd is None:
        base_svd = randomized_svd(base, subspace_rank, seed)
    else:
        base_svd = TruncatedSVD(base_svd.u[:, :subspace_rank], base_svd.s[:subspace_rank],
                                base_svd.vt[:subspace_rank])
    s = np.asarray(d_svd.s, dtype=np.float64)
    spectral = float(s[0]) if s.size else 0.0
    metrics = SpectralMetrics(
        name=name,
        kind=matrix_kind(name),
        shape=(int(base.shape[0]), int(base.shape[1])),
        frobenius=float(np.sqrt(fro_sq)),
        relative_norm=float(np.sqrt(fro_sq) / base_fro) if base_fro > 0 else float("inf"),
        top_singular_values=tuple(float(x) for x in s[:top_k]),
        stable_rank=stable_rank(fro_sq, spectral),
        effective_rank=effective_rank(s),
        null_space_energy=null_space_energy(delta, base_svd),
    )
    return metrics, d_svd


def robust_z_scores(values: np.ndarray) -> np.ndarray:
    """``(x - median) / (1.4826 MAD)`` against the other values; 0 when fewer than 3 values.

    The MAD is floored at 1% of the median's magnitude (and a tiny absolute
    floor) so that a group of identical values does not turn float noise into
    an infinite score.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size < 3:
        return np.zeros_like(x)
    median = np.median(x)
    mad = 1.4826 * np.median(np.abs(x - median))
    scale = max(mad, 0.01 * abs(median), 1e-12)
    return (x - median) / scale


def per_kind_z_scores(kinds: list[str], values: np.ndarray) -> np.ndarray:
    """Robust z-score of each value against the values of the same kind."""
    x = np.asarray(values, dtype=np.float64)
    out = np.zeros_like(x)
    kinds_arr = np.asarray(kinds)
    for kind in set(kinds):
        idx = np.nonzero(kinds_arr == kind)[0]
        out[idx] = robust_z_scores(x[idx])
    return out
