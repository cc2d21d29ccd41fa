"""Formal weight-perturbation certificates: no edit of chosen weight matrices inside a ball creates a latent collision.

The deterministic counterpart of CWS (the paper's parameter-level
verification). For a prompt, restricted concepts with clean unit embeddings
``t_c`` and selected Dense kernels ``W_i``, the bound engine bounds::

    max_{D_i in ball_i} cos(emb_{theta + D}(prompt), t_c) <= U_c

treating the edits ``D_i`` as perturbed inputs. A ball is a
:class:`~diverify.specs.MatrixBall` of radius ``r`` around 0 for each
selected matrix (the product of the balls when several are selected): the
max-entry ball ``inf``, the Frobenius ball ``fro``, or ``rank1``, the rank-one
edits ``{u v^T : ||u|| ||v|| <= r}`` (ROME / EvilEdit's shape), bounded over
their convex hull, the nuclear-norm ball of radius ``r``. ``U_c`` is sound
for every edit in the set; the concept is *certified* when ``U_c < tau``,
refuted (*collision*) when a gradient attack on the edit finds
``cos >= tau``, and *unknown* otherwise.

Two formulations give the same set of models:

* ``"weights"``: the function of the edits ``D_i`` themselves (any number of
  matrices; an edited matrix later in the network multiplies an input that
  an earlier edit already moved, which the engine bounds as a product of
  two perturbed terms). Its cost grows with ``m * n`` per matrix.
* ``"image"``: for one edited layer ``y = x W + b`` the input ``x`` does not
  depend on the edit, so the edit moves the output by exactly ``x D``; the
  function takes that move ``Z = x D`` over :class:`~diverify.specs.DenseImage`
  (``L * n`` coordinates instead of ``m * n``), which keeps a real
  transformer's bounds affordable.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diverify.bounds import compile_bounds
from diverify.cmav import (ConceptVerdict, Prompt, checked_bound, concept_embeddings, concept_verdict,
                           unit_cosines)
from diverify.cws.sampling import path_string, select_paths
from diverify.errors import DiverifyError
from diverify.specs import MatrixBall, dense_image, matrix_ball

#: ``--ball`` names and the matrix norm each is bounded in.
BALLS = {"inf": "inf", "fro": "fro", "rank1": "nuclear"}


def ball_norm(ball: str) -> str:
    if ball not in BALLS:
        raise DiverifyError(f"unknown edit ball {ball!r}: choose one of {', '.join(BALLS)}")
    return BALLS[ball]


def _leaf(params, path: str):
    node = params
    for name in path.split("/"):
        node = node[name]
    return node


def select_kernels(encoder, pattern: str) -> tuple[str, ...]:
    """The Dense kernels (2-D ``.../kernel`` leaves) matching ``pattern`` (see :func:`select_paths`)."""
    paths = select_paths(encoder.params, pattern)
    bad = [p for p in paths if not p.endswith("/kernel") or _leaf(encoder.params, p).ndim != 2]
    if bad:
        raise DiverifyError(f"--params {pattern!r} selects {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}, "
                            "which is not a Dense kernel; edits are bounded on weight matrices only "
                            "(e.g. 'encoder/layer_0/attention/self/value/kernel')")
    return paths


def _with_edits(params, paths: Sequence[str], deltas: Sequence[jax.Array]):
    index = {p: i for i, p in enumerate(paths)}

    def move(key_path, leaf):
        i = index.get(path_string(key_path))
        return leaf if i is None else leaf + deltas[i]

    return jax.tree_util.tree_map_with_path(move, params)


def edit_cosine_function(encoder, prompt: Prompt, paths: Sequence[str], targets: jax.Array) -> Callable:
    """``(D_1, ..., D_k) -> cos(emb_{theta + D}(prompt), t_c)`` for every row ``t_c`` of ``targets`` (unit norm).

    The word embeddings are read from the clean table (an edited matrix is a
    Dense kernel, never the embedding table).
    """
    params, mask, ids = encoder.params, prompt.mask, prompt.ids
    word_emb = encoder.word_embeddings(ids)
    targets = jnp.asarray(targets, jnp.float32)

    def fn(*deltas):
        e = encoder.pooled_from_word_embeddings(_with_edits(params, paths, deltas), word_emb, mask, ids)[0]
        return unit_cosines(targets, e)

    return fn


def _dense_calls(encoder, prompt: Prompt, word_emb: jax.Array, module_path: str, add=None) -> tuple[jax.Array, list]:
    """Pooled embedding with ``add`` added to the output of the Dense at ``module_path``, and that
    layer's inputs (one per call)."""
    import flax.linen as nn

    inputs: list = []

    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__" \
                and "/".join(context.module.path) == module_path:
            inputs.append(args[0])
            if add is not None:
                out = out + add[None]
        return out

    with nn.intercept_methods(intercept):
        e = encoder.pooled_from_word_embeddings(encoder.params, word_emb, prompt.mask, prompt.ids)[0]
    return e, inputs


