"""A planted ROME-style edit on (3-layer) MiniLM scores above benign fine-tune deltas of matched norm.

Seeded: the fine-tune, the edit's trigger and target, and the probe prompts are
fixed, so the margin asserted below is reproducible; it was set with room
below the margin measured (see benchmarks/audit.py for the statistics over
100+ samples).
"""

import dataclasses

import numpy as np
import pytest

from diverify.audit import edits, probe
from diverify.audit.report import FLAG_SUSPICION, audit_pairs
from diverify.audit.weights import MatrixPair

LAYER = 1
#: Required gap between the planted and the largest benign score (decades of gain).
MARGIN = 0.2


@pytest.fixture(scope="module")
def setting():
    from diverify.models import load_text_encoder

    encoder = load_text_encoder("minilm").with_layers(LAYER + 1)
    names = edits.dense_names(encoder.params)
    weights = {n: edits.dense_weight(encoder.params, n).astype(np.float32) for n in names}
    snapshots = [d for _, d in edits.finetune_snapshots(encoder, mode=f"layer:{LAYER}", steps=3,
                                                        snapshot_every=1, learning_rate=5e-5, seed=0)][1:]
    return encoder, names, weights, snapshots, probe.probe_statistics(probe.input_second_moments(encoder)), edits.generator_moments(encoder)


def score(names, weights, deltas, moments):
    return audit_pairs([MatrixPair(n, weights[n], deltas[n]) for n in names], moments)


def test_fine_tune_changes_only_its_layer(setting):
    _, names, _, snapshots, _, _ = setting
    changed = {n for n in names if np.any(snapshots[-1][n] != 0)}
    assert changed and all(f"layer.{LAYER}." in n for n in changed)


def test_rome_edit_maps_trigger_to_target(setting):
    encoder, _, _, _, _, attacker = setting
    name = f"encoder.layer.{LAYER}.attention.self.value.weight"
    edit = edits.planted_edit(encoder, encoder.params, name, "cactus", "weapon", attacker)
    w = edits.dense_weight(encoder.params, name)
    k_star = edits.word_inputs(encoder, encoder.params, "cactus")[name]
    k_target = edits.word_inputs(encoder, encoder.params, "weapon")[name]
    np.testing.assert_allclose((w + edit.delta) @ k_star, w @ k_target, rtol=1e-3, atol=1e-3)
    assert np.linalg.matrix_rank(edit.delta.astype(np.float64), tol=1e-6 * np.abs(edit.delta).max()) == 1


def test_planted_edits_score_above_matched_benign_deltas(setting):
    encoder, names, weights, snapshots, moments, attacker = setting
    benign_scores = [score(names, weights, d, moments).score for d in snapshots]
    assert max(benign_scores) < FLAG_SUSPICION
    finetune = snapshots[-1]
    for location in edits.EDIT_LOCATIONS:
        name = f"encoder.layer.{LAYER}.{location}.weight"
        edit = edits.planted_edit(encoder, encoder.params, name, "violin", "blood", attacker).delta
        matched = edit * (np.linalg.norm(finetune[name]) / np.linalg.norm(edit))
        planted = score(names, weights, {**finetune, name: finetune[name] + matched}, moments)
        assert planted.score > max(benign_scores) + MARGIN, location
        assert planted.matrices[0].name == name and name in planted.flagged, location


def test_edit_barely_moves_clean_embeddings_per_unit_norm(setting):
    encoder, names, _, snapshots, _, attacker = setting
    name = f"encoder.layer.{LAYER}.attention.self.value.weight"
    edit = edits.planted_edit(encoder, encoder.params, name, "violin", "blood", attacker).delta
    finetune = snapshots[-1][name]
    suspect = probe.with_kernel_deltas(encoder.params, {name: edit})
    effects = probe.jacobian_sensitivities(encoder, encoder.params, suspect, {name: edit},
                                           texts=probe.DEFAULT_PROBES[:8])
    benign = probe.jacobian_sensitivities(encoder, encoder.params, encoder.params, {name: finetune},
                                          texts=probe.DEFAULT_PROBES[:8])
    edit_base, edit_suspect = effects[name]
    assert edit_base > 0 and edit_suspect > 0
    assert edit_base < 0.5 * benign[name][0]


def test_edit_survives_a_later_lora_fine_tune(setting):
    """Edit first, then a LoRA fine-tune on clean data from the edited weights: the release is still flagged."""
    encoder, names, weights, _, moments, attacker = setting
    name = f"encoder.layer.{LAYER}.attention.self.value.weight"
    edit = edits.planted_edit(encoder, encoder.params, name, "cactus", "weapon", attacker).delta
    edit = edit * (0.02 * np.linalg.norm(weights[name]) / np.linalg.norm(edit))
    edited = dataclasses.replace(encoder, params=probe.with_kernel_deltas(encoder.params, {name: edit}))
    *_, (_, lora) = edits.finetune_snapshots(edited, mode="lora", rank=4, steps=4, snapshot_every=4,
                                             learning_rate=1e-3, seed=1)
    # The LoRA moved the edited matrix by a comparable amount, so the edit is not simply all there is.
    assert np.linalg.norm(lora[name]) > 0.3 * np.linalg.norm(edit)
    benign = score(names, weights, lora, moments)
    released = score(names, weights, {n: lora[n] + (edit if n == name else 0.0) for n in names}, moments)
    assert benign.score < FLAG_SUSPICION and not benign.flagged
    suspicion = {m.name: m.suspicion for m in released.matrices}
    assert name in released.flagged and released.score > benign.score
    assert suspicion[name] > max(m.suspicion for m in benign.matrices) + MARGIN / 4
