"""DIS for text encoders: estimator properties, the certified bound's soundness, CLI behaviour and errors."""

import functools
import json

import numpy as np
import pytest

from diverify import cli
from diverify.dis import text as dis_text
from diverify.errors import DiverifyError
from diverify.models import load_text_encoder
from tests.test_backdoor_text import write_tokenized_bert

PROMPT = "an old dog sleeping on a sofa"
#: A short prompt for the certified bound: the bound's cost grows with the sequence length.
SHORT = "a dog"
#: Substitutes planted within 1e-3 of "dog"'s word embedding, so that an l2 ball around it contains them
#: at a radius the bound engine certifies.
NEAR = ("puppy", "kitten")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from safetensors.numpy import load_file, save_file

    directory = write_tokenized_bert(tmp_path_factory.mktemp("dis") / "base")
    enc = load_text_encoder(directory)
    ids = {w: int(enc.tokenize([w])[0][0, 1]) for w in ("dog",) + NEAR}
    tensors = load_file(str(directory / "model.safetensors"))
    table = tensors["embeddings.word_embeddings.weight"]
    rng = np.random.default_rng(0)
    for w in NEAR:
        table[ids[w]] = table[ids["dog"]] + 5e-4 * rng.standard_normal(table.shape[1]).astype(np.float32)
    save_file(tensors, str(directory / "model.safetensors"))
    return load_text_encoder(directory)


def test_parse_perturbation():
    assert dis_text.parse_perturbation("trigger:cf").token == "cf"
    assert dis_text.parse_perturbation("random").kind == "random"
    sub = dis_text.parse_perturbation("substitution:dog=cat, puppy")
    assert (sub.word, sub.substitutes, sub.label) == ("dog", ("cat", "puppy"), "substitution:dog=cat,puppy")
    for bad in ("trigger:", "trigger:a b", "substitution:dog=", "substitution:=a", "swap:x", ""):
        with pytest.raises(DiverifyError):
            dis_text.parse_perturbation(bad)


def test_estimator_matches_its_definition(encoder):
    r = dis_text.text_dis(encoder, PROMPT, "random", samples=16, seed=3)
    shifts, dists = np.asarray(r.details["shifts"]), np.asarray(r.details["dists"])
    assert np.all(dists == 1) and r.dist == 1.0 and r.samples == 16
    texts, _, _ = dis_text.perturbed_prompts(encoder, PROMPT, dis_text.parse_perturbation("random"), 16, seed=3)
    from diverify.backdoors.text import embed_texts
    emb = embed_texts(encoder, encoder.params, [PROMPT] + texts)
    np.testing.assert_allclose(shifts, np.linalg.norm(emb[1:] - emb[0], axis=-1), rtol=1e-5, atol=1e-6)
    assert r.dis == pytest.approx(shifts.mean()) and r.kl == pytest.approx(np.mean(shifts ** 2) / 2)
    assert r.kl_ratio == pytest.approx(r.kl / r.dist)
    assert r.ci[0] <= r.dis <= r.ci[1] and r.ci[1] > r.ci[0]
    again = dis_text.text_dis(encoder, PROMPT, "random", samples=16, seed=3)
    assert again.details["shifts"] == r.details["shifts"]
    assert dis_text.text_dis(encoder, PROMPT, "random", samples=16, seed=4).details["shifts"] != r.details["shifts"]


def test_identity_substitution_scores_zero_and_distance_counts_occurrences(encoder):
    r = dis_text.text_dis(encoder, PROMPT, "substitution:dog=dog", samples=4)
    assert r.dis == pytest.approx(0.0, abs=1e-6) and r.ci == pytest.approx((0.0, 0.0), abs=1e-6)
    twice = dis_text.text_dis(encoder, "a dog and a dog", "substitution:dog=cat", samples=2)
    assert twice.dist == 2.0
    trig = dis_text.text_dis(encoder, PROMPT, "trigger:cf", samples=3)
    assert trig.dist == 1.0 and all("cf" in t.split() for t in trig.details["examples"])


def test_mean_interval_covers_the_mean_at_the_stated_rate():
    rng = np.random.default_rng(0)
    covered = [lo <= 1.0 <= hi for lo, hi in (dis_text.mean_interval(rng.normal(1.0, 0.3, 10)) for _ in range(400))]
    assert 0.91 <= np.mean(covered) <= 0.99
    assert dis_text.mean_interval(np.asarray([2.0])) == (2.0, 2.0)


