"""Parity of the Flax BERT port with transformers' BertModel and sentence-transformers (float32, <= 1e-4)."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from diverify.models import load_text_encoder  # noqa: E402
from diverify.models.encoder import pool_tokens  # noqa: E402

ATOL = 1e-4
PROMPTS = ["a photo of a cat", "An astronaut riding a horse on the moon, highly detailed, 4k",
           "hello", "Ünïcode façade — naïve café"]


def torch_hidden(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                    attention_mask=torch.as_tensor(mask, dtype=torch.long))
    return out.last_hidden_state.numpy()


def hidden_and_pooled(enc, ids, mask):
    """Last hidden state and pooled output from the word-embedding entry points, in one compilation."""
    @jax.jit
    def run(params, word_emb):
        return (enc.hidden_from_word_embeddings(params, word_emb, mask),
                enc.pooled_from_word_embeddings(params, word_emb, mask))

    return tuple(np.asarray(x) for x in run(enc.params, enc.word_embeddings(ids)))


def padded_batch(vocab_size, lengths, seed):
    rng = np.random.default_rng(seed)
    length = max(lengths)
    ids = rng.integers(1, vocab_size, size=(len(lengths), length)).astype(np.int32)
    mask = (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    return np.where(mask == 1, ids, 0).astype(np.int32), mask


def test_minilm_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(minilm.directory, device="cpu")
    want = reference.encode(PROMPTS, convert_to_numpy=True)
    got = minilm.embed(PROMPTS)
    assert got.shape == want.shape == (len(PROMPTS), 384)
    cosine = np.sum(got * want, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosine.min() >= 0.99999
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)

    ids, mask = minilm.tokenize(PROMPTS)
    assert mask.min() == 0, "the batch must contain padding"
    hidden = np.asarray(jax.jit(minilm.hidden_from_word_embeddings)(minilm.params, minilm.word_embeddings(ids), mask))
    np.testing.assert_allclose(hidden, torch_hidden(reference[0].auto_model.eval(), ids, mask), atol=ATOL, rtol=0)


def test_minilm_tokenizer_matches_sentence_transformers(minilm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm.directory, local_files_only=True)
    ids, mask = minilm.tokenize(PROMPTS)
    want = tokenizer(PROMPTS, padding=True, truncation=True, max_length=256, return_tensors="np")
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])
    long_ids, _ = minilm.tokenize(["word " * 400])
    assert long_ids.shape == (1, 256), "sentence-transformers' max_seq_length truncates"


# (hidden_act, hidden, heads, layers, intermediate): every activation, several sizes and head counts.
CONFIGS = [("gelu", 32, 4, 2, 64), ("gelu_new", 24, 3, 1, 40), ("gelu_pytorch_tanh", 48, 6, 3, 96),
           ("relu", 16, 1, 2, 32)]


@pytest.mark.parametrize("act, hidden, heads, layers, inter", CONFIGS)
def test_random_bert_matches_transformers(tmp_path, act, hidden, heads, layers, inter):
    config = transformers.BertConfig(vocab_size=97, hidden_size=hidden, num_attention_heads=heads,
                                     num_hidden_layers=layers, intermediate_size=inter, hidden_act=act,
                                     max_position_embeddings=24, type_vocab_size=2, initializer_range=0.1)
    torch.manual_seed(layers * 100 + hidden)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():  # non-trivial LayerNorm scales and biases, so a mis-mapped one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)

    enc = load_text_encoder(tmp_path)
    assert enc.config.hidden_act == act and enc.pooling == "mean" and not enc.normalize
    ids, mask = padded_batch(config.vocab_size, [11, 7, 2], seed=hidden)
    want = torch_hidden(model, ids, mask)
    hidden, pooled = hidden_and_pooled(enc, ids, mask)
    np.testing.assert_allclose(hidden, want, atol=ATOL, rtol=0)
    m = mask[:, :, None].astype(np.float64)
    np.testing.assert_allclose(pooled, (want.astype(np.float64) * m).sum(1) / m.sum(1), atol=ATOL, rtol=0)


def test_tiny_bert_fixture_matches_transformers(tiny_bert_dir):
    enc = load_text_encoder(tiny_bert_dir)
    model = transformers.BertModel.from_pretrained(str(tiny_bert_dir)).eval()
    ids, mask = padded_batch(enc.config.vocab_size, [9, 4], seed=1)
    hidden, _ = hidden_and_pooled(enc, ids, mask)
    np.testing.assert_allclose(hidden, torch_hidden(model, ids, mask), atol=ATOL, rtol=0)


@pytest.mark.parametrize("pooling", ["cls", "max", "mean", "mean_sqrt_len", "cls+max+mean"])
def test_pooling_modes_match_float64_reference(pooling):
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], np.int32)
    h, m = hidden.astype(np.float64), mask[:, :, None].astype(np.float64)
    reference = {"cls": h[:, 0], "max": np.where(m > 0, h, -np.inf).max(1), "mean": (h * m).sum(1) / m.sum(1),
                 "mean_sqrt_len": (h * m).sum(1) / np.sqrt(m.sum(1))}
    want = np.concatenate([reference[mode] for mode in pooling.split("+")], axis=-1)
    np.testing.assert_allclose(np.asarray(pool_tokens(hidden, mask, pooling)), want, atol=1e-6, rtol=0)
