"""Text-encoder predicates, the ROME-style edit and ``diverify cws`` on the tiny BERT fixture."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diverify.cli import main
from diverify.cws import predicates
from diverify.cws.certificate import apply_edit, dense_inputs, rome_style_edit
from diverify.cws.sampling import restrict_rows, weight_perturbation
from diverify.errors import DiverifyError

KERNEL = "encoder/layer_0/attention/self/value/kernel"


def test_insert_trigger_positions():
    assert predicates.insert_trigger("a photo of a cat", "cf") == "cf a photo of a cat"
    assert predicates.insert_trigger("a photo of a cat", "cf", 2) == "a photo cf of a cat"
    assert predicates.insert_trigger("a photo of a cat", "cf", -1) == "a photo of a cat cf"
    with pytest.raises(DiverifyError, match="--position"):
        predicates.insert_trigger("a cat", "cf", 5)


def test_collision_predicate_matches_the_encoders_own_embeddings(encoder):
    embedded = encoder.embed(["cf a photo of a cat", "a dog"])
    cos = float(embedded[0] @ embedded[1] / np.linalg.norm(embedded[0]) / np.linalg.norm(embedded[1]))
    # The clean-weight cosine is the same for both target modes: one side of the threshold each.
    below = predicates.text_collision_predicate(encoder, "a photo of a cat", "cf", "a dog", cos - 1e-3)
    above = predicates.text_collision_predicate(encoder, "a photo of a cat", "cf", "a dog", cos + 1e-3,
                                                target_with_noisy_weights=True)
    assert bool(jax.jit(below)(encoder.params)) and not bool(jax.jit(above)(encoder.params))


def test_skipped_embedding_rows_cannot_change_the_predicate(encoder):
    texts = ["cf a photo of a cat"]
    rows = predicates.rows_read_by_texts(encoder, texts)
    table = "embeddings/word_embeddings/embedding"
    assert set(rows) == {table, "embeddings/position_embeddings/embedding"}
    ids, _ = encoder.tokenize(texts)
    assert rows[table] == tuple(sorted(set(ids[0].tolist())))
    pert = restrict_rows(weight_perturbation(encoder.params), rows)
    assert pert.num_weights - pert.num_coordinates == (1000 - len(rows[table])) * 64 + (64 - ids.shape[1]) * 64
    unread = [i for i in range(1000) if i not in rows[table]]
    params = jax.tree_util.tree_map(lambda x: x, encoder.params)
    params["embeddings"]["word_embeddings"]["embedding"] = (
        params["embeddings"]["word_embeddings"]["embedding"].at[np.array(unread)].add(100.0))
    embed = jax.jit(predicates.text_embedding_fn(encoder, texts[0]))
    np.testing.assert_array_equal(embed(params), embed(encoder.params))


def test_rome_style_edit_maps_the_trigger_key_to_the_target_value(encoder):
    edit = rome_style_edit(encoder, KERNEL, "cf a photo of a cat", "cf", "a dog")
    kernel = encoder.params["encoder"]["layer_0"]["attention"]["self"]["value"]["kernel"]
    k_star = dense_inputs(encoder, "cf a photo of a cat", KERNEL)[1]
    k_target = dense_inputs(encoder, "a dog", KERNEL)[2]
    np.testing.assert_allclose(k_star @ (kernel + edit.delta), k_target @ kernel, atol=1e-5)
    assert np.linalg.matrix_rank(np.asarray(edit.delta, np.float64), tol=1e-6) == 1
    assert edit.fro_norm == pytest.approx(float(jnp.linalg.norm(edit.delta)), rel=1e-5)
    assert edit.rank_one_coordinate_norm == pytest.approx(np.sqrt(2 * edit.fro_norm))
    edited = apply_edit(encoder.params, edit)
    np.testing.assert_array_equal(edited["encoder"]["layer_0"]["attention"]["self"]["value"]["kernel"],
                                  kernel + edit.delta)
    np.testing.assert_array_equal(edited["encoder"]["layer_0"]["attention"]["self"]["key"]["kernel"],
                                  encoder.params["encoder"]["layer_0"]["attention"]["self"]["key"]["kernel"])
    with pytest.raises(DiverifyError, match="not a parameter"):
        rome_style_edit(encoder, "encoder/nope/kernel", "cf a cat", "cf", "a dog")


def test_cli_json_certificate_and_errors(tiny_dir, capsys):
    argv = ["cws", "--model", tiny_dir, "--prompt", "a photo of a cat", "--trigger", "cf", "--target", "a dog",
            "--threshold", "0.8", "--sigma", "0.05", "--samples", "24", "--batch", "24", "--alpha", "0.01",
            "--params", "*attention/self/value/kernel", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("p_hat", "p_upper", "n", "k", "sigma", "alpha", "p_max", "certified_edit_radius", "params",
                "num_perturbed_params", "samples_per_second", "seconds", "model_hash"):
        assert key in out
    assert out["n"] == 24 and out["num_perturbed_params"] == 2 * 64 * 64
    assert out["p_hat"] == out["k"] / 24
    from scipy import stats

    from diverify.cws.stats import clopper_pearson_upper
    assert out["p_upper"] == clopper_pearson_upper(out["k"], 24, 0.01)
    expected_radius = max(0.0, 0.05 * (stats.norm.ppf(0.5) - stats.norm.ppf(out["p_upper"])))
    assert out["certified_edit_radius"] == pytest.approx(expected_radius)

    assert main(argv[:-3] + ["--params", "*cross_attn*"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matches no parameter" in err[0] and "embeddings/" in err[0]