def layer_input(encoder, prompt: Prompt, kernel_path: str) -> jax.Array:
    """The input ``x`` (shape ``(L, m)``) of the Dense layer owning ``kernel_path`` on the prompt."""
    word_emb = encoder.word_embeddings(prompt.ids)
    _, inputs = _dense_calls(encoder, prompt, word_emb, kernel_path.rsplit("/", 1)[0])
    if len(inputs) != 1:
        raise DiverifyError(f"{kernel_path} is applied {len(inputs)} times on the prompt; the image formulation "
                            "needs a layer applied once (use --formulation weights)")
    return inputs[0][0]


def output_move_function(encoder, prompt: Prompt, kernel_path: str, targets: jax.Array) -> Callable:
    """``Z -> cos(emb(prompt) with Z added to the output of kernel_path's layer, t_c)``, ``Z`` of shape ``(L, n)``."""
    module_path = kernel_path.rsplit("/", 1)[0]
    targets = jnp.asarray(targets, jnp.float32)
    word_emb = encoder.word_embeddings(prompt.ids)

    def fn(z):
        e, _ = _dense_calls(encoder, prompt, word_emb, module_path, add=z)
        return unit_cosines(targets, e)

    return fn


# --------------------------------------------------------------------------
# Attacks: edits inside the ball that push the cosine up.


def project_edit(delta: jax.Array, norm: str, radius) -> jax.Array:
    """Euclidean projection onto the inf or Frobenius ball of ``radius`` (the ``rank1`` attack
    projects its factors instead)."""
    if norm == "inf":
        return jnp.clip(delta, -radius, radius)
    return delta * jnp.minimum(1.0, radius / jnp.maximum(jnp.linalg.norm(delta), 1e-30))


def attack_edits(fn: Callable, shapes: Sequence[tuple[int, int]], norm: str, radius: float, key: jax.Array,
                 steps: int = 40, restarts: int = 2) -> tuple[np.ndarray, list]:
    """Projected gradient ascent of each output of ``fn(*deltas)`` over the edit ball.

    ``rank1`` (nuclear) edits are searched as ``u v^T`` with ``||u||, ||v|| <= sqrt(r)``:
    rank-one points of the set, where a ROME edit lives. Returns the best value
    per output and the edits reaching it. A lower bound on the true maximum.
    The ascent is compiled once per ``(fn, shapes, norm, steps)``; the radius is an input.
    """
    shapes = tuple(tuple(int(d) for d in s) for s in shapes)
    n_out = int(jax.eval_shape(fn, *[jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]).shape[0])
    run = _ascent(fn, shapes, norm, steps)
    values, edits = [], []
    for out in range(n_out):
        tries = [run(out, jnp.float32(radius), k) for k in jax.random.split(jax.random.fold_in(key, out), restarts)]
        best = max(tries, key=lambda t: float(t[0]))
        values.append(float(best[0]))
        edits.append(best[1])
    return np.asarray(values), edits


