"""Zonotope bounds on a whole BERT: sound where symbolic intervals give up."""

import jax
import numpy as np
import pytest

from diverify import cmav
from diverify.bounds import compile_bounds
from diverify.errors import DiverifyError
from diverify.specs import Box
from diverify.models import load_text_encoder
from tests.bounds.sampling import check_sound

IDS = [2, 17, 250, 31, 8, 999, 64, 3]


@pytest.fixture(scope="module")
def tiny_bert(tiny_bert_dir):
    """tiny-bert's pooled output, ``ball(eps)`` on position 4, and ``compiled(method, refine)``: one
    compiled bound per method and scope for the module (the radius is data: it serves every eps)."""
    enc = load_text_encoder(tiny_bert_dir)
    prompt = cmav.make_prompt(enc, ids=IDS)
    fn = cmav.pooled_function(enc, prompt)
    ball = lambda eps: cmav.embedding_ball(enc, prompt, [4], eps)  # noqa: E731
    done = {}

    def compiled(method, refine="normalisers"):
        if (method, refine) not in done:
            done[method, refine] = compile_bounds(fn, ball(1e-4), method=method, refine=refine)
        return done[method, refine]

    return fn, ball, compiled


def test_zonotope_is_sound_on_tiny_bert_where_symbolic_intervals_fail(tiny_bert):
    """At 1e-4 the interval slack of ``forward`` loses the LayerNorm variance; fresh error symbols keep it,
    and every interior, corner and attack point stays inside the zonotope bound."""
    fn, make_ball, compiled = tiny_bert
    ball = make_ball(1e-4)
    with pytest.raises(DiverifyError, match="cannot bound"):
        compile_bounds(fn, ball, method="forward")(ball)
    out = compiled("zonotope")(ball).output
    assert float(np.mean(np.asarray(out.upper - out.lower))) < 0.05
    check_sound(fn, ball, out, jax.random.PRNGKey(0), n=64, attack_directions=2)


@pytest.mark.parametrize("method", ["zonotope", "crown-zonotope", "crown"])
def test_softmax_rows_sum_to_one_in_the_bound(method):
    """``softmax(x) @ V`` with identical rows of ``V`` is the constant row of ``V``. Bounds that
    treat each probability's relaxation error separately pay ``sum_j r_j |V_j|``; with the
    softmax's equality ``sum_j y_j = 1`` (the ``simplex`` node) the errors meet ``V_j - V_bar = 0``
    and the bound must collapse to that constant, while staying sound for a ``V`` that is not."""
    key = jax.random.PRNGKey(3)
    x0 = jax.random.normal(key, (4, 6))
    box = Box(x0 - 0.3, x0 + 0.3)
    row = jax.random.normal(jax.random.PRNGKey(4), (1, 5))
    same = jax.numpy.broadcast_to(row, (6, 5))
    bf = compile_bounds(lambda x: jax.nn.softmax(x, axis=-1) @ same, box, method=method)
    assert "simplex" in [n.name for n in bf.graph.nodes]
    out = bf(box).output
    width = np.asarray(out.upper - out.lower)
    assert width.max() < 1e-4 * float(np.abs(row).max()), width.max()
    varied = same + 0.5 * jax.random.normal(jax.random.PRNGKey(5), (6, 5))
    fn = lambda x: jax.nn.softmax(x, axis=-1) @ varied  # noqa: E731
    out = compile_bounds(fn, box, method=method)(box).output
    check_sound(fn, box, out, jax.random.PRNGKey(6), n=64, attack_directions=2)


