"""``precision="float64"``: sound on a whole BERT, tighter than float32 at small radii, float32 results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diverify import cmav
from diverify.bounds import compile_bounds
from diverify.errors import DiverifyError
from diverify.models import load_text_encoder
from diverify.specs import Box
from tests.bounds.sampling import check_sound

IDS = [2, 17, 250, 31, 8, 999, 64, 3]


def test_float64_bounds_tiny_bert_soundly_and_tighter_at_small_eps(tiny_bert_dir):
    enc = load_text_encoder(tiny_bert_dir)
    prompt = cmav.make_prompt(enc, ids=IDS)
    fn = cmav.pooled_function(enc, prompt)
    ball = cmav.embedding_ball(enc, prompt, [4], 1e-6)
    out = {p: compile_bounds(fn, ball, method="crown-zonotope", precision=p)(ball).output for p in ("float32", "float64")}
    assert out["float64"].lower.dtype == jnp.float32  # rounded outward to float32
    check_sound(fn, ball, out["float64"], jax.random.PRNGKey(0), n=64, attack_directions=2)
    w32, w64 = (float(np.mean(np.asarray(o.upper - o.lower))) for o in out.values())
    assert w64 < 0.8 * w32, (w32, w64)


def test_float64_results_round_outward():
    x = jnp.asarray([1.0, 2.0])
    box = Box(x - 1e-9, x + 1e-9)
    out = compile_bounds(lambda v: v / 3.0, box, method="ibp", precision="float64")(box).output
    lo, hi = np.asarray(out.lower, np.float64), np.asarray(out.upper, np.float64)
    truth = np.array([1.0, 2.0]) / 3.0
    assert np.all(lo < truth) and np.all(truth < hi)
    assert np.all(hi - lo <= 4 * np.spacing(truth.astype(np.float32)))


def test_float64_rejects_a_cast_down_to_float32_and_unknown_precision():
    box = Box(jnp.zeros(3), jnp.ones(3))
    with pytest.raises(DiverifyError, match="casts a perturbed value from float64 to float32"):
        compile_bounds(lambda v: jnp.tanh(v.astype(jnp.float32)), box, method="ibp", precision="float64")
    with pytest.raises(DiverifyError, match="from float32 to bfloat16"):
        compile_bounds(lambda v: jnp.tanh(v.astype(jnp.bfloat16)), box, method="ibp")
    with pytest.raises(DiverifyError, match="unknown precision"):
        compile_bounds(jnp.tanh, box, precision="float16")
