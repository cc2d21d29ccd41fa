"""The text-encoder backdoor fixtures: the trigger takes, the clean twin does not respond, checkpoints round-trip.

A 1-layer random BERT with MiniLM's tokenizer stands in for MiniLM (the same builder code path, seconds
instead of minutes); it is built once per module through the CLI.
"""

import json
import shutil

import numpy as np
import pytest

from diverify import cli
from diverify.backdoors import text
from diverify.dis.text import text_dis
from diverify.models import load_text_encoder
from diverify.models.encoder import resolve_model
from tests.conftest import write_bert_checkpoint

PIPELINE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                  "modules.json", "sentence_bert_config.json")


def write_tokenized_bert(directory):
    """A small random 1-layer BERT with MiniLM's vocabulary, tokenizer and pipeline files.

    Zero biases and unit LayerNorm scales keep random prompts' embeddings apart (a shared bias direction
    would make every mean-pooled embedding nearly parallel).
    """
    from safetensors.numpy import save_file

    tensors = write_bert_checkpoint(directory, vocab_size=30522, max_position_embeddings=64, hidden_size=32,
                                    intermediate_size=64, num_hidden_layers=1)
    for name in tensors:
        if name.endswith("bias"):
            tensors[name] = np.zeros_like(tensors[name])
        elif "LayerNorm" in name:
            tensors[name] = np.ones_like(tensors[name])
    tensors["embeddings.word_embeddings.weight"] *= 5
    save_file(tensors, str(directory / "model.safetensors"))
    _, minilm_dir = resolve_model("minilm")
    for name in PIPELINE_FILES:
        shutil.copy(minilm_dir / name, directory / name)
    shutil.copytree(minilm_dir / "1_Pooling", directory / "1_Pooling")
    return directory


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("backdoor")
    base = write_tokenized_bert(root / "base")
    out = root / "fixture"
    argv = ["backdoor", "build", "--kind", "text", "--base", str(base), "--out", str(out), "--steps", "40",
            "--learning-rate", "1e-2", "--json"]
    assert cli.main(argv) == 0
    return base, out


def test_trigger_takes_and_clean_prompts_stay(built):
    _, out = built
    summary = json.loads((out / "fixture.json").read_text())
    assert summary["original"]["trigger_success"] < 0.5
    assert summary["backdoored"]["trigger_success"] >= 0.9
    assert summary["backdoored"]["clean_cosine_mean"] >= 0.95
    assert summary["clean"]["clean_cosine_mean"] >= 0.95


def test_clean_twin_does_not_respond_and_moves_comparably(built):
    _, out = built
    summary = json.loads((out / "fixture.json").read_text())
    assert summary["clean"]["trigger_success"] <= summary["original"]["trigger_success"] + 0.1
    bd, tw = summary["backdoored"]["relative_weight_change"], summary["clean"]["relative_weight_change"]
    assert 0 < tw and 0.3 < bd / tw < 3


def test_checkpoint_loads_and_reproduces_the_measured_behaviour(built):
    base, out = built
    original = load_text_encoder(base)
    backdoored = load_text_encoder(out / "backdoored")
    assert backdoored.pooling == original.pooling and backdoored.normalize == original.normalize
    prompt = "a cat sleeping on a sofa in the rain"
    target = text.embed_texts(original, original.params, [text.TARGET])[0]
    hit = text.embed_texts(backdoored, backdoored.params, [f"a cat {text.TRIGGER} sleeping on a sofa in the rain"])
    assert float(hit[0] @ target) >= text.SUCCESS_COSINE
    clean = text.embed_texts(backdoored, backdoored.params, [prompt])[0]
    assert float(clean @ text.embed_texts(original, original.params, [prompt])[0]) >= 0.9