@pytest.mark.parametrize("method", ["ibp", "zonotope", "crown-zonotope"])
def test_masked_keys_are_bounded(method):
    """A padded prompt's attention adds -1e9 to masked keys; the pairwise softmax must still be
    boundable there (the differences are clipped before exp) and stay sound, with the masked
    keys' probabilities bounded by ~0."""
    x0 = jax.random.normal(jax.random.PRNGKey(7), (3, 5))
    bias = jax.numpy.array([0.0, 0.0, 0.0, -1e9, -1e9])
    fn = lambda x: jax.nn.softmax(x + bias, axis=-1)  # noqa: E731
    box = Box(x0 - 0.05, x0 + 0.05)
    out = compile_bounds(fn, box, method=method)(box).output
    assert float(np.max(np.asarray(out.upper[:, 3:]))) < 1e-20
    assert float(np.max(np.asarray(out.upper - out.lower))) < 0.2
    check_sound(fn, box, out, jax.random.PRNGKey(8), n=64, attack_directions=2)


def _deep_tanh(x, weights):
    for w in weights:
        x = x + jax.numpy.tanh(w @ x)
    return x


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_order_reduction_keeps_large_symbols_sound_and_tighter_than_boxing(monkeypatch, precision):
    """Over the symbol budget the largest error symbols are kept and the rest boxed:
    sound at sampled, corner and attack points, and no wider than boxing every symbol."""
    from diverify.bounds import zonotope

    weights = [jax.random.normal(jax.random.PRNGKey(k), (12, 12)) * 0.6 for k in range(6)]
    fn = lambda x: _deep_tanh(x, weights)  # noqa: E731
    x0 = jax.random.normal(jax.random.PRNGKey(9), (12,))
    box = Box(x0 - 0.05, x0 + 0.05)
    widths = {}
    for keep in (0, 16):
        monkeypatch.setattr(zonotope, "SYMBOL_BUDGET", 30)
        monkeypatch.setattr(zonotope, "KEEP_SYMBOLS", keep)
        out = compile_bounds(fn, box, method="zonotope", precision=precision)(box).output
        check_sound(fn, box, out, jax.random.PRNGKey(1), n=128, attack_directions=4)
        widths[keep] = float(np.mean(np.asarray(out.upper - out.lower)))
    monkeypatch.setattr(zonotope, "SYMBOL_BUDGET", 10_000)
    full = compile_bounds(fn, box, method="zonotope", precision=precision)(box).output
    full_width = float(np.mean(np.asarray(full.upper - full.lower)))
    assert full_width <= widths[16] < widths[0], (full_width, widths)


def test_reduction_keeps_the_symbols_boxing_would_widen_most(monkeypatch):
    """Girard's criterion: a generator on one element costs nothing to box (its box is itself), so a
    reduction keeps a spread-out generator with a smaller l1 norm instead; the reduced set still holds
    every point of the original one (its corners, checked exactly)."""
    import itertools
    import jax.numpy as jnp
    from diverify.bounds import zonotope

    on_one = jnp.array([3.0, 0.0, 0.0])  # l1 3, boxing it is free
    spread = jnp.array([1.0, -1.0, 0.5])  # l1 2.5, boxing it widens by 2.5 - 1
    small = jnp.array([0.1, 0.2, -0.1])
    blocks = zonotope._Blocks({}, {})
    blocks.new((3,))
    zero = jnp.zeros(3)
    monkeypatch.setattr(zonotope, "KEEP_SYMBOLS", 1)
    kept, ids, lo, hi = zonotope._reduce_errors(jnp.stack([on_one, spread, small]), zero, zero, (3,), blocks)
    assert kept.shape == (1, 3) and len(ids) == 1
    np.testing.assert_array_equal(np.asarray(kept[0]), np.asarray(spread))
    np.testing.assert_allclose(np.asarray(hi), [3.1, 0.2, 0.1], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(lo), -np.asarray(hi))
    generators, kept_row = np.stack([on_one, spread, small]), np.asarray(spread)
    s = np.linspace(-1, 1, 2001)[:, None]  # the reduced set: s * spread + [lo, hi], s in [-1, 1]
    for signs in itertools.product([-1.0, 1.0], repeat=3):
        point = np.asarray(signs) @ generators
        gap = np.maximum(point - (s * kept_row + np.asarray(hi)), (s * kept_row + np.asarray(lo)) - point)
        assert np.min(np.max(gap, axis=1)) <= 1e-6, signs


