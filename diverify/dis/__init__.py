"""The Distributional Integrity Score (DIS): how far a prompt perturbation moves the output distribution.

The paper's D_DI ratio (eq. 11) is ``KL(P(x_0|c) || P(x_0|c')) / dist(c, c')``.  KL is quadratic in a small
perturbation, so that ratio vanishes as ``dist -> 0``; the scale-consistent ``sqrt(2 KL) / dist`` (a local
Fisher-Rao constant) is the score used for detection.  :mod:`diverify.dis.text` computes the text-encoder
analogue, :mod:`diverify.dis.denoiser` the path-KL bound for conditional denoisers; both return
:class:`DISResult`.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class DISResult:
    """One DIS estimate.

    ``dis`` is the detection score ``sqrt(2 kl) / dist`` with ``ci`` its confidence interval; ``kl`` the
    (bound on the) divergence and ``dist`` the size of the prompt perturbation; ``kl_ratio`` the paper's
    ``kl / dist``.  ``certified_upper`` is a sound upper bound on the same quantity from the bound engine
    where one is computed (``None`` otherwise).  ``details`` holds model-specific extras (per-step terms,
    per-sample shifts); everything serialises with :func:`diverify.results.dumps`.
    """

    dis: float
    ci: tuple[float, float]
    kl: float
    dist: float
    kl_ratio: float
    model_kind: str
    perturbation: str
    samples: int
    seconds: float
    certified_upper: float | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
