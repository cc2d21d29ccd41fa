"""CWS, certified weight smoothing: Monte-Carlo probability certificates in parameter space.

The smoothed model adds fresh Gaussian noise ``N(0, sigma^2 I)`` to (some of)
its weights, or to rank-one edit coordinates ``(u, v)`` of chosen matrices,
before every use.  For a predicate "the model reached Q_mal" (a latent
collision of a text encoder, a denoiser's sample near a target, ...) this
package counts hits over seeded, sharded noise samples, bounds the smoothed
probability with an exact Clopper-Pearson bound, and turns the bound into a
certified edit radius (Cohen et al. 2019): no edit of l_2 norm ``<= R`` in
the smoothing coordinates lifts the smoothed probability above ``p_max``.

- :mod:`diverify.cws.stats`: Clopper-Pearson bounds, the radius, Cohen's selection/estimation split;
- :mod:`diverify.cws.sampling`: perturbations (path patterns, rank-one coordinates), seeded sharded counting;
- :mod:`diverify.cws.reparam`: local reparameterisation, Dense-kernel noise drawn at the layer output (same law);
- :mod:`diverify.cws.predicates`: predicates as plain JAX functions ``params -> bool``;
- :mod:`diverify.cws.certificate`: the end-to-end certificate and concrete ROME-style edits to compare with;
- :mod:`diverify.cws.training`: CWS training, minimising the smoothed loss with optax (paper eq. 12).
"""

from diverify.cws.certificate import (
    CWSCertificate,
    RankOneEdit,
    apply_edit,
    certify_smoothed_predicate,
    rome_style_edit,
)
from diverify.cws.predicates import (
    class_is,
    cosine_at_least,
    distance_at_most,
    insert_trigger,
    text_collision_predicate,
)
from diverify.cws.reparam import LocalPlan, local_plan, noisy_call
from diverify.cws.sampling import (
    HitCount,
    Perturbation,
    count_hits_timed,
    count_predicate_hits,
    rank_one_perturbation,
    restrict_rows,
    select_paths,
    weight_perturbation,
)
from diverify.cws.stats import (
    SmoothedDecision,
    certified_edit_radius,
    clopper_pearson_lower,
    clopper_pearson_upper,
    select_then_certify,
    smoothed_probability_bound,
)
from diverify.cws.training import make_smoothed_train_step, smoothed_loss

__all__ = [
    "CWSCertificate", "HitCount", "LocalPlan", "Perturbation", "RankOneEdit", "SmoothedDecision", "apply_edit", "certified_edit_radius",
    "certify_smoothed_predicate", "class_is", "clopper_pearson_lower", "clopper_pearson_upper", "cosine_at_least",
    "count_hits_timed", "count_predicate_hits", "distance_at_most", "insert_trigger", "local_plan",
    "make_smoothed_train_step", "noisy_call",
    "rank_one_perturbation", "restrict_rows", "rome_style_edit", "select_paths", "select_then_certify",
    "smoothed_loss", "smoothed_probability_bound", "text_collision_predicate", "weight_perturbation",
]