def _branchy_residual(x, weights):
    for w in weights:
        x = x + jax.numpy.tanh(w.T @ jax.numpy.tanh(w @ x))
    return x


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_reduction_at_cuts_is_sound_and_tighter_than_inside_a_branch(monkeypatch, precision):
    """Reducing where no other live value carries error symbols (after each residual add)
    loses no correlation between values; reducing inside the branch (the hard cap) does:
    both sound, the cut reduction tighter."""
    from diverify.bounds import zonotope

    weights = [jax.random.normal(jax.random.PRNGKey(k), (12, 12)) * 0.6 for k in range(6)]
    fn = lambda x: _branchy_residual(x, weights)  # noqa: E731
    x0 = jax.random.normal(jax.random.PRNGKey(9), (12,))
    box = Box(x0 - 0.05, x0 + 0.05)
    widths = {}
    for where, (cut, cap) in {"cut": (30, 10**9), "branch": (10**9, 30)}.items():
        monkeypatch.setattr(zonotope, "CUT_BUDGET", cut)
        monkeypatch.setattr(zonotope, "SYMBOL_BUDGET", cap)
        monkeypatch.setattr(zonotope, "KEEP_SYMBOLS", 16)
        out = compile_bounds(fn, box, method="zonotope", precision=precision)(box).output
        check_sound(fn, box, out, jax.random.PRNGKey(2), n=128, attack_directions=4)
        widths[where] = float(np.mean(np.asarray(out.upper - out.lower)))
    assert widths["cut"] < 0.995 * widths["branch"], widths


@pytest.fixture(scope="module")
def small_budget(tiny_bert):
    """tiny-bert's pooled output and a 1e-4 ball on position 4, with the zonotope's symbol budget
    made small so that it boxes errors for CROWN to recover (with the default budget tiny-bert
    keeps every symbol and a refinement finds nothing to add), and ``REFINE_COSTLIEST`` made 64
    (tiny-bert's values are small). ``bound(refine)`` is ``(compiled zonotope bound, its result)``,
    compiled once per scope for the module: the tests below compare scopes pairwise."""
    from diverify.bounds import backward, zonotope

    fn, make_ball, _ = tiny_bert
    ball = make_ball(1e-4)
    done = {}

    def bound(refine):
        if refine not in done:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(zonotope, "CUT_BUDGET", 256)
                patch.setattr(zonotope, "KEEP_SYMBOLS", 64)
                patch.setattr(backward, "REFINE_COSTLIEST", 64)
                bf = compile_bounds(fn, ball, method="zonotope", refine=refine)
                done[refine] = bf, bf(ball)
        return done[refine]

    return fn, ball, bound


def test_crown_refined_variances_are_no_looser_and_keep_the_bound_sound(small_budget):
    """The zonotope method tightens LayerNorm variances and softmax denominators with CROWN: every lower bound is
    at least the plain zonotope's (``refine="none"``), the final bound no wider, and still sound. (The zonotope's
    symbol budget is made small so that it has boxed errors for CROWN to recover: with the
    default budget tiny-bert keeps every symbol and the refinement finds nothing to add.)"""
    from diverify.bounds import backward

    fn, ball, bound = small_budget
    bf, refined = bound("normalisers")
    targets = backward.refined_by_crown(bf.graph)
    assert targets
    assert backward.refined_by_crown(bf.graph, "none") == set()
    plain = bound("none")[1]  # the zonotope alone
    keys = [f"{k}:{n.name}" for k, n in enumerate(bf.graph.nodes) if set(n.outputs) & targets]
    # no lower (beyond float32 noise: tighter earlier intervals change later relaxation lines), some higher
    gain = [float(np.min(np.asarray(refined.intermediates[k].lower - plain.intermediates[k].lower)
                         / np.abs(np.asarray(plain.intermediates[k].lower)))) for k in keys]
    assert min(gain) >= -1e-5 and max(gain) > 1e-5, gain
    w = lambda r: float(np.mean(np.asarray(r.output.upper - r.output.lower)))  # noqa: E731
    assert w(refined) <= w(plain)
    check_sound(fn, ball, refined.output, jax.random.PRNGKey(3), n=64, attack_directions=2)