def _unit(encoder, we, ids, mask):
    return np.asarray(_jit_unit(encoder)(we, ids, mask))


@functools.cache
def _jit_unit(encoder):
    # One compiled forward pass for all sampled points; eager dispatch per point dominated the test's time.
    import jax

    return jax.jit(lambda we, ids, mask: _jnp_unit(encoder, we, ids, mask))


def test_certified_substitution_bound_is_sound(encoder):
    import jax

    r = dis_text.text_dis(encoder, SHORT, f"substitution:dog={','.join(NEAR)}", samples=8, certify=True,
                          method="zonotope")  # sound and far cheaper than CROWN on this 1-layer encoder
    assert r.certified_upper is not None and np.isfinite(r.certified_upper)
    assert max(r.details["shifts"]) <= r.certified_upper + 1e-7
    radius, bound = r.details["certified_radius"], r.details["certified_shift"]
    ids, mask = encoder.tokenize([SHORT])
    we = np.asarray(encoder.word_embeddings(ids))
    pos = 2  # [CLS] a dog
    e0 = _unit(encoder, we, ids, mask)
    rng = np.random.default_rng(1)
    directions = [rng.standard_normal(we.shape[-1]) for _ in range(64)]
    directions += [np.sign(rng.standard_normal(we.shape[-1])) for _ in range(16)]  # corners of the inscribed cube
    start = we.copy()
    start[0, pos] += 0.5 * radius * directions[0] / np.linalg.norm(directions[0])
    objective = lambda w: ((_jnp_unit(encoder, w, ids, mask) - e0) ** 2).sum()  # noqa: E731
    directions.append(np.asarray(jax.grad(objective)(start))[0, pos])  # the gradient-attack direction
    for d in directions:
        point = we.copy()
        point[0, pos] += radius * rng.uniform(0.5, 1.0) * d / np.linalg.norm(d)
        assert np.linalg.norm(_unit(encoder, point, ids, mask) - e0) <= bound * (1 + 1e-5) + 1e-7


def _jnp_unit(encoder, we, ids, mask):
    import jax.numpy as jnp

    e = encoder.pooled_from_word_embeddings(encoder.params, we, mask, ids)[0]
    return e / jnp.linalg.norm(e)


def test_certifying_an_insertion_needs_a_radius(encoder):
    with pytest.raises(DiverifyError, match="--radius"):
        dis_text.text_dis(encoder, PROMPT, "trigger:cf", samples=2, certify=True)


def test_bad_prompts_give_clear_errors(encoder):
    with pytest.raises(DiverifyError, match="does not occur"):
        dis_text.text_dis(encoder, PROMPT, "substitution:cat=dog", samples=2)
    with pytest.raises(DiverifyError, match="single-token"):
        dis_text.text_dis(encoder, PROMPT, "substitution:dog=hippopotamuses", samples=2)
    with pytest.raises(DiverifyError, match="samples"):
        dis_text.text_dis(encoder, PROMPT, "random", samples=0)
    with pytest.raises(DiverifyError, match="empty"):
        dis_text.text_dis(encoder, "   ", "random", samples=2)


def test_cli_json_and_table(encoder, capsys):
    assert cli.main(["dis", "--model", encoder.directory, "--prompt", PROMPT, "--perturbation", "trigger:cf",
                     "--samples", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"dis", "ci", "kl", "dist", "kl_ratio", "samples"} <= set(out) and out["samples"] == 4
    assert out["perturbation"] == "trigger:cf" and out["model_kind"] == "text-encoder"
    assert cli.main(["dis", "--model", encoder.directory, "--prompt", PROMPT, "--perturbation", "random",
                     "--samples", "3"]) == 0
    assert "DIS" in capsys.readouterr().out


def test_cli_errors(encoder, tmp_path, capsys):
    base = ["dis", "--model", encoder.directory, "--prompt", PROMPT]
    for argv, message in ((base + ["--perturbation", "swap"], "expected trigger"),
                          (base + ["--perturbation", "random", "--samples", "0"], "at least 1"),
                          (base + ["--perturbation", "random", "--layers", "1"], "--certify"),
                          (["dis", "--model", str(tmp_path / "none"), "--prompt", "x", "--perturbation", "random"],
                           "does not exist")):
        assert cli.main(argv) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "diffusion_pytorch_model.safetensors").write_text("")
    assert cli.main(["dis", "--model", str(tmp_path), "--prompt", "3", "--perturbation", "random", "--certify"]) == 2
    assert "--certify" in capsys.readouterr().err
