"""Reading checkpoints and LoRA adapters, pairing tensors, and the errors for bad inputs."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file as torch_save_file

from diverify.audit.report import audit_pairs
from diverify.audit.spectral import LowRankDelta
from diverify.audit.weights import iter_matrix_pairs, open_lora_adapter
from diverify.safetensors_io import load_tensor, open_checkpoint, read_safetensors_header
from diverify.errors import DiverifyError

from .conftest import TINY

KEY = "encoder.layer.0.attention.self.key.weight"
QUERY = "encoder.layer.1.attention.self.query.weight"


def test_identical_checkpoints_have_zero_deltas(tiny_tensors):
    base = open_checkpoint(TINY)
    pairs = list(iter_matrix_pairs(base, open_checkpoint(TINY)))
    assert {p.name for p in pairs} == {n for n, t in tiny_tensors.items() if t.ndim == 2}
    assert all(not np.any(p.delta) for p in pairs)
    np.testing.assert_array_equal(base.load(KEY), tiny_tensors[KEY])


def test_delta_is_suspect_minus_base(make_model, tiny_tensors):
    change = np.full_like(tiny_tensors[KEY], 0.25)
    suspect = make_model("s", {KEY: tiny_tensors[KEY] + change})
    deltas = {p.name: p.delta for p in iter_matrix_pairs(open_checkpoint(TINY), open_checkpoint(suspect))}
    np.testing.assert_allclose(deltas[KEY], change, atol=1e-6)
    assert not np.any(deltas[QUERY])


def test_bfloat16_tensors_load_as_float32(tmp_path):
    values = torch.randn(5, 3).to(torch.bfloat16)
    torch_save_file({"w": values}, str(tmp_path / "x.safetensors"))
    loaded = load_tensor(read_safetensors_header(tmp_path / "x.safetensors")["w"])
    np.testing.assert_array_equal(loaded, values.float().numpy())


def test_missing_tensor_is_named(make_model):
    suspect = make_model("s", drop=(QUERY,))
    with pytest.raises(DiverifyError, match=f"missing tensors of the base: {QUERY}"):
        list(iter_matrix_pairs(open_checkpoint(TINY), open_checkpoint(suspect)))


def test_shape_mismatch_is_named(make_model):
    suspect = make_model("s", {QUERY: np.zeros((64, 32), np.float32)})
    with pytest.raises(DiverifyError, match=f"tensor {QUERY}: shape"):
        list(iter_matrix_pairs(open_checkpoint(TINY), open_checkpoint(suspect)))


def test_different_architecture_is_reported(make_model):
    suspect = make_model("s", config_changes={"hidden_size": 128})
    with pytest.raises(DiverifyError, match="different architectures.*hidden_size"):
        list(iter_matrix_pairs(open_checkpoint(TINY), open_checkpoint(suspect)))


def test_corrupt_files_are_reported(tmp_path, make_model):
    model = make_model("s")
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DiverifyError, match="truncated"):
        open_checkpoint(model)
    (model / "model.safetensors").write_bytes(b"\xff" * 4)
    with pytest.raises(DiverifyError, match="not a safetensors file"):
        open_checkpoint(model)
    with pytest.raises(DiverifyError, match="no such checkpoint"):
        open_checkpoint(tmp_path / "absent")


def test_lora_adapter_delta_and_scale(make_adapter):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 64)), rng.standard_normal((64, 4))
    module = QUERY.removesuffix(".weight")
    plain = open_lora_adapter(make_adapter("plain", {module: (a, b)}, r=4, alpha=8))
    np.testing.assert_allclose(plain.deltas[QUERY].dense(), 2.0 * b @ a, rtol=1e-5, atol=1e-5)
    rs = open_lora_adapter(make_adapter("rs", {module: (a, b)}, r=4, alpha=8, rslora=True))
    np.testing.assert_allclose(rs.deltas[QUERY].dense(), 4.0 * b @ a, rtol=1e-5, atol=1e-5)


def test_adapter_audit_equals_materialised_delta(make_adapter, make_model, tiny_tensors):
    rng = np.random.default_rng(1)
    factors = {}
    changes = {}
    for name, r in ((QUERY, 4), ("encoder.layer.0.attention.self.value.weight", 4)):
        a, b = 0.1 * rng.standard_normal((r, 64)), 0.1 * rng.standard_normal((64, r))
        factors[name.removesuffix(".weight")] = (a, b)
        changes[name] = (tiny_tensors[name].astype(np.float64) + 4.0 * b @ a).astype(np.float32)
    adapter = make_adapter("adapter", factors, r=4, alpha=16)
    merged = make_model("merged", changes)
    base = open_checkpoint(TINY)
    pairs = list(iter_matrix_pairs(base, open_lora_adapter(adapter)))
    assert all(isinstance(p.delta, LowRankDelta) for p in pairs) and len(pairs) == 2
    via_adapter = {m.name: m for m in audit_pairs(pairs).matrices}
    via_merged = {m.name: m for m in audit_pairs(iter_matrix_pairs(base, open_checkpoint(merged))).matrices}
    for name, m in via_adapter.items():
        other = via_merged[name]
        for field in ("frobenius", "relative_norm", "stable_rank", "effective_rank", "null_space_energy"):
            # The merged checkpoint carries float32 rounding of W + dW.
            assert getattr(m, field) == pytest.approx(getattr(other, field), rel=1e-3, abs=1e-4), (name, field)
        np.testing.assert_allclose(m.top_singular_values[:4], other.top_singular_values[:4], rtol=1e-3)


def test_bad_adapters_are_reported(make_adapter, tmp_path):
    rng = np.random.default_rng(2)
    unknown = make_adapter("unknown", {"encoder.layer.7.attention.self.query": (rng.standard_normal((2, 64)),
                                                                                rng.standard_normal((64, 2)))},
                           r=2, alpha=2)
    with pytest.raises(DiverifyError, match="does not have"):
        list(iter_matrix_pairs(open_checkpoint(TINY), open_lora_adapter(unknown)))
    mismatched = make_adapter("mismatched", {QUERY.removesuffix(".weight"): (rng.standard_normal((2, 64)),
                                                                              rng.standard_normal((64, 3)))},
                              r=2, alpha=2)
    with pytest.raises(DiverifyError, match="mismatched LoRA factors"):
        open_lora_adapter(mismatched)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "adapter_config.json").write_text("{")
    with pytest.raises(DiverifyError, match="adapter_config.json"):
        open_lora_adapter(tmp_path / "empty")