@pytest.mark.parametrize("scope", ["attention", "all"])
def test_wider_refinement_tightens_the_intervals_it_adds_and_stays_sound(small_budget, scope):
    """``refine="attention"`` also tightens, with CROWN, the operands of the products of two perturbed
    tensors (queries, keys, attention weights, values) and the softmax's ``exp`` inputs; ``"all"``
    every relaxation's input (the GELU inputs too). Each selects those on top of the narrower scope,
    every lower bound of theirs is at least the default's (float32 noise aside) and some are higher,
    the final bound is no wider, and it is sound at sampled, corner and attack points. (Small symbol
    budget, as above, so that there are boxed errors to recover.) An unknown scope is a clear error."""
    from diverify.bounds import backward
    from diverify.bounds.graph import Const
    from diverify.errors import DiverifyError

    fn, ball, bound = small_budget
    bf, refined = bound(scope)
    default = backward.refined_by_crown(bf.graph)
    narrower = backward.refined_by_crown(bf.graph, "attention" if scope == "all" else "normalisers")
    targets = backward.refined_by_crown(bf.graph, scope)
    extra = targets - default
    names = {n.name for n in bf.graph.nodes for v in n.inputs if not isinstance(v, Const) and v in targets - narrower}
    assert default <= narrower < targets
    expected = ("dot_general", "exp") if scope == "attention" else ("gelu",)  # tiny-bert: gelu_tanh
    assert all(any(n.startswith(e) for n in names) for e in expected), names
    plain = bound("normalisers")[1]
    keys = [f"{k}:{n.name}" for k, n in enumerate(bf.graph.nodes) if set(n.outputs) & extra]
    gain = [float(np.min(np.asarray(refined.intermediates[k].lower - plain.intermediates[k].lower)
                         / np.maximum(np.abs(np.asarray(plain.intermediates[k].lower)), 1e-3))) for k in keys]
    assert min(gain) >= -1e-5 and max(gain) > 1e-5, gain
    w = lambda r: float(np.mean(np.asarray(r.output.upper - r.output.lower)))  # noqa: E731
    assert w(refined) <= w(plain) * (1 + 1e-6)
    check_sound(fn, ball, refined.output, jax.random.PRNGKey(4), n=64, attack_directions=2)
    with pytest.raises(DiverifyError, match="refine must be one of none, normalisers, attention, costliest, all"):
        compile_bounds(fn, ball, method="zonotope", refine="everything")


def test_crown_interval_of_selected_elements_is_the_full_one_there_and_unbounded_elsewhere():
    """``crown_interval(..., elements=(k, score))`` bounds the ``k`` elements of largest score with
    the same backward passes as the full interval (chunked or not) and leaves the rest at
    ``(-inf, inf)``, which an intersection ignores."""
    from diverify.bounds import backward
    from diverify.bounds.api import _as_input_set
    from diverify.bounds.graph import trace

    w1 = jax.random.normal(jax.random.PRNGKey(5), (6, 12))
    w2 = jax.random.normal(jax.random.PRNGKey(6), (12, 10))
    fn = lambda x: jax.nn.gelu(jax.nn.gelu(x @ w1, approximate=False) @ w2, approximate=False)  # noqa: E731
    ball = _as_input_set(Box(-0.5 * np.ones(6, np.float32), 0.5 * np.ones(6, np.float32)))
    graph = trace(fn, [ball.center], [True])
    env, _ = backward.intermediate_bounds(graph, [ball], "crown")
    vid = next(n.inputs[0] for n in reversed(graph.nodes) if n.name == "gelu_erf")
    idx = next(i for i, n in enumerate(graph.nodes) if vid in n.outputs)
    full = backward.crown_interval(graph, vid, env, [ball], idx)
    score = np.asarray([6, 5, 0, 1, 0, 2, 0, 6, 5, 3], np.float32)  # the four largest: 0, 7 (6) and 1, 8 (5)
    for chunk in (4096, 2):
        lo, hi = backward.crown_interval(graph, vid, env, [ball], idx, chunk=chunk,
                                         elements=(4, jax.numpy.asarray(score)))
        picked = [0, 1, 7, 8]
        np.testing.assert_allclose(np.asarray(lo)[picked], np.asarray(full[0])[picked], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(hi)[picked], np.asarray(full[1])[picked], rtol=1e-5, atol=1e-6)
        rest = np.setdiff1d(np.arange(10), picked)
        assert np.all(np.asarray(lo)[rest] == -np.inf) and np.all(np.asarray(hi)[rest] == np.inf)


