"""``diverify audit`` and ``diverify dna`` end to end: exit codes, JSON, policy gate, plot."""

import json

import numpy as np
import pytest

from diverify.audit.report import load_policy
from diverify.cli import main
from diverify.errors import DiverifyError

from .conftest import TINY

VALUE = "encoder.layer.1.attention.self.value.weight"


@pytest.fixture
def edited(make_model, tiny_tensors):
    rng = np.random.default_rng(0)
    w = tiny_tensors[VALUE]
    bump = 0.2 * np.linalg.norm(w) * np.outer(rng.standard_normal(64), rng.standard_normal(64)) / 64
    return make_model("edited", {VALUE: (w + bump).astype(np.float32)})


def write(path, text):
    path.write_text(text)
    return str(path)


def test_json_report_and_hashes(edited, capsys):
    assert main(["audit", "--base", TINY, "--suspect", str(edited), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"score", "flagged", "matrices", "base_hash", "suspect_hash"} <= set(out)
    assert out["base_hash"] != out["suspect_hash"] and out["base_hash"].startswith("sha256:")
    top = out["matrices"][0]
    changed = [m for m in out["matrices"] if m["frobenius"] > 0]
    assert [m["name"] for m in changed] == [VALUE]
    assert {"name", "relative_norm", "stable_rank", "null_space_energy", "suspicion"} <= set(top)
    assert changed[0]["stable_rank"] == pytest.approx(1.0, rel=1e-3)


def test_policy_gate_exit_codes(edited, tmp_path, capsys):
    lenient = write(tmp_path / "ok.toml", "max_relative_norm = 0.5\nmax_score = 100\n")
    strict = write(tmp_path / "strict.toml",
                   'max_relative_norm = 0.5\n[kinds."encoder.layer.*.attention.self.value.weight"]\n'
                   "max_relative_norm = 0.05\n")
    assert main(["audit", "--base", TINY, "--suspect", TINY, "--policy", strict]) == 0
    assert main(["audit", "--base", TINY, "--suspect", str(edited), "--policy", lenient]) == 0
    capsys.readouterr()
    assert main(["audit", "--base", TINY, "--suspect", str(edited), "--policy", strict]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and f"max_relative_norm = 0.05 failed for {VALUE}" in out
    bad = write(tmp_path / "bad.toml", "max_colour = 3\n")
    assert main(["audit", "--base", TINY, "--suspect", str(edited), "--policy", bad]) == 2
    assert "unknown rule 'max_colour'" in capsys.readouterr().err
    assert main(["audit", "--base", TINY, "--suspect", str(tmp_path / "absent")]) == 2


def test_json_policy_result_and_plot(edited, tmp_path, capsys):
    strict = write(tmp_path / "strict.toml", f'[matrices."{VALUE}"]\nmax_relative_norm = 0.0\n')
    plot = tmp_path / "audit.png"
    code = main(["audit", "--base", TINY, "--suspect", str(edited), "--policy", strict, "--json",
                 "--plot", str(plot)])
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and out["policy"]["passed"] is False and len(out["policy"]["violations"]) == 1
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_probes_need_a_tokenizer(edited, capsys):
    assert main(["audit", "--base", TINY, "--suspect", str(edited), "--probe", "a cat"]) == 2
    assert "tokenizer" in capsys.readouterr().err


def test_policy_parsing(tmp_path):
    policy = load_policy(write(tmp_path / "p.toml", 'max_score = 1\nmax_flagged = 0\nmax_suspicion = 0.3\n'
                               '[kinds."a.*.b"]\nmax_null_space_energy = 0.9\n'))
    assert policy.model == {"max_score": 1.0, "max_flagged": 0.0}
    assert policy.matrix == {"max_suspicion": 0.3}
    assert policy.kinds == {"a.*.b": {"max_null_space_energy": 0.9}}
    with pytest.raises(DiverifyError, match="must be a number"):
        load_policy(write(tmp_path / "q.toml", 'max_score = "high"\n'))
    with pytest.raises(DiverifyError, match="not valid TOML"):
        load_policy(write(tmp_path / "r.toml", "max_score = \n"))


def test_dna_cli_round_trip(edited, tmp_path, capsys):
    assert main(["dna", TINY, "--json"]) == 0
    fp = tmp_path / "fp.json"
    fp.write_text(capsys.readouterr().out)
    assert main(["dna", "--verify", TINY, "--against", str(fp), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "identical"
    assert main(["dna", "--verify", str(edited), "--against", str(fp), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["verdict"] == "lineage" and 0 < result["distance"] < 0.5
    assert main(["dna", "--verify", str(edited)]) == 2