@functools.lru_cache(maxsize=16)
def _ascent(fn: Callable, shapes: tuple, norm: str, steps: int):
    def to_deltas(z):
        if norm == "nuclear":
            return [jnp.outer(u, v) for u, v in z]
        return list(z)

    def ascend(out, radius, k):
        root = jnp.sqrt(radius)

        def project(z):
            if norm == "nuclear":
                return [(project_edit(u, "fro", root), project_edit(v, "fro", root)) for u, v in z]
            return [project_edit(d, norm, radius) for d in z]

        keys = jax.random.split(k, 2 * len(shapes))
        if norm == "nuclear":
            z0 = project([(root * jax.random.normal(keys[2 * i], (m,)) / np.sqrt(m),
                           root * jax.random.normal(keys[2 * i + 1], (n,)) / np.sqrt(n))
                          for i, (m, n) in enumerate(shapes)])
        else:
            z0 = project([radius * jax.random.uniform(keys[i], s, minval=-1, maxval=1) for i, s in enumerate(shapes)])
        value = lambda z: fn(*to_deltas(z))[out]  # noqa: E731
        size = 2.5 * (root if norm == "nuclear" else radius) / steps

        def body(i, carry):
            z, best_z, best = carry
            g = jax.grad(value)(z)
            if norm == "inf":
                z = project(jax.tree_util.tree_map(lambda a, b: a + size * jnp.sign(b), z, g))
            else:
                gn = jnp.sqrt(sum(jnp.sum(t * t) for t in jax.tree_util.tree_leaves(g)))
                z = project(jax.tree_util.tree_map(lambda a, b: a + size * b / jnp.maximum(gn, 1e-30), z, g))
            v = value(z)
            better = v > best
            pick = lambda a, b: jnp.where(better, a, b)  # noqa: E731
            return z, jax.tree_util.tree_map(pick, z, best_z), jnp.maximum(v, best)

        _, best_z, best = jax.lax.fori_loop(0, steps, body, (z0, z0, value(z0)))
        return best, to_deltas(best_z)

    return jax.jit(ascend, static_argnums=0)


# --------------------------------------------------------------------------
# Certificates.


@dataclasses.dataclass(frozen=True)
class EditCertificate:
    """Bounds on the cosine to each restricted concept over every edit in the ball (see the module docstring).

    ``params`` are the edited kernels; ``ball`` is ``inf``, ``fro`` or ``rank1``
    and ``radius`` its radius (per matrix); ``bound_coordinates`` counts the
    coordinates the engine bounded over (``m * n`` per matrix for
    ``"weights"``, ``L * n`` for ``"image"``).
    """

    model: str
    prompt: str | None
    tokens: list
    params: list
    ball: str
    radius: float
    formulation: str
    method: str
    threshold: float
    certified: bool
    concepts: list
    edited_weights: int
    bound_coordinates: int
    seconds: float
    compile_seconds: float


@dataclasses.dataclass(frozen=True)
class EditProblem:
    """A compiled edit-bound problem: the bound function, its input sets and the weight-space function."""

    paths: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]
    norm: str
    formulation: str
    sets: tuple
    bound_fn: object
    weight_fn: Callable
    targets: jax.Array

    def with_radius(self, radius: float) -> tuple:
        r = jnp.float32(radius)
        out = []
        for s in self.sets:
            if isinstance(s, MatrixBall):
                out.append(dataclasses.replace(s, radius=r))
            else:
                out.append(dataclasses.replace(s, ball=dataclasses.replace(s.ball, radius=r)))
        return tuple(out)

    def upper(self, radius: float) -> np.ndarray:
        """Checked upper bounds per concept at ``radius``; raises DiverifyError where the engine cannot bound."""
        return np.asarray(self.bound_fn(*self.with_radius(radius)).output.upper)