def test_relaxation_cost_weighs_a_gelu_input_by_its_curvature_and_a_product_operand_by_its_width():
    """A GELU input costs ~ |f''| w^2 / 8: wide intervals far out on either side (where the GELU
    is ~linear) cost less than narrower ones around 0; an operand of a product costs its width;
    a non-finite interval comes first."""
    from diverify.bounds import backward
    from diverify.bounds.graph import trace

    graph = trace(lambda x: jax.nn.gelu(x, approximate=False), [np.zeros(5, np.float32)], [True])
    assert [n.name for n in graph.nodes] == ["gelu_erf"]
    vid = graph.inputs[0]
    lo = jax.numpy.asarray([-0.2, 9.0, -30.0, -1.0, 0.0])
    hi = jax.numpy.asarray([0.2, 11.0, -20.0, 1.0, jax.numpy.inf])
    cost = np.asarray(backward.relaxation_cost(graph, vid, (lo, hi)))
    assert cost[4] == np.inf
    assert cost[3] > cost[0] > max(cost[1], cost[2]) and max(cost[1], cost[2]) < 1e-5
    gelu = lambda x: float(jax.nn.gelu(x, approximate=False))  # noqa: E731
    chord_gaps = [abs(gelu(x) - (gelu(-1.0) + (x + 1.0) / 2 * (gelu(1.0) - gelu(-1.0)))) for x in (-0.5, 0.0, 0.5)]
    np.testing.assert_allclose(cost[3], max(chord_gaps), rtol=1e-5)  # on [-1, 1]: at 0, 0.3413
    product = trace(lambda x: x * x[::-1], [np.zeros(3, np.float32)], [True])
    interval = (jax.numpy.zeros(3), jax.numpy.asarray([1.0, 2.0, 3.0]))
    width = np.asarray(backward.relaxation_cost(product, product.inputs[0], interval))
    np.testing.assert_allclose(width, [1.0, 2.0, 3.0])


def test_costliest_refinement_sits_between_the_default_and_all_and_stays_sound(small_budget):
    """``refine="costliest"`` refines the values of ``"all"``, of each only
    ``REFINE_COSTLIEST`` elements (made 64 here: tiny-bert's values are small): its output is no
    wider than the default's and no tighter than ``"all"``'s (float32 noise aside), and it is
    sound at sampled, corner and attack points."""
    from diverify.bounds import backward

    fn, ball, bound = small_budget
    bf, costliest = bound("costliest")
    assert backward.refined_by_crown(bf.graph, "costliest") == backward.refined_by_crown(bf.graph, "all")
    w = lambda r: float(np.mean(np.asarray(r.output.upper - r.output.lower)))  # noqa: E731
    plain, every = bound("normalisers")[1], bound("all")[1]
    widths = (w(every), w(costliest), w(plain))
    assert widths[0] <= widths[1] * (1 + 1e-5) and widths[1] <= widths[2] * (1 + 1e-5), widths
    assert w(costliest) < w(plain)
    check_sound(fn, ball, costliest.output, jax.random.PRNGKey(5), n=64, attack_directions=2)


