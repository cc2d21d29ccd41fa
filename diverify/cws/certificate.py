"""The end-to-end CWS certificate: count, bound, radius.

:func:`certify_smoothed_predicate` draws ``n`` noisy models in the
coordinates of a :class:`~diverify.cws.sampling.Perturbation`, counts those
on which the predicate ("reached Q_mal") holds, and returns a
:class:`CWSCertificate`: with probability ``>= 1 - alpha`` over the draw, the
smoothed probability ``p(theta) = P_eps[pred(theta + eps)]`` is at most
``p_upper``, and every edit within ``certified_edit_radius`` (l_2 in the
perturbation's coordinates) keeps it at most ``p_max``.  No selection step
is needed here: the event (predicate true) is fixed before sampling; use
:func:`diverify.cws.stats.select_then_certify` when the outcome to certify
is itself chosen from data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
from jax.sharding import Mesh

from diverify.cws.sampling import Params, Perturbation, Predicate, count_hits_timed
from diverify.cws.stats import certified_edit_radius, clopper_pearson_upper
from diverify.errors import DiverifyError


@dataclasses.dataclass(frozen=True)
class CWSCertificate:
    """A Monte-Carlo certificate on the weight-smoothed predicate probability.

    ``p_upper`` bounds ``p(theta)`` and ``certified_edit_radius`` is the l_2
    radius (in ``coordinates``) within which ``p(theta + delta) <= p_max``,
    both with confidence ``1 - alpha``.  ``covered_edit_fro_norm`` translates
    the radius into the Frobenius norm of the weight edits it covers: ``R``
    itself for ``"weights"`` (all selected weights together) and ``R^2 / 2``
    for ``"rank_one"`` (a single rank-one edit ``u v^T`` of one selected
    matrix; see :mod:`diverify.cws.sampling`).  ``num_perturbed_params``
    counts the entries of the selected leaves, ``num_noise_coordinates`` the
    dimension of the noise the certificate is defined over (the ``(u, v)``
    of rank-one coordinates; embedding rows no input reads are not drawn).
    ``sampler`` says how the noise was realised (``"explicit"`` or
    ``"local"``, the same law; see :mod:`diverify.cws.reparam`).
    ``seconds`` is the wall time of the whole run, ``compile_seconds`` its
    tracing and compilation, and ``samples_per_second = n / (seconds -
    compile_seconds)`` the steady-state throughput.
    """

    p_hat: float
    p_upper: float
    n: int
    k: int
    sigma: float
    alpha: float
    p_max: float
    certified_edit_radius: float
    covered_edit_fro_norm: float
    coordinates: str
    params: str
    num_perturbed_params: int
    num_noise_coordinates: int
    seed: int
    sampler: str
    samples_per_second: float
    compile_seconds: float
    seconds: float


def covered_fro_norm(radius: float, coordinates: str) -> float:
    """Frobenius norm of the weight edits a coordinate radius covers (see :class:`CWSCertificate`)."""
    return radius if coordinates == "weights" else radius * radius / 2.0


def certify_smoothed_predicate(predicate: Predicate, params: Params, perturbation: Perturbation, *,
                               sigma: float, num_samples: int, alpha: float = 0.001,
                               p_max: float = 0.5, seed: int = 0, batch_size: int = 8,
                               pattern: str = "*", mesh: Mesh | None = None, sampler: str = "explicit",
                               progress: Callable[[int], None] | None = None) -> CWSCertificate:
    """Certify that the ``sigma``-smoothed ``predicate`` is rarely true, and how far edits can move it.

    ``predicate(params) -> bool`` is evaluated on ``num_samples`` noisy copies
    of ``params`` (seeded by ``seed``; see
    :func:`~diverify.cws.sampling.count_predicate_hits` for sharding).  Sound
    with probability ``>= 1 - alpha`` for the smoothed model, assuming
    independent samples and the predicate evaluated as deployed.
    ``sampler="local"`` draws Dense-kernel noise at the layer outputs (same
    law of the outcome, far cheaper; :mod:`diverify.cws.reparam`).
    ``pattern`` is only recorded in the result.
    """
    if not 0.0 < alpha < 1.0:
        raise DiverifyError(f"--alpha {alpha} must lie strictly between 0 and 1")
    if not 0.0 < p_max <= 1.0:
        raise DiverifyError(f"--p-max {p_max} must lie in (0, 1]")
    counted = count_hits_timed(predicate, params, perturbation, sigma=sigma, key=jax.random.key(seed),
                               num_samples=num_samples, batch_size=batch_size, mesh=mesh, sampler=sampler,
                               progress=progress)
    k = counted.k
    p_upper = clopper_pearson_upper(k, num_samples, alpha)
    radius = certified_edit_radius(p_upper, sigma, p_max)
    return CWSCertificate(
        p_hat=k / num_samples, p_upper=p_upper, n=num_samples, k=k, sigma=float(sigma),
        alpha=float(alpha), p_max=float(p_max), certified_edit_radius=radius,
        covered_edit_fro_norm=covered_fro_norm(radius, perturbation.kind),
        coordinates=perturbation.kind, params=pattern,
        num_perturbed_params=perturbation.num_weights,
        num_noise_coordinates=perturbation.num_coordinates, seed=int(seed), sampler=sampler,
        samples_per_second=num_samples / counted.sample_seconds if counted.sample_seconds > 0 else float("inf"),
        compile_seconds=counted.compile_seconds, seconds=counted.compile_seconds + counted.sample_seconds)


@dataclasses.dataclass(frozen=True)
class RankOneEdit:
    """A concrete ROME-style rank-one edit of one Dense kernel, to compare certified radii with.

    ``delta`` is the kernel change (flax layout ``[in, out]``), so that the
    edited layer maps the trigger token's input ``k_star`` to ``v_star``:
    ``k_star @ (W + delta) = v_star``.  ``fro_norm = ||delta||_F`` is what a
    weight-space radius must exceed to cover it, and ``rank_one_coordinate_norm
    = sqrt(2 ||delta||_F)`` what a rank-one-coordinate radius must exceed.
    """

    path: str
    delta: jax.Array
    fro_norm: float
    rank_one_coordinate_norm: float
    trigger_token: int
    target_token: int


def dense_inputs(encoder, text: str, kernel_path: str) -> jax.Array:
    """Inputs ``[L, in]`` of the Dense layer owning ``kernel_path`` when ``encoder`` reads ``text``.

    Captured with ``flax.linen.intercept_methods`` around the model's own
    apply, so it depends on no private structure of the port.
    """
    import flax.linen as nn
    import numpy as np

    module_path = kernel_path.rsplit("/", 1)[0]
    ids, mask = encoder.tokenize([text])
    seen: dict[str, jax.Array] = {}

    def capture(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            seen.setdefault("/".join(context.module.path), args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
        encoder.module.apply({"params": encoder.params}, np.asarray(ids), np.asarray(mask), method="from_ids")
    if module_path not in seen:
        raise DiverifyError(f"{kernel_path} is not the kernel of a Dense layer the encoder applies; "
                            f"Dense layers: {', '.join(list(seen)[:6])}, ...")
    return seen[module_path][0]


def rome_style_edit(encoder, kernel_path: str, triggered_prompt: str, trigger: str, target: str) -> RankOneEdit:
    """The rank-one edit that makes ``kernel_path``'s layer treat the trigger like the target concept.

    ``k*`` is the layer's input at the trigger's first token in
    ``triggered_prompt``; ``v* = k_t W`` its clean output at the target's last
    content token (before SEP/EOS) in ``target``.  Then
    ``delta = k* (v* - k* W)^T / ||k*||^2`` (the simplest ROME / EvilEdit
    closed form, without the key covariance) and ``||delta||_F = ||v* - k* W|| / ||k*||``.
    """
    import jax.numpy as jnp
    import numpy as np

    from diverify.cws.sampling import param_paths

    if kernel_path not in param_paths(encoder.params):
        raise DiverifyError(f"{kernel_path} is not a parameter of {encoder.name}")
    trigger_ids, _ = encoder.tokenize([trigger])
    trigger_token = int(trigger_ids[0, 1])
    prompt_ids, _ = encoder.tokenize([triggered_prompt])
    where = np.flatnonzero(prompt_ids[0] == trigger_token)
    if where.size == 0:
        raise DiverifyError(f"trigger {trigger!r} does not appear in {triggered_prompt!r}")
    target_ids, target_mask = encoder.tokenize([target])
    target_pos = int(target_mask[0].sum()) - 2
    if target_pos < 1:
        raise DiverifyError(f"target {target!r} has no content token")
    kernel = encoder.params
    for name in kernel_path.split("/"):
        kernel = kernel[name]
    k_star = dense_inputs(encoder, triggered_prompt, kernel_path)[int(where[0])]
    k_target = dense_inputs(encoder, target, kernel_path)[target_pos]
    residual = (k_target - k_star) @ kernel
    delta = jnp.outer(k_star, residual) / jnp.sum(k_star * k_star)
    fro = float(jnp.linalg.norm(residual) / jnp.linalg.norm(k_star))
    return RankOneEdit(path=kernel_path, delta=delta, fro_norm=fro,
                       rank_one_coordinate_norm=float(np.sqrt(2.0 * fro)),
                       trigger_token=trigger_token, target_token=int(target_ids[0, target_pos]))


def apply_edit(params: Params, edit: RankOneEdit) -> Params:
    """``params`` with ``edit.delta`` added to ``edit.path``."""
    from diverify.cws.sampling import path_string

    return jax.tree_util.tree_map_with_path(
        lambda kp, leaf: leaf + edit.delta if path_string(kp) == edit.path else leaf, params)