def edit_problem(encoder, prompt: Prompt, pattern: str, ball: str, concepts: Sequence[str] | None = None,
                 method: str = "crown-forward", formulation: str = "auto", radius: float = 0.0,
                 concept_vectors=None) -> EditProblem:
    """Trace and compile the bound of the concept cosines over edits of the kernels matching ``pattern``.

    ``formulation``: ``"weights"``, ``"image"`` (a single kernel) or ``"auto"``
    (image for a single kernel, weights otherwise).
    """
    norm = ball_norm(ball)
    paths = select_kernels(encoder, pattern)
    if formulation == "auto":
        formulation = "image" if len(paths) == 1 else "weights"
    if formulation not in ("image", "weights"):
        raise DiverifyError(f"unknown formulation {formulation!r}: use image, weights or auto")
    if formulation == "image" and len(paths) != 1:
        raise DiverifyError(f"the image formulation bounds one edited matrix, but --params selects {len(paths)}")
    if concept_vectors is None:
        if not concepts:
            raise DiverifyError("give at least one restricted concept")
        targets = concept_embeddings(encoder, concepts)
    else:
        targets = jnp.asarray(concept_vectors, jnp.float32)
        targets = targets / jnp.linalg.norm(targets, axis=-1, keepdims=True)
    shapes = tuple(tuple(_leaf(encoder.params, p).shape) for p in paths)
    balls = [matrix_ball(np.zeros(s, np.float32), radius, norm) for s in shapes]
    weight_fn = edit_cosine_function(encoder, prompt, paths, targets)
    if formulation == "image":
        sets = (dense_image(layer_input(encoder, prompt, paths[0]), balls[0]),)
        fn = output_move_function(encoder, prompt, paths[0], targets)
    else:
        sets, fn = tuple(balls), weight_fn
    bound_fn = compile_bounds(fn, *sets, method=method)
    return EditProblem(paths, shapes, norm, formulation, sets, bound_fn, weight_fn, targets)


def certify_edit(encoder, prompt: Prompt, pattern: str, ball: str, radius: float, concepts: Sequence[str],
                 threshold: float, method: str = "crown-forward", formulation: str = "auto", attack: bool = True,
                 seed: int = 0, concept_vectors=None) -> EditCertificate:
    """Certify (or refute) that no edit of the selected kernels in the ball of ``radius`` makes the
    prompt's embedding reach cosine ``threshold`` with a restricted concept (embedded by the
    clean model, or given as ``concept_vectors``, one row per name in ``concepts``).

    Each concept gets a status and its reason (:func:`diverify.cmav.concept_verdict`); a bound
    the engine cannot compute on this ball certifies nothing: the attack runs and the
    engine's message is the reason of every concept it does not refute."""
    if not -1.0 <= threshold <= 1.0:
        raise DiverifyError(f"--threshold must be a cosine in [-1, 1], got {threshold}")
    if not (np.isfinite(radius) and radius >= 0):
        raise DiverifyError(f"--radius must be finite and >= 0, got {radius}")
    t0 = time.perf_counter()
    problem = edit_problem(encoder, prompt, pattern, ball, concepts, method, formulation, radius,
                           concept_vectors=concept_vectors)
    sets = problem.with_radius(radius)
    t1 = time.perf_counter()
    timed, bound_error = checked_bound(lambda: problem.bound_fn.timed(*sets))
    if timed is None:
        compile_seconds, seconds = 0.0, time.perf_counter() - t1
        upper = lower = np.full(len(concepts), np.nan)
    else:
        result, compile_seconds, seconds = timed
        upper, lower = np.asarray(result.output.upper), np.asarray(result.output.lower)
    trace_seconds = t1 - t0
    clean = np.asarray(problem.weight_fn(*[jnp.zeros(s) for s in problem.shapes]))
    attack_vals = np.full(len(concepts), -np.inf)
    edits: list = [None] * len(concepts)
    if attack and (bound_error is not None or np.any(upper >= threshold)):
        attack_vals, edits = attack_edits(problem.weight_fn, problem.shapes, problem.norm, radius,
                                          jax.random.key(seed))
    verdicts = []
    for i, c in enumerate(concepts):
        status, reason = concept_verdict(float(upper[i]), float(attack_vals[i]), threshold, attack, bound_error)
        witness = {"edit_norms": [edit_norms(np.asarray(d)) for d in edits[i]]} if status == "collision" else None
        verdicts.append(ConceptVerdict(c, status, None if bound_error else float(upper[i]),
                                       None if bound_error else float(lower[i]), float(clean[i]),
                                       float(attack_vals[i]), witness, reason))
    return EditCertificate(
        model=encoder.name, prompt=prompt.text, tokens=list(prompt.tokens), params=list(problem.paths), ball=ball,
        radius=float(radius), formulation=problem.formulation, method=problem.bound_fn.method, threshold=float(threshold),
        certified=all(v.status == "certified" for v in verdicts), concepts=verdicts,
        edited_weights=int(sum(m * n for m, n in problem.shapes)),
        bound_coordinates=int(sum(int(np.prod(s.center.shape)) for s in sets)),
        seconds=seconds, compile_seconds=trace_seconds + compile_seconds)


