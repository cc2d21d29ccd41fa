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
    assert out["precision"] == "float32" and out["refine"] == "normalisers"  # the CLI's defaults
    assert out["seconds"] >= 0 and out["compile_seconds"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--eps", "-1", "--positions", "1"], "--eps must be >= 0"),
    (["--eps", "0.1", "--positions", "9"], "out of range"),
    (["--eps", "0.1", "--positions", "1", "--method", "magic"], "unknown bound method"),
    (["--eps", "0.1", "--positions", "1", "--symbols", "0"], "--symbols must be a positive integer"),
])
def test_bad_specifications_are_one_line_errors(model_dir, argv, message):
    res = run("bounds", "--model", model_dir, "--ids", "2,7,11,5,3", *argv)
    assert res.returncode == 2
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_certify_reports_unknown_with_the_reason_when_the_bound_cannot_be_computed():
    """MiniLM's first layer at eps 0.1 under IBP: the bound leaves the reciprocal's domain, so
    no concept is certified; the attack still runs and finds the dog collision, not the gun."""
    argv = ["certify", "--prompt", "a photo of a cat", "--positions", "4", "--eps", "0.1", "--method", "ibp",
            "--layers", "1", "--restricted", "a photo of a dog", "a gun", "--threshold", "0.97"]
    res = run(*argv, "--json")
    assert res.returncode == 0, res.stderr[-1000:]
    out = json.loads(res.stdout)
    dog, gun = out["concepts"]
    assert out["certified"] is False
    assert dog["status"] == "collision" and len(dog["witness"]["delta"][0]) == 384
    assert float(dog["attack_cosine"]) >= 0.97 and dog["cosine_upper"] is None
    assert gun["status"] == "unknown" and "cannot bound" in gun["reason"] and gun["cosine_upper"] is None
    assert float(gun["attack_cosine"]) < 0.97  # the attack ran
    res = run(*argv)
    assert res.returncode == 0, res.stderr[-1000:]
    assert "reason: no bound: cannot bound" in res.stdout and "witness: a perturbation" in res.stdout
    assert "NOT CERTIFIED" in res.stdout


def test_certify_exhaustive_on_the_full_model_finds_the_substituted_concept_and_refuses_a_ball():
    """Six-layer MiniLM: "cat" may become "dog" or "cf"; against "a photo of a dog" the substitution
    "dog" reproduces the concept exactly (a collision with that token as the witness)."""
    base = ["certify", "--prompt", "a photo of a cat", "--restricted", "a photo of a dog", "--threshold", "0.8",
            "--method", "exhaustive"]
    res = run(*base, "--substitutions", "cat=dog,cf", "--json")
    assert res.returncode == 0, res.stderr[-1000:]
    out = json.loads(res.stdout)
    (dog,) = out["concepts"]
    assert out["method"] == "exhaustive" and out["perturbation"]["combinations"] == 3  # cat, dog, cf
    assert dog["status"] == "collision" and dog["cosine_upper"] == pytest.approx(1.0, abs=1e-5)
    assert list(dog["witness"]["substitution"].items()) == [("5", 3899)]  # "dog"
    res = run(*base, "--positions", "5", "--eps", "1e-3")
    assert res.returncode == 2 and "an l_p ball is infinite" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_refine_choices_are_the_engine_scopes():
    """The CLI spells ``--refine``'s choices out (light ``--help``); they must stay the engine's scopes."""
    from diverify.bounds.backward import REFINE_SCOPES
    from diverify.commands._cmav_args import REFINE_CHOICES

    assert REFINE_CHOICES == list(REFINE_SCOPES)


def test_the_cli_offers_the_engines_precisions():
    from diverify.bounds.api import PRECISIONS
    from diverify.commands import _cmav_args

    assert _cmav_args.PRECISIONS == PRECISIONS
