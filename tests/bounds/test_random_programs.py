"""Every method and precision on random compositions of the bounded operations, checked in float64
(see :mod:`tests.bounds.random_programs`; ``python -m tests.bounds.random_programs 0:400`` runs more)."""

import pathlib
import subprocess
import sys

import pytest

from tests.bounds.random_programs import METHODS, PRECISIONS, check, draw

#: One drawn program per method, the precisions in turn (seed 100 + k: disjoint from a long run's 0:100).
CASES = [(100 + k, m, PRECISIONS[k % len(PRECISIONS)]) for k, m in enumerate(METHODS)]


@pytest.mark.parametrize("seed, method, precision", CASES)
def test_random_program_outputs_stay_inside_the_bounds(seed, method, precision):
    problem = draw(seed, method, precision)
    result = check(problem)
    if "refused" in result:
        pytest.skip(f"refused: {result['refused']}")
    assert result["excess"] <= result["allowed"], (
        f"an output leaves the bound by {result['excess']:.3g} of the output scale "
        f"(allowed {result['allowed']:g}): {problem.describe()}")


def test_forward_slack_chains_compile_and_run_in_bounded_time():
    """Seed 11 (a 2 x 2 program of five blocks with two maxima) in ``forward`` / ``crown-forward`` with
    float64 values: under XLA:CPU's fusion emitters its interval-slack chain compiled in 30-40 s and
    then ran for more than 10 min (:mod:`diverify.xla_options`). In a subprocess, so that such a hang
    fails the test instead of stalling the suite."""
    code = ("from tests.bounds.random_programs import check, draw\n"
            "for method, precision in [('forward', 'mixed'), ('crown-forward', 'float64')]:\n"
            "    r = check(draw(11, method, precision))\n"
            "    print(method, r.get('excess'), r.get('allowed'), r.get('refused'))\n")
    root = pathlib.Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines()]
    assert [r[0] for r in rows] == ["forward", "crown-forward"]
    for method, excess, allowed, refused in rows:
        assert refused == "None" and float(excess) <= float(allowed), (method, excess)
