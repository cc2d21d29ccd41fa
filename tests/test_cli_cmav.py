"""``diverify bounds`` / ``certify`` round trips and their errors, on a small random BERT."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import write_bert_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-bert")
    write_bert_checkpoint(d, seed=5, num_hidden_layers=1)
    return str(d)


def run(*argv):
    return subprocess.run([sys.executable, "-m", "diverify.cli", *argv], capture_output=True, text=True, timeout=600)


def test_bounds_json_contains_the_center(model_dir):
    res = run("bounds", "--model", model_dir, "--ids", "2,7,11,5,3", "--positions", "2", "--eps", "1e-4",
              "--method", "crown-forward", "--json")
    assert res.returncode == 0, res.stderr[-1000:]
    out = json.loads(res.stdout)
    lo, hi, c = (np.asarray(out[k]) for k in ("lower", "upper", "center"))
    assert np.all(lo <= c) and np.all(c <= hi)
    assert out["method"] == "crown-forward" and out["intermediate_method"] == "forward"
    assert out["seconds"] >= 0 and out["compile_seconds"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--eps", "-1", "--positions", "1"], "--eps must be >= 0"),
    (["--eps", "0.1", "--positions", "9"], "out of range"),
    (["--eps", "0.1", "--positions", "1", "--method", "magic"], "unknown bound method"),
])
def test_bad_specifications_are_one_line_errors(model_dir, argv, message):
    res = run("bounds", "--model", model_dir, "--ids", "2,7,11,5,3", *argv)
    assert res.returncode == 2
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
