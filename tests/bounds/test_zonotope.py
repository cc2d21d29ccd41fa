"""Zonotope bounds on a whole BERT: sound where symbolic intervals give up."""

import jax
import numpy as np
import pytest

from diverify import cmav
from diverify.bounds import compile_bounds
from diverify.errors import DiverifyError
from diverify.models import load_text_encoder
from tests.bounds.sampling import check_sound

IDS = [2, 17, 250, 31, 8, 999, 64, 3]


def test_zonotope_is_sound_on_tiny_bert_where_symbolic_intervals_fail(tiny_bert_dir):
    """At 1e-4 the interval slack of ``forward`` loses the LayerNorm variance; fresh error symbols keep it,
    and every interior, corner and attack point stays inside the zonotope bound."""
    enc = load_text_encoder(tiny_bert_dir)
    prompt = cmav.make_prompt(enc, ids=IDS)
    fn = cmav.pooled_function(enc, prompt)
    ball = cmav.embedding_ball(enc, prompt, [4], 1e-4)
    with pytest.raises(DiverifyError, match="cannot bound"):
        compile_bounds(fn, ball, method="forward")(ball)
    out = compile_bounds(fn, ball, method="zonotope")(ball).output
    assert float(np.mean(np.asarray(out.upper - out.lower))) < 0.05
    check_sound(fn, ball, out, jax.random.PRNGKey(0), n=64, attack_directions=2)
