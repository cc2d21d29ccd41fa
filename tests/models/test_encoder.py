"""The TextEncoder API: entry points agree, truncation, traced graph, pipeline, input checks."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from diverify.errors import DiverifyError
from diverify.models import load_text_encoder
from diverify.models.encoder import MINILM_ID

IDS = np.array([[3, 14, 15, 9, 26, 5], [35, 8, 9, 7, 0, 0]], np.int32)
MASK = (np.arange(6)[None, :] < np.array([[6], [4]])).astype(np.int32)


def test_word_embedding_entry_equals_id_entry(bert_dir):
    enc = load_text_encoder(bert_dir)
    word_emb = enc.word_embeddings(IDS)
    table = np.asarray(enc.params["embeddings"]["word_embeddings"]["embedding"])
    np.testing.assert_array_equal(np.asarray(word_emb), table[IDS])
    pooled = jax.jit(lambda p, w: enc.pooled_from_word_embeddings(p, w, MASK))(enc.params, word_emb)
    np.testing.assert_allclose(np.asarray(enc.embed_ids(IDS, MASK)), np.asarray(pooled), atol=1e-6, rtol=0)


def test_hidden_is_a_clean_graph(bert_dir):
    enc = load_text_encoder(bert_dir)
    word_emb = enc.word_embeddings(IDS)
    closed = jax.make_jaxpr(lambda p, w: enc.hidden_from_word_embeddings(p, w, MASK))(enc.params, word_emb)
    primitives = {eqn.primitive.name for eqn in closed.jaxpr.eqns}
    assert not primitives & {"gather", "scatter", "scatter-add", "while", "cond", "dynamic_slice"}, primitives
    assert {"rsqrt", "exp", "dot_general"} <= primitives
    # the mask is a constant of the graph, not an input: params + word embeddings only
    assert len(closed.jaxpr.invars) == len(jax.tree_util.tree_leaves(enc.params)) + 1


def test_with_layers_matches_transformers_hidden_state(bert_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    enc = load_text_encoder(bert_dir)
    one = enc.with_layers(1)
    assert one.num_layers == 1 and "layer_1" not in one.params["encoder"] and "layer_1" in enc.params["encoder"]
    model = transformers.BertModel.from_pretrained(str(bert_dir), add_pooling_layer=False).eval()
    with torch.no_grad():
        states = model(input_ids=torch.as_tensor(IDS, dtype=torch.long), attention_mask=torch.as_tensor(MASK),
                       output_hidden_states=True).hidden_states
    got = jax.jit(one.hidden_from_word_embeddings)(one.params, one.word_embeddings(IDS), MASK)
    np.testing.assert_allclose(np.asarray(got), states[1].numpy(), atol=1e-4, rtol=0)
    for bad in (0, 3):
        with pytest.raises(DiverifyError, match="with_layers"):
            enc.with_layers(bad)


def test_replacing_params_changes_the_embedding(bert_dir):
    enc = load_text_encoder(bert_dir)
    scaled = jax.tree_util.tree_map(lambda x: x * 1.1, enc.params)
    other = dataclasses.replace(enc, params=scaled)
    assert not np.allclose(np.asarray(other.embed_ids(IDS, MASK)), np.asarray(enc.embed_ids(IDS, MASK)))


def test_sentence_transformers_pipeline_cls_normalize(bert_dir):
    (bert_dir / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (bert_dir / "1_Pooling").mkdir()
    (bert_dir / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 16, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    (bert_dir / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8}))
    enc = load_text_encoder(bert_dir)
    assert (enc.pooling, enc.normalize, enc.max_seq_length) == ("cls", True, 8)
    hidden = np.asarray(enc.hidden_from_word_embeddings(enc.params, enc.word_embeddings(IDS), MASK))
    want = hidden[:, 0] / np.linalg.norm(hidden[:, 0].astype(np.float64), axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(enc.embed_ids(IDS, MASK)), want, atol=1e-5, rtol=0)


def test_bad_ids_and_missing_tokenizer(bert_dir):
    enc = load_text_encoder(bert_dir)
    assert not enc.has_tokenizer
    with pytest.raises(DiverifyError, match="no tokenizer"):
        enc.tokenize(["a cat"])
    with pytest.raises(DiverifyError, match="token id 50 is outside the vocabulary"):
        enc.embed_ids([[1, 50]])
    with pytest.raises(DiverifyError, match="token id -1"):
        enc.word_embeddings([[1, -1]])
    with pytest.raises(DiverifyError, match="integer"):
        enc.embed_ids(np.array([[1.5, 2.0]]))
    with pytest.raises(DiverifyError, match="attention mask of shape"):
        enc.embed_ids(IDS, MASK[:, :3])
    with pytest.raises(DiverifyError, match="max_position_embeddings 16"):
        enc.embed_ids(np.ones((1, 17), np.int32))


def test_minilm_resolution_and_tokenizer(minilm):
    assert minilm.name == MINILM_ID and minilm.arch == "bert"
    assert (minilm.pooling, minilm.normalize, minilm.max_seq_length) == ("mean", True, 256)
    assert minilm.has_tokenizer and minilm.embedding_dim == 384 and minilm.num_layers == 6
    ids, mask = minilm.tokenize(["a photo of a cat", "a cat"])
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape and ids.shape[0] == 2
    assert ids[0, 0] == 101 and mask[1].sum() < mask[0].sum()
    with pytest.raises(DiverifyError, match="non-empty list of strings"):
        minilm.tokenize("a photo of a cat")
    for alias in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        assert load_text_encoder(alias).directory == minilm.directory
