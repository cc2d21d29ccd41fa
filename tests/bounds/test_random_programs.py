"""Every method and precision on random compositions of the bounded operations, checked in float64
(see :mod:`tests.bounds.random_programs`; ``python -m tests.bounds.random_programs 0:400`` runs more)."""

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
