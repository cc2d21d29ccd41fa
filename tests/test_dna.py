"""Model DNA: hash stability, byte sensitivity, and the lineage verdict's thresholds."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from diverify import dna
from diverify.safetensors_io import open_checkpoint
from diverify.errors import DiverifyError
from diverify.results import dumps

from tests.conftest import TINY_BERT

TINY = str(TINY_BERT)


def write_model(path, tensors, config_from=TINY):
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    shutil.copy(f"{config_from}/config.json", path / "config.json")
    return path


@pytest.fixture(scope="module")
def tiny_tensors():
    return load_file(f"{TINY}/model.safetensors")


@pytest.fixture(scope="module")
def tiny_fp():
    return dna.fingerprint(TINY)


def test_same_model_same_fingerprint(tmp_path, tiny_fp):
    copy = tmp_path / "copy"
    shutil.copytree(TINY, copy)
    again = dna.fingerprint(copy)
    assert again.content_hash == tiny_fp.content_hash
    result = dna.compare(tiny_fp, again)
    assert result.verdict == "identical" and result.distance == 0.0


def test_hash_ignores_sharding_and_file_order(tmp_path, tiny_tensors, tiny_fp):
    names = sorted(tiny_tensors)
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    first, second = names[::2], names[1::2]
    save_file({n: tiny_tensors[n] for n in reversed(first)}, str(shard_dir / "a.safetensors"))
    save_file({n: tiny_tensors[n] for n in second}, str(shard_dir / "b.safetensors"))
    index = {"weight_map": {**{n: "a.safetensors" for n in first}, **{n: "b.safetensors" for n in second}}}
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(f"{TINY}/config.json", shard_dir / "config.json")
    assert dna.fingerprint(shard_dir).content_hash == tiny_fp.content_hash


@pytest.mark.parametrize("which", [0, 1, 2])
def test_any_changed_byte_changes_hash_but_keeps_lineage(tmp_path, tiny_fp, which):
    copy = tmp_path / "edited"
    shutil.copytree(TINY, copy)
    file = copy / "model.safetensors"
    file.chmod(0o644)
    info = sorted(open_checkpoint(copy).tensors.values(), key=lambda i: i.name)[which * 15]
    position = info.offset + np.random.default_rng(which).integers(info.nbytes // 4) * 4
    raw = bytearray(file.read_bytes())
    raw[position] ^= 0x01  # lowest mantissa byte of a little-endian float32
    file.write_bytes(bytes(raw))
    edited = dna.fingerprint(copy)
    assert edited.content_hash != tiny_fp.content_hash
    result = dna.compare(tiny_fp, edited)
    assert result.verdict == "lineage" and result.distance < 1e-3


def test_small_fine_tune_is_lineage(tmp_path, tiny_tensors, tiny_fp):
    rng = np.random.default_rng(0)
    tuned = {n: (t + 0.02 * t.std() * rng.standard_normal(t.shape)).astype(t.dtype)
             for n, t in tiny_tensors.items()}
    result = dna.compare(tiny_fp, dna.fingerprint(write_model(tmp_path / "tuned", tuned)))
    assert result.verdict == "lineage"
    assert 0.0 < result.distance < 0.1


def test_independent_random_weights_are_unrelated(tmp_path, tiny_tensors, tiny_fp):
    rng = np.random.default_rng(1)
    fresh = {n: (t.mean() + t.std() * rng.standard_normal(t.shape)).astype(t.dtype)
             for n, t in tiny_tensors.items()}
    fresh_fp = dna.fingerprint(write_model(tmp_path / "fresh", fresh))
    result = dna.compare(tiny_fp, fresh_fp)
    assert result.verdict == "unrelated"
    assert result.distance > 2 * dna.LINEAGE_DISTANCE
    # The spectra alone barely differ: that is why the verdict uses the sketch.
    assert result.spectral_distance < result.distance


def test_different_structure_is_unrelated(tmp_path, tiny_tensors, tiny_fp):
    smaller = {n: t for n, t in tiny_tensors.items() if not n.startswith("encoder.layer.1.")}
    result = dna.compare(tiny_fp, dna.fingerprint(write_model(tmp_path / "small", smaller)))
    assert result.verdict == "unrelated" and result.distance == float("inf")


def test_json_round_trip(tmp_path, tiny_fp):
    path = tmp_path / "fp.json"
    path.write_text(dumps(tiny_fp))
    loaded = dna.load_fingerprint(path)
    assert loaded == tiny_fp
    assert loaded.architecture["hidden_size"] == 64
    assert loaded.n_parameters == sum(int(np.prod(t.shape)) for t in load_file(f"{TINY}/model.safetensors").values())


def test_bad_inputs_raise_diverify_errors(tmp_path):
    with pytest.raises(DiverifyError, match="no such checkpoint"):
        dna.fingerprint(tmp_path / "nowhere")
    (tmp_path / "junk.json").write_text('{"content_hash": 1}')
    with pytest.raises(DiverifyError, match="not a diverify fingerprint"):
        dna.load_fingerprint(tmp_path / "junk.json")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(DiverifyError, match="corrupt"):
        dna.fingerprint(broken)
