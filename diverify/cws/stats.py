"""Exact binomial confidence bounds and the certified edit radius of CWS.

Monte-Carlo certification in weight space (Cohen, Rosenfeld & Kolter 2019,
"Certified adversarial robustness via randomized smoothing"; Salman et al.
2019) in two steps:

1. Counting: ``k`` of ``n`` independent noisy models ``theta + eps``,
   ``eps ~ N(0, sigma^2 I)``, satisfy the predicate.  The exact
   Clopper-Pearson bound turns ``(k, n)`` into ``p_upper`` with
   ``P[p <= p_upper] >= 1 - alpha`` for the smoothed probability
   ``p(theta) = P_eps[pred(theta + eps)]``.
2. Lipschitz property of Gaussian smoothing: ``Phi^{-1}(p(theta))`` is
   ``1 / sigma``-Lipschitz in ``theta`` for the l_2 norm, so for *every*
   weight change ``delta``::

       p(theta + delta) <= Phi(Phi^{-1}(p_upper) + ||delta||_2 / sigma),

   and no edit with ``||delta||_2 <= R = sigma (Phi^{-1}(p_max) - Phi^{-1}(p_upper))``
   lifts the smoothed probability above ``p_max``.

The guarantee is about the *smoothed* model (the one that adds fresh noise to
its weights before every use), never about the bare weights ``theta + delta``.
It holds with probability ``>= 1 - alpha`` over the Monte-Carlo draw,
assuming the samples are independent (a correct PRNG) and the predicate is
evaluated exactly as deployed (float32 here, the same code path).
"""

from __future__ import annotations

import dataclasses
import math

from scipy import stats as _sps

from diverify.errors import DiverifyError


def _check_counts(k: int, n: int, alpha: float) -> None:
    if n < 1:
        raise DiverifyError(f"number of samples n={n} must be at least 1")
    if not 0 <= k <= n:
        raise DiverifyError(f"count k={k} must lie in [0, n={n}]")
    if not 0.0 < alpha < 1.0:
        raise DiverifyError(f"alpha={alpha} must lie strictly between 0 and 1")


def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """Exact one-sided upper confidence bound on a binomial probability.

    Returns the ``p_upper`` with ``P_{k ~ Bin(n, p)}[p <= p_upper(k)] >= 1 - alpha``
    for every ``p``: the ``1 - alpha`` quantile of ``Beta(k + 1, n - k)``,
    which solves ``P[Bin(n, p_upper) <= k] = alpha``.  Edge cases in closed
    form: ``k = n`` gives 1 and ``k = 0`` gives ``1 - alpha^(1/n)``.
    """
    _check_counts(k, n, alpha)
    if k == n:
        return 1.0
    if k == 0:
        return -math.expm1(math.log(alpha) / n)
    return float(_sps.beta.ppf(1.0 - alpha, k + 1, n - k))


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """Exact one-sided lower confidence bound on a binomial probability.

    ``P[p >= p_lower(k)] >= 1 - alpha``: the ``alpha`` quantile of
    ``Beta(k, n - k + 1)``; ``k = 0`` gives 0 and ``k = n`` gives ``alpha^(1/n)``.
    """
    _check_counts(k, n, alpha)
    if k == 0:
        return 0.0
    if k == n:
        return math.exp(math.log(alpha) / n)
    return float(_sps.beta.ppf(alpha, k, n - k + 1))


def smoothed_probability_bound(p_upper: float, delta_norm: float, sigma: float) -> float:
    """Upper bound on ``p(theta + delta)`` for every ``delta`` with ``||delta||_2 <= delta_norm``.

    ``Phi(Phi^{-1}(p_upper) + delta_norm / sigma)`` where ``p(.)`` is the
    Gaussian-smoothed predicate probability with noise ``N(0, sigma^2 I)`` and
    ``p_upper >= p(theta)``.  Tight: for a linear predicate ``w . theta >= b``
    it is attained by ``delta`` parallel to ``w``.
    """
    if sigma <= 0:
        raise DiverifyError(f"sigma={sigma} must be positive")
    if delta_norm < 0:
        raise DiverifyError(f"edit norm {delta_norm} must be non-negative")
    return float(_sps.norm.cdf(_sps.norm.ppf(p_upper) + delta_norm / sigma))


def certified_edit_radius(p_upper: float, sigma: float, p_max: float) -> float:
    """Largest l_2 edit norm ``R`` for which the smoothed probability stays ``<= p_max``.

    ``R = sigma * (Phi^{-1}(p_max) - Phi^{-1}(p_upper))``, and 0 when
    ``p_upper >= p_max`` (nothing certified); ``p_max = 1`` gives ``inf``
    when ``p_upper < 1``.  Every ``delta`` with ``||delta||_2 <= R`` satisfies
    ``p(theta + delta) <= p_max`` for the smoothed probability ``p``.
    """
    if sigma <= 0:
        raise DiverifyError(f"sigma={sigma} must be positive")
    if not 0.0 < p_max <= 1.0:
        raise DiverifyError(f"p_max={p_max} must lie in (0, 1]")
    if not 0.0 <= p_upper <= 1.0:
        raise DiverifyError(f"p_upper={p_upper} must lie in [0, 1]")
    if p_upper >= p_max:
        return 0.0
    return float(sigma * (_sps.norm.ppf(p_max) - _sps.norm.ppf(p_upper)))


@dataclasses.dataclass(frozen=True)
class SmoothedDecision:
    """Cohen et al.'s CERTIFY for a binary predicate, selection and estimation kept apart.

    ``outcome`` is the smoothed predicate's value (majority of the noisy
    models), chosen on the selection samples only; ``p_outcome_lower`` bounds
    the probability of that outcome from below on the *independent*
    estimation samples (reusing the selection samples would bias the bound).
    ``radius`` is the l_2 weight-edit radius within which the smoothed
    predicate keeps ``outcome``: ``sigma * Phi^{-1}(p_outcome_lower)``, or 0
    with ``abstain`` when the lower bound does not exceed 1/2.
    """

    outcome: bool
    abstain: bool
    p_outcome_lower: float
    radius: float
    n_selection: int
    n_estimation: int
    alpha: float
    sigma: float


def select_then_certify(k_selection: int, n_selection: int, k_estimation: int,
                        n_estimation: int, alpha: float, sigma: float) -> SmoothedDecision:
    """Decide the smoothed predicate's value on one sample set, certify it on another.

    ``k_*`` count the noisy models on which the predicate is true.  The
    returned radius is sound with probability ``>= 1 - alpha`` as long as the
    two sample sets are independent.
    """
    _check_counts(k_selection, n_selection, alpha)
    outcome = 2 * k_selection >= n_selection
    k_agree = k_estimation if outcome else n_estimation - k_estimation
    p_lower = clopper_pearson_lower(k_agree, n_estimation, alpha)
    abstain = p_lower <= 0.5
    radius = 0.0 if abstain else float(sigma * _sps.norm.ppf(p_lower))
    return SmoothedDecision(outcome=bool(outcome), abstain=bool(abstain), p_outcome_lower=p_lower,
                            radius=radius, n_selection=n_selection, n_estimation=n_estimation,
                            alpha=alpha, sigma=sigma)