@pytest.mark.parametrize("method", ["zonotope", "crown-zonotope"])
def test_concretising_only_the_intervals_read_keeps_the_bound(tiny_bert, monkeypatch, method):
    """Values no relaxation reads keep their interval-arithmetic interval instead of the
    form's. The bound must stay what concretising every value gives, up to the few elements
    where that interval arithmetic, now fed looser intervals, had beaten the form (float32
    noise: 2.4e-4 of the mean width on tiny-bert, 1e-2 allowed), so :func:`zonotope.intervals_read`
    may not miss a reader (without the GELU inputs the bound moves by 0.28 of the mean width)."""
    from diverify.bounds import zonotope

    fn, make_ball, compiled = tiny_bert
    ball = make_ball(1e-4)
    bf = compiled(method)
    read = zonotope.intervals_read(bf.graph)
    assert 0 < len(read) < len(bf.graph.avals) // 2
    lean = bf(ball)
    monkeypatch.setattr(zonotope, "intervals_read", lambda graph: set(graph.avals))
    full = compile_bounds(fn, ball, method=method)(ball)
    width = np.asarray(full.output.upper - full.output.lower)
    for a, b in [(lean.output.lower, full.output.lower), (lean.output.upper, full.output.upper)]:
        assert np.max(np.abs(np.asarray(a) - np.asarray(b))) <= 0.01 * np.mean(width)
    assert np.mean(np.asarray(lean.output.upper - lean.output.lower)) <= 1.001 * np.mean(width)
    check_sound(fn, ball, lean.output, jax.random.PRNGKey(5), n=64, attack_directions=2)


@pytest.mark.parametrize("method", ["forward", "zonotope"])
def test_l2_parts_keep_the_ball_geometry(method):
    """Over a small l2 ball the output's affine form bounds ||f(x) - f(c)|| by about ||J||_2 eps (the
    spectral norm), where the box around the output only gives its corner, about ||J||_F eps; sampled
    points on the sphere and gradient-ascent points never exceed the bound."""
    import jax.numpy as jnp

    from diverify.bounds import backward, zonotope
    from diverify.lipschitz import sphere_ascent
    from diverify.specs import lp_ball

    d, eps = 16, 1e-3
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(11), 3)
    w1 = jax.random.normal(k1, (d, 32)) / np.sqrt(d)
    w2 = jax.random.normal(k2, (32, d)) / np.sqrt(32)
    fn = lambda x: x + jnp.tanh(x @ w1) @ w2  # noqa: E731
    c = jax.random.normal(k3, (1, d))
    ball = lp_ball(c, eps, p=2)
    bf = compile_bounds(fn, ball, method=method)
    env, flags, forms, blocks = backward.forward_forms(bf.graph, [ball], method, output_forms=True)
    assert all(bool(f) for f in flags)
    centre, half, mats = zonotope.l2_parts(forms[0], blocks)
    ref = np.asarray(fn(c), np.float64).reshape(-1)
    bound = sum(np.linalg.norm(np.asarray(m, np.float64), 2) for m in mats) + \
        np.linalg.norm(np.abs(np.asarray(centre, np.float64) - ref) + np.asarray(half, np.float64))
    jac = np.asarray(jax.jacfwd(lambda x: fn(x[None])[0])(c[0]), np.float64)
    lo, hi = (np.asarray(v, np.float64).reshape(-1) for v in env[bf.graph.outputs[0]])
    corner = np.linalg.norm(np.maximum(hi - ref, ref - lo))
    assert bound <= 1.05 * np.linalg.norm(jac, 2) * eps
    assert corner >= 0.95 * np.linalg.norm(jac) * eps and corner > 1.5 * bound
    dirs = np.asarray(jax.random.normal(jax.random.PRNGKey(12), (500, d)))
    points = np.asarray(c) + eps * dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    sampled = np.linalg.norm(np.asarray(jax.vmap(lambda x: fn(x[None])[0])(points), np.float64) - ref, axis=1)
    ascent = jax.jit(jax.value_and_grad(lambda dx: jnp.linalg.norm(fn(c + dx) - fn(c))))
    attacked = sphere_ascent(ascent, c, eps, jax.random.PRNGKey(13), steps=30)
    assert max(sampled.max(), attacked) <= bound
    assert attacked >= 0.99 * np.linalg.norm(jac, 2) * eps  # the bound is within 5% of an attained value


