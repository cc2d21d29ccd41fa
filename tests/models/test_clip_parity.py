"""Parity of the Flax CLIP text port with transformers' CLIP text models (float32, <= 1e-4), with padding."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from diverify.models import load_text_encoder  # noqa: E402
from diverify.models.clip import eos_one_hot  # noqa: E402

ATOL = 1e-4
VOCAB = 99
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, projection_dim=24, initializer_factor=3.0)


def batch(eos_id: int, pad_id: int, lengths=(10, 6, 3), seed=0):
    """Random bodies ending in ``eos_id``, right-padded with ``pad_id``."""
    rng = np.random.default_rng(seed)
    length = max(lengths)
    ids = np.full((len(lengths), length), pad_id, np.int32)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n - 1] = rng.integers(3, VOCAB - 3, size=n - 1)
        ids[row, n - 1] = eos_id
        mask[row, :n] = 1
    return ids, mask


def perturb(model):
    """Non-trivial LayerNorm scales and biases, so that a mis-mapped one shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def ours(enc, ids, mask):
    @jax.jit
    def run(params, word_emb):
        return (enc.hidden_from_word_embeddings(params, word_emb, mask),
                enc.pooled_from_word_embeddings(params, word_emb, mask, ids))

    return tuple(np.asarray(x) for x in run(enc.params, enc.word_embeddings(ids)))


def torch_inputs(ids, mask):
    return dict(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask))


def test_clip_text_model_legacy_eos(tmp_path):
    """eos_token_id == 2 (pre-#24773 configs): the pooled token is the one with the largest id."""
    config = transformers.CLIPTextConfig(**TEXT, hidden_act="quick_gelu", eos_token_id=2, pad_token_id=1)
    torch.manual_seed(0)
    model = perturb(transformers.CLIPTextModel(config))
    model.save_pretrained(tmp_path)
    enc = load_text_encoder(tmp_path)
    assert enc.arch == "clip" and enc.pooling == "eos" and enc.config.projection_dim is None
    ids, mask = batch(eos_id=VOCAB - 1, pad_id=1)
    with torch.no_grad():
        out = model(**torch_inputs(ids, mask))
    hidden, pooled = ours(enc, ids, mask)
    np.testing.assert_allclose(hidden, out.last_hidden_state.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(enc.embed_ids(ids, mask)), pooled, atol=1e-6, rtol=0)


def test_clip_text_model_with_projection(tmp_path):
    """eos_token_id != 2: the first position of eos_token_id, here also the padding id."""
    eos = VOCAB - 2
    config = transformers.CLIPTextConfig(**TEXT, hidden_act="gelu", eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(0)
    model = perturb(transformers.CLIPTextModelWithProjection(config))
    model.save_pretrained(tmp_path)
    enc = load_text_encoder(tmp_path)
    assert enc.config.projection_dim == 24 and enc.embedding_dim == 24
    ids, mask = batch(eos_id=eos, pad_id=eos)
    ids[0, 2] = VOCAB - 1  # a larger id before EOS: the legacy rule would pick it, the current one must not
    with torch.no_grad():
        out = model(**torch_inputs(ids, mask))
    hidden, pooled = ours(enc, ids, mask)
    np.testing.assert_allclose(hidden, out.last_hidden_state.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(pooled, out.text_embeds.numpy(), atol=ATOL, rtol=0)


def test_full_clip_model_text_tower(tmp_path):
    text = dict(TEXT, hidden_act="quick_gelu", eos_token_id=VOCAB - 1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=16)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=12)
    torch.manual_seed(0)
    model = perturb(transformers.CLIPModel(config))
    model.save_pretrained(tmp_path)
    enc = load_text_encoder(tmp_path)
    assert enc.config.projection_dim == 12
    ids, mask = batch(eos_id=VOCAB - 1, pad_id=1, lengths=(4, 8))
    with torch.no_grad():
        features = model.get_text_features(**torch_inputs(ids, mask))
    features = getattr(features, "pooler_output", features).numpy()
    _, pooled = ours(enc, ids, mask)
    np.testing.assert_allclose(pooled, features, atol=ATOL, rtol=0)


@pytest.mark.parametrize("eos_token_id", [2, 7])
def test_eos_one_hot_rule(eos_token_id):
    ids = np.array([[5, 9, 7, 7, 1], [7, 3, 40, 2, 0]], np.int32)
    want = np.argmax(ids, -1) if eos_token_id == 2 else np.argmax(ids == eos_token_id, -1)
    onehot = eos_one_hot(ids, eos_token_id)
    np.testing.assert_array_equal(onehot.argmax(-1), want)
    np.testing.assert_array_equal(onehot.sum(-1), 1)
    np.testing.assert_array_equal(np.asarray(jax.jit(eos_one_hot, static_argnums=1)(ids, eos_token_id)), onehot)