def edit_norms(delta: np.ndarray) -> dict:
    """The max-entry, Frobenius and nuclear norms of an edit (which ball radius it needs)."""
    delta = np.asarray(delta, np.float64)
    return {"inf": float(np.max(np.abs(delta))), "fro": float(np.linalg.norm(delta)),
            "rank1": float(np.sum(np.linalg.svd(delta, compute_uv=False)))}


@dataclasses.dataclass(frozen=True)
class EditRadius:
    """Largest radius certified by bisection and smallest radius at which the attack found a collision.

    ``certified_radius`` is sound whatever happened after it was certified;
    ``not_certified_radius`` is the smallest radius tried that was not
    (``None`` when ``--radius`` itself was certified): the true certifiable
    radius of the method lies in between.  ``stopped_early`` is set when the
    time limit ended the search before its ``bisection_steps``
    (``compile_seconds``: tracing, compilation and the first bound).
    """

    model: str
    prompt: str | None
    params: list
    ball: str
    formulation: str
    method: str
    threshold: float
    certified_radius: float
    not_certified_radius: float | None
    attack_radius: float | None
    bisection_steps: int
    stopped_early: bool
    seconds: float
    compile_seconds: float


def certified_edit_radius(encoder, prompt: Prompt, pattern: str, ball: str, concepts: Sequence[str],
                          threshold: float, radius_max: float, method: str = "crown-forward",
                          formulation: str = "auto", steps: int = 10, attack: bool = True, seed: int = 0,
                          max_seconds: float | None = None,
                          progress: Callable[[str], None] | None = None) -> EditRadius:
    """:func:`search_edit_radius` on the problem of the kernels matching ``pattern`` (traced and compiled once)."""
    if not (np.isfinite(radius_max) and radius_max > 0):
        raise DiverifyError(f"--radius must be finite and > 0 for a search, got {radius_max}")
    t0 = time.perf_counter()
    problem = edit_problem(encoder, prompt, pattern, ball, concepts, method, formulation, radius_max)
    result = search_edit_radius(problem, threshold, radius_max, steps=steps, attack=attack, seed=seed,
                                max_seconds=None if max_seconds is None else max_seconds - (time.perf_counter() - t0),
                                progress=progress)
    return dataclasses.replace(result, model=encoder.name, prompt=prompt.text, ball=ball,
                               seconds=time.perf_counter() - t0)