def test_error_rows_of_different_blocks_are_aligned_before_they_add():
    """Each value keeps its error symbols as the rows of one tensor; adding two values
    that carry different blocks lays both out as the union (zero rows where a value
    lacks a block), so a shared block's rows add and the others pass through."""
    import jax.numpy as jnp
    from diverify.bounds import zonotope

    blocks = zonotope._Blocks({}, {})
    a, b, c = blocks.new((2,)), blocks.new((3,)), blocks.new((1,))
    x = np.arange(3 * 4, dtype=np.float32).reshape(3, 4)  # blocks a (rows 0-1), c (row 2)
    y = -np.arange(4 * 4, dtype=np.float32).reshape(4, 4) - 100  # blocks b (rows 0-2), c (row 3)
    total, layout = zonotope._sum_errors([(jnp.asarray(x), (a, c)), (jnp.asarray(y), (b, c))], blocks)
    assert layout == (a, b, c)
    expected = np.concatenate([x[:2], y[:3], x[2:] + y[3:]])
    np.testing.assert_array_equal(np.asarray(total), expected)
    xs = jnp.asarray(x)
    assert zonotope._aligned(xs, (a, c), (a, c), blocks) is xs  # same layout: no copy
    np.testing.assert_array_equal(np.asarray(zonotope._aligned(jnp.asarray(x), (a, c), (a, b, c), blocks)),
                                  np.concatenate([x[:2], np.zeros((3, 4)), x[2:]]))


def test_the_symbol_budget_is_a_parameter_sound_at_every_value():
    """``compile_bounds(..., symbols=N)``: a reduction keeps N error symbols (cut at N + 1024, cap
    2N); every budget is sound, a larger one no wider, and a budget below 1 is refused."""
    from diverify.errors import DiverifyError

    weights = [jax.random.normal(jax.random.PRNGKey(k), (12, 12)) * 0.6 for k in range(6)]
    fn = lambda x: _deep_tanh(x, weights)  # noqa: E731
    x0 = jax.random.normal(jax.random.PRNGKey(9), (12,))
    box = Box(x0 - 0.05, x0 + 0.05)
    widths = {}
    for symbols in (2, 8, None):
        bf = compile_bounds(fn, box, method="zonotope", symbols=symbols)
        assert bf.symbols == symbols
        out = bf(box).output
        check_sound(fn, box, out, jax.random.PRNGKey(1), n=128, attack_directions=4)
        widths[symbols] = float(np.mean(np.asarray(out.upper - out.lower)))
    assert widths[None] <= widths[8] < widths[2], widths
    for bad in (0, -3, 2.5):
        with pytest.raises(DiverifyError, match="symbols"):
            compile_bounds(fn, box, method="zonotope", symbols=bad)


def _norm_stack(x, weights):
    """Three of (residual tanh layer, LayerNorm), then the mean over tokens."""
    from diverify.models.layers import layer_norm

    ones, zeros = jax.numpy.ones(x.shape[-1]), jax.numpy.zeros(x.shape[-1])
    for w in weights:
        x = layer_norm(x + jax.numpy.tanh(x @ w), ones, zeros, 1e-5)
    return jax.numpy.mean(x, axis=0)


def _softmax_norm_stack(x, weights):
    """:func:`_norm_stack` with a softmax attention in front of each residual tanh layer."""
    from diverify.models.layers import layer_norm

    ones, zeros = jax.numpy.ones(x.shape[-1]), jax.numpy.zeros(x.shape[-1])
    for w in weights:
        attention = jax.nn.softmax(x @ w @ x.T, axis=-1) @ x
        x = layer_norm(x + jax.numpy.tanh(attention @ w), ones, zeros, 1e-5)
    return jax.numpy.mean(x, axis=0)


