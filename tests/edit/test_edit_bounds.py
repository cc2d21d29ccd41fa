"""Formal edit certificates on a small random BERT: sampled edits never beat the bound, radius, errors.

Compiling a bound of a whole BERT dominates the cost, so each test compiles
one problem and reuses it at several radii (the radius is an input).
The exactness of each ball's concretisation is tested in test_matrix_ball.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diverify import cmav, edit_bounds
from diverify.errors import DiverifyError
from diverify.models import load_text_encoder
from tests.conftest import write_bert_checkpoint
from tests.edit.test_matrix_ball import ball_points

IDS = [2, 7, 11, 5, 3]
VALUE = "encoder/layer_0/attention/self/value/kernel"
FFN_OUT = "encoder/layer_0/output/dense/kernel"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("edit-bert")
    write_bert_checkpoint(d, seed=4, num_hidden_layers=1)
    enc = load_text_encoder(str(d))
    prompt = cmav.make_prompt(enc, ids=IDS)
    target = enc.embed_ids(jnp.asarray([[2, 9, 4, 3]]))
    return enc, prompt, target / jnp.linalg.norm(target)


def assert_sound(problem, radius, seed):
    """Random, extreme and attack edits inside the ball stay within the certified interval."""
    result = problem.bound_fn(*problem.with_radius(radius)).output
    upper, lower = np.asarray(result.upper), np.asarray(result.lower)
    per_matrix = [ball_points(seed + i, s, problem.norm, radius, 40) for i, s in enumerate(problem.shapes)]
    values = np.asarray(jax.vmap(problem.weight_fn)(*[jnp.asarray(p, jnp.float32) for p in per_matrix]))
    attack, edits = edit_bounds.attack_edits(problem.weight_fn, problem.shapes, problem.norm, radius,
                                             jax.random.key(seed), steps=20, restarts=1)
    name = {"nuclear": "rank1"}.get(problem.norm, problem.norm)
    assert all(edit_bounds.edit_norms(d)[name] <= radius * (1 + 1e-4) for d in edits[0])
    clean = float(problem.weight_fn(*[jnp.zeros(s) for s in problem.shapes])[0])
    tol = 1e-5
    assert np.all(values <= upper + tol) and np.all(values >= lower - tol)
    assert attack[0] <= upper[0] + tol
    # not vacuous: the attack moves the cosine and the bound stays informative
    assert attack[0] > clean and upper[0] - lower[0] < 0.5
    return upper[0], attack[0], clean


def test_rank_one_edits_of_a_projection_never_exceed_the_bound_and_the_radius_search(setup):
    enc, prompt, target = setup
    problem = edit_bounds.edit_problem(enc, prompt, VALUE, "rank1", method="crown-forward", concept_vectors=target)
    assert problem.formulation == "image"
    upper, attack, clean = assert_sound(problem, 2e-2, seed=5)
    # bisection on the threshold just above the clean cosine: the certified radius is below the attack's
    threshold = clean + 0.3 * (upper - clean)
    messages = []
    found = edit_bounds.search_edit_radius(problem, threshold, 2e-2, steps=8, attack=False, progress=messages.append)
    assert "first bound" in messages[0] and len(messages) == 2 + 8 and not found.stopped_early
    lo, hi = found.certified_radius, found.not_certified_radius
    assert 0 < lo < hi <= 2e-2 and hi - lo == pytest.approx(2e-2 / 2**8)
    assert problem.upper(lo)[0] < threshold <= problem.upper(hi)[0]
    vals, _ = edit_bounds.attack_edits(problem.weight_fn, problem.shapes, "nuclear", lo, jax.random.key(0), steps=20)
    assert vals[0] < threshold
    # A time limit already spent stops after the first bound: nothing certified, but an honest bracket.
    cut = edit_bounds.search_edit_radius(problem, threshold, 2e-2, steps=8, attack=True, max_seconds=1e-9)
    assert cut.stopped_early and cut.attack_radius is None
    assert (cut.certified_radius, cut.not_certified_radius) == (0.0, 2e-2)
    with pytest.raises(DiverifyError, match="already reaches cosine"):
        edit_bounds.search_edit_radius(problem, clean - 1e-3, 2e-2, steps=2, attack=False)


def test_two_matrices_where_one_multiplies_the_others_output(setup):
    enc, prompt, target = setup
    problem = edit_bounds.edit_problem(enc, prompt, f"{VALUE},{FFN_OUT}", "fro", method="crown-forward",
                                       concept_vectors=target)
    assert problem.formulation == "weights" and len(problem.shapes) == 2
    assert_sound(problem, 1e-2, seed=3)


def test_bad_selections_are_clear_errors(setup):
    enc, prompt, target = setup
    with pytest.raises(DiverifyError, match="not a Dense kernel"):
        edit_bounds.edit_problem(enc, prompt, "*value/bias", "fro", concept_vectors=target)
    with pytest.raises(DiverifyError, match="one edited matrix"):
        edit_bounds.edit_problem(enc, prompt, f"{VALUE},{FFN_OUT}", "fro", formulation="image", concept_vectors=target)
    with pytest.raises(DiverifyError, match="unknown edit ball"):
        edit_bounds.edit_problem(enc, prompt, VALUE, "l3", concept_vectors=target)
    with pytest.raises(DiverifyError, match="matches no parameter"):
        edit_bounds.edit_problem(enc, prompt, "*nothing*", "fro", concept_vectors=target)


def test_certify_edit_verdicts_state_their_reason(setup):
    """A tiny ball is certified with the bound in its reason; a huge one is refuted by the
    attack or left unknown, and says which (no bound: the engine's message)."""
    enc, prompt, target = setup
    tiny = edit_bounds.certify_edit(enc, prompt, VALUE, "rank1", 1e-6, ["t"], threshold=0.999,
                                    concept_vectors=target)
    (v,) = tiny.concepts
    assert tiny.certified and v.status == "certified" and v.reason.startswith("cosine upper bound")
    threshold = v.cosine_clean + 0.02
    huge = edit_bounds.certify_edit(enc, prompt, VALUE, "fro", 1e3, ["t"], threshold=threshold,
                                    concept_vectors=target)
    (w,) = huge.concepts
    assert not huge.certified and w.status in ("collision", "unknown")
    if w.status == "collision":
        assert "attack reached" in w.reason and w.witness["edit_norms"][0]["fro"] <= 1e3 * (1 + 1e-4)
    else:
        assert w.reason.startswith("no bound:") == (w.cosine_upper is None)