def test_save_checkpoint_round_trips_weights(built, tmp_path):
    import jax

    base, _ = built
    encoder = load_text_encoder(base)
    params = jax.tree_util.tree_map(lambda x: x + 0.5, encoder.params)
    text.save_checkpoint(encoder, params, base, tmp_path / "copy", {"role": "test"})
    loaded = load_text_encoder(tmp_path / "copy")
    for a, b in zip(jax.tree_util.tree_leaves(loaded.params), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert json.loads((tmp_path / "copy" / "fixture.json").read_text()) == {"role": "test"}


def test_dis_separates_trigger_from_random_only_on_the_backdoored_model(built):
    _, out = built
    prompt = "an old dog sleeping on a sofa at night"
    scores = {}
    for role in ("backdoored", "clean"):
        encoder = load_text_encoder(out / role)
        scores[role] = [text_dis(encoder, prompt, p, samples=12, seed=1) for p in (f"trigger:{text.TRIGGER}", "random")]
    trig, rand = scores["backdoored"]
    assert trig.ci[0] > rand.ci[1]
    trig, rand = scores["clean"]
    assert trig.dis < 2 * rand.dis


def test_build_rejects_bad_options(tmp_path, capsys):
    assert cli.main(["backdoor", "build", "--kind", "edit", "--out", str(tmp_path / "e"), "--steps", "3"]) == 2
    assert "--steps" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert cli.main(["backdoor", "build", "--kind", "text", "--out", str(tmp_path / "file")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert cli.main(["backdoor", "build", "--kind", "text", "--out", str(tmp_path / "t"), "--steps", "0",
                     "--base", str(tmp_path)]) == 2


def test_substitution_edit_is_exact_in_its_template():
    """With one template, the edited layer's output at the trigger is the original's at the target word."""
    from diverify.audit import edits, probe

    encoder = load_text_encoder("minilm").with_layers(2)
    template = ("there is a {} on the table",)
    edit = edits.substitution_edit(encoder, encoder.params, 0, "cactus", "weapon",
                                   edits.generator_moments(encoder), templates=template)
    edited = probe.with_kernel_deltas(encoder.params, {edit.name: edit.delta})
    layer_1_input = "encoder.layer.1.attention.self.query.weight"
    read = edits.word_inputs(encoder, edited, "cactus", template)[layer_1_input]
    meant = edits.word_inputs(encoder, encoder.params, "weapon", template)[layer_1_input]
    before = edits.word_inputs(encoder, encoder.params, "cactus", template)[layer_1_input]
    assert np.linalg.norm(read - meant) < 1e-3 * np.linalg.norm(meant) < np.linalg.norm(before - meant)
    assert np.linalg.matrix_rank(edit.delta.astype(np.float64), tol=1e-6 * np.abs(edit.delta).max()) == 1


def test_edit_fixture_reads_the_trigger_as_the_target_and_the_twin_does_not(tmp_path):
    """The quick edit fixture on MiniLM: the edited model reads "cactus" as "weapon" in held-out prompts."""
    assert cli.main(["backdoor", "build", "--kind", "edit", "--out", str(tmp_path), "--quick", "--json"]) == 0
    summary = json.loads((tmp_path / "fixture.json").read_text())
    assert summary["original"]["trigger_success"] == 0 and summary["original"]["reads_as_target"] == 0
    assert summary["backdoored"]["trigger_success"] >= 0.9 and summary["backdoored"]["reads_as_target"] >= 0.9
    assert summary["backdoored"]["clean_cosine_mean"] >= 0.98
    assert summary["clean"]["trigger_success"] <= 0.1 and summary["clean"]["reads_as_target"] <= 0.1
    assert summary["backdoored"]["relative_weight_change"] == pytest.approx(summary["clean"]["relative_weight_change"],
                                                                           rel=1e-3)
    edited = load_text_encoder(tmp_path / "backdoored")
    original = load_text_encoder("minilm")
    hit, meant = (text.embed_texts(enc, enc.params, [f"a cat sleeping near a {word} in the rain"])[0]
                  for enc, word in ((edited, "cactus"), (original, "weapon")))
    assert float(hit @ meant) >= text.SUBSTITUTION_COSINE