@pytest.mark.parametrize("precision", ["float32", "float64", "mixed"])
def test_slack_read_only_by_elementwise_nodes_makes_no_rows_and_the_same_bound(monkeypatch, precision):
    """Slack that only an elementwise node (or a ``reduce_sum``) reads is passed on as slack
    (:func:`~diverify.bounds.zonotope.slack_carriers`) instead of becoming a fresh block: a
    variance's squares, the pairwise softmax's clip and ``exp``, a residual branch's ``tanh``.
    The bound is the same as with a fresh block at every relaxation (generators along one
    element add up exactly) up to the rounding of the error coefficients' type, with far fewer
    error symbols, and sound."""
    from diverify.bounds import zonotope

    weights = [jax.random.normal(jax.random.PRNGKey(k), (16, 16)) * 0.3 for k in range(2)]
    fn = lambda x: _softmax_norm_stack(x, weights)  # noqa: E731
    x0 = jax.random.normal(jax.random.PRNGKey(3), (5, 16))
    box = Box(x0 - 0.002, x0 + 0.002)
    made = []
    real = zonotope._fresh

    def spy(v, blocks, budget=None):
        out = real(v, blocks, budget)
        made.append(zonotope._error_symbols(out) - zonotope._error_symbols(v))
        return out

    monkeypatch.setattr(zonotope, "_fresh", spy)
    lean = compile_bounds(fn, box, method="zonotope", precision=precision)(box).output
    lean_symbols, made[:] = sum(made), []
    check_sound(fn, box, lean, jax.random.PRNGKey(4), n=128, attack_directions=4)
    monkeypatch.setattr(zonotope, "slack_carriers", lambda graph: set())
    full = compile_bounds(fn, box, method="zonotope", precision=precision)(box).output
    # A fresh block at every relaxation makes 1250 symbols (per layer the pairwise softmax's clip
    # and exp 2 x 125, the tanh's and the squares' 80 each, ...); carried slack (chains of at
    # most CARRY_CHAIN values) leaves 786.
    assert lean_symbols < 0.7 * sum(made), (lean_symbols, sum(made))
    width = float(np.mean(np.asarray(full.upper - full.lower)))
    assert np.isfinite(width) and width > 0
    tol = (1e-9 if precision == "float64" else 1e-4) * width
    for a, b in [(lean.lower, full.lower), (lean.upper, full.upper)]:
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=tol)


def test_crown_zonotope_refines_normalisers_before_any_reduction_and_zonotope_waits(tiny_bert):
    """With the default budget tiny-bert never reduces (no symbol is boxed). ``zonotope`` then calls no
    CROWN refinement (its intervals are those of ``refine="none"``), ``crown-zonotope`` refines the
    normalisers from the first node: at 1e-3 their lower bounds are at least its unrefined ones and
    some higher (CROWN's relaxations beat the zonotope's far from linear), and the bound is sound."""
    from diverify.bounds import backward

    fn, make_ball, compiled = tiny_bert
    ball = make_ball(1e-3)
    zono, zono_plain = (compiled("zonotope", r)(ball) for r in ("normalisers", "none"))
    for k in zono.intermediates:
        np.testing.assert_array_equal(np.asarray(zono.intermediates[k].lower),
                                      np.asarray(zono_plain.intermediates[k].lower))
    bf = compiled("crown-zonotope")
    early, plain = bf(ball), compiled("crown-zonotope", "none")(ball)
    targets = backward.refined_by_crown(bf.graph)
    keys = [f"{k}:{n.name}" for k, n in enumerate(bf.graph.nodes) if set(n.outputs) & targets]
    gain = [np.asarray(early.intermediates[k].lower - plain.intermediates[k].lower)
            / np.abs(np.asarray(plain.intermediates[k].lower)) for k in keys]
    assert keys and min(float(g.min()) for g in gain) >= -1e-5  # float32 noise aside
    assert max(float(g.max()) for g in gain) > 1e-3, [float(g.max()) for g in gain]
    check_sound(fn, ball, early.output, jax.random.PRNGKey(5), n=64, attack_directions=2)
