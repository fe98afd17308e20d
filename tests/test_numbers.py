"""Hand-computed values for the numbers every verdict rests on: evaluation metrics and the table,
the learning-rate schedule, and AdamW's masked weight decay with global-norm clipping."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from bpo_jax import evaluate
from bpo_jax.config import OptimSection
from bpo_jax.train import learning_rate_schedule, make_optimizer

# -- evaluate ---------------------------------------------------------------------------------------


def test_compare_rewards_counts_ties_as_one_half():
    policy = [1.0, 0.5, 0.2, 0.0]
    reference = [0.5, 0.5, 0.4, -1.0]
    # win, tie, loss, win: (1 + 1/2 + 0 + 1) / 4; means 1.7 / 4 and 0.4 / 4.
    assert evaluate.compare_rewards(policy, reference) == pytest.approx(
        {"policy_mean_reward": 0.425, "reference_mean_reward": 0.1, "win_rate": 0.625, "n_responses": 4})
    assert evaluate.compare_rewards([2.0, 2.0], [2.0, 2.0])["win_rate"] == 0.5  # identical policies: one half
    with pytest.raises(ValueError, match="equal in shape"):
        evaluate.compare_rewards([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="non-empty"):
        evaluate.compare_rewards([], [])


def test_preference_accuracy_sign_convention(monkeypatch):
    """Implicit margin = (pc - rc) - (pr - rr) > 0 counts as correct; log-lik accuracy is pc > pr."""
    policy, reference = object(), object()
    logps = {  # summed (chosen, rejected) log-probs of five pairs, per model
        policy: (np.array([-1.0, -5.0, -2.0, -3.0, -1.0]), np.array([-2.0, -4.0, -2.0, -1.0, -1.0])),
        reference: (np.array([-1.5, -4.0, -3.0, -6.0, -1.0]), np.array([-2.0, -4.5, -1.0, -1.0, -1.0])),
    }
    monkeypatch.setattr(evaluate, "pair_logps", lambda model, data, mesh, batch_size: logps[model])
    # margins: (0.5) - (0) = 0.5, (-1) - (0.5) = -1.5, (1) - (-1) = 2, (3) - (0) = 3, 0 - 0 = 0
    # -> 3 of 5 positive. pc > pr: pair 0 only (pair 2 ties). rc > rr: pairs 0 and 1.
    result = evaluate.preference_accuracy(policy, reference, [None] * 5, mesh=None)
    assert result == pytest.approx({"implicit_reward_accuracy": 0.6, "policy_logp_accuracy": 0.2,
                                    "reference_logp_accuracy": 0.4, "n_pairs": 5})


def test_format_table_exact_text():
    results = {"policy_mean_reward": 0.425, "reference_mean_reward": 0.1, "win_rate": 0.625,
               "policy_logp_accuracy": 0.2, "reference_logp_accuracy": 0.4, "implicit_reward_accuracy": 0.6}
    # Columns left-justified to the widest cell (37, 6, 9), two spaces apart; a dash rule under the header.
    assert evaluate.format_table(results) == "\n".join([
        " " * 37 + "  policy  reference",
        "-" * 37 + "  ------  ---------",
        "mean reward" + " " * 26 + "  0.4250  0.1000   ",
        "win rate vs reference" + " " * 16 + "  0.625   0.500    ",
        "preference accuracy (log-lik)" + " " * 8 + "  0.200   0.400    ",
        "preference accuracy (implicit reward)  0.600   -        ",
    ])
    only_rewards = {k: results[k] for k in ("policy_mean_reward", "reference_mean_reward", "win_rate")}
    assert evaluate.format_table(only_rewards) == "\n".join([
        " " * 21 + "  policy  reference",
        "-" * 21 + "  ------  ---------",
        "mean reward" + " " * 10 + "  0.4250  0.1000   ",
        "win rate vs reference  0.625   0.500    ",
    ])


# -- learning-rate schedule -------------------------------------------------------------------------

LR, WARMUP, TOTAL = 1e-3, 4, 20  # decay over the remaining 16 steps


@pytest.mark.parametrize("schedule, expected", [
    # step 0 and 2 warm up linearly (2 / 4 of the peak); step 8 is 4 of 16 decay steps in:
    # cosine 0.5 * (1 + cos(pi / 4)) = 0.8535534 of the peak, linear 1 - 4 / 16 = 0.75.
    # step:       0    2       4     8             12      20   25 (past the end)
    ("cosine", [0.0, 0.5e-3, 1e-3, 0.8535534e-3, 0.5e-3, 0.0, 0.0]),
    ("linear", [0.0, 0.5e-3, 1e-3, 0.75e-3, 0.5e-3, 0.0, 0.0]),
    ("constant", [0.0, 0.5e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3]),
])
def test_learning_rate_schedule_values(schedule, expected):
    fn = learning_rate_schedule(OptimSection(learning_rate=LR, warmup_steps=WARMUP, schedule=schedule), TOTAL)
    got = [float(fn(step)) for step in (0, 2, 4, 8, 12, 20, 25)]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)


def test_learning_rate_schedule_without_warmup_starts_at_the_peak():
    fn = learning_rate_schedule(OptimSection(learning_rate=LR, warmup_steps=0, schedule="linear"), 10)
    np.testing.assert_allclose([float(fn(s)) for s in (0, 5, 10)], [1e-3, 0.5e-3, 0.0], rtol=1e-6, atol=1e-12)


# -- AdamW: decay on matrices only, global-norm clipping ----------------------------------------------


# optax takes 1 - b2 in float64 for the second moment but 1 - b2**t in float32 for its bias correction:
# Adam's first step comes out about 6e-6 (relative) off g / (|g| + eps).
ADAM_RTOL = 2e-5


def one_update(optim: OptimSection, params: dict, grads: dict) -> dict:
    tx, _ = make_optimizer(optim, total_steps=10)
    updates, _ = tx.update(grads, tx.init(params), params)
    return {k: np.asarray(v) for k, v in updates.items()}


def test_adamw_decays_matrices_and_not_vectors():
    params = {"w": jnp.array([[1.0, -2.0], [0.5, 0.0]]), "b": jnp.array([3.0, -1.0])}
    grads = {"w": jnp.array([[0.5, -0.25], [1.0, 2.0]]), "b": jnp.array([0.2, -0.4])}
    optim = OptimSection(learning_rate=0.1, schedule="constant", weight_decay=0.5, max_grad_norm=0.0)
    # Adam's first step: bias-corrected m / (sqrt(v) + eps) = g / (|g| + eps), about sign(g).
    # update = -lr * (sign(g) + weight_decay * param) for the matrix, -lr * sign(g) for the vector:
    # w: -0.1 * ([[1, -1], [1, 1]] + 0.5 * [[1, -2], [0.5, 0]]).
    updates = one_update(optim, params, grads)
    np.testing.assert_allclose(updates["w"], [[-0.15, 0.2], [-0.125, -0.1]], rtol=ADAM_RTOL)
    np.testing.assert_allclose(updates["b"], [-0.1, 0.1], rtol=ADAM_RTOL)  # decayed it would be [-0.25, 0.15]


@pytest.mark.parametrize("max_grad_norm, scale", [(1.0, 1 / 5), (10.0, 1.0), (0.0, 1.0)])
def test_global_norm_clipping(max_grad_norm, scale):
    """Gradients of global norm 5 are scaled to norm max_grad_norm when above it (0: no clipping).

    eps = 1 makes Adam's first step g / (|g| + 1), so the update shows the gradient's size."""
    params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
    grads = {"w": jnp.array([[3.0, 0.0], [0.0, 0.0]]), "b": jnp.array([4.0, 0.0])}  # norm sqrt(9 + 16) = 5
    optim = OptimSection(learning_rate=1.0, schedule="constant", eps=1.0, max_grad_norm=max_grad_norm)
    updates = one_update(optim, params, grads)
    w, b = 3.0 * scale, 4.0 * scale  # clipped: 0.6 and 0.8
    np.testing.assert_allclose(updates["w"], [[-w / (w + 1), 0.0], [0.0, 0.0]], rtol=ADAM_RTOL)
    np.testing.assert_allclose(updates["b"], [-b / (b + 1), 0.0], rtol=ADAM_RTOL)
