"""``diverify certify-edit`` rejects a selection that is not a weight matrix with a one-line error."""

import subprocess
import sys

from tests.conftest import write_bert_checkpoint


def test_a_bias_selection_is_a_one_line_error(tmp_path):
    write_bert_checkpoint(tmp_path / "bert", num_hidden_layers=1)
    res = subprocess.run([sys.executable, "-m", "diverify.cli", "certify-edit", "--model", str(tmp_path / "bert"),
                          "--ids", "2,7,11,3", "--params", "*value/bias", "--radius", "0.01", "--restricted", "x"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert "not a Dense kernel" in res.stderr and len(res.stderr.strip().splitlines()) == 1