def search_edit_radius(problem: EditProblem, threshold: float, radius_max: float, steps: int = 10,
                       attack: bool = True, seed: int = 0, max_seconds: float | None = None,
                       progress: Callable[[str], None] | None = None) -> EditRadius:
    """Bisection in ``[0, radius_max]`` for the largest certified radius (the radius is an input of the
    compiled bound), then for the smallest radius where the attack finds a collision, if any below ``radius_max``.

    The clean model must be below ``threshold`` (checked on its own cosines,
    not with the bound).  ``progress(message)`` is called before the first
    bound (which compiles) and after every bound or attack; ``max_seconds``
    stops both bisections once that much wall time has passed (the radii
    found so far are still sound / still witnessed; ``stopped_early`` says so).
    """
    if not (np.isfinite(radius_max) and radius_max > 0):
        raise DiverifyError(f"--radius must be finite and > 0 for a search, got {radius_max}")
    if max_seconds is not None and not max_seconds > 0:
        raise DiverifyError(f"--max-seconds must be positive (and exceed the tracing time), got {max_seconds:.3g}")
    note = progress or (lambda message: None)
    t0 = time.perf_counter()
    clean = np.asarray(problem.weight_fn(*[jnp.zeros(s) for s in problem.shapes]))
    if np.any(clean >= threshold):
        raise DiverifyError(f"the clean model already reaches cosine {float(clean.max()):.4f} >= {threshold} with "
                            "a restricted concept: nothing to certify")

    failure: list[str] = []

    def certified(r):
        try:
            return bool(np.all(problem.upper(r) < threshold))
        except DiverifyError as err:
            failure[:] = [str(err)]
            return False

    def out_of_time():
        return max_seconds is not None and time.perf_counter() - t0 > max_seconds

    note(f"first bound ({problem.formulation} formulation, {problem.bound_fn.method}); its compilation "
         "can take minutes on a large model")
    start = time.perf_counter()
    top = certified(float(radius_max))
    compile_seconds = time.perf_counter() - start
    note(f"r = {radius_max:.4g}: {'certified' if top else 'not certified'} (compiled in {compile_seconds:.1f} s)")
    lo, hi, stopped = (float(radius_max), None, False) if top else (0.0, float(radius_max), False)
    if not top:
        for i in range(steps):
            if out_of_time():
                stopped = True
                break
            mid = (lo + hi) / 2
            ok = certified(mid)
            lo, hi = (mid, hi) if ok else (lo, mid)
            note(f"bisection {i + 1}/{steps}: r = {mid:.4g} {'certified' if ok else 'not certified'}")
    if lo == 0.0 and failure:
        note(f"nothing certified; the bound failed with: {failure[0]}")

    def collides(r):
        vals, _ = attack_edits(problem.weight_fn, problem.shapes, problem.norm, r, jax.random.key(seed))
        return bool(np.any(vals >= threshold))

    attack_radius = None
    if attack and not out_of_time() and collides(radius_max):
        note(f"attack: collision at r = {radius_max:.4g}")
        a_lo, a_hi = lo, float(radius_max)
        for i in range(steps):
            if out_of_time():
                stopped = True
                break
            mid = (a_lo + a_hi) / 2
            hit = collides(mid)
            a_lo, a_hi = (a_lo, mid) if hit else (mid, a_hi)
            note(f"attack bisection {i + 1}/{steps}: r = {mid:.4g} {'collision' if hit else 'none found'}")
        attack_radius = a_hi
    elif attack and out_of_time():
        stopped = True
    ball = {norm: name for name, norm in BALLS.items()}[problem.norm]
    # model and prompt are not part of a bare problem: certified_edit_radius fills them in.
    return EditRadius(model="", prompt=None, params=list(problem.paths), ball=ball, formulation=problem.formulation,
                      method=problem.bound_fn.method, threshold=float(threshold),
                      certified_radius=lo, not_certified_radius=hi, attack_radius=attack_radius,
                      bisection_steps=steps, stopped_early=stopped, seconds=time.perf_counter() - t0,
                      compile_seconds=compile_seconds)
