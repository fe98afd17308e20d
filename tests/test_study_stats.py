"""The study statistics (bpo_jax.studies.stats) against hand-computed cases.

The bootstrap draws seeds and prompts with replacement; for tiny matrices its distribution can be
enumerated by hand, and for one seed its variance has a closed form (the plug-in variance / P).
"""

import numpy as np
import pytest

from bpo_jax.studies.stats import Estimate, bootstrap_means, contrast_cells, estimate, verdict


def test_constant_cells_give_a_point_interval():
    e = estimate(np.full((3, 5), 0.25), num=200)
    assert e == Estimate(0.25, 0.25, 0.25)


def test_two_prompts_one_seed_enumerated_by_hand():
    # Resampling 2 prompts from {0, 1}: means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4. The 2.5%
    # and 97.5% percentiles are therefore 0 and 1, and the replicates hit each value in proportion.
    x = np.array([[0.0, 1.0]])
    reps = bootstrap_means(x, 20000, seed=1)
    values, counts = np.unique(reps, return_counts=True)
    np.testing.assert_array_equal(values, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(counts / counts.sum(), [0.25, 0.5, 0.25], atol=0.015)
    e = estimate(x, num=20000)
    assert (e.mean, e.low, e.high) == (0.5, 0.0, 1.0)


def test_seed_level_is_resampled_too():
    # Two seeds that disagree completely, one prompt: the same enumeration over seeds.
    e = estimate(np.array([[0.2], [0.6]]), num=20000)
    assert (e.low, e.high) == pytest.approx((0.2, 0.6))
    assert e.mean == pytest.approx(0.4)


def test_one_seed_variance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 400))
    reps = bootstrap_means(x, 20000, seed=3)
    expected_sd = np.sqrt(np.var(x) / x.size)  # plug-in variance (ddof 0) over P
    assert reps.std() == pytest.approx(expected_sd, rel=0.03)


def test_paired_contrast_cancels_shared_prompt_effects():
    # Two arms share a large per-prompt effect; arm b is arm a + 0.1 everywhere. Paired, the
    # difference is exactly 0.1; unpaired intervals of each arm are wide.
    rng = np.random.default_rng(1)
    a = rng.normal(size=(3, 50))
    b = a + 0.1
    d = contrast_cells([(1.0, [b]), (-1.0, [a])])
    np.testing.assert_allclose(d, 0.1)
    assert estimate(d, num=500) == pytest.approx(Estimate(0.1, 0.1, 0.1))
    assert estimate(a, num=500).high - estimate(a, num=500).low > 0.2


def test_contrast_averages_the_arms_of_a_term():
    a, b, c = np.full((1, 2), 1.0), np.full((1, 2), 3.0), np.full((1, 2), 0.5)
    np.testing.assert_allclose(contrast_cells([(1.0, [a, b]), (-1.0, [c])]), 1.5)  # (1 + 3) / 2 - 0.5


def test_verdicts():
    assert verdict(Estimate(0.02, 0.01, 0.03)) == "reproduced"
    assert verdict(Estimate(-0.02, -0.03, -0.01)) == "not reproduced"
    assert verdict(Estimate(0.01, -0.01, 0.03)) == "inconclusive"
    assert verdict(Estimate(0.0, 0.0, 0.0)) == "inconclusive"


def test_bad_cells_are_refused():
    with pytest.raises(ValueError, match="seeds, prompts"):
        estimate(np.zeros(4))
    with pytest.raises(ValueError, match="non-finite"):
        estimate(np.array([[0.0, np.nan]]))
