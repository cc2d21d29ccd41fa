"""``diverify embed``: JSON and table output, the bad inputs, and a real subprocess round trip."""

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest

from diverify import cli
from diverify.commands import embed
from diverify.errors import DiverifyError
from diverify.models import load_text_encoder


def run_embed(argv):
    parser = argparse.ArgumentParser()
    embed.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["embed", *argv])
    return args.func(args)


def test_json_ids_round_trip(bert_dir, capsys):
    assert run_embed(["--json", "--model", str(bert_dir), "--ids", "1, 2,3 4,5,6"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"model", "embeddings"} and out["model"] == str(bert_dir)
    want = np.asarray(load_text_encoder(bert_dir).embed_ids(np.array([[1, 2, 3, 4, 5, 6]])))
    np.testing.assert_allclose(np.array(out["embeddings"]), want, atol=1e-6, rtol=0)


def test_minilm_text_json(minilm, capsys):
    assert run_embed(["--json", "a photo of a cat", "a dog"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    got = np.array(out["embeddings"])
    np.testing.assert_allclose(got, minilm.embed(["a photo of a cat", "a dog"]), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_table_output(bert_dir, capsys):
    assert run_embed(["--model", str(bert_dir), "--ids", "4,5,6,7,8,9"]) == 0
    out = capsys.readouterr().out
    assert "ids 4,5,6,7,8,9" in out and " 16 " in out and "pooling mean" in out


@pytest.mark.parametrize("argv, message", [
    ([], "nothing to embed"),
    (["--ids", "1,2", "a cat"], "either TEXT arguments or --ids"),
    (["--ids", "1,x"], "'x' is not an integer"),
    (["--ids", " , "], "no token ids"),
    (["--ids", "1,999"], "token id 999 is outside the vocabulary"),
])
def test_bad_input_is_one_line_exit_2(bert_dir, capsys, argv, message):
    code = cli.main(["embed", "--model", str(bert_dir), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err and err.startswith("diverify embed: error:")


def test_missing_model_directory(tmp_path):
    with pytest.raises(DiverifyError, match="does not exist"):
        run_embed(["--model", str(tmp_path / "none"), "--ids", "1"])


def test_subprocess_json_is_the_only_stdout(bert_dir):
    proc = subprocess.run([sys.executable, "-m", "diverify.cli", "embed", "--json", "--model", str(bert_dir),
                           "--ids", "7,8,9"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["embeddings"]) == 1 and len(out["embeddings"][0]) == 16
